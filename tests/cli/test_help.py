"""`atlasvi --help` is quick (no torch / MLflow / Ray import) and every command's help fits 80 columns."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from atlasvi.cli.main import COMMANDS, app

runner = CliRunner()


def test_top_level_help_imports_no_heavy_package():
    probe = (
        "import sys; from typer.testing import CliRunner; from atlasvi.cli.main import app;"
        "out = CliRunner().invoke(app, ['--help']); assert out.exit_code == 0, out.output;"
        "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'scanpy', 'anndata', 'zarr') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_80_columns_with_whole_flag_names(command):
    args = [command, "--help"] if command else ["--help"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    if command:
        assert any(line.lstrip().startswith("--") for line in lines)


def test_an_expected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "none.zarr"
    plain = runner.invoke(app, ["info", str(missing)])
    assert plain.exit_code == 1
    assert plain.output.strip().splitlines() == [
        f"error: {missing}: no atlas store here (no zarr.json); build one with `atlasvi build`"
    ]
    debug = runner.invoke(app, ["--debug", "info", str(missing)])
    assert debug.exit_code == 1 and type(debug.exception).__name__ == "StoreError"
