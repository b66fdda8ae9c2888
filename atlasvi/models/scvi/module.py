"""The scVI module: z ~ N(0, I), x | z, library ~ ZINB / NB / Poisson (Lopez et al. 2018; scvi-tools' VAE).

The body (encoders, decoder, dispersion) is the family's `VAE`; scVI's own part is its loss:
mean over cells of -log p(x | z, library) + kl_weight * KL(q(z) || p(z)) + KL(q(l) || p(l)).
"""

from typing import Literal

import torch
from torch.distributions import kl_divergence

from atlasvi.data import StoreSchema
from atlasvi.models.loss import LossOutput
from atlasvi.models.vae import VAE, VAEConfig, VAEInputs


class SCVIConfig(VAEConfig):
    """scVI: the family's architecture; the defaults are scvi-tools' (n_latent 10, n_hidden 128, n_layers 1, ZINB)."""

    name: Literal["scvi"] = "scvi"


class SCVIModule(VAE):
    """scVI as a plain nn.Module, built from a store's schema (genes, covariates, library prior)."""

    def __init__(self, schema: StoreSchema, config: SCVIConfig | None = None):
        super().__init__(schema, config or SCVIConfig())

    def loss(self, inputs: VAEInputs, kl_weight: float = 1.0) -> LossOutput:
        """Minibatch loss; per-cell reconstruction (n,) and KL terms (n,) in nats."""
        inference = self.inference(inputs)
        generative = self.generative(inference["z"], inference["library"], inputs)
        reconstruction = -generative["px"].log_prob(inputs.x).sum(dim=-1)
        kl_z = kl_divergence(inference["qz"], generative["pz"]).sum(dim=-1)
        kl_local = {"kl_z": kl_z}
        weighted = kl_weight * kl_z
        if inference["ql"] is not None:
            kl_l = kl_divergence(inference["ql"], generative["pl"]).sum(dim=-1)
            kl_local["kl_library"] = kl_l
            weighted = weighted + kl_l
        return LossOutput(torch.mean(reconstruction + weighted), reconstruction, kl_local)
