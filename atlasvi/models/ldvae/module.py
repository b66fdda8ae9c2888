"""The LDVAE module: scVI's encoders and likelihood with a linear decoder (Svensson et al. 2020; scvi-tools 1.4.2's
LDVAE with LinearDecoderSCVI).

Generative model: z ~ N(0, I), log library ~ N(per-batch prior) (latent by default, as scvi-tools' LinearSCVI),
px_scale = softmax(BatchNorm(W [z, one-hot batch])) with one bias-free linear layer, x ~ NB(exp(l) px_scale, theta)
by default. Inference: scVI's z and library encoders (batch norm, no covariates). The loss is the family's ELBO.
The factors' gene loadings are W with the batch norm folded in, diag(gamma / sqrt(running_var + eps)) W, as
scvi-tools' `get_loadings`.

Departures from scvi-tools: the store's extra categorical covariates enter the decoder as the batch does, and its
continuous covariates are decoder inputs beside z (LinearSCVI registers neither; a store without them is the same
model); their columns are not loadings. The zero-inflation layer is built only for `gene_likelihood="zinb"`
(scvi-tools builds it always, unused for NB: DDP without find_unused_parameters needs every parameter used).
latent_distribution "ln" (logistic normal) is not offered: the family's encoder is Gaussian; scvi-tools' default
is normal. gene-cell dispersion is refused: scvi-tools' linear decoder has no per-cell dispersion head.
"""

from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from atlasvi.data import StoreSchema
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.vae import VAE, VAEConfig
from atlasvi.nn import LinearCountDecoder


class LDVAEConfig(VAEConfig):
    """LDVAE: the family's encoder architecture (n_layers is scvi-tools' n_layers_encoder) and a linear decoder;
    the defaults are scvi-tools' LinearSCVI / LDVAE (n_latent 10, n_hidden 128, 1 encoder layer, dropout 0.1,
    NB, gene dispersion, latent library size, batch norm in the encoders and the decoder, no decoder bias).

    bias: a per-gene bias in the linear decoder (scvi-tools' bias).
    """

    name: Literal["ldvae"] = "ldvae"
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb"
    dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene"
    use_observed_lib_size: bool = False
    use_layer_norm: Literal["none"] = "none"
    bias: bool = False


class LDVAEModule(VAE):
    """LDVAE as a plain nn.Module, built from a store's schema (genes, covariates, library prior)."""

    config: LDVAEConfig
    decoder: LinearCountDecoder

    def __init__(self, schema: StoreSchema, config: LDVAEConfig | None = None):
        super().__init__(schema, config or LDVAEConfig())

    def count_decoder(self, n_in: int, n_categories: list[int]) -> nn.Module:
        """The linear decoder (scvi-tools' LinearDecoderSCVI): batch norm unless use_batch_norm leaves the
        decoder out, the bias as configured, a zero-inflation layer only for ZINB."""
        config = self.config
        return LinearCountDecoder(
            n_in,
            self.n_genes,
            n_categories,
            use_batch_norm=config.use_batch_norm in ("decoder", "both"),
            bias=config.bias,
            zero_inflation=config.gene_likelihood == "zinb",
        )

    def surgery_spec(self) -> SurgerySpec:
        """The family's, with the linear decoder's layers as the decoder's covariate layers."""
        spec = super().surgery_spec()
        decoder_layers = ("decoder.factor_regressor",)
        if self.decoder.px_dropout_decoder is not None:
            decoder_layers += ("decoder.px_dropout_decoder",)
        encoders = tuple(name for name in spec.covariate_layers if not name.startswith("decoder."))
        return replace(spec, covariate_layers=decoder_layers + encoders)

    def loadings(self) -> torch.Tensor:
        """(n_genes, n_latent) gene loadings of the latent factors, the batch norm folded in (scvi-tools'
        LDVAE.get_loadings); in eval mode the decoder's pre-softmax output is loadings @ z plus a term of the
        covariates (batch, continuous) alone."""
        return self.decoder.loadings()[:, : self.config.n_latent]
