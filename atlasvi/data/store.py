"""The atlas store: an AnnData Zarr (format 3) store plus atlasvi attrs, and its readers.

Layout (any scverse tool opens it with `anndata.read_zarr`):
  X/{data,indices,indptr}   CSR of integer counts, cells x genes, rows globally pre-shuffled
  obs/_index, obs/<key>     cell names; categorical covariates (codes + categories); continuous ones
  var                       gene ids, gene names, HVG flags and statistics
  obsm/<modality key>       (schema 2) a dense per-cell modality, e.g. obsm/protein_expression: cells x
                            proteins integer counts, where scvi-tools' totalVI reads them (feature names in
                            uns/<modality key>_names, as its `protein_names_uns_key`); 0 where not measured
  obsm/<modality key>_mask  (schema 2) cells x features uint8: 1 = measured, 0 = not (a cell without the
                            modality, a protein outside its study's panel): missing is never read as zero
  obsm/atac/{data,indices,indptr}  (schema 2) a sparse modality, e.g. scATAC peak counts: CSR cells x peaks,
                            chunked as X (anndata reads it as a sparse obsm matrix), peak names in
                            uns/atac_names; its mask obsm/atac_mask is cells x 1 (whether the cell's ATAC
                            was measured). A store with peaks holds the union of RNA and ATAC cells, and
                            obsm/rna_mask (cells x 1) says whose RNA was measured (X's row of a cell without
                            RNA is empty and is not a measurement of zero). One AnnData: `anndata.read_zarr`
                            opens every modality, and a MuData is one call away
                            (`MuData({"rna": adata, "atac": AnnData(adata.obsm["atac"], ...)})`).
  obsm/spatial              spatial coordinates (cells x 2 or 3, float64) of a store built from inputs that
                            have them (attrs "spatial": {obsm_key, n_dims}); no model reads them
  attrs["atlasvi"]          schema version, genes, covariate categories, library-size prior, modalities,
                            provenance

Schema 1 stores (RNA only, before modalities) still open, with no modalities.

Every chunk is compressed (Blosc lz4 or zstd; byte shuffle for the CSR column indices, bitshuffle for
everything else) and checksummed (crc32c), and every array's fill value is one that real data never holds
(0 for counts, -1 for indices, indptr and codes, NaN for continuous covariates, the dtype's largest value for
a dense modality's counts, 255 for its mask). A corrupt chunk fails its checksum; a missing or truncated one
reads as the fill value, which block validation rejects: a damaged store is never read silently as zeros.
"""

import hashlib
import json
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from atlasvi.data.errors import StoreCorruptError, StoreError
from atlasvi.data.shards import DirectCounts
from atlasvi.errors import caused_by_interrupt

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
ATTRS_KEY = "atlasvi"
CHUNK_NNZ = 1 << 18  # non-zeros per chunk of X/data and X/indices (1 MiB of int32)
SHARD_NNZ = 1 << 22  # non-zeros per shard file
CHUNK_ROWS = 1 << 16  # rows per chunk of X/indptr and of obs arrays
SHARD_ROWS = 1 << 20
PROTEIN_OBSM_KEY = "protein_expression"  # where scvi-tools' totalVI tutorials keep protein counts
ATAC_OBSM_KEY = "atac"  # MuData's (and muon's) name of the chromatin-accessibility modality
SPATIAL_OBSM_KEY = "spatial"  # where scanpy and squidpy keep spots' coordinates
RNA_MASK_KEY = "rna"  # the RNA presence mask of a store with peaks: obsm/rna_mask (the counts are X)
DENSE_CHUNK_BYTES = 1 << 20  # a dense modality's chunk: about 1 MiB of counts (rows x features)
DENSE_SHARD_CHUNKS = 16  # chunks of rows per shard file of a dense modality

FILL_VALUES = {"X/data": 0, "X/indices": -1, "X/indptr": -1}


def compressors(level: int, cname: str = "zstd", shuffle: str = "bitshuffle") -> list:
    """Blosc (zstd by default, or lz4) + bitshuffle (or "shuffle": byte shuffle), then a crc32c checksum of every
    chunk."""
    return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle), Crc32cCodec()]


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


@dataclass(frozen=True)
class ModalitySchema:
    """A per-cell modality of the store beside the RNA counts in X: dense (surface-protein counts) or CSR (peaks).

    kind: "dense", counts at obsm/<obsm_key>, (n_cells, n_features), mask at obsm/<obsm_key>_mask of the same
    shape, 1 = measured; "csr", counts as CSR at obsm/<obsm_key>/{data,indices,indptr} (nnz stored counts, all
    > 0) and mask (n_cells, 1), 1 = the cell's modality was measured; "mask", only the mask (n_cells, 1) of a
    modality whose counts are elsewhere (the RNA of a store with peaks: its counts are X, "features" empty).
    n_measured: (kind "mask") how many cells have the modality.
    features: (n_features,) names (antibodies); count_dtype: the counts' integer dtype.
    batch_mask: per batch category, (n_features,) whether any cell of that batch measured the feature
      (scvi-tools' `protein_batch_mask`: a study's panel); for a CSR modality (1,): whether any cell did.
    background_log_means, background_log_scales: per batch, the empirical prior of the log background
      (scvi-tools' totalVI initialisation: a 2-component Gaussian mixture over each of up to 100 cells'
      log1p counts of the measured features, the lower component's mean and s.d. averaged over the cells).
    chunk_rows: rows per chunk of the counts (dense) and of the mask.
    """

    obsm_key: str
    features: tuple[str, ...]
    count_dtype: str
    batch_mask: tuple[tuple[bool, ...], ...]
    background_log_means: tuple[float, ...]
    background_log_scales: tuple[float, ...]
    chunk_rows: int
    kind: str = "dense"
    nnz: int = 0
    n_measured: int | None = None

    @property
    def mask_key(self) -> str:
        return f"{self.obsm_key}_mask"

    @property
    def fill_value(self) -> int:
        """The counts' fill value: the dtype's largest, which a build never stores."""
        return int(np.iinfo(np.dtype(self.count_dtype)).max)

    @classmethod
    def from_dict(cls, meta: dict) -> "ModalitySchema":
        return cls(
            obsm_key=meta["obsm_key"],
            features=tuple(meta["features"]),
            count_dtype=meta["count_dtype"],
            batch_mask=tuple(tuple(bool(v) for v in row) for row in meta["batch_mask"]),
            background_log_means=tuple(meta["background_log_means"]),
            background_log_scales=tuple(meta["background_log_scales"]),
            chunk_rows=int(meta["chunk_rows"]),
            kind=meta.get("kind", "dense"),
            nnz=int(meta.get("nnz", 0)),
            n_measured=None if meta.get("n_measured") is None else int(meta["n_measured"]),
        )


