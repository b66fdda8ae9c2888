"""DestVI (Lopez et al. 2022, as implemented in scvi-tools): spatial deconvolution with a CondSCVI reference."""

from atlasvi.models.destvi.module import DestVIConfig, DestVIInputs, DestVIModule

__all__ = ["DestVIConfig", "DestVIInputs", "DestVIModule"]
