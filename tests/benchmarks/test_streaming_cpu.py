"""benchmarks/streaming_cpu.py: the per-pair ratios, the warm-up left out, the per-thread CPU of a pass (the
training thread's steps and receiving, the other threads by group), its decomposition, and the committed tables."""

import json
import threading
import time
from pathlib import Path

import pytest

from benchmarks import streaming_cpu
from benchmarks.streaming_cpu import TASKS, Pass, PassCPU, decompose, grouped, markdown, summary, thread_cpu_s

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_summary_leaves_out_the_warm_up_and_divides_resident_by_streaming():
    out = summary([9.0, 2.0, 2.0, 1.9], [1.0, 2.0, 2.5, 2.0], cells=1000)
    assert out["ratios"] == pytest.approx([1.0, 0.8, 0.95])
    assert out["median"] == pytest.approx(0.95)
    assert (out["lowest"], out["highest"]) == pytest.approx((0.8, 1.0))
    assert out["below_0_95"] == 1  # 0.8; 0.95 itself meets the goal
    assert out["resident_cells_per_cpu_s"] == pytest.approx(500.0)
    assert out["streaming_cells_per_cpu_s"] == pytest.approx(500.0)


def test_summary_refuses_unpaired_or_warm_up_only_passes():
    with pytest.raises(ValueError):
        summary([1.0, 1.0], [1.0], cells=10)
    with pytest.raises(ValueError):
        summary([1.0], [1.0], cells=10)


