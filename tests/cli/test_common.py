"""Helpers every command shares: the progress display in a captured log."""

from types import SimpleNamespace

from rich.progress import BarColumn, TextColumn

from atlasvi.cli import common


def test_progress_in_a_captured_log_is_plain_lines(capsys, monkeypatch):
    clock = iter([0.0, 0.5, 2.5, 3.0])  # one reading per update
    monkeypatch.setattr(common, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    assert not common.console.is_terminal  # pytest captures stderr
    with common.progress_bars(TextColumn("{task.description}"), BarColumn()) as bars:
        task = bars.add_task("training scVI", total=4)
        for epoch in range(4):
            bars.update(task, completed=epoch + 1, description=f"training scVI  held-out -ELBO {1000 - epoch}.0")
    lines = capsys.readouterr().err.splitlines()
    # the first update, the one 2 s later, and the last; nothing cut, no bar glyphs
    assert lines == [
        "training scVI  held-out -ELBO 1000.0  1/4  0 s",
        "training scVI  held-out -ELBO 998.0  3/4  0 s",
        "training scVI  held-out -ELBO 997.0  4/4  0 s",
    ]


def test_an_invalid_config_is_one_config_error_naming_the_field_and_its_source(tmp_path):
    from atlasvi.data.config import BuildConfig
    from atlasvi.errors import ConfigError

    sources = [("build.yaml", {"inputs": ["a.h5ad"], "output": "x.zarr", "n_top_genes": -1, "colour": 1})]
    try:
        common.make_config(BuildConfig, sources)
    except ConfigError as err:
        message = str(err)
    assert message.startswith("invalid BuildConfig (build.yaml): ") and "\n" not in message
    assert "unknown field 'colour'" in message and "n_top_genes" in message
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    for path, expected in [(listed, "a config is a YAML mapping of field: value, not list"),
                           (tmp_path / "none.yaml", "config file does not exist")]:  # fmt: skip
        try:
            common.load_yaml(path)
        except ConfigError as err:
            assert str(err) == f"{path}: {expected}"
        else:
            raise AssertionError(f"{path} loaded")


def test_a_validator_error_reads_as_its_message_under_its_field():
    from atlasvi.errors import ConfigError
    from atlasvi.launch.sweep import SweepConfig
    from atlasvi.train.job import TrainJobConfig

    for model, sources, expected in [
        (TrainJobConfig, {"model": {"name": "scanvi", "dispersion": "gene-label"}}, "model: dispersion='gene-label'"),
        (SweepConfig, {"search_space": {"model.colour": {"grid": [1]}}}, "search_space: 'model.colour' is not"),
    ]:
        try:
            common.make_config(model, [("x.yaml", sources)])
        except ConfigError as err:
            assert str(err).startswith(f"invalid {model.__name__} (x.yaml): {expected}"), str(err)
        else:
            raise AssertionError(f"{sources} validated")


def test_a_step_without_a_count_is_two_plain_lines_in_a_captured_log(capsys, monkeypatch):
    """`status` (the latent write, the UMAP, the MLflow Model after training: ~80 s on 20,000 cells) was a
    spinner only, so a captured log showed nothing between the last epoch and the summary."""
    clock = iter([10.0, 47.4])
    monkeypatch.setattr(common, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    assert not common.console.is_terminal
    with common.status("figure latent_umap"):
        pass
    assert capsys.readouterr().err.splitlines() == ["figure latent_umap ...", "figure latent_umap: 37 s"]
