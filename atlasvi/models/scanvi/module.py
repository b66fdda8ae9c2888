"""The scANVI module: scVI with labels y and a two-level latent (Xu et al. 2021; scvi-tools' SCANVAE).

Generative model: y ~ Cat(uniform) (fixed prior), z2 ~ N(0, I), z1 | z2, y ~ N(mu(z2, y), sigma^2(z2, y)),
x | z1, library ~ ZINB / NB / Poisson (the scVI decoder on z1). Inference: q(z1 | x) (the scVI encoder),
q(y | z1) (the classifier, logits), q(z2 | z1, y).

loss (per cell, then the minibatch mean), as scvi-tools 1.4.2's SCANVAE.loss: y is marginalised for
every cell, labelled or not, under q(y | z1):
  reconstruction = -log p(x | z1) + log q(z1 | x) - sum_y q(y | z1) log p(z1 | z2_y, y)
  kl = sum_y q(y | z1) KL(q(z2 | z1, y) || p(z2)) + KL(q(y | z1) || p(y)) [+ KL of the library]
  loss = mean(reconstruction + kl_weight * kl) + classification_ratio * CE(labelled cells)
The cross-entropy is that of the classifier at the posterior mean of z1 for the minibatch's labelled
cells (scvi-tools draws a separate minibatch of labelled cells; a streamed store has one minibatch).
"""

from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.distributions import Normal, kl_divergence

from atlasvi.data import Minibatch, StoreSchema
from atlasvi.models.contract import SurgerySpec
from atlasvi.models.loss import LossOutput
from atlasvi.models.saving import check_compatible
from atlasvi.models.vae import VAE, VAEConfig, VAEInputs, log_likelihood
from atlasvi.nn import Encoder, FCLayers


class SCANVIConfig(VAEConfig):
    """scANVI: the scVI family's architecture plus the classifier; defaults are scvi-tools'.

    unlabeled_category: the labels category of unlabeled cells (not a class); classification_ratio:
    weight of the labelled cells' cross-entropy; linear_classifier: one linear layer instead of an MLP.
    """

    name: Literal["scanvi"] = "scanvi"
    unlabeled_category: str = "Unknown"
    classification_ratio: float = Field(default=50.0, ge=0)
    linear_classifier: bool = False

    @model_validator(mode="after")
    def _no_label_dispersion(self) -> "SCANVIConfig":
        if self.dispersion == "gene-label":
            raise ValueError(
                "dispersion='gene-label' is not available for scANVI (labels are latent for unlabeled cells)"
            )
        return self


