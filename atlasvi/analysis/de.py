"""Bayesian differential expression, as scvi-tools 1.4.2's `differential_expression`, streaming over a store.

Two modes: "vanilla" (Lopez et al. 2018: P(h1 > h2) of the normalized expression h, Bayes factor) and
"change" (Boyeau et al. 2019: the LFC r = log2(h1 + c) - log2(h2 + c), P(|r| >= delta), Bayes factor,
LFC summaries, posterior expected FDR control). For each comparison (group 1 vs group 2, or vs the rest):

1. `n_samples_overall` posterior draws of the normalized expression per group: a cell picked uniformly
   with replacement from the group, z ~ q(z | x) of that cell, px_scale decoded in the cell's own batch
   (batch_correction=False, scvi-tools' `use_observed_batches`) or in each batch of `batchid` in turn
   (n_samples_overall // n_batches draws per batch). Only the picked rows are read from the store
   (`AtlasStore.read_selected`), a minibatch of draws at a time: reads and memory scale with
   n_samples_overall, never with the group. (scvi-tools decodes every cell of the group
   n_samples_overall // n_cells + 1 times and picks n_samples_overall of those draws: each draw has the
   same distribution.)
2. Draws of the two groups are paired in order (within each batch with batch correction), or resampled
   into `m_permutation` pairs (`use_permutation`), and reduced per gene.

The raw-count columns (raw_mean, non_zeros_proportion, raw_normalized_mean) and the per-group means that
tell which genes are not expressed (for the pseudocount) come from one streaming pass over the store.

A module may compare more than its genes (`DEFeatures`): totalVI's genes and proteins, one joint table as
scvi-tools' TOTALVI.differential_expression (protein rows "<name>_protein", their raw columns from the protein
counts, raw_normalized_mean NaN). Where a store's cells did not measure a protein, its raw columns are over the
cells that did (scvi-tools averages the zeros it fills in); NaN where no cell of a group measured it.
"""

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from atlasvi.analysis.posterior import FeatureValues, normalized_expression
from atlasvi.analysis.protocols import HasExpression
from atlasvi.data import Minibatch
from atlasvi.data.loader import feature_map_key, minibatch_from_rows
from atlasvi.data.store import AtlasStore

EPS = 1e-8  # scvi-tools' eps inside the Bayes factor logs
STATS_BLOCK_ROWS = 16384
GENE_CHUNK = 2048  # genes reduced at a time (bounds the float64 LFC temporaries)


