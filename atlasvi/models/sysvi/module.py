"""The sysVI module (Hrovatin et al. 2024; scvi-tools 1.4.2's `scvi.external.SysVI` / `SysVAE`).

A conditional VAE for strong batch effects between systems (species, technologies, cells vs nuclei):
  input: log-normalised expression, x = log1p(counts / total * target_sum), computed per cell by `unpack`
    from the store's raw counts (atlasvi stores counts; scvi-tools reads an already log-normalised layer);
  encoder: q(z | x, system, covariates) = N(mu, s^2), s^2 = softplus(Linear(h)) per cell and latent dimension;
  decoder: p(x | z, system, covariates) Gaussian, mean per cell and feature, variance per feature;
  prior: a VampPrior, a mixture of the encoder's posteriors at n_prior_components trainable pseudo-inputs
    (initialised from random cells) with trainable mixture weights (or N(0, I));
  cycle consistency: z is decoded as another system drawn per cell, the decoding is re-encoded as that system,
    and the squared distance between the two posterior means (both standardised jointly per latent dimension
    over the minibatch) is penalised (cycle_input "cross_system"; "own_system" is scvi-tools 1.4.2's variant).
loss per cell, then the minibatch mean:
  reconstruction_weight * -log p(x | z) + kl_weight * (log q(z | x) - log p(z)) + z_distance_cycle_weight * cycle
Defaults are scvi-tools': n_latent 15, n_hidden 256, n_layers 2, dropout 0.1, VampPrior with 5 components,
per-feature output variance, reconstruction weight 1, cycle weight 2 and KL weight 1 without warm-up (the
registry entry's train_defaults). They are kept although they do not beat scVI on small data: on Baron human +
mouse (328 cells, 3 seeds, 400 epochs) sysVI mixes the species less than scVI in both tools (batch entropy
0.907 atlasvi / 0.930 scvi-tools against scVI's 0.938 / 0.957), and a cycle weight of 10 does not raise the mean
(0.877 +- 0.113: one seed of three less mixed, two about as mixed as scVI; benchmarks/README.md, sysvi_mixing.md).
Both networks are FCLayers (batch norm, ReLU, dropout) with the categorical covariates, the system first,
injected into every layer.

As scvi-tools, numerically: the decoder's Normal has scale sqrt(softplus(theta)) + 1e-12, and that scale is
what scvi-tools passes to `GaussianNLLLoss` as the variance, so the per-feature variance of the likelihood is
sigma^2 = sqrt(softplus(theta)) + 1e-12 (clamped at 1e-6); likewise a VampPrior component's standard deviation
is the square root of the encoder's scale at its pseudo-input. The pseudo-inputs are encoded with the encoder
in eval mode (no dropout, running batch-norm statistics), as scvi-tools, and after the cycle pass, as scvi-tools:
its encoding (training mode) has already moved the running statistics the prior reads. From scvi-tools' weights,
one training step gives its loss and gradients (benchmarks/results/sysvi_paired.md).

Departures from scvi-tools 1.4.2, and why:
- The cycle re-encodes the decoding as the other system by default (cycle_input "cross_system": the published
  method and the authors' code, whose cycle input is the cross-system decoding `y_m`). scvi-tools 1.4.2 decodes
  as the other system but re-encodes the own-system decoding `px` with the other system's label (its
  `px_cycle` is computed and unused), which looks like a slip of its refactor; cycle_input "own_system" is that
  variant, for a like-for-like comparison. On Baron human + mouse (4 seeds, 400 epochs, both tools from
  scvi-tools' initial weights on the same cells, benchmarks/results/sysvi_paired.md) it mixes the species as
  scvi-tools' SysVI does (iLISI 0.629 vs 0.585, paired difference +0.044 +- 0.106) and the published cycle more
  (0.681, +0.096 +- 0.029; batch entropy 0.939 vs 0.904), so the default stays the published method. With
  "own_system" the unused cross-system decoding is not computed; in scvi-tools that decoding (training mode) also
  moves the decoder's batch-norm running statistics, which only eval-mode decodings read (not the latent).
- The reconstruction is the full Gaussian -log-likelihood in nats (with 0.5 log 2 pi per feature, which
  `GaussianNLLLoss` leaves out): the same gradients, and a -ELBO comparable across models. A density's
  -log-likelihood can be negative.
- The pseudo-inputs are initialised from the first n_prior_components cells of the first training minibatch
  (the loader's seeded shuffle: random training cells, without replacement; scvi-tools draws them with
  replacement from every cell of the AnnData, held-out ones included), at the first training step
  (`loss` in training mode), since the module is built from a registry and sees no cells before. A flag buffer
  records it, so a checkpoint or a saved model carries initialised pseudo-inputs and a resumed run does not
  draw them again. Under DDP rank 0's cells are broadcast, so every rank has the same pseudo-inputs.
  Their categorical covariates are buffers: scvi-tools keeps them as one-hot "weights" that it samples from
  with `torch.multinomial`, which gets no gradient, so they stay the initial cells' categories; a buffer is
  the same prior.
- Continuous covariates enter the first layer of each network (concatenated to its input), not every layer:
  atlasvi's FCLayers inject categorical covariates only.
- The system is the store's batch key, or `system_key` (another categorical covariate; the batch key is then
  an ordinary covariate). scvi-tools' experimental inverse-system-size weighting and covariate embeddings
  are not built.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions import Normal, kl_divergence

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import check_compatible
from atlasvi.nn import FCLayers

_CLIP = float(torch.log(torch.tensor(torch.finfo(torch.float32).max))) - 1e-4  # scvi-tools' VarEncoder clip


class SysVIConfig(BaseModel):
    """sysVI; the defaults are scvi-tools 1.4.2's (SysVI, SysVAE and its loss).

    prior: "vamp" (n_prior_components trainable pseudo-inputs) or "standard_normal"; out_var_mode: the
    decoder's variance per feature ("feature") or per cell and feature ("sample_feature");
    z_distance_cycle_weight: weight of the cycle term (0: none); cycle_input: what the cycle re-encodes as the
    other system, the decoding as that system ("cross_system", the paper) or the cell's own-system decoding
    ("own_system", scvi-tools 1.4.2); target_sum: counts per cell after
    normalisation, before log1p; system_key: the categorical obs key that is the system (None: the batch key).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["sysvi"] = "sysvi"
    n_latent: int = Field(default=15, gt=0)
    n_hidden: int = Field(default=256, gt=0)
    n_layers: int = Field(default=2, gt=0)
    dropout_rate: float = Field(default=0.1, ge=0, lt=1)
    prior: Literal["vamp", "standard_normal"] = "vamp"
    n_prior_components: int = Field(default=5, gt=0)
    out_var_mode: Literal["feature", "sample_feature"] = "feature"
    reconstruction_weight: float = Field(default=1.0, ge=0)
    z_distance_cycle_weight: float = Field(default=2.0, ge=0)
    cycle_input: Literal["cross_system", "own_system"] = "cross_system"
    target_sum: float = Field(default=1e4, gt=0)
    system_key: str | None = None


