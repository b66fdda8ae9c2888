"""Stores with a protein modality: the build from .h5ad, .h5mu and 10x .h5, the masks of missing proteins, the
background prior, reads and the loader, schema 1 stores, bad protein input and damaged protein chunks."""

import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasvi.data import (
    AtlasInputError,
    BuildConfig,
    LoaderConfig,
    StoreError,
    StreamingLoader,
    build_store,
    open_store,
)
from atlasvi.data.build import _protein_prior
from atlasvi.data.errors import StoreCorruptError
from atlasvi.errors import ConfigError
from atlasvi.models.saving import saved_schema
from atlasvi.train.job import TrainJobConfig, module_spec
from tests.conftest import KANG as KANG_PATH
from tests.conftest import SHARED_DATA
from tests.data.helpers import write_10x_h5

PBMC10K = SHARED_DATA / "pbmc10k_protein_v3_subset200.h5ad"  # 200 cells, 14 antibodies
PBMC5K = SHARED_DATA / "pbmc5k_protein_v3_subset200.h5ad"  # 200 cells, 29 antibodies (the 14 among them)


def _build(tmp_path: Path, inputs: list, name: str = "store.zarr", **fields) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_store(BuildConfig(inputs=[str(p) for p in inputs], output=str(tmp_path / name), **fields))


