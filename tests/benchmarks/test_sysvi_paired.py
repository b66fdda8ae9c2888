"""benchmarks/sysvi_paired.py: the split, the paired differences, and the committed table renders from its JSON."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from atlasvi.data.sampler import split_rows
from benchmarks.sysvi_paired import init_check, markdown, paired_summary, split

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("n_cells", [328, 1021, 10])
def test_split_is_atlasvis_training_rows(n_cells):
    assert split(n_cells) == split_rows(n_cells, 0.1)[0][1]


def test_paired_differences_and_t():
    metrics = {"ilisi": 0.0, "batch_entropy": 0.0, "knn_accuracy": 0.0, "nmi": 0.0}
    scores = {}
    for s, (theirs, own, cross) in enumerate([(0.5, 0.6, 0.4), (0.7, 0.7, 0.6), (0.6, 0.8, 0.4)]):
        scores[f"scvi-tools_s{s}"] = metrics | {"ilisi": theirs}
        scores[f"atlasvi-own_system_s{s}"] = metrics | {"ilisi": own}
        scores[f"atlasvi-cross_system_s{s}"] = metrics | {"ilisi": cross}
    own = paired_summary(scores, [0, 1, 2])["own_system"]["ilisi"]
    assert own["differences"] == pytest.approx([0.1, 0.0, 0.2])
    assert own["mean_difference"] == pytest.approx(0.1)
    assert own["sd_difference"] == pytest.approx(0.1)
    assert own["t"] == pytest.approx(0.1 / (0.1 / math.sqrt(3)))
    cross = paired_summary(scores, [0, 1, 2])["cross_system"]["ilisi"]
    assert cross["mean_difference"] == pytest.approx(-0.4 / 3) and cross["t"] < 0


def test_init_check_z_scores():
    rng = np.random.default_rng(0)
    same = {"w": np.stack([rng.normal(0, 1e-3, 400), rng.normal(0.1, 1e-3, 400)], axis=1)}
    other = {"w": np.stack([rng.normal(0, 1e-3, 400), rng.normal(0.1, 1e-3, 400)], axis=1)}
    wider = {"w": np.stack([rng.normal(0, 1e-3, 400), rng.normal(0.11, 1e-3, 400)], axis=1)}
    assert abs(init_check(same, other)["w"]["z_sd"]) < 4
    assert init_check(same, wider)["w"]["z_sd"] > 50  # atlasvi (second) wider than scvi-tools (first)
    with pytest.raises(SystemExit, match="parameters differ"):
        init_check(same, {"v": same["w"]})


def test_committed_table_renders_from_its_json():
    report = json.loads((RESULTS / "sysvi_paired.json").read_text())
    assert markdown(report) == (RESULTS / "sysvi_paired.md").read_text()
    assert report["init"]["same_seed_identical"]
    assert report["step"]["gradient_max_relative_diff"] < 1e-3  # the same training step as scvi-tools
    paired = report["paired"]
    assert len(paired["seeds"]) >= 3
    assert paired_summary(paired["scores"], paired["seeds"]) == paired["summary"]
