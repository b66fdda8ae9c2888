"""benchmarks/train_speed.py: ratios paired within a repeat, by wall time and by CPU time per cell."""

import pytest

from benchmarks.train_speed import markdown, summarise


def _run(tool: str, repeat: int, cells_per_s: float, cpu_s_per_cell: float) -> dict:
    loader = {"atlasvi/store": "ResidentLoader", "atlasvi/streaming": "StreamingLoader"}.get(tool)
    run = {"dataset": "synth10k", "batch_size": 128, "tool": tool, "repeat": repeat, "cells_per_s": cells_per_s}
    run |= {"cpu_s_per_cell": cpu_s_per_cell, "other_processes_cpu_cores": 1.0, "load_1min": 2.0}
    return run | ({"loader": loader} if loader else {})


def test_ratios_are_paired_within_a_repeat():
    runs = [
        _run("atlasvi/store", 0, 3000, 1e-4),
        _run("atlasvi/streaming", 0, 2700, 1.2e-4),
        _run("scvi-tools", 0, 1000, 4e-4),
        _run("atlasvi/store", 1, 1500, 2e-4),  # a loaded repeat: every tool slower
        _run("atlasvi/streaming", 1, 1500, 2e-4),
        _run("scvi-tools", 1, 600, 5e-4),
    ]
    rows = {row["tool"]: row for row in summarise(runs)}
    store, streaming = rows["atlasvi/store"], rows["atlasvi/streaming"]
    assert store["vs_scvi_tools_repeats"] == [3.0, 2.5] and store["vs_scvi_tools"] == pytest.approx(2.75)
    assert store["vs_scvi_tools_cpu_repeats"] == [4.0, 2.5] and store["vs_scvi_tools_cpu"] == pytest.approx(3.25)
    assert store["cells_per_cpu_s"] == pytest.approx(1 / 1.5e-4) and store["loader"] == "ResidentLoader"
    assert streaming["streaming_vs_resident"] == pytest.approx((0.9 + 1.0) / 2)
    assert store["streaming_vs_resident"] is None and rows["scvi-tools"]["vs_scvi_tools"] == 1.0
    report = {
        "machine": {"cpu": "cpu", "cores": 2, "ram_gib": 1, "python": "3", "versions": {}},
        "scvi_versions": {},
        "threads": 1,
        "loader_threads": 2,
        "command": "python benchmarks/train_speed.py",
        "repeats": 2,
        "datasets": {"synth10k": {"cells": 9000, "genes": 2000, "epochs": 4}},
        "rows": list(rows.values()),
    }
    table = markdown(report)
    row = "| atlasvi/store | ResidentLoader | 2,250 | 3,000, 1,500 | 6,667 | 2.75 (3.00, 2.50) | 3.25 (4.00, 2.50) |"
    assert row in table
