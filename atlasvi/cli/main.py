"""`atlasvi` command line: the only place that reads argv, YAML or the environment.

Each command's module is imported only when that command runs or shows its help, so `atlasvi --help`
starts without torch, MLflow or Ray. An expected failure (`AtlasviError`) is printed as one line and
exits non-zero; `atlasvi --debug COMMAND ...` (or ATLASVI_DEBUG=1) shows its traceback instead.
"""

import errno
import importlib
import os
import sys
import warnings
from typing import TextIO

import click
import typer
import typer.main
from typer.core import TyperGroup

from atlasvi.errors import AtlasviError

# name -> (module, function, one-line help shown by `atlasvi --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": ("atlasvi.cli.build", "build_command", "Build an atlas store (AnnData Zarr) from h5ad / 10x inputs."),
    "info": ("atlasvi.cli.build", "info_command", "Describe an atlas store."),
    "train": ("atlasvi.cli.train", "train_command", "Train a model on a store; latent, figures, MLflow run."),
    "latent": ("atlasvi.cli.train", "latent_command", "Write a saved model's latent into a store."),
    "sweep": ("atlasvi.cli.sweep", "sweep_command", "Hyperparameter sweep on Ray Tune + ASHA, tracked in MLflow."),
    "scanvi": ("atlasvi.cli.scanvi", "scanvi_command", "Train scANVI from a saved scVI; predict labels."),
    "map-query": ("atlasvi.cli.map_query", "map_query_command", "scArches: map a query store onto a reference."),
    "de": ("atlasvi.cli.de", "de_command", "Bayesian differential expression between two groups of cells."),
    "export": ("atlasvi.cli.interop", "export_command", "Write a saved model in scvi-tools' save format."),
    "import": ("atlasvi.cli.interop", "import_command", "Read a scvi-tools saved model into an atlasvi model."),
    "bench": ("atlasvi.cli.bench", "bench_command", "The 10K / 100K / 1M performance table."),
}
HELP_WIDTH = 80
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()  # its params are parsed before the group invokes the command (and its callback)
    flag = bool((root.obj or {}).get("debug") or root.params.get("debug"))
    return flag or os.environ.get("ATLASVI_DEBUG", "") not in ("", "0")


class LazyCommands(TyperGroup):
    """Commands imported on first use; AtlasviError printed as one line unless --debug."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, function, short_help = COMMANDS[name]
        single = typer.Typer(rich_markup_mode=None, add_completion=False)
        single.command(name=name, short_help=short_help)(getattr(importlib.import_module(module), function))
        return typer.main.get_command(single)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        shown = warnings.showwarning
        if not _debug(ctx):  # a warning is one line, as an error is; --debug shows where it was raised
            warnings.showwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except AtlasviError as err:
            if _debug(ctx):
                raise
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(err.exit_code)
        except OSError as err:  # a file the command cannot write (read-only, no permission, disk full): one line
            if _debug(ctx) or err.errno not in WRITE_ERRNOS or err.filename is None:
                raise
            click.secho(f"error: {err.filename}: {err.strerror}", fg="red", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = shown


app = typer.Typer(
    cls=LazyCommands,
    help="Train scVI-family models on atlas-scale single-cell data.",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": HELP_WIDTH},
)


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error"),
) -> None:
    """Train scVI-family models on atlas-scale single-cell data."""
    ctx.ensure_object(dict)["debug"] = debug


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warning: MESSAGE` on stderr, without the source file and line Python prints under it."""
    click.secho(f"warning: {message}", fg="yellow", err=True)


if __name__ == "__main__":
    app()
