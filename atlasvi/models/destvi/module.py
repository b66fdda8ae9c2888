"""The DestVI spatial module (scvi-tools 1.4.2's MRDeconv): spots as mixtures of the reference's cell types.

Each spot's counts x_s ~ NB(l_s * sum_c (v_sc + eps_v) r_sc, exp(px_r)), l_s the spot's total counts. For the n_labels
types of the reference, r_sc = sum_k pi_sck softmax(px_decoder(decoder([gamma_sck, e_batch], c)) + per_ct_bias_c + beta)
is the frozen CondSCVI decoder's expression at the spot's per-type latent states gamma_sck (n_states_per_label of
them, mixed by pi_sck), beta a gene-wise correction; the add_celltypes dummy types' r = softmax(eta) (unexplained
signal). v_s = softmax(...) over the types and the dummy type: the proportions. With amortization ("both", the
default) gamma, pi and v are outputs of networks of log1p(x_s); otherwise free per-spot parameters ("latent": v per
spot, "proportion": gamma per spot, "none": both).

Loss (mean over the minibatch's spots and augmented copies): reconst_weight * -log p(x) + kl_weight * (-log prior of
gamma, weighted by the proportions + ct_sparsity_weight * entropy(v) - eta_reg * log Exp(v_dummy)) - beta_reg * log
N(beta; 0, 1) + the augmentation term. The gamma prior is a mixture over the CondSCVI's per-label prototypes (its
`vamp_prior`; prior_mode "mog": the mixture's density, as scvi-tools, with each prototype's variance as its scale).
Augmentation (training only): besides each spot, n_samples_augmentation copies: one a spot simulated from the
frozen decoder at prototype draws with Dirichlet(0.03) type ratios (library + 50), the others the spot blended
with such a simulation (Beta(0.4, 0.5) share); the fully simulated copy's proportions are pulled to its true
ratios (weighting_augmentation * KL(true || v)), and the prior of each copy gains the drawn states as a component.

The CondSCVI's decoder, px_decoder and per_ct_bias are held as buffers (frozen; dropout of the decoder still acts
in training, as scvi-tools' frozen decoder in train mode); px_r starts from the CondSCVI's and trains; the batch
embedding starts afresh and trains (scvi-tools builds a new one). Departures: no smoothed layer (scvi-tools'
x_smoothed) and no fine-label read-out (get_fine_celltypes).
"""

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.distributions import Beta, Categorical, Dirichlet, Exponential, Independent, MixtureSameFamily, Normal

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.distributions import NegativeBinomial
from atlasvi.models.condscvi.module import BATCH_EMBEDDING_DIM, conditional_decoder
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import ModelFileError, check_compatible
from atlasvi.nn import Encoder, FCLayers

FROZEN = ("decoder.", "px_decoder.", "per_ct_bias")  # the CondSCVI weights DestVI holds as buffers
PRIOR = ("mean_vprior", "var_vprior", "mp_vprior")  # the CondSCVI's prototypes


