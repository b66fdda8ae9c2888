"""scvi-tools interoperability: models saved by scvi-tools 1.4.2 itself (tests/fixtures/scvi_tools, made by
tests/fixtures/make_scvi_tools_models.py) imported with their latent, and atlasvi models exported in its format.

The import checks and the export's structure need no scvi-tools: the fixture holds scvi-tools' own latent, and an
export of the imported fixture must give back scvi-tools' file (same parameter names, shapes, values, registry).
`test_scvi_tools_loads_the_export` runs scvi-tools itself (a subprocess of this interpreter: the `test` extra
installs it) on the exported folders.
"""

import importlib.util
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from atlasvi.analysis.protocols import expression_scale
from atlasvi.api import (
    MULTIVI,
    PEAKVI,
    SCANVI,
    SCVI,
    TOTALVI,
    LinearSCVI,
    SysVI,
    export_scvi_tools,
    import_scvi_tools,
)
from atlasvi.api.condscvi import CondSCVI
from atlasvi.api.destvi import DestVI
from atlasvi.data import BuildConfig, build_store
from atlasvi.models.condscvi import CondSCVIConfig
from atlasvi.models.ldvae import LDVAEConfig
from atlasvi.models.multivi import MULTIVIConfig
from atlasvi.models.peakvi import PEAKVIConfig
from atlasvi.models.registry import get_entry
from atlasvi.models.saving import IncompatibleStoreError
from atlasvi.models.scvi import SCVIConfig
from atlasvi.models.scvi_tools import COUNTERPARTS, DESTVI_LABELS, ScviToolsFileError, read_scvi_tools
from atlasvi.models.sysvi import SysVIConfig
from atlasvi.models.totalvi import TOTALVIConfig
from atlasvi.train import TrainConfig
from tests.conftest import BARON, CBMC, GRANJA, KANG
from tests.fixtures.make_scvi_tools_models import scicar

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scvi_tools"
UNLABELED = ["stim101", "stim107"]
TOLERANCE = 1e-5
CLASSES = {
    "scvi": SCVI, "scanvi": SCANVI, "ldvae": LinearSCVI, "totalvi": TOTALVI, "peakvi": PEAKVI, "condscvi": CondSCVI,
    "sysvi": SysVI, "multivi": MULTIVI, "destvi": DestVI,
}  # fmt: skip


