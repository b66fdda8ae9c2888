"""totalVI (Gayoso et al. 2021, as implemented in scvi-tools): RNA and surface-protein counts of CITE-seq."""

from atlasvi.models.totalvi.module import TOTALVIConfig, TOTALVIInputs, TOTALVIModule

__all__ = ["TOTALVIConfig", "TOTALVIInputs", "TOTALVIModule"]