@dataclass(frozen=True)
class StoreSchema:
    """What a model needs to know of a store: genes, covariates and the library-size prior.

    library_log_means, library_log_vars: (n_batch,) mean and variance of log total counts per batch.
    categorical: key -> categories (codes in obs index into them); continuous: keys of float covariates.
    modalities: name (e.g. "protein") -> the dense modality beside X; none in an RNA-only store.
    """

    n_cells: int
    n_genes: int
    gene_ids: tuple[str, ...]
    gene_names: tuple[str, ...]
    batch_key: str
    labels_key: str | None
    categorical: dict[str, tuple[str, ...]]
    continuous: tuple[str, ...]
    library_log_means: tuple[float, ...]
    library_log_vars: tuple[float, ...]
    count_dtype: str
    modalities: dict[str, ModalitySchema] = field(default_factory=dict)

    @property
    def batch_categories(self) -> tuple[str, ...]:
        return self.categorical[self.batch_key]

    @classmethod
    def from_attrs(cls, meta: dict, where: str) -> "StoreSchema":
        version = meta.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{where}: atlas store schema version {version}, this atlasvi reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the store with `atlasvi build`"
            )
        missing = [name for name in cls.__dataclass_fields__ if name not in meta and name != "modalities"]
        if missing:
            raise StoreError(
                f"{where}: the atlas store's attrs lack {', '.join(missing)}; rebuild it with `atlasvi build`"
            )
        return cls(
            n_cells=int(meta["n_cells"]),
            n_genes=int(meta["n_genes"]),
            gene_ids=tuple(meta["gene_ids"]),
            gene_names=tuple(meta["gene_names"]),
            batch_key=meta["batch_key"],
            labels_key=meta["labels_key"],
            categorical={k: tuple(v) for k, v in meta["categorical"].items()},
            continuous=tuple(meta["continuous"]),
            library_log_means=tuple(meta["library_log_means"]),
            library_log_vars=tuple(meta["library_log_vars"]),
            count_dtype=meta["count_dtype"],
            modalities={k: ModalitySchema.from_dict(v) for k, v in (meta.get("modalities") or {}).items()},
        )


Request = tuple[str, int, int]
"""(array name, start, stop): a contiguous range of a 1-D array of the store."""

PointRequest = tuple[str, np.ndarray]
"""(array name, sorted element positions): scattered elements of a 1-D array, each chunk decoded once."""


class ArrayReader(Protocol):
    """Reads ranges (or scattered elements) of the store's 1-D arrays; results (or errors) in request order."""

    def read_many(self, requests: list[Request]) -> list[np.ndarray | Exception]: ...

    def read_points(self, requests: list[PointRequest]) -> list[np.ndarray | Exception]: ...


class ZarrReader:
    """zarr-python backend; local paths and fsspec URLs (http://, s3://, gs://, ...).

    codec_pipeline: zarr-python's own, or "zarrs.ZarrsCodecPipeline" (the Rust pipeline of the `zarrs`
    package), bound to these arrays only.
    """

    def __init__(self, path: str, names: list[str], codec_pipeline: str | None = None):
        if is_url(path):
            store = zarr.storage.FsspecStore.from_url(path, read_only=True)
        else:
            store = zarr.storage.LocalStore(path, read_only=True)
        settings = {"codec_pipeline.path": codec_pipeline} if codec_pipeline else {}
        with zarr.config.set(settings):
            self._arrays = {name: zarr.open_array(store=store, path=name, mode="r") for name in names}

    def read_many(self, requests: list[Request]) -> list[np.ndarray | Exception]:
        results: list[np.ndarray | Exception] = []
        for name, start, stop in requests:
            try:
                results.append(self._arrays[name][start:stop])
            except Exception as err:  # noqa: BLE001 - reported per request by the caller
                results.append(err)
        return results

    def read_points(self, requests: list[PointRequest]) -> list[np.ndarray | Exception]:
        results: list[np.ndarray | Exception] = []
        for name, points in requests:
            try:
                array = self._arrays[name]
                if array.ndim == 1:
                    results.append(array.get_coordinate_selection(points))
                else:  # rows of a 2-D array
                    results.append(array.get_orthogonal_selection((points, slice(None))))
            except Exception as err:  # noqa: BLE001 - reported per request by the caller
                results.append(err)
        return results


def _refs(items: list, i: int) -> int:
    """References to items[i] (CPython's count), taken the same way wherever `Buffers` asks."""
    return sys.getrefcount(items[i])


