"""cluster/: the launchers parse, have what their tools require, and call `atlasvi train` and nothing else.

No cloud, no Kubernetes, no SLURM and no Ray cluster here: the Ray cluster YAML is validated against the
installed Ray's own schema (and filled out as `ray up` does, offline), the RayJob against the fields KubeRay's
ray.io/v1 API requires, the sbatch script with `bash -n`, shellcheck when installed, and one dry run with
stand-ins for srun / scontrol / ray / python / atlasvi on PATH.
"""

import ast
import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_YAML = CLUSTER / "ray-cluster-gpu.yaml"
RAYJOB_YAML = CLUSTER / "kuberay-rayjob.yaml"
SBATCH = CLUSTER / "slurm-ray.sbatch"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"

# The flags of `atlasvi train` a multi-worker launch needs.
REQUIRED_FLAGS = {"--config", "--store", "--output", "--num-workers", "--use-gpu", "--address", "--storage-path"}


def _cli_train_flags() -> set[str]:
    """The options of `atlasvi train`, read from atlasvi/cli/*.py without importing it (that takes seconds)."""
    for path in sorted((ROOT / "atlasvi" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "train_command":
                flags: set[str] = set()
                for arg in node.args.args + node.args.kwonlyargs:
                    names = [
                        part
                        for call in ast.walk(arg.annotation or ast.Constant(None))
                        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") in {"Option", "Argument"}
                        for const in call.args
                        if isinstance(const, ast.Constant) and isinstance(const.value, str)
                        for part in const.value.split("/")
                        if part.startswith("--")
                    ]
                    flags.update(names or ["--" + arg.arg.replace("_", "-")])
                return flags
    raise AssertionError("no train_command in atlasvi/cli/*.py: the launchers call `atlasvi train`")


def _train_args(command: str) -> dict[str, str | bool]:
    """`atlasvi train --a 1 --b ...` -> {"--a": "1", "--b": True, ...}."""
    words = shlex.split(command)
    assert words[:2] == ["atlasvi", "train"], command
    args: dict[str, str | bool] = {}
    i = 2
    while i < len(words):
        flag = words[i]
        assert flag.startswith("--"), f"unexpected word {flag!r} in {command!r}"
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            args[flag], i = words[i + 1], i + 2
        else:
            args[flag], i = True, i + 1
    return args


def _check_train_args(args: dict[str, str | bool]) -> None:
    missing = REQUIRED_FLAGS - set(args)
    assert not missing, f"atlasvi train without {sorted(missing)}"
    assert args["--use-gpu"] is True
    assert args["--address"] == "auto"
    storage = str(args["--storage-path"])
    assert storage.startswith(("/", "s3://", "gs://", "$")), f"storage path must be absolute or a URI: {storage}"
    unknown = set(args) - _cli_train_flags()
    assert not unknown, f"flags `atlasvi train` does not have: {sorted(unknown)}"


def _ray_image_version(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", image)
    assert match, image
    return match.group(1)


# ---- Ray cluster launcher (ray up) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_config() -> dict:
    return yaml.safe_load(RAY_YAML.read_text())


def test_ray_cluster_yaml_matches_the_installed_ray_schema(ray_config: dict):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(ray_config, schema)


def test_ray_cluster_yaml_is_what_ray_up_accepts(ray_config: dict):
    """Ray's own checks after filling in the AWS defaults, as `ray up` does before it calls the cloud."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(ray_config)
    prepared = prepare_config(copy.deepcopy(ray_config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_ray_cluster_has_a_cpu_head_and_gpu_workers(ray_config: dict):
    types = ray_config["available_node_types"]
    head = types[ray_config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert "--num-gpus=0" in " ".join(ray_config["head_start_ray_commands"])
    workers = {name: t for name, t in types.items() if name != ray_config["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker node type"
    assert any(t["max_workers"] > 0 for t in gpu_types.values())
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= ray_config["max_workers"]
        assert re.match(r"(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])


def test_ray_cluster_installs_torch_and_atlasvi(ray_config: dict):
    setup = " ".join(ray_config["setup_commands"])
    assert re.search(r"pip install .*torch", setup)
    assert re.search(r"pip install .*atlasvi", setup)
    assert "./configs" in ray_config["file_mounts"].values()
    assert _ray_image_version(ray_config["docker"]["image"])


def test_ray_cluster_example_command_calls_atlasvi_train():
    header = "\n".join(line.lstrip("# ") for line in RAY_YAML.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"'MLFLOW_TRACKING_URI=\S+ (atlasvi train .*?)'", header, flags=re.S)
    assert match, "the header shows no `ray exec ... atlasvi train` command"
    args = _train_args(" ".join(match.group(1).replace("\\\n", " ").split()))
    _check_train_args(args)


# ---- KubeRay RayJob ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = list(yaml.safe_load_all(RAYJOB_YAML.read_text()))
    assert len(docs) == 1
    return docs[0]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_is_a_ray_io_v1_rayjob(rayjob: dict):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode"}
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster["rayVersion"])
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        containers = _containers(group)
        assert containers and all(c["name"] and c["image"] for c in containers)
        volumes = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
        mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
        assert mounts <= volumes, f"volumeMounts without a volume: {mounts - volumes}"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_entrypoint_uses_every_gpu_of_the_worker_groups(rayjob: dict):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_gpus = sum(
        int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(cluster["headGroupSpec"])
    )
    assert head_gpus == 0
    assert str(cluster["headGroupSpec"]["rayStartParams"].get("num-gpus", "0")) == "0"
    total = 0
    for group in cluster["workerGroupSpecs"]:
        per_pod = sum(int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in _containers(group))
        assert per_pod > 0, f"worker group {group['groupName']} has no nvidia.com/gpu limit"
        total += group["replicas"] * per_pod
    args = _train_args(rayjob["spec"]["entrypoint"])
    _check_train_args(args)
    assert int(args["--num-workers"]) == total


def test_rayjob_pods_share_storage_and_the_mlflow_server(rayjob: dict):
    cluster = rayjob["spec"]["rayClusterSpec"]
    args = _train_args(rayjob["spec"]["entrypoint"])
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in _containers(group):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in group["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims, "a pod group without the shared volume"
        mounts = [m["mountPath"] for c in _containers(group) for m in c.get("volumeMounts", [])]
        for flag in ("--store", "--output", "--storage-path"):
            value = str(args[flag])
            assert "://" in value or any(value.startswith(m.rstrip("/") + "/") for m in mounts), (flag, value)


def test_rayjob_image_and_launcher_ray_versions_agree(rayjob: dict, ray_config: dict):
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert _ray_image_version(ray_config["docker"]["image"]) == version
    match = re.search(r"^ARG RAY_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert match and _ray_image_version(match.group(1)) == version
    config_path = _train_args(rayjob["spec"]["entrypoint"])["--config"]
    assert "COPY --chown=ray:users configs ./configs" in DOCKERFILE.read_text()
    assert config_path == "/home/ray/atlasvi/configs/scvi.yaml"
    assert (ROOT / "configs" / "scvi.yaml").exists()


# ---- SLURM ---------------------------------------------------------------------------------------------


def _code_lines(script: str) -> list[str]:
    """Lines of shell code: comments and SBATCH directives left out."""
    return [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_sbatch_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", "-s", "bash", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_header_asks_for_gpu_nodes():
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH")
    )
    for key in ("nodes", "gpus-per-node", "cpus-per-task", "time", "ntasks-per-node"):
        assert key in directives, f"no #SBATCH --{key}"
    assert directives["ntasks-per-node"] == "1"


def test_sbatch_script_calls_atlasvi_train_and_nothing_else_of_atlasvi():
    code = "\n".join(_code_lines(SBATCH.read_text())).replace("\\\n", " ")
    calls = re.findall(r"(?:^|[;&|(]\s*|\s)atlasvi\s+([\w-]+)", code, flags=re.M)
    assert calls == ["train"], calls
    assert not re.search(r"(import|from)\s+atlasvi|-m\s+atlasvi|atlasvi\.", code)
    assert "python -c" not in code
    line = next(line for line in code.splitlines() if line.strip().startswith("atlasvi train"))
    args = _train_args(line.strip().replace('"', ""))
    _check_train_args(args)
    assert args["--num-workers"] == "$NUM_WORKERS"
    assert "NUM_WORKERS=$((NNODES * GPUS_PER_NODE))" in code
    assert re.search(r"ray start --head .*--num-gpus=", code)
    assert re.search(r"ray start --address=", code)
    assert "trap cleanup EXIT" in code and "ray stop" in code


STUBS = {
    # scontrol show hostnames NODELIST -> one host a line
    "scontrol": "echo node-a; echo node-b; echo node-c\n",
    # srun [options] command ...: logs, answers `hostname`, runs nothing else
    "srun": (
        'echo "srun $*" >> "$STUB_LOG"\n'
        "while [[ $# -gt 0 && $1 == -* ]]; do case $1 in -w) shift 2 ;; *) shift ;; esac; done\n"
        'if [[ $1 == hostname ]]; then echo "fe80::1 10.1.2.3"; fi\n'
    ),
    "ray": 'echo "ray $*" >> "$STUB_LOG"\n',
    "python": 'cat > /dev/null; echo "$STUB_ALIVE"\n',
    "atlasvi": 'echo "atlasvi $*" >> "$STUB_LOG"\n',
    "sleep": "true\n",
}


@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _dry_run(stub_path: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    log.touch()
    environ = {
        "PATH": f"{stub_path}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node-[a-c]",
        "SLURM_NNODES": "3",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "STORE": "s3://bucket/atlas.zarr",
        "STUB_ALIVE": "3",
        **env,
    }
    result = subprocess.run(["bash", str(SBATCH)], env=environ, capture_output=True, text=True, timeout=20)
    return result, log.read_text().splitlines()


def test_sbatch_dry_run_starts_ray_everywhere_trains_on_every_gpu_and_stops(stub_path: Path, tmp_path: Path):
    result, calls = _dry_run(stub_path, tmp_path)
    assert result.returncode == 0, result.stderr
    heads = [c for c in calls if "ray start --head" in c]
    assert len(heads) == 1 and "-w node-a" in heads[0]
    assert "--node-ip-address=10.1.2.3" in heads[0] and "--num-gpus=4" in heads[0] and "--block" in heads[0]
    joins = [c for c in calls if "ray start --address=10.1.2.3:6379" in c]
    assert sorted(re.search(r"-w (\S+)", c).group(1) for c in joins) == ["node-b", "node-c"]
    train = [c for c in calls if c.startswith("atlasvi ")]
    assert len(train) == 1
    args = _train_args(train[0])
    assert args["--num-workers"] == "12"
    assert args["--store"] == "s3://bucket/atlas.zarr"
    assert args["--storage-path"] == f"{tmp_path}/ray_results"
    assert args["--output"] == f"{tmp_path}/runs/atlasvi-42"
    assert args["--use-gpu"] is True and args["--address"] == "auto"
    stops = [i for i, c in enumerate(calls) if "ray stop" in c]
    assert stops and stops[-1] > calls.index(train[0]), "ray is not stopped after training"
    assert "--overlap" in calls[stops[-1]] and "--nodes=3" in calls[stops[-1]]


def test_sbatch_dry_run_stops_ray_when_the_cluster_never_forms(stub_path: Path, tmp_path: Path):
    result, calls = _dry_run(stub_path, tmp_path, STUB_ALIVE="1", CLUSTER_WAIT_S="10")
    assert result.returncode != 0
    assert "did not reach 3 GPU node(s)" in result.stderr
    assert not any(c.startswith("atlasvi ") for c in calls)
    assert any("ray stop" in c for c in calls)


def test_sbatch_dry_run_refuses_a_relative_storage_path_and_a_missing_store(stub_path: Path, tmp_path: Path):
    result, calls = _dry_run(stub_path, tmp_path, STORAGE_PATH="ray_results")
    assert result.returncode != 0 and "must be absolute" in result.stderr
    result, _ = _dry_run(stub_path, tmp_path, STORE="")
    assert result.returncode != 0 and "set STORE" in result.stderr
    assert not any(c.startswith("atlasvi ") for c in calls)


# ---- README and no machine paths -----------------------------------------------------------------------


def test_readme_documents_each_launcher_storage_mlflow_and_batch_semantics():
    text = README.read_text()
    for name in ("ray-cluster-gpu.yaml", "kuberay-rayjob.yaml", "slurm-ray.sbatch", "Dockerfile"):
        assert name in text
    for topic in ("s3://", "MLFLOW_TRACKING_URI", "--storage-path", "global batch", "learning rate", "--num-workers"):
        assert topic in text, topic


def test_launchers_hold_no_path_of_a_developer_machine():
    """No absolute path of the checkout they were written in, nor of its user's home."""
    local = [str(CLUSTER.resolve().parents[1]), str(Path.home())]
    for path in CLUSTER.iterdir():
        text = path.read_text()
        assert not any(prefix in text for prefix in local if prefix != "/"), path.name
