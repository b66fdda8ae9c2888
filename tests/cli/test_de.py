"""`atlasvi de` as a user runs it: a saved model, a groupby column, a table of top genes and a CSV."""

import pandas as pd
import torch
from typer.testing import CliRunner

from atlasvi.api import SCVI, TOTALVI
from atlasvi.cli.main import app
from atlasvi.data import open_store
from atlasvi.models.totalvi import TOTALVIConfig
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
    assert "(--groupby cell_type)" in missing.output  # the column it is not a category of
    no_column = runner.invoke(app, ["de", "--model", str(tmp_path / "model"), "--groupby", "tissue"])
    assert no_column.exit_code == 1 and "no categorical column 'tissue'" in no_column.output
    for failed in (missing, no_column):  # one line each, no traceback
        assert failed.output.startswith("error: ") and failed.output.count("\n") == 1, failed.output


def test_de_of_a_totalvi_model_tests_genes_and_proteins(two_panel_store, tmp_path):
    """A totalVI model's table has the proteins after scvi-tools' TOTALVI ("<name>_protein" rows); a protein no
    cell of a group measured has no raw mean there (NaN), not 0."""
    model = TOTALVI(two_panel_store, config=TOTALVIConfig(n_latent=4, n_hidden=16), device="cpu")
    model.fit(TrainConfig(max_epochs=2, n_epochs_kl_warmup=1))
    model.save(tmp_path / "model")
    schema = open_store(two_panel_store).schema
    first = schema.batch_categories[0]  # pbmc10k: 14 of the 29 antibodies
    args = ["de", "--model", str(tmp_path / "model"), "--groupby", schema.batch_key, "--group1", first]
    result = runner.invoke(app, [*args, "--n-samples-overall", "100", "--output", str(tmp_path / "de.csv")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "de.csv", index_col="gene")
    proteins = table[table.index.str.endswith("_protein")]
    assert len(table) == schema.n_genes + 29 and len(proteins) == 29
    panel = schema.modalities["protein"].batch_mask[0]
    unmeasured = [f"{p}_protein" for p, m in zip(model.protein_names, panel, strict=True) if not m]
    assert len(unmeasured) == 15 and proteins.loc[unmeasured, "raw_mean1"].isna().all()
    assert proteins.drop(index=unmeasured)["raw_mean1"].notna().all() and proteins["raw_mean2"].notna().all()
    assert proteins["lfc_mean"].notna().all()  # imputed where not measured


def test_de_of_a_model_without_de_is_one_line_before_any_work(kang_store, tmp_path):
    """SysVI (like CondSCVI, DestVI) has no Bayesian DE: one error line naming the model and the methods that
    have it, not an AttributeError traceback; nothing is written."""
    from atlasvi.api.sysvi import SysVI

    model = SysVI(kang_store, device="cpu")
    model.fit(TrainConfig(max_epochs=1))
    model.save(tmp_path / "model")
    args = ["de", "--model", str(tmp_path / "model"), "--groupby", "cell_type", "--output", str(tmp_path / "de.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'model'}: a SysVI model has no differential expression")
    assert "SCVI" in result.output and result.output.count("\n") == 1 and not (tmp_path / "de.csv").exists()