class DEConfig(BaseModel):
    """The options of a DE run, as scvi-tools' `differential_expression` names them (API, CLI and analysis)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["vanilla", "change"] = Field("change", description="change (LFC, FDR) or vanilla (P(h1 > h2))")
    delta: float | None = Field(0.25, description="change mode: |LFC| below this is no change (None: estimated)")
    all_stats: bool = Field(True, description="add the raw-count columns (one streaming pass over the store)")
    batch_correction: bool = Field(False, description="decode each group in every batch of batchid1 / batchid2")
    batchid1: list[int | str] | None = Field(
        None, description="batches to decode group 1 in (batch names in the API, model batch codes in analysis)"
    )
    batchid2: list[int | str] | None = Field(None, description="batches to decode group 2 in (as batchid1)")
    fdr_target: float = Field(0.05, description="posterior expected FDR of the is_de_fdr column")
    n_samples_overall: int = Field(5000, description="posterior draws per group")
    use_permutation: bool = Field(False, description="pair draws by resampling instead of in order")
    m_permutation: int = Field(10000, description="pairs drawn with use_permutation")
    pseudocounts: float | None = Field(None, description="LFC pseudocount (None: from the unexpressed genes)")
    threshold_counts: float = Field(0.01, description="a gene of mean count below this is unexpressed")
    test_mode: Literal["two", "three"] = Field("three", description="change mode's two- or three-sided test")
    batch_size: int = Field(1024, description="draws decoded at a time")
    seed: int = Field(0, description="seed of the cell picks (numpy) and z draws (torch)")


@dataclass(frozen=True)
class DEFeatures:
    """The features a DE compares when they are not the module's genes alone (totalVI: genes and proteins).

    names: (n_features,) the table's index; values: a draw's (n, n_features) values (posterior.FeatureValues);
    genes: its first n_genes features are the store's genes (raw columns from X); modality: the store modality
    whose features follow (raw columns from its counts where measured), or None.
    """

    names: tuple[str, ...]
    values: FeatureValues
    genes: bool = True
    modality: str | None = None


@dataclass(frozen=True)
class Comparison:
    """One test: the store rows of group 1 and of group 2 (sorted), their names, their codes in `GroupStats`."""

    name1: str
    name2: str
    rows1: np.ndarray
    rows2: np.ndarray
    stats1: tuple[int, ...]
    stats2: tuple[int, ...]


@dataclass(frozen=True)
class GroupStats:
    """Raw-count sums per group code (n_groups + 1 rows; the last one holds cells of no group).

    n_cells: (n_groups + 1,), or (n_groups + 1, n_features) cells that measured each feature; counts, nonzero,
    normalized: (n_groups + 1, n_features) sums of counts, of counts > 0 and of counts x 1e4 / total counts of
    the cell (NaN for a modality's features, as scvi-tools' proteins).
    """

    n_cells: np.ndarray
    counts: np.ndarray
    nonzero: np.ndarray
    normalized: np.ndarray

    def means(self, codes: tuple[int, ...]) -> dict[str, np.ndarray]:
        """(n_features,) raw mean, non-zero proportion and normalized mean over the groups `codes` (NaN for a
        feature no cell of them measured)."""
        index = list(codes)
        n = np.broadcast_to(self.n_cells[index].sum(0), self.counts.shape[1:]).astype(np.float64)
        return {
            key: np.divide(total[index].sum(0), n, out=np.full(n.shape, np.nan), where=n > 0)
            for key, total in (
                ("raw_mean", self.counts),
                ("non_zeros_proportion", self.nonzero),
                ("raw_normalized_mean", self.normalized),
            )
        }

    def join(self, other: "GroupStats") -> "GroupStats":
        """These features followed by `other`'s (same groups)."""
        n_cells = [np.broadcast_to(s.n_cells.reshape(len(s.n_cells), -1), s.counts.shape) for s in (self, other)]
        return GroupStats(
            np.concatenate(n_cells, axis=1),
            *(
                np.concatenate([a, b], axis=1)
                for a, b in (
                    (self.counts, other.counts),
                    (self.nonzero, other.nonzero),
                    (self.normalized, other.normalized),
                )
            ),
        )


def count_statistics(store: AtlasStore, codes: np.ndarray, n_groups: int, modality: str | None = None) -> GroupStats:
    """One streaming pass over the store: raw-count sums per group code (codes (n_cells,), -1 = no group), of X or
    of a CSR modality's counts (e.g. "atac": the peaks)."""
    n_genes = store.schema.n_genes if modality is None else len(store.schema.modalities[modality].features)
    slot = np.where(codes < 0, n_groups, codes).astype(np.int64)
    counts = np.zeros((n_groups + 1, n_genes))
    nonzero = np.zeros((n_groups + 1, n_genes))
    normalized = np.zeros((n_groups + 1, n_genes))
    for start in range(0, store.n_cells, STATS_BLOCK_ROWS):
        stop = min(start + STATS_BLOCK_ROWS, store.n_cells)
        block = store.read_rows(start, stop, () if modality is None else (modality,))
        matrix = block if modality is None else block.obsm[modality]
        cells = np.repeat(np.arange(block.stop - block.start), np.diff(matrix.indptr))
        values = matrix.data.astype(np.float64)
        totals = np.bincount(cells, weights=values, minlength=block.stop - block.start)
        scaling = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        flat = slot[block.start : block.stop][cells] * n_genes + matrix.indices
        size = (n_groups + 1) * n_genes
        counts += np.bincount(flat, weights=values, minlength=size).reshape(n_groups + 1, n_genes)
        nonzero += np.bincount(flat, minlength=size).reshape(n_groups + 1, n_genes)
        normalized += np.bincount(flat, weights=values * scaling[cells], minlength=size).reshape(n_groups + 1, n_genes)
    return GroupStats(np.bincount(slot, minlength=n_groups + 1), counts, nonzero, normalized)


