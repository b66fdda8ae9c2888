"""benchmarks/totalvi_paired.py: the paired statistics, the weight names, the zero-gradient biases, and the committed
table renders from its JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from torch import nn

from benchmarks.totalvi_paired import METRICS, _zero_by_construction, markdown, paired_summary, weight_name

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_paired_summary_is_scipys_paired_t_over_the_seeds_both_tools_ran():
    rng = np.random.default_rng(0)
    ours, theirs = rng.normal(0.88, 0.01, (5, 3)), rng.normal(0.88, 0.01, (6, 3))  # scvi-tools ran a 6th seed
    rows = [{"tool": "atlasvi", "seed": s} | dict(zip(METRICS, v, strict=True)) for s, v in enumerate(ours)]
    rows += [{"tool": "scvi-tools", "seed": s} | dict(zip(METRICS, v, strict=True)) for s, v in enumerate(theirs)]
    summary = paired_summary(rows)
    assert summary["seeds"] == [0, 1, 2, 3, 4]
    for j, metric in enumerate(METRICS):
        expected = stats.ttest_rel(ours[:, j], theirs[:5, j])
        assert summary[metric]["t"] == pytest.approx(expected.statistic)
        assert summary[metric]["mean_difference"] == pytest.approx(np.mean(ours[:, j] - theirs[:5, j]))
        assert summary[metric]["se_difference"] == pytest.approx(np.std(ours[:, j] - theirs[:5, j], ddof=1) / 5**0.5)
        assert summary[metric]["ci95"] == pytest.approx(list(expected.confidence_interval(0.95)))


def test_weight_names_map_scvi_tools_module_and_classifier():
    assert (
        weight_name("classifier|classifier.0.fc_layers.Layer 1.0.weight") == "adversary.classifier.0.layers.1.0.weight"
    )
    assert weight_name("classifier|classifier.1.bias") == "adversary.classifier.1.bias"
    assert (
        weight_name("encoder.encoder.fc_layers.Layer 0.1.running_mean") == "z_encoder.encoder.layers.0.1.running_mean"
    )
    assert weight_name("encoder.l_gene_encoder.fc_layers.Layer 0.0.weight") is None  # scvi-tools' unused heads
    assert weight_name("background_pro_alpha") == "background_pro_alpha"


def test_zero_gradient_biases_are_those_of_linear_layers_before_a_batch_norm():
    block = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    head = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    model = nn.Sequential(nn.Sequential(block, nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))), head)
    assert _zero_by_construction(model) == {"0.0.0.bias"}


def test_committed_paired_table_renders_from_its_json():
    report = json.loads((RESULTS / "totalvi_paired.json").read_text())
    assert markdown(report) == (RESULTS / "totalvi_paired.md").read_text()
    step = report["step"]["summary"]
    assert step["tensors_compared_after_the_step"] == step["atlasvi_tensors"]  # every atlasvi weight and buffer
    recipe = report["step"]["recipe"]  # TOTALVI.fit()'s defaults are TOTALVI.train's, batch size 256 included
    assert recipe["atlasvi"] == recipe["scvi_tools"] and recipe["differing"] == []
    assert recipe["atlasvi"]["batch_size"] == 256
    if "paired" in report:
        summary = report["paired"]["summary"]
        assert len(summary["seeds"]) >= 5
        rows = report["paired"]["rows"]
        assert paired_summary(rows) == summary
