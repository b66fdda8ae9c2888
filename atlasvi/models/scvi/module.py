"""The scVI module: z ~ N(0, I), x | z, library ~ ZINB / NB / Poisson (Lopez et al. 2018; scvi-tools' VAE).

The body (encoders, decoder, dispersion) and the loss are the family's `VAE`'s: mean over cells of
-log p(x | z, library) + kl_weight * KL(q(z) || p(z)) + KL(q(l) || p(l)).
"""

from typing import Literal

from atlasvi.data import StoreSchema
from atlasvi.models.vae import VAE, VAEConfig


class SCVIConfig(VAEConfig):
    """scVI: the family's architecture; the defaults are scvi-tools' (n_latent 10, n_hidden 128, n_layers 1, ZINB)."""

    name: Literal["scvi"] = "scvi"


class SCVIModule(VAE):
    """scVI as a plain nn.Module, built from a store's schema (genes, covariates, library prior)."""

    def __init__(self, schema: StoreSchema, config: SCVIConfig | None = None):
        super().__init__(schema, config or SCVIConfig())
