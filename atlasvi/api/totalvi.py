"""`TOTALVI`: totalVI (Gayoso et al. 2021) on a CITE-seq atlas store, as scvi-tools users know it.

`AtlasModel` (fit with scvi-tools' TOTALVI.train defaults from the registry entry, latent, ELBO, save / load,
scArches query mapping) with normalized RNA expression and DE over genes (`ExpressionExtras`), plus the protein
posterior quantities of scvi-tools' TOTALVI: `get_protein_expression` (denoised: the foreground rate times the
foreground probability, optionally plus the background; imputed for proteins a cell's panel did not measure) and
`get_protein_foreground_probability`. Each streams over the store, one minibatch in memory.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from atlasvi.api.base import _stack
from atlasvi.api.extras import ExpressionExtras
from atlasvi.data.store import AtlasStore
from atlasvi.models.totalvi import TOTALVIModule

__all__ = ["TOTALVI"]


class TOTALVI(ExpressionExtras):
    """totalVI trained on `store` (a path, URL or open AtlasStore with protein counts). device: "auto", "cpu" or
    "cuda". seed: the initial weights are drawn from it alone (the global RNG is untouched)."""

    method = "TOTALVI"
    module: TOTALVIModule

    @property
    def protein_names(self) -> tuple[str, ...]:
        """The antibodies, in the order of the protein columns."""
        return self.module.protein_names

    def _protein_indices(self, protein_list: Sequence[str] | None) -> np.ndarray | None:
        if protein_list is None:
            return None
        lookup = {p: i for i, p in enumerate(self.protein_names)}
        missing = [p for p in protein_list if p not in lookup]
        if missing:
            raise KeyError(f"proteins not in the model: {missing[:5]}")
        return np.array([lookup[p] for p in protein_list])

    def _protein_parts(
        self,
        what: str,
        store: AtlasStore | str | Path | None,
        rows: tuple[int, int] | None,
        transform_batch: str | None,
        n_samples: int,
        include_background: bool,
        batch_size: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(store rows, (n, n_proteins)) per minibatch: the mean over n_samples draws of z ~ q(z | x, y) (and of
        the log background) of the denoised protein expression (what="expression") or of 1 - P(background)."""
        module, code = self.module, self._batch_code(transform_batch)
        device = next(module.parameters()).device
        module.eval()
        with torch.no_grad():
            for batch in self._batches(store, rows, batch_size):
                inputs = module.unpack(batch.to(device))
                inference = module.inference(inputs)
                total = torch.zeros(len(batch), module.n_proteins, device=device)
                for _ in range(n_samples):
                    z = inference["qz"].rsample()
                    out = module.generative(z, inference["library"], inputs, transform_batch=code)
                    background = torch.sigmoid(out["mixing"])
                    if what == "expression":
                        value = out["rate_fore"] * (1 - background)
                        if include_background:
                            value = value + out["rate_back"] * background
                    else:
                        value = 1 - background
                    total += value
                yield batch.rows.numpy(), (total / n_samples).float().cpu().numpy()

    def get_protein_expression(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        transform_batch: str | None = None,
        protein_list: Sequence[str] | None = None,
        include_protein_background: bool = False,
        n_samples: int = 1,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """(n_rows, n_proteins) denoised protein expression, as the protein half of scvi-tools' TOTALVI
        get_normalized_expression: rate_fore x (1 - P(background)) (+ rate_back x P(background) with
        include_protein_background), in counts; proteins outside a cell's panel are imputed, not zero.
        transform_batch: a batch category to decode every cell as (e.g. one whose panel measured the protein)."""
        proteins = self._protein_indices(protein_list)
        with self._own_rng(seed):
            parts = self._protein_parts(
                "expression", store, rows, transform_batch, n_samples, include_protein_background, batch_size
            )
            values = _stack(parts, len(self.protein_names))
        return values if proteins is None else values[:, proteins]

    def get_protein_foreground_probability(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        transform_batch: str | None = None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """(n_rows, n_proteins) probability that each protein's counts are foreground, 1 - sigmoid(mixing), as
        scvi-tools' get_protein_foreground_probability."""
        proteins = self._protein_indices(protein_list)
        with self._own_rng(seed):
            parts = self._protein_parts("foreground", store, rows, transform_batch, n_samples, False, batch_size)
            values = _stack(parts, len(self.protein_names))
        return values if proteins is None else values[:, proteins]
