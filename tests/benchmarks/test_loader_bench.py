"""benchmarks/loader_bench.py: rounds merged with their steady state, ratios paired by round (median, lowest, rounds
below 1), and the pooled table of the committed quiet runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loader_bench import _merge, _pairs, _ratio_table, combine

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
QUIET_LZ4 = [RESULTS / f"loader_1m_direct_lz4{suffix}.json" for suffix in ("", "_run2", "_run3")]
BUILT_LZ4 = [RESULTS / f"loader_1m_built_lz4{suffix}.json" for suffix in ("", "_run2", "_run3")]


def _round(rate: float, steady: float) -> dict:
    return {"cells_per_s": rate, "steady_all": [steady], "first_batch_s_all": [0.5], "setup_s": 1.0}


def _row(mine: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> dict:
    return {
        "loader": {"lz4/auto/1024": _merge([_round(*r) for r in mine])},
        "annbatch": {"lz4/zarrs/1024": _merge([_round(*r) for r in theirs])},
        "load": [1.0, 2.0],
    }


def test_rounds_merge_with_their_steady_state_and_pair_by_round():
    row = _row([(100.0, 200.0), (300.0, 400.0), (90.0, 180.0)], [(100.0, 100.0), (100.0, 100.0), (100.0, 200.0)])
    merged = row["loader"]["lz4/auto/1024"]
    assert merged["cells_per_s"] == 100.0 and merged["steady_cells_per_s"] == 200.0
    assert merged["steady_all"] == [200.0, 400.0, 180.0] and merged["setup_s_all"] == [1.0] * 3
    ((name, batch, ratios),) = _pairs(row, "all")
    assert (name, batch, ratios) == ("atlasvi lz4/auto vs annbatch+zarrs lz4", "1024", [1.0, 3.0, 0.9])
    assert _pairs(row, "steady_all")[0][2] == [2.0, 4.0, 0.9]
    assert _ratio_table("t", _pairs(row, "all"))[-1] == f"| {name} | 1024 | 1.00 | 0.90 | 1 of 3 |"


def test_combine_pools_the_rounds_of_several_runs(tmp_path):
    runs = []
    for i, (mine, theirs) in enumerate([([(100.0, 150.0)], [(50.0, 100.0)]), ([(80.0, 90.0)], [(100.0, 100.0)])]):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps({"command": f"run {i}", "commit": "c", "sizes": {"1000": _row(mine, theirs)}}))
        runs.append(path)
    text = combine(runs)
    assert "| atlasvi lz4/auto vs annbatch+zarrs lz4 | 1024 | 1.40 | 0.80 | 1 of 2 |" in text
    assert "| atlasvi lz4/auto vs annbatch+zarrs lz4 | 1024 | 1.20 | 0.90 | 1 of 2 |" in text  # steady state


@pytest.mark.skipif(not all(p.exists() for p in QUIET_LZ4), reason="the committed quiet runs")
def test_the_committed_quiet_runs_pool_to_the_figures_the_readme_gives():
    text = combine(QUIET_LZ4)
    pooled = {128: "1.43 | 1.06 | 0 of 9", 1024: "1.12 | 0.68 | 2 of 9", 4096: "1.07 | 0.50 | 3 of 9"}
    for batch, figures in pooled.items():
        assert f"| atlasvi lz4/auto vs annbatch+zarrs lz4 | {batch} | {figures} |" in text


@pytest.mark.skipif(not all(p.exists() for p in BUILT_LZ4), reason="the committed quiet runs")
def test_the_quiet_runs_with_the_kernel_loaded_at_build_pool_to_the_readmes_figures():
    text = combine(BUILT_LZ4)
    fresh = {128: "1.99 | 1.39 | 0 of 9", 1024: "1.31 | 1.03 | 0 of 9", 4096: "1.67 | 1.13 | 0 of 9"}
    steady = {128: "2.15 | 1.42 | 0 of 9", 1024: "1.52 | 1.05 | 0 of 9", 4096: "1.86 | 1.26 | 0 of 9"}
    head, tail = text.split("steady state")
    for batch in (128, 1024, 4096):
        assert f"| atlasvi lz4/auto vs annbatch+zarrs lz4 | {batch} | {fresh[batch]} |" in head
        assert f"| atlasvi lz4/auto vs annbatch+zarrs lz4 | {batch} | {steady[batch]} |" in tail


def test_combine_refuses_a_missing_file_in_one_line(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "loader_bench.py"
    done = subprocess.run(
        [sys.executable, str(script), "--combine", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"--combine: no such results file: {tmp_path / 'none.json'}"
