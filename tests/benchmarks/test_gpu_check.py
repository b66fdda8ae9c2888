"""benchmarks/gpu_check.sh: its CPU dry run goes through every row and prints the one table."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_prints_the_table_of_every_row(tmp_path):
    env = os.environ | {
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_CACHE": str(tmp_path / "cache"),
        "GPU_CHECK_OUT": str(tmp_path / "gpu_check"),
        "ATLASVI_PYTHON": str(REPO / ".venv" / "bin" / "python"),
    }
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPU check (DRY RUN on CPU" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["shapes"] == {"base": [1500, 1200], "wide": [375, 2400], "big": [3000, 1200]}
    rows = {(r["row"], r["store"]): r for r in report["rows"]}
    assert len(rows) == 7
    for label in ("resident bf16", "resident fp32", "streaming bf16"):
        assert rows[(f"atlasvi {label}", "base")]["resident"] == label.startswith("resident")
    bf16, fp32 = rows[("atlasvi resident bf16", "base")], rows[("atlasvi resident fp32", "base")]
    assert bf16["validation_elbo"] == fp32["validation_elbo"]  # autocast is CUDA only: on CPU both are fp32
    assert all(r["cells_per_s"] > 0 for r in report["rows"] if "skipped" not in r)
    assert "| atlasvi resident bf16, 2 epochs | 3,000 x 1200 | 2 |" in done.stdout
    assert (tmp_path / "gpu_check.md").read_text() == done.stdout.rstrip("\n") + "\n"
