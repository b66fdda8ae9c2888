"""One writer per output folder: `OutputLock` holds `FOLDER/.atlasvi.lock` while a command writes there.

The lock file names its holder (pid, host, command, start time) and is held with an exclusive `flock`,
which the operating system releases when the holder dies, however it dies (SIGKILL included). A second
command on the folder is refused at once with `OutputBusy`, naming the holder. A lock file its holder
did not remove is checked too (a filesystem may not enforce flock): one of a dead process on this host
is stale and taken over, with a note (`taken_over`); one of a live process, or of another host (which
cannot be checked from here), is refused, naming the file to remove once that command has ended.
"""

import errno
import fcntl
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlasvi.errors import AtlasviError

LOCK_NAME = ".atlasvi.lock"


class OutputBusy(AtlasviError):
    """Another command is writing into the output folder."""


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (signal 0 probes without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """'pid 12, host h, since 2026-01-01T10:00:00+00:00: atlasvi train ...' from a lock file's content."""
    if not holder:
        return "a command that is just starting"
    return (
        f"pid {holder.get('pid')}, host {holder.get('host')}, since {holder.get('started')}: "
        f"{holder.get('command', '?')}"
    )


class OutputLock:
    """Hold `folder`'s lock (the folder is created if absent) for the `with` block, or acquire() / release().

    Raises OutputBusy when another live command holds it. taken_over: the content of the stale lock
    of a dead command that this one replaced (None when there was none).
    """

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]
        self.taken_over: dict[str, Any] | None = None
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> "OutputLock":
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self._created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputBusy(
                    f"{self.folder}: another command is writing into this output folder ({describe(self._read())}); "
                    "wait for it to end, or pass another --output"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else its holder released (removed) it between our open and flock: try again
                break
            os.close(fd)
        self._fd = fd
        left = self._read()
        if left:  # a holder that did not release it: on this host, a dead pid is stale; else refuse
            here, pid = left.get("host") == socket.gethostname(), int(left.get("pid") or -1)
            if not here or (pid != os.getpid() and _alive(pid)):
                os.close(fd)
                self._fd = None
                where = "on another host" if not here else "still running"
                raise OutputBusy(
                    f"{self.folder}: locked by a command {where} ({describe(left)}); once it has ended, "
                    f"remove {self.path}, or pass another --output"
                )
            self.taken_over = left
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        return self

    def _read(self) -> dict[str, Any]:
        try:
            content = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return content if isinstance(content, dict) else {}

    def release(self) -> None:
        """Remove the lock file and let go (an output folder this lock created and nothing filled is removed)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created_folder and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
