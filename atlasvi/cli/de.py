"""`atlasvi de`: Bayesian differential expression of a saved model, a table of the top genes and a CSV."""

import os
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.table import Table

from atlasvi.analysis.de import DEConfig
from atlasvi.api import saved_model_class
from atlasvi.cli.common import check_writable, make_config, progress_bars, refuse_without
from atlasvi.data import open_store
from atlasvi.errors import AtlasviError


def _help(field: str) -> str:
    return DEConfig.model_fields[field].description or ""


def _default(field: str) -> Any:
    return DEConfig.model_fields[field].default


def de_command(
    model: Annotated[Path, typer.Option(help="a saved model folder (OUTPUT/model of `atlasvi train`)")],
    groupby: Annotated[str, typer.Option(help="categorical obs column of the store holding the groups")],
    group1: Annotated[list[str] | None, typer.Option(help="group(s) to test (default: every group)")] = None,
    group2: Annotated[str | None, typer.Option(help="reference group (default: the rest of the cells)")] = None,
    mode: Annotated[str, typer.Option(help=_help("mode"))] = _default("mode"),
    delta: Annotated[float, typer.Option(help=_help("delta"))] = _default("delta"),
    fdr_target: Annotated[float, typer.Option(help=_help("fdr_target"))] = _default("fdr_target"),
    batch_correction: Annotated[bool, typer.Option(help=_help("batch_correction"))] = _default("batch_correction"),
    n_samples_overall: Annotated[int, typer.Option(help=_help("n_samples_overall"))] = _default("n_samples_overall"),
    store: Annotated[str | None, typer.Option(help="store to test on (default: the model's training store)")] = None,
    output: Annotated[Path | None, typer.Option(help="CSV of the whole result (gene rows per comparison)")] = None,
    top: Annotated[int, typer.Option(help="genes shown per comparison")] = 10,
    seed: Annotated[int, typer.Option(help=_help("seed"))] = _default("seed"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Bayesian DE (scvi-tools' change / vanilla modes) of groups of a store's cells; prints the top genes."""
    flags = dict(
        mode=mode, delta=delta, fdr_target=fdr_target, batch_correction=batch_correction,
        n_samples_overall=n_samples_overall, seed=seed,
    )  # fmt: skip
    config = make_config(DEConfig, [("flags", flags)])
    if output is not None:  # before the posterior draws, not after
        check_writable(output.parent, "the CSV")
    model_class = saved_model_class(model)
    refuse_without(model, model_class, "differential_expression", "differential expression", "`atlasvi de` takes")
    scvi = model_class.load(model, open_store(store or model_class.saved_store(model)), device)
    with progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bars:
        task = bars.add_task("DE comparisons", total=None)
        try:
            result = scvi.differential_expression(
                groupby, group1=group1, group2=group2, config=config,
                progress=lambda done, total: bars.update(task, completed=done, total=total),
            )  # fmt: skip
        except (KeyError, ValueError) as err:  # a group or column the store lacks, named by the analysis
            if isinstance(err, KeyError):  # a group the column lacks: the analysis does not know the column's name
                raise AtlasviError(f"{err.args[0]} (--groupby {groupby})") from err
            raise AtlasviError(str(err)) from err
    _print_top(result, config.mode, config.fdr_target, top)
    if output is not None:
        _write_csv(result, output)
        Console().print(f"wrote {output} ({len(result)} rows)")


def _print_top(result: pd.DataFrame, mode: str, fdr_target: float, top: int) -> None:
    called = f"is_de_fdr_{fdr_target}"
    columns = ["proba_de", "bayes_factor", "lfc_mean", "lfc_std", called] if mode == "change" else ["proba_m1"]
    columns += ["bayes_factor", "scale1", "scale2"] if mode == "vanilla" else []
    groups = result.groupby("comparison", sort=False) if "comparison" in result else [("", result)]
    for comparison, frame in groups:
        title = f"{comparison}: top {top}" + (
            f" ({int(frame[called].sum())} DE at FDR {fdr_target})" if called in frame else ""
        )
        table = Table(title=title)
        table.add_column("gene")
        for column in columns:
            table.add_column(column, justify="right")
        for gene, row in frame.head(top).iterrows():
            table.add_row(str(gene), *(str(bool(row[c])) if c == called else f"{row[c]:.3g}" for c in columns))
        Console().print(table)


def _write_csv(result: pd.DataFrame, output: Path) -> None:
    """Write beside `output`, then rename into place: a reader never sees half a CSV."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    result.to_csv(partial, index_label="gene")
    os.replace(partial, output)