def burn(seconds: float) -> None:
    """Use `seconds` of this thread's CPU."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def test_thread_cpu_s_reads_each_tasks_run_time(tmp_path):
    for tid, text in [("12", "1500000000 7 3\n"), ("13", "250000000 0 0\n")]:
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "schedstat").write_text(text)
    (tmp_path / "14").mkdir()  # a thread that ended between listing and reading
    assert thread_cpu_s(tmp_path) == {12: 1.5, 13: 0.25}
    assert thread_cpu_s(tmp_path / "absent") == {}


@pytest.mark.skipif(not TASKS.exists(), reason="per-thread CPU is read from Linux's /proc")
def test_thread_cpu_s_gives_a_busy_thread_its_cpu():
    go, done, leave = threading.Event(), threading.Event(), threading.Event()

    def work():
        go.wait()
        burn(0.2)
        done.set()
        leave.wait()

    worker = threading.Thread(target=work)
    worker.start()
    before = thread_cpu_s()
    go.set()
    done.wait()
    after = thread_cpu_s()
    leave.set()
    worker.join()
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    assert used[worker.native_id] >= 0.2
    assert used[threading.get_native_id()] < 0.1  # waiting costs no CPU


@pytest.mark.skipif(not TASKS.exists(), reason="per-thread CPU is read from Linux's /proc")
def test_a_pass_splits_the_training_threads_receiving_from_its_steps_and_counts_other_threads():
    go, done, leave = threading.Event(), threading.Event(), threading.Event()

    def reader():
        go.wait()
        burn(0.1)
        done.set()
        leave.wait()

    background = threading.Thread(target=reader)
    background.start()

    class Loader:
        sampler = "s"

        def __len__(self):
            return 3

        def __iter__(self):
            go.set()
            for i in range(3):
                burn(0.03)  # receiving a minibatch
                yield i
            done.wait()  # the reader's CPU lands in the pass

    timed = PassCPU(Loader())
    seen = []
    for batch in timed:
        burn(0.05)  # a training step
        seen.append(batch)
    leave.set()
    background.join()
    assert seen == [0, 1, 2] and len(timed) == 3 and timed.sampler == "s"
    (record,) = timed.passes
    assert 0.09 <= record.receive_s < 0.12
    assert 0.15 <= record.step_s < 0.18
    assert 0.05 <= record.step_median_s < 0.06
    assert record.training_s == pytest.approx(record.receive_s + record.step_s)
    assert 0.1 <= record.threads_s[background.native_id] < 0.13
    assert threading.get_native_id() not in record.threads_s
    assert record.process_s >= record.training_s + 0.1


def test_grouped_sums_the_other_threads_by_group():
    record = Pass(2.0, 1.0, 0.25, {1: 0.5, 2: 0.25, 3: 0.125, 4: 0.0625}, 0.03125, 7, 0.01)
    out = grouped(record, {1: "read_ahead", 2: "read_ahead", 3: "validation_read_ahead"})
    assert out == {
        "process_s": 2.0,
        "training_s": 1.0,
        "receive_s": 0.25,
        "training_kernel_s": 0.03125,
        "training_faults": 7,
        "step_median_s": 0.01,
        "read_ahead_s": 0.75,
        "validation_read_ahead_s": 0.125,
        "other_s": 0.0625,
        "ended_s": 0.0625,  # CPU of no thread alive at the end
    }


def _record(process=0.0, training=0.0, receive=0.0, read_ahead=0.0, validation=0.0, other=0.0, step=1.0) -> dict:
    return {
        "step_median_s": step,
        "process_s": process,
        "training_s": training,
        "receive_s": receive,
        "read_ahead_s": read_ahead,
        "validation_read_ahead_s": validation,
        "other_s": other,
        "ended_s": 0.0,
    }


def test_decompose_cancels_the_steps_noise_and_charges_streaming_its_read_ahead():
    resident = [
        _record(9.0, 9.0),  # warm-up: left out
        _record(2.01, 2.0, 0.02, read_ahead=0.01),  # streaming's read-ahead spilling into resident's pass
        _record(2.1, 2.1, 0.02, validation=0.1, step=0.02),
    ]
    streaming = [
        _record(9.0, 1.0, read_ahead=8.0),
        _record(2.24, 2.2, 0.005, read_ahead=0.03, validation=0.1, other=0.005),
        _record(1.95, 1.9, 0.005, read_ahead=0.04, other=0.005, step=0.016),
    ]
    out = decompose(resident, streaming, cells=1000)
    assert out["training_ratio"]["median"] == pytest.approx((2.0 / 2.2 + 2.1 / 1.9) / 2)
    assert (out["training_ratio"]["lowest"], out["training_ratio"]["highest"]) == pytest.approx((2 / 2.2, 2.1 / 1.9))
    assert out["step_ratio"]["median"] == pytest.approx((1.98 / 2.195 + 2.08 / 1.895) / 2)
    assert out["streaming_steps_dearer"] == 1
    assert out["step_median_ratio"]["median"] == pytest.approx((1.0 + 1.25) / 2)
    # own CPU: resident 0.02 (receiving); streaming 0.005 + 0.005 + read-ahead 0.03 + 0.01 spilled, then 0.04:
    # 0.05 both times; the validation loader's read-ahead is neither's
    assert out["structural"]["lowest"] == pytest.approx(2.0 / 2.03)
    assert out["structural"]["highest"] == pytest.approx(2.1 / 2.13)
    assert out["extra_fraction"] == pytest.approx(0.03 / 2.055)
    assert out["bound"] == pytest.approx(2.055 / 2.085)
    us = out["us_per_cell"]
    assert us["resident_total"] == pytest.approx(2055.0)
    assert us["streaming_read_ahead"] == pytest.approx(40.0)
    assert us["resident_read_ahead_spill"] == pytest.approx(5.0)
    assert (us["resident_receive"], us["streaming_receive"]) == pytest.approx((20.0, 5.0))
    assert (us["resident_other"], us["streaming_other"]) == pytest.approx((0.0, 5.0))
    assert us["validation_read_ahead"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        decompose(resident[:1], streaming[:1], cells=1000)


def test_markdown_adds_the_per_thread_table_to_decomposed_rows():
    resident = [_record(2.0, 2.0, 0.02)] * 3
    streaming = [_record(2.04, 1.99, 0.01, read_ahead=0.04)] * 3  # the same steps: 1.98 s
    row = {
        "batch_size": 128,
        "ratios": [2.0 / 2.05] * 2,
        "median": 2.0 / 2.05,
        "lowest": 2.0 / 2.05,
        "highest": 2.0 / 2.05,
        "below_0_95": 0,
        "resident_cells_per_cpu_s": 500.0,
        "streaming_cells_per_cpu_s": 487.8,
        "decomposition": decompose(resident, streaming, cells=1000),
        "other_cpu_cores": 0.25,
    }
    report = {"command": "c", "cells": 1000, "genes": 10, "threads": 1, "pairs": 2, "machine": "m"}
    text = markdown(report | {"load_before": 0.5, "load_after": 0.6, "rows": [row]})
    assert "| 128 | 1.005 (1.005-1.005) | 1.000 (1.000-1.000); 0 of 2 | 20.00 / 10.00 | 40.00 (2.0% of 2000.0) " in text
    assert "| 0.985 (0.985-0.985) | 0.985 |\n" in text  # (1.98 + 0.02) / (1.98 + 0.05)
    assert text.endswith("\nCores the machine's other processes kept busy meanwhile: 0.25 at batch 128.\n")


def test_main_attributes_the_read_ahead_threads_to_streaming(kang_store, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming_cpu, "store_of", lambda *args: kang_store)
    out = tmp_path / "report"
    streaming_cpu.main(["--pairs", "1", "--machine", "a 2-core VM", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"].endswith(f"--pairs 1 --machine 'a 2-core VM' --out {out}")
    (row,) = report["rows"]
    resident, streaming = row["resident_passes"], row["streaming_passes"]
    assert len(resident) == len(streaming) == 2 and len(row["ratios"]) == 1
    assert all(p["receive_s"] > 0 and p["training_s"] > p["receive_s"] for p in resident + streaming)
    assert streaming[0]["read_ahead_s"] > 0  # the first pass reads its window and those read ahead
    assert resident[0]["read_ahead_s"] + resident[0]["validation_read_ahead_s"] + resident[0]["other_s"] < 0.01
    assert all(abs(p["ended_s"]) < 0.01 for p in resident + streaming)
    assert row["resident_cpu_s"] == [p["process_s"] for p in resident]
    assert 0 < row["decomposition"]["bound"] <= 1.0
    assert 0 <= row["other_cpu_cores"] <= 2
    assert "machine: a 2-core VM;" in out.with_suffix(".md").read_text()
    assert markdown(report) == out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "name",
    [
        "streaming_cpu",
        "streaming_cpu_run2",
        "streaming_cpu_threads",
        "streaming_cpu_threads_run2",
        "streaming_cpu_threads_run3",
    ],
)
def test_committed_tables_render_from_their_json(name):
    report = json.loads((RESULTS / f"{name}.json").read_text())
    for row in report["rows"]:
        assert summary(row["resident_cpu_s"], row["streaming_cpu_s"], row["cells_per_pass"])["median"] == pytest.approx(
            row["median"]
        )
        if "decomposition" in row:
            cells = row["cells_per_pass"]
            assert decompose(row["resident_passes"], row["streaming_passes"], cells) == row["decomposition"]
    assert markdown(report) == (RESULTS / f"{name}.md").read_text()
