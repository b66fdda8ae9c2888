"""The scVI family's shared body (Lopez et al. 2018; scvi-tools' VAE): scVI's and scANVI's modules are built on it.

inference: log1p(counts) -> q(z | x) (covariates enter the encoder only with `encode_covariates`);
  library = log total counts (observed) or a latent log-normal with the store's per-batch prior.
generative: px_scale = softmax(decoder(z, batch, covariates)); mean = exp(library) * px_scale;
  dispersion per gene, gene-batch, gene-label or gene-cell (the decoder is the `count_decoder` hook: an MLP here).
loss: the unsupervised ELBO (scVI's and LDVAE's); scANVI overrides it.
No parameter is built that the configuration does not use, so DDP needs no find_unused_parameters.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence

from atlasvi.data import Minibatch, SparseCounts, StoreSchema
from atlasvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import check_compatible
from atlasvi.nn import CountDecoder, Encoder


class VAEConfig(BaseModel):
    """The scVI-family architecture; the defaults are scvi-tools' (n_latent 10, n_hidden 128, n_layers 1, ZINB).

    A method's config adds its `name` (the registry tag) and its own fields.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_latent: int = Field(default=10, gt=0)
    n_hidden: int = Field(default=128, gt=0)
    n_layers: int = Field(default=1, gt=0)
    dropout_rate: float = Field(default=0.1, ge=0, lt=1)
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene"
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb"
    log_variational: bool = True
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both"
    use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none"
    use_observed_lib_size: bool = True


@dataclass(frozen=True)
class VAEInputs:
    """A minibatch as the module reads it.

    x: (n, n_genes) counts, dense or `SparseCounts` (CSR, as a loader's minibatch holds them: the encoder's first
    layer and the NB / ZINB likelihood read them sparse); batch_index: (n,) codes; labels: (n,) codes or None;
    categorical: one (n,) code tensor per extra covariate; continuous: (n, n_continuous) or None.
    """

    x: torch.Tensor | SparseCounts
    batch_index: torch.Tensor
    labels: torch.Tensor | None
    categorical: tuple[torch.Tensor, ...]
    continuous: torch.Tensor | None

    @classmethod
    def of(
        cls,
        batch: Minibatch,
        batch_key: str,
        categorical_keys: tuple[str, ...],
        continuous_keys: tuple[str, ...],
        labels: torch.Tensor | None = None,
        sparse: bool = False,
    ) -> "VAEInputs":
        """A loader minibatch's inputs: counts densified on the batch's device (`SparseCounts` with `sparse`), the
        codes of `batch_key` and of each of `categorical_keys`, the `continuous_keys` columns stacked
        (n, n_continuous) (None without any)."""
        continuous = torch.stack([batch.continuous[k] for k in continuous_keys], dim=-1) if continuous_keys else None
        return cls(
            x=batch.sparse_counts() if sparse else batch.counts(),
            batch_index=batch.categorical[batch_key],
            labels=labels,
            categorical=tuple(batch.categorical[k] for k in categorical_keys),
            continuous=continuous,
        )

    @cached_property
    def dense_x(self) -> torch.Tensor:
        """(n, n_genes) dense counts (x itself when dense; densified once on first use when sparse)."""
        return self.x.to_dense() if isinstance(self.x, SparseCounts) else self.x

    def encoder_input(
        self, x: torch.Tensor | SparseCounts, encode_covariates: bool
    ) -> tuple[torch.Tensor | SparseCounts, tuple[torch.Tensor, ...]]:
        """(encoder input, its covariate codes): with encode_covariates, x (n, n_features) with the continuous
        covariates appended (n, n_features + n_continuous; densified if sparse) and the batch and categorical codes;
        else x and none."""
        if not encode_covariates:
            return x, ()
        if self.continuous is not None:
            x = torch.cat([x.to_dense() if isinstance(x, SparseCounts) else x, self.continuous], dim=-1)
        return x, (self.batch_index, *self.categorical)


