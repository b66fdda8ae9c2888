"""Seurat v3 highly variable genes on counts, batch-aware, computed out of core.

The same computation as `scanpy.pp.highly_variable_genes(flavor="seurat_v3", batch_key=...)`, split
into two streaming passes: per-batch gene means and variances (pass 1), then the clipped sums of
counts and squared counts against the loess-regularised standard deviation (pass 2).
"""

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasvi.data.exact import add_exact, exact_bin_sums, to_float


def _entry_bins(counts: sp.csr_matrix, batch_codes: np.ndarray) -> np.ndarray:
    """(nnz,) flat (batch, gene) bin of every stored entry of counts."""
    entry_batch = np.repeat(batch_codes.astype(np.int64), np.diff(counts.indptr))
    return entry_batch * counts.shape[1] + counts.indices


class GeneMoments:
    """Per-batch sums of counts and squared counts of each gene (pass 1), exact (see `atlasvi.data.exact`):
    partial moments of chunks of cells `merge` into the same totals in any order."""

    def __init__(self, n_batch: int, n_genes: int):
        self.n_batch, self.n_genes = n_batch, n_genes
        self.n_cells = np.zeros(n_batch, dtype=np.int64)
        self.sums: np.ndarray | None = None  # (n_batch * n_genes,) exact integer sums
        self.sums_sq: np.ndarray | None = None

    def update(self, counts: sp.csr_matrix, batch_codes: np.ndarray) -> None:
        """counts: (cells, n_genes) CSR of validated counts (integers >= 0, not checked again); batch_codes:
        (cells,) int."""
        self.n_cells += np.bincount(batch_codes, minlength=self.n_batch)
        bins, data = _entry_bins(counts, batch_codes), counts.data.astype(np.float64)
        size = self.n_batch * self.n_genes
        self.sums = add_exact(self.sums, exact_bin_sums(data, bins, size, check=False))
        self.sums_sq = add_exact(self.sums_sq, exact_bin_sums(data * data, bins, size, check=False))

    def merge(self, other: "GeneMoments") -> None:
        """Add the moments of other cells."""
        self.n_cells += other.n_cells
        for name in ("sums", "sums_sq"):
            theirs = getattr(other, name)
            if theirs is not None:
                setattr(self, name, add_exact(getattr(self, name), theirs))

    def _totals(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.n_batch, self.n_genes)
        if self.sums is None:
            return np.zeros(shape), np.zeros(shape)
        return to_float(self.sums).reshape(shape), to_float(self.sums_sq).reshape(shape)

    @staticmethod
    def mean_var(n: np.ndarray, sums: np.ndarray, sums_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance (R convention, as scanpy) from counts of cells and sums."""
        n = np.maximum(n, 1).astype(np.float64)
        mean = sums / n
        var = (sums_sq / n - mean**2) * np.where(n > 1, n / np.maximum(n - 1, 1), 1.0)
        return mean, np.maximum(var, 0.0)

    def batch_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_batch, n_genes) means and variances."""
        sums, sums_sq = self._totals()
        return self.mean_var(self.n_cells[:, None], sums, sums_sq)

    def overall_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_genes,) means and variances over all cells."""
        if self.sums is None:
            return self.mean_var(self.n_cells.sum(), np.zeros(self.n_genes), np.zeros(self.n_genes))
        shape = (self.n_batch, self.n_genes)
        sums = to_float(self.sums.reshape(shape).sum(axis=0))
        sums_sq = to_float(self.sums_sq.reshape(shape).sum(axis=0))
        return self.mean_var(self.n_cells.sum(), sums, sums_sq)


class ClippedSums:
    """Pass 2: per-batch sums of counts clipped at mean + sqrt(n) * regularised std (Seurat v3). A count above
    its clip adds the clip: the sums are kept as exact integer sums of the counts at or below their clip plus
    the number of clipped counts, so that partial sums of chunks `merge` into the same totals in any order."""

    def __init__(self, moments: GeneMoments, span: float = 0.3):
        from skmisc.loess import loess

        means, variances = moments.batch_mean_var()
        self.n_cells = moments.n_cells
        self.means = means
        self.reg_std = np.ones_like(means)
        for b in range(len(means)):
            not_const = variances[b] > 0
            if not_const.sum() < 3:
                continue
            estimated = np.zeros(means.shape[1])
            model = loess(np.log10(means[b, not_const]), np.log10(variances[b, not_const]), span=span, degree=2)
            model.fit()
            estimated[not_const] = model.outputs.fitted_values
            self.reg_std[b] = np.sqrt(10**estimated)
        self.clip = self.reg_std * np.sqrt(self.n_cells)[:, None] + means
        self.below: np.ndarray | None = None  # exact sums of the counts at or below their clip
        self.below_sq: np.ndarray | None = None
        self.n_clipped = np.zeros(means.size, dtype=np.int64)

    def partial(self, counts: sp.csr_matrix, batch_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sums, sums of squares, clipped) of one chunk's validated counts (integers >= 0, not checked again):
        (n_batch * n_genes,) each."""
        bins, data = _entry_bins(counts, batch_codes), counts.data.astype(np.float64)
        clipped = data > self.clip.ravel()[bins]
        size = self.clip.size
        kept, kept_bins = data[~clipped], bins[~clipped]
        return (
            exact_bin_sums(kept, kept_bins, size, check=False),
            exact_bin_sums(kept * kept, kept_bins, size, check=False),
            np.bincount(bins[clipped], minlength=size).astype(np.int64),
        )

    def merge(self, partial: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        below, below_sq, n_clipped = partial
        self.below, self.below_sq = add_exact(self.below, below), add_exact(self.below_sq, below_sq)
        self.n_clipped += n_clipped

    def update(self, counts: sp.csr_matrix, batch_codes: np.ndarray) -> None:
        """counts: (cells, n_genes) CSR of integer counts; batch_codes: (cells,) int."""
        self.merge(self.partial(counts, batch_codes))

    def normalized_variances(self) -> np.ndarray:
        """(n_batch, n_genes) Seurat v3 normalised variances."""
        shape = self.clip.shape
        n_clipped = self.n_clipped.reshape(shape)
        if self.below is None:
            below, below_sq = np.zeros(shape), np.zeros(shape)
        else:
            below, below_sq = to_float(self.below).reshape(shape), to_float(self.below_sq).reshape(shape)
        sums = below + n_clipped * self.clip
        sums_sq = below_sq + n_clipped * np.square(self.clip)
        n = self.n_cells[:, None].astype(np.float64)
        return (1 / ((n - 1) * np.square(self.reg_std))) * (n * np.square(self.means) + sums_sq - 2 * sums * self.means)


def select_hvg(moments: GeneMoments, clipped: ClippedSums, n_top_genes: int) -> pd.DataFrame:
    """Rank genes as scanpy's seurat_v3 flavour; one row per gene, `highly_variable` marks the top."""
    norm_vars = clipped.normalized_variances()
    n_top = min(n_top_genes, norm_vars.shape[1])
    ranks = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    n_batches_hvg = np.sum(ranks < n_top, axis=0)
    ranks[ranks >= n_top] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    means, variances = moments.overall_mean_var()
    table = pd.DataFrame(
        {
            "means": means,
            "variances": variances,
            "variances_norm": norm_vars.mean(0),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": n_batches_hvg,
        }
    )
    order = table.sort_values(
        ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
    ).index
    table["highly_variable"] = False
    table.loc[order[:n_top], "highly_variable"] = True
    return table
