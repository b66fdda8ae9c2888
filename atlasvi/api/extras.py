"""Extras a method class adds to `AtlasModel` (scvi-tools' names): normalized expression and DE for a module
with a decoder, predictions for a module with a classifier (see `atlasvi.analysis.protocols`)."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from atlasvi.analysis import de, normalized_expression
from atlasvi.analysis.labels import class_probabilities
from atlasvi.api.base import AtlasModel, _stack, _write
from atlasvi.data import open_store
from atlasvi.data.store import AtlasStore
from atlasvi.data.writeback import ObsCategoricalWriter

__all__ = ["BayesianDE", "ClassifierExtras", "ExpressionExtras", "accessibility_table", "feature_indices"]


def feature_indices(kind: str, wanted: Sequence[str] | None, *names: Sequence[str]) -> np.ndarray | None:
    """(len(wanted),) column indices of the `wanted` features (None: all, returns None), looked up in each of
    `names` (e.g. gene names, then gene ids); KeyError naming up to 5 of `kind` the model lacks."""
    if wanted is None:
        return None
    lookup = {name: i for column in names for i, name in enumerate(column)}  # a later column wins a clash
    missing = [f for f in wanted if f not in lookup]
    if missing:
        raise KeyError(f"{kind} not in the model: {missing[:5]}")
    return np.array([lookup[f] for f in wanted], dtype=np.int64)


class BayesianDE(AtlasModel):
    """Bayesian DE over a store (scvi-tools' `differential_expression` machinery, `atlasvi.analysis.de`) of a model
    whose module decodes `px_scale` (features: genes or regions); a method class names it after what it compares
    (`differential_expression = BayesianDE._differential`), with its own option defaults (`de_defaults`) and
    table (`_de_table`)."""

    de_defaults: ClassVar[dict[str, Any]] = {}  # DEConfig fields whose defaults differ for this method

    def _gene_indices(self, gene_list: Sequence[str] | None) -> np.ndarray | None:
        return feature_indices("genes", gene_list, self.schema.gene_names, self.schema.gene_ids)

    def _batch_code(self, transform_batch: str | None) -> int | None:
        if transform_batch is None:
            return None
        categories = self.schema.batch_categories
        if transform_batch not in categories:
            raise KeyError(f"transform_batch {transform_batch!r} is not a {self.schema.batch_key}: {categories}")
        return categories.index(transform_batch)

    def _differential(
        self,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: np.ndarray | Sequence[int] | None = None,
        idx2: np.ndarray | Sequence[int] | None = None,
        store: AtlasStore | str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        config: de.DEConfig | None = None,
        features: de.DEFeatures | None = None,
        **overrides: Any,
    ) -> pd.DataFrame:
        """Bayesian DE as scvi-tools' (see `atlasvi.analysis.de`): `groupby` (a categorical obs column of the
        store) with group1 (default: each group) vs group2 (default: the rest), or row masks / indices
        idx1 vs idx2. Only the sampled cells' rows are read, plus one streaming pass for the raw-count
        columns. The options are `config` (a `DEConfig`) with scvi-tools' keywords (mode, delta, batchid1,
        seed, ...) as overrides, over the method's `de_defaults`; batchid1 / batchid2 are batch names. mode
        "change" (scvi-tools' default for expression is "vanilla") adds the LFC columns and is_de_fdr_<target>.
        The table is the method's `_de_table` of the DE machinery's; features: what it compares (default: the
        module's genes; see `atlasvi.analysis.de.DEFeatures`).
        """
        given = (config or de.DEConfig()).model_dump(exclude_unset=True)
        options = de.DEConfig.model_validate({**self.de_defaults, **given, **overrides})
        table = self._bayesian_de(groupby, group1, group2, idx1, idx2, store, progress, options, self.module, features)
        return self._de_table(table, options)

    def _de_table(self, table: pd.DataFrame, options: de.DEConfig) -> pd.DataFrame:
        """The method's DE table from that of `atlasvi.analysis.de.differential_expression`: that one as it is."""
        return table

    def _bayesian_de(
        self,
        groupby: str | None,
        group1: str | Sequence[str] | None,
        group2: str | None,
        idx1: np.ndarray | Sequence[int] | None,
        idx2: np.ndarray | Sequence[int] | None,
        store: AtlasStore | str | Path | None,
        progress: Callable[[int, int], None] | None,
        options: de.DEConfig,
        module: Any,
        features: de.DEFeatures | None = None,
    ) -> pd.DataFrame:
        """The DE table of `atlasvi.analysis.de.differential_expression` of `module` (the model's, or a view of it
        decoding other features: `atlasvi.analysis.protocols.HasExpression`; see `_differential`)."""
        batch_codes = {
            key: [self._batch_code(str(b)) for b in names]
            for key, names in (("batchid1", options.batchid1), ("batchid2", options.batchid2))
            if names is not None
        }
        opened = self.store if store is None else (store if isinstance(store, AtlasStore) else open_store(store))
        code_maps = self.code_maps if store is None else self._code_maps(opened)
        if idx1 is not None:
            codes, categories = de.index_codes(opened.n_cells, np.asarray(idx1), idx2), ("one", "two")
            group1, group2 = ["one"], None if idx2 is None else "two"
        elif groupby is not None:
            codes, categories = opened.read_obs_categorical(groupby)
        else:
            raise ValueError("give groupby (an obs column) or idx1")
        with self._own_rng(options.seed):
            return de.differential_expression(
                module,
                opened,
                codes,
                categories,
                group1=[group1] if isinstance(group1, str) else group1,
                group2=group2,
                config=options.model_copy(update=batch_codes),
                label_comparisons=idx1 is None,
                code_maps=code_maps,
                progress=progress,
                features=features,
            )


def accessibility_table(table: pd.DataFrame, options: de.DEConfig) -> pd.DataFrame:
    """scvi-tools' differential accessibility table (PEAKVI's and MULTIVI's) from the DE machinery's on posterior
    draws of the accessibility p.

    Columns, per region: prob_da, is_da_fdr (change mode), bayes_factor, effect_size = est_prob2 - est_prob1,
    est_prob1, est_prob2 (mean posterior p per group) and, with all_stats, emp_effect = emp_prob2 - emp_prob1,
    emp_prob1, emp_prob2 (fractions of the groups' cells with the region open); with groupby also comparison,
    group1, group2 (which scvi-tools' table drops), one block of regions per comparison.
    """
    change = options.mode == "change"
    stats = options.all_stats
    columns = {
        "prob_da": table["proba_de"] if change else table["proba_m1"],
        "is_da_fdr": table[f"is_de_fdr_{options.fdr_target}"] if change else None,
        "bayes_factor": table["bayes_factor"],
        "effect_size": table["scale2"] - table["scale1"],
        **({"emp_effect": table["non_zeros_proportion2"] - table["non_zeros_proportion1"]} if stats else {}),
        "est_prob1": table["scale1"],
        "est_prob2": table["scale2"],
        **({"emp_prob1": table["non_zeros_proportion1"], "emp_prob2": table["non_zeros_proportion2"]} if stats else {}),
    }
    columns |= {key: table[key] for key in ("comparison", "group1", "group2") if key in table}
    return pd.DataFrame(columns, index=table.index)


class ExpressionExtras(BayesianDE):
    """Normalized expression (get / write) and Bayesian DE of a model whose module has a decoder."""

    def get_normalized_expression(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float = 1.0,
        n_samples: int = 1,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """(n_rows, n_genes) library-size normalized expression (px_scale x library_size), rows in order.

        transform_batch: a batch category to decode every cell as; gene_list: names or ids to keep.
        """
        genes = self._gene_indices(gene_list)
        parts = normalized_expression(
            self.module, self._batches(store, rows, batch_size), self._batch_code(transform_batch), library_size,
            n_samples, genes, torch.Generator().manual_seed(seed),
        )  # fmt: skip
        with self._own_rng(seed):
            return _stack(parts, self.schema.n_genes if genes is None else len(genes))

    def write_normalized_expression(
        self,
        store: AtlasStore | str | Path | None = None,
        layer: str = "scvi_normalized",
        transform_batch: str | None = None,
        library_size: float = 1e4,
        n_samples: int = 1,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> Path:
        """Write normalized expression of every cell and gene into layers[layer], chunk by chunk."""
        parts = normalized_expression(
            self.module, self._batches(store, None, batch_size), self._batch_code(transform_batch), library_size,
            n_samples, None, torch.Generator().manual_seed(seed),
        )  # fmt: skip
        with self._own_rng(seed):
            return _write(parts, self._store_path(store), "layers", layer, self.schema.n_genes)

    differential_expression = BayesianDE._differential


class ClassifierExtras(AtlasModel):
    """Label predictions (q(y | z)) of a model whose module has a classifier."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The classes, in the order of the probability columns."""
        return self.module.label_names

    def predict(
        self,
        store: AtlasStore | str | Path | None = None,
        rows: tuple[int, int] | None = None,
        soft: bool = False,
        batch_size: int = 1024,
    ) -> np.ndarray | pd.DataFrame:
        """The most probable label of each row (soft=False), or a DataFrame of q(y | z1) per class (rows sum to 1)."""
        with self._own_rng():
            probabilities = _stack(
                class_probabilities(self.module, self._batches(store, rows, batch_size)), len(self.labels)
            )
        if soft:
            return pd.DataFrame(probabilities, columns=list(self.labels))
        return np.asarray(self.labels, dtype=object)[probabilities.argmax(axis=1)]

    def write_predictions(
        self,
        store: AtlasStore | str | Path | None = None,
        key: str = "scanvi_prediction",
        probabilities_key: str | None = "scanvi_probabilities",
        batch_size: int = 1024,
    ) -> Path:
        """Predicted labels into obs[key] (categorical) and the probabilities into obsm[probabilities_key]
        (columns in `labels` order), streaming over the store; returns the obs column's path."""
        path = self._store_path(store)
        with self._own_rng(), ObsCategoricalWriter(path, key, list(self.labels)) as labels_writer:
            parts = class_probabilities(self.module, self._batches(store, None, batch_size))
            if probabilities_key is None:
                for _, probabilities in parts:
                    labels_writer.write(probabilities.argmax(axis=1))
            else:
                _write(_tee_argmax(parts, labels_writer), path, "obsm", probabilities_key, len(self.labels))
            return labels_writer.commit()

    def write_results(self, key: str | None = None, attrs: dict[str, Any] | None = None) -> list[Path]:
        """The latent in obsm[key], and the predictions beside it: obs["NAME_prediction"] and
        obsm["NAME_probabilities"], NAME the latent key without its "X_" (X_scanvi: scanvi_prediction)."""
        written = super().write_results(key, attrs)
        name = (key or self.entry.latent_key).removeprefix("X_")
        return [*written, self.write_predictions(key=f"{name}_prediction", probabilities_key=f"{name}_probabilities")]


def _tee_argmax(parts, writer: ObsCategoricalWriter):
    for rows, probabilities in parts:
        writer.write(probabilities.argmax(axis=1))
        yield rows, probabilities
