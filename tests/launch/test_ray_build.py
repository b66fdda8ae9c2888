"""atlasvi build on Ray actors (`--ray`): the same store as in one process; an error found in an actor is the same
one line; an interrupted build leaves nothing.

Slow (starts Ray on this machine, ~1 min on 2 cores): `make test-slow` runs it."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from atlasvi.cli.main import app
from atlasvi.data import AtlasInputError
from atlasvi.data.store import store_checksum
from atlasvi.launch import RayBuildExecutor
from tests.conftest import KANG, build_quietly

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def test_on_ray_the_store_is_the_same_errors_name_the_cell_and_an_interrupt_leaves_nothing(tmp_path, ray_local):
    fields = {"inputs": [str(KANG)], "batch_key": "sample", "labels_key": "cell_type", "n_top_genes": 500}
    one = build_quietly(tmp_path / "one.zarr", chunk_size=300, **fields)
    with RayBuildExecutor(2) as executor:
        two = build_quietly(tmp_path / "two.zarr", executor, chunk_size=97, **fields)
        assert executor.workers == 2
    assert store_checksum(two) == store_checksum(one)

    kang = ad.read_h5ad(KANG)[:600].copy()
    kang.X = sp.csr_matrix(kang.X, dtype=np.float32)
    row = 517
    start = kang.X.indptr[row]
    kang.X.data[start + 2] = 2.5
    gene = kang.var_names[kang.X.indices[start + 2]]
    bad = tmp_path / "bad" / "bad.h5ad"
    bad.parent.mkdir()
    kang.write_h5ad(bad)
    with RayBuildExecutor(2) as executor, pytest.raises(AtlasInputError) as caught:
        build_quietly(bad.parent / "atlas.zarr", executor, inputs=[str(bad)], chunk_size=100)
    message = str(caught.value)
    assert "\n" not in message and str(bad) in message and "non-integer" in message
    assert repr(kang.obs_names[row]) in message and repr(gene) in message
    assert sorted(p.name for p in bad.parent.iterdir()) == ["bad.h5ad"]

    class Interrupted(Exception):
        pass

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "write" and done > 0:
            raise Interrupted

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    with RayBuildExecutor(2) as executor, pytest.raises(Interrupted):
        build_quietly(stopped / "atlas.zarr", executor, interrupt, inputs=[str(KANG)], chunk_size=100)
    assert list(stopped.iterdir()) == []


def test_cli_builds_on_ray(tmp_path, ray_local):
    """--ray local in a process already connected to Ray uses that Ray; --workers is the number of actors."""
    common = [str(KANG), "--chunk-size", "400", "--n-top-genes", "300"]
    result = CliRunner().invoke(app, ["build", *common, "-o", str(tmp_path / "ray.zarr"), "--ray", "local"])
    assert result.exit_code == 0, result.output
    assert "building on the Ray cluster at local (2 actors)" in " ".join(result.output.split())
    one = CliRunner().invoke(app, ["build", *common, "-o", str(tmp_path / "one.zarr"), "--workers", "1"])
    assert one.exit_code == 0, one.output
    assert store_checksum(tmp_path / "ray.zarr") == store_checksum(tmp_path / "one.zarr")
    both = CliRunner().invoke(
        app, ["build", *common, "-o", str(tmp_path / "x.zarr"), "--ray", "auto", "--scheduler", "tcp://x:1"]
    )
    assert both.exit_code != 0 and "not both" in both.output
