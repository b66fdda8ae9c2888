"""The MultiVI module (Ashuach et al. 2023; scvi-tools 1.4.2's MULTIVAE): RNA and ATAC of paired and unpaired cells.

One encoder per modality on the raw counts (not log-transformed, as scvi-tools): q_rna(z | x) and q_atac(z | a)
(Normal, variance exp(.) with no eps), each with its own non-variational size network: the RNA log-library
l = LeakyReLU(Linear(FCLayers(x))) and the ATAC depth factor d = sigmoid(...) (PeakVI's). The joint posterior is the
masked weighted average of the modality posteriors over the modalities the cell has (the store's masks, never
zero counts read as a measurement): w = masked softmax of the modality weights ("equal": fixed ones, "universal": one
learned weight per modality, "cell": one per store cell and modality), mean = sum_m w_m mu_m and variance
= sum_m sqrt(w_m) var_m (scvi-tools' mix_modalities). z ~ N(mean, variance); p(z) = N(0, I).
Generative: x | z ~ ZINB / NB / Poisson(exp(l) softmax(f_rna(z, batch)), theta per gene / gene-batch /
gene-label) (scvi-tools' DecoderSCVI); a_ij > 0 ~ Bernoulli(f_atac(z, batch)_ij d_i sigmoid(r_j)) (PeakVI's head
with region factors r).
Loss (scvi-tools' MULTIVAE.loss): mean over cells of rna_mask * -log p(x) + atac_mask * BCE(a) + kl_weight *
KL(q(z) || p(z)) + penalty, the modality penalty NOT warmed up: "Jeffreys", for cells with both modalities, the
symmetric KL between the two modality posteriors summed over latent dimensions, computed as scvi-tools 1.4.2 does
(its sym_kld is handed the posterior s.d.s and takes their square root again: the two Normals it compares have
scale var^(1/4)); "MMD" the distance of the two means; "None". With more than one batch, an adversarial batch
classifier on z (scvi-tools' AdversarialTrainingPlan as MULTIVI.train sets it: on, its terms scaled by 1, not by
1 - kl_weight; `atlasvi.models.adversary`). The per-cell reconstruction reported is the sum of the two masked
terms, the KL terms kl_z and kl_paired (the penalty): the -ELBO scvi-tools' MULTIVI logs.

Departures from scvi-tools, and why:
- no protein head (scvi-tools' optional third modality; atlasvi's totalVI reads proteins);
- the masks are the store's (what was measured), where scvi-tools reads a modality as missing when a cell's counts
  of it sum to 0; on a store built from scvi-tools' zero-filled layout (`atlasvi build`) the two are the same;
- two modality weights (RNA, ATAC), where scvi-tools keeps a third for the protein it may not have: the same
  masked softmax, and no parameter without a gradient (DDP needs no find_unused_parameters);
- "cell" weights are indexed by store row, and the model reads no other store with them (as scvi-tools refuses
  held-out data with per-cell weights);
- latent_distribution "normal" only, no size-factor key; BCE in float32 with autocast off (as PeakVI).
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions import Distribution, Normal, Poisson, kl_divergence

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from atlasvi.models.adversary import BatchAdversary
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import IncompatibleStoreError, check_compatible
from atlasvi.nn import CountDecoder, Encoder, FCLayers, ProbabilityDecoder

RNA, ATAC = "rna", "atac"
Norm = Literal["encoder", "decoder", "both", "none"]


class MULTIVIConfig(BaseModel):
    """MultiVI's architecture; the defaults are scvi-tools' MULTIVI.

    n_hidden None: min(128, int(sqrt(n_regions))); n_latent None: int(sqrt(n_hidden)) (resolved by the module);
    gene_likelihood: "zinb" (scvi-tools' default), "nb" or "poisson"; dispersion: gene, gene-batch or gene-label;
    adversarial_classifier: the adversarial batch classifier (scvi-tools' MULTIVI.train adversarial_mixing, on by
    default; never with one batch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["multivi"] = "multivi"
    modality_weights: Literal["equal", "universal", "cell"] = "equal"
    modality_penalty: Literal["Jeffreys", "MMD", "None"] = "Jeffreys"
    n_hidden: int | None = Field(default=None, gt=0)
    n_latent: int | None = Field(default=None, gt=0)
    n_layers_encoder: int = Field(default=2, gt=0)
    n_layers_decoder: int = Field(default=2, gt=0)
    dropout_rate: float = Field(default=0.1, ge=0, lt=1)
    region_factors: bool = True
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb"
    dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene"
    use_batch_norm: Norm = "none"
    use_layer_norm: Norm = "both"
    deeply_inject_covariates: bool = False
    encode_covariates: bool = False
    adversarial_classifier: bool = True


@dataclass(frozen=True)
class MULTIVIInputs:
    """A minibatch as the module reads it.

    x: (n, n_genes) RNA counts (0 where not measured); atac: (n, n_regions) peak counts (0 where not measured);
    rna_mask, atac_mask: (n,) bool, True = measured; batch_index: (n,) codes; labels: (n,) codes or None;
    categorical: one (n,) code tensor per extra covariate; continuous: (n, n_continuous) or None; rows: (n,) store
    rows (the "cell" modality weights').
    """

    x: torch.Tensor
    atac: torch.Tensor
    rna_mask: torch.Tensor
    atac_mask: torch.Tensor
    batch_index: torch.Tensor
    labels: torch.Tensor | None
    categorical: tuple[torch.Tensor, ...]
    continuous: torch.Tensor | None
    rows: torch.Tensor


class LibrarySizeEncoder(nn.Module):
    """scvi-tools' MultiVI LibrarySizeEncoder: FCLayers (LeakyReLU, no dropout) -> Linear(n_hidden, 1) -> LeakyReLU,
    the cell's RNA log-library (n, 1) from its counts. Under the same torch seed it draws scvi-tools' weights, layer
    for layer (tested), so its initial output has scvi-tools' distribution over seeds."""

    def __init__(self, n_in: int, n_categories: list[int], n_layers: int, n_hidden: int, **norms: bool):
        super().__init__()
        self.px_decoder = FCLayers(
            n_in, n_hidden, n_categories, n_layers, n_hidden, 0.0, activation=nn.LeakyReLU, **norms
        )
        self.output = nn.Sequential(nn.Linear(n_hidden, 1), nn.LeakyReLU())

    def forward(self, x: torch.Tensor, *codes: torch.Tensor) -> torch.Tensor:
        return self.output(self.px_decoder(x, *codes))


class MULTIVIModule(nn.Module):
    """MultiVI as a plain nn.Module, built from a store's schema with an "atac" modality and the RNA mask."""

    init_prefixes: tuple[str, ...] = ()
    used_modalities: tuple[str, ...] = (ATAC, RNA)

    def __init__(self, schema: StoreSchema, config: MULTIVIConfig | None = None):
        super().__init__()
        config = config or MULTIVIConfig()
        self.config, self.schema = config, schema
        regions = self.registry(schema, config).modalities[ATAC]
        self.region_names = regions.features
        self.batch_key, self.labels_key = schema.batch_key, schema.labels_key
        self.categorical_keys = tuple(k for k in schema.categorical if k not in (schema.batch_key, schema.labels_key))
        self.continuous_keys = schema.continuous
        self.n_genes, self.n_regions = schema.n_genes, len(regions.features)
        self.n_batch = len(schema.batch_categories)
        self.n_labels = len(schema.categorical[schema.labels_key]) if schema.labels_key else 0
        if config.dispersion == "gene-label" and self.n_labels == 0:
            raise ValueError("dispersion='gene-label' needs a store built with a labels key")
        self.n_hidden = config.n_hidden or min(128, int(self.n_regions**0.5))
        self.n_latent = config.n_latent or int(self.n_hidden**0.5)
        n_categories = [self.n_batch] + [len(schema.categorical[k]) for k in self.categorical_keys]
        n_continuous = len(self.continuous_keys)
        encoder_categories = n_categories if config.encode_covariates else []
        extra_in = n_continuous if config.encode_covariates else 0
        encoder_norms = {
            "use_batch_norm": _norm(config.use_batch_norm, "encoder"),
            "use_layer_norm": _norm(config.use_layer_norm, "encoder"),
        }
        decoder_norms = {
            "use_batch_norm": _norm(config.use_batch_norm, "decoder"),
            "use_layer_norm": _norm(config.use_layer_norm, "decoder"),
        }
        layers, hidden, deep = config.n_layers_encoder, self.n_hidden, config.deeply_inject_covariates
        self.z_encoder_expression = Encoder(
            self.n_genes + extra_in, self.n_latent, encoder_categories, n_layers=layers, n_hidden=hidden,
            dropout_rate=config.dropout_rate, inject_covariates=deep, var_eps=0.0, activation=nn.LeakyReLU,
            **encoder_norms,
        )  # fmt: skip
        self.l_encoder_expression = LibrarySizeEncoder(
            self.n_genes + extra_in, encoder_categories, layers, hidden, inject_covariates=deep, **encoder_norms
        )
        self.z_decoder_expression = CountDecoder(
            self.n_latent + n_continuous, self.n_genes, n_categories, n_layers=config.n_layers_decoder, n_hidden=hidden,
            inject_covariates=deep, zero_inflation=config.gene_likelihood == "zinb", **decoder_norms,
        )  # fmt: skip
        # scvi-tools' accessibility encoder injects the covariates into every layer (Encoder's default)
        self.z_encoder_accessibility = Encoder(
            self.n_regions + extra_in, self.n_latent, encoder_categories, n_layers=layers, n_hidden=hidden,
            dropout_rate=config.dropout_rate, var_eps=0.0, activation=nn.LeakyReLU, **encoder_norms,
        )  # fmt: skip
        self.l_encoder_accessibility = ProbabilityDecoder(
            self.n_regions + extra_in, 1, encoder_categories, n_layers=layers, n_hidden=hidden,
            inject_covariates=deep, **encoder_norms,
        )  # fmt: skip
        self.z_decoder_accessibility = ProbabilityDecoder(
            self.n_latent + n_continuous, self.n_regions, n_categories, n_layers=config.n_layers_decoder,
            n_hidden=hidden, inject_covariates=deep, **decoder_norms,
        )  # fmt: skip
        self.region_factors = nn.Parameter(torch.zeros(self.n_regions)) if config.region_factors else None
        columns = {"gene": 0, "gene-batch": self.n_batch, "gene-label": self.n_labels}
        n = columns[config.dispersion]
        if config.gene_likelihood != "poisson":
            self.px_r = nn.Parameter(torch.randn((self.n_genes,) if n == 0 else (self.n_genes, n)))
        else:
            self.px_r = None
        if config.modality_weights == "equal":
            self.register_buffer("mod_weights", torch.ones(2))
        elif config.modality_weights == "universal":
            self.mod_weights = nn.Parameter(torch.ones(2))
        else:
            self.mod_weights = nn.Parameter(torch.ones(schema.n_cells, 2))
        adversarial = config.adversarial_classifier and self.n_batch > 1
        # built last, so that the other weights are those of a module without it
        self.adversary = BatchAdversary(self.n_latent, self.n_batch) if adversarial else None

    @classmethod
    def registry(cls, schema: StoreSchema, config: MULTIVIConfig) -> StoreSchema:
        """The store's registry; ValueError on a store without peaks and the RNA mask."""
        missing = [m for m in (ATAC, RNA) if m not in schema.modalities]
        if missing:
            raise ValueError(
                "MultiVI reads RNA and peak counts with the RNA mask: build the store with atac_key (atlasvi build "
                f"--atac-key); the store has no {missing[0]!r} modality"
            )
        return schema

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code per used key; the store must have the model's genes and peaks, in order (and,
        with "cell" modality weights, be the training store: as many cells)."""
        regions = store.modalities.get(ATAC)
        if regions is None or regions.features != self.region_names or RNA not in store.modalities:
            found = "none" if regions is None else f"{len(regions.features)}: {list(regions.features[:3])}..."
            raise IncompatibleStoreError(
                f"{where}: the model was trained on {self.n_regions} peaks {list(self.region_names[:3])}..., the "
                f"store has {found}; build it with the model's peak set (atac_key)"
            )
        if self.config.modality_weights == "cell" and store.n_cells != self.schema.n_cells:
            raise IncompatibleStoreError(
                f"{where}: a model with per-cell modality weights reads only its training store's "
                f"{self.schema.n_cells} cells (scvi-tools refuses held-out data with them too)"
            )
        return check_compatible(self.schema, store, self.used_keys, where)

    def surgery_spec(self) -> SurgerySpec:
        """What scArches surgery grows: the decoders' covariate-injected layers (and the encoders' with
        encode_covariates), gene-batch dispersion; the decoders' norms adapt to the query; the adversary starts
        afresh."""
        layers = ("z_decoder_expression.px_decoder", "z_decoder_accessibility.px_decoder")
        if self.config.encode_covariates:
            layers += (
                "z_encoder_expression.encoder",
                "l_encoder_expression.px_decoder",
                "z_encoder_accessibility.encoder",
                "l_encoder_accessibility.px_decoder",
            )
        grown = ("px_r",) if self.config.dispersion == "gene-batch" else ()
        fresh = ("adversary",) if self.adversary is not None else ()
        decoders = ("z_decoder_expression", "z_decoder_accessibility")
        return SurgerySpec(covariate_layers=layers, batch_tensors=grown, decoders=decoders, fresh=fresh)

    @property
    def used_keys(self) -> tuple[str, ...]:
        """The categorical obs keys whose codes the module reads (batch, covariates, labels if used)."""
        uses_labels = self.config.dispersion == "gene-label"
        return (self.batch_key, *self.categorical_keys, *((self.labels_key,) if uses_labels else ()))

    def unpack(self, batch: Minibatch) -> MULTIVIInputs:
        """The module's inputs from a loader minibatch (counts densified on the batch's device)."""
        continuous = (
            torch.stack([batch.continuous[k] for k in self.continuous_keys], dim=-1) if self.continuous_keys else None
        )
        return MULTIVIInputs(
            x=batch.counts(),
            atac=batch.obsm[ATAC].to_dense(),
            rna_mask=batch.masks[RNA].view(-1),
            atac_mask=batch.masks[ATAC].view(-1),
            batch_index=batch.categorical[self.batch_key],
            labels=batch.categorical.get(self.labels_key) if self.labels_key else None,
            categorical=tuple(batch.categorical[k] for k in self.categorical_keys),
            continuous=continuous,
            rows=batch.rows,
        )

    def _encoder_input(self, x: torch.Tensor, inputs: MULTIVIInputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if not self.config.encode_covariates:
            return x, ()
        if inputs.continuous is not None:
            x = torch.cat([x, inputs.continuous], dim=-1)
        return x, (inputs.batch_index, *inputs.categorical)

    def modality_weights(self, inputs: MULTIVIInputs) -> torch.Tensor:
        """(n, 2) weights of the RNA and ATAC posteriors per cell: the masked softmax of the modality weights
        (scvi-tools' masked_softmax, eps 1e-30), 0 for a modality the cell lacks."""
        n = len(inputs.batch_index)
        if self.config.modality_weights == "cell":
            weights = self.mod_weights[inputs.rows.long()]
        else:
            weights = self.mod_weights.unsqueeze(0).expand(n, -1)
        masks = torch.stack([inputs.rna_mask, inputs.atac_mask], dim=1)
        exps = torch.exp(weights).masked_fill(~masks, 1e-30)
        return exps / (exps.sum(dim=-1, keepdim=True) + 1e-30)

    def inference(self, inputs: MULTIVIInputs) -> dict:
        """The modality posteriors, their mixture and the size factors. Returns qz (the joint posterior), z (n,
        n_latent), library (n, 1) the RNA log-library, depth (n, 1) the ATAC depth factor, qz_expression,
        qz_accessibility (each modality's posterior)."""
        x_rna, codes = self._encoder_input(inputs.x, inputs)
        x_atac, _ = self._encoder_input(inputs.atac, inputs)
        qz_acc, _ = self.z_encoder_accessibility(x_atac, *codes)
        qz_expr, _ = self.z_encoder_expression(x_rna, *codes)
        library = self.l_encoder_expression(x_rna, *codes)
        depth = self.l_encoder_accessibility(x_atac, *codes)
        weights = self.modality_weights(inputs).unsqueeze(-1)  # (n, 2, 1)
        means = torch.stack([qz_expr.loc, qz_acc.loc], dim=1)
        variances = torch.stack([qz_expr.scale**2, qz_acc.scale**2], dim=1)
        mean = (weights * means).sum(1)
        variance = (weights.sqrt() * variances).sum(1)
        qz = Normal(mean, variance.sqrt(), validate_args=False)
        return {
            "qz": qz,
            "z": qz.rsample(),
            "library": library,
            "depth": depth,
            "qz_expression": qz_expr,
            "qz_accessibility": qz_acc,
        }

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, inputs: MULTIVIInputs, transform_batch: int | None = None
    ) -> dict:
        """p(x | z, library) and the accessibility. Returns px (the RNA count distribution), px_scale (n, n_genes),
        p (n, n_regions) the accessibility without depth and region factors (scvi-tools'
        get_normalized_accessibility default); transform_batch: decode every cell as if from that batch code."""
        batch_index = (
            inputs.batch_index if transform_batch is None else torch.full_like(inputs.batch_index, transform_batch)
        )
        decoder_input = z if inputs.continuous is None else torch.cat([z, inputs.continuous], -1)
        p = self.z_decoder_accessibility(decoder_input, batch_index, *inputs.categorical)
        scale, rate, _, zi_logits = self.z_decoder_expression(decoder_input, library, batch_index, *inputs.categorical)
        if self.px_r is None:
            px: Distribution = Poisson(rate, validate_args=False)
        else:
            theta = torch.exp(self._per(self.px_r, inputs))
            if self.config.gene_likelihood == "zinb":
                px = ZeroInflatedNegativeBinomial(rate, theta, zi_logits)
            else:
                px = NegativeBinomial(rate, theta)
        return {"px": px, "px_scale": scale, "p": p}

    def _per(self, parameter: torch.Tensor, inputs: MULTIVIInputs) -> torch.Tensor:
        if parameter.dim() == 1:
            return parameter
        codes = inputs.batch_index if self.config.dispersion == "gene-batch" else inputs.labels
        return F.linear(F.one_hot(codes.long().view(-1), parameter.shape[1]).float(), parameter)

    def accessibility_probabilities(self, p: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """(n, n_regions) Bernoulli probabilities of the likelihood: p x depth x sigmoid(region factors)."""
        probs = p * depth
        return probs * torch.sigmoid(self.region_factors) if self.region_factors is not None else probs

    def modality_penalty(self, inference: dict, inputs: MULTIVIInputs) -> torch.Tensor:
        """(n,) the penalty between the two modality posteriors of the cells with both (0 for the others)."""
        both = inputs.rna_mask & inputs.atac_mask
        qe, qa = inference["qz_expression"], inference["qz_accessibility"]
        if self.config.modality_penalty == "None":
            return torch.zeros_like(qe.loc[:, 0])
        if self.config.modality_penalty == "MMD":
            penalty = torch.linalg.norm(qe.loc - qa.loc, dim=1)
        else:  # scvi-tools' sym_kld(m1, sqrt(v1), m2, sqrt(v2)) builds Normal(m, sqrt(its argument)): scale var^(1/4)
            one = Normal(qe.loc, qe.scale.sqrt(), validate_args=False)
            two = Normal(qa.loc, qa.scale.sqrt(), validate_args=False)
            penalty = (kl_divergence(one, two) + kl_divergence(two, one)).sum(dim=-1)
        return torch.where(both, penalty, torch.zeros_like(penalty))

    def loss(self, inputs: MULTIVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """scvi-tools' MULTIVAE.loss (see the module docstring). Per-cell reconstruction (n,): the RNA term where
        RNA was measured + the ATAC BCE where ATAC was; kl_local: kl_z, kl_paired (the modality penalty), nats.
        extra_metrics: the two reconstruction terms, minibatch means (over all cells)."""
        inference = self.inference(inputs)
        generative = self.generative(inference["z"], inference["library"], inputs)
        rna, atac = inputs.rna_mask.to(inference["z"].dtype), inputs.atac_mask.to(inference["z"].dtype)
        reconstruction_rna = -generative["px"].log_prob(inputs.x).sum(dim=-1) * rna
        with torch.autocast(inputs.x.device.type, enabled=False):
            probs = self.accessibility_probabilities(generative["p"].float(), inference["depth"].float())
            bce = F.binary_cross_entropy(probs, (inputs.atac > 0).float(), reduction="none").sum(-1)
        reconstruction_atac = bce * atac
        kl_z = kl_divergence(inference["qz"], Normal(torch.zeros_like(inference["z"]), 1.0)).sum(dim=-1)
        penalty = self.modality_penalty(inference, inputs)
        reconstruction = reconstruction_rna + reconstruction_atac
        total = torch.mean(reconstruction + kl_weight * kl_z + penalty)
        extra = {
            "reconstruction_rna": reconstruction_rna.mean().detach(),
            "reconstruction_atac": reconstruction_atac.mean().detach(),
        }
        adversary_loss = None
        if self.adversary is not None:  # MULTIVI.train: scale_adversarial_loss 1
            fooling, adversary_loss = self.adversary.losses(inference["z"], inputs.batch_index, 1.0)
            total = total + fooling
            extra["adversary_loss"] = adversary_loss.detach()
        return LossOutput(total, reconstruction, {"kl_z": kl_z, "kl_paired": penalty}, extra, adversary_loss)

    def forward(self, inputs: MULTIVIInputs, kl_weight: float = 1.0) -> LossOutput:
        """The loss (DDP hooks its gradient reduction on forward)."""
        return self.loss(inputs, kl_weight)


def _norm(where: str, part: str) -> bool:
    """Whether a use_batch_norm / use_layer_norm setting ("encoder", "decoder", "both", "none") covers `part`."""
    return where in (part, "both")
