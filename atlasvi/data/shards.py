"""Direct reads of a local store's CSR counts: chunks decoded straight from the shard files and placed row by row.

The loader's hot path (`StreamingLoader`, backend "auto" on a local store). Each chunk of X/indices and X/data
(Zarr v3 sharding, index at the shard's end; inner codecs bytes, Blosc, crc32c, as `atlasvi build` writes them) is
read with one `pread`, its checksum verified, decoded by Blosc into a small per-thread scratch array, and its rows
are copied at once to their shuffled places in the window (and checked: counts > 0, gene indices in range and
increasing within a cell) while the chunk is still in cache. Decoding, placing and checking release the GIL. The
placing kernel comes from numba's cache; a loader loads it when it is built (`DirectCounts.load_kernel`), since
loading it costs ~0.5 s of CPU once per process, mostly numba importing its compiler's registries.

Against reading whole ranges through tensorstore and then gathering them, this skips a full pass of the decoded
counts through memory (benchmarks/README.md, "Loader and build"). Anything this path does not handle as the
standard reader would (another codec, a URL, a missing shard or chunk, a bad checksum, a count or index that fails
the checks) makes `place` return False: the caller then reads through the store's backend, whose validation names
the damaged chunk.
"""

import json
import os
import threading
from pathlib import Path

import numba
import numpy as np
from numcodecs import blosc

CRC32C_RESIDUE = 0x48674BC7  # crc32c of any message followed by its own crc32c (little-endian)
_EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk that was never written


def _crc32c_ok(chunk: bytes) -> bool:
    """Whether the chunk's last 4 bytes are the crc32c (little-endian) of the rest."""
    import google_crc32c

    return google_crc32c.value(chunk) == CRC32C_RESIDUE


class _ShardedArray:
    """One 1-D sharded array of a local store, read chunk by chunk (each shard's index read once; no file is kept
    open between reads, so an atlas of any size holds no descriptors)."""

    def __init__(self, folder: Path, meta: dict):
        sharding = meta["codecs"][0]["configuration"]
        self.folder = folder
        self.dtype = np.dtype(meta["data_type"])
        self.chunk = int(sharding["chunk_shape"][0])
        self.per_shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]) // self.chunk
        self._indexes: dict[int, np.ndarray] = {}

    def _read(self, shard: int, nbytes: int, offset: int | None) -> bytes:
        """nbytes of a shard file from offset (None: its last nbytes); b"" where the file is missing or shorter."""
        try:
            fd = os.open(self.folder / "c" / str(shard), os.O_RDONLY)
        except OSError:
            return b""
        try:
            if offset is None:
                offset = os.fstat(fd).st_size - nbytes
            return os.pread(fd, nbytes, offset) if offset >= 0 else b""
        finally:
            os.close(fd)

    def _index(self, shard: int) -> np.ndarray | None:
        """(chunks per shard, 2) offset and size of each chunk in a shard file; None if it is missing or damaged."""
        if shard not in self._indexes:
            raw = self._read(shard, 16 * self.per_shard + 4, None)
            if len(raw) != 16 * self.per_shard + 4 or not _crc32c_ok(raw):
                return None
            self._indexes[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)
        return self._indexes[shard]

    def decode(self, chunk: int, out: np.ndarray) -> bool:
        """Chunk `chunk` decoded into `out` (chunk-sized); False where it is missing, damaged or not that size."""
        shard = chunk // self.per_shard
        index = self._index(shard)
        if index is None:
            return False
        offset, nbytes = index[chunk % self.per_shard]
        if offset == _EMPTY or nbytes < 20:
            return False
        raw = self._read(shard, int(nbytes), int(offset))
        if len(raw) != nbytes or not _crc32c_ok(raw):
            return False
        body = memoryview(raw)[:-4]
        if int.from_bytes(body[4:8], "little") != out.nbytes:  # the Blosc header's decoded size
            return False
        try:
            blosc.decompress(body, out)
        except (RuntimeError, ValueError):
            return False
        return True


