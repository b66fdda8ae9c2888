"""Per-cell results written back into a local atlas store, chunk by chunk and atomically.

`ObsArrayWriter` fills a dense (n_cells, width) array for `obsm/<key>` or `layers/<key>` from rows that
arrive in store order, never holding more than one chunk of rows. The array is written beside the store
and only `commit` moves it into place and re-consolidates the store's metadata, so an interrupted write
leaves the store as it was and `anndata.read_zarr` sees either the old array or the complete new one.
"""

import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import zarr

from atlasvi.data.errors import StoreError
from atlasvi.data.store import compressors, is_url, read_store_attrs

CHUNK_BYTES = 1 << 22  # about 4 MiB of float32 per chunk


class _StagedWriter:
    """Something built beside the store (`partial`) that `_swap_in` moves to `target` atomically."""

    path: Path
    target: Path
    partial: Path
    n_cells: int
    written: int

    def _swap_in(self, before_consolidating: Callable[[], None] | None = None) -> Path:
        """Check every row was written, rename the staged copy into place (retiring an old one), run
        `before_consolidating`, re-consolidate the store's metadata; returns the target."""
        if self.written != self.n_cells:
            self.abort()
            raise StoreError(f"{self.target}: {self.written} of {self.n_cells} rows written; the store is unchanged")
        self.target.parent.mkdir(exist_ok=True)
        replaced = None
        if self.target.exists():
            replaced = self.partial.with_suffix(".replaced")
            os.replace(self.target, replaced)
        os.replace(self.partial, self.target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec
            if before_consolidating is not None:
                before_consolidating()
            zarr.consolidate_metadata(str(self.path), zarr_format=3)
        if replaced is not None:
            shutil.rmtree(replaced)
        return self.target

    def abort(self) -> None:
        """Discard what was written; the store is unchanged."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


class ObsArrayWriter(_StagedWriter):
    """Writes an (n_cells, width) float32 array into `group/key` of the store at `path`.

    Rows must come in order (`write(values)` appends values (n, width)); `commit` checks every row was
    written and replaces any array of the same name.
    """

    def __init__(
        self, path: str | Path, group: Literal["obsm", "layers"], key: str, width: int, overwrite: bool = True
    ):
        if is_url(path):
            raise StoreError(f"{path}: results are written back only into a local store, not a URL")
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"{key!r} is not a usable {group} key")
        self.path, self.group, self.key = Path(path), group, key
        self.n_cells = int(read_store_attrs(path)["n_cells"])
        self.target = self.path / group / key
        if self.target.exists() and not overwrite:
            raise StoreError(f"{self.target}: {group}['{key}'] exists; pass overwrite to replace it")
        self.partial = self.path.parent / f".{self.path.name}.{group}.{key}.{uuid.uuid4().hex[:8]}.partial"
        chunk_rows = int(max(1, min(self.n_cells, CHUNK_BYTES // (4 * width))))
        self.array = zarr.create_array(
            str(self.partial),
            shape=(self.n_cells, width),
            chunks=(chunk_rows, width),
            dtype="float32",
            compressors=compressors(3),
            attributes={"encoding-type": "array", "encoding-version": "0.2.0"},
            zarr_format=3,
        )
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


class ObsCategoricalWriter(_StagedWriter):
    """Writes a categorical column `obs/<key>` (codes in `categories`) into the local store at `path`.

    Codes must come in row order (`write(codes)` appends (n,) ints); the column is built beside the
    store and `commit` moves it into place, lists it in obs's column order and re-consolidates, so the
    store has either the old column or the complete new one. The store's own covariates are refused.
    """

    def __init__(self, path: str | Path, key: str, categories: list[str]):
        if is_url(path):
            raise StoreError(f"{path}: results are written back only into a local store, not a URL")
        meta = read_store_attrs(path)
        if (
            not key
            or "/" in key
            or key.startswith((".", "_"))
            or key in meta["categorical"]
            or key in meta["continuous"]
        ):
            raise ValueError(f"{key!r} is not a usable obs key (the store's covariates cannot be replaced)")
        self.path, self.key, self.n_cells = Path(path), key, int(meta["n_cells"])
        self.target = self.path / "obs" / key
        self.partial = self.path.parent / f".{self.path.name}.obs.{key}.{uuid.uuid4().hex[:8]}.partial"
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
