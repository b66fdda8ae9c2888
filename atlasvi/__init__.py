"""atlasvi: scVI-family models trained on atlas-scale single-cell data streamed from Zarr.

The user-facing model classes are in `atlasvi.api` (`from atlasvi.api import SCVI`).
"""

__version__ = "0.1.0"