class Buffers:
    """Reused byte buffers: one is handed out again only once nothing but the pool refers to it.

    Whatever is made from a buffer (numpy views, tensors from them, minibatches) holds a reference to it, so a
    buffer is busy while any of them lives and idle once the pool's reference is the only one. Memory already
    mapped spares the page faults (and kernel time) of fresh arrays every window: a third of a window's CPU on a
    1M-cell store (benchmarks/README.md, "Loader and build"). Requests from `smallest` to `largest` bytes are
    served from at most `keep` buffers, an idle one only where it is at most twice the request; others get a
    fresh array.
    """

    def __init__(self, keep: int, smallest: int = 1, largest: int = 1 << 28):
        self._buffers: list[np.ndarray] = []
        self._keep, self._smallest, self._largest = keep, smallest, largest
        self._lock = threading.Lock()
        probe = [np.empty(1, dtype=np.uint8)]
        self._idle = _refs(probe, 0)  # the references of an array that only a list holds

    def take(self, nbytes: int) -> np.ndarray:
        """(nbytes,) uint8, uninitialised, which nothing else refers to."""
        if not self._smallest <= nbytes <= self._largest:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            buffers = self._buffers
            idle = [i for i in range(len(buffers)) if _refs(buffers, i) == self._idle]
            fits = [i for i in idle if nbytes <= len(buffers[i]) <= 2 * nbytes]
            if fits:
                return buffers[fits[0]][:nbytes]
            fresh = np.empty(nbytes + nbytes // 8, dtype=np.uint8)  # room for a somewhat larger request later
            if len(buffers) < self._keep:
                buffers.append(fresh)
            elif idle:
                buffers[idle[0]] = fresh  # an idle buffer of the wrong size makes way
            else:
                return np.empty(nbytes, dtype=np.uint8)  # all busy: a plain array, freed with its last user
            return fresh[:nbytes]


class TensorStoreReader:
    """tensorstore backend; reads of missing chunks raise (fill_missing_data_reads=False). Ranges are decoded into
    reused buffers (`Buffers`)."""

    def __init__(self, path: str, names: list[str]):
        import tensorstore as ts

        def kvstore(name: str) -> dict:
            if is_url(path):
                return {"driver": "http", "base_url": path.rstrip("/"), "path": f"/{name}/"}
            return {"driver": "file", "path": str(Path(path) / name) + "/"}

        self._ts = ts
        self._buffers = Buffers(keep=16)  # a window's reads, two windows read at once, and room
        self._arrays = {
            name: ts.open(
                {"driver": "zarr3", "kvstore": kvstore(name), "fill_missing_data_reads": False},
                read=True,
                open=True,
            ).result()
            for name in names
        }

    def read_many(self, requests: list[Request]) -> list[np.ndarray | Exception]:
        """All requests in flight at once (tensorstore decodes them concurrently), each into a buffer of the pool."""
        outputs, futures = [], []
        for name, start, stop in requests:
            array = self._arrays[name][start:stop]
            dtype = array.dtype.numpy_dtype
            shape = tuple(array.shape)  # (rows,) or (rows, width)
            out = self._buffers.take(int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)
            outputs.append(out)
            futures.append(self._ts.array(out, copy=False, write=True).write(array) if out.size else array.read())
        results: list[np.ndarray | Exception] = []
        for out, future in zip(outputs, futures, strict=True):
            try:
                read = future.result()
                results.append(out if out.size else read)
            except Exception as err:  # noqa: BLE001 - reported per request by the caller
                results.append(err)
        return results

    def read_points(self, requests: list[PointRequest]) -> list[np.ndarray | Exception]:
        futures = [self._arrays[name].oindex[points].read() for name, points in requests]
        return _results(futures)


def _results(futures: list) -> list[np.ndarray | Exception]:
    results: list[np.ndarray | Exception] = []
    for future in futures:
        try:
            results.append(future.result())
        except Exception as err:  # noqa: BLE001 - reported per request by the caller
            results.append(err)
    return results


def _chunk_of(name: str, element: int, dense_rows: dict[str, int] | None = None) -> str:
    """Where element (or row) `element` of array `name` lives: its chunk and its shard file.

    dense_rows: rows per chunk of the store's 2-D (modality) arrays, by name.
    """
    nnz_array = name.endswith(("/data", "/indices"))
    per_chunk = CHUNK_NNZ if nnz_array else (dense_rows or {}).get(name, CHUNK_ROWS)
    per_shard = (
        SHARD_NNZ if nnz_array else SHARD_ROWS if name not in (dense_rows or {}) else per_chunk * DENSE_SHARD_CHUNKS
    )
    chunk = element // per_chunk
    return (
        f"{chunk} = elements {chunk * per_chunk}..{(chunk + 1) * per_chunk - 1}, "
        f"in shard file {name}/c/{element // per_shard}"
    )


@dataclass
class RowBlock:
    """Rows [start, stop) of the store: CSR counts and obs covariates.

    indptr: (n+1,) int64 from 0; indices, data: (nnz,); categorical: key -> (n,) int codes;
    continuous: key -> (n,) float; obsm, masks: the modalities read with the block (see `read_ranges`).
    """

    start: int
    stop: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    categorical: dict[str, np.ndarray]
    continuous: dict[str, np.ndarray]
    rows: np.ndarray | None = None  # the store rows of a block of scattered rows (`read_selected`)
    obsm: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (n, n_features) counts
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (n, n_features) bool, True = measured
    first_entry: int = 0  # X's entry (position in X/indices, X/data) of the block's first stored count


class AtlasStore:
    """An opened atlas store: its schema and validated reads of row ranges.

    rows_read: (n_cells,) bool, the rows this reader has fetched (a rank's shard can be audited with it).
    """

    def __init__(self, path: str | Path, backend: str = "auto"):
        self.path = str(path)
        direct = backend == "auto" and not is_url(self.path)
        self.backend = backend = resolve_backend(backend, self.path)
        root = _open_root(self.path)
        meta = _atlas_attrs(root, self.path)
        self.schema = StoreSchema.from_attrs(meta, self.path)
        if "nnz" not in meta:
            raise StoreError(f"{self.path}: the atlas store's attrs lack nnz; rebuild it with `atlasvi build`")
        self.nnz = int(meta["nnz"])
        self._check_shapes(root)
        self.rows_read = np.zeros(self.schema.n_cells, dtype=bool)
        self._dense_rows = {f"obsm/{m.mask_key}": m.chunk_rows for m in self.schema.modalities.values()}
        self._dense_rows |= {
            f"obsm/{m.obsm_key}": m.chunk_rows for m in self.schema.modalities.values() if m.kind == "dense"
        }
        names = ["X/data", "X/indices", "X/indptr"]
        names += [f"obs/{k}/codes" for k in self.schema.categorical]
        names += [f"obs/{k}" for k in self.schema.continuous]
        for modality in self.schema.modalities.values():
            counts = [f"obsm/{modality.obsm_key}"] if modality.kind == "dense" else []
            if modality.kind == "csr":
                counts = [f"obsm/{modality.obsm_key}/{part}" for part in ("data", "indices", "indptr")]
            names += [*counts, f"obsm/{modality.mask_key}"]
        try:
            self._reader: ArrayReader = _make_reader(backend, self.path, names)
        except Exception as err:
            if caused_by_interrupt(err):
                raise KeyboardInterrupt from err
            raise StoreError(f"{self.path}: cannot open the store's arrays ({backend}): {err}") from err
        self._check_contents(root)
        self._direct = DirectCounts.open(self.path, "X", self.schema.n_genes) if direct else None

    @property
    def direct_counts(self) -> bool:
        """Whether `place_counts` reads X's counts straight from the shard files (backend "auto", a local store
        written as `atlasvi build` writes it; `atlasvi.data.shards`)."""
        return self._direct is not None

    def load_counts_kernel(self, out_indices: type, out_values: type) -> None:
        """Load now the kernel that `place_counts` runs into outputs of these dtypes (`shards.DirectCounts.load_kernel`;
        nothing where X is not read directly)."""
        if self._direct is not None:
            self._direct.load_kernel(out_indices, out_values)

    def place_counts(
        self, pointers: list[np.ndarray], starts: list[np.ndarray], out_indices: np.ndarray, out_values: np.ndarray
    ) -> bool:
        """X's rows of several blocks copied to their places (`shards.DirectCounts.place`: pointers are each block's
        absolute int64 row pointers, starts where each row goes). False where this reader cannot place them all as
        validated counts (no direct reader, a missing or damaged chunk, an entry that fails the checks): read the
        rows with `read_ranges` then, which names the damage."""
        return self._direct is not None and self._direct.place(pointers, starts, out_indices, out_values)

    def _mismatch(self, field: str, value: object, what: str, actual: object) -> StoreError:
        return StoreError(
            f"{self.path}: attrs {field} = {value} but {what} = {actual}; the store's attrs do not match its "
            "arrays (edited or damaged): rebuild it with `atlasvi build`"
        )

    def _check_shapes(self, root: zarr.Group) -> None:
        """The attrs' counts (cells, genes, non-zeros, categories) against the arrays' shapes: metadata only."""
        schema, n = self.schema, self.schema.n_cells
        index = root["obs"].attrs.get("_index", "_index") if "obs" in root else "_index"
        lengths = {name: _length(root, name, self.path) for name in ("X/indptr", "X/data", "X/indices", "var/_index")}
        shape = root["X"].attrs.get("shape", [None, None])
        checks: list[tuple[str, object, str, object]] = [
            ("n_cells", n, "len(X/indptr) - 1", lengths["X/indptr"] - 1),
            ("n_cells", n, f"len(obs/{index})", _length(root, f"obs/{index}", self.path)),
            ("n_cells", n, "X's shape[0]", shape[0]),
            ("nnz", self.nnz, "len(X/data)", lengths["X/data"]),
            ("nnz", self.nnz, "len(X/indices)", lengths["X/indices"]),
            ("n_genes", schema.n_genes, "len(var/_index)", lengths["var/_index"]),
            ("n_genes", schema.n_genes, "X's shape[1]", shape[1]),
            ("n_genes", schema.n_genes, "len(gene_ids)", len(schema.gene_ids)),
            ("n_genes", schema.n_genes, "len(gene_names)", len(schema.gene_names)),
        ]
        for key, categories in schema.categorical.items():
            checks.append(("n_cells", n, f"len(obs/{key}/codes)", _length(root, f"obs/{key}/codes", self.path)))
            length = _length(root, f"obs/{key}/categories", self.path)
            checks.append((f"len(categorical.{key})", len(categories), f"len(obs/{key}/categories)", length))
        for key in schema.continuous:
            checks.append(("n_cells", n, f"len(obs/{key})", _length(root, f"obs/{key}", self.path)))
        n_batches = len(schema.batch_categories)
        checks.append(("len(library_log_means)", len(schema.library_log_means), "batch categories", n_batches))
        checks.append(("len(library_log_vars)", len(schema.library_log_vars), "batch categories", n_batches))
        for name, modality in schema.modalities.items():
            dense = (modality.obsm_key, modality.mask_key) if modality.kind == "dense" else (modality.mask_key,)
            for key in dense:
                shape = _shape(root, f"obsm/{key}", 2, self.path)
                width = len(modality.features) if modality.kind == "dense" else 1
                checks.append(("n_cells", n, f"obsm/{key}'s shape[0]", shape[0]))
                checks.append((f"width of modalities.{name}", width, f"obsm/{key}'s shape[1]", shape[1]))
            if modality.kind == "csr":
                group = f"obsm/{modality.obsm_key}"
                checks.append(
                    ("n_cells", n, f"len({group}/indptr) - 1", _length(root, f"{group}/indptr", self.path) - 1)
                )
                for part in ("data", "indices"):
                    length = _length(root, f"{group}/{part}", self.path)
                    checks.append((f"modalities.{name}.nnz", modality.nnz, f"len({group}/{part})", length))
            checks.append(
                (f"len(modalities.{name}.batch_mask)", len(modality.batch_mask), "batch categories", n_batches)
            )
        for attr, value, what, actual in checks:
            if value != actual:
                raise self._mismatch(attr, value, what, actual)

    def _check_contents(self, root: zarr.Group) -> None:
        """The few values the shapes do not show: the row pointers' ends against nnz, every category code in
        range, the categories' names (two indptr elements and n_cells small codes per key are read)."""
        n = self.n_cells
        for group in self._csr_groups(tuple(self.schema.modalities)):
            name = f"{group.prefix}/indptr"
            first, last = self._read_many([(name, 0, 1), (name, n, n + 1)])
            for row, value in ((0, int(first[0])), (n, int(last[0]))):
                if value < 0:
                    self._corrupt(name, row, f"holds {value} at row {row}")
            if int(first[0]) != 0:
                self._corrupt(name, 0, f"starts at {int(first[0])}, not 0")
            if int(last[0]) != group.nnz:
                raise self._mismatch(group.nnz_field, group.nnz, f"{name}[{n}]", int(last[0]))
        for key, categories in self.schema.categorical.items():
            (codes,) = self._read_many([(f"obs/{key}/codes", 0, n)])
            if codes.min() < 0:  # the fill value: a chunk is missing
                row = int(np.argmax(codes < 0))
                self._corrupt(f"obs/{key}/codes", row, f"holds code {codes[row]} at row {row}")
            if codes.max() >= len(categories):
                row = int(np.argmax(codes >= len(categories)))
                raise self._mismatch(
                    f"categorical.{key}", f"{len(categories)} categories", f"obs/{key}/codes[{row}]", int(codes[row])
                )
            stored = _read_small(root, f"obs/{key}/categories", self.path)
            for i, (listed, held) in enumerate(zip(categories, stored, strict=True)):
                if listed != str(held):
                    raise self._mismatch(
                        f"categorical.{key}[{i}]", repr(listed), f"obs/{key}/categories[{i}]", repr(str(held))
                    )

    @property
    def n_cells(self) -> int:
        return self.schema.n_cells

    def _read_many(self, requests: list[Request]) -> list[np.ndarray]:
        results = self._reader.read_many(requests)
        for (name, start, stop), result in zip(requests, results, strict=True):
            if isinstance(result, Exception):
                raise StoreCorruptError(
                    f"{self.path}: cannot read {name}[{start}:{stop}] "
                    f"(chunk {_chunk_of(name, start, self._dense_rows)}): {result}"
                ) from result
        return [np.asarray(r) for r in results]

    def _read_points(self, requests: list[PointRequest]) -> list[np.ndarray]:
        """Point reads; a request of no points (rows without stored entries) reads nothing."""
        asked = [r for r in requests if len(r[1])]
        read = iter(self._reader.read_points(asked))
        results = [next(read) if len(points) else self._empty(name) for name, points in requests]
        for (name, points), result in zip(requests, results, strict=True):
            if isinstance(result, Exception):
                raise StoreCorruptError(
                    f"{self.path}: cannot read {name} at {len(points)} positions from {int(points[0])} "
                    f"(chunk {_chunk_of(name, int(points[0]), self._dense_rows)}): {result}"
                ) from result
        return [np.asarray(r) for r in results]

    def _empty(self, name: str) -> np.ndarray:
        """No elements of the CSR array `name` (PREFIX/indices or PREFIX/data), in its dtype."""
        if name.endswith("/indices"):
            return np.zeros(0, dtype=np.int32)
        prefix = name.rsplit("/", 1)[0]
        dtypes = {f"obsm/{m.obsm_key}": m.count_dtype for m in self.schema.modalities.values()}
        return np.zeros(0, dtype=np.dtype(dtypes.get(prefix, self.schema.count_dtype)))

    def _csr_groups(self, modalities: tuple[str, ...]) -> list["_CSRGroup"]:
        """X, then the CSR modalities among `modalities`: the sparse matrices a read of rows fetches."""
        groups = [_CSRGroup("X", self.nnz, "nnz", self.schema.n_genes, self.schema.count_dtype, "gene")]
        for name in modalities:
            m = self.schema.modalities[name]
            if m.kind == "csr":
                groups.append(
                    _CSRGroup(f"obsm/{m.obsm_key}", m.nnz, f"modalities.{name}.nnz", len(m.features), m.count_dtype,
                              "feature", name)
                )  # fmt: skip
        return groups

    def read_selected(self, rows: np.ndarray, modalities: tuple[str, ...] = ()) -> RowBlock:
        """Read and validate the rows at sorted, distinct positions `rows` (scattered rows: point reads that
        decode each chunk once), with the named modalities. The block's rows are `rows` in order; start/stop
        span them."""
        self.check_modalities(modalities)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0 or rows[0] < 0 or rows[-1] >= self.n_cells or (np.diff(rows) <= 0).any():
            raise IndexError(f"rows must be sorted, distinct and inside the store's {self.n_cells} cells")
        groups = self._csr_groups(modalities)
        pointers = iter(self._read_points([(f"{g.prefix}/indptr", r) for g in groups for r in (rows, rows + 1)]))
        sparse, requests = [], []
        for group in groups:
            starts, stops = next(pointers), next(pointers)
            lengths = stops - starts
            if starts.min() < 0 or stops.max() > group.nnz or lengths.min() < 0:
                row = int(rows[np.flatnonzero((starts < 0) | (stops > group.nnz) | (lengths < 0))[0]])
                self._corrupt(f"{group.prefix}/indptr", row, f"is not a valid row pointer at row {row}")
            indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            elements = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
            sparse.append((indptr, elements))
            requests += [(f"{group.prefix}/indices", elements), (f"{group.prefix}/data", elements)]
        requests += [(f"obs/{k}/codes", rows) for k in self.schema.categorical]
        requests += [(f"obs/{k}", rows) for k in self.schema.continuous]
        requests += [(name, rows) for name in self._modality_arrays(modalities)]
        results = iter(self._read_points(requests))
        self.rows_read[rows] = True
        return self._block(int(rows[0]), int(rows[-1]) + 1, groups, sparse, results, modalities, rows)

    def read_obs_categorical(self, key: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """(codes (n_cells,), categories) of the categorical obs column `key`: a covariate of the schema, or
        any AnnData categorical the store's obs holds (e.g. one written back after the build)."""
        if key in self.schema.categorical:
            (codes,) = self._read_many([(f"obs/{key}/codes", 0, self.n_cells)])
            return codes, self.schema.categorical[key]
        return read_obs_column(self.path, key, self.n_cells)

    def nnz_between(self, start: int, stop: int, modality: str | None = None) -> int:
        """Stored entries of rows [start, stop) in X (or in the CSR modality `modality`), from two row pointers."""
        prefix = "X" if modality is None else f"obsm/{self.schema.modalities[modality].obsm_key}"
        lo, hi = self._read_many([(f"{prefix}/indptr", start, start + 1), (f"{prefix}/indptr", stop, stop + 1)])
        return int(hi[0]) - int(lo[0])

    def read_rows(self, start: int, stop: int, modalities: tuple[str, ...] = ()) -> RowBlock:
        """Read and validate rows [start, stop); a damaged chunk raises StoreCorruptError naming it."""
        return self.read_ranges([(start, stop)], modalities)[0]

    def read_ranges(
        self, ranges: list[tuple[int, int]], modalities: tuple[str, ...] = (), counts: bool = True
    ) -> list[RowBlock]:
        """Read and validate several row ranges with all their reads in flight together (two rounds:
        row pointers, then gene indices, counts, covariates and the named modalities with their masks).

        counts=False leaves X's gene indices and counts unread (empty; `place_counts` reads them): the blocks carry
        X's row pointers and `first_entry`."""
        self.check_modalities(modalities)
        for start, stop in ranges:
            if not 0 <= start < stop <= self.n_cells:
                raise IndexError(f"rows {start}:{stop} outside the store's {self.n_cells} cells")
        groups = self._csr_groups(modalities)
        pointers = iter(
            self._read_many([(f"{g.prefix}/indptr", start, stop + 1) for start, stop in ranges for g in groups])
        )
        requests: list[Request] = []
        sparse = []
        for start, stop in ranges:
            sparse.append([])
            for group in groups:
                indptr = next(pointers).astype(np.int64, copy=False)
                self._check_indptr(indptr, start, group)
                lo, hi = int(indptr[0]), int(indptr[-1])
                if counts or group.modality is not None:
                    requests += [(f"{group.prefix}/indices", lo, hi), (f"{group.prefix}/data", lo, hi)]
                sparse[-1].append((indptr, None))
            requests += [(f"obs/{k}/codes", start, stop) for k in self.schema.categorical]
            requests += [(f"obs/{k}", start, stop) for k in self.schema.continuous]
            requests += [(name, start, stop) for name in self._modality_arrays(modalities)]
        results = iter(self._read_many(requests))
        for start, stop in ranges:
            self.rows_read[start:stop] = True
        return [
            self._block(start, stop, groups, parts, results, modalities, counts=counts)
            for (start, stop), parts in zip(ranges, sparse, strict=True)
        ]

    def _block(
        self,
        start: int,
        stop: int,
        groups: list["_CSRGroup"],
        sparse: list[tuple[np.ndarray, np.ndarray | None]],
        results,
        modalities: tuple[str, ...] = (),
        rows: np.ndarray | None = None,
        counts: bool = True,
    ) -> RowBlock:
        """Validate the next results (in request order) of rows [start, stop) into a RowBlock.

        sparse: per CSR group, its row pointers of these rows and, for scattered rows, the element positions;
        rows: the store rows of a block of scattered rows; counts=False: X's entries were not read (left empty).
        """
        matrices = []
        for group, (indptr, elements) in zip(groups, sparse, strict=True):
            lo = int(indptr[0])
            if counts or group.modality is not None:
                indices, data = next(results), next(results)
                self._check_entries(indices, data, indptr - lo, lo, group, elements)
            else:
                indices, data = self._empty(f"{group.prefix}/indices"), self._empty(f"{group.prefix}/data")
            matrices.append((indptr - lo, indices, data))
        categorical = {k: next(results) for k in self.schema.categorical}
        continuous = {k: next(results) for k in self.schema.continuous}
        row_of = (lambda i: int(rows[i])) if rows is not None else (lambda i: start + i)
        for key, codes in categorical.items():
            if codes.min() < 0 or codes.max() >= len(self.schema.categorical[key]):
                i = int(np.flatnonzero((codes < 0) | (codes >= len(self.schema.categorical[key])))[0])
                self._corrupt(f"obs/{key}/codes", row_of(i), f"holds code {codes[i]} at row {row_of(i)}")
        for key, values in continuous.items():
            if not np.isfinite(values).all():
                i = int(np.flatnonzero(~np.isfinite(values))[0])
                self._corrupt(f"obs/{key}", row_of(i), f"holds {values[i]} at row {row_of(i)}")
        obsm, masks = {}, {}
        csr = {g.modality: m for g, m in zip(groups, matrices, strict=True) if g.modality is not None}
        for name in modalities:
            modality = self.schema.modalities[name]
            if modality.kind == "csr":
                indptr, indices, data = csr[name]
                counts = sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, len(modality.features)))
                checks = [(modality.mask_key, (mask := next(results)) > 1)]
            elif modality.kind == "mask":
                counts, mask = None, next(results)
                checks = [(modality.mask_key, mask > 1)]
            else:
                counts, mask = next(results), next(results)
                checks = [(modality.obsm_key, counts == modality.fill_value), (modality.mask_key, mask > 1)]
            for key, bad in checks:
                if bad.any():
                    i = int(np.flatnonzero(bad.any(axis=1))[0])
                    self._corrupt(f"obsm/{key}", row_of(i), f"holds its fill value at row {row_of(i)}")
            masks[name] = mask.astype(bool)
            if counts is not None:
                obsm[name] = counts
        indptr, indices, data = matrices[0]
        first = int(sparse[0][0][0]) if rows is None else 0
        return RowBlock(start, stop, indptr, indices, data, categorical, continuous, rows, obsm, masks, first)

    def check_modalities(self, modalities: tuple[str, ...]) -> None:
        unknown = [m for m in modalities if m not in self.schema.modalities]
        if unknown:
            held = ", ".join(self.schema.modalities) or "none (RNA only)"
            raise StoreError(
                f"{self.path}: the store has no {unknown[0]!r} modality (its modalities: {held}); "
                "build it with that modality (e.g. `atlasvi build --protein-key`)"
            )

    def _modality_arrays(self, modalities: tuple[str, ...]) -> list[str]:
        """The 2-D arrays of the named modalities in read order: a dense one's counts, then its mask; a CSR
        one's mask (its CSR arrays are read with X's)."""
        arrays = []
        for name in modalities:
            modality = self.schema.modalities[name]
            if modality.kind == "dense":
                arrays.append(f"obsm/{modality.obsm_key}")
            arrays.append(f"obsm/{modality.mask_key}")
        return arrays

    def _corrupt(self, name: str, element: int, what: str) -> None:
        raise StoreCorruptError(
            f"{self.path}: {name} {what} (chunk {_chunk_of(name, element, self._dense_rows)}): "
            "the chunk is missing or corrupt"
        )

    def _check_indptr(self, indptr: np.ndarray, start: int, group: "_CSRGroup") -> None:
        steps = np.diff(indptr)
        if indptr[0] < 0 or indptr[-1] > group.nnz or steps.min() < 0:
            bad = np.flatnonzero(steps < 0)
            row = start + (int(bad[0]) + 1 if len(bad) else 0)
            self._corrupt(f"{group.prefix}/indptr", row, f"is not a valid row pointer near row {row}")

    def _check_entries(
        self,
        indices: np.ndarray,
        data: np.ndarray,
        indptr: np.ndarray,
        lo: int,
        group: "_CSRGroup",
        elements: np.ndarray | None = None,
    ) -> None:
        """Stored counts are > 0; column indices are in range and strictly increasing within each cell.

        elements: the positions of scattered entries (default lo, lo + 1, ...), for the messages.
        """
        if len(data) == 0:
            return
        at = (lambda i: int(elements[i])) if elements is not None else (lambda i: lo + i)
        data_name, indices_name = f"{group.prefix}/data", f"{group.prefix}/indices"
        if data.min() <= 0:
            element = int(np.flatnonzero(data <= 0)[0])
            self._corrupt(
                data_name, at(element), f"holds {data[element]} at element {at(element)}, stored counts are > 0"
            )
        if indices.view(np.dtype(f"u{indices.itemsize}")).max() >= group.n_columns:  # a negative one reads as huge
            element = int(np.flatnonzero((indices < 0) | (indices >= group.n_columns))[0])
            self._corrupt(
                indices_name, at(element), f"holds {group.column} index {indices[element]} at element {at(element)}"
            )
        not_increasing = indices[1:] <= indices[:-1]
        inner_starts = indptr[1:-1]
        # a decrease is allowed only where a new cell starts
        not_increasing[inner_starts[(inner_starts > 0) & (inner_starts < len(indices))] - 1] = False
        if not_increasing.any():
            element = int(np.flatnonzero(not_increasing)[0]) + 1
            self._corrupt(indices_name, at(element), f"is not sorted within a cell at element {at(element)}")