@dataclass(frozen=True)
class SysVIInputs:
    """A minibatch as sysVI reads it.

    x: (n, n_genes) log-normalised expression; system: (n,) codes; categorical: one (n,) code tensor per
    other covariate; continuous: (n, n_continuous) or None.
    """

    x: torch.Tensor
    system: torch.Tensor
    categorical: tuple[torch.Tensor, ...]
    continuous: torch.Tensor | None


def log_normalise(counts: torch.Tensor, target_sum: float) -> torch.Tensor:
    """(n, n_genes) counts -> log1p(counts / per-cell total * target_sum); an empty cell stays 0 (as scanpy)."""
    total = counts.sum(dim=-1, keepdim=True)
    return torch.log1p(counts / total.clamp_min(1e-12) * target_sum)


class GaussianNet(nn.Module):
    """scvi-tools' sysVI EncoderDecoder: (n, n_in) and covariate codes -> Normal over (n, n_out).

    FCLayers to n_hidden, a linear mean, and a variance softplus(.) per cell and output ("sample_feature",
    a linear head) or per output ("feature", one parameter each); the Normal's scale is sqrt(variance) + 1e-12.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_categories: list[int],
        n_layers: int,
        n_hidden: int,
        dropout_rate: float,
        var_mode: Literal["feature", "sample_feature"],
    ):
        super().__init__()
        self.fc = FCLayers(n_in, n_hidden, n_categories, n_layers, n_hidden, dropout_rate)
        self.mean = nn.Linear(n_hidden, n_out)
        self.var_mode = var_mode
        if var_mode == "sample_feature":
            self.var = nn.Linear(n_hidden, n_out)
        else:
            self.var_param = nn.Parameter(torch.zeros(1, n_out))

    def forward(self, x: torch.Tensor, *codes: torch.Tensor) -> Normal:
        hidden = self.fc(x, *codes)
        raw = self.var(hidden) if self.var_mode == "sample_feature" else self.var_param.expand(len(x), -1)
        variance = F.softplus(raw.clamp(-_CLIP, _CLIP))
        return Normal(self.mean(hidden), variance.sqrt() + 1e-12, validate_args=False)


class SysVIModule(nn.Module):
    """sysVI as a plain nn.Module, built from a store's schema (genes, categorical and continuous covariates).

    The system needs >= 2 categories (the cycle decodes each cell as another system).
    """

    config: SysVIConfig
    init_prefixes: ClassVar[tuple[str, ...]] = ()
    used_modalities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, schema: StoreSchema, config: SysVIConfig | None = None):
        super().__init__()
        config = config or SysVIConfig()
        self.config, self.schema = config, schema
        self.system_key = config.system_key or schema.batch_key
        if self.system_key not in schema.categorical:
            raise ValueError(f"system_key {self.system_key!r} is not a categorical key of the store")
        self.n_system = len(schema.categorical[self.system_key])
        if self.n_system < 2:
            raise ValueError(f"obs[{self.system_key!r}] has {self.n_system} category; sysVI needs >= 2 systems")
        self.categorical_keys = tuple(k for k in schema.categorical if k not in (self.system_key, schema.labels_key))
        self.continuous_keys = schema.continuous
        self.n_genes = schema.n_genes
        n_categories = [self.n_system] + [len(schema.categorical[k]) for k in self.categorical_keys]
        n_continuous = len(self.continuous_keys)
        layers = {"n_layers": config.n_layers, "n_hidden": config.n_hidden, "dropout_rate": config.dropout_rate}
        self.encoder = GaussianNet(
            self.n_genes + n_continuous, config.n_latent, n_categories, var_mode="sample_feature", **layers
        )
        self.decoder = GaussianNet(
            config.n_latent + n_continuous, self.n_genes, n_categories, var_mode=config.out_var_mode, **layers
        )
        if config.prior == "vamp":
            k = config.n_prior_components
            self.pseudo_x = nn.Parameter(torch.zeros(k, self.n_genes))
            self.pseudo_continuous = nn.Parameter(torch.zeros(k, n_continuous)) if n_continuous else None
            self.register_buffer("pseudo_codes", torch.zeros(len(n_categories), k, dtype=torch.int64))
            self.register_buffer("pseudo_initialised", torch.tensor(False))
            self.prior_logits = nn.Parameter(torch.zeros(k))

    @classmethod
    def registry(cls, schema: StoreSchema, config: SysVIConfig) -> StoreSchema:
        """The registry the module is built on from a store's (or a saved model's) registry: the same one."""
        return schema

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code per used key; a store the model cannot read raises IncompatibleStoreError."""
        return check_compatible(self.schema, store, self.used_keys, where)

    def surgery_spec(self) -> SurgerySpec:
        """scArches: the covariate-injected layers of both networks grow; the decoder's batch norms adapt."""
        return SurgerySpec(covariate_layers=("encoder.fc", "decoder.fc"), batch_tensors=(), decoders=("decoder",))

    @property
    def used_keys(self) -> tuple[str, ...]:
        """The categorical obs keys whose codes the module reads (the system, then the other covariates)."""
        return (self.system_key, *self.categorical_keys)

    def unpack(self, batch: Minibatch) -> SysVIInputs:
        """The module's inputs: the minibatch's counts log-normalised per cell (see `log_normalise`)."""
        continuous = (
            torch.stack([batch.continuous[k] for k in self.continuous_keys], dim=-1) if self.continuous_keys else None
        )
        return SysVIInputs(
            x=log_normalise(batch.counts(), self.config.target_sum),
            system=batch.categorical[self.system_key],
            categorical=tuple(batch.categorical[k] for k in self.categorical_keys),
            continuous=continuous,
        )

    @staticmethod
    def _with_continuous(x: torch.Tensor, continuous: torch.Tensor | None) -> torch.Tensor:
        return x if continuous is None else torch.cat([x, continuous], dim=-1)

    def _encode(self, x: torch.Tensor, system: torch.Tensor, inputs: SysVIInputs) -> Normal:
        return self.encoder(self._with_continuous(x, inputs.continuous), system, *inputs.categorical)

    def inference(self, inputs: SysVIInputs) -> dict:
        """q(z | x, system, covariates). Returns qz (a Normal over (n, n_latent)) and z, one draw from it."""
        qz = self._encode(inputs.x, inputs.system, inputs)
        return {"qz": qz, "z": qz.rsample()}

    def generative(self, z: torch.Tensor, inputs: SysVIInputs, system: torch.Tensor | None = None) -> dict:
        """p(x | z, system, covariates), the cells' own system unless `system` ((n,) codes). Returns px, a
        Normal over (n, n_genes) whose scale is the likelihood's variance (see the module docstring)."""
        decoder_input = self._with_continuous(z, inputs.continuous)
        px = self.decoder(decoder_input, inputs.system if system is None else system, *inputs.categorical)
        return {"px": px}

    def other_system(self, system: torch.Tensor) -> torch.Tensor:
        """(n,) codes: for each cell a system other than its own, uniformly at random."""
        offset = torch.randint(1, self.n_system, system.shape, device=system.device)
        return (system.long() + offset) % self.n_system

    @torch.no_grad()
    def _initialise_pseudo_inputs(self, inputs: SysVIInputs) -> None:
        """Pseudo-inputs <- the first n_prior_components cells of `inputs` (rank 0's under DDP)."""
        k = self.config.n_prior_components
        if len(inputs.x) < k:
            raise ValueError(f"the first minibatch has {len(inputs.x)} cells, fewer than n_prior_components={k}")
        values = [inputs.x[:k], torch.stack([c[:k].long() for c in (inputs.system, *inputs.categorical)])]
        if self.pseudo_continuous is not None:
            values.append(inputs.continuous[:k])
        if dist.is_available() and dist.is_initialized():
            values = [v.clone() for v in values]  # copies: the broadcast must not overwrite this rank's cells
            for value in values:
                dist.broadcast(value, src=0)
        self.pseudo_x.copy_(values[0])
        self.pseudo_codes.copy_(values[1])
        if self.pseudo_continuous is not None:
            self.pseudo_continuous.copy_(values[2])
        self.pseudo_initialised.fill_(True)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """(n, n_latent) log p(z) per dimension under the VampPrior (scvi-tools' VampPrior.log_prob)."""
        training = self.encoder.training
        self.encoder.train(False)
        components = self.encoder(self._with_continuous(self.pseudo_x, self.pseudo_continuous), *self.pseudo_codes)
        self.encoder.train(training)
        means, scales = components.loc.unsqueeze(1), components.scale.unsqueeze(1)  # (k, 1, n_latent)
        log_weights = F.log_softmax(self.prior_logits, dim=0).view(-1, 1, 1)
        return torch.logsumexp(Normal(means, scales.sqrt()).log_prob(z.unsqueeze(0)) + log_weights, dim=0)

    @staticmethod
    def cycle_distance(qz: Normal, qz_cycle: Normal) -> torch.Tensor:
        """(n,) squared distance of the two posterior means, standardised jointly per latent dimension."""
        means = torch.cat([qz.loc, qz_cycle.loc])
        centre, spread = means.mean(dim=0, keepdim=True), means.std(dim=0, keepdim=True)
        return (((qz.loc - centre) / spread - (qz_cycle.loc - centre) / spread) ** 2).sum(dim=-1)

    def loss(self, inputs: SysVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """Minibatch loss; per-cell reconstruction (n,) and KL (n,) in nats; extra_metrics: cycle_loss (the
        minibatch mean of the cycle distance, before its weight)."""
        config = self.config
        if config.prior == "vamp" and self.training and not bool(self.pseudo_initialised):
            self._initialise_pseudo_inputs(inputs)
        inference = self.inference(inputs)
        qz, z = inference["qz"], inference["z"]
        px = self.generative(z, inputs)["px"]
        reconstruction = F.gaussian_nll_loss(px.loc, inputs.x, px.scale, full=True, reduction="none").sum(-1)
        # the cycle pass before the prior, as scvi-tools: the VampPrior's components are the pseudo-inputs encoded
        # in eval mode, with batch-norm running statistics that the cycle's encoding (training mode) has updated
        if config.z_distance_cycle_weight > 0:
            system = self.other_system(inputs.system)
            decoded = self.generative(z, inputs, system)["px"] if config.cycle_input == "cross_system" else px
            cycle = self.cycle_distance(qz, self._encode(decoded.loc, system, inputs))
        else:
            cycle = torch.zeros_like(reconstruction)
        if config.prior == "vamp":
            kl_z = (qz.log_prob(z) - self.prior_log_prob(z)).sum(-1)
        else:
            kl_z = kl_divergence(qz, Normal(torch.zeros_like(z), torch.ones_like(z))).sum(-1)
        weighted = config.reconstruction_weight * reconstruction + kl_weight * kl_z
        loss = torch.mean(weighted + config.z_distance_cycle_weight * cycle)
        return LossOutput(loss, reconstruction, {"kl_z": kl_z}, {"cycle_loss": cycle.mean().detach()})

    def forward(self, inputs: SysVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """The loss (DDP hooks its gradient reduction on forward)."""
        return self.loss(inputs, kl_weight)
