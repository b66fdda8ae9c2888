"""benchmarks/condscvi_step_check.py: the shared dropout masks, the one-ulp start and the final NLL summary."""

import numpy as np
import pytest
import torch

from benchmarks.condscvi_step_check import _SharedDropout, _ulp, nll_summary


def test_shared_dropout_masks_come_from_the_step_and_the_call_alone(monkeypatch):
    monkeypatch.setattr(torch.nn.Dropout, "forward", torch.nn.Dropout.forward)  # restored after the test
    first, second = torch.nn.Dropout(0.5), torch.nn.Dropout(0.5)
    x = torch.ones(64, 32)

    def one_step() -> tuple[torch.Tensor, torch.Tensor]:
        _SharedDropout.start()
        return first(x), second(x)

    _SharedDropout.install()
    a0, b0 = one_step()
    a1, _ = one_step()
    assert set(torch.unique(a0).tolist()) == {0.0, 2.0}  # kept entries scaled by 1 / (1 - p)
    assert 0.4 < float((a0 == 0).float().mean()) < 0.6
    assert not torch.equal(a0, b0) and not torch.equal(a0, a1)  # another call, another step: another mask
    assert _SharedDropout.shapes == [(64, 32), (64, 32)]  # the calls of the first step
    _SharedDropout.install()  # a new run: its steps count from 0 again, other layers get the same masks
    third = torch.nn.Dropout(0.5)
    _SharedDropout.start()
    assert torch.equal(third(x), a0) and torch.equal(first(x), b0)
    third.eval()
    assert torch.equal(third(x), x)


def test_ulp_moves_every_parameter_by_one_float32_rounding_step():
    weight = torch.tensor([[1.0, -3.0, 0.5], [2.0, 7.0, -1.0]])
    moved = _ulp({"w": weight}, seed=0)["w"]
    ratio = (moved.double() / weight.double() - 1) * 2**23
    assert set(ratio.round().view(-1).tolist()) == {-1.0, 1.0}
    assert torch.equal(_ulp({"w": weight}, seed=0)["w"], moved)


def test_nll_summary_pairs_each_cell_with_atlasvis():
    scores = {
        "labels": np.array([0, 0, 0, 1]),
        "label_names": ["a", "b"],
        "atlasvi": np.array([10.0, 20.0, 30.0, 100.0]),
        "scvi_tools": np.array([11.0, 19.0, 33.0, 90.0]),
    }
    out = nll_summary(scores, ("atlasvi", "scvi_tools"))
    assert out["mean"] == {"atlasvi": 40.0, "scvi_tools": 38.25}
    rows = {r["type"]: r for r in out["per_type"]["scvi_tools"]}
    assert list(rows) == ["all cells", "a", "b"]  # the most cells first
    assert rows["a"] == {"type": "a", "cells": 3, "atlasvi": 20.0, "other": 21.0, "median_gap": 1.0,
                         "share_above": pytest.approx(2 / 3)}  # fmt: skip
    assert rows["all cells"]["median_gap"] == 0.0 and rows["b"]["median_gap"] == -10.0
