"""Fully-connected blocks with covariate injection, Gaussian encoders, the count decoder and a probability decoder.

The same layers and defaults as scvi-tools (`FCLayers`, `Encoder`, `DecoderSCVI`): Linear ->
BatchNorm1d(momentum 0.01, eps 1e-3) | LayerNorm -> activation (ReLU unless given) -> Dropout, categorical
covariates one-hot and concatenated to the input of the first layer, and of every layer when `inject_covariates`.
Nothing model-specific, and no parameter that a configuration does not use. The first layer also takes its input
as `SparseCounts` (CSR, e.g. log1p of a minibatch's counts): a sparse x dense product, never densified.
"""

from collections.abc import Sequence
from itertools import islice
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from atlasvi.data import SparseCounts

__all__ = [
    "CountDecoder",
    "Encoder",
    "FCLayers",
    "LinearCountDecoder",
    "ProbabilityDecoder",
    "RNAProteinDecoder",
    "sparse_linear",
]


class _SparseLinear(torch.autograd.Function):
    """X @ W^T for CSR X (n, n_in) and W (n_out, n_in); the gradient of W alone (X is data).

    Forward: an embedding bag of W^T's rows per cell, weighted by the values; backward: X^T @ grad the same way, over
    X's non-zeros sorted by column (X^T in CSR form), so neither pass touches the (n, n_in) zeros.
    """

    @staticmethod
    def forward(
        ctx, crow: torch.Tensor, col: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """rows: (nnz,) the row of each non-zero (`SparseCounts.rows`)."""
        ctx.save_for_backward(crow, col, rows, values)
        ctx.n_in = weight.shape[1]
        return F.embedding_bag(col, weight.t().contiguous(), crow[:-1], mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        crow, col, rows, values = ctx.saved_tensors
        order = _column_order(col, ctx.n_in)
        offsets = torch.zeros(ctx.n_in, dtype=crow.dtype, device=col.device)
        offsets[1:] = torch.bincount(col, minlength=ctx.n_in)[:-1].cumsum(0)
        weight_t = F.embedding_bag(
            rows.index_select(0, order),
            grad.contiguous(),
            offsets,
            mode="sum",
            per_sample_weights=values.index_select(0, order),
        )  # (n_in, n_out); a column no cell has is an empty bag: 0 (index_select: ~2x advanced indexing, measured)
        return None, None, None, None, weight_t.t()


def _column_order(col: torch.Tensor, n_columns: int) -> torch.Tensor:
    """The stable order of the non-zeros by column (X^T in CSR): on the CPU with < 2^16 columns numpy's radix sort
    of 16-bit keys (~4x torch's argsort at 20K non-zeros, measured), else torch's argsort."""
    if col.device.type == "cpu" and n_columns <= 1 << 16:
        return torch.from_numpy(np.argsort(col.numpy().astype(np.uint16), kind="stable"))
    return torch.argsort(col, stable=True)


def sparse_linear(x: SparseCounts, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for CSR input: (n, n_in) x (n_out, n_in) -> (n, n_out), + bias; gradients reach weight and bias."""
    out = _SparseLinear.apply(x.crow_indices, x.col_indices, x.rows, x.values.to(weight.dtype), weight)
    return out if bias is None else out + bias


def _linear(x: torch.Tensor | SparseCounts, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return sparse_linear(x, weight, bias) if isinstance(x, SparseCounts) else F.linear(x, weight, bias)


class FCLayers(nn.Module):
    """n_layers fully-connected layers, (n, n_in) -> (n, n_out), with categorical covariates injected.

    n_categories: categories per covariate (a covariate with 1 category is ignored, as in scvi-tools);
    activation: the nonlinearity's class (scvi-tools' activation_fn; PeakVI's layers use LeakyReLU), None for
    none (scvi-tools' use_activation=False); bias: whether the Linear layers have one (scvi-tools' bias);
    sparse_input: the first layer mostly reads `SparseCounts` (its weight is then stored column-major).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_categories: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        activation: type[nn.Module] | None = nn.ReLU,
        bias: bool = True,
        sparse_input: bool = False,
    ):
        super().__init__()
        self.n_categories = [n if n > 1 else 0 for n in n_categories]
        n_cov = sum(self.n_categories)
        sizes = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.inject = [i == 0 or inject_covariates for i in range(n_layers)]
        self.layers = nn.ModuleList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            block: list[nn.Module] = [nn.Linear(a + n_cov * self.inject[i], b, bias=bias)]
            if use_batch_norm:
                block.append(nn.BatchNorm1d(b, momentum=0.01, eps=0.001))
            if use_layer_norm:
                block.append(nn.LayerNorm(b, elementwise_affine=False))
            if activation is not None:
                block.append(activation())
            if dropout_rate > 0:
                block.append(nn.Dropout(dropout_rate))
            self.layers.append(nn.Sequential(*block))
        if sparse_input:  # the same values stored column-major: W^T is contiguous for the sparse product's forward,
            # and its gradient (built as (X^T grad)^T) has the parameter's layout, so neither pass copies a transpose
            first = self.layers[0][0]
            first.weight = nn.Parameter(first.weight.detach().t().contiguous().t())

    def forward(self, x: torch.Tensor | SparseCounts, *codes: torch.Tensor) -> torch.Tensor:
        """x: (n, n_in), dense or `SparseCounts` (the first layer's product is then sparse x dense);
        codes: one (n,) or (n, 1) integer tensor per covariate.

        An injected layer computes Linear([x, one-hot]) as x @ W_x^T + b plus the one-hot's columns of W
        gathered per cell: the same value without building the concatenated input, and the features'
        product does not depend on how many covariate columns there are (scArches surgery adds some and
        leaves the reference cells' values exactly as they were).
        """
        for inject, layer in zip(self.inject, self.layers, strict=True):
            covariates = inject and sum(self.n_categories) > 0
            if covariates or isinstance(x, SparseCounts):
                linear = layer[0]
                n_in = x.shape[-1]
                # the whole weight when it has no covariate column: a slice's backward would copy the gradient
                weight = linear.weight if n_in == linear.weight.shape[1] else linear.weight[:, :n_in]
                x = _linear(x, weight, linear.bias)
                if covariates:
                    x = x + self._covariate_columns(linear.weight[:, n_in:], codes)
                for module in islice(layer, 1, None):  # the block's rest (slicing a Sequential builds one: ~15 us)
                    x = module(x)
            else:
                x = layer(x)
        return x

    def _covariate_columns(self, weight: torch.Tensor, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n, n_out): the sum over covariates of the weight column of each cell's category."""
        total, offset = None, 0
        for c, n in zip(codes, self.n_categories, strict=True):
            if n > 0:
                columns = weight[:, offset : offset + n].t()[c.long().view(-1)]
                total = columns if total is None else total + columns
                offset += n
        return total


class Encoder(nn.Module):
    """Gaussian q(z | x): (n, n_in) -> Normal over (n, n_out) and a reparametrised sample.

    The variance is var_activation(output) + var_eps (scvi-tools' default activation exp and eps 1e-4;
    var_activation "softplus" as DestVI's amortization encoder); activation: the hidden layers' nonlinearity,
    sparse_input: the input is mostly `SparseCounts` (see `FCLayers`).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_categories: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        var_eps: float = 1e-4,
        activation: type[nn.Module] = nn.ReLU,
        var_activation: Literal["exp", "softplus"] = "exp",
        sparse_input: bool = False,
    ):
        super().__init__()
        self.var_eps = var_eps
        self.var_activation = torch.exp if var_activation == "exp" else F.softplus
        self.encoder = FCLayers(
            n_in, n_hidden, n_categories, n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm,
            inject_covariates, activation, sparse_input=sparse_input,
        )  # fmt: skip
        self.mean_encoder = nn.Linear(n_hidden, n_out)
        self.var_encoder = nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor | SparseCounts, *codes: torch.Tensor) -> tuple[Normal, torch.Tensor]:
        """x: (n, n_in), dense or `SparseCounts`; codes: one (n,) integer tensor per covariate."""
        hidden = self.encoder(x, *codes)
        mean = self.mean_encoder(hidden)
        var = self.var_activation(self.var_encoder(hidden)) + self.var_eps
        distribution = Normal(mean, var.sqrt(), validate_args=False)  # activation(.) + var_eps > 0: no argument check
        return distribution, distribution.rsample()


class CountDecoder(nn.Module):
    """p(x | z, library): (n, n_in) -> per-gene expression fractions, means, and optional extra heads.

    Returns (scale, rate, dispersion, zi_logits): scale (n, n_genes) sums to 1 over genes (softmax);
    rate = exp(library) * scale; dispersion (log theta per cell) only with `cell_dispersion`;
    zi_logits only with `zero_inflation` (None otherwise, and no parameters are built for them).
    """

    def __init__(
        self,
        n_in: int,
        n_genes: int,
        n_categories: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 128,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        zero_inflation: bool = True,
        cell_dispersion: bool = False,
    ):
        super().__init__()
        self.px_decoder = FCLayers(
            n_in, n_hidden, n_categories, n_layers, n_hidden, 0.0, use_batch_norm, use_layer_norm, inject_covariates
        )
        self.px_scale_decoder = nn.Linear(n_hidden, n_genes)
        self.px_r_decoder = nn.Linear(n_hidden, n_genes) if cell_dispersion else None
        self.px_dropout_decoder = nn.Linear(n_hidden, n_genes) if zero_inflation else None

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, *codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """z: (n, n_in); library: (n, 1) log library size."""
        hidden = self.px_decoder(z, *codes)
        scale = torch.softmax(self.px_scale_decoder(hidden), dim=-1)
        rate = torch.exp(library) * scale
        dispersion = self.px_r_decoder(hidden) if self.px_r_decoder is not None else None
        zi_logits = self.px_dropout_decoder(hidden) if self.px_dropout_decoder is not None else None
        return scale, rate, dispersion, zi_logits


class LinearCountDecoder(nn.Module):
    """p(x | z, library) with a linear decoder (scvi-tools' LinearDecoderSCVI, LDVAE; Svensson et al. 2020):
    px_scale = softmax(BatchNorm(W [z, one-hot covariates] (+ b))), one layer, no activation, no dropout.

    The same outputs as `CountDecoder` (scale, rate, None, zi_logits): the dispersion is never per cell;
    zi_logits come from a second linear layer of the same form, built only with `zero_inflation`.
    """

    def __init__(
        self,
        n_in: int,
        n_genes: int,
        n_categories: Sequence[int] = (),
        use_batch_norm: bool = True,
        bias: bool = False,
        zero_inflation: bool = False,
    ):
        super().__init__()
        options = {"n_layers": 1, "dropout_rate": 0.0, "use_batch_norm": use_batch_norm, "activation": None}
        self.n_in, self.use_batch_norm = n_in, use_batch_norm
        self.factor_regressor = FCLayers(n_in, n_genes, n_categories, bias=bias, **options)
        self.px_dropout_decoder = (
            FCLayers(n_in, n_genes, n_categories, bias=bias, **options) if zero_inflation else None
        )

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, *codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor | None]:
        """z: (n, n_in); library: (n, 1) log library size."""
        scale = torch.softmax(self.factor_regressor(z, *codes), dim=-1)
        zi_logits = self.px_dropout_decoder(z, *codes) if self.px_dropout_decoder is not None else None
        return scale, torch.exp(library) * scale, None, zi_logits

    def loadings(self) -> torch.Tensor:
        """(n_genes, n_in) per-gene weights of the latent factors, the batch norm folded in as scvi-tools'
        LDVAE.get_loadings: diag(gamma / sqrt(running_var + eps)) W (the covariates' columns left out).

        In eval mode the decoder's pre-softmax output is then loadings @ z plus a term of the covariates alone.
        """
        block = self.factor_regressor.layers[0]
        weight = block[0].weight[:, : self.n_in]
        if self.use_batch_norm:
            norm = block[1]
            weight = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).unsqueeze(1) * weight
        return weight.detach()


class ProbabilityDecoder(nn.Module):
    """(n, n_in) -> (n, n_out) probabilities in (0, 1): FCLayers (no dropout), then Linear and a sigmoid.

    scvi-tools' PeakVI `Decoder` (its defaults: 2 layers, LeakyReLU, layer norm, covariates into the first
    layer only); PeakVI decodes region accessibility with it, and the cell's depth factor from the counts.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_categories: Sequence[int] = (),
        n_layers: int = 2,
        n_hidden: int = 128,
        use_batch_norm: bool = False,
        use_layer_norm: bool = True,
        inject_covariates: bool = False,
        activation: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        self.px_decoder = FCLayers(
            n_in, n_hidden, n_categories, n_layers, n_hidden, 0.0, use_batch_norm, use_layer_norm, inject_covariates,
            activation,
        )  # fmt: skip
        self.output = nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor, *codes: torch.Tensor) -> torch.Tensor:
        """x: (n, n_in); codes: one (n,) integer tensor per covariate. Returns (n, n_out) in (0, 1)."""
        return torch.sigmoid(self.output(self.px_decoder(x, *codes)))


class RNAProteinDecoder(nn.Module):
    """totalVI's decoder (scvi-tools' DecoderTOTALVI): z -> RNA fractions and protein background / foreground.

    Four hidden FCLayers from z (RNA, protein background, protein foreground, mixing), each followed by heads
    that see [hidden, z] and the covariates (one Linear each, scvi-tools' linear FCLayers):
    RNA: scale = softmax(.), rate = library * scale, zi_logits (only with `zero_inflation`);
    background: log rate ~ Normal(back_alpha, back_beta = softplus(.) + 1e-8), rate_back = exp(a draw);
    foreground: rate_fore = rate_back * (ReLU(.) + 1 + 1e-8); mixing: logits of P(background) per protein.
    """

    def __init__(
        self,
        n_in: int,
        n_genes: int,
        n_proteins: int,
        n_categories: Sequence[int] = (),
        n_layers: int = 1,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        zero_inflation: bool = False,
    ):
        super().__init__()

        def hidden() -> FCLayers:
            return FCLayers(
                n_in, n_hidden, n_categories, n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm
            )

        def head(n_out: int, activation: type[nn.Module] | None = None) -> FCLayers:
            options = {"dropout_rate": 0.0, "use_batch_norm": False, "activation": activation}
            return FCLayers(n_hidden + n_in, n_out, n_categories, n_layers=1, **options)

        self.px_decoder, self.px_scale_decoder = hidden(), head(n_genes)
        self.py_back_decoder, self.py_back_mean_log_alpha, self.py_back_mean_log_beta = (
            hidden(), head(n_proteins), head(n_proteins)
        )  # fmt: skip
        self.py_fore_decoder, self.py_fore_scale_decoder = hidden(), head(n_proteins, nn.ReLU)
        self.sigmoid_decoder, self.py_background_decoder = hidden(), head(n_proteins)
        self.px_dropout_decoder_gene = head(n_genes) if zero_inflation else None

    def forward(self, z: torch.Tensor, library: torch.Tensor, *codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """z: (n, n_in); library: (n, 1) library size (counts, not log). Returns scale, rate, zi_logits (or None),
        back_alpha, back_beta, log_rate_back (the draw), rate_back, fore_scale, rate_fore, mixing: (n, features)."""
        out: dict[str, torch.Tensor | None] = {}
        px = torch.cat([self.px_decoder(z, *codes), z], dim=-1)
        out["scale"] = torch.softmax(self.px_scale_decoder(px, *codes), dim=-1)
        out["rate"] = library * out["scale"]
        back = torch.cat([self.py_back_decoder(z, *codes), z], dim=-1)
        out["back_alpha"] = self.py_back_mean_log_alpha(back, *codes)
        out["back_beta"] = F.softplus(self.py_back_mean_log_beta(back, *codes)) + 1e-8
        out["log_rate_back"] = Normal(out["back_alpha"], out["back_beta"], validate_args=False).rsample()
        out["rate_back"] = torch.exp(out["log_rate_back"])
        fore = torch.cat([self.py_fore_decoder(z, *codes), z], dim=-1)
        out["fore_scale"] = self.py_fore_scale_decoder(fore, *codes) + 1 + 1e-8
        out["rate_fore"] = out["rate_back"] * out["fore_scale"]
        mixing = torch.cat([self.sigmoid_decoder(z, *codes), z], dim=-1)
        out["mixing"] = self.py_background_decoder(mixing, *codes)
        dropout = self.px_dropout_decoder_gene
        out["zi_logits"] = dropout(mixing, *codes) if dropout is not None else None
        return out
