"""benchmarks/destvi_fidelity.py: the paired differences, the weights handed to scvi-tools for the paired design
(atlasvi's initial draw of a seed, mapped to scvi-tools' names), and the committed table renders from its JSON."""

import json
import warnings
from collections import OrderedDict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from atlasvi.api.condscvi import CondSCVI
from atlasvi.api.destvi import DestVI
from atlasvi.data import BuildConfig, build_store
from benchmarks.destvi_fidelity import _load_init, atlasvi_init, merged, paired_gaps, table

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_paired_gaps_are_the_per_seed_differences():
    a = {0: 0.50, 1: 0.40, 2: 0.47, 3: 0.30}  # seed 3: atlasvi alone, not paired
    b = {0: 0.48, 1: 0.45, 2: 0.50}
    rows = [{"tool": "scvi-tools", "seed": s, "spearman": v} for s, v in b.items()]
    rows += [{"tool": "atlasvi", "seed": s, "spearman": v} for s, v in a.items()]
    (gap,) = paired_gaps(rows)
    d = np.array([0.02, -0.05, -0.03])
    assert (gap["a"], gap["b"], gap["n"], gap["above"]) == ("atlasvi", "scvi-tools", 3, 1)
    assert gap["mean"] == pytest.approx(d.mean()) and gap["sd"] == pytest.approx(d.std(ddof=1))
    assert gap["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
    half = 4.302652729749462 * d.std(ddof=1) / np.sqrt(3)  # Student's t 0.975 quantile, 2 degrees of freedom
    assert gap["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])


def test_weights_load_into_scvi_tools_names_and_unknown_ones_are_refused():
    module = nn.Module()
    module.fc_layers = nn.Sequential(OrderedDict([("Layer 0", nn.Sequential(nn.Linear(3, 2)))]))
    module.embeddings_dict = nn.ModuleDict({"batch": nn.Embedding(1, 5)})
    module.V = nn.Parameter(torch.zeros(2))
    state = {"layers.0.0.weight": torch.ones(2, 3), "layers.0.0.bias": torch.ones(2)}
    state |= {"batch_embedding.weight": torch.ones(1, 5)}
    own = float(max(p.detach().sub(1).abs().max() for p in module.parameters() if p is not module.V))
    assert _load_init(module, state) == pytest.approx(own)
    assert torch.equal(module.fc_layers[0][0].weight, torch.ones(2, 3))
    assert torch.equal(module.embeddings_dict["batch"].weight, torch.ones(1, 5))
    assert torch.equal(module.V, torch.zeros(2))  # none given (atlasvi's amortized DestVI has no V): keeps its own
    assert _load_init(module, state) == 0.0  # the same weights again: the same draw
    with pytest.raises(RuntimeError, match="no scvi-tools counterpart"):
        _load_init(module, state | {"gamma_encoder.1.bias": torch.ones(3)})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("destvi_init")
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(20)]
    ref = ad.AnnData(sp.csr_matrix(rng.poisson(2, (60, 20)).astype(np.float32)))
    ref.obs = pd.DataFrame({"cell_type": np.repeat(["a", "b", "c"], 20)}, index=[f"c{i}" for i in range(60)])
    spots = ad.AnnData(sp.csr_matrix(rng.poisson(10, (30, 20)).astype(np.float32)))
    spots.obs_names = [f"s{i}" for i in range(30)]
    ref.var_names = spots.var_names = genes
    ref.write_h5ad(folder / "ref.h5ad")
    spots.write_h5ad(folder / "spots.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            build_store(BuildConfig(inputs=[str(folder / "ref.h5ad")], output=str(folder / "ref.zarr"),
                                    labels_key="cell_type")),
            build_store(BuildConfig(inputs=[str(folder / "spots.h5ad")], output=str(folder / "spots.zarr"))),
        )  # fmt: skip


def test_atlasvi_init_is_the_draw_a_run_of_the_seed_starts_from(stores):
    init = atlasvi_init(*stores, seed=3)
    sc_model = CondSCVI(stores[0], device="cpu", seed=3)
    assert init["condscvi"].keys() == {k for k in sc_model.module.state_dict() if not k.endswith("_vprior")}
    assert all(torch.equal(v, sc_model.module.state_dict()[k]) for k, v in init["condscvi"].items())
    sc_model.module.mp_vprior.fill_(1 / 15)  # any prototypes: they are taken, not drawn
    model = DestVI.from_rna_model(stores[1], sc_model, device="cpu", seed=3)
    own = {k for k in model.module.state_dict() if not k.startswith(model.module.init_prefixes)}
    assert init["destvi"].keys() == own and {"batch_embedding.weight", "eta", "beta"} < own
    assert all(torch.equal(v, model.module.state_dict()[k]) for k, v in init["destvi"].items())
    other = atlasvi_init(*stores, seed=4)["destvi"]
    assert not torch.equal(other["gamma_encoder.1.weight"], init["destvi"]["gamma_encoder.1.weight"])


def test_committed_table_renders_from_its_json():
    results = json.loads((RESULTS / "destvi_fidelity.json").read_text())
    assert table(results) == (RESULTS / "destvi_fidelity.md").read_text()


def test_merged_results_keep_one_run_per_dataset_seed_tool_the_later_winning():
    run = {"dataset": "simulation", "epochs": [300, 100], "spearman": 0.5}
    a = {"runs": [run | {"seed": 0, "tool": "atlasvi"}, run | {"seed": 1, "tool": "atlasvi"}], "machine": "m1"}
    b = {"runs": [run | {"seed": 0, "tool": "atlasvi", "spearman": 0.9}, run | {"seed": 0, "tool": "scvi-tools"}],
         "agreement": {"pdac_0": {"r": 1}}, "notes": ["n"], "machine": "m2"}  # fmt: skip
    out = merged([a, b])
    by = {(r["seed"], r["tool"]): r["spearman"] for r in out["runs"]}
    assert by == {(0, "atlasvi"): 0.9, (1, "atlasvi"): 0.5, (0, "scvi-tools"): 0.5}
    assert out["agreement"] == {"pdac_0": {"r": 1}} and out["notes"] == ["n"] and out["machine"] == "m2"
