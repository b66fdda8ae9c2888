"""`SCANVI`: scANVI label transfer on an atlas store, as scvi-tools users know it.

`AtlasModel` (fit, latent, save / load, `load_query_data` for scArches) with normalized expression and DE
(`ExpressionExtras`, as scvi-tools' SCANVI has them), `predict` and `write_predictions` (`ClassifierExtras`),
plus `from_scvi_model`. The store's labels key gives the labels;
cells whose label is the config's `unlabeled_category` (`BuildConfig.unlabeled_category`, also given
to missing labels and to the cells of `BuildConfig.unlabeled_batches`) are unlabeled. A store with
label categories the model has not seen (or none at all: a query study) has those cells unlabeled.
"""

from pathlib import Path

from atlasvi.api.base import AtlasModel
from atlasvi.api.extras import ClassifierExtras, ExpressionExtras
from atlasvi.data import LoaderConfig
from atlasvi.data.store import AtlasStore, StoreSchema
from atlasvi.models.scanvi import SCANVIConfig, SCANVIModule
from atlasvi.train import EpochRecord, TrainConfig, pretrained_max_epochs

__all__ = ["SCANVI"]


class SCANVI(ClassifierExtras, ExpressionExtras):
    """scANVI trained on `store` (a path, URL or open AtlasStore). device: "auto", "cpu" or "cuda".

    The registry gets the unlabeled category among the labels (the module's `registry` hook).
    was_pretrained: initialised from a trained scVI (`from_scvi_model`); fit's default epochs are then
    scvi-tools' pretrained rule, min(10, max(2, round(default / 3))).
    """

    method = "SCANVI"
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
        super().__init__(store, config, device, registry, seed)
        self.was_pretrained = False

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: AtlasModel,
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
        model.init_from(scvi_model)
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
        if train.max_epochs is None and self.was_pretrained:  # all the store's cells, as scvi-tools here
            train = train.model_copy(update={"max_epochs": pretrained_max_epochs(self.store.n_cells)})
        return super().fit(train, loader, checkpoint_dir, on_epoch_end)
