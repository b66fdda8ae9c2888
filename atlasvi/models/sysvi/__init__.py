"""sysVI (Hrovatin et al. 2024, as implemented in scvi-tools): integration across systems with strong batch effects."""

from atlasvi.models.sysvi.module import SysVIConfig, SysVIModule

__all__ = ["SysVIConfig", "SysVIModule"]
