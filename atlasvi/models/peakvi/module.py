"""The PeakVI module: scATAC-seq peak counts, binarised for the likelihood (Ashuach et al. 2022; scvi-tools 1.4.2's
PEAKVAE).

Generative model: z ~ N(0, I); region j of cell i is open with probability p_ij * d_i * f_j, where
p = f(z, batch, covariates) is a deterministic network (the z decoder, a sigmoid output), d_i in (0, 1) the
cell's depth factor (a second, non-variational network of the counts: the d encoder) and f_j = sigmoid(r_j)
learned region factors; x_ij > 0 ~ Bernoulli(p_ij d_i f_j). Inference: q(z | x) from the raw counts (not
log-transformed, not binarised, as scvi-tools). Per cell: reconstruction = BCE(p d f, x > 0) summed over
regions (torch's BCE, logs clamped at -100) and KL(q(z | x) || N(0, I)), reported unweighted (the held-out
-ELBO and reconstruction are these).

The KL's weight in the loss is scvi-tools' (kl_weighting "scvi-tools", the default): its PEAKVAE.loss is
`(rl.sum() + kld * kl_weight).sum()`, which adds the minibatch's summed reconstruction to every cell's term,
so the reconstruction enters n times (n: the minibatch's cells) and the loss is n * sum(rl) + kl_weight * sum(kl)
= n^2 * mean(rl + kl_weight / n * kl). This is what keeps PeakVI's latent informative on sparse peaks: with the
ELBO's weighting (kl_weighting "elbo") the latent of Granja 2019 (5000 peaks, ~77 open per cell) collapses to KL
~0.005 nats and carries no cell type (benchmarks/results/peakvi_fidelity.md). The logged loss is the per-cell
mean(rl + kl_weight / n * kl) (atlasvi's loss contract); the optimizer minimises scvi-tools' n^2 multiple of it
(`LossOutput.objective_scale`): AdamW's eps (1e-8) is set against the gradients' scale, and on the mean it would
weigh n^2 = 16384 x more and damp the step of every weight whose gradient is below ~1e-7 (one step from the same
weights, before atlasvi scaled it: 8e-5 of the accessibility decoder's output weights moved up to 45% less than in
scvi-tools; now all within 2.3e-6 of scvi-tools' update, benchmarks/results/ldvae_peakvi_step.md); an epoch's
short last minibatch also gets scvi-tools' (n / 128)^2 of a full one's weight. In N data-parallel workers n is each
rank's minibatch (scvi-tools' per-device loss does the same).

Departures from scvi-tools, and why:
- the likelihood is computed in float32 with autocast off (torch refuses BCE under CUDA autocast);
- only the Normal latent (scvi-tools' latent_distribution="ln" is not offered).
"""

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions import Normal, kl_divergence

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import check_compatible
from atlasvi.models.vae import VAEInputs
from atlasvi.nn import Encoder, ProbabilityDecoder

Norm = Literal["encoder", "decoder", "both", "none"]


