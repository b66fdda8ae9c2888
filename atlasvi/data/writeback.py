"""Per-cell results written back into a local atlas store, chunk by chunk and atomically.

`ObsArrayWriter` fills a dense (n_cells, width) array for `obsm/<key>` or `layers/<key>` from rows that
arrive in store order, never holding more than one chunk of rows; `VarmWriter` stages a whole per-gene
(n_genes, width) array for `varm/<key>`. The array is written beside the store and only `commit` moves it
into place and re-consolidates the store's metadata, so an interrupted write leaves the store as it was and
`anndata.read_zarr` sees either the old array or the complete new one.

Every writer holds an exclusive `flock` on a lock file beside its staging folder for its whole life and
records its pid and host in it. A writer killed outright (SIGKILL, power loss) leaves its staging behind;
the next write-back into the same store removes it (`remove_stale_staging`): only staging whose lock
file nobody holds and was written on this host, so a live writer's staging and anything atlasvi did not
create are never touched. The store itself is checked first (`open_store` cross-checks its attrs against
its arrays), so the rows written are the store's rows and a write-back never makes a store unreadable.
"""

import fcntl
import glob
import json
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import zarr

from atlasvi.data.errors import StoreError
from atlasvi.data.store import AtlasStore, compressors, is_url, open_store

CHUNK_BYTES = 1 << 22  # about 4 MiB of float32 per chunk
LOCK_KIND = "atlasvi write-back"  # the `kind` recorded in a writer's lock file


