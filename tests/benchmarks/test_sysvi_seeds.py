"""benchmarks/sysvi_seeds.py: merging seeds of several results, mean ± s.e., Welch's comparison and its verdict, and
the committed 6-seed Baron table renders from its JSON."""

import json
from pathlib import Path

import pytest

from benchmarks.sysvi_seeds import MODELS, difference, heldout, markdown, mean_se, merge, scvi_comparison, summarise

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def report(seeds: list[int], offset: float = 0.0) -> dict:
    scores = {f"{prefix}_s{s}": dict.fromkeys(("ilisi", "batch_entropy", "knn_accuracy", "nmi"), s / 10 + offset)
              for prefix, _ in MODELS for s in seeds}  # fmt: skip
    scores["atlasvi_sysvi-cw10_s0"] = dict.fromkeys(("ilisi", "batch_entropy", "knn_accuracy", "nmi"), 9.0)
    return {"datasets": {"baron": {"scores": scores}}}


def test_merge_takes_every_seed_once_and_leaves_other_cycle_weights_out():
    merged = merge([report([0, 1, 2]), report([2, 10, 3])], "baron")
    assert list(merged["atlasvi_sysvi"]) == ["0", "1", "2", "3", "10"]
    assert set(merged) == {prefix for prefix, _ in MODELS}
    with pytest.raises(SystemExit, match="different scores"):
        merge([report([0, 1]), report([1, 2], offset=0.5)], "baron")
    # atlasvi's rows from one input, scvi-tools' from another: their seeds may overlap with other scores
    only = [{"atlasvi_sysvi", "atlasvi_scvi"}, {"scvi-tools_sysvi", "scvi-tools_scvi"}]
    mixed = merge([report([0, 1], offset=0.5), report([0, 1])], "baron", only)
    assert mixed["atlasvi_sysvi"]["1"]["nmi"] == 0.6 and mixed["scvi-tools_sysvi"]["1"]["nmi"] == 0.1


def test_mean_and_standard_error():
    stats = mean_se([1.0, 2.0, 3.0, 6.0])
    assert stats["mean"] == 3.0
    assert stats["sd"] == pytest.approx(2.160247, rel=1e-6)
    assert stats["se"] == pytest.approx(2.160247 / 2, rel=1e-6)


def test_welch_difference_and_verdicts():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.81, 0.85, 0.86]
    d = difference(a, b)
    assert d["diff"] == pytest.approx(0.92 - 0.83)
    se_a2, se_b2 = 0.0004 / 3, 0.0026 / 3 / 4  # sample variances 0.0008 / 2 and 0.0026 / 3
    assert d["se"] == pytest.approx((se_a2 + se_b2) ** 0.5)
    assert d["df"] == pytest.approx((se_a2 + se_b2) ** 2 / (se_a2**2 / 2 + se_b2**2 / 3))
    assert d["low"] > 0 and d["verdict"] == "above"
    assert difference(b, a)["verdict"] == "below"
    assert difference([0.5, 0.7, 0.6], [0.55, 0.65, 0.62])["verdict"] == "equal within noise"
    # every a below every b: 2 of the C(6, 3) = 20 orderings are as extreme, two-sided
    assert difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])["mann_whitney_p"] == pytest.approx(0.1)


def test_summary_compares_the_sysvis_on_every_metric_and_against_scvi_on_mixing():
    summary = summarise(merge([report([0, 1, 2])], "baron"))
    pairs = [(c["a"], c["b"], c["metric"]) for c in summary["comparisons"]]
    assert pairs[:4] == [("atlasvi sysVI", "scvi-tools SysVI", m) for m in ("ilisi", "batch_entropy", "knn_accuracy",
                                                                            "nmi")]  # fmt: skip
    assert len(pairs) == 4 + 2 * 2 * 2
    assert summary["models"]["atlasvi scVI"]["nmi"]["values"] == [0.0, 0.1, 0.2]


@pytest.mark.parametrize("name", ["sysvi_baron_6seeds", "sysvi_baron_6seeds_954411a"])
def test_committed_table_renders_from_its_json(name):
    committed = json.loads((RESULTS / f"{name}.json").read_text())
    assert markdown(committed) == (RESULTS / f"{name}.md").read_text()
    assert summarise(committed["scores"]) == committed["summary"]
    assert {len(m["seeds"]) for m in committed["summary"]["models"].values()} == {6}


def test_scvi_comparison_covers_every_metric_and_the_elbo_of_the_runs_that_saved_it():
    reports = [report([0, 1, 2]), report([3, 4], offset=0.05)]
    reports[1]["datasets"]["baron"]["runs"] = {
        "atlasvi_scvi_s3": {"heldout_neg_elbo": 990.0}, "atlasvi_scvi_s4": {"heldout_neg_elbo": 994.0},
        "scvi-tools_scvi_s3": {"heldout_neg_elbo": 1000.0}, "scvi-tools_scvi_s4": {"heldout_neg_elbo": 1002.0},
        "atlasvi_sysvi_s3": {"seconds": 1.0},
    }  # fmt: skip
    merged = merge(reports, "baron")
    elbo = heldout(reports, "baron")
    assert elbo["atlasvi_scvi"] == {"3": 990.0, "4": 994.0} and elbo["atlasvi_sysvi"] == {}
    out = scvi_comparison(merged, elbo)
    assert list(out) == ["ilisi", "batch_entropy", "knn_accuracy", "nmi", "heldout_neg_elbo"]
    assert out["nmi"]["seeds"]["atlasvi scVI"] == [0, 1, 2, 3, 4] and out["nmi"]["diff"] == 0.0
    assert out["heldout_neg_elbo"]["diff"] == pytest.approx(992.0 - 1001.0)
    assert out["heldout_neg_elbo"]["stats"]["scvi-tools scVI"]["n"] == 2
    # one seed with an ELBO is too few to compare: left out
    del reports[1]["datasets"]["baron"]["runs"]["scvi-tools_scvi_s4"]
    assert "heldout_neg_elbo" not in scvi_comparison(merged, heldout(reports, "baron"))


def test_committed_12_seed_scvi_table_renders_from_its_json():
    committed = json.loads((RESULTS / "sysvi_baron_12seeds_scvi.json").read_text())
    assert markdown(committed) == (RESULTS / "sysvi_baron_12seeds_scvi.md").read_text()
    assert summarise(committed["scores"]) == committed["summary"]
    seeds = {label: len(m["seeds"]) for label, m in committed["summary"]["models"].items()}
    assert seeds == {"atlasvi sysVI": 6, "scvi-tools SysVI": 6, "atlasvi scVI": 12, "scvi-tools scVI": 12}
    assert committed["scvi"]["heldout_neg_elbo"]["stats"]["atlasvi scVI"]["n"] == 6
