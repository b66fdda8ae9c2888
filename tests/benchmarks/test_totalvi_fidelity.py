"""benchmarks/totalvi_fidelity.py: the split, the imputation score, and the committed table renders from its JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmarks.totalvi_fidelity import imputation_pearson, markdown, split

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_split_holds_out_and_hides_a_tenth_each_disjointly():
    parts = split(8617)
    assert {k: len(v) for k, v in parts.items()} == {"heldout": 862, "rna_only": 862, "cite": 6893}
    together = np.concatenate(list(parts.values()))
    assert len(np.unique(together)) == 8617 and together.min() == 0 and together.max() == 8616
    assert all((np.diff(v) > 0).all() for v in parts.values())  # h5ad order kept within each part


def test_imputation_pearson_is_scipys_on_log1p_per_protein():
    rng = np.random.default_rng(0)
    observed = rng.poisson(20, size=(50, 3)).astype(float)
    imputed = observed * rng.uniform(0.5, 2, size=(50, 3)) + 1
    expected = [stats.pearsonr(np.log1p(imputed[:, j]), np.log1p(observed[:, j]))[0] for j in range(3)]
    assert imputation_pearson(imputed, observed) == pytest.approx(expected)
    assert imputation_pearson(observed, observed) == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", ["totalvi_fidelity", "totalvi_fidelity_no_adversary"])
def test_committed_table_renders_from_its_json(name):
    report = json.loads((RESULTS / f"{name}.json").read_text())
    assert markdown(report["rows"], report["meta"]) == (RESULTS / f"{name}.md").read_text()
    for tool, key in (("scvi-tools", "scvi_adversarial_classifier"), ("atlasvi", "atlasvi_adversarial_classifier")):
        adversary = report["meta"][key] != "off"
        assert all(r.get("adversarial_classifier", False) == adversary for r in report["rows"] if r["tool"] == tool)
    for tool in ("atlasvi", "scvi-tools"):
        rows = [r for r in report["rows"] if r["tool"] == tool]
        assert len(rows) >= 3 and len({r["seed"] for r in rows}) == len(rows)
        assert all(len(r["imputation_pearson"]) == 13 for r in rows)