@dataclass(frozen=True)
class _CSRGroup:
    """A CSR matrix of the store read by rows: X or a sparse modality (prefix/{data,indices,indptr})."""

    prefix: str
    nnz: int
    nnz_field: str  # its nnz's name in the attrs, for messages
    n_columns: int
    count_dtype: str
    column: str  # what a column is, for messages
    modality: str | None = None


def resolve_backend(backend: str, path: str | Path) -> str:
    """The reader "auto" means for `path`: tensorstore (the fastest here, benchmarks/results/loader.md) for a local
    store or an http(s):// URL, zarr-python (fsspec) for other URLs (s3://, gs://, ...); other names unchanged.
    ("auto" on a local store also reads X's counts for the loader straight from the shard files:
    `AtlasStore.place_counts`.)"""
    if backend != "auto":
        return backend
    return "zarr" if is_url(path) and not str(path).startswith(("http://", "https://")) else "tensorstore"


def _make_reader(backend: str, path: str, names: list[str]) -> ArrayReader:
    if backend == "zarr":
        return ZarrReader(path, names)
    if backend == "zarrs":
        import zarrs  # noqa: F401 - the pipeline must be importable; a clear ImportError otherwise

        return ZarrReader(path, names, codec_pipeline="zarrs.ZarrsCodecPipeline")
    if backend == "tensorstore":
        return TensorStoreReader(path, names)
    raise ValueError(f"unknown backend {backend!r}: auto, zarr, zarrs or tensorstore")