def _build(path: Path, genes: list[str] | None, source: Path = KANG, **fields) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BuildConfig(
            inputs=[str(source)], output=str(path), batch_key="sample", labels_key="cell_type",
            unlabeled_batches=UNLABELED, genes=genes, **fields,
        )  # fmt: skip
        return build_store(config)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "expected.npz"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Kang with the fixture's 150 genes in the model's order (not the file's), stim samples unlabeled."""
    genes = [str(g) for g in read_scvi_tools(FIXTURE / "scvi")["var_names"]]
    return _build(tmp_path_factory.mktemp("interop") / "kang.zarr", genes)


def _in_store_order(values: np.ndarray, names: np.ndarray, store: Path) -> np.ndarray:
    order = {n: i for i, n in enumerate(names)}
    return values[[order[n] for n in ad.read_zarr(store).obs_names]]


def _normalized_at_mean(model, rows: tuple[int, int] | None = None) -> np.ndarray:
    """px_scale at the posterior mean of z (scvi-tools' get_normalized_expression with its draw at the mean)."""
    module, parts = model.module.eval(), []
    with torch.no_grad():
        for batch in model._batches(None, rows, 1024):
            inputs = module.unpack(batch)
            inference = module.inference(inputs)
            parts.append(expression_scale(module, inputs, inference["qz"].loc, inference["library"], None).numpy())
    return np.concatenate(parts)


@pytest.mark.parametrize("name", ["scvi", "scanvi"])
def test_a_scvi_tools_model_imports_with_scvi_tools_latent(store, expected, name):
    """The fixture saved by scvi-tools, read weights-only, gives scvi-tools' latent on the same cells (and SCANVI its
    predictions, SCVI its normalized expression)."""
    model = import_scvi_tools(FIXTURE / name, store, device="cpu")
    assert type(model) is {"scvi": SCVI, "scanvi": SCANVI}[name]
    theirs = _in_store_order(expected[f"{name}_latent"], expected["obs_names"], store)
    assert np.abs(model.get_latent_representation() - theirs).max() <= TOLERANCE
    if name == "scanvi":
        predictions = _in_store_order(expected["scanvi_prediction"], expected["obs_names"], store)
        np.testing.assert_array_equal(model.predict(), predictions)
    else:
        rows = {n: i for i, n in enumerate(ad.read_zarr(store).obs_names)}
        first = [rows[n] for n in expected["obs_names"][:50]]
        ours = _normalized_at_mean(model)[first]
        assert np.abs(ours - expected["scvi_normalized"]).max() <= TOLERANCE


@pytest.fixture(scope="module")
def more_stores(tmp_path_factory, store) -> dict[str, Path]:
    """Stores of the cells of the LinearSCVI, TOTALVI, PEAKVI, CondSCVI and SysVI fixtures, with their genes / peaks
    (the model's order): Kang as `store` (LinearSCVI, CondSCVI); CBMC's first 300 cells with their 13 proteins, one
    batch; Granja's 600 cells; Baron's 328 cells, batch (system) `species`; sci-CAR's 300 cells with peaks (100 of
    them without, 100 without RNA)."""
    folder = tmp_path_factory.mktemp("more")
    ad.read_h5ad(CBMC)[:300].copy().write_h5ad(folder / "cbmc300.h5ad")
    scicar().write_h5ad(folder / "scicar300.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cbmc = build_store(
            BuildConfig(
                inputs=[str(folder / "cbmc300.h5ad")], output=str(folder / "cbmc.zarr"),
                protein_key="protein_expression", genes=_genes("totalvi"),
            )
        )  # fmt: skip
        granja = build_store(
            BuildConfig(
                inputs=[str(GRANJA)], output=str(folder / "granja.zarr"), batch_key="Group", genes=_genes("peakvi")
            )
        )
        baron = build_store(
            BuildConfig(
                inputs=[str(BARON)], output=str(folder / "baron.zarr"), batch_key="species", genes=_genes("sysvi")
            )
        )
        multivi = build_store(
            BuildConfig(
                inputs=[str(folder / "scicar300.h5ad")], output=str(folder / "scicar.zarr"), atac_key="atac",
                batch_key="treatment_time_h", genes=_genes("multivi"),
            )
        )  # fmt: skip
        destvi = build_store(
            BuildConfig(inputs=[str(FIXTURE / "destvi" / "spots.h5ad")], output=str(folder / "spots.zarr"))
        )
    stores = {"linearscvi": store, "totalvi": cbmc, "peakvi": granja, "condscvi": store, "sysvi": baron}
    return stores | {"multivi": multivi, "destvi": destvi}


def _genes(name: str) -> list[str]:
    names = read_scvi_tools(FIXTURE / name)["var_names"]
    return [str(g) for g in (names["rna"] if isinstance(names, dict) else names)]


@pytest.mark.parametrize("name", ["linearscvi", "totalvi", "peakvi", "condscvi", "sysvi", "multivi"])
def test_a_scvi_tools_model_of_another_method_imports_with_its_outputs(more_stores, name):
    """LinearSCVI, TOTALVI (no batch key), PEAKVI, CondSCVI (weight_obs), SysVI and MULTIVI (a MuData: paired and
    unpaired cells) saved by scvi-tools, read weights-only: scvi-tools' latent of every cell and its normalized
    expression (accessibility; protein expression; SysVI's decoder mean from the store's log-normalised counts;
    MULTIVI's expression and accessibility) of 50 cells, within 1e-5."""
    model = import_scvi_tools(FIXTURE / name, more_stores[name], device="cpu")
    classes = {"linearscvi": LinearSCVI, "totalvi": TOTALVI, "peakvi": PEAKVI, "condscvi": CondSCVI, "sysvi": SysVI}
    classes["multivi"] = MULTIVI
    assert type(model) is classes[name]
    expected = dict(np.load(FIXTURE / name / "expected.npz"))
    ours = _at_posterior_mean(model)
    theirs = _in_store_order(expected["latent"], expected["obs_names"], more_stores[name])
    assert np.abs(ours["latent"] - theirs).max() <= TOLERANCE
    rows = {n: i for i, n in enumerate(ad.read_zarr(more_stores[name]).obs_names)}
    first = [rows[n] for n in expected["obs_names"][:50]]
    for what in ("normalized", *{"totalvi": ("protein",), "multivi": ("accessibility",)}.get(name, ())):
        assert np.abs(ours[what][first] - expected[what]).max() <= TOLERANCE, what


def test_a_scvi_tools_destvi_imports_with_its_proportions(more_stores):
    """A DestVI saved by scvi-tools (from_rna_model of a CondSCVI; 60 spots, 30 genes), read weights-only onto a
    store of its spots: scvi-tools' proportions and per-type states (gamma) of every spot, within 1e-5."""
    model = import_scvi_tools(FIXTURE / "destvi", more_stores["destvi"], device="cpu")
    assert type(model) is DestVI and model.cell_types == tuple(read_scvi_tools(FIXTURE / "destvi")["attr_dict"][
        "init_params_"]["non_kwargs"]["cell_type_mapping"])  # fmt: skip
    expected = dict(np.load(FIXTURE / "destvi" / "expected.npz"))
    ours = _at_posterior_mean(model)
    for what in ("proportions", "gamma"):
        theirs = _in_store_order(expected[what], expected["obs_names"], more_stores["destvi"])
        assert np.abs(ours[what] - theirs).max() <= TOLERANCE, what


def test_a_totalvi_set_up_on_an_obsm_array_imports_with_the_store_proteins(more_stores, tmp_path):
    """scvi-tools names the proteins of an obsm array (e.g. `anndata.read_zarr(store)`) "0".."n-1": the import takes
    the store's proteins when their count matches (the same latent as with names), and names the mismatch else."""
    saved = read_scvi_tools(FIXTURE / "totalvi")
    saved["attr_dict"].pop("history_")  # pandas frames, read as placeholders
    proteins = saved["attr_dict"]["registry_"]["field_registries"]["proteins"]["state_registry"]
    proteins["column_names"] = np.arange(len(proteins["column_names"]))
    (tmp_path / "numbered").mkdir()
    torch.save(saved, tmp_path / "numbered" / "model.pt")
    numbered = import_scvi_tools(tmp_path / "numbered", more_stores["totalvi"], "cpu")
    named = import_scvi_tools(FIXTURE / "totalvi", more_stores["totalvi"], "cpu")
    assert numbered.schema.modalities["protein"] == named.schema.modalities["protein"]
    np.testing.assert_array_equal(numbered.get_latent_representation(), named.get_latent_representation())
    proteins["column_names"] = np.arange(len(proteins["column_names"]) - 1)
    torch.save(saved, tmp_path / "numbered" / "model.pt")
    with pytest.raises(IncompatibleStoreError, match=r"reads 12 proteins \['0', .*proteins named 0..n-1"):
        import_scvi_tools(tmp_path / "numbered", more_stores["totalvi"], "cpu")


def test_export_of_the_imported_fixture_is_scvi_tools_own_file(store, more_stores, tmp_path):
    """scvi-tools file -> atlasvi -> scvi-tools file, each method: the same parameter names, shapes and values
    (scvi-tools' unused library encoder, per-cell dispersion and zero-inflation heads aside, written as zeros),
    var_names, setup registry (every field's state and summary) and init arguments."""
    stores = {"scvi": store, "scanvi": store} | more_stores
    for name in stores:
        theirs = read_scvi_tools(FIXTURE / name)
        model = import_scvi_tools(FIXTURE / name, stores[name], "cpu")
        ours = read_scvi_tools(export_scvi_tools(model, tmp_path / name))
        their_state, our_state = theirs["model_state_dict"], ours["model_state_dict"]
        assert set(our_state) == set(their_state)
        unused = {  # what scvi-tools builds and does not use in the fixtures' configurations
            "scvi": ("l_encoder.", "decoder.px_r_decoder."), "scanvi": ("l_encoder.", "decoder.px_r_decoder."),
            "linearscvi": ("decoder.px_dropout_decoder.",), "peakvi": (), "condscvi": (), "sysvi": (),
            "destvi": ("V", "gamma"),  # the free per-spot parameters (amortized: unused); not gamma_encoder
            "multivi": ("z_decoder_expression.px_r_decoder.", "z_encoder_protein.", "z_decoder_pro.", "py_r",
                        "background_pro_"),
            "totalvi": ("encoder.l_gene_", "decoder.px_dropout_decoder_gene."),
        }[name]  # fmt: skip
        for key, value in their_state.items():
            if isinstance(value, torch.Tensor):
                assert our_state[key].shape == value.shape, key
                if not _unused(key, unused):
                    assert torch.equal(our_state[key], value), key
        for key in (k for k in our_state if _unused(k, unused)):  # zeros; batch norms' weight and variance ones
            assert our_state[key].float().unique().tolist() in ([0.0], [1.0], []), key
        names, their_names = ours["var_names"], theirs["var_names"]
        if isinstance(their_names, dict):  # MULTIVI: per modality
            assert list(names) == list(their_names)
            names, their_names = np.concatenate(list(names.values())), np.concatenate(list(their_names.values()))
        np.testing.assert_array_equal(names, their_names)
        registry, their_registry = ours["attr_dict"]["registry_"], theirs["attr_dict"]["registry_"]
        their_setup = dict(their_registry["setup_args"])
        if their_setup["batch_key"] is None:  # set up without a batch: the import takes the store's one batch
            their_setup["batch_key"] = model.schema.batch_key
        assert registry["setup_args"] == their_setup
        assert registry["model_name"] == their_registry["model_name"] and registry["scvi_version"] == "1.4.2"
        assert list(registry["field_registries"]) == list(their_registry["field_registries"])
        for field, content in their_registry["field_registries"].items():
            mine = registry["field_registries"][field]
            if field == "batch" and their_registry["setup_args"]["batch_key"] is None:
                assert mine["state_registry"]["original_key"] == model.schema.batch_key
                continue
            assert mine["summary_stats"] == content["summary_stats"], field
            assert mine["data_registry"] == content["data_registry"], field
            assert json.dumps(mine["state_registry"], default=_plain) == json.dumps(
                content["state_registry"], default=_plain
            ), field
        init, their_init = ours["attr_dict"]["init_params_"], theirs["attr_dict"]["init_params_"]
        if name == "sysvi":  # the cells that started the pseudo-inputs (random in scvi-tools; replaced by the weights)
            init["non_kwargs"].pop("pseudoinputs_data_indices")
            their_init["non_kwargs"].pop("pseudoinputs_data_indices")
        if name == "destvi":  # px_r: the CondSCVI's in theirs, the trained one in ours (the weights replace it)
            init["non_kwargs"].pop("px_r")
            their_init["non_kwargs"].pop("px_r")
        assert _json(init["non_kwargs"]) == _json(their_init["non_kwargs"]), name
        assert list(init["kwargs"]) == list(their_init["kwargs"]), name
        if name == "destvi":  # scvi-tools wrote the prototypes only; ours has them (the same) and the defaults
            ours_kwargs = init["kwargs"]["module_kwargs"]
            assert _json(ours_kwargs) == _json(ours_kwargs | their_init["kwargs"]["module_kwargs"])


def _json(value) -> str:
    return json.dumps(value, default=_plain, sort_keys=True)


def _unused(key: str, unused: tuple[str, ...]) -> bool:
    """Whether `key` is one of scvi-tools' unused parameters: a prefix ending in "." or "_" (a module), else the
    whole name (DestVI's V and gamma, not gamma_encoder)."""
    return any(key.startswith(u) if u.endswith((".", "_")) else key == u for u in unused)


def _plain(value):
    """numpy arrays, tensors and scalars as JSON (registry comparison): lists of str / int / bool / float; a
    state dict (DestVI's init arguments) as its items."""
    if isinstance(value, dict):
        return list(value.items())
    return value.tolist() if hasattr(value, "tolist") else list(value)


@pytest.fixture(scope="module")
def atlasvi_models(tmp_path_factory, two_panel_store, granja_store, baron_store, multiome_store) -> dict[str, Path]:
    """atlasvi models with the options scvi-tools' setup and module take (trained, then saved; Kang's every third
    cell, 120 genes): SCVI with a
    categorical and a continuous covariate encoded, gene-batch NB, the latent library; SCANVI; LinearSCVI (ZINB,
    gene-batch dispersion, a decoder bias, 1 epoch); totalVI on two CITE-seq panels (one lacks 15 of the 29
    proteins: scvi-tools' protein_batch_mask; the latent library; 1 epoch); PeakVI on 600 scATAC cells x 5000 peaks
    (1 epoch); CondSCVI with encode_covariates and ct_weight (1 epoch); SysVI on Baron human + mouse, per-cell
    output variance (1 epoch); MULTIVI on paired, RNA-only and ATAC-only sci-CAR cells, NB, gene-batch dispersion,
    universal modality weights, encoded covariates (1 epoch); DestVI from the CondSCVI on its cells as spots (1
    epoch)."""
    folder = tmp_path_factory.mktemp("atlasvi_models")
    kang = ad.read_h5ad(KANG)
    genes = kang.var_names[np.argsort(-np.asarray(kang.X.sum(axis=0)).ravel())[:120]]
    adata = kang[::3, genes].copy()  # every third cell (519): every sample and cell type, a third of the steps
    adata.obs["depth"] = np.log1p(np.asarray(adata.X.sum(axis=1)).ravel()) / 10
    adata.write_h5ad(folder / "kang.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covariates = build_store(
            BuildConfig(
                inputs=[str(folder / "kang.h5ad")], output=str(folder / "covariates.zarr"), batch_key="sample",
                categorical_covariate_keys=["cell_type"], continuous_covariate_keys=["depth"],
            )
        )  # fmt: skip
    labelled = _build(folder / "labelled.zarr", [str(g) for g in genes], folder / "kang.h5ad")
    config = SCVIConfig(
        n_latent=4, n_hidden=24, n_layers=2, encode_covariates=True, dispersion="gene-batch", gene_likelihood="nb",
        use_observed_lib_size=False,
    )  # fmt: skip
    torch.manual_seed(0)
    scvi = SCVI(covariates, config, device="cpu")
    scvi.fit(TrainConfig(max_epochs=1))
    plain = SCVI(labelled, SCVIConfig(n_latent=4, n_hidden=24), device="cpu")
    plain.fit(TrainConfig(max_epochs=1))
    scanvi = SCANVI.from_scvi_model(plain)
    scanvi.fit(TrainConfig(max_epochs=1))
    ldvae = LinearSCVI(
        labelled, LDVAEConfig(n_latent=4, n_hidden=24, gene_likelihood="zinb", dispersion="gene-batch", bias=True)
    )
    ldvae.fit(TrainConfig(max_epochs=1))
    totalvi = TOTALVI(two_panel_store, TOTALVIConfig(n_latent=5, n_hidden=32, use_observed_lib_size=False))
    totalvi.fit(TrainConfig(max_epochs=1))
    peakvi = PEAKVI(granja_store, PEAKVIConfig(n_latent=4))
    peakvi.fit(TrainConfig(max_epochs=1))
    condscvi = CondSCVI(
        labelled, CondSCVIConfig(n_latent=4, n_hidden=24, encode_covariates=True, ct_weight=(1.0, 2, 3, 1, 1, 1))
    )
    condscvi.fit(TrainConfig(max_epochs=1))
    sysvi = SysVI(baron_store, SysVIConfig(n_latent=4, n_hidden=16, out_var_mode="sample_feature"), device="cpu")
    sysvi.fit(TrainConfig(max_epochs=1))
    models = {"scvi": scvi, "scanvi": scanvi, "ldvae": ldvae, "totalvi": totalvi, "peakvi": peakvi}
    multivi = MULTIVI(
        multiome_store,
        MULTIVIConfig(
            n_hidden=16,
            n_latent=4,
            gene_likelihood="nb",
            dispersion="gene-batch",
            modality_weights="universal",
            encode_covariates=True,
        ),  # fmt: skip
        device="cpu",
    )
    multivi.fit(TrainConfig(max_epochs=1))
    destvi = DestVI.from_rna_model(labelled, condscvi, device="cpu")  # Kang's cells as spots, batch `sample`
    destvi.fit(TrainConfig(max_epochs=1))
    models |= {"condscvi": condscvi, "sysvi": sysvi, "multivi": multivi, "destvi": destvi}
    return {name: model.save(folder / name) for name, model in models.items()}


@pytest.mark.parametrize("name", list(CLASSES))
def test_export_then_import_gives_the_same_model(atlasvi_models, tmp_path, name):
    """atlasvi -> scvi-tools file (from the saved folder, no store) -> atlasvi: every weight and the latent exact
    (a totalVI's adversary and a CondSCVI's prototypes aside: scvi-tools' file has neither, the import starts the
    adversary afresh and the prototypes are computed when the model is saved)."""
    cls = CLASSES[name]
    saved = atlasvi_models[name]
    original = cls.load(saved, cls.saved_store(saved), device="cpu")
    exported = export_scvi_tools(saved, tmp_path / "exported")
    back = import_scvi_tools(exported.parent, original.store, device="cpu")
    assert back.config == original.config
    categorical = dict(original.schema.categorical)
    if name in ("sysvi", "multivi"):  # set up without labels in scvi-tools: the store's labels key is not the model's
        categorical.pop(original.schema.labels_key)
    if name == "destvi":  # scvi-tools' DestVI keeps its cell types, not the CondSCVI's labels key
        categorical[DESTVI_LABELS] = categorical.pop(original.schema.labels_key)
    assert back.schema.categorical == categorical or name == "scanvi"
    state = back.module.state_dict()
    assert set(state) == set(original.module.state_dict())
    fresh = COUNTERPARTS[get_entry(name).saved_name].atlasvi_buffers  # CondSCVI's prototypes: computed when saved
    for key, value in original.module.state_dict().items():
        assert torch.equal(state[key], value) or key.startswith("adversary.") or key in fresh, key
    what = "proportions" if name == "destvi" else "latent"  # DestVI: no latent
    np.testing.assert_array_equal(_at_posterior_mean(back)[what], _at_posterior_mean(original)[what])


def test_scvi_tools_loads_the_export(atlasvi_models, tmp_path):
    """scvi.model.<Class>.load of each export on the training store's cells (anndata.read_zarr): the same latent and
    normalized expression (accessibility for PeakVI, and protein expression for totalVI; at the posterior mean)
    as atlasvi, max abs difference <= 1e-5."""
    python = _scvi_tools_python()
    folders = {}
    for name, saved in atlasvi_models.items():
        cls = CLASSES[name]
        model = cls.load(saved, cls.saved_store(saved), device="cpu")
        folders[name] = export_scvi_tools(saved, tmp_path / name).parent
        for what, values in _at_posterior_mean(model).items():
            np.save(folders[name] / f"atlasvi_{what}.npy", values)
        (folders[name] / "store").write_text(str(model.store.path))
    script = Path(__file__).with_name("scvi_tools_load.py")
    classes = {name: get_entry(name).saved_name for name in folders}
    subprocess.run([python, str(script), *(f"{f}:{classes[n]}" for n, f in folders.items())], check=True, timeout=600)
    for name, folder in folders.items():
        outputs = {"totalvi": ("protein",), "multivi": ("accessibility",)}.get(name, ())
        for what in ("proportions", "gamma") if name == "destvi" else ("latent", "normalized", *outputs):
            ours, theirs = (np.load(folder / f"{tool}_{what}.npy") for tool in ("atlasvi", "scvi_tools"))
            assert ours.shape == theirs.shape, (name, what)
            assert np.abs(ours - theirs).max() <= TOLERANCE, (name, what)


def _at_posterior_mean(model) -> dict[str, np.ndarray]:
    """latent (n, n_latent) and, with z (and totalVI's log protein background) at the posterior mean, normalized:
    (n, n_genes) px_scale (PeakVI: the accessibility p; SysVI: the decoder's mean), for MULTIVI accessibility (n,
    n_regions) p, and for totalVI protein:
    (n, n_proteins) foreground rate x (1 - P(background)), scvi-tools' get_normalized_expression defaults."""
    from torch.distributions import Normal

    if isinstance(model, DestVI):  # no latent: proportions (n, n_labels) and gamma (n, n_latent, n_labels)
        return {"proportions": model.get_proportions().to_numpy(), "gamma": model.get_gamma(return_numpy=True)}
    module, parts = model.module.eval(), {"normalized": [], "protein": [], "accessibility": []}
    rsample = Normal.rsample
    Normal.rsample = lambda self, sample_shape=(): self.loc.expand(torch.Size(sample_shape) + self.loc.shape)
    try:
        with torch.no_grad():
            for batch in model._batches(None, None, 1024):
                inputs = module.unpack(batch)
                inference = module.inference(inputs)
                if isinstance(model, SysVI):  # the decoder's mean (scvi-tools' SysVI has no normalized expression)
                    parts["normalized"].append(module.generative(inference["qz"].loc, inputs)["px"].loc.numpy())
                    continue
                out = module.generative(inference["qz"].loc, inference["library"], inputs)
                parts["normalized"].append(out["px_scale"].numpy())
                if isinstance(model, MULTIVI):
                    parts["accessibility"].append(out["p"].numpy())
                if "rate_fore" in out:
                    parts["protein"].append((out["rate_fore"] * torch.sigmoid(-out["mixing"])).numpy())
    finally:
        Normal.rsample = rsample
    values = {"latent": model.get_latent_representation()}
    return values | {k: np.concatenate(v) for k, v in parts.items() if v}


def _scvi_tools_python() -> str:
    """This interpreter where it has scvi-tools (the `test` extra installs it), else the benchmarks' scvi-tools venv;
    skipped with neither."""
    if importlib.util.find_spec("scvi") is not None:
        return sys.executable
    venv = Path(__file__).resolve().parents[2] / "benchmarks" / ".cache" / "scvi-venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    pytest.skip("scvi-tools is not installed (pip install -e '.[test]' installs it)")


def test_a_file_that_needs_unpickling_code_is_refused(tmp_path):
    """A model.pt whose pickle names a callable (here os.system) is refused before anything is unpickled."""

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, ("touch " + str(tmp_path / "ran"),))

    saved = read_scvi_tools(FIXTURE / "scvi")
    saved["attr_dict"]["hook"] = Payload()
    torch.save(saved, tmp_path / "model.pt")  # pickle protocol 2, as scvi-tools saves
    with pytest.raises(
        ScviToolsFileError, match=r"model.pt: reading it would run code from the file \([^)]*(posix|nt)\.system"
    ):
        read_scvi_tools(tmp_path)
    torch.save(saved, tmp_path / "model.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)  # beyond the weights-only reader
    with pytest.raises(ScviToolsFileError, match=r"model.pt: not readable weights-only \(Unsupported operand"):
        read_scvi_tools(tmp_path)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"not a model")
    with pytest.raises(ScviToolsFileError, match="bad/model.pt: not readable weights-only"):
        read_scvi_tools(tmp_path / "bad")


