"""benchmarks/multivi_fidelity.py: the split, the two imputation scores, and the committed table renders from its
JSON; benchmarks/multivi_atlas.py's table renders from its JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import roc_auc_score

from benchmarks import multivi_atlas
from benchmarks.multivi_fidelity import auroc, expression_correlation, markdown, split

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


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