def modality_statistics(
    store: AtlasStore, codes: np.ndarray, n_groups: int, modality: str, columns: np.ndarray | None = None
) -> GroupStats:
    """As `count_statistics` for a dense modality's counts (e.g. proteins), over the cells that measured each
    feature (n_cells (n_groups + 1, n_features)); raw_normalized_mean NaN. columns: a model's features as store
    columns (-1: the store lacks it, no cell measured it; see `feature_map_key`), default the store's."""
    n_features = len(store.schema.modalities[modality].features)
    slot = np.where(codes < 0, n_groups, codes).astype(np.int64)
    sums = {key: np.zeros((n_groups + 1, n_features)) for key in ("measured", "counts", "nonzero")}
    for start in range(0, store.n_cells, STATS_BLOCK_ROWS):
        block = store.read_rows(start, min(start + STATS_BLOCK_ROWS, store.n_cells), (modality,))
        measured = block.masks[modality].astype(np.float64)
        counts = np.where(block.masks[modality], block.obsm[modality], 0).astype(np.float64)
        groups = slot[block.start : block.stop]
        for key, values in (("measured", measured), ("counts", counts), ("nonzero", (counts > 0) * measured)):
            np.add.at(sums[key], groups, values)
    if columns is not None:
        present = np.asarray(columns) >= 0
        sums = {k: np.where(present, v[:, np.where(present, columns, 0)], 0.0) for k, v in sums.items()}
    normalized = np.full(sums["counts"].shape, np.nan)
    return GroupStats(sums["measured"], sums["counts"], sums["nonzero"], normalized)


def feature_statistics(
    store: AtlasStore,
    codes: np.ndarray,
    n_groups: int,
    features: DEFeatures | None,
    code_maps: dict[str, torch.Tensor] | None = None,
) -> GroupStats:
    """The raw-count sums of the features DE compares: the genes, then a modality's features (`DEFeatures`, in
    the model's order by the feature map of `code_maps`)."""
    if features is None:
        return count_statistics(store, codes, n_groups)
    parts = [count_statistics(store, codes, n_groups)] if features.genes else []
    if features.modality is not None:
        columns = (code_maps or {}).get(feature_map_key(features.modality))
        columns = None if columns is None else np.asarray(columns)
        parts.append(modality_statistics(store, codes, n_groups, features.modality, columns))
    stats = parts[0]
    for part in parts[1:]:
        stats = stats.join(part)
    return stats


def _minibatch(
    store: AtlasStore, rows: np.ndarray, code_maps: dict[str, torch.Tensor] | None, modalities: tuple[str, ...]
) -> Minibatch:
    """The cells at store rows `rows` (sorted, repeats allowed: one cell per draw) as one minibatch, with the
    named modalities."""
    unique, inverse = np.unique(rows, return_inverse=True)
    return minibatch_from_rows(store.read_selected(unique, modalities), inverse, store.schema.n_genes, code_maps)


def _draw_batches(
    store: AtlasStore,
    rows: np.ndarray,
    batch_size: int,
    code_maps: dict[str, torch.Tensor] | None,
    modalities: tuple[str, ...] = (),
) -> Iterator[Minibatch]:
    for start in range(0, len(rows), batch_size):
        yield _minibatch(store, rows[start : start + batch_size], code_maps, modalities)


