"""`CondSCVI`: the conditional scVI of DestVI's reference (scvi-tools' CondSCVI) on a labelled atlas store.

`AtlasModel` (fit with scvi-tools' CondSCVI.train defaults: 300 epochs, lr 1e-3; latent, ELBO, save / load) plus
`get_vamp_prior`, the per-label prototypes of the reference's posteriors. A trained model keeps them in its module
(computed after `fit`, or at `save` where training ran elsewhere, e.g. in Ray workers), so a saved CondSCVI is all
that `DestVI.from_rna_model` and `atlasvi train --model destvi --init-from` need.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from atlasvi.api.base import AtlasModel, _stack
from atlasvi.data import LoaderConfig
from atlasvi.data.store import AtlasStore
from atlasvi.models.condscvi import CondSCVIConfig, CondSCVIModule, vamp_prior
from atlasvi.models.condscvi.module import ct_weight_of
from atlasvi.train import EpochRecord, TrainConfig

__all__ = ["CondSCVI"]


class CondSCVI(AtlasModel):
    """CondSCVI trained on `store` (its labels key gives the cell types). device: "auto", "cpu" or "cuda".

    weight_obs: weigh each cell by its label's inverse frequency (scvi-tools' weight_obs; sets config.ct_weight from
    the store's label counts). seed: the initial weights (and the prototypes' k-means) are drawn from it.
    """

    method = "CondSCVI"
    module: CondSCVIModule
    config: CondSCVIConfig

    def __init__(
        self,
        store: AtlasStore | str | Path,
        config: BaseModel | None = None,
        device: str = "auto",
        registry=None,
        seed: int = 0,
        weight_obs: bool = False,
    ):
        config = config or CondSCVIConfig()
        if weight_obs and config.ct_weight is None:
            from atlasvi.data import open_store

            opened = store if isinstance(store, AtlasStore) else open_store(store)
            store = opened
            labels_key = opened.schema.labels_key
            if labels_key is None:
                raise ValueError(f"{opened.path}: CondSCVI needs a store built with a labels key")
            codes, categories = opened.read_obs_categorical(labels_key)
            counts = np.bincount(codes, minlength=len(categories)).astype(float)
            config = config.model_copy(update={"ct_weight": ct_weight_of(counts)})
        super().__init__(store, config, device, registry, seed)
        self.seed = seed

    def fit(
        self,
        train: TrainConfig | None = None,
        loader: LoaderConfig | None = None,
        checkpoint_dir: Path | None = None,
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        """Train (see `AtlasModel.fit`), then keep the prototypes of the trained model (`get_vamp_prior`)."""
        history = super().fit(train, loader, checkpoint_dir, on_epoch_end)
        self._keep_vamp_prior()
        return history

    def get_vamp_prior(self, p: int | None = None, batch_size: int = 1024) -> dict[str, np.ndarray]:
        """scvi-tools' get_vamp_prior over the training store's cells: mean_vprior (n_labels, p, n_latent),
        var_vprior (same) and weights_vprior (n_labels, p). p: prototypes per label (default config.vamp_prior_p)."""
        p = p or self.config.vamp_prior_p
        means, variances, labels = [], [], []
        self.module.eval()
        with torch.no_grad(), self._own_rng(self.seed):
            for batch in self._batches(None, None, batch_size):
                inputs = self.module.unpack(batch.to(self.device))
                qz = self.module.inference(inputs)["qz"]
                means.append(qz.loc.float().cpu().numpy())
                variances.append(qz.variance.float().cpu().numpy())
                labels.append(inputs.labels.cpu().numpy())
        mean_v, var_v, mp_v = vamp_prior(
            _stack(((None, m) for m in means), self.n_latent), np.concatenate(variances), np.concatenate(labels),
            self.module.n_labels, p, self.seed,
        )  # fmt: skip
        return {"mean_vprior": mean_v, "var_vprior": var_v, "weights_vprior": mp_v}

    def _keep_vamp_prior(self) -> None:
        prior = self.get_vamp_prior()
        for name, key in (
            ("mean_vprior", "mean_vprior"),
            ("var_vprior", "var_vprior"),
            ("mp_vprior", "weights_vprior"),
        ):
            getattr(self.module, name).copy_(torch.as_tensor(prior[key], dtype=torch.float32))

    def save(self, directory: str | Path) -> Path:
        """Weights (with the prototypes: computed here where training ran outside `fit`) and model.json."""
        if not bool((self.module.mp_vprior.sum(-1) > 0).all()):
            self._keep_vamp_prior()
        return super().save(directory)
