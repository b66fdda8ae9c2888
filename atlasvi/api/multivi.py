"""`MULTIVI`: MultiVI (Ashuach et al. 2023) on an atlas store of paired and unpaired RNA + ATAC cells, as scvi-tools
users know it.

`AtlasModel` (fit with scvi-tools' MULTIVI.train defaults from the registry entry, latent, ELBO, save / load,
scArches query mapping) with differential expression over genes and differential accessibility over peaks (the DE
machinery of `atlasvi.analysis.de`, scvi-tools' MULTIVI defaults: change mode, delta 0.25 / 0.05, pseudocounts 1e-6),
plus `get_latent_representation` of the joint or one modality's posterior,
`get_normalized_expression` (imputed for the cells without RNA: decoded from their ATAC posterior),
`get_accessibility_estimates` (imputed for the cells without ATAC), `get_library_size_factors` and
`get_region_factors`. Each streams over the store, one minibatch in memory. The store is built with
`atlasvi build --atac-key` (the union of the RNA and ATAC cells, with the RNA mask).
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlasvi.analysis import de
from atlasvi.api.base import _stack
from atlasvi.api.extras import BayesianDE, accessibility_table, feature_indices
from atlasvi.data import Minibatch
from atlasvi.data.store import AtlasStore
from atlasvi.models.multivi import MULTIVIConfig, MULTIVIModule

__all__ = ["MULTIVI"]

POSTERIORS = {"joint": "qz", "expression": "qz_expression", "accessibility": "qz_accessibility"}
DA_DEFAULTS = {"mode": "change", "delta": 0.05, "pseudocounts": 1e-6}  # scvi-tools' MULTIVI.differential_accessibility


class AccessibilityView:
    """The MultiVI module as the DE machinery reads it for differential accessibility
    (`atlasvi.analysis.protocols.HasExpression`): its decoded features are the peaks, px_scale the accessibility p,
    the statistics read from the store's "atac" counts."""

    features_modality = "atac"

    def __init__(self, module: MULTIVIModule):
        self.module = module
        self.used_modalities = module.used_modalities
        self.n_genes, self.n_batch = module.n_regions, module.n_batch
        self.feature_ids = module.region_names

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.module.parameters()

    def eval(self) -> Any:
        return self.module.eval()

    def unpack(self, batch: Minibatch) -> Any:
        return self.module.unpack(batch)

    def inference(self, inputs: Any) -> dict:
        return self.module.inference(inputs)

    def generative(self, z: torch.Tensor, library: torch.Tensor, inputs: Any) -> dict:
        return {"px_scale": self.module.generative(z, library, inputs)["p"]}

    def expression_scale(
        self, inputs: Any, z: torch.Tensor, library: torch.Tensor, transform_batch: int | None
    ) -> torch.Tensor:
        """p (n, n_regions) at z; transform_batch: decode every cell as if from that batch code."""
        return self.module.generative(z, library, inputs, transform_batch=transform_batch)["p"]


