"""`PEAKVI`: PeakVI on an atlas store of scATAC-seq peaks, as scvi-tools users know it.

`AtlasModel` (fit with scvi-tools' PEAKVI training defaults from the registry entry, latent, held-out
reconstruction, save / load, scArches) plus `get_accessibility_estimates` (streamed), `get_library_size_factors`,
`get_region_factors` and `differential_accessibility` (the Bayesian DE machinery of `atlasvi.analysis.de`, in
scvi-tools' PEAKVI defaults: change mode, delta 0.05). The store's genes are the peaks (`chr:start-end` names);
counts or 0/1 both serve: the likelihood reads x > 0.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasvi.analysis import de
from atlasvi.analysis.protocols import expression_scale
from atlasvi.api.extras import BayesianDE, accessibility_table
from atlasvi.data import Minibatch
from atlasvi.data.store import AtlasStore
from atlasvi.models.peakvi import PEAKVIConfig, PEAKVIModule

__all__ = ["PEAKVI"]

DA_DELTA = 0.05  # scvi-tools' PEAKVI.differential_accessibility default


class PEAKVI(BayesianDE):
    """PeakVI trained on `store` (a path, URL or open AtlasStore of peak counts). device: "auto", "cpu" or "cuda".

    fit's defaults are scvi-tools' PEAKVI.train (AdamW lr 1e-4, weight decay 1e-3, eps 1e-8, up to 500 epochs,
    early stopping on the held-out reconstruction with patience 50, KL warm-up over 50 epochs); fields of the
    TrainConfig given to fit override them.
    """

    method = "PEAKVI"
    de_defaults = {"delta": DA_DELTA}
    module: PEAKVIModule
    config: PEAKVIConfig

    def _accessibility(
        self,
        batches: Iterator[Minibatch],
        transform_batch: int | None,
        use_z_mean: bool,
        normalize_cells: bool,
        normalize_regions: bool,
        regions: np.ndarray | None,
        generator: torch.Generator,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(store rows (n,), probabilities (n, n_regions_kept)) per minibatch."""
        module, device = self.module, self.device
        module.eval()
        index = None if regions is None else torch.as_tensor(regions, device=device)
        with torch.no_grad():
            for batch in batches:
                inputs = module.unpack(batch.to(device))
                inference = module.inference(inputs)
                qz = inference["qz"]
                if use_z_mean:
                    z = qz.loc
                else:
                    z = qz.loc + qz.scale * torch.randn(qz.loc.shape, generator=generator).to(device)
                p = expression_scale(module, inputs, z, inference["library"], transform_batch)
                if normalize_cells:
                    p = p * inference["library"]
                if normalize_regions and module.region_factors is not None:
                    p = p * torch.sigmoid(module.region_factors)
                if index is not None:
                    p = p[:, index]
                yield batch.rows.numpy(), p.float().cpu().numpy()

    def get_accessibility_estimates(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        region_list: Sequence[str] | None = None,
        transform_batch: str | None = None,
        use_z_mean: bool = True,
        threshold: float | None = None,
        normalize_cells: bool = False,
        normalize_regions: bool = False,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray | sp.csr_matrix:
        """(n_rows, n_regions) probabilities that each region is open in each cell, rows in store order, streamed
        a minibatch at a time (scvi-tools' get_normalized_accessibility / get_accessibility_estimates).

        p = f(z, batch) alone by default; normalize_cells multiplies by the cell's depth factor, normalize_regions
        by the region factors (both: the Bernoulli probabilities of the likelihood). region_list: peak names to
        keep; transform_batch: decode every cell in that batch; use_z_mean False: z drawn from q(z | x) (`seed`);
        threshold: values below it set to 0 and a CSR matrix returned (memory of the non-zeros only).
        """
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError("the provided threshold must be between 0 and 1")
        regions = self._gene_indices(region_list)
        width = self.schema.n_genes if regions is None else len(regions)
        parts = self._accessibility(
            self._batches(store, rows, batch_size), self._batch_code(transform_batch), use_z_mean, normalize_cells,
            normalize_regions, regions, torch.Generator().manual_seed(seed),
        )  # fmt: skip
        with self._own_rng(seed):
            if threshold is None:
                chunks = [values for _, values in parts]
                return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
            sparse = [sp.csr_matrix(np.where(values < threshold, 0, values)) for _, values in parts]
            return sp.vstack(sparse, format="csr") if sparse else sp.csr_matrix((0, width), dtype=np.float32)

    def get_library_size_factors(
        self, store: AtlasStore | str | Path | None = None, rows: tuple[int, int] | None = None, batch_size: int = 1024
    ) -> np.ndarray:
        """(n_rows,) the cells' depth factors d in (0, 1) (ones without model_depth)."""
        module = self.module
        module.eval()
        parts = []
        with torch.no_grad(), self._own_rng():
            for batch in self._batches(store, rows, batch_size):
                parts.append(module.inference(module.unpack(batch.to(self.device)))["library"].float().cpu().numpy())
        return np.concatenate(parts).ravel() if parts else np.zeros(0, dtype=np.float32)

    def get_region_factors(self) -> np.ndarray:
        """(n_regions,) sigmoid of the learned region factors; RuntimeError when the model has none."""
        if self.module.region_factors is None:
            raise RuntimeError("region factors were not included in this model")
        return torch.sigmoid(self.module.region_factors.detach()).cpu().numpy()

    differential_accessibility = BayesianDE._differential

    def _de_table(self, table: pd.DataFrame, options: de.DEConfig) -> pd.DataFrame:
        """scvi-tools' PEAKVI differential accessibility table (`accessibility_table`; its defaults change mode,
        delta 0.05; z drawn from q(z | x))."""
        return accessibility_table(table, options)