class SCANVIModule(VAE):
    """scANVI as a plain nn.Module, built from a store's schema (which must have a labels key).

    The classes are the labels categories other than `unlabeled_category`, in registry order;
    `inputs.labels` holds class indices, -1 for unlabeled cells. Started from a saved scVI (`--init-from`,
    `SCANVI.from_scvi_model`), it takes the family body's weights (`init_prefixes`); the classifier and the
    z2 levels start fresh.
    """

    config: SCANVIConfig
    init_prefixes: ClassVar[tuple[str, ...]] = ("z_encoder.", "l_encoder.", "decoder.", "px_r")

    def __init__(self, schema: StoreSchema, config: SCANVIConfig | None = None):
        config = config or SCANVIConfig()
        if schema.labels_key is None:
            raise ValueError("scANVI needs a store built with a labels key (BuildConfig.labels_key)")
        super().__init__(schema, config)
        categories = schema.categorical[schema.labels_key]
        self.label_names = tuple(c for c in categories if c != config.unlabeled_category)
        self.n_labels = len(self.label_names)
        if self.n_labels < 2:
            raise ValueError(f"obs[{schema.labels_key!r}] has {self.n_labels} labelled categories; scANVI needs >= 2")
        classes = {c: i for i, c in enumerate(self.label_names)}
        label_to_class = torch.tensor([classes.get(c, -1) for c in categories], dtype=torch.int64)
        self.register_buffer("label_to_class", label_to_class, persistent=False)

        def norm(where: str, part: str) -> bool:
            return where in (part, "both")

        bn_enc, ln_enc = norm(config.use_batch_norm, "encoder"), norm(config.use_layer_norm, "encoder")
        bn_dec, ln_dec = norm(config.use_batch_norm, "decoder"), norm(config.use_layer_norm, "decoder")
        if config.linear_classifier:
            self.classifier: nn.Module = nn.Linear(config.n_latent, self.n_labels)
        else:
            hidden = FCLayers(
                config.n_latent, config.n_hidden, (), config.n_layers, config.n_hidden, config.dropout_rate,
                bn_enc, ln_enc,
            )  # fmt: skip
            self.classifier = nn.Sequential(hidden, nn.Linear(config.n_hidden, self.n_labels))
        layers = {"n_layers": config.n_layers, "n_hidden": config.n_hidden}
        self.encoder_z2_z1 = Encoder(
            config.n_latent, config.n_latent, [self.n_labels], dropout_rate=config.dropout_rate,
            use_batch_norm=bn_enc, use_layer_norm=ln_enc, **layers,
        )  # fmt: skip
        # scvi-tools' Decoder: no dropout, variance exp(.) without an epsilon
        self.decoder_z1_z2 = Encoder(
            config.n_latent, config.n_latent, [self.n_labels], dropout_rate=0.0, use_batch_norm=bn_dec,
            use_layer_norm=ln_dec, var_eps=0.0, **layers,
        )  # fmt: skip
        self.register_buffer("y_prior", torch.full((1, self.n_labels), 1.0 / self.n_labels))

    @classmethod
    def registry(cls, schema: StoreSchema, config: SCANVIConfig) -> StoreSchema:
        """The registry with the unlabeled category among the labels categories (appended when absent)."""
        if schema.labels_key is None:
            raise ValueError("scANVI needs a store built with a labels key (BuildConfig.labels_key)")
        labels = schema.categorical[schema.labels_key]
        if config.unlabeled_category in labels:
            return schema
        categorical = schema.categorical | {schema.labels_key: (*labels, config.unlabeled_category)}
        return replace(schema, categorical=categorical)

    def code_maps(self, store: StoreSchema, where: str) -> dict[str, torch.Tensor]:
        """Store code -> model code; a labels category the model has not seen maps to unlabeled, and a store
        without the labels key (a query study) has every cell unlabeled."""
        labels_key = self.labels_key
        maps = check_compatible(self.schema, store, tuple(k for k in self.used_keys if k != labels_key), where)
        if labels_key in store.categorical:
            known = {c: i for i, c in enumerate(self.schema.categorical[labels_key])}
            unlabeled = known[self.config.unlabeled_category]
            categories = store.categorical[labels_key]
            maps[labels_key] = torch.tensor([known.get(c, unlabeled) for c in categories], dtype=torch.int64)
        return maps

    def surgery_spec(self) -> SurgerySpec:
        """The family's, with the z1 | z2, y level among the decoders (scvi-tools': "decoder" in its name)."""
        spec = super().surgery_spec()
        return replace(spec, decoders=(*spec.decoders, "decoder_z1_z2"))

    @property
    def used_keys(self) -> tuple[str, ...]:
        """The categorical obs keys whose codes the module reads (batch, covariates, labels)."""
        return (self.batch_key, *self.categorical_keys, self.labels_key)

    def unpack(self, batch: Minibatch) -> VAEInputs:
        """The module's inputs; labels are class indices, -1 for unlabeled cells (all of them when the
        minibatch has no labels, e.g. a query store built without a labels key)."""
        codes = batch.categorical.get(self.labels_key)
        if codes is None:
            labels = torch.full_like(batch.categorical[self.batch_key], -1, dtype=torch.int64)
            batch = replace(batch, categorical=batch.categorical | {self.labels_key: labels})
        else:
            labels = self.label_to_class[codes.long()]
        return replace(super().unpack(batch), labels=labels)

    def classify(self, inputs: VAEInputs, use_posterior_mean: bool = True) -> torch.Tensor:
        """(n, n_labels) logits of q(y | z1) at the posterior mean of z1 (or a draw)."""
        inference = self.inference(inputs)
        z1 = inference["qz"].loc if use_posterior_mean else inference["z"]
        return self.classifier(z1)

    def loss(self, inputs: VAEInputs, kl_weight: float = 1.0) -> LossOutput:
        """Minibatch loss; per-cell reconstruction (n,) and KL terms (n,) in nats (see the module docstring).

        extra_metrics: classification_loss (mean cross-entropy of the labelled cells; 0 without any) and
        n_labelled (their number).
        """
        inference = self.inference(inputs)
        qz1, z1 = inference["qz"], inference["z"]
        generative = self.generative(z1, inference["library"], inputs)
        n, k = z1.shape[0], self.n_labels
        # every cell once per class, class-major (rows c*n .. (c+1)*n - 1 have y = c), as scvi-tools
        ys = torch.arange(k, device=z1.device).repeat_interleave(n)
        z1s = z1.repeat(k, 1)
        qz2, z2 = self.encoder_z2_z1(z1s, ys)
        pz1, _ = self.decoder_z1_z2(z2, ys)
        kl_z2 = kl_divergence(qz2, Normal(torch.zeros_like(z2), torch.ones_like(z2))).sum(-1).view(k, n).t()
        log_pz1 = pz1.log_prob(z1s).sum(-1).view(k, n).t()
        logits = self.classifier(z1)
        probs = F.softmax(logits, dim=-1)
        kl_y = (probs * (F.log_softmax(logits, dim=-1) - torch.log(self.y_prior))).sum(-1)
        reconstruction = (
            -log_likelihood(generative["px"], inputs) + qz1.log_prob(z1).sum(-1) - (probs * log_pz1).sum(-1)
        )
        kl_local = {"kl_z2": (probs * kl_z2).sum(-1), "kl_y": kl_y}
        if inference["ql"] is not None:
            kl_local["kl_library"] = kl_divergence(inference["ql"], generative["pl"]).sum(-1)
        loss = torch.mean(reconstruction + kl_weight * sum(kl_local.values()))
        labelled = inputs.labels >= 0
        n_labelled = labelled.sum()
        if bool(n_labelled > 0):
            ce = F.cross_entropy(self.classifier(qz1.loc[labelled]), inputs.labels[labelled])
        else:
            ce = torch.zeros((), device=z1.device)
        loss = loss + self.config.classification_ratio * ce
        metrics = {"classification_loss": ce.detach(), "n_labelled": n_labelled.detach().float()}
        return LossOutput(loss, reconstruction, kl_local, metrics)