class MULTIVI(BayesianDE):
    """MultiVI trained on `store` (a path, URL or open AtlasStore with peaks and the RNA mask). device: "auto",
    "cpu" or "cuda". seed: the initial weights are drawn from it alone (the global RNG is untouched).

    fit's defaults are scvi-tools' MULTIVI.train (AdamW lr 1e-4, weight decay 1e-3, eps 1e-8, up to 500 epochs,
    early stopping on the held-out reconstruction with patience 50, KL warm-up over 50 epochs, the adversarial
    batch classifier on); fields of the TrainConfig given to fit override them.
    """

    method = "MULTIVI"
    de_defaults = {"mode": "change", "delta": 0.25, "pseudocounts": 1e-6}  # scvi-tools' MULTIVI DE
    module: MULTIVIModule
    config: MULTIVIConfig

    @property
    def region_names(self) -> tuple[str, ...]:
        """The peaks, in the order of the accessibility columns."""
        return self.module.region_names

    def _region_indices(self, region_list: Sequence[str] | None) -> np.ndarray | None:
        return feature_indices("regions", region_list, self.region_names)

    def _decoded(
        self,
        what: Literal["expression", "accessibility"],
        store: AtlasStore | str | Path | None,
        rows: tuple[int, int] | None,
        transform_batch: str | None,
        use_z_mean: bool,
        n_samples: int,
        batch_size: int,
        seed: int,
        normalize_cells: bool = False,
        normalize_regions: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(store rows (n,), values) per minibatch: px_scale (n, n_genes) or p (n, n_regions) decoded from the
        joint posterior's mean (use_z_mean) or averaged over n_samples draws of it."""
        module, code = self.module, self._batch_code(transform_batch)
        module.eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for batch in self._batches(store, rows, batch_size):
                inputs = module.unpack(batch.to(self.device))
                inference = module.inference(inputs)
                qz = inference["qz"]
                total = None
                for _ in range(1 if use_z_mean else n_samples):
                    z = qz.loc
                    if not use_z_mean:
                        z = z + qz.scale * torch.randn(qz.loc.shape, generator=generator).to(self.device)
                    out = module.generative(z, inference["library"], inputs, transform_batch=code)
                    value = out["px_scale"] if what == "expression" else out["p"]
                    total = value if total is None else total + value
                value = total / (1 if use_z_mean else n_samples)
                if normalize_cells:
                    value = value * inference["depth"]
                if normalize_regions and module.region_factors is not None:
                    value = value * torch.sigmoid(module.region_factors)
                yield batch.rows.numpy(), value.float().cpu().numpy()

    def get_latent_representation(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        give_mean: bool = True,
        batch_size: int = 1024,
        seed: int = 0,
        modality: Literal["joint", "expression", "accessibility"] = "joint",
    ) -> np.ndarray:
        """(n_rows, n_latent) posterior means (or one draw) of the joint posterior, or of one modality's
        (scvi-tools' `modality`: a modality's posterior of a cell that lacks it is its encoder's output on zeros)."""
        if modality == "joint":
            return super().get_latent_representation(store, rows, give_mean, batch_size, seed)
        key, module = POSTERIORS[modality], self.module
        module.eval()
        generator = torch.Generator().manual_seed(seed)
        parts = []
        with torch.no_grad(), self._own_rng(seed):
            for batch in self._batches(store, rows, batch_size):
                qz = module.inference(module.unpack(batch.to(self.device)))[key]
                noise = torch.randn(qz.loc.shape, generator=generator).to(qz.loc.device)
                z = qz.loc if give_mean else qz.loc + qz.scale * noise
                parts.append((batch.rows.numpy(), z.float().cpu().numpy()))
        return _stack(iter(parts), self.n_latent)

    def get_normalized_expression(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        use_z_mean: bool = True,
        n_samples: int = 1,
        library_size: float = 1.0,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """(n_rows, n_genes) normalized expression px_scale (x library_size), as scvi-tools' MULTIVI
        get_normalized_expression (z the joint posterior's mean by default): for a cell without RNA, imputed from
        its ATAC. transform_batch: a batch category to decode every cell as; gene_list: names or ids to keep."""
        genes = self._gene_indices(gene_list)
        with self._own_rng(seed):
            parts = self._decoded("expression", store, rows, transform_batch, use_z_mean, n_samples, batch_size, seed)
            values = _stack(parts, self.schema.n_genes) * library_size
        return values if genes is None else values[:, genes]

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
        """(n_rows, n_regions) probabilities that each region is open in each cell (scvi-tools' MULTIVI
        get_normalized_accessibility / get_accessibility_estimates): p = f(z, batch) from the joint posterior, for a
        cell without ATAC imputed from its RNA; normalize_cells multiplies by the cell's depth factor,
        normalize_regions by the region factors; threshold: values below it set to 0 and a CSR matrix returned."""
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError("the provided threshold must be between 0 and 1")
        regions = self._region_indices(region_list)
        width = len(self.region_names) if regions is None else len(regions)
        with self._own_rng(seed):
            parts = self._decoded(
                "accessibility", store, rows, transform_batch, use_z_mean, 1, batch_size, seed, normalize_cells,
                normalize_regions,
            )  # fmt: skip
            chunks = [values if regions is None else values[:, regions] for _, values in parts]
        if threshold is None:
            return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
        sparse = [sp.csr_matrix(np.where(c < threshold, 0, c)) for c in chunks]
        return sp.vstack(sparse, format="csr") if sparse else sp.csr_matrix((0, width), dtype=np.float32)

    def get_library_size_factors(
        self, store: AtlasStore | str | Path | None = None, rows: tuple[int, int] | None = None, batch_size: int = 1024
    ) -> dict[str, np.ndarray]:
        """{"expression": (n_rows,) the RNA log-library l, "accessibility": (n_rows,) the ATAC depth factor d}, as
        scvi-tools' MULTIVI.get_library_size_factors."""
        module = self.module
        module.eval()
        expression, accessibility = [], []
        with torch.no_grad(), self._own_rng():
            for batch in self._batches(store, rows, batch_size):
                inference = module.inference(module.unpack(batch.to(self.device)))
                expression.append(inference["library"].float().cpu().numpy().ravel())
                accessibility.append(inference["depth"].float().cpu().numpy().ravel())
        empty = np.zeros(0, dtype=np.float32)
        return {
            "expression": np.concatenate(expression) if expression else empty,
            "accessibility": np.concatenate(accessibility) if accessibility else empty,
        }

    def get_region_factors(self) -> np.ndarray:
        """(n_regions,) sigmoid of the learned region factors; RuntimeError when the model has none."""
        if self.module.region_factors is None:
            raise RuntimeError("region factors were not included in this model")
        return torch.sigmoid(self.module.region_factors.detach()).cpu().numpy()

    differential_expression = BayesianDE._differential

    def differential_accessibility(
        self,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: np.ndarray | Sequence[int] | None = None,
        idx2: np.ndarray | Sequence[int] | None = None,
        store: AtlasStore | str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        config: de.DEConfig | None = None,
        **overrides: Any,
    ) -> pd.DataFrame:
        """Differential accessibility over the peaks as scvi-tools' MULTIVI (change mode, delta 0.05, pseudocounts
        1e-6 by default): the DE machinery on posterior draws of p (z drawn from the joint posterior: a cell without
        ATAC contributes its imputed accessibility), the empirical columns from the store's peak counts (a cell
        without ATAC counts as closed there, as in scvi-tools). Arguments as `differential_expression`; scvi-tools'
        columns (`atlasvi.api.extras.accessibility_table`)."""
        given = (config or de.DEConfig()).model_dump(exclude_unset=True)
        options = de.DEConfig.model_validate({**DA_DEFAULTS, **given, **overrides})
        view = AccessibilityView(self.module)
        return accessibility_table(
            self._bayesian_de(groupby, group1, group2, idx1, idx2, store, progress, options, view), options
        )
