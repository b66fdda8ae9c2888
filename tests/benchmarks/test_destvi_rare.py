"""benchmarks/destvi_rare.py: the prototype mixtures, the per-type figures, and the committed table renders from its
JSON."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.destvi_rare import _mixture_profiles, metrics, overall_nll, render

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_mixture_profiles_weigh_each_types_decoded_prototypes():
    # 2 types x 2 prototypes in 1 latent dimension; the decoder puts all expression on gene 0 for z < 0, gene 1 else
    def decode(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        assert labels.tolist() == [0, 0, 1, 1]
        return np.where(z < 0, [1.0, 0.0], [0.0, 1.0])

    means = np.array([[[-1.0], [1.0]], [[1.0], [2.0]]])
    weights = np.array([[0.25, 0.75], [1.0, 0.0]])
    assert _mixture_profiles(decode, means, weights) == pytest.approx(np.array([[0.25, 0.75], [0.0, 1.0]]))


def test_metrics_leave_out_cells_not_named_and_read_the_markers_share():
    data = {
        "types": np.array(["a", "b"]),
        "genes": np.array(["g0", "g1"]),
        "cells": np.array(["c0", "c1", "c2"]),
        "labels": np.array([0, 0, 1]),
        "nll": np.array([10.0, 1000.0, 5.0]),
        "scale": np.array([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8]]),
        "mp_vprior": np.array([[1.0, 0.0], [0.5, 0.5]]),
        "profile_spatial": np.array([[0.6, 0.4], [0.3, 0.7]]),
        "beta": np.array([0.1, -0.2]),
        "proportions": np.array([[0.3, 0.1, 0.1], [0.1, 0.3, 0.0]]),  # the dummy type last, unnormalised
    }
    observed = np.array([[0.7, 0.3], [0.1, 0.9]])
    out = metrics(data, observed, {"a": ["g0", "missing"]}, np.array(["c2", "c0"]))
    assert out["a"]["n_cells"] == 1 and out["a"]["reference_nll"] == 10.0  # c1 is left out
    assert (
        out["a"]["marker_share_decoded"] == 0.6
        and out["a"]["profile_r"] == pytest.approx(1.0)
        and out["a"]["marker_share_prototypes"] == 0.6
    )
    assert out["a"]["marker_share_observed"] == 0.7 and out["a"]["beta_markers"] == pytest.approx(0.1)
    assert out["a"]["proportion_mean"] == pytest.approx((0.75 + 0.25) / 2) and out["b"]["n_prototypes"] == 2
    assert "marker_share_decoded" not in out["b"] and out["_dummy_share"] == pytest.approx((0.2 + 0.0) / 2)


def test_overall_nll_weighs_each_types_mean_by_its_cells():
    runs = [
        {"a": {"n_cells": 3, "reference_nll": 10.0}, "b": {"n_cells": 1, "reference_nll": 30.0}, "_dummy_share": 0.1},
        {"a": {"n_cells": 1, "reference_nll": 10.0}, "b": {"n_cells": 1, "reference_nll": 30.0}, "_dummy_share": 0.0},
    ]
    assert overall_nll(runs) == [15.0, 20.0]


def test_committed_rare_table_renders_from_its_json():
    results = json.loads((RESULTS / "destvi_rare_pdac.json").read_text())
    assert render(results) == (RESULTS / "destvi_rare_pdac.md").read_text()