def _consolidate(store: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec
        zarr.consolidate_metadata(str(store), zarr_format=3)


def remove_stale_staging(store: str | Path) -> list[Path]:
    """Remove what write-backs into `store` killed before they finished left beside it; returns the lock files
    of the dead writers cleaned up.

    A dead writer's lock file is one of this store's that nobody holds (`flock`) and that records this host.
    Its staging folder is removed; an array it had moved aside (`.replaced`) goes back in place if the new one
    never arrived, else is removed, and the store's metadata is re-consolidated.
    """
    store = Path(store)
    host = socket.gethostname()
    cleaned = []
    for lock in sorted(store.parent.glob(f".{glob.escape(store.name)}.*.lock")):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its writer is alive
                continue
            try:
                record = json.loads(os.read(fd, 1 << 16))
            except ValueError:
                continue  # not a lock file that atlasvi wrote
            if not isinstance(record, dict) or record.get("kind") != LOCK_KIND or record.get("host") != host:
                continue
            stem = str(lock)[: -len(".lock")]
            partial, replaced, target = Path(stem + ".partial"), Path(stem + ".replaced"), store / record["target"]
            if replaced.exists():
                if target.exists():
                    shutil.rmtree(replaced)
                else:
                    os.replace(replaced, target)
                _consolidate(store)
            shutil.rmtree(partial, ignore_errors=True)
            lock.unlink(missing_ok=True)
            cleaned.append(lock)
        finally:
            os.close(fd)
    return cleaned


class _StagedWriter:
    """Something built beside the store (`partial`) that `_swap_in` moves to `target` atomically."""

    path: Path
    target: Path
    partial: Path
    n_cells: int
    written: int

    def _claim(self, store: str | Path, target: str) -> AtlasStore:
        """Open and check the store, clean up dead writers' staging, take a lock file and a staging name for
        `target` (a path inside the store); returns the opened store."""
        if is_url(store):
            raise StoreError(f"{store}: results are written back only into a local store, not a URL")
        opened = open_store(store)
        self.path, self.target, self.n_cells = Path(store), Path(store) / target, opened.n_cells
        remove_stale_staging(self.path)
        stem = f".{self.path.name}.{target.replace('/', '.')}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = self.path.parent / f"{stem}.lock"
        self._lock_fd: int | None = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {"kind": LOCK_KIND, "pid": os.getpid(), "host": socket.gethostname(), "target": target}
        os.write(self._lock_fd, json.dumps(record).encode())
        self.partial = self.path.parent / f"{stem}.partial"
        self._replaced = self.path.parent / f"{stem}.replaced"
        return opened

    def _release(self) -> None:
        if self._lock_fd is not None:
            self._lock.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _swap_in(self, before_consolidating: Callable[[], None] | None = None) -> Path:
        """Check every row was written and the store still has these rows, rename the staged copy into place
        (retiring an old one), run `before_consolidating`, re-consolidate the store's metadata; returns the
        target."""
        if self.written != self.n_cells:
            self.abort()
            raise StoreError(f"{self.target}: {self.written} of {self.n_cells} rows written; the store is unchanged")
        n_cells = open_store(self.path).n_cells
        if n_cells != self.n_cells:
            self.abort()
            raise StoreError(
                f"{self.path}: the store now has {n_cells} cells, not the {self.n_cells} written (rebuilt meanwhile?); "
                "the store is unchanged"
            )
        self.target.parent.mkdir(exist_ok=True)
        if self.target.exists():
            os.replace(self.target, self._replaced)
        os.replace(self.partial, self.target)
        if before_consolidating is not None:
            before_consolidating()
        _consolidate(self.path)
        shutil.rmtree(self._replaced, ignore_errors=True)
        self._release()
        return self.target

    def abort(self) -> None:
        """Discard what was written; the store is unchanged."""
        if self._replaced.exists() and not self.target.exists():
            os.replace(self._replaced, self.target)
        shutil.rmtree(self.partial, ignore_errors=True)
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


class ObsArrayWriter(_StagedWriter):
    """Writes an (n_cells, width) float32 array into `group/key` of the store at `path`.

    Rows must come in order (`write(values)` appends values (n, width)); `commit` checks every row was
    written and replaces any array of the same name. attrs: extra attributes of the array (e.g. who wrote
    it; `array_attrs` reads them back).
    """

    def __init__(
        self,
        path: str | Path,
        group: Literal["obsm", "layers"],
        key: str,
        width: int,
        overwrite: bool = True,
        attrs: dict[str, Any] | None = None,
    ):
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"{key!r} is not a usable {group} key")
        if not overwrite and (Path(path) / group / key).exists():
            raise StoreError(f"{Path(path) / group / key}: {group}['{key}'] exists; pass overwrite to replace it")
        if width < 1:
            raise ValueError(f"{group}['{key}'] needs at least one column, not {width}")
        opened = self._claim(path, f"{group}/{key}")
        self.group, self.key = group, key
        if group == "layers" and width != opened.schema.n_genes:
            self._release()
            raise ValueError(f"a layer has one column per gene: {width} columns for {opened.schema.n_genes} genes")
        chunk_rows = int(max(1, min(self.n_cells, CHUNK_BYTES // (4 * width))))
        try:
            self.array = zarr.create_array(
                str(self.partial),
                shape=(self.n_cells, width),
                chunks=(chunk_rows, width),
                dtype="float32",
                compressors=compressors(3),
                attributes={**(attrs or {}), "encoding-type": "array", "encoding-version": "0.2.0"},
                zarr_format=3,
            )
        except BaseException:  # the lock file and the staged copy are ours: none is left beside the store
            self.abort()
            raise
        self.chunk_rows = chunk_rows
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.written = 0

    def write(self, values: np.ndarray) -> None:
        """Append the next rows (n, width); full chunks go to disk at once."""
        if values.ndim != 2 or values.shape[1] != self.array.shape[1]:
            raise ValueError(f"rows of shape {values.shape} for an array of width {self.array.shape[1]}")
        if self.written + self._buffered + len(values) > self.n_cells:
            raise ValueError(f"more rows than the store's {self.n_cells} cells")
        self._buffer.append(np.asarray(values, dtype=np.float32))
        self._buffered += len(values)
        if self._buffered >= self.chunk_rows:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        rows = np.concatenate(self._buffer) if self._buffer else np.zeros((0, self.array.shape[1]), np.float32)
        n = len(rows) // self.chunk_rows * self.chunk_rows if whole_chunks else len(rows)
        if n:
            self.array[self.written : self.written + n] = rows[:n]
            self.written += n
        self._buffer = [rows[n:]] if n < len(rows) else []
        self._buffered = len(rows) - n

    def commit(self) -> Path:
        """Move the finished array into the store and re-consolidate its metadata; returns its path."""
        self._flush(whole_chunks=False)
        return self._swap_in()


class VarmWriter(_StagedWriter):
    """Writes a whole (n_genes, width) float32 array into `varm/<key>` of the store at `path` (per-gene results,
    e.g. a linear decoder's loadings: small, so staged at once); `commit` moves it into place as `ObsArrayWriter`.
    """

    def __init__(self, path: str | Path, key: str, values: np.ndarray, attrs: dict[str, Any] | None = None):
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"{key!r} is not a usable varm key")
        opened = self._claim(path, f"varm/{key}")
        if values.ndim != 2 or values.shape[0] != opened.schema.n_genes:
            self._release()
            raise ValueError(f"varm has one row per gene: {values.shape} for {opened.schema.n_genes} genes")
        zarr.create_array(
            str(self.partial),
            data=np.asarray(values, dtype=np.float32),
            compressors=compressors(3),
            attributes={**(attrs or {}), "encoding-type": "array", "encoding-version": "0.2.0"},
            zarr_format=3,
        )
        self.written = self.n_cells  # no per-cell rows: `_swap_in` still checks the store was not rebuilt meanwhile

    def commit(self) -> Path:
        """Move the array into the store and re-consolidate its metadata; returns its path."""
        return self._swap_in()


def array_attrs(path: str | Path, group: str, key: str) -> dict[str, Any] | None:
    """The attributes of the array `group/key` of a local store (None when there is none)."""
    meta = Path(path) / group / key / "zarr.json"
    if not meta.exists():
        return None
    return dict(zarr.open_array(str(meta.parent), mode="r", zarr_format=3).attrs)


class ObsCategoricalWriter(_StagedWriter):
    """Writes a categorical column `obs/<key>` (codes in `categories`) into the local store at `path`.

    Codes must come in row order (`write(codes)` appends (n,) ints); the column is built beside the
    store and `commit` moves it into place, lists it in obs's column order and re-consolidates, so the
    store has either the old column or the complete new one. The store's own covariates are refused.
    """

    def __init__(self, path: str | Path, key: str, categories: list[str]):
        if not key or "/" in key or key.startswith((".", "_")):
            raise ValueError(f"{key!r} is not a usable obs key")
        schema = self._claim(path, f"obs/{key}").schema
        if key in schema.categorical or key in schema.continuous:
            self._release()
            raise ValueError(f"{key!r} is not a usable obs key (the store's covariates cannot be replaced)")
        self.key = key
        group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        group.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's notice on zarr autosharding concerns large arrays
            ad.io.write_elem(group, "categories", np.array(categories, dtype=object))
        dtype = np.int8 if len(categories) < 127 else np.int32
        self.codes = group.create_array(
            "codes", shape=(self.n_cells,), chunks=(max(1, min(self.n_cells, 1 << 16)),), dtype=dtype,
            compressors=compressors(3), fill_value=-1,
            attributes={"encoding-type": "array", "encoding-version": "0.2.0"},
        )  # fmt: skip
        self.n_categories = len(categories)
        self.written = 0

    def write(self, codes: np.ndarray) -> None:
        """Append the codes (n,) of the next rows."""
        codes = np.asarray(codes)
        if codes.ndim != 1 or self.written + len(codes) > self.n_cells:
            raise ValueError(f"{len(codes)} codes after {self.written} rows of a store of {self.n_cells} cells")
        if len(codes) and (codes.min() < 0 or codes.max() >= self.n_categories):
            raise ValueError(f"codes outside 0..{self.n_categories - 1}")
        self.codes[self.written : self.written + len(codes)] = codes.astype(self.codes.dtype)
        self.written += len(codes)

    def commit(self) -> Path:
        """Move the finished column into obs, add it to obs's column order, re-consolidate; returns its path."""

        def list_in_obs() -> None:
            obs = zarr.open_group(str(self.path / "obs"), mode="r+", zarr_format=3)
            order = list(obs.attrs.get("column-order", []))
            if self.key not in order:
                obs.attrs["column-order"] = [*order, self.key]

        return self._swap_in(list_in_obs)
