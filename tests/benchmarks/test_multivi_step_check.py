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


@pytest.mark.parametrize(
    "stem",
    ["multivi_step_check_steps"] + [f"multivi_step_check_steps_dropout{s}" for s in ("", "_seed2", "_seed4", "_seed7")],
)
def test_committed_many_step_table_renders_from_its_json(stem):
    report = json.loads((RESULTS / f"{stem}.json").read_text())
    assert check.steps_markdown(report) == (RESULTS / f"{stem}.md").read_text()
    assert report["meta"]["steps"] == len(report["losses"]["atlasvi"]) == len(report["losses"]["scvi_tools"])


def _scvi_like_encoder() -> torch.nn.Module:
    """scvi-tools' FCLayers layout (fc_layers."Layer i" = Linear, no batch norm, LayerNorm, LeakyReLU, Dropout)."""
    from collections import OrderedDict

    def block(n_in: int) -> torch.nn.Sequential:
        return torch.nn.Sequential(
            torch.nn.Linear(n_in, 4), None, torch.nn.LayerNorm(4), torch.nn.LeakyReLU(), torch.nn.Dropout(0.1)
        )

    encoder = torch.nn.Module()
    encoder.fc_layers = torch.nn.Sequential(OrderedDict([("Layer 0", block(6)), ("Layer 1", block(4))]))
    outer = torch.nn.Module()
    outer.z_encoder_expression = torch.nn.Module()
    outer.z_encoder_expression.encoder = encoder
    return outer


def _atlasvi_like_encoder() -> torch.nn.Module:
    from atlasvi.nn import FCLayers

    outer = torch.nn.Module()
    outer.z_encoder_expression = torch.nn.Module()
    outer.z_encoder_expression.encoder = FCLayers(6, 4, (), 2, 4, 0.1, False, True, activation=torch.nn.LeakyReLU)
    return outer


def test_both_tools_dropout_layers_get_one_name_each():
    from benchmarks.multivi_weights_check import atlasvi_name

    scvi_names = check._dropout_names(_scvi_like_encoder(), lambda k: (atlasvi_name(k + ".x") or "")[:-2] or None)
    atlasvi_names = check._dropout_names(_atlasvi_like_encoder(), str)
    expected = ["z_encoder_expression.encoder.layers.0", "z_encoder_expression.encoder.layers.1"]
    assert sorted(scvi_names.values()) == sorted(atlasvi_names.values()) == expected
    own = check._dropout_names(_scvi_like_encoder(), lambda k: None, "module.")
    assert sorted(own.values()) == [
        "own:module.z_encoder_expression.encoder.fc_layers.Layer 0",
        "own:module.z_encoder_expression.encoder.fc_layers.Layer 1",
    ]


def test_dropout_mask_is_torchs_law_keyed_by_step_layer_and_call():
    mask = check.dropout_mask(3, "a", 0, (400, 500), 0.1)
    assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, np.float32(1 / 0.9)}
    assert abs((mask > 0).mean() - 0.9) < 0.003  # 200,000 entries: s.e. 0.0007
    assert np.array_equal(mask, check.dropout_mask(3, "a", 0, (400, 500), 0.1))
    for other in ((4, "a", 0), (3, "b", 0), (3, "a", 1)):
        assert not np.array_equal(mask, check.dropout_mask(*other, (400, 500), 0.1))


def test_shared_dropout_gives_both_tools_the_same_masks_and_follows_the_reorder(monkeypatch):
    monkeypatch.setattr(torch.nn.Dropout, "forward", torch.nn.Dropout.forward)  # both restored after the test
    monkeypatch.setattr(check._StepRecord, "current", None)
    from benchmarks.multivi_weights_check import atlasvi_name

    scvi, atlasvi = _scvi_like_encoder(), _atlasvi_like_encoder()
    names = check._dropout_names(scvi, lambda k: (atlasvi_name(k + ".x") or "")[:-2] or None)
    check._shared_dropout(names | check._dropout_names(atlasvi, str))
    with torch.no_grad():  # the same weights in both layouts
        for i in range(2):
            mine, theirs = (
                atlasvi.z_encoder_expression.encoder.layers[i][0],
                scvi.z_encoder_expression.encoder.fc_layers[i][0],
            )
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    x = torch.randn(8, 6)
    with pytest.raises(RuntimeError, match="outside a step"):
        atlasvi.z_encoder_expression.encoder(x)
    outputs = {}
    for tool, module in (
        ("scvi", scvi.z_encoder_expression.encoder),
        ("atlasvi", atlasvi.z_encoder_expression.encoder),
    ):
        record = check._StepRecord(tool, 2)
        record.start({}, np.arange(8))
        outputs[tool] = module(x) if tool == "atlasvi" else _scvi_forward(module, x)
        assert record.dropout_calls == [{n: 1 for n in sorted(set(names.values()))}]
    assert torch.allclose(outputs["scvi"], outputs["atlasvi"], atol=1e-6)
    assert (outputs["atlasvi"] == 0).any()  # some entries dropped
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    record = check._StepRecord("reordered", 2)
    record.start({}, np.arange(8))
    record.order = order
    assert torch.allclose(atlasvi.z_encoder_expression.encoder(x[order]), outputs["atlasvi"][order], atol=1e-6)
    atlasvi.eval()
    assert torch.equal(atlasvi.z_encoder_expression.encoder(x), atlasvi.z_encoder_expression.encoder(x))


def _scvi_forward(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in encoder.fc_layers:
        for layer in block:
            if layer is not None:
                x = layer(x)
    return x
