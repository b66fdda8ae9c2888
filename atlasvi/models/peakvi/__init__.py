"""PeakVI (Ashuach et al. 2022, as implemented in scvi-tools): scATAC-seq peaks, Bernoulli accessibility."""

from atlasvi.models.peakvi.module import PEAKVIConfig, PEAKVIModule

__all__ = ["PEAKVIConfig", "PEAKVIModule"]
