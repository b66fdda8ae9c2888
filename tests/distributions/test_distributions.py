"""Count likelihoods against scipy.stats, from ordinary to extreme means and dispersions."""

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

from atlasvi.data import SparseCounts
from atlasvi.distributions import (
    NegativeBinomial,
    NegativeBinomialMixture,
    Poisson,
    ZeroInflatedNegativeBinomial,
    _broadcast_shape,
    _row_log_sum,
    nb_log_prob_rows,
)

MU = [1e-30, 1e-4, 0.1, 3.0, 50.0, 1e4]
THETA = [1e-3, 0.5, 10.0, 1e3, 1e6]
X = [0, 1, 2, 7, 100, 10_000]


def _grid():
    mu, theta, x = np.meshgrid(MU, THETA, X, indexing="ij")
    return mu.ravel(), theta.ravel(), x.ravel().astype(float)


def _nb_reference(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def _nb_exact(x, mu, theta) -> np.ndarray:
    """50-digit reference (scipy itself is off by ~1e-7 at theta = 1e6 and gives -inf at mu = 1e-30)."""
    mp.mp.dps = 50
    return np.array(
        [
            float(
                mp.loggamma(k + t)
                - mp.loggamma(t)
                - mp.loggamma(k + 1)
                + t * mp.log(mp.mpf(t) / (t + m))
                + k * mp.log(mp.mpf(m) / (t + m))
            )  # fmt: skip
            for k, m, t in zip(x, mu, theta, strict=True)
        ]
    )


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-9, 1e-9), (torch.float32, 1e-5, 2e-2)])
def test_negative_binomial_log_prob_is_exact_and_agrees_with_scipy(dtype, rtol, atol):
    mu, theta, x = _grid()
    got = NegativeBinomial(torch.tensor(mu, dtype=dtype), torch.tensor(theta, dtype=dtype)).log_prob(
        torch.tensor(x, dtype=dtype)
    )
    assert got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), _nb_exact(x, mu, theta), rtol=rtol, atol=atol)
    scipy_values = _nb_reference(x, mu, theta)
    finite = np.isfinite(scipy_values)
    assert finite.mean() > 0.8
    np.testing.assert_allclose(got.numpy()[finite], scipy_values[finite], rtol=max(rtol, 1e-6), atol=atol)


