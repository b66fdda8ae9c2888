"""Shared fixtures: the real datasets in ../shared/data and small stores built from them."""

import os
import warnings
from pathlib import Path

# One thread in every BLAS / OpenMP pool, here and in the commands the tests start. Their idle threads spin-wait:
# with another busy process on the cores (`make test` runs two), a DE test's CPU time went from 34 s to 133 s and its
# wall time from 30 s to 220 s with numpy's default pool of one thread per core. numpy is already loaded when this
# file is read, hence threadpoolctl below as well as the variables (read by pools started later: torch's OpenMP).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import anndata as ad  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from atlasvi.data import BuildConfig, build_store  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CELLBENCH = SHARED_DATA / "cellbench_sc_mixology_3tech.h5ad"
KANG = SHARED_DATA / "kang2018_pbmc_ifnb_muscat.h5ad"
KANG_HARMONY = SHARED_DATA / "kang2018_pbmc_ifnb_harmony.h5ad"
RNAMIX = SHARED_DATA / "cellbench_rnamix_2tech.h5ad"
GRANJA = SHARED_DATA / "granja2019_bmmc_scatac_5kpeaks.h5ad"
BARON = SHARED_DATA / "baron2016_pancreas_human_mouse_subset350_cider.h5ad"
CBMC = SHARED_DATA / "cbmc_citeseq_stoeckius2017_top2000genes.h5ad"
PBMC10K_PROTEIN = SHARED_DATA / "pbmc10k_protein_v3_subset200.h5ad"
PBMC5K_PROTEIN = SHARED_DATA / "pbmc5k_protein_v3_subset200.h5ad"
SCICAR = SHARED_DATA / "scicar_a549_multivi_concat_scai.h5ad"


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: torch's OpenMP threads spin-wait, and with the loader's read-ahead threads (or any
    # other process) on the same 2 cores a training step was measured 40x slower with 2 threads than with 1.
    torch.set_num_threads(1)
    threadpool_limits(1)
    if not CELLBENCH.exists():
        raise pytest.UsageError(f"the real datasets are expected in {SHARED_DATA} (../shared/data beside the repo)")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread: a command run in-process (`atlasvi train` sets its own thread count)
    must not leave the next test's float reductions in another order (a resumed run compared bit for bit with an
    uninterrupted one failed so, depending on the tests before it). Reset after the test too, so that the wider
    fixtures set up before the next test's (a module's trained model) see one thread as well."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def build_quietly(output: Path, executor=None, progress=None, **fields) -> Path:
    """build_store(BuildConfig(output=output, **fields)) on `executor` (None: this process), its warnings not
    shown; with progress(stage, done, total) if given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(output=str(output), **fields)
        if progress is None:
            return build_store(config, executor=executor)
        return build_store(config, progress, executor=executor)


@pytest.fixture(scope="session")
def cellbench() -> ad.AnnData:
    """CellBench sc_mixology: 1408 cells x 11533 genes, batch `batch` (5), labels `cell_line` (5)."""
    return ad.read_h5ad(CELLBENCH)


@pytest.fixture(scope="session")
def kang() -> ad.AnnData:
    """Kang 2018 PBMC (muscat subset): 1556 cells x 1267 genes, batch `sample` (4), labels `cell_type` (5)."""
    return ad.read_h5ad(KANG)


@pytest.fixture(scope="session")
def kang_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Kang file as an atlas store (all genes), with batch, labels and a continuous covariate."""
    path = tmp_path_factory.mktemp("stores") / "kang.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(BuildConfig(inputs=[str(KANG)], output=str(path), batch_key="sample", labels_key="cell_type"))
    return path


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded CellBench file as a store: batch `batch`, labels `cell_line`, 300 Seurat v3 HVGs."""
    from atlasvi.datasets import CELLBENCH as EMBEDDED

    path = tmp_path_factory.mktemp("stores") / "embedded.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(EMBEDDED)], output=str(path), batch_key="batch", labels_key="cell_line", n_top_genes=300
        )
        build_store(config)
    return path


@pytest.fixture(scope="session")
def granja_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Granja 2019 BMMC scATAC: 600 cells x 5000 peaks (counts, `chr:start-end`), batch `Group` (2 donors),
    labels `BioClassification` (6 x 100 cells), every peak kept (no HVG selection)."""
    path = tmp_path_factory.mktemp("stores") / "granja.zarr"
    build_store(BuildConfig(inputs=[str(GRANJA)], output=str(path), batch_key="Group", labels_key="BioClassification"))
    return path