class DestVIConfig(BaseModel):
    """DestVI; the defaults are scvi-tools' MRDeconv's (as DestVI.from_rna_model builds it).

    n_latent, n_hidden, n_layers, dropout_rate, vamp_prior_p: the CondSCVI's (its decoder and prototypes are
    reused; `atlasvi train --init-from` takes them from the saved CondSCVI). amortization: which per-spot quantities
    come from networks of the counts ("both", "latent": gamma, "proportion": v, "none"); prior_mode "mog" (a
    mixture over n_states_per_label states per type, needs the latent amortized) or "normal"; augmentation: the
    simulated copies (see the module); n_latent_amortization: encode the counts into a latent of this width first
    (None: the networks read log1p(x)); the loss weights are scvi-tools' MRDeconv.loss defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["destvi"] = "destvi"
    n_latent: int = Field(default=5, gt=0)
    n_hidden: int = Field(default=128, gt=0)
    n_layers: int = Field(default=2, gt=0)
    dropout_rate: float = Field(default=0.05, ge=0, lt=1)
    vamp_prior_p: int = Field(default=15, gt=0)
    amortization: Literal["none", "latent", "proportion", "both"] = "both"
    prior_mode: Literal["mog", "normal"] = "mog"
    augmentation: bool = True
    n_samples_augmentation: int = Field(default=2, ge=2)
    n_states_per_label: int = Field(default=3, gt=0)
    eps_v: float = Field(default=2e-3, ge=0)
    add_celltypes: int = Field(default=1, gt=0)
    n_latent_amortization: int | None = Field(default=None, gt=0)
    dropout_amortization: float = Field(default=0.03, ge=0, lt=1)
    ct_sparsity_weight: float = Field(default=2.0, ge=0)
    weighting_augmentation: float = Field(default=100.0, ge=0)
    eta_reg: float = Field(default=1.0, ge=0)
    beta_reg: float = Field(default=1.0, ge=0)
    weighting_kl_latent: float = Field(default=1e-3, ge=0)
    reconst_weight: float = Field(default=3.0, ge=0)

    @model_validator(mode="after")
    def _mog_needs_amortized_latent(self) -> "DestVIConfig":
        if self.prior_mode == "mog" and self.amortization not in ("both", "latent"):
            raise ValueError("prior_mode 'mog' needs amortization 'both' or 'latent' (scvi-tools' rule)")
        return self


@dataclass(frozen=True)
class DestVIInputs:
    """A minibatch of spots: x (n, n_genes) counts, batch_index (n,) codes, rows (n,) the spots' store rows."""

    x: torch.Tensor
    batch_index: torch.Tensor
    rows: torch.Tensor


