"""`SCANVI`: scANVI label transfer on an atlas store, as scvi-tools users know it.

`AtlasModel` (fit, latent, save / load, `load_query_data` for scArches) with normalized expression and DE
(`ExpressionExtras`, as scvi-tools' SCANVI has them), `predict` and `write_predictions` (`ClassifierExtras`),
plus `from_scvi_model`. The store's labels key gives the labels;
cells whose label is the config's `unlabeled_category` (`BuildConfig.unlabeled_category`, also given
to missing labels and to the cells of `BuildConfig.unlabeled_batches`) are unlabeled. A store with
label categories the model has not seen (or none at all: a query study) has those cells unlabeled.
"""

from dataclasses import replace
from pathlib import Path

import torch

from atlasvi.api.extras import ClassifierExtras, ExpressionExtras
from atlasvi.api.scvi import SCVI
from atlasvi.data import LoaderConfig, open_store
from atlasvi.data.store import AtlasStore, StoreSchema
from atlasvi.models.saving import check_compatible
from atlasvi.models.scanvi import SCANVIConfig, SCANVIModule
from atlasvi.train import EpochRecord, TrainConfig, default_max_epochs

__all__ = ["SCANVI"]

SCVI_SHARED = ("z_encoder.", "l_encoder.", "decoder.", "px_r")  # weights a scANVI takes from its scVI


def _with_unlabeled(schema: StoreSchema, unlabeled_category: str) -> StoreSchema:
    """The registry with the unlabeled category among the labels categories (appended when absent)."""
    if schema.labels_key is None:
        raise ValueError("scANVI needs a store built with a labels key (BuildConfig.labels_key)")
    labels = schema.categorical[schema.labels_key]
    if unlabeled_category in labels:
        return schema
    return replace(schema, categorical=schema.categorical | {schema.labels_key: (*labels, unlabeled_category)})


class SCANVI(ClassifierExtras, ExpressionExtras):
    """scANVI trained on `store` (a path, URL or open AtlasStore). device: "auto", "cpu" or "cuda".

    was_pretrained: initialised from a trained scVI (`from_scvi_model`); fit's default epochs are then
    scvi-tools' pretrained rule, min(10, max(2, round(default / 3))).
    """

    method = "SCANVI"
    _module_cls = SCANVIModule
    _config_cls = SCANVIConfig
    module: SCANVIModule
    config: SCANVIConfig

    def __init__(
        self,
        store: AtlasStore | str | Path,
        config: SCANVIConfig | None = None,
        device: str = "auto",
        registry: StoreSchema | None = None,
        seed: int = 0,
    ):
        config = config or SCANVIConfig()
        opened = store if isinstance(store, AtlasStore) else open_store(store)
        registry = _with_unlabeled(registry or opened.schema, config.unlabeled_category)
        super().__init__(opened, config, device, registry, seed)
        self.was_pretrained = False

    def _code_maps(self, opened: AtlasStore) -> dict[str, torch.Tensor]:
        """Store code -> model code; a labels category the model has not seen maps to unlabeled."""
        labels_key = self.schema.labels_key
        others = tuple(k for k in self.module.used_keys if k != labels_key)
        code_maps = check_compatible(self.schema, opened.schema, others, str(opened.path))
        if labels_key in opened.schema.categorical:
            known = {c: i for i, c in enumerate(self.schema.categorical[labels_key])}
            unlabeled = known[self.config.unlabeled_category]
            categories = opened.schema.categorical[labels_key]
            code_maps[labels_key] = torch.tensor([known.get(c, unlabeled) for c in categories], dtype=torch.int64)
        return code_maps

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        unlabeled_category: str = "Unknown",
        classification_ratio: float = 50.0,
        linear_classifier: bool = False,
        device: str | None = None,
        seed: int = 0,
    ) -> "SCANVI":
        """scANVI on the scVI model's store and registry, with its architecture and trained weights (the
        classifier and the z2 levels start fresh, drawn from `seed`), as scvi-tools' SCANVI.from_scvi_model."""
        config = SCANVIConfig(
            **scvi_model.config.model_dump(exclude={"name"}), unlabeled_category=unlabeled_category,
            classification_ratio=classification_ratio, linear_classifier=linear_classifier,
        )  # fmt: skip
        model = cls(scvi_model.store, config, device or scvi_model.device.type, registry=scvi_model.schema, seed=seed)
        model.init_from(scvi_model, SCVI_SHARED)
        model.was_pretrained = True
        return model

    def fit(
        self,
        train: TrainConfig | None = None,
        loader: LoaderConfig | None = None,
        checkpoint_dir: Path | None = None,
        on_epoch_end=None,
    ) -> list[EpochRecord]:
        """As SCVI.fit; the epoch records' extra_metrics hold the labelled cells' classification loss."""
        train = train or TrainConfig()
        if train.max_epochs is None and self.was_pretrained:
            default = default_max_epochs(self.store.n_cells)  # all the store's cells, as scvi-tools here
            train = train.model_copy(update={"max_epochs": int(min(10, max(2, round(default / 3.0))))})
        return super().fit(train, loader, checkpoint_dir, on_epoch_end)
