"""atlasvi: scVI-family models trained on atlas-scale single-cell data streamed from Zarr."""

__version__ = "0.1.0"
