"""Count likelihoods as `torch.distributions`, evaluated in log space and stable at extreme parameters.

NegativeBinomial(mu, theta): mean mu >= 0, inverse dispersion theta > 0 (variance mu + mu^2 / theta).
ZeroInflatedNegativeBinomial(mu, theta, zi_logits): with probability sigmoid(zi_logits) a structural zero.
NegativeBinomialMixture(mu1, mu2, theta1, mixture_logits, theta2=None): NB(mu1, theta1) with probability
sigmoid(mixture_logits), else NB(mu2, theta2 or theta1) (totalVI's protein background / foreground).
Poisson: torch's own (`torch.distributions.Poisson`), re-exported so models import likelihoods from here.

log Gamma(x + theta) - log Gamma(theta) is computed in float64: in float32 it loses every digit once
theta reaches ~1e5 (near-Poisson genes), which scvi-tools' float32 formula does.

`NegativeBinomial.log_prob_rows` (and the ZINB's) sums a cell's log-likelihood over genes from CSR counts
(`SparseCounts`) without densifying them: one fused pass over the (cells x genes) zero branch with its gradient
written by hand (a few passes instead of autograd's dozens), the x > 0 terms at the non-zeros only.
"""

import math

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Poisson, constraints

from atlasvi.data import SparseCounts

__all__ = [
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "log_mixture_nb",
    "log_nb_positive",
    "log_zinb_positive",
    "nb_log_prob_rows",
]


def _lgamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1), in float64."""
    x64, theta64 = x.double(), theta.double()
    return torch.lgamma(x64 + theta64) - torch.lgamma(theta64) - torch.lgamma(x64 + 1)


_SMALL_COUNT = 4  # integer counts up to this take the rising-factorial form in `_nonzero_gamma_terms`
_LOG_FACTORIAL = tuple(math.lgamma(k + 1) for k in range(_SMALL_COUNT + 1))


def _nonzero_gamma_terms(x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), (nnz,) float64; the entries of the lgamma fallback)
    at the stored counts x of a CSR matrix with their theta, both (nnz,) float64.

    An integer x <= _SMALL_COUNT (most non-zero counts) takes log(theta (theta + 1) ... (theta + x - 1)) - log x!:
    a few products and one log instead of two float64 lgammas (no overflow: theta < 3.4e38, 4 factors), and no
    cancellation where theta is large; any other x takes the lgammas. See `_nonzero_digamma_difference`.
    """
    product = theta.clone()
    for i in range(1, _SMALL_COUNT):
        product = torch.where(x > i, product * (theta + i), product)
    table = torch.tensor(_LOG_FACTORIAL, dtype=x.dtype, device=x.device)
    out = torch.log(product) - table[x.clamp(max=_SMALL_COUNT).long()]
    rest = ((x > _SMALL_COUNT) | (x < 1) | (x != torch.floor(x))).nonzero().squeeze(1)  # an explicit 0 too
    if len(rest):
        x_rest, theta_rest = x[rest], theta[rest]
        out[rest] = torch.lgamma(x_rest + theta_rest) - torch.lgamma(theta_rest) - torch.lgamma(x_rest + 1)
    return out, rest


