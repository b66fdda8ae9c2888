"""`TOTALVI`: totalVI (Gayoso et al. 2021) on a CITE-seq atlas store, as scvi-tools users know it.

`AtlasModel` (fit with scvi-tools' TOTALVI.train defaults from the registry entry, latent, ELBO, save / load,
scArches query mapping) with normalized RNA expression (`ExpressionExtras`), plus the protein posterior quantities
of scvi-tools' TOTALVI: `get_protein_expression` (denoised: the foreground rate times the foreground probability,
optionally plus the background; imputed for proteins a cell's panel did not measure),
`get_protein_foreground_probability`, and `differential_expression` over genes and proteins (one table, as
scvi-tools' TOTALVI.differential_expression). Each streams over the store, one minibatch in memory.
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atlasvi.analysis import de
from atlasvi.analysis.posterior import protein_expression
from atlasvi.api.base import _stack
from atlasvi.api.extras import BayesianDE, ExpressionExtras, feature_indices
from atlasvi.data.store import AtlasStore
from atlasvi.models.totalvi import TOTALVIModule

PROTEIN_DE_PSEUDOCOUNTS = 1e-5  # scvi-tools' TOTALVI.differential_expression defaults
PROTEIN_PRIOR_COUNT = 0.1

__all__ = ["TOTALVI"]


class TOTALVI(ExpressionExtras):
    """totalVI trained on `store` (a path, URL or open AtlasStore with protein counts). device: "auto", "cpu" or
    "cuda". seed: the initial weights are drawn from it alone (the global RNG is untouched)."""

    method = "TOTALVI"
    module: TOTALVIModule
    de_defaults = {"pseudocounts": PROTEIN_DE_PSEUDOCOUNTS}

    @property
    def protein_names(self) -> tuple[str, ...]:
        """The antibodies, in the order of the protein columns."""
        return self.module.protein_names

    def _protein_indices(self, protein_list: Sequence[str] | None) -> np.ndarray | None:
        return feature_indices("proteins", protein_list, self.protein_names)

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
                    if what == "expression":
                        total += protein_expression(out, include_background)
                    else:
                        total += 1 - torch.sigmoid(out["mixing"])
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

    def differential_expression(
        self,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: np.ndarray | Sequence[int] | None = None,
        idx2: np.ndarray | Sequence[int] | None = None,
        store: AtlasStore | str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        config: de.DEConfig | None = None,
        protein_prior_count: float = PROTEIN_PRIOR_COUNT,
        scale_protein: bool = False,
        sample_protein_mixing: bool = False,
        include_protein_background: bool = False,
        use_field: Sequence[str] = ("rna", "protein"),
        **overrides: Any,
    ) -> pd.DataFrame:
        """Bayesian DE over genes and proteins, one table, as scvi-tools' TOTALVI.differential_expression (the
        shared machinery of `BayesianDE._differential`, same groups and options; pseudocounts 1e-5 by default):
        each draw is [px_scale (n_genes), denoised protein expression + protein_prior_count (n_proteins)] at
        one z ~ q(z | x, y), decoded in the cell's batch (or each batchid with batch_correction), so a protein a
        cell's panel lacks is compared as imputed. Rows: gene ids, then "<protein>_protein"; the proteins' raw
        columns over the cells that measured them (raw_normalized_mean NaN). scale_protein: each draw's proteins
        sum to 1; sample_protein_mixing: draw the background indicator (seeded by the DE seed);
        include_protein_background: add the background rate; use_field: "rna" and / or "protein"."""
        fields = tuple(use_field)
        if not fields or set(fields) - {"rna", "protein"}:
            raise ValueError(f"use_field: 'rna' and / or 'protein', not {list(use_field)}")
        seed = overrides.get("seed", (config or de.DEConfig()).seed)
        generator = torch.Generator().manual_seed(seed + 1) if sample_protein_mixing else None
        module = self.module

        def values(inputs: Any, z: torch.Tensor, library: torch.Tensor, transform_batch: int | None) -> torch.Tensor:
            out = module.generative(z, library, inputs, transform_batch=transform_batch)
            parts = [out["px_scale"]] if "rna" in fields else []
            if "protein" in fields:
                denoised = protein_expression(out, include_protein_background, scale_protein, generator)
                parts.append(denoised + protein_prior_count)
            return torch.cat(parts, dim=-1)

        names = (self.schema.gene_ids if "rna" in fields else ()) + (
            tuple(f"{p}_protein" for p in self.protein_names) if "protein" in fields else ()
        )
        features = de.DEFeatures(
            names, values, genes="rna" in fields, modality="protein" if "protein" in fields else None
        )
        return BayesianDE._differential(
            self, groupby, group1, group2, idx1, idx2, store, progress, config, features, **overrides
        )
