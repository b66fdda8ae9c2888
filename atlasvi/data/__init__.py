"""The data layer: atlas store build, store reader, block sampler and streaming loader.

It knows nothing of models, training, Ray or MLflow (an import contract in CI keeps it so).
"""

from atlasvi.data.build import build_store
from atlasvi.data.config import BuildConfig, LoaderConfig
from atlasvi.data.errors import AtlasInputError, StoreCorruptError, StoreError
from atlasvi.data.loader import Minibatch, StreamingLoader
from atlasvi.data.sampler import BlockSampler
from atlasvi.data.store import AtlasStore, StoreSchema, open_store

__all__ = [
    "AtlasInputError",
    "AtlasStore",
    "BlockSampler",
    "BuildConfig",
    "LoaderConfig",
    "Minibatch",
    "StoreCorruptError",
    "StoreError",
    "StoreSchema",
    "StreamingLoader",
    "build_store",
    "open_store",
]
