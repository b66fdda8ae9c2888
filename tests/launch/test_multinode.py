"""A real two-node Ray cluster on this machine: one worker per node, each reading its own shard.

Slow (starts two Ray nodes with `ray start`): `make test-slow` runs it.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from atlasvi.data import LoaderConfig
from atlasvi.launch import DistributedConfig, connect, train_distributed
from atlasvi.train import TrainConfig
from atlasvi.train.job import TrainJobConfig

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A head and a second node on 127.0.0.1, each offering one `atlasvi_node` resource.

    Token authentication off: the second node and this driver would need the head's token otherwise.
    """
    import ray

    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    common = ["--num-cpus", "1", "--resources", '{"atlasvi_node": 1}', "--node-ip-address", "127.0.0.1"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), *common], check=True, capture_output=True)
    try:
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True)


def test_one_worker_per_node_each_reads_its_own_shard(embedded_store, tmp_path, two_nodes):
    import ray

    connect(two_nodes)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    job = TrainJobConfig(
        store=str(embedded_store),
        train=TrainConfig(max_epochs=2, n_epochs_kl_warmup=1),
        loader=LoaderConfig(batch_size=128),  # global: 64 cells per worker
    )
    run = DistributedConfig(
        num_workers=2, storage_path=str(tmp_path / "ray"), name="two-nodes",
        resources_per_worker={"CPU": 1, "atlasvi_node": 1},
    )  # fmt: skip
    _, metrics = train_distributed(job, str(embedded_store), run)
    assert len(set(metrics["rank_nodes"])) == 2  # the two ranks ran on different nodes
    assert metrics["rows_read_by_several_ranks"] == 0 and metrics["rank_rows_read"] == [703, 703]
