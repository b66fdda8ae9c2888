"""Seurat v3 highly variable genes on counts, batch-aware, computed out of core.

The same computation as `scanpy.pp.highly_variable_genes(flavor="seurat_v3", batch_key=...)`, split
into two streaming passes: per-batch gene means and variances (pass 1), then the clipped sums of
counts and squared counts against the loess-regularised standard deviation (pass 2).
"""

import numpy as np
import pandas as pd
import scipy.sparse as sp


def _per_batch_gene_sums(
    counts: sp.csr_matrix, batch_codes: np.ndarray, n_batch: int, values: np.ndarray
) -> np.ndarray:
    """(n_batch, n_genes) sums of `values` (one per stored entry of counts) by batch and gene."""
    entry_batch = np.repeat(batch_codes, np.diff(counts.indptr))
    flat = entry_batch.astype(np.int64) * counts.shape[1] + counts.indices
    return np.bincount(flat, weights=values, minlength=n_batch * counts.shape[1]).reshape(n_batch, -1)


class GeneMoments:
    """Running per-batch sums of counts and squared counts of each gene (pass 1)."""

    def __init__(self, n_batch: int, n_genes: int):
        self.n_cells = np.zeros(n_batch, dtype=np.int64)
        self.sums = np.zeros((n_batch, n_genes))
        self.sums_sq = np.zeros((n_batch, n_genes))

    def update(self, counts: sp.csr_matrix, batch_codes: np.ndarray) -> None:
        """counts: (cells, n_genes) CSR; batch_codes: (cells,) int."""
        n_batch = len(self.n_cells)
        self.n_cells += np.bincount(batch_codes, minlength=n_batch)
        data = counts.data.astype(np.float64)
        self.sums += _per_batch_gene_sums(counts, batch_codes, n_batch, data)
        self.sums_sq += _per_batch_gene_sums(counts, batch_codes, n_batch, data * data)

    @staticmethod
    def mean_var(n: np.ndarray, sums: np.ndarray, sums_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance (R convention, as scanpy) from counts of cells and sums."""
        n = np.maximum(n, 1).astype(np.float64)
        mean = sums / n
        var = (sums_sq / n - mean**2) * np.where(n > 1, n / np.maximum(n - 1, 1), 1.0)
        return mean, np.maximum(var, 0.0)

    def batch_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_batch, n_genes) means and variances."""
        return self.mean_var(self.n_cells[:, None], self.sums, self.sums_sq)

    def overall_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """(n_genes,) means and variances over all cells."""
        return self.mean_var(self.n_cells.sum(), self.sums.sum(0), self.sums_sq.sum(0))


class ClippedSums:
    """Pass 2: per-batch sums of counts clipped at mean + sqrt(n) * regularised std (Seurat v3)."""

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
        self.sums = np.zeros_like(means)
        self.sums_sq = np.zeros_like(means)

    def update(self, counts: sp.csr_matrix, batch_codes: np.ndarray) -> None:
        entry_batch = np.repeat(batch_codes, np.diff(counts.indptr))
        clipped = np.minimum(counts.data.astype(np.float64), self.clip[entry_batch, counts.indices])
        n_batch = len(self.n_cells)
        self.sums += _per_batch_gene_sums(counts, batch_codes, n_batch, clipped)
        self.sums_sq += _per_batch_gene_sums(counts, batch_codes, n_batch, clipped * clipped)

    def normalized_variances(self) -> np.ndarray:
        """(n_batch, n_genes) Seurat v3 normalised variances."""
        n = self.n_cells[:, None].astype(np.float64)
        return (1 / ((n - 1) * np.square(self.reg_std))) * (
            n * np.square(self.means) + self.sums_sq - 2 * self.sums * self.means
        )


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
