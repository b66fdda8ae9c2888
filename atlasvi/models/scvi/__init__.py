"""scVI (Lopez et al. 2018, as implemented in scvi-tools)."""

from atlasvi.models.scvi.module import SCVIConfig, SCVIModule

__all__ = ["SCVIConfig", "SCVIModule"]
