"""benchmarks/multivi_streams.py's figures: the hypergeometric law of a batch's group counts, and a run's stream
summary (permutations, group counts, a cell's noise paired across epochs, dropout shares)."""

import json

import numpy as np
import pytest
from scipy import stats

from benchmarks import multivi_streams as streams


def test_hypergeometric_moments_are_scipys():
    mean, variance = streams._hypergeometric(128, 2139, 715)
    law = stats.hypergeom(2139, 715, 128)
    assert mean == pytest.approx(law.mean()) and variance == pytest.approx(law.var())


def _record(second_epoch: list[list[str]], noise: dict[str, list[float]]) -> dict:
    steps = [["a", "b"], ["c", "d"], *second_epoch]
    cells = np.empty(len(steps), dtype=object)
    cells[:] = [np.array(s) for s in steps]
    return {
        "cells": cells,
        "kl_weights": np.array([0.0, 0.0, 0.5, 0.5]),
        "joint": np.array([noise[c] for step in steps for c in step]),
        "kept": json.dumps({"layer": [0.9, 0.8]}),
        "both_kept": np.array([0.8, 0.82]),
    }


def test_stream_summary_pairs_a_cells_noise_across_epochs_by_name():
    groups = {"a": "x", "b": "x", "c": "y", "d": "y"}
    noise = {"a": [1.0, -1.0], "b": [2.0, 0.5], "c": [-0.5, 0.0], "d": [0.0, 3.0]}
    summary = streams.stream_summary(_record([["d", "a"], ["b", "c"]], noise), groups, 2, batch_size=2)
    assert summary["steps_per_epoch"] == [2, 2] and summary["batch_sizes_epoch_0"] == [2, 2]
    assert summary["every_epoch_a_permutation_of_the_training_cells"]
    # the same noise for a cell in both epochs, at other positions: paired by name, r = 1
    assert summary["joint_noise"]["same_cell_consecutive_epochs_correlation"] == pytest.approx(1.0)
    x = summary["group_counts_per_full_batch"]["x"]  # x cells per batch: 2, 0, 1, 1
    assert x["mean"] == 1.0 and x["variance"] == pytest.approx(2 / 3)
    assert (x["hypergeometric_mean"], x["hypergeometric_variance"]) == pytest.approx((1.0, 1 / 3))
    assert summary["dropout_kept_share"] == {"layer": {"calls": 2, "mean": pytest.approx(0.85)}}
    assert summary["classifier_first_layer_kept_by_both_calls"] == pytest.approx(0.81)
    repeated = streams.stream_summary(_record([["a", "a"], ["b", "c"]], noise), groups, 2, batch_size=2)
    assert not repeated["every_epoch_a_permutation_of_the_training_cells"]


def test_committed_streams_table_renders_from_its_json():
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    result = json.loads((results / "multivi_streams.json").read_text())
    assert streams.markdown(result) == (results / "multivi_streams.md").read_text()
    atlasvi, scvi = result["tools"]["atlasvi"], result["tools"]["scvi_tools"]
    assert atlasvi["steps_per_epoch"] == scvi["steps_per_epoch"] and atlasvi["training_cells"] == scvi["training_cells"]