def _nonzero_digamma_difference(x: torch.Tensor, theta: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """digamma(x + theta) - digamma(theta), (nnz,) float64, at non-zero counts: the sum of 1 / (theta + i) over
    i < x for the integer x <= _SMALL_COUNT, digamma at `rest` (from `_nonzero_gamma_terms`)."""
    total = theta.reciprocal()
    for i in range(1, _SMALL_COUNT):
        total = torch.where(x > i, total + (theta + i).reciprocal(), total)
    if len(rest):
        x_rest, theta_rest = x[rest], theta[rest]
        total[rest] = torch.digamma(x_rest + theta_rest) - torch.digamma(theta_rest)
    return total


def _log_mu(mu: torch.Tensor) -> torch.Tensor:
    """log mu, exact for every representable mu > 0 and finite at mu = 0 (no additive eps bias)."""
    return torch.log(mu.clamp_min(torch.finfo(mu.dtype).tiny))


def _log_nb_zero(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(0) = theta * log(theta / (theta + mu)), stable for large theta."""
    return -theta * torch.log1p(mu / theta)


def _nonzero_index(x: torch.Tensor) -> torch.Tensor:
    """Flat indices of x's non-zero entries."""
    return x.reshape(-1).nonzero().squeeze(1)


def _put(dense: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`dense` (in values' dtype) with `values` at the flat `index`."""
    return dense.to(values.dtype).reshape(-1).index_put((index,), values).view(dense.shape)


def _log_nb_nonzero(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mu, theta), elementwise (same shapes), the log-gamma ratio in float64."""
    value = _log_nb_zero(mu, theta) + x * (_log_mu(mu) - torch.log(theta + mu))
    return (value.double() + _lgamma_ratio(x, theta)).to(value.dtype)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mu, theta), elementwise (broadcast), in x's floating dtype.

    Where x = 0 the x terms and the log-gamma ratio are exactly 0, so they are evaluated at the non-zero
    counts only (a fraction of the cost on sparse counts, the same values).
    """
    x, mu, theta = torch.broadcast_tensors(x, mu, theta)
    index = _nonzero_index(x)
    nonzero = _log_nb_nonzero(*(torch.take(t, index) for t in (x, mu, theta)))
    return _put(_log_nb_zero(mu, theta), index, nonzero)


def log_zinb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """log ZINB(x; mu, theta, pi = sigmoid(zi_logits)), elementwise (broadcast); x > 0 terms at x > 0 only."""
    x, mu, theta, zi_logits = torch.broadcast_tensors(x, mu, theta, zi_logits)
    # x = 0: log(pi + (1 - pi) NB(0)) = softplus(-logits + log NB(0)) - softplus(-logits)
    negative_logits = -zi_logits
    zero = F.softplus(negative_logits + _log_nb_zero(mu, theta)) - F.softplus(negative_logits)
    # x > 0: log(1 - pi) + log NB(x) = -softplus(logits) + log NB(x)
    index = _nonzero_index(x)
    x, mu, theta, zi_logits = (torch.take(t, index) for t in (x, mu, theta, zi_logits))
    return _put(zero, index, -F.softplus(zi_logits) + _log_nb_nonzero(x, mu, theta))


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`grad` summed over the dimensions that broadcasting a tensor of `shape` expanded."""
    lead = grad.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1)
    return (grad.sum(dims, keepdim=True) if dims else grad).reshape(shape)


def _rising_tables(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gene and count k = 1.._SMALL_COUNT, from theta (n_genes,) float64: log(theta (theta + 1) ... (theta + k - 1))
    - log k! and the sum of 1 / (theta + i) over i < k, each (n_genes * _SMALL_COUNT,) float64 (gene-major).
    The same products and sums, in the same order, as `_nonzero_gamma_terms` and `_nonzero_digamma_difference` take
    per non-zero."""
    steps, log_factorial = _rising_constants(theta.dtype, theta.device)
    factors = theta.unsqueeze(1) + steps
    log_rising = torch.log(torch.cumprod(factors, 1)) - log_factorial
    return log_rising.view(-1), torch.cumsum(factors.reciprocal(), 1).view(-1)


_RISING_CONSTANTS: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _rising_constants(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(0, 1, .., _SMALL_COUNT - 1) and (log 1!, .., log _SMALL_COUNT!) in `dtype` on `device`, made once (they are
    read every step; never written)."""
    key = (dtype, device)
    if key not in _RISING_CONSTANTS:
        _RISING_CONSTANTS[key] = (
            torch.arange(_SMALL_COUNT, dtype=dtype, device=device),
            torch.tensor(_LOG_FACTORIAL[1:], dtype=dtype, device=device),
        )
    return _RISING_CONSTANTS[key]


def _gene_gamma_terms(
    x: torch.Tensor, log_rising: torch.Tensor, columns: torch.Tensor, theta_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """`_nonzero_gamma_terms` where theta is per gene: the integer counts <= _SMALL_COUNT read the per-gene table
    `log_rising` (`_rising_tables`) instead of computing per non-zero; the others take the lgammas.
    x: (nnz,) counts; columns: (nnz,) their genes; theta_k: (nnz,) their theta. Returns (the terms (nnz,) float64,
    the table slot of each non-zero, (the entries of the lgamma fallback, their x + theta and theta in float64))
    for `_gene_digamma_difference`."""
    below = x - 1
    small = below.clamp(0, _SMALL_COUNT - 1)  # the table's column: count - 1
    slot = columns * _SMALL_COUNT + small.long()
    out = log_rising.index_select(0, slot)
    rest = (below != small.floor()).nonzero().squeeze(1)  # x > _SMALL_COUNT, not an integer, or < 1
    if not len(rest):
        return out, slot, (rest,)
    x_rest, theta_rest = x[rest].double(), theta_k[rest].double()
    x_theta = x_rest + theta_rest
    out[rest] = torch.lgamma(x_theta) - torch.lgamma(theta_rest) - torch.lgamma(x_rest + 1)
    return out, slot, (rest, x_theta, theta_rest)


def _gene_digamma_difference(
    digamma_table: torch.Tensor, slot: torch.Tensor, rest: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """`_nonzero_digamma_difference` where theta is per gene: the table of `_rising_tables`, digamma at the
    lgamma fallback's entries (`rest` from `_gene_gamma_terms`)."""
    total = digamma_table.index_select(0, slot)
    if len(rest) > 1:
        index, x_theta, theta_rest = rest
        total[index] = torch.digamma(x_theta) - torch.digamma(theta_rest)
    return total


def _broadcast_shape(*tensors: torch.Tensor) -> torch.Size:
    """torch.broadcast_shapes of the tensors' shapes, without its ~25 us of Python per call where they are equal or
    one is a trailing vector (every NB / ZINB row sum of the scVI family)."""
    first = tensors[0].shape
    if first and all(t.shape == first or (t.dim() == 1 and t.shape[0] in (first[-1], 1)) for t in tensors[1:]):
        return first
    return torch.broadcast_shapes(*(t.shape for t in tensors))


def _at(t: torch.Tensor, shape: torch.Size, index: torch.Tensor) -> torch.Tensor:
    """t broadcast to `shape`, at the flat `index` (torch.take's values; index_select is the faster gather)."""
    return t.expand(shape).reshape(-1).index_select(0, index)


_LOG2_E = 1 / math.log(2)
_GROUP = 16  # the zero branch's log(D) row sums: one log per product of up to this many D's (`_row_log_sum`)


def _row_log_sum(d: torch.Tensor) -> torch.Tensor | None:
    """sum over the last dimension of log d, for d in [0, 1] (n, n_genes), as the logs of products of k <= _GROUP
    entries (one log per group instead of one per entry: a log costs ~8 simple passes over the grid here): equal to
    log(d).sum(-1) to float rounding (k - 1 roundings per product). k = _GROUP where every product is a normal float
    (the factors are <= 1, so then every partial product is too), else the largest k whose smallest possible product
    smallest(d)^k stays normal. None where an entry of d is below the smallest normal float."""
    tiny = torch.finfo(d.dtype).tiny
    n = d.shape[-1]
    k = _GROUP
    if n >= k:
        total = _grouped_log_sum(d, k)
        if total[1].min().item() > tiny:
            return total[0]
    smallest = d.min().item()
    if not smallest > tiny:
        return None
    while k > 1 and k * math.log(smallest) < math.log(tiny) + 1:
        k //= 2
    return torch.log(d).sum(-1) if k == 1 or n < k else _grouped_log_sum(d, k)[0]


def _grouped_log_sum(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the last dimension of log d by products of k entries, the products)."""
    n = d.shape[-1]
    m = n // k
    products = d[..., : k * m].unflatten(-1, (k, m)).prod(-2)
    total = torch.log(products).sum(-1)
    return (total if k * m == n else total + torch.log(d[..., k * m :]).sum(-1)), products


class _NBRows(torch.autograd.Function):
    """Per-row sums of log NB / log ZINB over genes, from CSR counts: (n,) in mu's dtype.

    Every entry: the zero branch Z = log(pi + (1 - pi) NB(0)) (ZINB; pi = sigmoid(zi)) or log NB(0) = b =
    -theta log1p(mu / theta) (NB), computed as log(s + (1 - s) e^b) with s = sigmoid(zi) (exactly
    softplus(b - zi) - softplus(-zi) where that would underflow); at the non-zeros the row sum takes
    P - Z with P = log(1 - pi) + log NB(x) (the log-gamma ratio and its digamma gradient in float64, by
    `_nonzero_gamma_terms`, or per gene by `_gene_gamma_terms` where theta is per gene).
    e^b is taken as 2^(b / ln 2) with 1 / ln 2 folded into -theta (exp2 costs about half of exp here), and the
    row sums of Z = log D by `_row_log_sum` (logs of products of D): both equal the plain forms to float rounding.
    Gradients by hand: dZ/dzi = s / D - s, dZ/db = (1 - s) e^b / D = 1 - s / D with D = s + (1 - s) e^b (both
    made in the forward, in the buffers of s and D); db/dmu = -1 / (1 + r), db/dtheta = r / (1 + r) - log1p(r),
    r = mu / theta; at the non-zeros dP/dzi = -s, dP/dmu = db/dmu + x theta / (mu (theta + mu)),
    dP/dtheta = db/dtheta - x / (theta + mu) + digamma(x + theta) - digamma(theta). A per-gene theta's gradient (its
    sum over cells) is one matrix-vector product of the grid's dtheta terms with the incoming row weights.
    The non-zeros are gathered with index_select and written with scatter_ (each index once), ~2-3x faster than
    take / index_put_ at a minibatch's ~20K non-zeros.
    """

    @staticmethod
    def forward(ctx, mu, theta, zi_logits, flat_index, rows, columns, x, offsets):
        shape = _broadcast_shape(mu, theta, *(() if zi_logits is None else (zi_logits,)))
        per_gene = theta.numel() == shape[-1]  # theta (n_genes,): the non-zeros' gamma terms from per-gene tables
        r = mu / theta
        log1p_r = torch.log1p(r)
        grad_zi = grad_b = s_k = None
        if zi_logits is None:
            zero = log1p_r * theta.neg()  # b = -(log1p_r theta), the same bits (negation is exact)
            total = zero.sum(-1) if zero.shape == shape else zero.expand(shape).sum(-1)
        else:
            s = torch.sigmoid(zi_logits)
            zi_k = _at(zi_logits, shape, flat_index)
            s_k = torch.sigmoid(zi_k)
            d = log1p_r * (theta * -_LOG2_E)
            d = torch.exp2(d, out=d)  # e^b
            # D = e^b + s (1 - e^b) = s + (1 - s) e^b, in e^b's buffer where it has D's shape
            d = d.lerp_(s.new_ones(()), s) if d.shape == shape else torch.lerp(d, s.new_ones(()), s)
            if d.shape == shape:
                total = _row_log_sum(d)
            else:
                total = torch.log(d).expand(shape).sum(-1) if d.min().item() > torch.finfo(d.dtype).tiny else None
            if total is not None:
                d_k = _at(d, shape, flat_index)
                if zi_k.min().item() > -80:  # s normal: -Z - softplus(zi) = log(s / D) - zi, one log at the non-zeros
                    zi_terms_k = torch.log(s_k / d_k).sub_(zi_k)
                else:
                    zi_terms_k = -(torch.log(d_k) + F.softplus(zi_k))
                q = torch.div(s, d, out=d)  # s / D (D's buffer: D is not needed again)
            else:  # both pi and NB(0) underflow somewhere: the softplus form is exact there
                b = log1p_r * theta.neg()
                zero = F.softplus(b - zi_logits) - F.softplus(-zi_logits)
                q = torch.sigmoid(zi_logits - b)  # s / D without dividing by an underflowed D
                total = zero.sum(-1) if zero.shape == shape else zero.expand(shape).sum(-1)
                zi_terms_k = -(_at(zero, shape, flat_index) + F.softplus(zi_k))
            # what the backward needs of s and q, in their buffers where the shapes allow: dZ/dzi and dZ/db
            grad_zi = torch.sub(q, s, out=s) if s.shape == q.shape else q - s
            grad_b = torch.sub(q.new_ones(()), q, out=q)
        mu_k = _at(mu, shape, flat_index)
        if per_gene:
            theta_k = theta.reshape(-1).index_select(0, columns)
            log_rising, digamma_table = _rising_tables(theta.reshape(-1).double())
            ratio, slot, rest = _gene_gamma_terms(x, log_rising, columns, theta_k)
        else:
            theta_k, slot, digamma_table = _at(theta, shape, flat_index), None, None
            ratio, rest = _nonzero_gamma_terms(x.double(), theta_k.double())
        r_k = mu_k / theta_k  # the non-zeros' r and log1p(r): computed (the grid's bits), not gathered
        log1p_k = torch.log1p(r_k)
        # P - Z: log NB(x) - log NB(0) (b cancels), and for the ZINB b - Z - softplus(zi)
        tiny = torch.finfo(mu.dtype).tiny
        mu_c = mu_k.clamp_min(tiny)  # log mu is clamped at tiny (`_log_mu`)
        value = x * (torch.log(mu_c) - torch.log(theta_k + mu_k))
        if zi_logits is not None:
            value = value.add_(zi_terms_k).addcmul_(log1p_k, theta_k, value=-1)
        total = total + torch.segment_reduce((value.double() + ratio).to(value.dtype), "sum", offsets=offsets)
        ctx.save_for_backward(mu, theta, zi_logits, flat_index, rows, columns, x, r, log1p_r, grad_zi, grad_b)
        ctx.nonzero = (mu_k, mu_c, theta_k, r_k, log1p_k, s_k, slot, rest, digamma_table)
        ctx.shape = shape
        return total

    @staticmethod
    def backward(ctx, grad):
        mu, theta, zi_logits, flat_index, rows, columns, x, r, log1p_r, zi_terms, grad_b = ctx.saved_tensors
        mu_k, mu_c, theta_k, r_k, log1p_k, s_k, slot, rest, digamma_table = ctx.nonzero
        shape = ctx.shape
        inverse = r.add(1).reciprocal_()  # theta / (theta + mu)
        # -db/dtheta = log1p(r) - r / (1 + r) in one pass; mu's and theta's gradients are built negated (-dZ/dmu,
        # -dZ/dtheta, ...) and scaled by -grad: the same values, fewer passes
        negative_theta = torch.addcmul(log1p_r, r, inverse, value=-1)
        negative_mu = inverse
        if grad_b is not None:
            negative_theta = negative_theta.mul_(grad_b) if negative_theta.shape == shape else negative_theta * grad_b
            negative_mu = inverse.mul_(grad_b) if inverse.shape == shape else grad_b * inverse
        negative_mu, negative_theta = negative_mu.expand(shape).contiguous(), negative_theta.expand(shape).contiguous()
        inverse_k = r_k.add(1).reciprocal_()
        over_mu = torch.where(mu_k >= torch.finfo(mu.dtype).tiny, x / mu_c, 0)  # log mu is clamped at tiny
        negative_mu.view(-1).scatter_(0, flat_index, torch.addcmul(inverse_k, over_mu, inverse_k, value=-1))
        if slot is None:
            digamma = _nonzero_digamma_difference(x.double(), theta_k.double(), rest)
        else:
            digamma = _gene_digamma_difference(digamma_table, slot, rest)
        # -dP/dtheta = log1p(r) - digamma difference + (x - mu) / (theta (1 + r))
        negative_dtheta = torch.addcmul(log1p_k - digamma.to(mu.dtype), (x - mu_k).div_(theta_k), inverse_k)
        negative_theta.view(-1).scatter_(0, flat_index, negative_dtheta)
        scale = grad.unsqueeze(-1)
        grad_mu = _sum_to(negative_mu.mul_(-scale), mu.shape)
        if theta.dim() == 1 and len(shape) == 2 and theta.shape[0] == shape[1]:  # per gene: sum over cells by mv
            grad_theta = torch.mv(negative_theta.t(), grad).neg_()
        else:
            grad_theta = _sum_to(negative_theta.mul_(-scale), theta.shape)
        grad_zi = None
        if zi_terms is not None:
            grad_zi = (zi_terms * scale).expand(shape).contiguous()
            grad_zi.view(-1).scatter_(0, flat_index, s_k * grad.index_select(0, rows).neg_())
            grad_zi = _sum_to(grad_zi, zi_logits.shape)
        return grad_mu, grad_theta, grad_zi, None, None, None, None, None


def nb_log_prob_rows(
    counts: SparseCounts, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """(n,) sum over genes of log NB(x; mu, theta) (zi_logits None) or log ZINB(x; mu, theta, zi_logits), x the
    CSR `counts` (n, n_genes); mu, theta, zi_logits broadcast to (n, n_genes). The same values as
    `log_nb_positive(x, ...).sum(-1)` / `log_zinb_positive(x, ...).sum(-1)` (to float rounding), without x dense."""
    x = counts.values.to(mu.dtype)
    rows, offsets = counts.rows, counts.crow_indices
    return _NBRows.apply(mu, theta, zi_logits, counts.flat_index, rows, counts.col_indices, x, offsets)


def log_mixture_nb(
    x: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta1: torch.Tensor,
    mixture_logits: torch.Tensor,
    theta2: torch.Tensor | None = None,
) -> torch.Tensor:
    """log(pi NB(x; mu1, theta1) + (1 - pi) NB(x; mu2, theta2)), pi = sigmoid(mixture_logits), elementwise
    (broadcast); theta2 None: theta1 (scvi-tools' log_mixture_nb, with this module's exact NB terms)."""
    log_nb1 = log_nb_positive(x, mu1, theta1)
    log_nb2 = log_nb_positive(x, mu2, theta1 if theta2 is None else theta2)
    # log pi = -softplus(-l); log(1 - pi) = -l - softplus(-l)
    mixture_logits = mixture_logits.to(log_nb1.dtype)
    return torch.logaddexp(log_nb1, log_nb2 - mixture_logits) - F.softplus(-mixture_logits)


class NegativeBinomial(Distribution):
    """Negative binomial with mean `mu` and inverse dispersion `theta` (scvi-tools' parametrisation)."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = False):
        self._unbroadcast = getattr(self, "_unbroadcast", None) or (mu, theta, None)
        self.mu, self.theta = torch.broadcast_tensors(mu, theta)
        super().__init__(self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_nb_positive(value, self.mu, self.theta)

    def log_prob_rows(self, counts: SparseCounts) -> torch.Tensor:
        """(n,) log_prob summed over the last dimension, for CSR counts (see `nb_log_prob_rows`)."""
        return nb_log_prob_rows(counts, *self._unbroadcast)

    def sample(self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None):
        """Gamma-Poisson draws; `generator` makes them reproducible."""
        with torch.no_grad():
            shape = self._extended_shape(torch.Size(sample_shape))
            rate = _gamma(self.theta.expand(shape), generator) * (self.mu / self.theta).expand(shape)
            return torch.poisson(rate, generator=generator)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB with structural zeros of probability sigmoid(`zi_logits`)."""

    arg_constraints = {
        "mu": constraints.greater_than_eq(0),
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }

    def __init__(
        self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, validate_args: bool | None = False
    ):
        self._unbroadcast = (mu, theta, zi_logits)  # the fused log_prob_rows reduces gradients itself
        mu, theta, self.zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)
        super().__init__(mu, theta, validate_args=validate_args)

    @property
    def zi_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.zi_probs) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        pi = self.zi_probs
        return (1 - pi) * self.mu * (self.mu + self.theta + pi * self.mu * self.theta) / self.theta

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits)

    def sample(self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None):
        with torch.no_grad():
            counts = super().sample(sample_shape, generator)
            keep = torch.rand(counts.shape, generator=generator, device=counts.device) >= self.zi_probs.expand(
                counts.shape
            )
            return counts * keep


class NegativeBinomialMixture(Distribution):
    """Two-component NB mixture: NB(mu1, theta1) with probability sigmoid(`mixture_logits`), else NB(mu2, theta2)
    (theta2 None: theta1). totalVI's protein counts: component 1 the background, component 2 the foreground."""

    arg_constraints = {
        "mu1": constraints.greater_than_eq(0),
        "mu2": constraints.greater_than_eq(0),
        "theta1": constraints.positive,
        "mixture_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu1: torch.Tensor,
        mu2: torch.Tensor,
        theta1: torch.Tensor,
        mixture_logits: torch.Tensor,
        theta2: torch.Tensor | None = None,
        validate_args: bool | None = False,
    ):
        tensors = (mu1, mu2, theta1, mixture_logits) + (() if theta2 is None else (theta2,))
        broadcast = torch.broadcast_tensors(*tensors)
        self.mu1, self.mu2, self.theta1, self.mixture_logits = broadcast[:4]
        self.theta2 = broadcast[4] if theta2 is not None else None
        super().__init__(self.mu1.shape, validate_args=validate_args)

    @property
    def mixture_probs(self) -> torch.Tensor:
        """P(component 1) = sigmoid(mixture_logits)."""
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        pi = self.mixture_probs
        return pi * self.mu1 + (1 - pi) * self.mu2

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_mixture_nb(value, self.mu1, self.mu2, self.theta1, self.mixture_logits, self.theta2)

    def sample(self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None):
        """The component by a Bernoulli draw, then a Gamma-Poisson draw from it; `generator` makes them reproducible."""
        with torch.no_grad():
            shape = self._extended_shape(torch.Size(sample_shape))
            first = torch.rand(shape, generator=generator, device=self.mu1.device) < self.mixture_probs.expand(shape)
            mu = torch.where(first, self.mu1.expand(shape), self.mu2.expand(shape))
            theta2 = self.theta1 if self.theta2 is None else self.theta2
            theta = torch.where(first, self.theta1.expand(shape), theta2.expand(shape))
            return torch.poisson(_gamma(theta, generator) * mu / theta, generator=generator)


def _gamma(concentration: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(concentration, 1) draws with an explicit generator (Marsaglia-Tsang, vectorised)."""
    boost = concentration < 1
    alpha = torch.where(boost, concentration + 1, concentration)
    d = alpha - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    todo = torch.ones_like(alpha, dtype=torch.bool)
    while todo.any():
        z = torch.randn(alpha.shape, generator=generator, device=alpha.device, dtype=alpha.dtype)
        u = torch.rand(alpha.shape, generator=generator, device=alpha.device, dtype=alpha.dtype)
        v = (1 + c * z) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = todo & accept
        out[take] = (d * v)[take]
        todo = todo & ~accept
    if boost.any():
        u = torch.rand(alpha.shape, generator=generator, device=alpha.device, dtype=alpha.dtype)
        out = torch.where(boost, out * u ** (1.0 / concentration), out)
    return out
