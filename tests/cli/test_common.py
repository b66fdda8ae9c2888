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
