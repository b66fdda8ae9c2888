"""CondSCVI (Lopez et al. 2022, as implemented in scvi-tools): a conditional scVI on a labelled reference."""

from atlasvi.models.condscvi.module import CondSCVIConfig, CondSCVIInputs, CondSCVIModule, vamp_prior

__all__ = ["CondSCVIConfig", "CondSCVIInputs", "CondSCVIModule", "vamp_prior"]
