"""The PeakVI many-step check's helpers (benchmarks/peakvi_step_check.py): runs of other lengths are compared on their
common steps; scvi-tools' blocks take atlasvi's names; the committed tables render from their JSON."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import peakvi_step_check as check

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_a_longer_run_is_cut_to_the_common_steps():
    record = check._Npz(
        {"sample|w": np.arange(10.0).reshape(5, 2), "loss": np.arange(4.0), "kl_weight": np.ones(4), "other": 1}
    )
    first = check._first(record, 2)
    assert first["sample|w"].tolist() == [[0, 1], [2, 3], [4, 5]]  # before steps 0, 1 and after step 1
    assert first["loss"].tolist() == [0, 1] and first["kl_weight"].tolist() == [1, 1]
    assert sorted(first.files) == ["kl_weight", "loss", "sample|w"]


def test_the_scvi_tools_blocks_take_atlasvis_names():
    assert check._atlasvi_block("z_encoder.encoder.fc_layers.Layer 1.4") == "z_encoder.encoder.layers.1.4"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("peakvi_step_check_seed*.json")), ids=lambda p: p.stem)
def test_committed_tables_render_from_their_json(path):
    report = json.loads(path.read_text())
    assert check.markdown(report) == path.with_suffix(".md").read_text()
    assert report["steps"]["atlasvi"] == len(report["losses"]["atlasvi"]) == sum(report["meta"]["epoch_steps"])


def test_committed_same_stream_table_renders_from_its_json():
    kept = json.loads((RESULTS / "peakvi_same_stream.json").read_text())
    assert check.same_stream_markdown(kept["rows"], kept["commands"]) == (RESULTS / "peakvi_same_stream.md").read_text()
    assert {r["variant"] for r in kept["rows"]} <= set(check.VARIANTS)
