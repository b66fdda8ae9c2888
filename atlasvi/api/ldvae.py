"""`LinearSCVI`: LDVAE (Svensson et al. 2020) on an atlas store, as scvi-tools users know it (scvi-tools' class name).

`AtlasModel` (fit with scvi-tools' unsupervised training defaults, latent, ELBO, save / load, scArches) with
normalized expression and DE (`ExpressionExtras`), plus the linear decoder's gene loadings: `get_loadings` (a
genes x factors table, as scvi-tools') and `write_loadings` (into the store's varm, atomically).
"""

from pathlib import Path
from typing import Any

import pandas as pd

from atlasvi.api.extras import ExpressionExtras
from atlasvi.data.store import AtlasStore, open_store
from atlasvi.data.writeback import VarmWriter
from atlasvi.models.ldvae import LDVAEConfig, LDVAEModule

__all__ = ["LinearSCVI"]

LOADINGS_KEY = "ldvae_loadings"


class LinearSCVI(ExpressionExtras):
    """LDVAE trained on `store` (a path, URL or open AtlasStore). device: "auto", "cpu" or "cuda".

    seed: the initial weights are drawn from it alone (in a scope of their own; the global RNG is untouched).
    """

    method = "LinearSCVI"
    module: LDVAEModule
    config: LDVAEConfig

    def get_loadings(self) -> pd.DataFrame:
        """(n_genes, n_latent) per-gene weights of the latent factors in the linear decoder, the batch norm folded
        in (scvi-tools' get_loadings): index the model's gene names, columns Z_0 ... Z_{n_latent - 1}."""
        loadings = self.module.loadings().float().cpu().numpy()
        columns = [f"Z_{i}" for i in range(self.n_latent)]
        return pd.DataFrame(loadings, index=list(self.schema.gene_names), columns=columns)

    def write_loadings(
        self,
        store: AtlasStore | str | Path | None = None,
        key: str = LOADINGS_KEY,
        attrs: dict[str, Any] | None = None,
    ) -> Path:
        """Write the loadings (n_genes, n_latent) into varm[key] of a local store with the model's genes (default
        the training store), atomically; returns the array's path."""
        if store is not None:  # another store must have the model's genes, in its order (else IncompatibleStoreError)
            self._code_maps(store if isinstance(store, AtlasStore) else open_store(store))
        path = self._store_path(store)
        with VarmWriter(path, key, self.get_loadings().to_numpy(), attrs) as writer:
            return writer.commit()

    def write_results(self, key: str | None = None, attrs: dict[str, Any] | None = None) -> list[Path]:
        """The latent in obsm[key] and the loadings in varm["ldvae_loadings"]."""
        return [*super().write_results(key, attrs), self.write_loadings(attrs=attrs)]
