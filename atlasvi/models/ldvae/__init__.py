"""LDVAE, the linearly decoded VAE (Svensson et al. 2020, as implemented in scvi-tools' LinearSCVI)."""

from atlasvi.models.ldvae.module import LDVAEConfig, LDVAEModule

__all__ = ["LDVAEConfig", "LDVAEModule"]
