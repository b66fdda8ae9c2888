"""Errors of the data layer. Each message names the file, key, gene or chunk at fault."""

from atlasvi.errors import AtlasviError


class AtlasInputError(AtlasviError, ValueError):
    """An input file (h5ad, 10x) or a build parameter is not usable as it is."""


class StoreError(AtlasviError, ValueError):
    """An atlas store cannot be opened: missing, not an atlas store, or another schema version."""


class StoreCorruptError(StoreError):
    """A chunk of an atlas store is missing, truncated or corrupt."""
