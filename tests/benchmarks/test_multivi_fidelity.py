"""benchmarks/multivi_fidelity.py: the split, the two imputation scores, the paired differences, and the committed
tables render from their JSON; benchmarks/multivi_atlas.py's and benchmarks/multivi_init_distribution.py's too."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import roc_auc_score

from benchmarks import multivi_atlas, multivi_cross_score, multivi_init_distribution
from benchmarks.fidelity_data import knn_accuracy
from benchmarks.multivi_fidelity import (
    METRICS,
    _row,
    auroc,
    code_commit,
    expression_correlation,
    markdown,
    merged_rows,
    paired_differences,
    split,
    utc_now,
    with_scores,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_a_run_records_its_code_commit_dirty_or_not_and_utc_times(tmp_path, monkeypatch):
    import benchmarks.multivi_fidelity as fidelity

    monkeypatch.setattr(fidelity, "HERE", tmp_path)
    assert code_commit() is None  # not a git checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert code_commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_commit() == f"{head}-dirty"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now())


def test_the_split_holds_out_a_tenth_and_thirds_the_rest_disjointly():
    parts = split(2641)
    assert {k: len(v) for k, v in parts.items()} == {"heldout": 264, "expression": 792, "accessibility": 792,
                                                     "paired": 793}  # fmt: skip
    together = np.concatenate(list(parts.values()))
    assert len(np.unique(together)) == 2641 and together.min() == 0 and together.max() == 2640
    assert all((np.diff(v) > 0).all() for v in parts.values())


def test_auroc_is_sklearns_over_every_entry_and_per_cell():
    rng = np.random.default_rng(0)
    peaks = sp.csr_matrix(rng.poisson(0.3, size=(20, 40)))
    probabilities = np.clip(peaks.toarray() * 0.3 + rng.uniform(0, 0.6, size=(20, 40)), 0, 1)
    overall, per_cell = auroc(probabilities, peaks)
    opened = peaks.toarray() > 0
    assert overall == pytest.approx(roc_auc_score(opened.ravel(), probabilities.ravel()))
    assert per_cell == pytest.approx(np.mean([roc_auc_score(o, p) for o, p in zip(opened, probabilities, strict=True)]))


def test_expression_correlation_is_scipys_on_log1p_of_normalised_counts():
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(3, size=(30, 12)))
    imputed = rng.dirichlet(np.ones(12), size=30)
    per_gene, per_cell = expression_correlation(imputed, counts)
    dense = counts.toarray()
    a, b = np.log1p(1e4 * imputed), np.log1p(1e4 * dense / dense.sum(1, keepdims=True))
    assert per_gene == pytest.approx(np.mean([stats.pearsonr(a[:, j], b[:, j])[0] for j in range(12)]))
    assert per_cell == pytest.approx(np.mean([stats.pearsonr(a[i], b[i])[0] for i in range(30)]))


def test_committed_tables_render_from_their_json():
    report = json.loads((RESULTS / "multivi_fidelity.json").read_text())
    assert markdown(report["rows"], report["meta"]) == (RESULTS / "multivi_fidelity.md").read_text()
    assert {r["tool"] for r in report["rows"]} == {"atlasvi", "scvi-tools"}
    memory = json.loads((RESULTS / "multivi_memory.json").read_text())
    assert multivi_atlas.markdown(memory["rows"], memory["command"]) == (RESULTS / "multivi_memory.md").read_text()
    assert {r["peaks"] for r in memory["rows"]} == {52761}


def test_knn_reads_both_tools_latents_in_one_cell_order():
    rng = np.random.default_rng(3)
    labels = np.repeat(["0", "2", "24"], 20)
    latent = rng.normal(size=(60, 3)) + np.repeat([0.0, 1.0, 2.0], 20)[:, None]  # some signal, imperfect kNN
    cells = np.array([f"cell{i:02d}" for i in range(60)])
    order = rng.permutation(60)  # another tool's order of the same cells (atlasvi's store permutes its rows)
    peaks = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 1, 0, 0], [1, 1, 0, 1]]))
    counts = sp.csr_matrix(np.array([[3, 0, 1], [0, 2, 5], [1, 1, 0]]))
    fixed = ("atlasvi", 0, {"rna": 1.0, "atac": 2.0}, rng.random((3, 4)), peaks, rng.random((3, 3)), counts)
    one = _row(*fixed, latent, labels, cells, 10, 1.0)["knn_accuracy"]
    other = _row(*fixed, latent[order], labels[order], cells[order], 10, 1.0)["knn_accuracy"]
    assert one == other
    assert knn_accuracy(latent[order], labels[order]) != knn_accuracy(latent, labels)  # the folds follow the order


def test_with_scores_moves_each_tools_own_figures_aside_once():
    rows = [
        {"tool": t, "seed": s, "heldout_reconstruction_rna": 10.0 + s, "heldout_reconstruction_atac": 20.0 + s}
        for t in ("atlasvi", "scvi-tools")
        for s in (0, 1)
    ]
    scores = {"atlasvi": {"rna": 1.0, "atac": 2.0}, "scvi-tools": {"rna": 3.0, "atac": 4.0}}
    out = with_scores(rows, 1, scores)
    assert out[0] == rows[0] and out[2] == rows[2]  # seed 0 untouched
    assert out[1]["heldout_reconstruction_rna"] == 1.0 and out[3]["heldout_reconstruction_atac"] == 4.0
    assert out[1]["heldout_reconstruction_rna_own_one_draw"] == 11.0
    assert out[3]["heldout_reconstruction_atac_own_one_draw"] == 21.0
    again = with_scores(out, 1, {t: {"rna": 5.0, "atac": 6.0} for t in scores})  # a second rescore
    assert again[1]["heldout_reconstruction_rna_own_one_draw"] == 11.0 and again[1]["heldout_reconstruction_rna"] == 5.0


def test_committed_cross_score_renders_from_its_json():
    report = json.loads((RESULTS / "multivi_cross_score_s0.json").read_text())
    assert multivi_cross_score.markdown(report) == (RESULTS / "multivi_cross_score_s0.md").read_text()
    scores = report["scores"]
    for weights in ("atlasvi", "scvi-tools"):  # the gap follows the weights: both scorers agree on each model
        assert abs(scores["atlasvi"][weights]["z_mean"] - scores["scvi-tools"][weights]["z_mean"]) < 0.01


def test_paired_differences_are_atlasvi_minus_scvi_tools_per_seed_both_ran():
    rows = []
    for seed, (ours, theirs) in enumerate([(1700.0, 1650.0), (1600.0, 1630.0), (1500.0, 1480.0)]):
        for tool, rna in (("atlasvi", ours), ("scvi-tools", theirs)):
            rows.append({"tool": tool, "seed": seed} | {k: 0.5 for k, _, _ in METRICS} | {METRICS[0][0]: rna})
    rows.append({"tool": "atlasvi", "seed": 7} | {k: 9.0 for k, _, _ in METRICS})  # no scvi-tools run: left out
    diffs = paired_differences(rows)
    assert list(diffs["per_seed"]) == [0, 1, 2]
    rna = diffs["summary"][METRICS[0][0]]
    assert [diffs["per_seed"][s][METRICS[0][0]] for s in range(3)] == [50.0, -30.0, 20.0]
    assert (rna["mean"], rna["sd"]) == (pytest.approx(40 / 3), pytest.approx(np.std([50, -30, 20], ddof=1)))
    assert rna["se"] == pytest.approx(rna["sd"] / np.sqrt(3)) and rna["t"] == pytest.approx(rna["mean"] / rna["se"])
    assert rna["ci95"] == pytest.approx(list(stats.t.interval(0.95, 2, loc=rna["mean"], scale=rna["se"])))
    assert diffs["summary"][METRICS[1][0]] == {"mean": 0.0, "sd": 0.0, "se": 0.0, "t": None, "ci95": [0.0, 0.0]}
    one = paired_differences([r for r in rows if r["seed"] == 0])["summary"][METRICS[0][0]]
    assert (one["mean"], one["se"], one["t"], one["ci95"]) == (50.0, None, None, None)


def test_merged_rows_keep_the_reused_tool_or_with_same_start_the_other_pairs_and_atlasvis_rows():
    paired = [{"tool": t, "seed": 0, "v": 1} for t in ("atlasvi", "scvi-tools")] + [{"tool": "atlasvi", "seed": 3}]
    table = [{"tool": t, "seed": s, "v": 2} for s in range(3) for t in ("atlasvi", "scvi-tools")]
    table += [{"tool": t, "seed": 5, "v": 2} for t in ("atlasvi", "scvi-tools")]  # an unpaired-design pair: not kept
    rows = merged_rows([(paired, True), (table, False)], [1, 2], "atlasvi", same_start=True)  # seed 3: no pair
    assert [(r["tool"], r["seed"], r["v"]) for r in rows] == [
        ("atlasvi", 0, 1), ("scvi-tools", 0, 1), ("atlasvi", 1, 2), ("atlasvi", 2, 2)
    ]  # fmt: skip
    assert [(r["tool"], r["seed"]) for r in merged_rows([(table, False)], [0], "scvi-tools", same_start=False)] == [
        ("scvi-tools", 0), ("scvi-tools", 1), ("scvi-tools", 2), ("scvi-tools", 5)
    ]  # fmt: skip


def test_init_distribution_compare_reads_shifted_draws_as_different():
    rng = np.random.default_rng(0)
    same = multivi_init_distribution.compare(rng.normal(size=200), rng.normal(size=200))
    a, b = rng.normal(size=200), rng.normal(1.0, 1, size=200)
    shifted = multivi_init_distribution.compare(a, b)
    assert same["ks_p"] > 0.05 and shifted["ks_p"] < 1e-6 and shifted["mannwhitney_p"] < 1e-6
    assert (shifted["atlasvi_mean"], shifted["scvi_tools_sd"]) == (
        pytest.approx(a.mean()),
        pytest.approx(b.std(ddof=1)),
    )
    assert multivi_init_distribution.compare(np.zeros(5), np.zeros(5))["ks_p"] == 1.0  # a fill: identical


@pytest.mark.parametrize(
    "name",
    [
        "multivi_fidelity_paired",
        "multivi_fidelity_paired_redraw",
        "multivi_fidelity_paired6",
        "multivi_fidelity_paired_split",
        "multivi_fidelity_same_split",
        "multivi_fidelity_same_split_redraw",
        "multivi_fidelity_same_split_s67",
        "multivi_fidelity_same_split_s89",
        "multivi_fidelity_same_split_s1011",
        "multivi_fidelity_one_scorer_s0",
        "multivi_fidelity_one_scorer_s123",
        "multivi_fidelity_one_scorer_s4",
        "multivi_fidelity_one_scorer_s5",
        "multivi_fidelity_one_scorer_s6",
        "multivi_fidelity_one_scorer_s7",
        "multivi_fidelity_one_scorer_s8",
        "multivi_fidelity_one_scorer_s12",
        "multivi_fidelity_one_scorer_s13",
        "multivi_fidelity_one_scorer_s14",
    ],
)
def test_committed_paired_table_renders_from_its_json(name):
    report = json.loads((RESULTS / f"{name}.json").read_text())
    assert report["meta"]["same_start"]
    assert markdown(report["rows"], report["meta"]) == (RESULTS / f"{name}.md").read_text()
    diffs = paired_differences(report["rows"])
    assert json.loads(json.dumps(diffs)) == report["paired_differences"]


def test_committed_init_distribution_renders_from_its_json():
    report = json.loads((RESULTS / "multivi_init_distribution.json").read_text())
    assert multivi_init_distribution.markdown(report) == (RESULTS / "multivi_init_distribution.md").read_text()
    assert report["entry_counts_differ"] == [] and report["n_seeds"] >= 100