def test_a_store_without_the_model_genes_is_named(tmp_path, store):
    """Missing and extra genes are counted and named; the same genes in another order too."""
    genes = [str(g) for g in read_scvi_tools(FIXTURE / "scvi")["var_names"]]
    other = _build(tmp_path / "other.zarr", [*genes[2:], "CD3E"])
    with pytest.raises(IncompatibleStoreError) as err:
        import_scvi_tools(FIXTURE / "scvi", other, "cpu")
    message = str(err.value)
    assert f"2 of the model's genes are not in the store, first {genes[:2]}" in message
    assert "1 store genes are not the model's, first ['CD3E']" in message and "--genes MODEL" in message
    reordered = _build(tmp_path / "reordered.zarr", genes[::-1])
    with pytest.raises(IncompatibleStoreError, match="the same genes in another order"):
        import_scvi_tools(FIXTURE / "scvi", reordered, "cpu")


def test_every_config_field_of_a_counterpart_is_mapped():
    """Each method with a scvi-tools counterpart: every atlasvi config field (but `name`) is a class argument, a
    module argument or declared atlasvi-only, once."""
    for method, spec in COUNTERPARTS.items():
        fields = set(get_entry(method).config_class.model_fields) - {"name"}
        mapped = [*spec.class_args, *spec.module_args, *spec.atlasvi_only]
        assert len(mapped) == len(set(mapped)) and set(mapped) == fields, method


