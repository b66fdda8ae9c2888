"""benchmarks/destvi_real.py: the marker signatures and scores, Moran's I, the tools' comparison, and the committed
table renders from its JSON."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from benchmarks.destvi_real import _kept, _partner, _summary, compare, marker_scores, morans_i, render, signatures

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_morans_i_is_near_one_for_a_gradient_minus_one_for_alternation_and_zero_for_a_constant():
    line = np.stack([np.arange(50.0), np.zeros(50)], 1)
    assert morans_i(line, np.arange(50.0), k=2) > 0.95
    # each inner point's two neighbours have the other sign; an end's are one of each (0): (48 * -1) / 50
    assert morans_i(line, np.where(np.arange(50) % 2 == 0, 1.0, -1.0), k=2) == pytest.approx(-0.96)
    assert morans_i(line, np.ones(50), k=2) == 0.0
    scattered = np.random.default_rng(0).normal(size=2500)
    grid = np.stack(np.unravel_index(np.arange(2500), (50, 50)), 1).astype(float)
    assert abs(morans_i(grid, scattered)) < 0.05


def test_signatures_take_the_type_enriched_genes_detected_in_enough_of_its_cells():
    # 10 cells of "a", 10 of "b", each with 20 counts (g4 pads the totals and is not offered): g0 in every "a"
    # cell; g1 in every "b" cell; g2 in one "a" cell only (0.1 of them); g3 flat
    x = np.zeros((20, 5))
    x[:10, 0], x[10:, 1], x[:, 3], x[:, 4] = 5, 5, 10, 5
    x[0, 2], x[0, 4] = 5, 0
    reference = ad.AnnData(sp.csr_matrix(x))
    reference.var_names = ["g0", "g1", "g2", "g3", "g4"]
    reference.obs["cell_type"] = ["a"] * 10 + ["b"] * 10
    genes = ["g0", "g1", "g2", "g3"]
    assert signatures(reference, genes, n=3) == {"a": ["g0"], "b": ["g1"]}
    assert signatures(reference, genes, n=3, min_fraction=0.1) == {"a": ["g0", "g2"], "b": ["g1"]}
    assert signatures(reference, genes, n=1, min_fraction=0.1) == {"a": ["g0"], "b": ["g1"]}
    assert signatures(reference, ["g1", "g3"], n=3) == {"a": [], "b": ["g1"]}


def test_marker_scores_are_the_mean_log_normalised_markers_over_all_genes():
    spots = ad.AnnData(np.array([[1.0, 3.0, 0.0], [0.0, 4.0, 4.0]]))
    spots.var_names, spots.obs_names = ["g0", "g1", "g2"], ["s0", "s1"]
    scores = marker_scores(spots, {"t": ["g0", "missing"], "u": ["g1", "g2"], "none": ["missing"]})
    assert list(scores.columns) == ["t", "u"] and list(scores.index) == ["s0", "s1"]
    assert scores["t"].tolist() == pytest.approx([np.log1p(2500), 0.0])
    assert scores["u"].tolist() == pytest.approx([np.log1p(7500) / 2, np.log1p(5000)])


def test_compare_gives_the_tools_agreement_and_each_tools_marker_correlation():
    rng = np.random.default_rng(1)
    index = [f"s{i}" for i in range(40)]
    a = pd.DataFrame(rng.dirichlet(np.ones(3), 40), index=index, columns=["x", "y", "z"])
    b = a.iloc[::-1].copy()  # the same spots in another order: identical proportions
    b["z"] = rng.uniform(size=40)
    score = pd.DataFrame({"x": a["x"] * 2 + 1, "y": rng.uniform(size=40)}, index=index)
    marks = {"scores": {"signature": score}, "coordinates": pd.DataFrame(rng.uniform(size=(40, 2)), index=index)}
    out = compare({"atlasvi": a, "scvi-tools": b}, marks)
    assert out["agreement"]["x"] == pytest.approx(1.0) and out["agreement"]["y"] == pytest.approx(1.0)
    assert out["agreement"]["z"] == pytest.approx(np.corrcoef(a["z"], b.loc[index, "z"])[0, 1])
    assert out["anatomy"]["atlasvi"]["signature"]["x"] == pytest.approx(1.0)
    assert out["anatomy"]["scvi-tools"]["signature"]["y"] == pytest.approx(np.corrcoef(a["y"], score["y"])[0, 1])
    assert set(out["morans_i"]) == {"atlasvi", "scvi-tools", "signature score"} and "self_agreement" not in out
    other = {"atlasvi": a.copy(), "scvi-tools": b.copy()}  # each tool at another seed
    other["atlasvi"]["y"] = rng.uniform(size=40)
    other["scvi-tools"]["x"] = rng.uniform(size=40)
    own = compare({"atlasvi": a, "scvi-tools": b}, marks, other)["self_agreement"]
    assert own["atlasvi"]["x"] == pytest.approx(1.0) and own["scvi-tools"]["y"] == pytest.approx(1.0)
    assert own["atlasvi"]["y"] == pytest.approx(np.corrcoef(a["y"], other["atlasvi"]["y"])[0, 1])
    assert own["scvi-tools"]["x"] == pytest.approx(np.corrcoef(b["x"], other["scvi-tools"]["x"])[0, 1])


def test_a_run_replaces_the_kept_entries_of_its_datasets_seeds_and_epochs_only(tmp_path):
    path = tmp_path / "results.json"
    assert _kept(path, {("pdac", 0, (30, 30))}) == {"commands": [], "runs": [], "comparisons": {}, "markers": {}}
    pdac_0, pdac_1 = (
        {"dataset": "pdac", "seed": 0, "epochs": [30, 30]},
        {"dataset": "pdac", "seed": 1, "epochs": [30, 30]},
    )
    pdac_long = {"dataset": "pdac", "seed": 0, "epochs": [300, 100]}
    lymph = {"dataset": "lymph_node", "seed": 0, "epochs": [30, 30]}
    old = {
        "commands": ["a", "b"],
        "runs": [pdac_0, pdac_1, pdac_long, lymph],
        "comparisons": {"p0": pdac_0, "p1": pdac_1, "pl": pdac_long, "l0": lymph},
        "markers": {"pdac": {}, "lymph_node": {"known": {}}},
        "machine": "m",
    }
    path.write_text(json.dumps(old))
    assert _kept(path, {("pdac", 0, (30, 30))}) == {
        "commands": ["a", "b"],
        "runs": [pdac_1, pdac_long, lymph],
        "comparisons": {"p1": pdac_1, "pl": pdac_long, "l0": lymph},
        "markers": {"pdac": {}, "lymph_node": {"known": {}}},
    }


def test_self_agreement_pairs_the_two_seeds_once_and_three_or_more_in_a_cycle():
    assert [_partner([0], i) for i in range(1)] == [None]
    assert [_partner([0, 1], i) for i in range(2)] == [1, None]
    assert [_partner([0, 1, 2], i) for i in range(3)] == [1, 2, 0]
    assert [_partner([5, 3, 9, 1], i) for i in range(4)] == [3, 9, 1, 5]


def test_summary_gives_per_seed_means_of_the_tools_agreement_self_agreement_and_known_markers():
    anatomy = {"a": {"known": {"x": 0.2, "y": None, "z": 0.4}}, "b": {"known": {"x": 0.1, "y": 0.3, "z": 0.5}}}
    comparisons = {
        "d_1": {"dataset": "d", "seed": 1, "epochs": [3, 1], "agreement": {"x": 0.5, "y": None, "z": 0.9},
                "anatomy": anatomy},
        "d_0": {"dataset": "d", "seed": 0, "epochs": [3, 1], "agreement": {"x": 0.6, "y": 0.7, "z": 1.0},
                "self_agreement": {"a": {"x": 0.1, "y": 0.2}, "b": {"x": 0.5, "y": None}}, "self_agreement_seed": 1,
                "anatomy": anatomy | {"old": {}}},
    }  # fmt: skip
    lines = _summary(comparisons)
    assert lines[3] == "| dataset | epochs | seed | tools' r mean (median) | a vs itself (seed) | b vs itself (seed) " \
        "| a known-marker r | b known-marker r |"  # fmt: skip
    assert lines[5] == "| d | [3, 1] | 0 | 0.767 (0.700) | 0.150 (1) | 0.500 (1) | 0.300 | 0.300 |"
    assert lines[6] == "| d | [3, 1] | 1 | 0.700 (0.700) | - | - | 0.300 | 0.300 |"
    assert len(lines) == 7


def test_committed_table_renders_from_its_json():
    results = json.loads((RESULTS / "destvi_real.json").read_text())
    assert render(results) == (RESULTS / "destvi_real.md").read_text()
