"""benchmarks/perf_compare.py: atlasvi.bench driven with scvi-tools' rows, the ratios, the table and the README."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from atlasvi.bench import BenchConfig, OtherTool, run_bench
from benchmarks.perf_compare import README_END, README_START, comparison, markdown, update_readme, with_ratios
from tests.conftest import KANG

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_committed_table_renders_unchanged_from_its_json():
    """The harness writes the format of the committed table: its JSON's runs give its rows and its markdown."""
    report = json.loads((RESULTS / "perf_table.json").read_text())
    assert with_ratios(report["runs"]) == report["rows"]
    assert markdown(report) == (RESULTS / "perf_table.md").read_text()


def test_ratios_to_scvi_tools_overall_and_paired_by_repeat():
    base = {"cells": 1000, "device": "cpu", "workers": 1, "batch_size": 128, "epochs": 2, "train_cells": 900,
            "wall_s": 1.0, "peak_rss_mb": 100.0, "peak_gpu_mb": None}  # fmt: skip
    speeds = {("atlasvi", 0): 300.0, ("atlasvi", 1): 200.0, ("scvi-tools", 0): 100.0, ("scvi-tools", 1): 200.0}
    runs = [base | {"tool": t, "repeat": r, "cells_per_s": v, "epoch_s": 900 / v} for (t, r), v in speeds.items()]
    atlasvi, scvi = with_ratios(runs)
    assert atlasvi["tool"] == "atlasvi" and atlasvi["x_scvi_tools"] == pytest.approx(250 / 150)  # medians
    assert atlasvi["x_scvi_tools_paired"] == pytest.approx((3.0 + 1.0) / 2)  # per repeat, then the median
    assert scvi["x_scvi_tools"] == pytest.approx(1.0)


def test_readme_section_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n{README_START}\nold\n{README_END}\n\n## Next\n")
    update_readme(readme, f"{README_START}\nnew table\n{README_END}")
    assert readme.read_text() == f"# x\n\n## Performance\n{README_START}\nnew table\n{README_END}\n\n## Next\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no <!-- atlasvi-bench:start -->"):
        update_readme(readme, "x")


def test_run_bench_with_another_tool_gets_its_rows_ratios_table_and_readme(tmp_path):
    """A stand-in for scvi-tools' side (a process printing its JSON) through run_bench and the comparison."""
    fake = {"epoch_s": [2.0, 0.5], "train_cells": 1800, "wall_s": 2.5, "threads": 1,
            "versions": {"scvi-tools": "9.9", "lightning": "8.8", "torch": "not kept"}}  # fmt: skip
    specs: list[dict] = []

    def command(spec: dict) -> list[str]:
        specs.append(spec)
        return [sys.executable, "-c", f"print({json.dumps(json.dumps(fake))})"]

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\n{README_END}\nrest\n")
    extra = comparison(None, None, loaders=False, readme=readme)
    extra = replace(extra, tools=[OtherTool("scvi-tools", command, lambda c, n: None, ("scvi-tools", "lightning"))])
    config = BenchConfig(
        sizes=[2000], epochs=1, batch_sizes=[512], workers=[1], loaders=False, reference=str(KANG),
        cache_dir=str(tmp_path / "cache"), output=str(tmp_path / "out"),
    )  # fmt: skip
    report = run_bench(config, f"sqlite:///{tmp_path / 'mlflow.db'}", {}, "test", None, extra)

    (spec,) = specs
    assert (spec["n_train"], spec["batch_size"], spec["epochs"], spec["seed"]) == (1800, 512, 1, 0)
    atlasvi, scvi = report["rows"]
    assert (atlasvi["tool"], scvi["tool"], scvi["cells_per_s"]) == ("atlasvi", "scvi-tools", 3600.0)
    assert atlasvi["x_scvi_tools"] == pytest.approx(atlasvi["cells_per_s"] / 3600.0)
    assert report["other_versions"] == {"scvi-tools": "9.9", "lightning": "8.8"}
    table = (tmp_path / "out" / "perf_table.md").read_text()
    assert "## Headline: atlasvi / scvi-tools" in table and "scvi-tools 9.9" in table
    assert f"| {atlasvi['x_scvi_tools']:,.2f} |" in table
    section = readme.read_text()
    assert section.startswith(
        f"intro\n{README_START}\n`make bench` (`benchmarks/perf_compare.py`) on "
    ) and section.endswith(f"{README_END}\nrest\n")
    assert f"| 3,600 | {atlasvi['x_scvi_tools']:,.2f} |" in section
