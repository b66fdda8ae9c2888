"""scANVI (Xu et al. 2021, as implemented in scvi-tools): semi-supervised label transfer."""

from atlasvi.models.scanvi.module import SCANVIConfig, SCANVIModule

__all__ = ["SCANVIConfig", "SCANVIModule"]
