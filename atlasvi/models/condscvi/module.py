"""The CondSCVI module (scvi-tools 1.4.2's VAEC): a variational autoencoder conditioned on cell-type labels.

Generative model: z ~ N(0, I) (n_latent, default 5); px_scale = softmax(px_decoder(decoder([z, e_batch], y)) +
per_ct_bias[y]), x ~ NB(library * px_scale, exp(px_r)) with the observed library (total counts) and one
dispersion per gene. e_batch is a learned batch embedding (dimension 5, scvi-tools' `init_embedding`), the
labels y are one-hot injected into every layer of the encoder and of the decoder (layer norm, no batch norm).
Inference: q(z | log1p(x), y) (with encode_covariates, the batch embedding is appended to the encoder input).
Loss: the minibatch mean of ct_weight[y] * (-log p(x | z, y) + kl_weight * KL(q(z | x, y) || N(0, I))), where
ct_weight is 1 (scvi-tools' default weight_obs=False) or, with weight_obs, the inverse label frequency (clipped
at 5 %, renormalised) given in the config.

After training, `vamp_prior` turns the reference's posteriors into per-label prototypes (scvi-tools'
CondSCVI.get_vamp_prior: k-means over each label's posterior means), kept in the module's buffers
mean_vprior / var_vprior / mp_vprior: DestVI's prior over its per-spot, per-type latents is their mixture.

Departures: no fine labels (scvi-tools' n_fine_labels classifier) and only the Normal prior (not its "mog").
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions import Normal, kl_divergence

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.distributions import NegativeBinomial
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import check_compatible
from atlasvi.nn import Encoder, FCLayers

BATCH_EMBEDDING_DIM = 5  # scvi-tools' EmbeddingModuleMixin.init_embedding default


class CondSCVIConfig(BaseModel):
    """CondSCVI's architecture; the defaults are scvi-tools' (n_latent 5, n_hidden 128, n_layers 2, dropout 0.05).

    ct_weight: per-label loss weights in the labels' order (scvi-tools' weight_obs: `ct_weight_of` computes them
    from the label counts); None weighs every cell 1. vamp_prior_p: prototypes per label kept for DestVI's prior
    (scvi-tools' DestVI.from_rna_model default vamp_prior_p=15).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["condscvi"] = "condscvi"
    n_latent: int = Field(default=5, gt=0)
    n_hidden: int = Field(default=128, gt=0)
    n_layers: int = Field(default=2, gt=0)
    dropout_rate: float = Field(default=0.05, ge=0, lt=1)
    log_variational: bool = True
    encode_covariates: bool = False
    ct_weight: tuple[float, ...] | None = None
    vamp_prior_p: int = Field(default=15, gt=0)


def ct_weight_of(label_counts: np.ndarray) -> tuple[float, ...]:
    """scvi-tools' weight_obs: 1 / proportion per label, proportions clipped below at 0.05 and renormalised.
    label_counts: (n_labels,) cells per label."""
    proportion = label_counts / label_counts.sum()
    proportion = np.where(proportion < 0.05, 0.05, proportion)
    proportion = proportion / proportion.sum()
    return tuple(float(w) for w in 1.0 / proportion)


@dataclass(frozen=True)
class CondSCVIInputs:
    """A minibatch as CondSCVI reads it: x (n, n_genes) counts, labels (n,) and batch_index (n,) codes."""

    x: torch.Tensor
    labels: torch.Tensor
    batch_index: torch.Tensor


class CondSCVIModule(nn.Module):
    """CondSCVI as a plain nn.Module, built from a store's schema (genes, labels, batches)."""

    config: CondSCVIConfig
    init_prefixes: ClassVar[tuple[str, ...]] = ()
    used_modalities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, schema: StoreSchema, config: CondSCVIConfig | None = None):
        super().__init__()
        config = config or CondSCVIConfig()
        if schema.labels_key is None:
            raise ValueError("CondSCVI needs a store built with a labels key (BuildConfig.labels_key)")
        self.config, self.schema = config, schema
        self.batch_key, self.labels_key = schema.batch_key, schema.labels_key
        self.n_genes, self.n_latent = schema.n_genes, config.n_latent
        self.n_batch = len(schema.batch_categories)
        self.n_labels = len(schema.categorical[schema.labels_key])
        if config.ct_weight is not None and len(config.ct_weight) != self.n_labels:
            raise ValueError(f"ct_weight has {len(config.ct_weight)} weights for {self.n_labels} labels")
        self.batch_embedding = nn.Embedding(self.n_batch, BATCH_EMBEDDING_DIM)
        self.px_r = nn.Parameter(torch.randn(self.n_genes))
        n_encoder_in = self.n_genes + BATCH_EMBEDDING_DIM * config.encode_covariates
        self.z_encoder = Encoder(
            n_encoder_in, config.n_latent, [self.n_labels], n_layers=config.n_layers, n_hidden=config.n_hidden,
            dropout_rate=config.dropout_rate, use_batch_norm=False, use_layer_norm=True,
        )  # fmt: skip
        self.decoder = conditional_decoder(config, self.n_labels)
        self.px_decoder = nn.Linear(config.n_hidden, self.n_genes)
        self.per_ct_bias = nn.Parameter(torch.zeros(self.n_labels, self.n_genes))
        weight = torch.ones(self.n_labels) if config.ct_weight is None else torch.tensor(config.ct_weight)
        self.register_buffer("ct_weight", weight.float())
        p = config.vamp_prior_p
        self.register_buffer("mean_vprior", torch.zeros(self.n_labels, p, config.n_latent))
        self.register_buffer("var_vprior", torch.ones(self.n_labels, p, config.n_latent))
        self.register_buffer("mp_vprior", torch.zeros(self.n_labels, p))

    @classmethod
    def registry(cls, schema: StoreSchema, config: CondSCVIConfig) -> StoreSchema:
        """The registry the module is built on from a store's (or a saved model's) registry: the same one."""
        return schema

    @property
    def used_keys(self) -> tuple[str, ...]:
        return (self.batch_key, self.labels_key)

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code, (n_store_categories,) int64, for the batch and the labels."""
        return check_compatible(self.schema, store, self.used_keys, where)

    def surgery_spec(self) -> None:
        """None: no scArches query mapping (scvi-tools' CondSCVI has none either; its batch is an embedding)."""
        return None

    def unpack(self, batch: Minibatch) -> CondSCVIInputs:
        return CondSCVIInputs(batch.counts(), batch.categorical[self.labels_key], batch.categorical[self.batch_key])

    def inference(self, inputs: CondSCVIInputs) -> dict:
        """q(z | x, y). Returns qz, z (n, n_latent) and library (n, 1): total counts (not log)."""
        x = torch.log1p(inputs.x) if self.config.log_variational else inputs.x
        if self.config.encode_covariates:
            x = torch.cat([x, self.batch_embedding(inputs.batch_index.long().view(-1))], dim=-1)
        qz, z = self.z_encoder(x, inputs.labels)
        return {"qz": qz, "z": z, "library": inputs.x.sum(dim=1, keepdim=True)}

    def generative(self, z: torch.Tensor, library: torch.Tensor, inputs: CondSCVIInputs) -> dict:
        """p(x | z, y): px (NB), px_scale (n, n_genes) and pz."""
        batch_rep = self.batch_embedding(inputs.batch_index.long().view(-1))
        scale = decode_scale(
            self.decoder, self.px_decoder, self.per_ct_bias, z, batch_rep, inputs.labels.long().view(-1)
        )
        px = NegativeBinomial(library * scale, torch.exp(self.px_r))
        return {"px": px, "px_scale": scale, "pz": Normal(torch.zeros_like(z), torch.ones_like(z))}

    def loss(self, inputs: CondSCVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """mean of ct_weight[y] * (reconstruction + kl_weight * KL); per-cell terms unweighted (nats)."""
        inference = self.inference(inputs)
        generative = self.generative(inference["z"], inference["library"], inputs)
        reconstruction = -generative["px"].log_prob(inputs.x).sum(dim=-1)
        kl_z = kl_divergence(inference["qz"], generative["pz"]).sum(dim=-1)
        weight = self.ct_weight[inputs.labels.long().view(-1)]
        return LossOutput(torch.mean(weight * (reconstruction + kl_weight * kl_z)), reconstruction, {"kl_z": kl_z})

    def forward(self, inputs: CondSCVIInputs, kl_weight: float = 1.0) -> LossOutput:
        return self.loss(inputs, kl_weight)


def conditional_decoder(config: BaseModel, n_labels: int) -> FCLayers:
    """CondSCVI's decoder body: [z, batch embedding] -> hidden, labels injected in every layer, layer norm
    (scvi-tools' VAEC.decoder; DestVI builds the same to take the trained weights)."""
    return FCLayers(
        config.n_latent + BATCH_EMBEDDING_DIM, config.n_hidden, [n_labels], n_layers=config.n_layers,
        n_hidden=config.n_hidden, dropout_rate=config.dropout_rate, use_batch_norm=False, use_layer_norm=True,
    )  # fmt: skip


def decode_scale(
    decoder: FCLayers,
    px_decoder: nn.Linear,
    per_ct_bias: torch.Tensor,
    z: torch.Tensor,
    batch_rep: torch.Tensor,
    labels: torch.Tensor,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(px_decoder(decoder([z, batch_rep], labels)) + per_ct_bias[labels] (+ beta)): (..., n_genes).
    z (..., n_latent), batch_rep (..., 5) and labels (...,) share their leading shape."""
    lead = z.shape[:-1]
    hidden = decoder(
        torch.cat([z, batch_rep], dim=-1).reshape(-1, z.shape[-1] + batch_rep.shape[-1]), labels.reshape(-1)
    )
    logits = px_decoder(hidden) + per_ct_bias[labels.reshape(-1)]
    if beta is not None:
        logits = logits + beta
    return torch.softmax(logits, dim=-1).reshape(*lead, -1)


@torch.no_grad()
def vamp_prior(
    means: np.ndarray, variances: np.ndarray, labels: np.ndarray, n_labels: int, p: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scvi-tools' CondSCVI.get_vamp_prior: per label, k-means (p clusters, 30 initialisations) of its cells'
    posterior means (every cell its own cluster with p or fewer cells); a cluster's prototype is its mean of the
    means, its variance the mean posterior variance plus the variance of the means, its weight its share of cells.

    means, variances: (n_cells, n_latent); labels: (n_cells,) codes. Returns mean (n_labels, p, n_latent), var (same;
    1 in unused slots) and weights (n_labels, p) (0 in unused slots; a label without cells has none)."""
    from sklearn.cluster import KMeans

    n_latent = means.shape[1]
    mean_v, var_v, mp_v = np.zeros((n_labels, p, n_latent)), np.ones((n_labels, p, n_latent)), np.zeros((n_labels, p))
    for label in range(n_labels):
        local = np.flatnonzero(labels == label)
        if len(local) == 0:
            continue
        if p < len(local):
            clusters = KMeans(n_clusters=p, n_init=30, random_state=seed).fit_predict(means[local])
        else:
            clusters = np.arange(len(local))
        keys, counts = np.unique(clusters, return_counts=True)
        for index, cluster in enumerate(keys):
            members = local[clusters == cluster]
            var_v[label, index] = variances[members].mean(axis=0) + means[members].var(axis=0)
            mean_v[label, index] = means[members].mean(axis=0)
        mp_v[label, : len(keys)] = counts / counts.sum()
    return mean_v, var_v, mp_v
