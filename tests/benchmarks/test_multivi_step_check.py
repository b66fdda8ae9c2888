"""The many-step check's helpers (benchmarks/multivi_step_check.py --steps): the reordered reference run takes every
per-cell input and its noise row in one order; the step differences are relative to each tensor's largest entry."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasvi.models.multivi.module import MULTIVIInputs
from benchmarks import multivi_step_check as check

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_reference_reorders_every_per_cell_input_alike():
    n = 5
    inputs = MULTIVIInputs(
        x=torch.arange(n * 3.0).view(n, 3), atac=torch.arange(n * 2.0).view(n, 2), rna_mask=torch.arange(n) % 2 == 0,
        atac_mask=torch.arange(n) % 3 == 0, batch_index=torch.arange(n), labels=None,
        categorical=(torch.arange(n) * 10,), continuous=torch.arange(n * 1.0).view(n, 1), rows=torch.arange(n) + 100,
    )  # fmt: skip
    order = torch.tensor([3, 0, 4, 1, 2])
    reordered = check._reordered(inputs, order)
    for field in dataclasses.fields(inputs):
        before, after = getattr(inputs, field.name), getattr(reordered, field.name)
        if before is None:
            assert after is None
        elif isinstance(before, tuple):
            assert all(torch.equal(a, b[order]) for a, b in zip(after, before, strict=True))
        else:
            assert torch.equal(after, before[order]), field.name
    assert reordered.rows.tolist() == [103, 100, 104, 101, 102]


def test_step_differences_are_relative_to_each_tensors_largest_entry_per_step():
    a = {"sample|w": np.array([[1.0, -2.0], [1.0, -4.0]]), "sample|b": np.array([[0.5], [0.5]])}
    b = {"sample|w": np.array([[1.0, -2.0], [1.0, -3.0]]), "sample|b": np.array([[0.5], [0.75]])}
    for record, loss in ((a, [10.0, 8.0]), (b, [10.0, 6.0])):
        record |= {"loss": np.array(loss), "kl_weight": np.array([0.0, 0.2])}

    class Npz(dict):
        files = property(lambda self: list(self))

    diffs = check._step_differences(Npz(a), Npz(b))
    assert diffs["weights_largest"] == [0.0, 0.5]  # step 1: b |0.25| / 0.5 beats w |1| / 4
    assert diffs["weights_largest_tensor"][1] == "b"
    assert diffs["weights_median"] == [0.0, pytest.approx((0.25 + 0.5) / 2)]
    assert diffs["loss_relative"] == [0.0, 0.25] and diffs["kl_weight_largest_diff"] == 0.0
    with pytest.raises(SystemExit, match="one run only"):
        check._step_differences(Npz(a), Npz({k: v for k, v in b.items() if k != "sample|b"}))


def test_committed_many_step_table_renders_from_its_json():
    report = json.loads((RESULTS / "multivi_step_check_steps.json").read_text())
    assert check.steps_markdown(report) == (RESULTS / "multivi_step_check_steps.md").read_text()
    assert report["meta"]["steps"] == len(report["losses"]["atlasvi"]) == len(report["losses"]["scvi_tools"])
