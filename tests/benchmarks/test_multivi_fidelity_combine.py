"""benchmarks/multivi_fidelity_combine.py: the verdict's orientation per metric, the checks on its inputs, the goal
statistics against scipy's, and the committed combined table renders from its JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmarks.multivi_fidelity import METRICS, paired_differences
from benchmarks.multivi_fidelity_combine import (
    combine,
    goals,
    recorded_loads,
    report_markdown,
    sign_test_p,
    source_times,
    verdict,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
KEYS = [key for key, _, _ in METRICS]


def _report(seeds: list[int], rng: np.random.Generator, **meta) -> dict:
    rows = [
        {"tool": tool, "seed": s, "epochs": 10, "train_seconds": 1.0} | {k: float(rng.normal(1.0, 0.1)) for k in KEYS}
        for tool in ("atlasvi", "scvi-tools")
        for s in seeds
    ]
    base = {"same_start": True, "same_split": True, "train_seed_offset": 0, "train_fields": {"max_epochs": 10}}
    return {"meta": base | {"load_average_at_start": [3.0, 2.0, 1.0]} | meta, "rows": rows}


def test_verdict_reads_lower_nats_and_higher_scores_as_better():
    assert verdict("heldout_reconstruction_rna", [-5.0, -1.0], -3.0, 0.01) == "atlasvi better (95% CI excludes 0)"
    assert (
        verdict("heldout_reconstruction_atac", [1.0, 5.0], 3.0, 0.01) == "atlasvi below scvi-tools (95% CI excludes 0)"
    )
    assert verdict("knn_accuracy", [0.001, 0.02], 0.01, 0.01) == "atlasvi better (95% CI excludes 0)"
    assert verdict("expression_r_per_cell", [-0.002, -0.001], -0.001, 0.01).startswith("atlasvi below scvi-tools (95%")
    assert verdict("accessibility_auroc", [-0.001, 0.002], 0.0, 0.5) == "equal within noise (95% CI contains 0)"
    by_rank = "by rank (signed-rank p < 0.05), within noise by t (95% CI contains 0)"
    assert verdict("heldout_reconstruction_rna", [-3.0, 14.8], 1.3, 0.016) == f"atlasvi below scvi-tools {by_rank}"
    assert verdict("knn_accuracy", [-0.001, 0.02], 0.01, 0.02) == f"atlasvi better {by_rank}"


def test_combine_tags_sources_and_rejects_other_designs_and_repeats():
    rng = np.random.default_rng(0)
    rows, common = combine({"a": _report([0, 1], rng), "b": _report([2], rng)})
    assert [(r["source"], r["seed"]) for r in rows if r["tool"] == "atlasvi"] == [("a", 0), ("a", 1), ("b", 2)]
    assert common == {"train_fields": {"max_epochs": 10}, "knn_cell_order": None, "heldout_scorer": None}
    with pytest.raises(SystemExit, match="not a --same-start --same-split"):
        combine({"a": _report([0], rng, same_split=False)})
    with pytest.raises(SystemExit, match="not a --same-start --same-split"):
        combine({"a": _report([0], rng, train_seed_offset=100)})
    with pytest.raises(SystemExit, match="was run with"):
        combine({"a": _report([0], rng), "b": _report([1], rng, train_fields={"max_epochs": 20})})
    with pytest.raises(SystemExit, match="repeats atlasvi's seed 1"):
        combine({"a": _report([0, 1], rng), "b": _report([1], rng)})
    new = {"knn_cell_order": "cell name", "heldout_scorer": "one"}
    _, common = combine({"a": _report([0], rng, **new), "b": _report([1], rng, **new)})
    assert common["knn_cell_order"] == "cell name" and common["heldout_scorer"] == "one"
    with pytest.raises(SystemExit, match="scores kNN in cell order None, the others in 'cell name'"):
        combine({"a": _report([0], rng, **new), "b": _report([1], rng, heldout_scorer="one")})
    with pytest.raises(SystemExit, match="scores held-out cells by None, the others by 'one'"):
        combine({"a": _report([0], rng, **new), "b": _report([1], rng, knn_cell_order="cell name")})


def test_recorded_loads_are_the_start_then_each_rows_end():
    report = _report([0], np.random.default_rng(1))
    assert recorded_loads(report) == [3.0]
    report["rows"][0]["load_average_at_end"] = [7.5, 6.0, 5.0]
    assert recorded_loads(report) == [3.0, 7.5]


def test_source_times_are_the_runs_start_last_finish_and_commit_where_recorded():
    report = _report([0], np.random.default_rng(1))
    assert source_times(report) == {"code_commit": None, "started_utc": None, "finished_utc": None}
    report["meta"] |= {"code_commit": "abc", "started_utc": "2026-12-07T17:10:55Z"}
    report["rows"][0]["finished_utc"] = "2026-12-07T17:16:01Z"
    report["rows"][1]["finished_utc"] = "2026-12-07T17:24:40Z"
    assert source_times(report) == {
        "code_commit": "abc",
        "started_utc": "2026-12-07T17:10:55Z",
        "finished_utc": "2026-12-07T17:24:40Z",
    }


def test_sign_test_counts_signs_and_drops_ties():
    assert sign_test_p(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -1.0])) == pytest.approx(18 / 256)  # 7 of 8
    assert sign_test_p(np.array([0.0, 0.0, 2.0, -2.0])) == pytest.approx(1.0)  # ties dropped: 1 of 2
    assert sign_test_p(np.array([3.0, 1.0, 0.0])) == pytest.approx(0.5)  # 2 of 2 non-zero
    assert sign_test_p(np.zeros(4)) == 1.0


def test_goals_match_scipys_paired_tests():
    rows, _ = combine({"a": _report(list(range(8)), np.random.default_rng(2))})
    diffs = paired_differences(rows)
    out = goals(rows, diffs)
    for key in ("heldout_reconstruction_rna", "knn_accuracy"):
        a = np.array([r[key] for r in rows if r["tool"] == "atlasvi"])
        b = np.array([r[key] for r in rows if r["tool"] == "scvi-tools"])
        assert out[key]["mean"] == pytest.approx((a - b).mean())
        assert out[key]["median"] == pytest.approx(np.median(a - b))
        assert out[key]["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert out[key]["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a - b).pvalue)
        positive = int(np.sum(a - b > 0))
        assert out[key]["p_sign"] == pytest.approx(stats.binomtest(positive, len(a), 0.5).pvalue)
        assert out[key]["scvi_tools_mean"] == pytest.approx(b.mean())
    nats, knn = out["heldout_reconstruction_rna"], out["knn_accuracy"]
    d_nats = np.array([diffs["per_seed"][s]["heldout_reconstruction_rna"] for s in range(8)])
    assert nats["seeds_favouring_atlasvi"] == int((d_nats < 0).sum())
    assert nats["worst_bound"] == nats["ci95"][1] and knn["worst_bound"] == knn["ci95"][0]


@pytest.mark.parametrize(
    ("name", "pairs"),
    [("multivi_fidelity_paired12", 12), ("multivi_fidelity_one_scorer4", 4), ("multivi_fidelity_one_scorer12", 12)],
)
def test_committed_combined_table_renders_from_its_json(name, pairs):
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    assert report_markdown(payload) == (RESULTS / f"{name}.md").read_text()
    diffs = paired_differences(payload["rows"])
    assert json.loads(json.dumps(diffs)) == payload["paired_differences"]
    assert json.loads(json.dumps(goals(payload["rows"], diffs))) == payload["goals"]
    assert payload["meta"]["n_pairs"] == len(diffs["per_seed"]) == pairs


@pytest.mark.parametrize("name", ["multivi_fidelity_one_scorer4", "multivi_fidelity_one_scorer12"])
def test_one_scorer_pairs_keep_each_tools_own_figures_beside_the_one_scorers(name):
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    assert payload["meta"]["heldout_scorer"].startswith("scvi-tools' get_reconstruction_error on both tools'")
    assert payload["meta"]["knn_cell_order"] == "cell name"
    for row in payload["rows"]:  # one draw vs the 50-draw mean: within a nat per cell, not equal
        assert 0 < abs(row["heldout_reconstruction_rna_own_one_draw"] - row["heldout_reconstruction_rna"]) < 1.0
