"""benchmarks/sysvi_fidelity.py and sysvi_mixing.py: the batch-neighbour entropy, the run names and rows, and the
committed tables render from their JSON."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import sysvi_mixing
from benchmarks.sysvi_fidelity import checks, entropy_mixing, markdown, rows, run_key

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_batch_entropy_is_1_for_even_neighbourhoods_and_0_for_one_system():
    systems = np.array(["a", "b"] * 50)
    even = np.array([[(i + 1) % 100, (i + 2) % 100] for i in range(100)])  # one cell of each system
    assert entropy_mixing(even, systems) == pytest.approx(1.0)
    same = np.array([[(i + 2) % 100, (i + 4) % 100] for i in range(100)])  # two cells of its own system
    assert entropy_mixing(same, systems) == pytest.approx(0.0)
    three = np.array(["a", "b", "c"] * 10)
    mixed = np.array([[(i + 1) % 30, (i + 2) % 30, (i + 3) % 30] for i in range(30)])
    assert entropy_mixing(mixed, three) == pytest.approx(1.0)


def test_committed_table_renders_from_its_json():
    report = json.loads((RESULTS / "sysvi_fidelity.json").read_text())
    assert markdown(report) == (RESULTS / "sysvi_fidelity.md").read_text()
    for result in report["datasets"].values():
        assert checks(result["summary"]) == result["checks"]
        assert {len(m["ilisi"]["values"]) for m in result["summary"].values()} == {len(result["seeds"])}
        assert len(result["seeds"]) >= 3
    check = report["weights_check"]  # scvi-tools' trained weights in atlasvi's module: the same function
    assert max(v for k, v in check.items() if k.endswith("max_abs_diff")) < 1e-2


def test_runs_at_other_cycle_weights_get_their_own_rows():
    assert run_key("atlasvi", "sysvi", 0) == "atlasvi_sysvi_s0"
    assert run_key("atlasvi", "sysvi", 1, 10.0) == "atlasvi_sysvi-cw10_s1"
    assert run_key("atlasvi", "scvi", 2, 10.0) == "atlasvi_scvi_s2"  # scVI has no cycle
    scores = dict.fromkeys(["atlasvi_sysvi-cw10_s0", "atlasvi_scvi_s0", "atlasvi_sysvi-cw5_s0", "atlasvi_sysvi_s0"])
    assert rows(scores) == [
        ("atlasvi", "sysvi", "atlasvi sysVI"),
        ("atlasvi", "scvi", "atlasvi scVI"),
        ("atlasvi", "sysvi-cw5", "atlasvi sysVI, cycle weight 5"),
        ("atlasvi", "sysvi-cw10", "atlasvi sysVI, cycle weight 10"),
    ]


def test_committed_mixing_table_renders_from_its_json():
    report = json.loads((RESULTS / "sysvi_mixing.json").read_text())
    assert sysvi_mixing.markdown(report) == (RESULTS / "sysvi_mixing.md").read_text()
