"""`OutputLock`: one writer per output folder; a stale lock of a dead process is taken over, others refused."""

import json
import os
import socket

import pytest

from atlasvi.train.lock import LOCK_NAME, OutputBusy, OutputLock


def _left(folder, **holder) -> None:
    folder.mkdir(exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"command": "atlasvi train", "started": "then"} | holder))


def test_the_lock_names_its_holder_refuses_a_second_and_is_removed_after(tmp_path):
    with OutputLock(tmp_path / "out", command="atlasvi train --output out") as lock:
        holder = json.loads(lock.path.read_text())
        assert (holder["pid"], holder["host"], holder["command"]) == (
            os.getpid(), socket.gethostname(), "atlasvi train --output out",
        )  # fmt: skip
        with pytest.raises(OutputBusy, match=f"writing into this output folder \\(pid {os.getpid()}, host"):
            OutputLock(tmp_path / "out").acquire()
    assert not (tmp_path / "out").exists()  # created by the lock, left empty: removed
    (tmp_path / "kept").mkdir()
    with OutputLock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_others_are_refused(tmp_path):
    dead = 2**22 + 12345  # above Linux's default pid_max of 2^22: no such process
    _left(tmp_path / "a", pid=dead, host=socket.gethostname())
    with OutputLock(tmp_path / "a") as lock:
        assert lock.taken_over["pid"] == dead
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    _left(tmp_path / "b", pid=os.getppid(), host=socket.gethostname())  # a live process of this host
    with pytest.raises(OutputBusy, match=f"still running \\(pid {os.getppid()}.*remove .*{LOCK_NAME}"):
        OutputLock(tmp_path / "b").acquire()
    _left(tmp_path / "c", pid=dead, host="elsewhere")  # cannot be checked from here
    with pytest.raises(OutputBusy, match="on another host \\(pid .*, host elsewhere"):
        OutputLock(tmp_path / "c").acquire()
    assert json.loads((tmp_path / "c" / LOCK_NAME).read_text())["host"] == "elsewhere"  # left as it was