class VAE(nn.Module):
    """The scVI-family body as a plain nn.Module, built from a store's schema (genes, covariates, library prior):
    the z and library encoders, the count decoder and the dispersion, and the unsupervised ELBO as `loss` (a method
    with another objective overrides it).

    The model contract's hooks (`atlasvi.models.contract.ModuleContract`) have the scVI family's defaults here.
    """

    init_prefixes: tuple[str, ...] = ()
    used_modalities: tuple[str, ...] = ()  # RNA counts only

    def __init__(self, schema: StoreSchema, config: VAEConfig):
        super().__init__()
        self.config = config
        self.schema = schema
        self.batch_key, self.labels_key = schema.batch_key, schema.labels_key
        self.categorical_keys = tuple(k for k in schema.categorical if k not in (schema.batch_key, schema.labels_key))
        self.continuous_keys = schema.continuous
        self.n_genes = schema.n_genes
        self.n_batch = len(schema.batch_categories)
        self.n_labels = len(schema.categorical[schema.labels_key]) if schema.labels_key else 0
        if config.dispersion == "gene-label" and self.n_labels == 0:
            raise ValueError("dispersion='gene-label' needs a store built with a labels key")
        n_categories = [self.n_batch] + [len(schema.categorical[k]) for k in self.categorical_keys]
        n_continuous = len(self.continuous_keys)

        encoder_categories = n_categories if config.encode_covariates else []
        n_encoder_in = self.n_genes + (n_continuous if config.encode_covariates else 0)
        encoder_options = {
            "n_layers": config.n_layers,
            "n_hidden": config.n_hidden,
            "dropout_rate": config.dropout_rate,
            "use_batch_norm": _norm(config.use_batch_norm, "encoder"),
            "use_layer_norm": _norm(config.use_layer_norm, "encoder"),
            "inject_covariates": config.deeply_inject_covariates,
            "sparse_input": True,  # `inference` gives the encoders the CSR counts
        }
        self.z_encoder = Encoder(n_encoder_in, config.n_latent, encoder_categories, **encoder_options)
        if config.use_observed_lib_size:
            self.l_encoder = None
        else:
            self.l_encoder = Encoder(n_encoder_in, 1, encoder_categories, **(encoder_options | {"n_layers": 1}))
            self.register_buffer("library_log_means", torch.tensor(schema.library_log_means).view(1, -1))
            self.register_buffer("library_log_vars", torch.tensor(schema.library_log_vars).view(1, -1))
        uses_dispersion = config.gene_likelihood != "poisson"
        self.decoder = self.count_decoder(config.n_latent + n_continuous, n_categories)
        columns = {"gene": 0, "gene-batch": self.n_batch, "gene-label": self.n_labels, "gene-cell": None}
        n_columns = columns[config.dispersion]
        if uses_dispersion and n_columns is not None:
            shape = (self.n_genes,) if n_columns == 0 else (self.n_genes, n_columns)
            self.px_r = nn.Parameter(torch.randn(shape))
        else:
            self.px_r = None

    def count_decoder(self, n_in: int, n_categories: list[int]) -> nn.Module:
        """p(x | z, library): (n, n_in) and covariate codes -> (scale, rate, log dispersion per cell or None,
        zero-inflation logits or None); the family's MLP `CountDecoder` (a method may decode otherwise)."""
        config = self.config
        return CountDecoder(
            n_in,
            self.n_genes,
            n_categories,
            n_layers=config.n_layers,
            n_hidden=config.n_hidden,
            use_batch_norm=_norm(config.use_batch_norm, "decoder"),
            use_layer_norm=_norm(config.use_layer_norm, "decoder"),
            inject_covariates=config.deeply_inject_covariates,
            zero_inflation=config.gene_likelihood == "zinb",
            cell_dispersion=config.gene_likelihood != "poisson" and config.dispersion == "gene-cell",
        )

    @classmethod
    def registry(cls, schema: StoreSchema, config: VAEConfig) -> StoreSchema:
        """The registry the module is built on from a store's (or a saved model's) registry: the same one."""
        return schema

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code, (n_store_categories,) int64, for each key in `used_keys`; a store the model
        cannot read (other genes, a missing key, an unseen category) raises IncompatibleStoreError naming it."""
        return check_compatible(self.schema, store, self.used_keys, where)

    def surgery_spec(self) -> SurgerySpec:
        """What scArches surgery grows and freezes: the covariate-injected layers, gene-batch dispersion, and the
        decoder (whose batch norms adapt to the query as scvi-tools')."""
        layers = ("decoder.px_decoder",)
        if self.config.encode_covariates:
            layers += ("z_encoder.encoder",) + (("l_encoder.encoder",) if self.l_encoder is not None else ())
        grown = ("px_r",) if self.config.dispersion == "gene-batch" else ()
        return SurgerySpec(covariate_layers=layers, batch_tensors=grown, decoders=("decoder",))

    @property
    def used_keys(self) -> tuple[str, ...]:
        """The categorical obs keys whose codes the module reads (batch, covariates, labels if used)."""
        uses_labels = self.config.dispersion == "gene-label"
        return (self.batch_key, *self.categorical_keys, *((self.labels_key,) if uses_labels else ()))

    def unpack(self, batch: Minibatch) -> VAEInputs:
        """The module's inputs from a loader minibatch (counts kept sparse, on the batch's device)."""
        labels = batch.categorical.get(self.labels_key) if self.labels_key else None  # unused unless gene-label
        return VAEInputs.of(batch, self.batch_key, self.categorical_keys, self.continuous_keys, labels, sparse=True)

    def inference(self, inputs: VAEInputs) -> dict:
        """q(z | x) and the library. Returns qz, z (n, n_latent), ql (or None), library (n, 1) log counts."""
        if isinstance(inputs.x, SparseCounts):  # log1p(0) = 0: the first layer reads the non-zeros alone
            counts = inputs.x.with_values(torch.log1p(inputs.x.values)) if self.config.log_variational else inputs.x
            totals = inputs.x.row_sums().unsqueeze(1)
        else:
            counts = torch.log1p(inputs.x) if self.config.log_variational else inputs.x
            totals = inputs.x.sum(dim=1, keepdim=True)
        x, codes = inputs.encoder_input(counts, self.config.encode_covariates)
        qz, z = self.z_encoder(x, *codes)
        if self.l_encoder is None:
            ql, library = None, torch.log(totals)
        else:
            ql, library = self.l_encoder(x, *codes)
        return {"qz": qz, "z": z, "ql": ql, "library": library}

    def generative(self, z: torch.Tensor, library: torch.Tensor, inputs: VAEInputs) -> dict:
        """p(x | z, library), p(z) and p(library). Returns px (a count distribution), px_scale, pz, pl."""
        decoder_input = z if inputs.continuous is None else torch.cat([z, inputs.continuous], -1)
        scale, rate, cell_dispersion, zi_logits = self.decoder(
            decoder_input, library, inputs.batch_index, *inputs.categorical
        )
        if self.config.gene_likelihood == "poisson":
            px: Distribution = Poisson(rate, validate_args=False)
        else:
            theta = torch.exp(self._log_dispersion(cell_dispersion, inputs))
            if self.config.gene_likelihood == "zinb":
                px = ZeroInflatedNegativeBinomial(rate, theta, zi_logits)
            else:
                px = NegativeBinomial(rate, theta)
        pz = Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False)  # 0 and 1: nothing to check
        pl = None
        if self.l_encoder is not None:
            one_hot = F.one_hot(inputs.batch_index.long().view(-1), self.n_batch).float()
            means = one_hot @ self.library_log_means.T
            variances = one_hot @ self.library_log_vars.T
            pl = Normal(means, variances.sqrt())
        return {"px": px, "px_scale": scale, "pz": pz, "pl": pl}

    def _log_dispersion(self, cell_dispersion: torch.Tensor | None, inputs: VAEInputs) -> torch.Tensor:
        if self.config.dispersion == "gene-cell":
            return cell_dispersion
        if self.config.dispersion == "gene":
            return self.px_r
        codes = inputs.batch_index if self.config.dispersion == "gene-batch" else inputs.labels
        return F.linear(F.one_hot(codes.long().view(-1), self.px_r.shape[1]).float(), self.px_r)

    def loss(self, inputs: VAEInputs, kl_weight: float = 1.0) -> LossOutput:
        """The family's unsupervised ELBO (scVI's, LDVAE's; a method with another objective overrides it):
        mean over cells of -log p(x | z, library) + kl_weight * KL(q(z) || p(z)) + KL(q(l) || p(l)).
        Per-cell reconstruction (n,) and KL terms (n,) in nats."""
        inference = self.inference(inputs)
        generative = self.generative(inference["z"], inference["library"], inputs)
        reconstruction = -log_likelihood(generative["px"], inputs)
        kl_z = kl_standard_normal(inference["qz"]).sum(dim=-1)  # generative["pz"] is N(0, I)
        kl_local = {"kl_z": kl_z}
        weighted = kl_weight * kl_z
        if inference["ql"] is not None:
            kl_l = kl_divergence(inference["ql"], generative["pl"]).sum(dim=-1)
            kl_local["kl_library"] = kl_l
            weighted = weighted + kl_l
        return LossOutput(torch.mean(reconstruction + weighted), reconstruction, kl_local)

    def forward(self, inputs: VAEInputs, kl_weight: float = 1.0) -> LossOutput:
        """The method's loss (DDP hooks its gradient reduction on forward)."""
        return self.loss(inputs, kl_weight)


def log_likelihood(px: Distribution, inputs: VAEInputs) -> torch.Tensor:
    """(n,) log p(x | ...) summed over genes: NB / ZINB from sparse counts by the fused `log_prob_rows`, any other
    likelihood (or dense counts) by its log_prob."""
    if isinstance(inputs.x, SparseCounts) and isinstance(px, NegativeBinomial):
        return px.log_prob_rows(inputs.x)
    return px.log_prob(inputs.dense_x).sum(dim=-1)


def kl_standard_normal(q: Normal) -> torch.Tensor:
    """KL(q || N(0, 1)) elementwise: torch's kl_divergence(q, Normal(0, 1)) op for op, less its divisions by 1 and
    subtraction of 0 (exact, in values and gradients: the same bits), so no prior tensors are built or checked."""
    var_ratio = q.scale.pow(2)
    return 0.5 * (var_ratio + q.loc.pow(2) - 1 - var_ratio.log())


def _norm(where: str, part: str) -> bool:
    """Whether a use_batch_norm / use_layer_norm setting ("encoder", "decoder", "both", "none") covers `part`."""
    return where in (part, "both")