class DestVIModule(nn.Module):
    """DestVI's spatial model as a plain nn.Module, on the registry of its CondSCVI (genes, cell types) with the
    spots store's batches and spot count (`init_registry`); started from a saved CondSCVI (`take_init_state`)."""

    config: DestVIConfig
    init_prefixes: ClassVar[tuple[str, ...]] = (*FROZEN, "px_r", *PRIOR)
    used_modalities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, schema: StoreSchema, config: DestVIConfig | None = None):
        super().__init__()
        config = config or DestVIConfig()
        if schema.labels_key is None:
            raise ValueError("DestVI needs the registry of a CondSCVI trained with labels (atlasvi train --init-from)")
        self.config, self.schema = config, schema
        self.batch_key = schema.batch_key
        self.cell_types = schema.categorical[schema.labels_key]
        self.n_labels, self.n_genes, self.n_latent = len(self.cell_types), schema.n_genes, config.n_latent
        self.n_spots, self.n_batch = schema.n_cells, len(schema.batch_categories)
        n_labels, n_extra = self.n_labels, config.add_celltypes
        self.decoder = _frozen(conditional_decoder(config, n_labels))
        self.px_decoder = _frozen(nn.Linear(config.n_hidden, self.n_genes))
        self.register_buffer("per_ct_bias", torch.zeros(n_labels, self.n_genes))
        self.px_r = nn.Parameter(torch.randn(self.n_genes))
        self.batch_embedding = nn.Embedding(self.n_batch, BATCH_EMBEDDING_DIM)
        p = config.vamp_prior_p
        self.register_buffer("mean_vprior", torch.zeros(n_labels, p, config.n_latent))
        self.register_buffer("var_vprior", torch.ones(n_labels, p, config.n_latent))
        self.register_buffer("mp_vprior", torch.full((n_labels, p), 1.0 / p))
        amortized_v = config.amortization in ("both", "proportion")
        amortized_gamma = config.amortization in ("both", "latent")
        # free per-spot parameters only where they are used (scvi-tools builds both always)
        self.V = None if amortized_v else nn.Parameter(torch.randn(n_labels + n_extra, self.n_spots))
        self.gamma = None if amortized_gamma else nn.Parameter(torch.randn(config.n_latent, n_labels, self.n_spots))
        self.eta = nn.Parameter(torch.zeros(n_extra, self.n_genes))
        self.beta = nn.Parameter(torch.zeros(self.n_genes))
        if config.n_latent_amortization is not None:
            self.z_encoder = Encoder(
                self.n_genes, config.n_latent_amortization, [self.n_batch], n_layers=config.n_layers,
                n_hidden=config.n_hidden, dropout_rate=config.dropout_amortization, use_batch_norm=False,
                use_layer_norm=True, var_activation="softplus",
            )  # fmt: skip
            n_amortization = config.n_latent_amortization
        else:
            self.z_encoder, n_amortization = None, self.n_genes
        if config.prior_mode == "mog":
            n_gamma_out = config.n_states_per_label * n_labels * (config.n_latent + 1)
        else:
            n_gamma_out = n_labels * config.n_latent
        self.gamma_encoder = (
            nn.Sequential(
                FCLayers(
                    n_amortization,
                    config.n_hidden,
                    n_layers=2,
                    n_hidden=config.n_hidden,
                    dropout_rate=config.dropout_amortization,
                    use_batch_norm=False,
                    use_layer_norm=True,
                ),
                nn.Linear(config.n_hidden, n_gamma_out),
            )  # fmt: skip
            if amortized_gamma
            else None
        )
        self.V_encoder = (
            nn.Sequential(
                FCLayers(
                    n_amortization,
                    config.n_hidden,
                    n_layers=config.n_layers,
                    n_hidden=config.n_hidden,
                    dropout_rate=0.0,
                    use_batch_norm=False,
                    use_layer_norm=True,
                ),
                nn.Linear(config.n_hidden, n_labels + n_extra),
            )  # fmt: skip
            if amortized_v
            else None
        )

    # the registry and the start from a CondSCVI

    @classmethod
    def registry(cls, schema: StoreSchema, config: DestVIConfig) -> StoreSchema:
        """The registry the module is built on from a saved DestVI's (or `init_registry`'s): the same one."""
        return schema

    @classmethod
    def init_registry(cls, saved: StoreSchema, store: StoreSchema) -> StoreSchema:
        """The registry of a DestVI started from the saved CondSCVI registry `saved` on the spots `store`: the
        CondSCVI's genes and cell types, the store's spots, batches (a fresh embedding, as scvi-tools) and library
        prior. The store must have the CondSCVI's genes in its order (IncompatibleStoreError otherwise)."""
        check_compatible(saved, store, (), "the spots store")
        categorical = {store.batch_key: store.batch_categories, saved.labels_key: saved.categorical[saved.labels_key]}
        return replace(
            saved,
            n_cells=store.n_cells,
            batch_key=store.batch_key,
            categorical=categorical,
            continuous=(),
            library_log_means=store.library_log_means,
            library_log_vars=store.library_log_vars,
            modalities={},
        )

    def take_init_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights DestVI takes from a saved CondSCVI's `state` (scvi-tools' from_rna_model): the decoder,
        px_decoder, per_ct_bias, px_r and the prototypes; ModelFileError when a cell type has no prototype."""
        taken = {k: v for k, v in state.items() if k.startswith(self.init_prefixes)}
        if "mp_vprior" in taken and not bool((taken["mp_vprior"].sum(-1) > 0).all()):
            raise ModelFileError("the CondSCVI has no prototypes for some cell type (its vamp prior: save it trained)")
        return taken

    @property
    def used_keys(self) -> tuple[str, ...]:
        return (self.batch_key,)

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code of the batch; the store must hold the model's spots (per-spot parameters)."""
        if (self.V is not None or self.gamma is not None) and store.n_cells != self.n_spots:
            raise ValueError(f"{where}: {store.n_cells} spots, the model has parameters for {self.n_spots}")
        return check_compatible(self.schema, store, self.used_keys, where)

    def surgery_spec(self) -> None:
        """None: no scArches query mapping (scvi-tools' DestVI has none)."""
        return None

    def unpack(self, batch: Minibatch) -> DestVIInputs:
        return DestVIInputs(batch.counts(), batch.categorical[self.batch_key], batch.rows)

    # the model

    def _qz_prior(self) -> MixtureSameFamily:
        """The mixture of the CondSCVI's prototypes per type (batch (n_labels,), event (n_latent,))."""
        return MixtureSameFamily(
            Categorical(probs=self.mp_vprior, validate_args=False),
            Independent(Normal(self.mean_vprior, self.var_vprior.sqrt() + 1e-4, validate_args=False), 1),
            validate_args=False,
        )

    def augment(self, inputs: DestVIInputs) -> dict:
        """scvi-tools' _get_inference_input: the spots (n_samples = 1, not training or no augmentation) or the spots
        and their n_samples_augmentation simulated copies. Returns x_augmented (n_samples, m, n_genes) and, with
        augmentation, prior_sampled (n_samples, m * n_labels, n_latent), ratios_ct_augmentation (n_samples, m,
        n_labels) and ratio_augmentation (n_samples, m, 1)."""
        x, m, n_labels, config = inputs.x, inputs.x.shape[0], self.n_labels, self.config
        if not (config.augmentation and self.training):
            return {"x_augmented": x.unsqueeze(0), "prior_sampled": None, "ratios": None, "ratio": None}
        n_samples = config.n_samples_augmentation + 1
        with torch.no_grad():
            prior_sampled = self._qz_prior().sample((n_samples, m)).reshape(n_samples, -1, self.n_latent)
            labels = torch.arange(n_labels, device=x.device).repeat(m)  # (m * n_labels,)
            batch_rep = self.batch_embedding(inputs.batch_index.long().view(-1)).repeat_interleave(n_labels, dim=0)
            batch_rep = batch_rep.expand(n_samples, -1, -1)
            scale = self._decode(prior_sampled, batch_rep, labels.expand(n_samples, -1))
            scale = scale.reshape(n_samples, m, n_labels, -1)
            library = x.sum(-1).view(1, m, 1, 1).repeat(n_samples, 1, 1, 1)
            library[1] = library[1] + 50
            ratios = Dirichlet(torch.full((n_labels,), 0.03, device=x.device)).sample((n_samples, m))
            rate = torch.einsum("imc,imcg->img", ratios, library * scale)
            blend = Beta(torch.tensor(0.4, device=x.device), torch.tensor(0.5, device=x.device))
            ratio = torch.cat(
                [
                    torch.zeros((1, m, 1), device=x.device),
                    torch.ones((1, m, 1), device=x.device),
                    blend.sample((config.n_samples_augmentation - 1, m)).unsqueeze(-1),
                ]
            )
            simulated = NegativeBinomial(rate, torch.exp(self.px_r)).sample()
            x_augmented = (1 - ratio) * x.unsqueeze(0) + ratio * simulated
        return {"x_augmented": x_augmented, "prior_sampled": prior_sampled, "ratios": ratios, "ratio": ratio}

    def inference(self, inputs: DestVIInputs) -> dict:
        """The amortization input z (n_samples, m, width): log1p(x), or a latent of width n_latent_amortization
        encoded from it (its qz); library (n_samples, m, 1) total counts; the augmentation's draws (`augment`).
        qz, z of the observed spots (sample 0) are also given as `qz`, `z` of (m, width)."""
        out = self.augment(inputs)
        x = out["x_augmented"]
        out["library"] = x.sum(-1, keepdim=True)
        counts = torch.log1p(x)
        if self.z_encoder is not None:
            n_samples, m = x.shape[:2]
            codes = inputs.batch_index.view(-1).repeat(n_samples)
            qz_all, z_all = self.z_encoder(counts.reshape(n_samples * m, -1), codes)
            out["qz_all"] = Normal(qz_all.loc.view(n_samples, m, -1), qz_all.scale.view(n_samples, m, -1))
            out["z_all"] = z_all.view(n_samples, m, -1)
        else:
            out["qz_all"] = Normal(counts, 1e-6 * torch.ones_like(counts), validate_args=False)
            out["z_all"] = counts
        out["qz"] = Normal(out["qz_all"].loc[0], out["qz_all"].scale[0], validate_args=False)
        out["z"] = out["z_all"][0]
        return out

    def _decode(self, gamma: torch.Tensor, batch_rep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The frozen CondSCVI decoder with beta: gamma (..., n_latent), batch_rep (..., 5), labels (...) ->
        (..., n_genes) expression fractions."""
        lead = gamma.shape[:-1]
        hidden = self.decoder(torch.cat([gamma, batch_rep], -1).reshape(-1, gamma.shape[-1] + batch_rep.shape[-1]),
                              labels.reshape(-1))  # fmt: skip
        logits = self.px_decoder(hidden) + self.per_ct_bias[labels.reshape(-1)] + self.beta
        return torch.softmax(logits, dim=-1).reshape(*lead, -1)

    def generative(self, z: torch.Tensor, library: torch.Tensor, inputs: DestVIInputs) -> dict:
        """scvi-tools' MRDeconv.generative. z: (n_samples, m, width); library (n_samples, m, 1). Returns px_rate,
        px_scale (n_samples, m, n_genes), px_mu (n_samples, m, n_labels + add_celltypes, n_genes) the per-type
        fractions, gamma (n_samples, n_states, n_latent, n_labels, m), v (n_samples, m, n_labels + add_celltypes)
        and proportion_modes (n_samples, n_states, m, n_labels)."""
        config, n_labels, n_latent = self.config, self.n_labels, self.n_latent
        n_samples, m = z.shape[0], z.shape[1]
        rows = inputs.rows.long().view(-1)
        ones = torch.ones((n_samples, 1, m, n_labels), device=z.device)
        if self.gamma_encoder is not None and config.prior_mode == "mog":
            k = config.n_states_per_label
            out = self.gamma_encoder(z)  # (n_samples, m, k * L * D + k * L)
            modes_logits = out[..., -k * n_labels :].transpose(-1, -2).reshape(n_samples, k, n_labels, m)
            proportion_modes = torch.softmax(modes_logits.transpose(-1, -2), dim=-3)
            gamma = out[..., : k * n_labels * n_latent].transpose(-1, -2).reshape(n_samples, k, n_latent, n_labels, m)
        elif self.gamma_encoder is not None:
            gamma = self.gamma_encoder(z).transpose(-1, -2).reshape(n_samples, 1, n_latent, n_labels, m)
            proportion_modes = ones
        else:
            gamma = self.gamma[:, :, rows].unsqueeze(0).unsqueeze(0).expand(n_samples, 1, -1, -1, -1)
            proportion_modes = ones
        if self.V_encoder is not None:
            v_logits = self.V_encoder(z)
        else:
            v_logits = self.V[:, rows].T.unsqueeze(0).expand(n_samples, -1, -1)
        v = torch.softmax(v_logits, dim=-1)
        labels = torch.arange(n_labels, device=z.device).repeat(m).expand(n_samples, -1)  # (n_samples, m * L)
        batch_rep = self.batch_embedding(inputs.batch_index.long().view(-1)).repeat_interleave(n_labels, dim=0)
        batch_rep = batch_rep.expand(n_samples, -1, -1)
        px_est = 0.0
        for mode in range(gamma.shape[1]):
            gamma_mode = gamma[:, mode].transpose(-1, -3).reshape(n_samples, m * n_labels, n_latent)
            scale = self._decode(gamma_mode, batch_rep, labels).reshape(n_samples, m, n_labels, -1)
            px_est = px_est + proportion_modes[:, mode].unsqueeze(-1) * scale
        dummy = torch.softmax(self.eta, dim=-1).expand(n_samples, m, -1, -1)
        r_hat = torch.cat([px_est, dummy], dim=-2)
        eps_v = config.eps_v if self.training else 0.0
        px_scale = torch.sum((v.unsqueeze(-1) + eps_v) * r_hat, dim=-2)
        return {
            "px_rate": library * px_scale, "px_scale": px_scale, "px_mu": r_hat, "gamma": gamma, "v": v,
            "proportion_modes": proportion_modes, "px_r": torch.exp(self.px_r),
        }  # fmt: skip

    def loss(self, inputs: DestVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """scvi-tools' MRDeconv.loss (see the module docstring). Per spot: reconstruction (m,) the -log p(x) of the
        spot and its copies averaged over them (nats); kl_local "prior": the gamma prior and amortization KL terms,
        "sparsity": the proportions' entropy and dummy-type terms, averaged over the copies where they have them."""
        config = self.config
        inference = self.inference(inputs)
        out = self.generative(inference["z_all"], inference["library"], inputs)
        x_augmented, gamma, v = inference["x_augmented"], out["gamma"], out["v"]
        n_samples, m = x_augmented.shape[:2]
        augmented = inference["prior_sampled"] is not None
        n_labels, n_extra = self.n_labels, config.add_celltypes
        reconstruction = -NegativeBinomial(out["px_rate"], out["px_r"]).log_prob(x_augmented).sum(-1).mean(0)
        beta_prior = -config.beta_reg * Normal(0.0, 1.0).log_prob(self.beta).sum()
        augmentation = torch.zeros((), device=x_augmented.device)
        mean_v, var_v, mp_v = self.mean_vprior, self.var_vprior, self.mp_vprior
        if augmented:
            ratios, ratio = inference["ratios"], inference["ratio"]
            expected = torch.cat([ratios, torch.zeros(n_samples, m, n_extra, device=v.device)], dim=-1)
            augmentation = augmentation + config.weighting_augmentation * _kl_proportions(expected[1], v[1])
            drawn = inference["prior_sampled"].reshape(n_samples, 1, m, n_labels, self.n_latent)
            mean_v = torch.cat(
                [mean_v.expand(n_samples, m, -1, -1, -1), drawn.permute(0, 2, 3, 1, 4)], dim=-2
            )  # (n_samples, m, L, p + 1, D)
            smallest = var_v.min(dim=-2).values.view(1, 1, n_labels, 1, self.n_latent)
            var_v = torch.cat([var_v.expand(n_samples, m, -1, -1, -1), smallest.expand(n_samples, m, -1, -1, -1)], -2)
            mp_v = torch.cat(
                [
                    (1 - ratio.unsqueeze(-1)) * mp_v.expand(n_samples, m, -1, -1),
                    ratio.unsqueeze(-1) * ratios.unsqueeze(-1),
                ],
                dim=-1,
            )  # (n_samples, m, L, p + 1)
        else:
            mean_v, var_v, mp_v = (t.unsqueeze(0).unsqueeze(0) for t in (mean_v, var_v, mp_v))
        if config.prior_mode == "mog":
            states = gamma.permute(1, 0, 4, 3, 2)  # (n_states, n_samples, m, L, D)
            # scvi-tools' MixtureSameFamily here takes each prototype's variance as its scale
            mixture = MixtureSameFamily(
                Categorical(probs=mp_v, validate_args=False),
                Independent(Normal(mean_v, var_v, validate_args=False), 1),
                validate_args=False,
            )
            log_prior = mixture.log_prob(states).permute(1, 0, 2, 3)  # (n_samples, n_states, m, L)
            log_prior = (log_prior * (out["proportion_modes"] + 1e-6)).sum(-3)
            prior = -(log_prior * (v[..., :-n_extra] + 1e-3)).sum(-1)  # (n_samples, m)
        else:
            states = gamma.permute(0, 4, 1, 3, 2)  # (n_samples, m, 1, L, D)
            pre = Normal(mean_v.transpose(-3, -2), var_v.transpose(-3, -2).sqrt() + 1e-4).log_prob(states).sum(-1)
            pre = pre + torch.log(1e-3 + mp_v.transpose(-2, -1))  # (n_samples, m, p, L)
            prior = -torch.logsumexp(pre, -2).sum(-1)  # (n_samples, m)
        if self.z_encoder is not None:
            qz = inference["qz_all"]
            prior = prior + config.weighting_kl_latent * torch.distributions.kl_divergence(
                qz, Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale))
            ).sum(-1)
        entropy = config.ct_sparsity_weight * Categorical(probs=v[0], validate_args=False).entropy()
        dummy = -config.eta_reg * Exponential(torch.ones_like(v[0, :, -n_extra:])).log_prob(v[0, :, -n_extra:])
        # scvi-tools adds the minibatch's sum of the dummy-type term to every spot's; reported per spot here
        total = config.reconst_weight * reconstruction + kl_weight * (prior + entropy + dummy.sum()) + beta_prior
        total = total + augmentation
        sparsity = entropy + dummy.sum(-1)
        return LossOutput(
            torch.mean(total),
            reconstruction,
            {"prior": prior.mean(0), "sparsity": sparsity},
            extra_metrics={"v_sparsity": sparsity.mean().detach(), "augmentation": augmentation.detach()},
        )

    def forward(self, inputs: DestVIInputs, kl_weight: float = 1.0) -> LossOutput:
        return self.loss(inputs, kl_weight)

    # read-outs (of the observed spots)

    @torch.no_grad()
    def proportions(self, inputs: DestVIInputs) -> torch.Tensor:
        """(m, n_labels + add_celltypes) v of the spots (scvi-tools' get_proportions before dropping / normalising;
        without amortized proportions, softplus of V as scvi-tools reads them)."""
        if self.V_encoder is None:
            return F.softplus(self.V[:, inputs.rows.long().view(-1)]).T
        return self._observed(inputs)["v"][0]

    @torch.no_grad()
    def gamma_of(self, inputs: DestVIInputs) -> torch.Tensor:
        """(m, n_latent, n_labels) per-type latent states of the spots, the states mixed by their weights (mog)."""
        if self.gamma_encoder is None:
            return self.gamma[:, :, inputs.rows.long().view(-1)].permute(2, 0, 1)
        out = self._observed(inputs)
        gamma = out["gamma"][0]  # (n_states, D, L, m)
        if self.config.prior_mode == "mog":
            gamma = torch.einsum("pncm,pmc->ncm", gamma, out["proportion_modes"][0])
        else:
            gamma = gamma[0]
        return gamma.permute(2, 0, 1)

    @torch.no_grad()
    def scale_for_ct(self, inputs: DestVIInputs, label: int) -> torch.Tensor:
        """(m, n_genes) expression fractions of type `label` in the spots (scvi-tools' get_scale_for_ct: px_mu)."""
        return self._observed(inputs)["px_mu"][0, :, label]

    def _observed(self, inputs: DestVIInputs) -> dict:
        inference = self.inference(inputs)
        return self.generative(inference["z_all"], inference["library"], inputs)


def _kl_proportions(prob_true: torch.Tensor, prob_pred: torch.Tensor) -> torch.Tensor:
    """scvi-tools' MRDeconv._compute_cross_entropy: KL(true || pred) per spot, averaged ("batchmean")."""
    log_pred = torch.log(prob_pred / prob_pred.sum(-1, keepdim=True))
    prob_true = prob_true + 1e-20
    prob_true = prob_true / prob_true.sum(-1, keepdim=True)
    return F.kl_div(log_pred, prob_true, reduction="batchmean", log_target=False)


def _frozen(module: nn.Module) -> nn.Module:
    """`module` with every parameter turned into a buffer of the same name: it computes the same, nothing trains
    it (no optimizer or DDP sees it), its state_dict names are unchanged."""
    for child in module.modules():
        for name, parameter in list(child.named_parameters(recurse=False)):
            del child._parameters[name]
            child.register_buffer(name, parameter.detach())
    return module
