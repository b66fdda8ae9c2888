"""MultiVI (Ashuach et al. 2023, as implemented in scvi-tools): RNA + ATAC, paired and unpaired cells."""

from atlasvi.models.multivi.module import MULTIVIConfig, MULTIVIModule

__all__ = ["MULTIVIConfig", "MULTIVIModule"]
