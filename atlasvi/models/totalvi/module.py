"""The totalVI module (Gayoso et al. 2021; scvi-tools 1.4.2's TOTALVAE): RNA and protein counts from one latent.

inference: [log1p(x / (1 + mean x)), log1p(y / (1 + mean y))] (and the covariates) -> q(z | x, y); library =
  total RNA counts (observed) or a latent log-normal with the store's per-batch prior.
generative (`RNAProteinDecoder`): x | z ~ NB(library * softmax(.), theta_gene) (or ZINB); y | z ~ a mixture of
  NB(background, theta_protein) with probability sigmoid(mixing) and NB(foreground = background x (1 + ReLU(.)),
  theta_protein), both times a per-batch protein efficiency; log background ~ N(back_alpha, back_beta), its prior
  N(background_pro_alpha[protein, batch], exp(background_pro_log_beta)[protein, batch]), started from the store's
  empirical per-batch values (`StoreSchema.modalities["protein"]`, scvi-tools' `_get_totalvi_protein_priors`)
  when the panel has more than 10 proteins, else at (3, 1) as scvi-tools.
loss (scvi-tools' TOTALVAE.loss, term for term): mean over cells of -log p(x) + kl_weight * (-log p(y) over the
  MEASURED proteins + KL(q(z) || N(0, I)) + the background terms) + KL(q(l) || p(l)); the background terms are the
  KL of the log background's posterior to its prior over the measured proteins, -log LogNormal(0, 1) of the
  efficiencies and -1e-3 log sigmoid(mixing) (scvi-tools counts the last two in kl_div_back_pro; so does this
  module's "kl_background", so the -ELBO is the quantity scvi-tools' get_elbo reports).

Where atlasvi departs from scvi-tools:
- Missing proteins are masked per cell by the store's mask (`batch.masks["protein"]`), not per batch by
  `protein_batch_mask`; on a store built from whole panels the two are the same entries. The mask is applied
  whether or not any protein is missing (on a fully measured store it is all ones, scvi-tools' unmasked case).
- The panel is the batch (scvi-tools' default `panel_key`); no separate panel covariate.
- latent_distribution "normal" only (scvi-tools' default; no logistic-normal latent) and no size-factor key.
- No parameter is built that the configuration does not use (scvi-tools builds the gene zero-inflation head and
  the library encoder always): DDP needs no find_unused_parameters.

The adversarial batch classifier (scvi-tools' AdversarialTrainingPlan; `adversarial_classifier`, by default on
when a batch's panel misses a protein, as TOTALVI.train) is `atlasvi.models.adversary.BatchAdversary`: the
fooling term joins the loss, the classifier's own loss is `LossOutput.adversary_loss`, trained by the loop's
second optimizer; a query mapping starts it afresh (scvi-tools builds a new one for every training).
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions import Distribution, LogNormal, Normal, kl_divergence

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.distributions import NegativeBinomial, NegativeBinomialMixture, ZeroInflatedNegativeBinomial
from atlasvi.models.adversary import BatchAdversary
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import IncompatibleStoreError, check_compatible, feature_map
from atlasvi.nn import Encoder, RNAProteinDecoder

PROTEIN = "protein"


class TOTALVIConfig(BaseModel):
    """totalVI; the defaults are scvi-tools' TOTALVI / TOTALVAE (n_latent 20, n_hidden 256, 2 encoder layers,
    1 decoder layer, dropout 0.2, NB genes, covariates encoded, batch norm in both).

    empirical_protein_background_prior: start the background prior from the store's per-batch values; None:
    when there are more than 10 proteins (scvi-tools' rule).
    adversarial_classifier: train an adversarial batch classifier on the latent; None: when some batch's panel
    lacks a protein (scvi-tools' TOTALVI.train rule); never with a single batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["totalvi"] = "totalvi"
    n_latent: int = Field(default=20, gt=0)
    n_hidden: int = Field(default=256, gt=0)
    n_layers_encoder: int = Field(default=2, gt=0)
    n_layers_decoder: int = Field(default=1, gt=0)
    dropout_rate_encoder: float = Field(default=0.2, ge=0, lt=1)
    dropout_rate_decoder: float = Field(default=0.2, ge=0, lt=1)
    gene_dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene"
    protein_dispersion: Literal["protein", "protein-batch", "protein-label"] = "protein"
    gene_likelihood: Literal["nb", "zinb"] = "nb"
    log_variational: bool = True
    encode_covariates: bool = True
    use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both"
    use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none"
    use_observed_lib_size: bool = True
    empirical_protein_background_prior: bool | None = None
    adversarial_classifier: bool | None = None


@dataclass(frozen=True)
class TOTALVIInputs:
    """A minibatch as the module reads it.

    x: (n, n_genes) RNA counts; y: (n, n_proteins) protein counts (0 where not measured); y_mask: (n, n_proteins)
    bool, True = measured; batch_index: (n,) codes; labels: (n,) codes or None; categorical: one (n,) code tensor
    per extra covariate; continuous: (n, n_continuous) or None.
    """

    x: torch.Tensor
    y: torch.Tensor
    y_mask: torch.Tensor
    batch_index: torch.Tensor
    labels: torch.Tensor | None
    categorical: tuple[torch.Tensor, ...]
    continuous: torch.Tensor | None


class TOTALVIModule(nn.Module):
    """totalVI as a plain nn.Module, built from a store's schema with a "protein" modality."""

    init_prefixes: tuple[str, ...] = ()
    used_modalities: tuple[str, ...] = (PROTEIN,)

    def __init__(self, schema: StoreSchema, config: TOTALVIConfig | None = None):
        super().__init__()
        config = config or TOTALVIConfig()
        self.config, self.schema = config, schema
        proteins = self.registry(schema, config).modalities[PROTEIN]
        self.protein_names = proteins.features
        self.batch_key, self.labels_key = schema.batch_key, schema.labels_key
        self.categorical_keys = tuple(k for k in schema.categorical if k not in (schema.batch_key, schema.labels_key))
        self.continuous_keys = schema.continuous
        self.n_genes, self.n_proteins = schema.n_genes, len(proteins.features)
        self.n_batch = len(schema.batch_categories)
        self.n_labels = len(schema.categorical[schema.labels_key]) if schema.labels_key else 0
        if "label" in (config.gene_dispersion + config.protein_dispersion) and self.n_labels == 0:
            raise ValueError("a per-label dispersion needs a store built with a labels key")
        n_categories = [self.n_batch] + [len(schema.categorical[k]) for k in self.categorical_keys]
        n_continuous = len(self.continuous_keys)

        encoder_categories = n_categories if config.encode_covariates else []
        n_encoder_in = self.n_genes + self.n_proteins + (n_continuous if config.encode_covariates else 0)
        encoder_options = {
            "n_hidden": config.n_hidden,
            "dropout_rate": config.dropout_rate_encoder,
            "use_batch_norm": _norm(config.use_batch_norm, "encoder"),
            "use_layer_norm": _norm(config.use_layer_norm, "encoder"),
        }
        self.z_encoder = Encoder(
            n_encoder_in, config.n_latent, encoder_categories, n_layers=config.n_layers_encoder, **encoder_options
        )
        if config.use_observed_lib_size:
            self.l_encoder = None
        else:
            self.l_encoder = Encoder(n_encoder_in, 1, encoder_categories, n_layers=1, **encoder_options)
            self.register_buffer("library_log_means", torch.tensor(schema.library_log_means).view(1, -1))
            self.register_buffer("library_log_vars", torch.tensor(schema.library_log_vars).view(1, -1))
        self.decoder = RNAProteinDecoder(
            config.n_latent + n_continuous,
            self.n_genes,
            self.n_proteins,
            n_categories,
            n_layers=config.n_layers_decoder,
            n_hidden=config.n_hidden,
            dropout_rate=config.dropout_rate_decoder,
            use_batch_norm=_norm(config.use_batch_norm, "decoder"),
            use_layer_norm=_norm(config.use_layer_norm, "decoder"),
            zero_inflation=config.gene_likelihood == "zinb",
        )
        columns = {"gene": 0, "gene-batch": self.n_batch, "gene-label": self.n_labels}
        n = columns[config.gene_dispersion]
        self.px_r = nn.Parameter(torch.randn((self.n_genes,) if n == 0 else (self.n_genes, n)))
        columns = {"protein": 0, "protein-batch": self.n_batch, "protein-label": self.n_labels}
        n = columns[config.protein_dispersion]
        self.py_r = nn.Parameter(2 * torch.rand((self.n_proteins,) if n == 0 else (self.n_proteins, n)))
        empirical = config.empirical_protein_background_prior
        if empirical if empirical is not None else self.n_proteins > 10:
            means = torch.tensor(proteins.background_log_means, dtype=torch.float32)
            scales = torch.tensor(proteins.background_log_scales, dtype=torch.float32)
            alpha, log_beta = means.expand(self.n_proteins, -1), torch.log(scales).expand(self.n_proteins, -1)
        else:
            alpha, log_beta = (
                torch.full((self.n_proteins, self.n_batch), 3.0),
                torch.zeros(self.n_proteins, self.n_batch),
            )
        self.background_pro_alpha = nn.Parameter(alpha.clone())
        self.background_pro_log_beta = nn.Parameter(log_beta.clone())
        self.log_per_batch_efficiency = nn.Parameter(torch.zeros(self.n_proteins, self.n_batch))
        adversarial = config.adversarial_classifier
        if adversarial is None:
            adversarial = not all(all(panel) for panel in proteins.batch_mask)
        # built last, so that the other weights are those of a module without it
        self.adversary = BatchAdversary(config.n_latent, self.n_batch) if adversarial and self.n_batch > 1 else None

    @classmethod
    def registry(cls, schema: StoreSchema, config: TOTALVIConfig) -> StoreSchema:
        """The store's registry; ValueError on a store without protein counts."""
        proteins = schema.modalities.get(PROTEIN)
        if proteins is None:
            raise ValueError("totalVI reads protein counts: build the store with protein_key (atlasvi build)")
        if len(proteins.background_log_means) != len(schema.batch_categories):
            raise ValueError(
                f"the protein prior has {len(proteins.background_log_means)} batches, the store "
                f"{len(schema.batch_categories)}"
            )
        return schema

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code per used key, and the store's proteins matched to the model's by name (one
        the store lacks is read as not measured: masked out of the likelihood, 0 in the encoder's input, as a
        panel without it; one the model lacks is not read). The store must have the model's genes, in order,
        and at least one of its proteins."""
        proteins = store.modalities.get(PROTEIN)
        if proteins is None:
            raise IncompatibleStoreError(
                f"{where}: the model was trained on {self.n_proteins} proteins {list(self.protein_names[:3])}..., "
                "the store has none; build it with protein_key"
            )
        maps = check_compatible(self.schema, store, self.used_keys, where)
        return maps | feature_map(self.protein_names, proteins.features, PROTEIN, where)

    def surgery_spec(self) -> SurgerySpec:
        """What scArches surgery grows: every covariate-injected layer of the decoder (and of the encoders, with
        encode_covariates), the per-batch protein tensors (background prior, efficiency) and per-batch
        dispersions; the decoder's batch norms adapt to the query."""
        layers = tuple(f"decoder.{name}" for name, child in self.decoder.named_children() if child is not None)
        if self.config.encode_covariates:
            layers += ("z_encoder.encoder",) + (("l_encoder.encoder",) if self.l_encoder is not None else ())
        grown = ("background_pro_alpha", "background_pro_log_beta", "log_per_batch_efficiency")
        grown += ("px_r",) if self.config.gene_dispersion == "gene-batch" else ()
        grown += ("py_r",) if self.config.protein_dispersion == "protein-batch" else ()
        fresh = ("adversary",) if self.adversary is not None else ()
        return SurgerySpec(covariate_layers=layers, batch_tensors=grown, decoders=("decoder",), fresh=fresh)

    @property
    def used_keys(self) -> tuple[str, ...]:
        """The categorical obs keys whose codes the module reads (batch, covariates, labels if used)."""
        uses_labels = "label" in (self.config.gene_dispersion + self.config.protein_dispersion)
        return (self.batch_key, *self.categorical_keys, *((self.labels_key,) if uses_labels else ()))

    def unpack(self, batch: Minibatch) -> TOTALVIInputs:
        """The module's inputs from a loader minibatch (RNA counts densified on the batch's device)."""
        continuous = (
            torch.stack([batch.continuous[k] for k in self.continuous_keys], dim=-1) if self.continuous_keys else None
        )
        mask = batch.masks[PROTEIN]
        return TOTALVIInputs(
            x=batch.counts(),
            y=batch.obsm[PROTEIN] * mask,  # missing is 0, as scvi-tools feeds the encoder
            y_mask=mask,
            batch_index=batch.categorical[self.batch_key],
            labels=batch.categorical.get(self.labels_key) if self.labels_key else None,
            categorical=tuple(batch.categorical[k] for k in self.categorical_keys),
            continuous=continuous,
        )

    def inference(self, inputs: TOTALVIInputs) -> dict:
        """q(z | x, y) and the library. Returns qz, z (n, n_latent), ql (or None), library (n, 1) RNA counts."""
        x = inputs.x / (1 + inputs.x.mean(dim=1, keepdim=True))
        y = inputs.y / (1 + inputs.y.mean(dim=1, keepdim=True))
        if self.config.log_variational:
            x, y = torch.log1p(x), torch.log1p(y)
        data = torch.cat([x, y], dim=-1)
        codes: tuple[torch.Tensor, ...] = ()
        if self.config.encode_covariates:
            codes = (inputs.batch_index, *inputs.categorical)
            if inputs.continuous is not None:
                data = torch.cat([data, inputs.continuous], dim=-1)
        qz, z = self.z_encoder(data, *codes)
        if self.l_encoder is None:
            ql, library = None, inputs.x.sum(dim=1, keepdim=True)
        else:
            ql, log_library = self.l_encoder(data, *codes)
            library = torch.exp(torch.clamp(log_library, max=15))
        return {"qz": qz, "z": z, "ql": ql, "library": library}

    def _per(self, parameter: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(n, features) columns of a (features, categories) parameter by each cell's code."""
        return F.linear(F.one_hot(codes.long().view(-1), parameter.shape[1]).float(), parameter)

    def _dispersion(self, parameter: torch.Tensor, kind: str, inputs: TOTALVIInputs) -> torch.Tensor:
        if parameter.dim() == 1:
            return torch.exp(parameter)
        return torch.exp(self._per(parameter, inputs.batch_index if kind.endswith("batch") else inputs.labels))

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, inputs: TOTALVIInputs, transform_batch: int | None = None
    ) -> dict:
        """p(x, y | z, library). Returns px (RNA), py (protein mixture with the batch efficiency), px_scale, the
        decoder's protein outputs (rate_back, rate_fore, mixing, back_alpha, back_beta, log_rate_back),
        efficiency (n, n_proteins); transform_batch: decode every cell as if from that batch code."""
        batch_index = (
            inputs.batch_index if transform_batch is None else torch.full_like(inputs.batch_index, transform_batch)
        )
        decoder_input = z if inputs.continuous is None else torch.cat([z, inputs.continuous], -1)
        out = self.decoder(decoder_input, library, batch_index, *inputs.categorical)
        efficiency = torch.exp(self._per(self.log_per_batch_efficiency, batch_index))
        theta_x = self._dispersion(self.px_r, self.config.gene_dispersion, inputs)
        theta_y = self._dispersion(self.py_r, self.config.protein_dispersion, inputs)
        if self.config.gene_likelihood == "zinb":
            px: Distribution = ZeroInflatedNegativeBinomial(out["rate"], theta_x, out["zi_logits"])
        else:
            px = NegativeBinomial(out["rate"], theta_x)
        py = NegativeBinomialMixture(
            efficiency * out["rate_back"], efficiency * out["rate_fore"], theta_y, out["mixing"]
        )
        return out | {"px": px, "py": py, "px_scale": out["scale"], "efficiency": efficiency}

    def background_prior(self, batch_index: torch.Tensor) -> Normal:
        """p(log background) per cell and protein: N(alpha[:, batch], exp(log_beta)[:, batch]), (n, n_proteins)."""
        alpha = self._per(self.background_pro_alpha, batch_index)
        beta = self._per(torch.exp(self.background_pro_log_beta), batch_index)
        return Normal(alpha, beta, validate_args=False)

    def loss(self, inputs: TOTALVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """scvi-tools' TOTALVAE.loss (see the module docstring). Per-cell reconstruction (n,): RNA + measured
        proteins; kl_local: kl_z, kl_background (and kl_library with a latent library), nats.
        extra_metrics: the RNA and protein reconstruction terms, minibatch means."""
        inference = self.inference(inputs)
        generative = self.generative(inference["z"], inference["library"], inputs)
        mask = inputs.y_mask.to(inference["z"].dtype)
        reconstruction_gene = -generative["px"].log_prob(inputs.x).sum(dim=-1)
        reconstruction_protein = -(generative["py"].log_prob(inputs.y) * mask).sum(dim=-1)
        kl_z = kl_divergence(inference["qz"], Normal(torch.zeros_like(inference["z"]), 1.0)).sum(dim=-1)
        posterior = Normal(generative["back_alpha"], generative["back_beta"], validate_args=False)
        kl_back = (kl_divergence(posterior, self.background_prior(inputs.batch_index)) * mask).sum(dim=-1)
        efficiency = -LogNormal(0.0, 1.0).log_prob(generative["efficiency"]).sum(dim=-1)
        expressed = 1e-3 * F.softplus(-generative["mixing"]).sum(dim=-1)  # -1e-3 log Bernoulli(1; logits)
        kl_background = kl_back + efficiency + expressed
        kl_local = {"kl_z": kl_z, "kl_background": kl_background}
        loss = reconstruction_gene + kl_weight * (reconstruction_protein + kl_z + kl_background)
        if inference["ql"] is not None:
            one_hot = F.one_hot(inputs.batch_index.long().view(-1), self.n_batch).float()
            prior = Normal(one_hot @ self.library_log_means.T, (one_hot @ self.library_log_vars.T).sqrt())
            kl_local["kl_library"] = kl_divergence(inference["ql"], prior).sum(dim=-1)
            loss = loss + kl_local["kl_library"]
        extra = {
            "reconstruction_rna": reconstruction_gene.mean().detach(),
            "reconstruction_protein": reconstruction_protein.mean().detach(),
        }
        total, adversary_loss = torch.mean(loss), None
        if self.adversary is not None:  # scvi-tools' kappa: 1 - kl_weight
            fooling, adversary_loss = self.adversary.losses(inference["z"], inputs.batch_index, 1.0 - kl_weight)
            total = total + fooling
            extra["adversary_loss"] = adversary_loss.detach()
        reconstruction = reconstruction_gene + reconstruction_protein
        return LossOutput(total, reconstruction, kl_local, extra, adversary_loss)

    def forward(self, inputs: TOTALVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """The loss (DDP hooks its gradient reduction on forward)."""
        return self.loss(inputs, kl_weight)


def _norm(where: str, part: str) -> bool:
    """Whether a use_batch_norm / use_layer_norm setting ("encoder", "decoder", "both", "none") covers `part`."""
    return where in (part, "both")
