"""benchmarks/fidelity_table.py: the table from both sides' per-seed caches, and atlasvi re-run alone against the
scvi-tools mean ± sd of a table written before (--scvi-tools-from)."""

import json
from pathlib import Path

import pytest

from benchmarks import fidelity_table


def _write_atlasvi(cache: Path, dataset: str, neg_elbo: dict[int, float], scib: dict[int, float]) -> None:
    folder = cache / "fidelity" / dataset
    folder.mkdir(parents=True)
    rows = [json.dumps({"tool": "atlasvi", "seed": s, "neg_elbo": v}) for s, v in neg_elbo.items()]
    (folder / "results.jsonl").write_text("\n".join(rows) + "\n")
    for s, total in scib.items():
        (folder / f"scib_seed{s}.json").write_text(json.dumps({f"atlasvi{s}": {"total": total}}))


def test_both_sides_from_the_caches_give_mean_sd_and_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity_table, "CACHE", tmp_path)
    _write_atlasvi(tmp_path, "kang", {0: 100.0, 1: 104.0, 2: 99.0}, {0: 0.70, 1: 0.72})
    (tmp_path / "scvi_ref").mkdir()
    for seed, value in ((0, 98.0), (1, 102.0)):  # scvi-tools' INFO log may come before the JSON
        result = {"seed": seed, "heldout": {"neg_elbo": value}, "scib": {"total": 0.71}}
        (tmp_path / "scvi_ref" / f"kang_seed{seed}.json").write_text("INFO log\n" + json.dumps(result))
    # seed 1 run without --scib: its latent scored apart by `fidelity_data.py scib`
    (tmp_path / "scvi_ref" / "kang_seed1.json").write_text(json.dumps({"seed": 1, "heldout": {"neg_elbo": 102.0}}))
    (tmp_path / "scvi_ref" / "kang").mkdir()
    (tmp_path / "scvi_ref" / "kang" / "scib_seed1.json").write_text(json.dumps({"scvi1": {"total": 0.73}}))
    row = fidelity_table.summarise("kang", fidelity_table.collect("kang"))
    assert row["seeds"] == [0, 1]
    assert row["scvi-tools.neg_elbo"] == pytest.approx((100.0, 2.82842712))
    assert row["atlasvi.neg_elbo"] == pytest.approx((102.0, 2.82842712))
    assert row["check1"] is True  # 102 <= 100 + 2.83
    assert row["scvi-tools.scib"] == pytest.approx((0.72, 0.01414214))
    assert row["atlasvi.scib"] == pytest.approx((0.71, 0.01414214)) and row["check2"] is True
    assert row["atlasvi.per_seed"]["1"] == {"neg_elbo": 104.0, "scib": 0.72}
    assert row["scvi-tools.per_seed"] == {"0": {"neg_elbo": 98.0, "scib": 0.71}, "1": {"neg_elbo": 102.0, "scib": 0.73}}


def test_atlasvi_alone_against_a_committed_table(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity_table, "CACHE", tmp_path)
    committed = tmp_path / "fidelity_table.json"
    previous = {
        "dataset": "kang",
        "seeds": [0, 1, 2],
        "scvi-tools.neg_elbo": [100.0, 2.0],
        "scvi-tools.scib": [0.75, 0.01],
    }
    committed.write_text(json.dumps([previous]))
    scvi_tools = fidelity_table.committed_scvi_tools(committed)["kang"]
    _write_atlasvi(tmp_path, "kang", {0: 101.0, 1: 103.0, 2: 105.0}, {0: 0.74, 1: 0.75, 2: 0.76})
    row = fidelity_table.summarise("kang", fidelity_table.collect("kang", scvi_tools))
    assert row["scvi-tools.neg_elbo"] == [100.0, 2.0] and row["scvi-tools.scib"] == [0.75, 0.01]
    assert "scvi-tools.per_seed" not in row and set(row["atlasvi.per_seed"]) == {"0", "1", "2"}
    assert row["atlasvi.neg_elbo"] == pytest.approx((103.0, 2.0))
    assert row["check1"] is False  # 103 > 100 + 2: NOT met
    assert row["atlasvi.scib"] == pytest.approx((0.75, 0.01)) and row["check2"] is True  # 0.75 >= 0.74
    assert "NOT met" in fidelity_table.table([row])
    # the table written with the reused side reads back as the same scvi-tools side
    committed.write_text(json.dumps([row]))
    assert fidelity_table.committed_scvi_tools(committed)["kang"] == scvi_tools


def test_atlasvi_seeds_must_be_the_committed_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity_table, "CACHE", tmp_path)
    _write_atlasvi(tmp_path, "kang", {0: 101.0, 1: 103.0}, {})
    with pytest.raises(SystemExit, match=r"atlasvi has seeds \[0, 1\], the committed scvi-tools figures \[0, 1, 2\]"):
        fidelity_table.collect("kang", {"seeds": [0, 1, 2], "neg_elbo": [100.0, 2.0], "scib": None})
    (tmp_path / "bad.json").write_text("[{}]")
    with pytest.raises(SystemExit, match="not a fidelity_table.json"):
        fidelity_table.committed_scvi_tools(tmp_path / "bad.json")


def test_the_committed_table_reads_as_a_scvi_tools_side():
    committed = Path(fidelity_table.HERE) / "results" / "fidelity_table.json"
    sides = fidelity_table.committed_scvi_tools(committed)
    assert set(sides) == {"cellbench", "kang"}
    assert len(sides["cellbench"]["seeds"]) == 10 and len(sides["kang"]["seeds"]) == 3


def test_reuse_without_a_table_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("sys.argv", ["fidelity_table.py", "--reuse", "kang", "--no-mlflow"])
    with pytest.raises(SystemExit, match="--reuse needs --scvi-tools-from"):
        fidelity_table.main()


def test_reuse_one_dataset_and_take_the_other_from_the_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity_table, "CACHE", tmp_path)
    committed = tmp_path / "before.json"
    sides = [
        {"dataset": d, "seeds": [0, 1], "scvi-tools.neg_elbo": [10.0, 1.0], "scvi-tools.scib": [0.5, 0.1]}
        for d in ("cellbench", "kang")
    ]
    committed.write_text(json.dumps(sides))
    _write_atlasvi(tmp_path, "cellbench", {0: 10.0, 1: 11.0}, {0: 0.5, 1: 0.5})
    _write_atlasvi(tmp_path, "kang", {0: 20.0, 1: 21.0}, {0: 0.5, 1: 0.5})
    (tmp_path / "scvi_ref").mkdir()
    for seed in (0, 1):
        result = {"seed": seed, "heldout": {"neg_elbo": 20.0 + 2 * seed}, "scib": {"total": 0.6}}
        (tmp_path / "scvi_ref" / f"kang_seed{seed}.json").write_text(json.dumps(result))
    out = tmp_path / "table.md"
    argv = ["fidelity_table.py", "--scvi-tools-from", str(committed), "--reuse", "cellbench", "--out", str(out)]
    monkeypatch.setattr("sys.argv", [*argv, "--no-mlflow"])
    assert fidelity_table.main() == 0
    cellbench, kang = json.loads(out.with_suffix(".json").read_text())
    assert cellbench["scvi-tools.neg_elbo"] == [10.0, 1.0] and cellbench["check1"] is True
    assert kang["scvi-tools.neg_elbo"] == pytest.approx([21.0, 1.41421356]) and kang["check1"] is True
    assert kang["check2"] is False  # 0.5 < 0.6 - 0.01
    assert out.read_text().count("\n") == 4