@pytest.fixture(scope="module")
def two_panels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pbmc10k (14 antibodies) + pbmc5k (29) as two batches (one per file), 500 HVGs."""
    folder = tmp_path_factory.mktemp("two_panels")
    return _build(folder, [PBMC10K, PBMC5K], protein_key="protein_expression", n_top_genes=500)


def _inputs_by_name() -> tuple[pd.DataFrame, pd.Series]:
    """Every input cell's proteins (NaN where its panel lacks one) and file, by the store's cell names."""
    frames, files = [], []
    for path in (PBMC10K, PBMC5K):
        adata = ad.read_h5ad(path)
        frames.append(adata.obsm["protein_expression"])
        files.append(pd.Series(path.name, index=adata.obs_names))
    proteins, file_of = pd.concat(frames), pd.concat(files)
    # the build makes repeated cell names unique as obs_names_make_unique does
    proteins.index = file_of.index = ad.utils.make_index_unique(pd.Index(proteins.index))
    return proteins, file_of


def test_two_panels_store_every_protein_of_every_cell_and_mask_the_missing(two_panels: Path):
    store = open_store(two_panels)
    modality = store.schema.modalities["protein"]
    assert len(modality.features) == 29 and modality.features[:3] == (
        "CD3_TotalSeqB",
        "CD4_TotalSeqB",
        "CD8a_TotalSeqB",
    )
    assert store.schema.batch_categories == (PBMC10K.name, PBMC5K.name)
    assert [sum(row) for row in modality.batch_mask] == [14, 29]
    block = store.read_rows(0, store.n_cells, ("protein",))
    adata = ad.read_zarr(two_panels)  # scverse opens it: obsm arrays, names in uns
    proteins, file_of = _inputs_by_name()
    expected = proteins.loc[adata.obs_names, list(modality.features)]
    measured = expected.notna().to_numpy()
    np.testing.assert_array_equal(block.masks["protein"], measured)
    np.testing.assert_array_equal(block.obsm["protein"][measured], expected.to_numpy()[measured])
    assert (block.obsm["protein"][~measured] == 0).all()
    assert measured.sum(axis=1).tolist() == [14 if f == PBMC10K.name else 29 for f in file_of[adata.obs_names]]
    assert list(adata.uns["protein_expression_names"]) == list(modality.features)
    np.testing.assert_array_equal(adata.obsm["protein_expression"], block.obsm["protein"])
    np.testing.assert_array_equal(adata.obsm["protein_expression_mask"].astype(bool), measured)


def test_background_prior_is_the_lower_mixture_component():
    """Each cell: 10 proteins at ~e^1 background and 10 at ~e^5 foreground: the prior mean is log1p(background)."""
    rng = np.random.default_rng(0)
    counts = np.concatenate([rng.poisson(np.e, (40, 10)), rng.poisson(np.e**5, (40, 10))], axis=1).astype(float)
    mean, scale = _protein_prior(counts, np.ones_like(counts, dtype=bool), seed=0)
    lower = np.log1p(counts[:, :10])
    assert mean == pytest.approx(lower.mean(), abs=0.01)
    # scvi-tools' batch scale: sqrt(sum of the cells' s.d.s squared) / cells
    assert scale == pytest.approx(np.sqrt(np.sum(lower.var(axis=1))) / 40, abs=0.002)
    # an unmeasured protein never enters the fit; fewer than 5 measured proteins: scvi-tools' (0, 0.05)
    masked = np.ones_like(counts, dtype=bool)
    masked[:, 10:] = False
    assert _protein_prior(counts, np.ones((40, 20), dtype=bool), 0) != _protein_prior(counts, masked, 0)
    assert _protein_prior(counts[:, :4], np.ones((40, 4), dtype=bool), 0) == (0.0, 0.05)


def test_prior_of_a_store_is_the_recipe_on_its_first_100_cells_of_each_batch(two_panels: Path):
    """The build's per-batch prior comes from the batch's first 100 cells in store order (random cells: the store
    is a seeded permutation; scvi-tools draws 100 with replacement), each fitted on its measured proteins."""
    store = open_store(two_panels)
    modality = store.schema.modalities["protein"]
    block = store.read_rows(0, store.n_cells, ("protein",))
    codes = block.categorical["batch"]
    for b in range(2):
        first = np.flatnonzero(codes == b)[:100]
        expected = _protein_prior(block.obsm["protein"][first], block.masks["protein"][first], 0)
        assert (modality.background_log_means[b], modality.background_log_scales[b]) == pytest.approx(expected)
    assert 2.0 < modality.background_log_means[0] < 4.0 and 0.01 < modality.background_log_scales[0] < 0.2


def test_h5mu_and_10x_h5_inputs_give_the_same_proteins(tmp_path: Path):
    adata = ad.read_h5ad(PBMC10K)
    proteins = adata.obsm["protein_expression"]
    rna = ad.AnnData(
        adata.X, obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]].assign(gene_ids=adata.var_names)
    )
    # .h5mu: protein counts for the first 150 cells only, listed in reverse order
    some = proteins.iloc[:150].iloc[::-1]
    prot = ad.AnnData(
        some.to_numpy(np.float32), obs=pd.DataFrame(index=some.index), var=pd.DataFrame(index=some.columns)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.MuData({"rna": rna, "prot": prot}).write(tmp_path / "cite.h5mu")
    write_10x_h5(rna, tmp_path / "cite.h5", "gene_ids", proteins)
    from_h5mu = _build(tmp_path, [tmp_path / "cite.h5mu"], "mu.zarr", protein_key="prot")
    from_10x = _build(tmp_path, [tmp_path / "cite.h5"], "tenx.zarr", protein_key="any")
    for path, has in ((from_h5mu, set(some.index)), (from_10x, set(proteins.index))):
        store = open_store(path)
        names = ad.read_zarr(path).obs_names
        block = store.read_rows(0, store.n_cells, ("protein",))
        measured = np.isin(names, list(has))
        np.testing.assert_array_equal(block.masks["protein"].all(axis=1), measured)
        assert not block.masks["protein"][~measured].any()
        np.testing.assert_array_equal(block.obsm["protein"][measured], proteins.loc[names[measured]].to_numpy())
        assert store.schema.n_genes == adata.n_vars  # antibodies are not genes
    assert sum(open_store(from_h5mu).schema.modalities["protein"].batch_mask[0]) == 14


def test_reads_and_loader_carry_the_modality_row_by_row(two_panels: Path):
    store = open_store(two_panels)
    everything = store.read_rows(0, store.n_cells, ("protein",))
    rows = np.array([3, 17, 250, 399])
    picked = store.read_selected(rows, ("protein",))
    np.testing.assert_array_equal(picked.obsm["protein"], everything.obsm["protein"][rows])
    np.testing.assert_array_equal(picked.masks["protein"], everything.masks["protein"][rows])
    assert store.read_rows(0, 10).obsm == {}  # RNA only unless asked
    config = LoaderConfig(batch_size=32, block_size=64, seed=3)
    seen = []
    for rank in range(2):
        loader = StreamingLoader(store, config, rank, 2, modalities=("protein",))
        for batch in loader:
            r = batch.rows.numpy()
            np.testing.assert_array_equal(batch.obsm["protein"].numpy(), everything.obsm["protein"][r])
            np.testing.assert_array_equal(batch.masks["protein"].numpy(), everything.masks["protein"][r])
            seen.append(r)
    assert sorted(np.concatenate(seen).tolist()) == list(range(store.n_cells))
    # resuming mid-epoch yields the same modality batches
    loader = StreamingLoader(store, config, modalities=("protein",))
    batches = list(loader)
    resumed = StreamingLoader(store, config, modalities=("protein",))
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 3})
    for a, b in zip(batches[3:], resumed, strict=True):
        assert (a.obsm["protein"] == b.obsm["protein"]).all()
    with pytest.raises(StoreError, match="no 'atac' modality"):
        StreamingLoader(store, config, modalities=("atac",))


def test_saved_registry_keeps_the_modality(two_panels: Path):
    schema = open_store(two_panels).schema
    registry = json.loads(json.dumps({k: v for k, v in asdict(schema).items() if k != "n_cells"}))
    assert saved_schema({"registry": registry}, schema.n_cells) == schema
    del registry["modalities"]  # a model saved before modalities
    assert saved_schema({"registry": registry}).modalities == {}


def test_schema_1_store_opens_as_rna_only(tmp_path: Path, two_panels: Path):
    old = tmp_path / "old.zarr"
    shutil.copytree(two_panels, old)
    meta = json.loads((old / "zarr.json").read_text())
    atlas = meta["attributes"]["atlasvi"]
    atlas["schema_version"] = 1
    del atlas["modalities"]
    (old / "zarr.json").write_text(json.dumps(meta))
    store = open_store(old)
    assert store.schema.modalities == {} and store.read_rows(0, 5).obsm == {}
    with pytest.raises(StoreError, match="no 'protein' modality.*RNA only"):
        store.read_rows(0, 5, ("protein",))


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("zarr", r"obsm/protein_expression holds its fill value at row 0 \(chunk 0"),  # read as the fill value
        ("tensorstore", r"cannot read obsm/protein_expression\[0:10\] \(chunk 0 .* is missing"),  # refused by the read
    ],
)
def test_a_missing_protein_chunk_is_never_read_as_zeros(tmp_path: Path, two_panels: Path, backend: str, message: str):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(two_panels, damaged)
    for shard in (damaged / "obsm" / "protein_expression" / "c").rglob("*"):
        if shard.is_file():
            shard.unlink()
    store = open_store(damaged, backend=backend)
    store.read_rows(0, 10)  # RNA alone reads
    with pytest.raises(StoreCorruptError, match=message):
        store.read_rows(0, 10, ("protein",))


def _h5ad_with(tmp_path: Path, name: str, change) -> Path:
    adata = ad.read_h5ad(PBMC10K)
    changed = change(adata.obsm["protein_expression"].astype(float))
    if changed.columns.has_duplicates:  # anndata writes no such DataFrame: an array named in uns
        adata.uns["protein_expression_names"] = np.array(changed.columns)
        changed = changed.to_numpy()
    adata.obsm["protein_expression"] = changed
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _set(frame: pd.DataFrame, value: float) -> pd.DataFrame:
    frame.iloc[7, 2] = value
    return frame


BAD_PROTEINS = {
    "non-integer": (
        lambda f: _set(f, 2.5),
        r"non-integer protein counts.*first 2.5 at cell '\S+', protein 'CD8a_TotalSeqB'",
    ),
    "negative": (lambda f: _set(f, -1), r"negative protein counts.*protein 'CD8a_TotalSeqB'"),
    "nan": (lambda f: _set(f, np.nan), r"NaN or infinite protein counts.*protein 'CD8a_TotalSeqB'"),
    "duplicated names": (
        lambda f: f.set_axis(["CD3_TotalSeqB", *f.columns[1:-1], "CD3_TotalSeqB"], axis=1),
        r"duplicated protein \(antibody\) names \['CD3_TotalSeqB'\]",
    ),
}


@pytest.mark.parametrize("case", BAD_PROTEINS)
def test_bad_protein_input_is_one_line_naming_file_cell_and_protein(tmp_path: Path, case: str):
    change, message = BAD_PROTEINS[case]
    source = _h5ad_with(tmp_path, "bad.h5ad", change)
    with pytest.raises(AtlasInputError, match=message) as raised:
        _build(tmp_path, [source], protein_key="protein_expression")
    assert str(source) in str(raised.value)
    assert not (tmp_path / "store.zarr").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.h5ad"]


def test_missing_or_unnamed_proteins_and_unmatched_cells_are_refused(tmp_path: Path):
    with pytest.raises(AtlasInputError, match=r"obsm has no 'prot' \(the protein counts\); obsm keys are"):
        _build(tmp_path, [PBMC10K], protein_key="prot")
    adata = ad.read_h5ad(PBMC10K)
    adata.obsm["counts"] = adata.obsm["protein_expression"].to_numpy()
    adata.write_h5ad(tmp_path / "array.h5ad")
    with pytest.raises(AtlasInputError, match=r"obsm\['counts'\] is an array without protein names"):
        _build(tmp_path, [tmp_path / "array.h5ad"], protein_key="counts")
    adata.uns["counts_names"] = np.array(adata.obsm["protein_expression"].columns)
    adata.write_h5ad(tmp_path / "named.h5ad")
    store = open_store(_build(tmp_path, [tmp_path / "named.h5ad"], protein_key="counts"))
    assert store.schema.modalities["protein"].features[0] == "CD3_TotalSeqB"
    rna = ad.AnnData(adata.X[:100], obs=pd.DataFrame(index=adata.obs_names[:100]), var=adata.var[[]])
    prot = ad.AnnData(adata.obsm["counts"][90:110].astype(np.float32), obs=pd.DataFrame(index=adata.obs_names[90:110]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.MuData({"rna": rna, "prot": prot}).write(tmp_path / "x.h5mu")
    with pytest.raises(
        AtlasInputError, match=r"cell '\S+' of modality 'prot' is not a cell of 'rna' \(10 such cells\)"
    ):
        _build(tmp_path, [tmp_path / "x.h5mu"], "mu.zarr", protein_key="prot")


def test_cli_builds_proteins_and_reports_bad_ones_in_one_line(tmp_path: Path):
    good = subprocess.run(
        [sys.executable, "-m", "atlasvi.cli.main", "build", str(PBMC10K), str(PBMC5K), "-o", str(tmp_path / "s.zarr"),
         "--protein-key", "protein_expression", "--n-top-genes", "300"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "29: CD3_TotalSeqB" in good.stdout and "measured per batch: 14, 29" in good.stdout
    source = _h5ad_with(tmp_path, "bad.h5ad", lambda f: _set(f, -3))
    bad = subprocess.run(
        [sys.executable, "-m", "atlasvi.cli.main", "build", str(source), "-o", str(tmp_path / "t.zarr"),
         "--protein-key", "protein_expression"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "negative protein counts" in bad.stderr + bad.stdout and not (tmp_path / "t.zarr").exists()


GRANJA = SHARED_DATA / "granja2019_bmmc_scatac_5kpeaks.h5ad"  # 600 cells x 5000 peaks


def _multiome(tmp_path: Path, n_rna: int = 300, first_atac: int = 60) -> tuple[Path, ad.AnnData, ad.AnnData]:
    """An .h5mu of Kang RNA (n_rna cells) and Granja peak counts for the cells from `first_atac` on (a stand-in
    multiome: the pairing is made up, the formats are real)."""
    kang, peaks = ad.read_h5ad(KANG_PATH), ad.read_h5ad(GRANJA)
    names = [f"cell{i}" for i in range(n_rna)]
    rna = ad.AnnData(kang.X[:n_rna], obs=pd.DataFrame({"sample": kang.obs["sample"].to_numpy()[:n_rna]}, index=names))
    rna.var_names = kang.var_names
    atac = ad.AnnData(
        sp.csr_matrix(peaks.X[: n_rna - first_atac]),
        obs=pd.DataFrame(index=names[first_atac:][::-1]),
        var=peaks.var[[]],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.MuData({"rna": rna, "atac": atac}).write(tmp_path / "multiome.h5mu")
    return tmp_path / "multiome.h5mu", rna, atac


def test_peaks_are_a_sparse_modality_scverse_opens(tmp_path: Path):
    source, rna, atac = _multiome(tmp_path)
    path = _build(tmp_path, [source], atac_key="atac", batch_key="sample")
    store = open_store(path)
    modality = store.schema.modalities["atac"]
    assert (modality.kind, len(modality.features), modality.nnz) == ("csr", 5000, atac.X.nnz)
    adata = ad.read_zarr(path)  # peaks as a sparse obsm matrix, names in uns
    assert sp.issparse(adata.obsm["atac"]) and list(adata.uns["atac_names"]) == list(atac.var_names)
    block = store.read_rows(0, store.n_cells, ("atac",))
    measured = np.isin(adata.obs_names, atac.obs_names)
    np.testing.assert_array_equal(block.masks["atac"][:, 0], measured)
    np.testing.assert_array_equal(block.obsm["atac"][measured].toarray(), atac[adata.obs_names[measured]].X.toarray())
    assert block.obsm["atac"][~measured].nnz == 0 and (adata.obsm["atac"] != block.obsm["atac"]).nnz == 0
    rows = np.array([0, 7, 150, 299])
    picked = store.read_selected(rows, ("atac",))
    np.testing.assert_array_equal(picked.obsm["atac"].toarray(), block.obsm["atac"][rows].toarray())
    seen = []
    for rank in range(2):
        for batch in StreamingLoader(store, LoaderConfig(batch_size=32, block_size=64), rank, 2, modalities=("atac",)):
            r = batch.rows.numpy()
            assert batch.obsm["atac"].layout == torch.sparse_csr and batch.masks["atac"].shape == (len(r), 1)
            np.testing.assert_array_equal(batch.obsm["atac"].to_dense().numpy(), block.obsm["atac"][r].toarray())
            seen.append(r)
    assert sorted(np.concatenate(seen).tolist()) == list(range(store.n_cells))
    assert store.read_rows(0, 10).obsm == {}  # RNA only unless asked


def test_10x_h5_peaks_and_bad_peak_input(tmp_path: Path):
    _, rna, atac = _multiome(tmp_path, n_rna=100, first_atac=0)
    peaks = pd.DataFrame(atac[rna.obs_names].X.toarray(), index=rna.obs_names, columns=atac.var_names)
    write_10x_h5(rna.copy(), tmp_path / "multiome.h5", "gene_ids" if "gene_ids" in rna.var else None, peaks, "Peaks")
    store = open_store(_build(tmp_path, [tmp_path / "multiome.h5"], "tenx.zarr", atac_key="any"))
    block = store.read_rows(0, store.n_cells, ("atac",))
    assert block.masks["atac"].all() and block.obsm["atac"].nnz == atac.X.nnz
    assert store.schema.n_genes == rna.n_vars  # peaks are not genes
    other = atac[:, ::-1].copy()
    other.var_names = [f"chr1:{i}-{i + 500}" for i in range(other.n_vars)]  # another peak set
    bad = ad.AnnData(rna.X, obs=rna.obs, var=rna.var)
    bad.obsm["atac"], bad.uns["atac_names"] = sp.csr_matrix(other[rna.obs_names].X), np.array(other.var_names)
    bad.obs_names = [f"other{i}" for i in range(bad.n_obs)]
    bad.write_h5ad(tmp_path / "other_peaks.h5ad")
    with pytest.raises(AtlasInputError, match=r"other_peaks.h5ad: its peaks differ from .*multiome.h5's"):
        _build(tmp_path, [tmp_path / "multiome.h5", tmp_path / "other_peaks.h5ad"], "mixed.zarr", atac_key="atac")
    half = atac[rna.obs_names].X.astype(np.float32).tocsr()
    half.data[3] = 0.5
    bad.obsm["atac"], bad.uns["atac_names"] = half, np.array(atac.var_names)
    bad.write_h5ad(tmp_path / "half.h5ad")
    with pytest.raises(AtlasInputError, match=r"half.h5ad: non-integer peak counts.*cell 'other\d+', peak 'chr"):
        _build(tmp_path, [tmp_path / "half.h5ad"], "half.zarr", atac_key="atac")


def test_a_missing_peak_chunk_is_refused(tmp_path: Path):
    source, _, _ = _multiome(tmp_path)
    path = _build(tmp_path, [source], atac_key="atac", batch_key="sample")
    for shard in (path / "obsm" / "atac" / "data" / "c").rglob("*"):
        if shard.is_file():
            shard.unlink()
    for backend, message in [
        ("zarr", r"obsm/atac/data holds 0 at element 0, stored counts are > 0"),  # read as the fill value
        ("tensorstore", r"cannot read obsm/atac/data\[0:\d+\] \(chunk 0 .* is missing"),  # refused by the read
    ]:
        store = open_store(path, backend=backend)
        store.read_rows(0, 10)
        with pytest.raises(StoreCorruptError, match=message):
            store.read_rows(0, 10, ("atac",))


def test_union_of_rna_and_atac_cells_with_an_rna_mask(tmp_path: Path):
    """An .h5mu whose ATAC modality has cells its RNA modality lacks: the store holds the union, their X rows empty
    and their RNA marked not measured (never read as zero counts); the library prior counts the RNA cells only."""
    kang, peaks = ad.read_h5ad(KANG_PATH), ad.read_h5ad(GRANJA)
    names = [f"cell{i}" for i in range(120)]
    rna = ad.AnnData(kang.X[:100], obs=pd.DataFrame({"sample": kang.obs["sample"].to_numpy()[:100]}, index=names[:100]))
    rna.var_names = kang.var_names
    atac_names = names[60:]  # 40 paired, 20 ATAC only
    atac = ad.AnnData(
        sp.csr_matrix(peaks.X[:60]),
        obs=pd.DataFrame({"sample": kang.obs["sample"].to_numpy()[60:120]}, index=atac_names),
        var=peaks.var[[]],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.MuData({"rna": rna, "atac": atac}).write(tmp_path / "union.h5mu")
    path = _build(tmp_path, [tmp_path / "union.h5mu"], atac_key="atac", batch_key="sample")
    store = open_store(path)
    assert store.n_cells == 120 and store.schema.modalities["rna"].n_measured == 100
    assert store.schema.modalities["rna"].kind == "mask"
    adata = ad.read_zarr(path)
    block = store.read_rows(0, 120, ("atac", "rna"))
    has_rna = np.isin(adata.obs_names, rna.obs_names)
    np.testing.assert_array_equal(block.masks["rna"][:, 0], has_rna)
    np.testing.assert_array_equal(block.masks["atac"][:, 0], np.isin(adata.obs_names, atac_names))
    assert "rna" not in block.obsm and adata.X[~has_rna].nnz == 0
    only = adata.obs_names[~has_rna]
    np.testing.assert_array_equal(block.obsm["atac"][~has_rna].toarray(), atac[only].X.toarray())
    np.testing.assert_array_equal(adata.obs["sample"][~has_rna].astype(str), atac.obs.loc[only, "sample"].astype(str))
    np.testing.assert_array_equal(adata[rna.obs_names].X.toarray(), rna.X.toarray())
    totals = np.log(np.asarray(rna.X.sum(axis=1)).ravel())
    for b, category in enumerate(store.schema.batch_categories):
        chosen = rna.obs["sample"].astype(str).to_numpy() == category
        assert store.schema.library_log_means[b] == pytest.approx(totals[chosen].mean(), rel=1e-9)
    with pytest.raises(ConfigError, match=r"20 of its 120 cells have no RNA \(ATAC only\); scvi reads every cell's"):
        module_spec(TrainJobConfig(store=str(path)), store)
    # an .h5ad (scvi-tools' concatenated layout): no RNA counts = RNA not measured, no peaks = ATAC not measured
    flat = ad.AnnData(rna.X[:30].copy(), obs=rna.obs[:30], var=rna.var)
    flat.X = sp.csr_matrix(flat.X)
    flat.X[:10] = 0
    flat.X.eliminate_zeros()
    open_peaks = sp.csr_matrix(peaks.X[:30])
    open_peaks[20:] = 0
    open_peaks.eliminate_zeros()
    flat.obsm["atac"], flat.uns["atac_names"] = open_peaks, np.array(peaks.var_names)
    flat.write_h5ad(tmp_path / "flat.h5ad")
    store = open_store(_build(tmp_path, [tmp_path / "flat.h5ad"], "flat.zarr", atac_key="atac", batch_key="sample"))
    stored = ad.read_zarr(tmp_path / "flat.zarr").obs_names
    block = store.read_rows(0, 30, ("atac", "rna"))
    position = pd.Index(flat.obs_names).get_indexer(stored)
    np.testing.assert_array_equal(block.masks["rna"][:, 0], position >= 10)
    np.testing.assert_array_equal(block.masks["atac"][:, 0], position < 20)