def sample_scales(
    module: HasExpression,
    store: AtlasStore,
    rows: np.ndarray,
    n_samples: int,
    transform_batches: list[int | None],
    rng: np.random.Generator,
    generator: torch.Generator,
    code_maps: dict[str, torch.Tensor] | None = None,
    batch_size: int = 1024,
    features: DEFeatures | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scales (n, n_genes) float32, batch (n,)): posterior draws of px_scale (or of `features`' values, (n,
    n_features)) for cells of `rows`, as scvi-tools' `scale_sampler`: n_samples // len(transform_batches) draws
    per transform batch (None: each cell's own batch, recorded as -1); a draw = a cell picked uniformly with
    replacement + z ~ q(z | x).
    """
    n_features = module.n_genes if features is None else len(features.names)
    per_batch = int(n_samples / len(transform_batches))
    if per_batch == 0:
        warnings.warn("very small sample size, please consider increasing `n_samples`", UserWarning, stacklevel=2)
        per_batch = 2
    scales, batches = [], []
    for transform_batch in transform_batches:
        picks = rows[rng.integers(0, len(rows), size=per_batch)]
        order = np.argsort(picks, kind="stable")  # read in store order, keep the draws' random order
        drawn = np.empty((per_batch, n_features), dtype=np.float32)
        parts = normalized_expression(
            module,
            _draw_batches(store, picks[order], batch_size, code_maps, module.used_modalities),
            transform_batch,
            generator=generator,
            values=None if features is None else features.values,
        )
        done = 0
        for _, values in parts:
            drawn[order[done : done + len(values)]] = values
            done += len(values)
        scales.append(drawn)
        batches.append(np.full(per_batch, -1 if transform_batch is None else transform_batch))
    return np.concatenate(scales), np.concatenate(batches)


def pairs_sampler(
    arr1: np.ndarray, arr2: np.ndarray, use_permutation: bool, m_permutation: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' pairs_sampler: m_permutation pairs drawn with replacement, or the arrays paired in order."""
    if use_permutation:
        return arr1[rng.integers(0, len(arr1), m_permutation)], arr2[rng.integers(0, len(arr2), m_permutation)]
    n = min(len(arr1), len(arr2))  # equal in every batch policy scvi-tools supports
    return arr1[:n], arr2[:n]


def estimate_pseudocounts_offset(
    scales_a: np.ndarray, scales_b: np.ndarray, where_zero_a: np.ndarray, where_zero_b: np.ndarray, quantile=0.9
) -> float:
    """scvi-tools' pseudocount: the `quantile` of the max posterior scale over the genes a group does not
    express (mean count < threshold), the larger of the two groups, divided by n_genes (>= 1e-10)."""
    max_a, max_b = np.max(scales_a, 0), np.max(scales_b, 0)
    if not max_a.shape == where_zero_a.shape == max_b.shape == where_zero_b.shape:
        raise ValueError("Dimension mismatch between scales and/or masks to compute the pseudocounts offset.")
    eps_a = np.quantile(max_a[where_zero_a], q=quantile) if where_zero_a.sum() >= 1 else 1e-10
    eps_b = np.quantile(max_b[where_zero_b], q=quantile) if where_zero_b.sum() >= 1 else 1e-10
    return float(np.maximum(1e-10, np.maximum(eps_a, eps_b) / len(max_a)))


def estimate_delta(lfc_means: np.ndarray, rng: np.random.Generator, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """scvi-tools' delta when none is given: coef x the mean |mean| of the outer two of a 3-component GMM."""
    from sklearn.mixture import GaussianMixture

    if lfc_means.ndim >= 2:
        raise ValueError("lfc_means should be 1-dimensional of shape: (n_genes,).")
    gmm = GaussianMixture(n_components=3, random_state=int(rng.integers(2**31)))
    gmm.fit(lfc_means[:, None])
    vals = np.sort(gmm.means_.squeeze())
    return float(np.maximum(min_thres, coef * np.abs(vals[[0, -1]]).mean()))


def lfc(scales_1: np.ndarray, scales_2: np.ndarray, pseudocounts: float) -> np.ndarray:
    """(n, n_genes) float64 log2 fold changes of paired draws."""
    return np.log2(scales_1.astype(np.float64) + pseudocounts) - np.log2(scales_2.astype(np.float64) + pseudocounts)


def describe_continuous_distrib(samples: np.ndarray) -> dict[str, np.ndarray]:
    """Per-column mean, median, std (ddof 0), min and max of (n_samples, n_features) samples."""
    return {
        "mean": samples.mean(0),
        "median": np.median(samples, 0),
        "std": samples.std(0),
        "min": samples.min(0),
        "max": samples.max(0),
    }


def bayes_factors(
    scales_1: np.ndarray,
    scales_2: np.ndarray,
    mode: Literal["vanilla", "change"],
    delta: float | None,
    pseudocounts: float | None = None,
    where_zero: tuple[np.ndarray, np.ndarray] | None = None,
    test_mode: Literal["two", "three"] = "three",
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray | float]:
    """The per-gene columns of scvi-tools' get_bayes_factors from paired draws (n, n_genes) of two groups.

    vanilla: proba_m1 = P(h1 > h2), proba_m2, bayes_factor = log(p1 + eps) - log(p2 + eps).
    change: pseudocounts (estimated from the draws and `where_zero` masks when None), LFC with them,
    P(LFC >= delta) and P(LFC < -delta) (max of the two: test_mode "three"; sum: "two") as proba_de,
    bayes_factor, and the LFC summaries computed with 1e-3 x the pseudocount. Computed GENE_CHUNK genes at a time.
    """
    if mode == "vanilla":
        proba_m1 = np.concatenate(
            [np.mean(scales_1[:, g : g + GENE_CHUNK] > scales_2[:, g : g + GENE_CHUNK], 0) for g in _chunks(scales_1)]
        )
        proba_m2 = 1.0 - proba_m1
        return {
            "proba_m1": proba_m1,
            "proba_m2": proba_m2,
            "bayes_factor": np.log(proba_m1 + EPS) - np.log(proba_m2 + EPS),
        }
    if mode != "change":
        raise NotImplementedError(f"Mode {mode} not recognized")
    if pseudocounts is None:
        if where_zero is None:
            raise ValueError("the pseudocount estimate needs the masks of genes not expressed in each group")
        pseudocounts = estimate_pseudocounts_offset(scales_1, scales_2, where_zero[0], where_zero[1], quantile=0.9)
    if delta is None:
        lfc_means = np.concatenate(
            [lfc(*_cols(scales_1, scales_2, g), pseudocounts).mean(0) for g in _chunks(scales_1)]
        )
        delta = estimate_delta(lfc_means, rng or np.random.default_rng(0))
    parts: dict[str, list[np.ndarray]] = {}
    for g in _chunks(scales_1):
        s1, s2 = _cols(scales_1, scales_2, g)
        change = lfc(s1, s2, pseudocounts)
        parts.setdefault("plus", []).append(np.mean(change >= delta, 0))
        parts.setdefault("minus", []).append(np.mean(change < -delta, 0))
        for key, value in describe_continuous_distrib(lfc(s1, s2, 1e-3 * pseudocounts)).items():
            parts.setdefault(f"lfc_{key}", []).append(value)
    merged = {key: np.concatenate(value) for key, value in parts.items()}
    plus, minus = merged.pop("plus"), merged.pop("minus")
    proba_de = plus + minus if test_mode == "two" else np.maximum(plus, minus)
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "pseudocounts": pseudocounts,
        "delta": delta,
        **merged,
    }


def _chunks(scales: np.ndarray) -> range:
    return range(0, scales.shape[1], GENE_CHUNK)


def _cols(a: np.ndarray, b: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    return a[:, g : g + GENE_CHUNK], b[:, g : g + GENE_CHUNK]


def fdr_de_prediction(posterior_probas: pd.Series, fdr: float = 0.05) -> pd.Series:
    """scvi-tools' posterior expected FDR control: the largest top-k set (by probability of DE) whose mean
    1 - p is <= fdr is called DE."""
    if not posterior_probas.ndim == 1:
        raise ValueError("posterior_probas should be 1-dimensional")
    sorted_pgs = posterior_probas.sort_values(ascending=False)
    cumulative_fdr = (1.0 - sorted_pgs).cumsum() / (1.0 + np.arange(len(sorted_pgs)))
    d = int((cumulative_fdr <= fdr).sum())
    is_pred_de = pd.Series(np.zeros(len(sorted_pgs), dtype=bool), index=sorted_pgs.index)
    is_pred_de.iloc[:d] = True
    return is_pred_de.loc[posterior_probas.index]


def index_codes(n_cells: int, idx1: np.ndarray, idx2: np.ndarray | None) -> np.ndarray:
    """scvi-tools' idx1 / idx2 groups as codes (0: "one", 1: "two", -1: neither); a cell in both is in
    group two. Each of idx1, idx2: a (n_cells,) boolean mask or store row indices."""
    codes = np.full(n_cells, -1, dtype=np.int64)
    for code, idx in enumerate([idx1] if idx2 is None else [idx1, idx2]):
        idx = np.asarray(idx).ravel()
        if idx.dtype == bool and len(idx) != n_cells:
            raise ValueError(f"a boolean idx must have one entry per cell ({n_cells}), not {len(idx)}")
        codes[idx] = code
    if not (codes == 0).any() or (idx2 is not None and not (codes == 1).any()):
        raise ValueError("One of idx1 or idx2 has size zero.")
    return codes


def comparisons(
    codes: np.ndarray, categories: tuple[str, ...], group1: list[str] | None, group2: str | None
) -> list[Comparison]:
    """scvi-tools' one-vs-rest (group2 None: every category of group1, default all, vs every other cell) or
    group1 members vs group2. codes: (n_cells,) per-cell group codes (-1: no group)."""
    lookup = {c: i for i, c in enumerate(categories)}
    if group1 is None:
        group1 = list(categories)
        if len(group1) == 1:
            raise ValueError("Only a single group in the data. Can't run DE on a single group.")
    for name in [*group1, *([group2] if group2 is not None else [])]:
        if name not in lookup:
            raise KeyError(f"group {name!r} is not a category of the groupby column: {list(categories)}")
    result = []
    for name in group1:
        code = lookup[name]
        rows1 = np.flatnonzero(codes == code)
        if group2 is None:
            rows2 = np.flatnonzero(codes != code)
            stats2 = tuple(c for c in range(len(categories) + 1) if c != code)
        else:
            rows2 = np.flatnonzero(codes == lookup[group2])
            stats2 = (lookup[group2],)
        if len(rows1) == 0 or len(rows2) == 0:
            raise ValueError(f"{name} vs {group2 or 'Rest'}: a group has no cells")
        result.append(Comparison(name, "Rest" if group2 is None else group2, rows1, rows2, (code,), stats2))
    return result


def differential_expression(
    module: HasExpression,
    store: AtlasStore,
    codes: np.ndarray,
    categories: tuple[str, ...],
    group1: list[str] | None = None,
    group2: str | None = None,
    config: DEConfig | None = None,
    label_comparisons: bool = True,
    code_maps: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    features: DEFeatures | None = None,
) -> pd.DataFrame:
    """scvi-tools' differential_expression table: one block of n_genes rows per comparison, each sorted by
    proba_de (change) or bayes_factor (vanilla), descending; indexed by gene id (the store's var_names), or one
    block of `features` (their names) per comparison.

    codes: (n_cells,) group code of every store row (-1: none), categories: the groups' names.
    config: the options (default DEConfig()); its batchid1 / batchid2 are model batch codes here.
    label_comparisons: add comparison / group1 / group2 columns (scvi-tools omits them for idx1 / idx2).
    progress(done, total) per comparison.
    """
    c = config or DEConfig()
    mode, delta, pseudocounts, batch_correction = c.mode, c.delta, c.pseudocounts, c.batch_correction
    batchid1, batchid2 = c.batchid1, c.batchid2
    if mode not in ("vanilla", "change"):
        raise NotImplementedError(f"Mode {mode} not recognized")
    if not batch_correction and (batchid1 is not None or batchid2 is not None):
        raise ValueError("Inconsistent batch policy: batchid1 / batchid2 need batch_correction=True")
    rng = np.random.default_rng(c.seed)
    generator = torch.Generator().manual_seed(c.seed)
    tests = comparisons(codes, categories, group1, group2)
    needs_stats = c.all_stats or (mode == "change" and pseudocounts is None)
    if features is None:
        features_modality = getattr(module, "features_modality", None)  # a module decoding another modality's features
        stats = count_statistics(store, codes, len(categories), features_modality) if needs_stats else None
    else:
        stats = feature_statistics(store, codes, len(categories), features, code_maps) if needs_stats else None
    every_batch = list(range(module.n_batch))
    frames = []
    for done, test in enumerate(tests):
        batches1 = [None] if not batch_correction else list(batchid1 or every_batch)
        batches2 = [None] if not batch_correction else list(batchid2 or every_batch)
        draw = dict(rng=rng, generator=generator, code_maps=code_maps, batch_size=c.batch_size, features=features)
        scales1, ids1 = sample_scales(module, store, test.rows1, c.n_samples_overall, batches1, **draw)
        scales2, ids2 = sample_scales(module, store, test.rows2, c.n_samples_overall, batches2, **draw)
        paired_1, paired_2 = _pairs(
            scales1, ids1, scales2, ids2, batch_correction, c.use_permutation, c.m_permutation, rng
        )
        where_zero = None
        if mode == "change" and pseudocounts is None:
            assert stats is not None
            mean1, mean2 = stats.means(test.stats1)["raw_mean"], stats.means(test.stats2)["raw_mean"]
            where_zero = (mean1 < c.threshold_counts, mean2 < c.threshold_counts)
        info = bayes_factors(paired_1, paired_2, mode, delta, pseudocounts, where_zero, c.test_mode, rng)
        first = {k: v for k, v in info.items() if k in ("proba_m1", "proba_m2", "proba_de", "proba_not_de")}
        columns = {**first, "bayes_factor": info["bayes_factor"], "scale1": scales1.mean(0), "scale2": scales2.mean(0)}
        columns |= {k: v for k, v in info.items() if k not in columns}
        if c.all_stats:
            assert stats is not None
            one, two = stats.means(test.stats1), stats.means(test.stats2)
            for key in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
                columns[f"{key}1"], columns[f"{key}2"] = one[key], two[key]
        names = getattr(module, "feature_ids", store.schema.gene_ids) if features is None else features.names
        frame = pd.DataFrame(columns, index=pd.Index(names))
        frame = frame.sort_values(by="proba_de" if mode == "change" else "bayes_factor", ascending=False)
        if mode == "change":
            frame[f"is_de_fdr_{c.fdr_target}"] = fdr_de_prediction(frame["proba_de"], fdr=c.fdr_target)
        if label_comparisons:
            frame["comparison"] = f"{test.name1} vs {test.name2}"
            frame["group1"], frame["group2"] = test.name1, test.name2
        frames.append(frame)
        if progress is not None:
            progress(done + 1, len(tests))
    return pd.concat(frames, axis=0)


def _pairs(
    scales1: np.ndarray,
    ids1: np.ndarray,
    scales2: np.ndarray,
    ids2: np.ndarray,
    batch_correction: bool,
    use_permutation: bool,
    m_permutation: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' pairing: per batch when both groups were decoded in the same batches, else overall."""
    batches = np.unique(ids1)
    if batch_correction and set(batches) == set(np.unique(ids2)):
        per_batch = m_permutation // len(batches)
        pairs = [
            pairs_sampler(scales1[ids1 == b], scales2[ids2 == b], use_permutation, per_batch, rng) for b in batches
        ]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    if batch_correction and set(batches) & set(np.unique(ids2)):
        warnings.warn(
            "Batchids of cells groups 1 and 2 are different but have an non-null intersection. Specific handling of "
            "such situations is not implemented yet and batch correction is not trustworthy.",
            UserWarning,
            stacklevel=3,
        )
    return pairs_sampler(scales1, scales2, use_permutation, m_permutation, rng)
