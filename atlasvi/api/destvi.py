"""`DestVI`: deconvolution of a spatial atlas store with a trained `CondSCVI` (scvi-tools' DestVI).

`DestVI.from_rna_model(spots_store, condscvi)` (or `atlasvi train --model destvi --init-from CONDSCVI_MODEL`) builds
the spatial model on the CondSCVI's decoder and prototypes; `fit` trains with scvi-tools' DestVI.train defaults
(2000 epochs, lr 3e-3, KL warm-up 200 epochs). Read-outs in scvi-tools' names: `get_proportions` (spots x cell
types), `get_gamma` (per-type latent states), `get_scale_for_ct` (a type's expression fractions in each spot).
`write_results` puts the proportions into the store's obsm["proportions"] (the type names in the array's
attrs["columns"]); `write_scale_for_ct` a type's expression into a layer, on request; `figures` draws the
proportions on the spots' coordinates (obsm["spatial"]).
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atlasvi.analysis.plots import proportions_png
from atlasvi.api.base import AtlasModel, _write
from atlasvi.api.condscvi import CondSCVI
from atlasvi.data.store import AtlasStore, open_store, read_obs_names, read_spatial
from atlasvi.models.destvi import DestVIConfig, DestVIModule
from atlasvi.models.saving import load_init_state

__all__ = ["DestVI"]

PROPORTIONS_KEY = "proportions"
LATENT_KEY = "X_destvi"  # the amortization latent (n_latent_amortization), beside the proportions


class DestVI(AtlasModel):
    """DestVI's spatial model on a spots `store` (built with `from_rna_model`, or loaded)."""

    method = "DestVI"
    module: DestVIModule
    config: DestVIConfig

    @classmethod
    def from_rna_model(
        cls,
        store: AtlasStore | str | Path,
        sc_model: CondSCVI,
        device: str = "auto",
        seed: int = 0,
        **config: Any,
    ) -> "DestVI":
        """The spatial model of the spots `store` (the CondSCVI's genes, in its order) started from the trained
        `sc_model`: its decoder (frozen), dispersion and prototypes; `config`: other DestVIConfig fields (e.g.
        amortization)."""
        opened = store if isinstance(store, AtlasStore) else open_store(store)
        architecture = {k: getattr(sc_model.config, k) for k in ("n_latent", "n_hidden", "n_layers", "dropout_rate")}
        fields = architecture | {"vamp_prior_p": sc_model.config.vamp_prior_p} | config
        registry = DestVIModule.init_registry(sc_model.schema, opened.schema)
        model = cls(opened, DestVIConfig(**fields), device, registry=registry, seed=seed)
        if not bool((sc_model.module.mp_vprior.sum(-1) > 0).all()):
            sc_model._keep_vamp_prior()
        load_init_state(model.module, sc_model.module.state_dict(), f"a {sc_model.method} model")
        return model

    @property
    def cell_types(self) -> tuple[str, ...]:
        return self.module.cell_types

    @property
    def has_latent(self) -> bool:
        """Whether the spots have a latent: only with n_latent_amortization (as scvi-tools' DestVI)."""
        return self.config.n_latent_amortization is not None

    @property
    def latent_key(self) -> str:
        """X_destvi: the registry's key ("proportions") is where `atlasvi train` writes the proportions."""
        return LATENT_KEY

    @property
    def n_latent(self) -> int:
        """The width of the amortization latent (n_latent_amortization; 0 without one)."""
        return self.config.n_latent_amortization or 0

    def get_latent_representation(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """The spots' amortization latent (n_spots, n_latent_amortization), posterior means or a draw (see
        `AtlasModel.get_latent_representation`); ValueError without n_latent_amortization (as scvi-tools)."""
        if not self.has_latent:
            raise ValueError("this DestVI has no latent (n_latent_amortization None); see get_proportions, get_gamma")
        return super().get_latent_representation(*args, **kwargs)

    def _inputs(self, store, rows, batch_size) -> Iterator[tuple[np.ndarray, Any]]:
        self.module.eval()
        for batch in self._batches(store, rows, batch_size):
            yield batch.rows.numpy(), self.module.unpack(batch.to(self.device))

    def _index(self, store, rows) -> pd.Index:
        path = self._store_path(store)
        start, stop = rows if rows is not None else (0, None)
        return pd.Index(read_obs_names(path, start, stop))

    def _proportion_parts(
        self, store, rows, batch_size: int, keep_additional: bool = False, normalize: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n_extra = self.config.add_celltypes
        with torch.no_grad(), self._own_rng():
            for spots, inputs in self._inputs(store, rows, batch_size):
                values = self.module.proportions(inputs)
                if not keep_additional:
                    values = values[:, :-n_extra]
                if normalize:
                    values = values / values.sum(dim=1, keepdim=True)
                yield spots, values.float().cpu().numpy()

    def get_proportions(
        self,
        keep_additional: bool = False,
        normalize: bool = True,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        batch_size: int = 1024,
    ) -> pd.DataFrame:
        """(n_spots, n_labels) cell-type proportions (with keep_additional, the dummy types' columns too,
        additional_0, ...), rows summing to 1 with normalize; index the spots' names, columns the cell types."""
        columns = list(self.cell_types) + (
            [f"additional_{i}" for i in range(self.config.add_celltypes)] if keep_additional else []
        )
        parts = [v for _, v in self._proportion_parts(store, rows, batch_size, keep_additional, normalize)]
        values = np.concatenate(parts) if parts else np.zeros((0, len(columns)), np.float32)
        return pd.DataFrame(values, index=self._index(store, rows), columns=columns)

    def get_gamma(
        self,
        return_numpy: bool = False,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        batch_size: int = 1024,
    ) -> np.ndarray | dict[str, pd.DataFrame]:
        """The per-type latent states of the spots: (n_spots, n_latent, n_labels) with return_numpy, else one
        (n_spots, n_latent) DataFrame per cell type (scvi-tools' get_gamma)."""
        with torch.no_grad(), self._own_rng():
            parts = [
                self.module.gamma_of(inputs).float().cpu().numpy()
                for _, inputs in self._inputs(store, rows, batch_size)
            ]
        data = np.concatenate(parts)
        if return_numpy:
            return data
        index, columns = self._index(store, rows), [str(i) for i in range(self.config.n_latent)]
        return {ct: pd.DataFrame(data[:, :, i], index=index, columns=columns) for i, ct in enumerate(self.cell_types)}

    def _label(self, label: str) -> int:
        extended = list(self.cell_types) + [f"additional_{i}" for i in range(self.config.add_celltypes)]
        if label not in extended:
            raise ValueError(f"unknown cell type {label!r}; the model's are {extended}")
        return extended.index(label)

    def _scale_parts(self, label: str, store, rows, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        code = self._label(label)
        with torch.no_grad(), self._own_rng():
            for spots, inputs in self._inputs(store, rows, batch_size):
                yield spots, self.module.scale_for_ct(inputs, code).float().cpu().numpy()

    def get_scale_for_ct(
        self,
        label: str,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        batch_size: int = 1024,
    ) -> pd.DataFrame:
        """(n_spots, n_genes) expression fractions of cell type `label` in each spot (scvi-tools' get_scale_for_ct)."""
        values = np.concatenate([v for _, v in self._scale_parts(label, store, rows, batch_size)])
        return pd.DataFrame(values, index=self._index(store, rows), columns=list(self.schema.gene_names))

    def write_scale_for_ct(
        self, label: str, layer: str | None = None, batch_size: int = 1024, attrs: dict[str, Any] | None = None
    ) -> Path:
        """Write `label`'s expression fractions into layers[layer] (default destvi_scale_LABEL) of the training
        store, chunk by chunk; returns the array's path."""
        layer = layer or f"destvi_scale_{label}".replace("/", "_")
        parts = self._scale_parts(label, None, None, batch_size)
        return _write(
            parts, self._store_path(None), "layers", layer, self.module.n_genes, {"cell_type": label} | (attrs or {})
        )

    def write_proportions(self, key: str = PROPORTIONS_KEY, attrs: dict[str, Any] | None = None) -> Path:
        """Write the proportions (n_spots, n_labels) into obsm[key] of the training store, the cell types in the
        array's attrs["columns"]; returns the array's path."""
        parts = self._proportion_parts(None, None, 1024)
        columns = {"columns": list(self.cell_types)}
        return _write(parts, self._store_path(None), "obsm", key, len(self.cell_types), columns | (attrs or {}))

    def write_results(self, key: str | None = None, attrs: dict[str, Any] | None = None) -> list[Path]:
        """What `atlasvi train` writes back: the proportions in obsm[key] (default "proportions")."""
        return [self.write_proportions(key or PROPORTIONS_KEY, attrs)]

    def figures(self, folder: Path) -> list[tuple[str, Callable[[], Path | None]]]:
        """The proportions on the spots' coordinates (none for a store without obsm["spatial"])."""

        def draw() -> Path | None:
            coordinates = read_spatial(self._store_path(None))
            if coordinates is None:
                return None
            values = np.concatenate([v for _, v in self._proportion_parts(None, None, 1024)])
            title = f"DestVI proportions, {len(values)} spots"
            return proportions_png(coordinates, values, self.cell_types, folder / "proportions_spatial.png", title)

        return [("proportions_spatial", draw)]