class PEAKVIConfig(BaseModel):
    """PeakVI's architecture; the defaults are scvi-tools' PEAKVI.

    n_hidden None: int(sqrt(n_regions)); n_latent None: int(sqrt(n_hidden)) (resolved by the module);
    model_depth: learn the cell depth factor d (else d = 1); region_factors: learn f (else f = 1);
    deeply_inject_covariates: covariates into every decoder layer (else the first); encode_covariates: the
    encoders see the covariates too; kl_weighting: "scvi-tools" (the KL weighted by kl_weight / minibatch cells,
    as scvi-tools' loss has it: see the module docstring) or "elbo" (by kl_weight).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["peakvi"] = "peakvi"
    n_hidden: int | None = Field(default=None, gt=0)
    n_latent: int | None = Field(default=None, gt=0)
    n_layers_encoder: int = Field(default=2, gt=0)
    n_layers_decoder: int = Field(default=2, gt=0)
    dropout_rate: float = Field(default=0.1, ge=0, lt=1)
    model_depth: bool = True
    region_factors: bool = True
    use_batch_norm: Norm = "none"
    use_layer_norm: Norm = "both"
    deeply_inject_covariates: bool = False
    encode_covariates: bool = False
    kl_weighting: Literal["scvi-tools", "elbo"] = "scvi-tools"


class PEAKVIModule(nn.Module):
    """PeakVI as a plain nn.Module, built from a store's schema (its genes are the regions).

    n_genes (= n_regions), n_batch, n_hidden and n_latent are the resolved sizes. `inference` returns the depth
    factor as `library` (n, 1), and `generative(...)["px_scale"]` is p (n, n_regions), the accessibility
    without depth and region factors (scvi-tools' get_normalized_accessibility default), which the streaming
    analysis and DE read.
    """

    config: PEAKVIConfig
    init_prefixes: ClassVar[tuple[str, ...]] = ()
    used_modalities: ClassVar[tuple[str, ...]] = ()  # the peaks are the store's X

    def __init__(self, schema: StoreSchema, config: PEAKVIConfig | None = None):
        super().__init__()
        config = config or PEAKVIConfig()
        self.config = config
        self.schema = schema
        self.batch_key = schema.batch_key
        self.categorical_keys = tuple(k for k in schema.categorical if k not in (schema.batch_key, schema.labels_key))
        self.continuous_keys = schema.continuous
        self.n_genes = schema.n_genes
        self.n_batch = len(schema.batch_categories)
        self.n_hidden = config.n_hidden or int(self.n_genes**0.5)
        self.n_latent = config.n_latent or int(self.n_hidden**0.5)
        n_categories = [self.n_batch] + [len(schema.categorical[k]) for k in self.categorical_keys]
        n_continuous = len(self.continuous_keys)
        encoder_categories = n_categories if config.encode_covariates else []
        n_encoder_in = self.n_genes + (n_continuous if config.encode_covariates else 0)

        def norm(where: str, part: str) -> bool:
            return where in (part, "both")

        self.z_encoder = Encoder(
            n_encoder_in, self.n_latent, encoder_categories, n_layers=config.n_layers_encoder, n_hidden=self.n_hidden,
            dropout_rate=config.dropout_rate, use_batch_norm=norm(config.use_batch_norm, "encoder"),
            use_layer_norm=norm(config.use_layer_norm, "encoder"), var_eps=0.0, activation=nn.LeakyReLU,
        )  # fmt: skip
        self.z_decoder = ProbabilityDecoder(
            self.n_latent + n_continuous, self.n_genes, n_categories, n_layers=config.n_layers_decoder,
            n_hidden=self.n_hidden, use_batch_norm=norm(config.use_batch_norm, "decoder"),
            use_layer_norm=norm(config.use_layer_norm, "decoder"), inject_covariates=config.deeply_inject_covariates,
        )  # fmt: skip
        # scvi-tools builds the depth network with its Decoder's own defaults (layer norm, no batch norm)
        self.d_encoder = (
            ProbabilityDecoder(
                n_encoder_in, 1, encoder_categories, n_layers=config.n_layers_encoder, n_hidden=self.n_hidden
            )
            if config.model_depth
            else None
        )
        self.region_factors = nn.Parameter(torch.zeros(self.n_genes)) if config.region_factors else None

    @classmethod
    def registry(cls, schema: StoreSchema, config: PEAKVIConfig) -> StoreSchema:
        """The registry the module is built on from a store's (or a saved model's) registry: the same one."""
        return schema

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code, (n_store_categories,) int64, per used key; IncompatibleStoreError when the
        store has other regions, a missing key or an unseen category."""
        return check_compatible(self.schema, store, self.used_keys, where)

    def surgery_spec(self) -> SurgerySpec:
        """The covariate-injected layers (the decoder's, and the encoders' with encode_covariates), no batch
        tensor, the z decoder adapting its norms to the query."""
        layers = ("z_decoder.px_decoder",)
        if self.config.encode_covariates:
            layers += ("z_encoder.encoder",) + (("d_encoder.px_decoder",) if self.d_encoder is not None else ())
        return SurgerySpec(covariate_layers=layers, batch_tensors=(), decoders=("z_decoder",))

    @property
    def used_keys(self) -> tuple[str, ...]:
        """The categorical obs keys whose codes the module reads (batch and the extra covariates)."""
        return (self.batch_key, *self.categorical_keys)

    def unpack(self, batch: Minibatch) -> VAEInputs:
        """The module's inputs from a loader minibatch (counts densified on the batch's device; no labels)."""
        return VAEInputs.of(batch, self.batch_key, self.categorical_keys, self.continuous_keys)

    def inference(self, inputs: VAEInputs) -> dict:
        """q(z | x) from the counts and the depth factor. Returns qz, z (n, n_latent), library = d (n, 1)."""
        x, codes = inputs.encoder_input(inputs.x, self.config.encode_covariates)
        qz, z = self.z_encoder(x, *codes)
        depth = self.d_encoder(x, *codes) if self.d_encoder is not None else torch.ones_like(x[:, :1])
        return {"qz": qz, "z": z, "library": depth}

    def generative(self, z: torch.Tensor, library: torch.Tensor, inputs: VAEInputs) -> dict:
        """p(x > 0 | z, d) and p(z). Returns px_scale = p (n, n_regions), probs = p * d * f, pz."""
        decoder_input = z if inputs.continuous is None else torch.cat([z, inputs.continuous], -1)
        p = self.z_decoder(decoder_input, inputs.batch_index, *inputs.categorical)
        probs = p * library
        if self.region_factors is not None:
            probs = probs * torch.sigmoid(self.region_factors)
        pz = Normal(torch.zeros_like(z), torch.ones_like(z))
        return {"px_scale": p, "probs": probs, "pz": pz}

    def loss(self, inputs: VAEInputs, kl_weight: float = 1.0) -> LossOutput:
        """Minibatch loss (the KL weighted as `kl_weighting` says); per-cell reconstruction (BCE over regions,
        nats) and KL of z (n,), unweighted."""
        inference = self.inference(inputs)
        generative = self.generative(inference["z"], inference["library"], inputs)
        with torch.autocast(inputs.x.device.type, enabled=False):
            opened = (inputs.x > 0).float()
            reconstruction = F.binary_cross_entropy(generative["probs"].float(), opened, reduction="none").sum(-1)
        kl_z = kl_divergence(inference["qz"], generative["pz"]).sum(dim=-1)
        scvi_tools, n = self.config.kl_weighting == "scvi-tools", len(kl_z)
        weight = kl_weight / n if scvi_tools else kl_weight
        return LossOutput(
            torch.mean(reconstruction + weight * kl_z), reconstruction, {"kl_z": kl_z},
            objective_scale=float(n**2) if scvi_tools else 1.0,
        )  # fmt: skip

    def forward(self, inputs: VAEInputs, kl_weight: float = 1.0) -> LossOutput:
        """The loss (DDP hooks its gradient reduction on forward)."""
        return self.loss(inputs, kl_weight)