def _supported(meta: dict) -> bool:
    """A 1-D array sharded as `atlasvi build` writes counts: index at the end (bytes + crc32c), each chunk bytes
    (little-endian), Blosc, crc32c."""
    try:
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        inner = [c["name"] for c in config["codecs"]]
        index = [c["name"] for c in config["index_codecs"]]
        little = all(c.get("configuration", {}).get("endian", "little") == "little" for c in config["codecs"])
        return (
            codec["name"] == "sharding_indexed"
            and meta["chunk_grid"]["name"] == "regular"
            and len(meta["shape"]) == 1
            and inner == ["bytes", "blosc", "crc32c"]
            and little
            and index == ["bytes", "crc32c"]
            and config.get("index_location", "end") == "end"
            and config["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/"
            and meta.get("storage_transformers", []) == []
        )
    except (KeyError, TypeError, ValueError):
        return False


class DirectCounts:
    """X/indices and X/data of a local store, placed row by row into a window (see the module docstring)."""

    def __init__(self, indices: _ShardedArray, data: _ShardedArray, n_columns: int):
        self.indices, self.data, self.n_columns = indices, data, n_columns
        self._scratch = threading.local()

    @classmethod
    def open(cls, path: str, prefix: str, n_columns: int) -> "DirectCounts | None":
        """The reader of `path`/`prefix`/{indices,data}, or None where this path does not apply."""
        arrays = []
        for name in ("indices", "data"):
            folder = Path(path) / prefix / name
            try:
                meta = json.loads((folder / "zarr.json").read_text())
            except (OSError, ValueError):
                return None
            if not _supported(meta):
                return None
            arrays.append(_ShardedArray(folder, meta))
        indices, data = arrays
        if indices.chunk != data.chunk or indices.dtype.kind not in "iu":
            return None
        return cls(indices, data, n_columns)

    def load_kernel(self, out_indices: type, out_values: type) -> None:
        """Load the placing kernel for this store's dtypes and outputs of these dtypes (numba's cached machine code:
        ~0.5 s of CPU once per process, nearly all numba setting up its compiler context), so that the first window
        does not wait for it; places nothing. `place` then runs this very compiled version."""
        pointer = np.zeros(1, dtype=np.int64)  # one row pointer: no rows
        _place_chunk(
            np.empty(0, self.indices.dtype), np.empty(0, self.data.dtype), 0, 0, 0, pointer, pointer[:0], 0, -1,
            self.n_columns, np.empty(0, out_indices), np.empty(0, out_values),
        )  # fmt: skip

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        scratch = self._scratch
        if not hasattr(scratch, "indices"):
            scratch.indices = np.empty(self.indices.chunk, dtype=self.indices.dtype)
            scratch.data = np.empty(self.data.chunk, dtype=self.data.dtype)
        return scratch.indices, scratch.data

    def place(
        self, pointers: list[np.ndarray], starts: list[np.ndarray], out_indices: np.ndarray, out_values: np.ndarray
    ) -> bool:
        """Copy each block's rows to their places: row r of block b (its entries pointers[b][r]:pointers[b][r + 1]
        of the arrays, absolute int64 positions) goes to out_*[starts[b][r]:], the counts cast to out_values' dtype.
        False (with out_* partly written) where a chunk is missing or damaged or an entry fails the checks."""
        chunk_indices, chunk_data = self._buffers()
        size = self.indices.chunk
        for pointer, start in zip(pointers, starts, strict=True):
            lo, hi = int(pointer[0]), int(pointer[-1])
            if lo == hi:
                continue
            row, previous = 0, -1
            for chunk in range(lo // size, -(-hi // size)):
                if not (self.indices.decode(chunk, chunk_indices) and self.data.decode(chunk, chunk_data)):
                    return False
                first = chunk * size
                ok, row, previous = _place_chunk(
                    chunk_indices, chunk_data, first, max(lo, first), min(hi, first + size), pointer, start, row,
                    previous, self.n_columns, out_indices, out_values,
                )  # fmt: skip
                if not ok:
                    return False
        return True


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _place_chunk(
    chunk_indices, chunk_data, first, lo, hi, pointer, start, row, previous, n_columns, out_indices, out_values
):
    """Place entries [lo, hi) (absolute; the chunk holds entries from `first`), from row `row` on, whose entries
    before lo end with gene index `previous`; returns (all checks passed, the row holding entry hi - 1 or the next,
    the last gene index placed)."""
    ok = True
    n_rows = len(pointer) - 1
    while row < n_rows and pointer[row] < hi:
        a, z = max(pointer[row], lo), min(pointer[row + 1], hi)
        n = np.uint64(z - a)
        source = np.uint64(a - first)
        target = np.uint64(start[row] + (a - pointer[row]))
        for k in range(n):
            out_indices[target + k] = chunk_indices[source + k]
        for k in range(n):
            out_values[target + k] = chunk_data[source + k]
        last = previous if a > pointer[row] else -1
        for k in range(n):
            gene = np.int64(chunk_indices[source + k])
            ok &= (chunk_data[source + k] > 0) & (gene > last) & (gene < n_columns)
            last = gene
        previous = last
        if pointer[row + 1] > hi:
            break
        row += 1
    return ok, row, previous