def test_a_method_without_counterpart_or_an_option_scvi_tools_lacks_is_refused(atlasvi_models, tmp_path):
    """A method with no scvi-tools counterpart (a saved model.json claiming AutoZI), an LDVAE with encoded
    covariates, a MULTIVI with per-cell modality weights, a SysVI whose system is not the batch key and a DestVI
    with free per-spot proportions are refused in one line naming what."""
    for case, (name, change, message) in enumerate(
        (
            ("ldvae", {"method": "AutoZI"}, "a AutoZI model has no scvi-tools counterpart in atlasvi (SCVI, SCANVI, "),
            ("destvi", {"amortization": "latent"}, "a DestVI with amortization 'latent' has no counterpart"),
            ("multivi", {"modality_weights": "cell"}, "a MULTIVI with per-cell modality weights has no counterpart"),
            ("ldvae", {"encode_covariates": True}, "a LinearSCVI with encode_covariates has no scvi-tools form"),
            ("sysvi", {"system_key": "cell_type"}, "a SysVI with system_key 'cell_type' other than the batch key"),
        )
    ):
        saved = atlasvi_models[name]
        meta = json.loads((saved / "model.json").read_text())
        edited = tmp_path / f"edited{case}"
        edited.mkdir()
        for item in saved.iterdir():
            (edited / item.name).write_bytes(item.read_bytes())
        changed = meta | {k: v for k, v in change.items() if k == "method"}
        if "method" not in change:
            changed["config"] = meta["config"] | {"model": meta["config"]["model"] | change}
        (edited / "model.json").write_text(json.dumps(changed))
        with pytest.raises(ScviToolsFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            export_scvi_tools(edited, tmp_path / f"out_{edited.name}")
