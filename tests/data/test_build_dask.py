"""atlasvi build on dask: the same store bit for bit on one worker, four threads and a two-process cluster;
errors found on a worker; an interrupted distributed build; many inputs from a folder or a glob."""

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from distributed import LocalCluster
from typer.testing import CliRunner

from atlasvi.cli.main import app
from atlasvi.data import AtlasInputError, BuildConfig
from atlasvi.data.executor import BuildExecutor
from atlasvi.data.store import store_checksum
from tests.conftest import KANG, SHARED_DATA, build_quietly
from tests.data.test_modalities import _multiome

PBMC10K = SHARED_DATA / "pbmc10k_protein_v3_subset200.h5ad"
PBMC5K = SHARED_DATA / "pbmc5k_protein_v3_subset200.h5ad"


@pytest.fixture(scope="module")
def cluster():
    """A two-process dask cluster, as `dask scheduler` + two `dask worker`s would be."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local


def _three_ways(tmp_path: Path, cluster: LocalCluster, chunk_sizes: tuple[int, int, int], **fields) -> list[str]:
    """Checksums of the store built in this process, on 4 threads and on the 2-process cluster."""
    one = build_quietly(tmp_path / "one.zarr", chunk_size=chunk_sizes[0], **fields)
    with BuildExecutor.local(4, processes=False) as threads:
        four = build_quietly(tmp_path / "four.zarr", threads, chunk_size=chunk_sizes[1], **fields)
    with BuildExecutor.connect(cluster.scheduler_address) as remote:
        two = build_quietly(tmp_path / "two.zarr", remote, chunk_size=chunk_sizes[2], **fields)
    return [store_checksum(path) for path in (one, four, two)]


def test_the_store_is_the_same_bit_for_bit_whatever_the_workers_and_chunking(tmp_path, cluster):
    """HVG statistics and the library prior are exact sums, every shard is written whole by one task."""
    checksums = _three_ways(
        tmp_path, cluster, (300, 97, 250), inputs=[str(KANG)], batch_key="sample", labels_key="cell_type",
        n_top_genes=500, annotation_keys=["condition"],
    )  # fmt: skip
    assert len(set(checksums)) == 1
    built = ad.read_zarr(tmp_path / "two.zarr")
    kang = ad.read_h5ad(KANG)
    np.testing.assert_array_equal(built.X.toarray(), kang[built.obs_names, built.var_names].X.toarray())
    assert built.n_obs == kang.n_obs and built.n_vars == 500


def test_proteins_peaks_and_repeated_names_too(tmp_path, cluster):
    """Two protein panels whose files repeat cell names (renamed as obs_names_make_unique), and an .h5mu of
    RNA and peaks (its union of cells)."""
    proteins = _three_ways(
        tmp_path / "p", cluster, (300, 37, 64), inputs=[str(PBMC10K), str(PBMC5K)], protein_key="protein_expression"
    )
    assert len(set(proteins)) == 1
    source, _, _ = _multiome(tmp_path)
    peaks = _three_ways(tmp_path / "a", cluster, (500, 41, 70), inputs=[str(source)], atac_key="atac")
    assert len(set(peaks)) == 1


def test_a_bad_count_found_on_a_worker_names_file_cell_and_gene(tmp_path, cluster):
    kang = ad.read_h5ad(KANG)[:600].copy()
    kang.X = sp.csr_matrix(kang.X, dtype=np.float32)
    row = 517  # in the 6th of 6 chunks: found by whichever worker reads it
    start = kang.X.indptr[row]
    kang.X.data[start + 2] = 2.5
    gene = kang.var_names[kang.X.indices[start + 2]]
    kang.write_h5ad(tmp_path / "bad.h5ad")
    with BuildExecutor.connect(cluster.scheduler_address) as remote:
        with pytest.raises(AtlasInputError) as caught:
            build_quietly(tmp_path / "atlas.zarr", remote, inputs=[str(tmp_path / "bad.h5ad")], chunk_size=100)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "bad.h5ad") in message and "non-integer" in message
    assert repr(kang.obs_names[row]) in message and repr(gene) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


def test_an_interrupted_distributed_build_leaves_nothing(tmp_path, cluster):
    """Stopped while the workers write the store: the tasks in flight are waited for, then both hidden
    folders are removed (and nothing recreates them)."""

    class Interrupted(Exception):
        pass

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "write" and done > 0:
            raise Interrupted

    with BuildExecutor.connect(cluster.scheduler_address) as remote:
        with pytest.raises(Interrupted):
            build_quietly(tmp_path / "atlas.zarr", remote, interrupt, inputs=[str(KANG)], chunk_size=100)
        assert list(tmp_path.iterdir()) == []
        store = build_quietly(tmp_path / "atlas.zarr", remote, inputs=[str(KANG)], chunk_size=100)
    assert ad.read_zarr(store).n_obs == 1556 and sorted(p.name for p in tmp_path.iterdir()) == ["atlas.zarr"]


def test_inputs_from_a_folder_or_a_glob_with_each_files_checksum(tmp_path):
    kang = ad.read_h5ad(KANG)
    studies = tmp_path / "studies"
    studies.mkdir()
    for i, sample in enumerate(sorted(kang.obs["sample"].unique())):
        kang[kang.obs["sample"] == sample].copy().write_h5ad(studies / f"study{i}.h5ad")
    (studies / "notes.txt").write_text("not an input")
    from_folder = build_quietly(tmp_path / "folder.zarr", inputs=[str(studies)])
    from_glob = build_quietly(tmp_path / "glob.zarr", inputs=[str(studies / "study*.h5ad")])
    listed = build_quietly(tmp_path / "listed.zarr", inputs=[str(p) for p in sorted(studies.glob("*.h5ad"))])
    for store in (from_folder, from_glob):
        meta = json.loads((store / "zarr.json").read_text())["attributes"]["atlasvi"]
        inputs = meta["provenance"]["inputs"]
        assert [Path(i["path"]).name for i in inputs] == [f"study{i}.h5ad" for i in range(4)]
        for entry in inputs:
            assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()
        assert meta["categorical"]["batch"] == [f"study{i}.h5ad" for i in range(4)]
        for part in ("X/data", "X/indices", "obs/_index"):
            assert _files(store / part) == _files(listed / part)
    with pytest.raises(AtlasInputError, match="matches no input"):
        build_quietly(tmp_path / "none.zarr", inputs=[str(studies / "*.h5mu")])
    with pytest.raises(AtlasInputError, match="given twice"):
        build_quietly(tmp_path / "twice.zarr", inputs=[str(studies), str(studies / "study0.h5ad")])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_builds_on_a_dask_cluster_and_names_its_dashboard(tmp_path, cluster):
    """--scheduler ADDRESS (the cluster's dashboard link printed); --workers 1 builds the same store here."""
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(KANG, studies / "kang.h5ad")
    common = [str(studies), "--chunk-size", "400", "--n-top-genes", "300"]
    address = cluster.scheduler_address
    result = CliRunner().invoke(app, ["build", *common, "-o", str(tmp_path / "two.zarr"), "--scheduler", address])
    assert result.exit_code == 0, result.output
    assert f"building on the dask cluster at {address}; dashboard: http" in " ".join(result.output.split())
    one = CliRunner().invoke(app, ["build", *common, "-o", str(tmp_path / "one.zarr"), "--workers", "1"])
    assert one.exit_code == 0, one.output
    assert "dashboard" not in one.output
    assert store_checksum(tmp_path / "two.zarr") == store_checksum(tmp_path / "one.zarr")


def test_a_worker_holds_only_the_inputs_it_keeps_open(tmp_path):
    """Each worker thread keeps 2 inputs open; the others it read are closed and let go (not held to the build's
    end, which made a worker's memory grow with the number of inputs, i.e. with the atlas)."""
    from atlasvi.data import build

    config = BuildConfig(inputs=[str(PBMC10K)], output=str(tmp_path / "s.zarr"))
    paths = [PBMC10K, PBMC5K, KANG, PBMC10K]
    ctx = build._Context(config, "held", paths, tmp_path, tmp_path, "batch", ["batch"], ["batch"])
    try:
        sources = [build._source(ctx, i) for i in range(len(paths))]
        assert [s._h5 is None for s in sources] == [True, True, False, False]
        assert build._OPENED["held"] == sources[2:]
        assert build._source(ctx, 3) is sources[3]
        assert sources[3].read_rows(10, 15).shape == (5, len(sources[3].gene_ids))
    finally:
        build._close_inputs("held")
    assert "held" not in build._OPENED and all(s._h5 is None for s in sources)


def test_a_local_cluster_builds_the_same_store_with_dasks_bookkeeping_slowed(tmp_path):
    """`atlasvi build --workers 2`: worker processes with the tick monitor, the profiler and the system / memory
    monitors slowed (see `local_cluster_config`) and no dashboard unless asked for build the same store."""
    import functools

    import dask

    fields = {"inputs": [str(KANG)], "batch_key": "sample", "n_top_genes": 300, "chunk_size": 400}
    one = build_quietly(tmp_path / "one.zarr", **fields)
    with BuildExecutor.local(2) as executor:
        two = build_quietly(tmp_path / "two.zarr", executor, **fields)
        settings = [
            executor.run_on_workers(functools.partial(dask.config.get, key))
            for key in ("distributed.admin.tick.interval", "distributed.worker.profile.enabled")
        ]
        assert executor.dashboard_link is None
    assert store_checksum(two) == store_checksum(one)
    assert [sorted(values.values()) for values in settings] == [["1s", "1s"], [False, False]]