@pytest.fixture(scope="session")
def baron_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Baron 2016 pancreas, human + mouse (CIDER subset, 328 cells): batch `species` (2), labels `cell_type` (5),
    1000 Seurat v3 HVGs."""
    path = tmp_path_factory.mktemp("stores") / "baron.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(BARON)], output=str(path), batch_key="species", labels_key="cell_type", n_top_genes=1000
        )
        build_store(config)
    return path


@pytest.fixture(scope="session")
def two_panel_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10x pbmc10k (14 antibodies) + pbmc5k (29) CITE-seq, 200 cells each: batch = the file (2), proteins the
    union of the panels (29; pbmc10k's 15 others masked as not measured), 500 Seurat v3 HVGs."""
    path = tmp_path_factory.mktemp("stores") / "two_panel.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(PBMC10K_PROTEIN), str(PBMC5K_PROTEIN)],
            output=str(path),
            protein_key="protein_expression",
            n_top_genes=500,
        )
        build_store(config)
    return path


@pytest.fixture(scope="session")
def cbmc_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CBMC CITE-seq (Stoeckius 2017), its first 600 cells: 2000 genes, 13 antibodies (all measured), labels
    `scdcc_label`, one batch."""
    folder = tmp_path_factory.mktemp("stores")
    subset = folder / "cbmc600.h5ad"
    ad.read_h5ad(CBMC)[:600].copy().write_h5ad(subset)
    path = folder / "cbmc.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(
            BuildConfig(
                inputs=[str(subset)], output=str(path), protein_key="protein_expression", labels_key="scdcc_label"
            )
        )
    return path


@pytest.fixture(scope="session")
def multiome_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sci-CAR A549 (paired RNA + ATAC): 450 cells, 1185 genes, the 2000 most often open peaks, in scvi-tools'
    concatenated layout (`obsm["atac"]` beside X, zero rows where a modality is missing): the ATAC of the first third
    of the cells and the RNA of the second third removed (paired / RNA-only / ATAC-only cells); batch `modality`
    (paired, expression, accessibility: scvi-tools' organize_multiome_anndatas names), labels `treatment_time_h`.
    The hidden counts are in hidden.npz beside the store (atac: the first 150 cells', rna: the next 150 cells',
    cells: the 450 names in that order)."""
    import numpy as np
    import scipy.sparse as sp

    folder = tmp_path_factory.mktemp("stores")
    full = ad.read_h5ad(SCICAR)
    cells = np.sort(np.random.default_rng(0).choice(full.n_obs, 450, replace=False))
    genes = (full.var["modality"] == "Gene Expression").to_numpy()
    peaks = sp.csr_matrix(full.X[cells][:, ~genes])
    top = np.sort(np.argsort(-np.asarray((peaks > 0).sum(axis=0)).ravel(), kind="stable")[:2000])
    x, atac = sp.csr_matrix(full.X[cells][:, genes]), peaks[:, top].tolil()
    x = x.tolil()
    np.savez(folder / "hidden.npz", atac=atac[:150].toarray(), rna=x[150:300].toarray(), cells=full.obs_names[cells])
    atac[:150], x[150:300] = 0, 0
    obs = full.obs.iloc[cells][["treatment_time_h"]].copy()
    obs["modality"] = np.repeat(["expression", "accessibility", "paired"], 150)
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs, var=full.var[genes][[]])
    adata.obsm["atac"], adata.uns["atac_names"] = sp.csr_matrix(atac), np.asarray(full.var_names[~genes][top])
    adata.write_h5ad(folder / "scicar450.h5ad")
    path = folder / "multiome.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_store(
            BuildConfig(
                inputs=[str(folder / "scicar450.h5ad")],
                output=str(path),
                atac_key="atac",
                batch_key="modality",
                labels_key="treatment_time_h",
            )
        )
    return path
