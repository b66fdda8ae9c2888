"""`atlasvi de` as a user runs it: a saved model, a groupby column, a table of top genes and a CSV."""

import pandas as pd
import torch
from typer.testing import CliRunner

from atlasvi.api import SCVI
from atlasvi.cli.main import app
from atlasvi.train import TrainConfig

runner = CliRunner(env={"COLUMNS": "200"})


def test_de_prints_top_genes_and_writes_the_csv(kang_store, tmp_path):
    torch.manual_seed(0)
    model = SCVI(kang_store, device="cpu")
    model.fit(TrainConfig(max_epochs=10, n_epochs_kl_warmup=5))
    model.save(tmp_path / "model")
    args = ["de", "--model", str(tmp_path / "model"), "--groupby", "cell_type", "--n-samples-overall", "200"]
    result = runner.invoke(app, [*args, "--group1", "B cells", "--output", str(tmp_path / "de" / "b.csv")])
    assert result.exit_code == 0, result.output
    assert "B cells vs Rest: top 10" in result.output and "is_de_fdr_0.05" in result.output
    table = pd.read_csv(tmp_path / "de" / "b.csv", index_col="gene")
    assert len(table) == 1267 and table["proba_de"].is_monotonic_decreasing
    assert set(table["comparison"]) == {"B cells vs Rest"} and not (tmp_path / "de" / "b.csv.partial").exists()
    up = table.sort_values("lfc_mean", ascending=False).index[:30]  # B-cell markers, after 10 epochs
    assert "MS4A1" in up and "CD79A_ENSG00000105369" in up
    vanilla = runner.invoke(app, [*args, "--group1", "B cells", "--group2", "CD4 T cells", "--mode", "vanilla"])
    assert vanilla.exit_code == 0 and "B cells vs CD4 T cells" in vanilla.output and "proba_m1" in vanilla.output
    missing = runner.invoke(app, [*args, "--group1", "Neurons"])
    assert missing.exit_code == 1 and "'Neurons' is not a category" in missing.output
    no_column = runner.invoke(app, ["de", "--model", str(tmp_path / "model"), "--groupby", "tissue"])
    assert no_column.exit_code == 1 and "no categorical column 'tissue'" in no_column.output
    for failed in (missing, no_column):  # one line each, no traceback
        assert failed.output.startswith("error: ") and failed.output.count("\n") == 1, failed.output