def test_negative_binomial_at_zero_mean_puts_all_mass_on_zero():
    dist = NegativeBinomial(torch.zeros(3, dtype=torch.float64), torch.tensor([0.1, 1.0, 1e5], dtype=torch.float64))
    assert torch.allclose(dist.log_prob(torch.zeros(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    assert (dist.log_prob(torch.ones(3, dtype=torch.float64)) < -10).all()


@pytest.mark.parametrize("zi_logit", [-8.0, -1.0, 0.0, 2.5])
def test_zero_inflated_negative_binomial_log_prob_is_the_scipy_mixture(zi_logit):
    mu, theta, x = _grid()
    pi = expit(zi_logit)
    nb = _nb_exact(x, mu, theta)
    expected = np.where(
        x == 0, logsumexp([np.full_like(nb, np.log(pi)), np.log1p(-pi) + nb], axis=0), np.log1p(-pi) + nb
    )
    got = ZeroInflatedNegativeBinomial(
        torch.tensor(mu), torch.tensor(theta), torch.full(mu.shape, zi_logit, dtype=torch.float64)
    ).log_prob(torch.tensor(x))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_poisson_is_scipy_poisson():
    rate, _, x = _grid()
    rate = rate[rate > 1e-20]
    x = x[: len(rate)]
    got = Poisson(torch.tensor(rate), validate_args=False).log_prob(torch.tensor(x))
    np.testing.assert_allclose(got.numpy(), stats.poisson.logpmf(x, rate), rtol=1e-9, atol=1e-9)


def test_gradients_are_finite_at_extremes():
    mu = torch.tensor([0.0, 1e-6, 1e4], requires_grad=True)
    theta = torch.tensor([1e-4, 1.0, 1e7], requires_grad=True)
    logits = torch.tensor([-20.0, 0.0, 20.0], requires_grad=True)
    x = torch.tensor([0.0, 3.0, 9000.0])
    ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(x).sum().backward()
    for tensor in (mu, theta, logits):
        assert torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("zi_logit", [None, -0.5])
def test_samples_match_mean_and_variance_and_follow_the_generator(zi_logit):
    mu = torch.tensor([0.5, 5.0, 80.0], dtype=torch.float64)
    theta = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float64)
    if zi_logit is None:
        dist = NegativeBinomial(mu, theta)
    else:
        dist = ZeroInflatedNegativeBinomial(mu, theta, torch.full_like(mu, zi_logit))
    draws = dist.sample((200_000,), generator=torch.Generator().manual_seed(0))
    again = dist.sample((200_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert (draws == draws.round()).all() and (draws >= 0).all()
    np.testing.assert_allclose(draws.mean(0).numpy(), dist.mean.numpy(), rtol=0.02)
    np.testing.assert_allclose(draws.var(0).numpy(), dist.variance.numpy(), rtol=0.05)


@pytest.mark.parametrize("logit", [-6.0, -0.7, 0.0, 3.0])
def test_negative_binomial_mixture_log_prob_is_the_scipy_mixture(logit):
    mu, theta, x = _grid()
    mu2 = mu * 7.5  # totalVI's foreground: the background scaled up
    keep = mu > 1e-20  # scipy's logpmf is -inf at mu = 1e-30
    mu, mu2, theta, x = mu[keep], mu2[keep], theta[keep], x[keep]
    pi = expit(logit)
    expected = logsumexp(
        [np.log(pi) + _nb_reference(x, mu, theta), np.log1p(-pi) + _nb_reference(x, mu2, theta)], axis=0
    )
    logits = torch.full(mu.shape, logit, dtype=torch.float64)
    got = NegativeBinomialMixture(torch.tensor(mu), torch.tensor(mu2), torch.tensor(theta), logits)
    finite = np.isfinite(expected)
    assert finite.mean() > 0.9
    values = got.log_prob(torch.tensor(x)).numpy()
    np.testing.assert_allclose(values[finite], expected[finite], rtol=1e-6, atol=1e-6)
    assert np.isfinite(values).all()


def test_negative_binomial_mixture_with_two_dispersions_and_its_samples():
    mu1 = torch.tensor([0.5, 4.0, 30.0], dtype=torch.float64)
    mu2 = torch.tensor([6.0, 40.0, 300.0], dtype=torch.float64)
    theta1 = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64)
    theta2 = torch.tensor([0.5, 2.0, 50.0], dtype=torch.float64)
    logits = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    dist = NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2)
    x = np.array([0.0, 12.0, 250.0])
    pi = expit(logits.numpy())
    expected = np.log(
        pi * stats.nbinom.pmf(x, theta1, theta1 / (theta1 + mu1))
        + (1 - pi) * stats.nbinom.pmf(x, theta2, theta2 / (theta2 + mu2))
    )
    np.testing.assert_allclose(dist.log_prob(torch.tensor(x)).numpy(), expected, rtol=1e-9)
    draws = dist.sample((200_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, dist.sample((200_000,), generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(draws.mean(0).numpy(), dist.mean.numpy(), rtol=0.02)


def _rows_case(theta_shape: str, underflow: bool, dtype: torch.dtype = torch.float64):
    """CSR counts and NB / ZINB parameters, 6 cells x 40 genes, at ordinary and extreme values (mu 0 and 1e4,
    theta 1e-4 and 1e7, logits +-20, a count of 9000 and one of 2.5, a cell without counts); `underflow`: pi and
    NB(0) both underflow at one entry (the exact softplus branch of `_NBRows`)."""
    generator = torch.Generator().manual_seed(0)
    n, g = 6, 40
    x = torch.poisson(torch.rand(n, g, generator=generator, dtype=dtype) * 3) * (
        torch.rand(n, g, generator=generator, dtype=dtype) < 0.3
    )
    x[0, 0], x[1, :] = 9000.0, 0.0  # a large count, and a cell without counts
    x[4, 5] = 2.5  # a count that is not an integer (the lgamma branch of the small counts' rising factorial)
    mu = torch.rand(n, g, generator=generator, dtype=dtype) * 5
    mu[0, 0], mu[0, 1], mu[2, 2], mu[3, 3] = 1e4, 0.0, 1e-6, 1e30
    theta = torch.rand(g if theta_shape == "gene" else (n, g), generator=generator, dtype=dtype) * 3 + 0.1
    theta.view(-1)[:3] = torch.tensor([1e-4, 1e7, 50.0], dtype=dtype)
    theta[..., 3] = 50.0  # with mu 1e30: NB(0) = exp(-2100) underflows
    logits = torch.randn(n, g, generator=generator, dtype=dtype) * 3
    logits[0, 2], logits[0, 3] = -20.0, 20.0
    logits[3, 3] = -800.0 if underflow else 0.0  # -800: pi and NB(0) both underflow at (3, 3)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), (x > 0).sum(1).cumsum(0)])
    return x, SparseCounts(crow, x.nonzero()[:, 1], x[x > 0], g), mu, theta, logits


@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
@pytest.mark.parametrize("underflow", [True, False])
def test_log_prob_rows_from_csr_counts_is_the_dense_sum_with_its_gradients(zero_inflated, theta_shape, underflow):
    """The fused per-row log-likelihood from CSR counts (hand-written gradient) vs log_prob(dense).sum(-1) through
    autograd, float64, at ordinary and extreme parameters, through the fast branch (exp2, logs of products) and the
    exact branch where pi and NB(0) both underflow."""
    x, counts, mu, theta, logits = _rows_case(theta_shape, underflow)
    n = x.shape[0]
    results = []
    for fused in (True, False):
        params = [t.clone().requires_grad_() for t in (mu, theta, logits)]
        m, t, z = params
        distribution = ZeroInflatedNegativeBinomial(m, t, z) if zero_inflated else NegativeBinomial(m, t)
        rows = distribution.log_prob_rows(counts) if fused else distribution.log_prob(x).sum(-1)
        weights = torch.arange(1.0, n + 1, dtype=torch.float64)
        (rows * weights).sum().backward()
        results.append((rows.detach(), *(p.grad for p in params[: 3 if zero_inflated else 2])))
    for got, expected in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "shapes",
    [[(6, 40), (40,), (6, 40)], [(6, 40), (6, 40)], [(6, 1), (1,)], [(6, 1), (40,)], [(40,), (6, 40)], [(6, 40), ()],
     [(3, 6, 40), (40,)], [(1, 40), (6, 1)], [(40,), (40,)]],
)  # fmt: skip
def test_the_rows_broadcast_their_parameters_as_torch(shapes):
    assert _broadcast_shape(*(torch.zeros(s) for s in shapes)) == torch.broadcast_shapes(*shapes)


@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_the_rows_hand_written_gradient_passes_gradcheck(zero_inflated, theta_shape):
    """torch.autograd.gradcheck (finite differences, float64) of the fused rows in mu, theta and the logits, at
    ordinary parameters (a small grid: every gene has zeros and non-zeros in some cell)."""
    generator = torch.Generator().manual_seed(1)
    n, g = 4, 18  # 18 genes: one product of 16 and two genes by their own log
    x = torch.poisson(torch.rand(n, g, generator=generator, dtype=torch.float64) * 4) * (
        torch.rand(n, g, generator=generator, dtype=torch.float64) < 0.5
    )
    x[0, 0] = 7.0  # above the rising-factorial table: the lgamma / digamma branch
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), (x > 0).sum(1).cumsum(0)])
    counts = SparseCounts(crow, x.nonzero()[:, 1], x[x > 0], g)
    mu = (torch.rand(n, g, generator=generator, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    theta_size = (g,) if theta_shape == "gene" else (n, g)
    theta = (torch.rand(theta_size, generator=generator, dtype=torch.float64) * 3 + 0.2).requires_grad_()
    logits = (torch.randn(n, g, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    inputs = (mu, theta, logits) if zero_inflated else (mu, theta)
    assert torch.autograd.gradcheck(lambda *p: nb_log_prob_rows(counts, *p), inputs)


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_the_rows_in_float32_equal_the_dense_float64_sum(zero_inflated):
    """In float32 (how models train) the fused rows and their gradients stay within float rounding of the dense
    log-likelihood evaluated in float64: rows to 1e-6 relative, gradients to 1e-5 of their largest entry."""
    x, counts, mu, theta, logits = _rows_case("gene", underflow=False)
    mu[0, 0], mu[3, 3], theta[1] = 30.0, 3.0, 30.0  # ordinary values (float32 cannot hold mu = 1e30's NB(0))
    results = []
    for dtype in (torch.float32, torch.float64):
        params = [t.to(dtype).requires_grad_() for t in (mu, theta, logits)]
        m, t, z = params
        distribution = ZeroInflatedNegativeBinomial(m, t, z) if zero_inflated else NegativeBinomial(m, t)
        if dtype == torch.float32:
            rows = distribution.log_prob_rows(
                SparseCounts(counts.crow_indices, counts.col_indices, counts.values.float(), 40)
            )
        else:
            rows = distribution.log_prob(x).sum(-1)
        rows.sum().backward()
        results.append([rows.detach().double(), *(p.grad.double() for p in params[: 3 if zero_inflated else 2])])
    (rows32, *grads32), (rows64, *grads64) = results
    torch.testing.assert_close(rows32, rows64, rtol=1e-6, atol=0)
    for got, expected in zip(grads32, grads64, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("smallest", [0.5, 1e-3, 1e-10, 1e-30])
@pytest.mark.parametrize("n_genes", [2000, 37, 7])
def test_row_log_sums_by_products_equal_the_sum_of_logs(smallest, n_genes):
    """`_row_log_sum` (logs of products of up to 16 entries, fewer where a product of 16 is subnormal) equals
    log(d).sum(-1) to float rounding, in float32 and float64, also where the genes do not divide into groups; None
    where an entry is below the smallest normal float."""
    generator = torch.Generator().manual_seed(2)
    for dtype, rtol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        d = torch.rand(5, n_genes, generator=generator, dtype=dtype) * (1 - smallest) + smallest
        d[2] = smallest  # a whole row: where 16 of them make a subnormal product, smaller groups
        got, expected = _row_log_sum(d), torch.log(d.double()).sum(-1)
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol)
        d[1, 2] = torch.finfo(dtype).tiny / 2
        assert _row_log_sum(d) is None
