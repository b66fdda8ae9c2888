"""benchmarks/streaming_cpu.py: the per-pair ratios, the warm-up left out, and the committed tables."""

import json
from pathlib import Path

import pytest

from benchmarks.streaming_cpu import EpochCPU, markdown, summary

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_summary_leaves_out_the_warm_up_and_divides_resident_by_streaming():
    out = summary([9.0, 2.0, 2.0, 1.9], [1.0, 2.0, 2.5, 2.0], cells=1000)
    assert out["ratios"] == pytest.approx([1.0, 0.8, 0.95])
    assert out["median"] == pytest.approx(0.95)
    assert (out["lowest"], out["highest"]) == pytest.approx((0.8, 1.0))
    assert out["below_0_95"] == 1  # 0.8; 0.95 itself meets the goal
    assert out["resident_cells_per_cpu_s"] == pytest.approx(500.0)
    assert out["streaming_cells_per_cpu_s"] == pytest.approx(500.0)


def test_summary_refuses_unpaired_or_warm_up_only_passes():
    with pytest.raises(ValueError):
        summary([1.0, 1.0], [1.0], cells=10)
    with pytest.raises(ValueError):
        summary([1.0], [1.0], cells=10)


def test_timed_passes_times_each_pass_and_delegates():
    class Loader:
        sampler = "s"

        def __len__(self):
            return 3

        def __iter__(self):
            return iter(range(3))

    timed = EpochCPU(Loader())
    assert list(timed) == [0, 1, 2] and list(timed) == [0, 1, 2]
    assert len(timed.cpu_s) == 2 and all(c >= 0 for c in timed.cpu_s)
    assert len(timed) == 3 and timed.sampler == "s"


@pytest.mark.parametrize("name", ["streaming_cpu", "streaming_cpu_run2"])
def test_committed_tables_render_from_their_json(name):
    report = json.loads((RESULTS / f"{name}.json").read_text())
    for row in report["rows"]:
        assert summary(row["resident_cpu_s"], row["streaming_cpu_s"], row["cells_per_pass"])["median"] == pytest.approx(
            row["median"]
        )
    assert markdown(report) == (RESULTS / f"{name}.md").read_text()