def _open_root(path: str) -> zarr.Group:
    """The store's root group, read-only (its consolidated metadata: one read for every array's shape)."""
    if not is_url(path) and not (Path(path) / "zarr.json").exists():
        raise StoreError(f"{path}: no atlas store here (no zarr.json); build one with `atlasvi build`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_group(path, mode="r", zarr_format=3)
    except (json.JSONDecodeError, ValueError, KeyError, OSError) as err:
        raise StoreError(f"{path}: zarr.json is unreadable (truncated or corrupt?): {err}") from err


def _atlas_attrs(root: zarr.Group, path: str) -> dict:
    attrs = dict(root.attrs)
    if ATTRS_KEY not in attrs:
        raise StoreError(f"{path}: a Zarr store but not an atlas store (no '{ATTRS_KEY}' attrs)")
    return attrs[ATTRS_KEY]


def _shape(root: zarr.Group, name: str, ndim: int, path: str) -> tuple[int, ...]:
    """The shape of the `ndim`-D array `name` (from the metadata); a StoreError when there is none."""
    try:
        node = root[name]
    except KeyError:
        node = None
    if not isinstance(node, zarr.Array) or node.ndim != ndim:
        raise StoreError(
            f"{path}: no {ndim}-D array {name}; not a complete atlas store: rebuild it with `atlasvi build`"
        )
    return node.shape


def _length(root: zarr.Group, name: str, path: str) -> int:
    """The length of the 1-D array `name` (from the metadata); a StoreError when there is none."""
    try:
        node = root[name]
    except KeyError:
        node = None
    if not isinstance(node, zarr.Array) or node.ndim != 1:
        raise StoreError(f"{path}: no 1-D array {name}; not a complete atlas store: rebuild it with `atlasvi build`")
    return node.shape[0]


def _read_small(root: zarr.Group, name: str, path: str) -> np.ndarray:
    """All of the small array `name` (categories); a damaged chunk raises StoreCorruptError naming it."""
    try:
        return np.asarray(root[name][:])
    except Exception as err:  # any codec or I/O failure: a damaged chunk
        raise StoreCorruptError(f"{path}: cannot read {name} (a chunk in {name}/c/): {err}") from err


def read_store_attrs(path: str | Path) -> dict:
    """The store's atlasvi attrs; a clear StoreError when the path is no atlas store."""
    return _atlas_attrs(_open_root(str(path)), str(path))


def read_obs_column(path: str | Path, key: str, n_cells: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """(codes, categories) of an AnnData categorical column obs/<key> of the store at `path`."""
    path = str(path)
    store = zarr.storage.FsspecStore.from_url(path, read_only=True) if is_url(path) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(store, mode="r", zarr_format=3)
        obs = root["obs"]
        if key not in obs or obs[key].attrs.get("encoding-type") != "categorical":
            columns = sorted(k for k in obs.keys() if obs[k].attrs.get("encoding-type") == "categorical")
            raise KeyError(f"{path}: obs has no categorical column {key!r}; categorical columns: {columns}")
        codes = _read_small(root, f"obs/{key}/codes", path)
        categories = _read_small(root, f"obs/{key}/categories", path)
    if len(codes) != n_cells or codes.min() < -1 or codes.max() >= len(categories):
        raise StoreCorruptError(
            f"{path}: obs/{key}/codes does not hold {n_cells} codes of {len(categories)} categories"
        )
    return codes, tuple(str(c) for c in categories)


def read_obs_names(path: str | Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(stop - start,) str: the names of the store's cells [start, stop) (obs/_index)."""
    path = str(path)
    store = zarr.storage.FsspecStore.from_url(path, read_only=True) if is_url(path) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(store, mode="r", zarr_format=3)
        index = root["obs"].attrs.get("_index", "_index")
        return np.asarray(root["obs"][index][start:stop].astype(object), dtype=object).astype(str)


def read_spatial(path: str | Path) -> np.ndarray | None:
    """(n_cells, 2 or 3) float64 spatial coordinates of the store's cells (obsm/spatial), None when it has none."""
    meta = read_store_attrs(path).get("spatial")
    if not meta:
        return None
    path = str(path)
    store = zarr.storage.FsspecStore.from_url(path, read_only=True) if is_url(path) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(zarr.open_group(store, mode="r", zarr_format=3)[f"obsm/{meta['obsm_key']}"][:])


def open_store(path: str | Path, backend: str = "auto") -> AtlasStore:
    """Open an atlas store (local path or URL) for reading with a backend: "auto" (see `resolve_backend`), "zarr",
    "zarrs" or "tensorstore"; all read the same values."""
    return AtlasStore(path, backend)


VOLATILE_PROVENANCE = ("created_utc",)
"""Provenance fields that differ between two builds of the same store (`store_checksum` leaves them out)."""
EXECUTION_PARAMETERS = ("chunk_size", "output")
"""Build parameters that change how and where a build runs, not the store it writes (`store_checksum` leaves
them out)."""


def store_checksum(path: str | Path) -> str:
    """sha256 of a store folder: every file's path and bytes (chunks and shards as written, compressed), the
    metadata parsed, with the provenance's creation time and the build's execution parameters (chunk size)
    left out. Two builds of the same inputs and parameters give the same checksum whatever their workers,
    chunking or machines."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        digest.update(relative.encode() + b"\0")
        if file.name == "zarr.json":
            meta = json.loads(file.read_text())
            _drop_volatile(meta)
            digest.update(json.dumps(meta, sort_keys=True).encode())
        else:
            digest.update(file.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _drop_volatile(meta: object) -> None:
    """Remove the volatile provenance fields wherever atlasvi attrs appear in a zarr.json (root, consolidated)."""
    if isinstance(meta, dict):
        attrs = meta.get(ATTRS_KEY)
        if isinstance(attrs, dict) and isinstance(attrs.get("provenance"), dict):
            provenance = attrs["provenance"]
            for key in VOLATILE_PROVENANCE:
                provenance.pop(key, None)
            for key in EXECUTION_PARAMETERS:
                provenance.get("parameters", {}).pop(key, None)
        for value in meta.values():
            _drop_volatile(value)
    elif isinstance(meta, list):
        for value in meta:
            _drop_volatile(value)
