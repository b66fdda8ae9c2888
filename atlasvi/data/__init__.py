"""The data layer: atlas store build, store reader, block sampler and streaming loader.

It knows nothing of models, training, Ray or MLflow (an import contract in CI keeps it so).
"""

from atlasvi.data.build import build_store
from atlasvi.data.config import BuildConfig, LoaderConfig
from atlasvi.data.errors import AtlasInputError, StoreCorruptError, StoreError
from atlasvi.data.sampler import BlockSampler, split_rows
from atlasvi.data.store import AtlasStore, StoreSchema, open_store


def __getattr__(name: str):
    """The loader (and with it torch) is imported on first use: building a store needs no torch."""
    if name in ("Minibatch", "SparseCounts", "StreamingLoader"):
        from atlasvi.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'atlasvi.data' has no attribute {name!r}")


__all__ = [
    "AtlasInputError",
    "AtlasStore",
    "BlockSampler",
    "BuildConfig",
    "LoaderConfig",
    "Minibatch",
    "SparseCounts",
    "StoreCorruptError",
    "StoreError",
    "StoreSchema",
    "StreamingLoader",
    "build_store",
    "open_store",
    "split_rows",
]
