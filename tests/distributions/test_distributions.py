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


@pytest.mark.parametrize("zero_inflated", [True, False])
@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
def test_log_prob_rows_from_csr_counts_is_the_dense_sum_with_its_gradients(zero_inflated, theta_shape):
    """The fused per-row log-likelihood from CSR counts (hand-written gradient) vs log_prob(dense).sum(-1) through
    autograd, float64, at ordinary and extreme parameters (mu 0 and 1e4, theta 1e-4 and 1e7, logits +-20, and
    pi and NB(0) both underflowing: the exact branch)."""
    generator = torch.Generator().manual_seed(0)
    n, g = 6, 40
    x = torch.poisson(torch.rand(n, g, generator=generator, dtype=torch.float64) * 3) * (
        torch.rand(n, g, generator=generator, dtype=torch.float64) < 0.3
    )
    x[0, 0], x[1, :] = 9000.0, 0.0  # a large count, and a cell without counts
    x[4, 5] = 2.5  # a count that is not an integer (the lgamma branch of the small counts' rising factorial)
    mu = torch.rand(n, g, generator=generator, dtype=torch.float64) * 5
    mu[0, 0], mu[0, 1], mu[2, 2], mu[3, 3] = 1e4, 0.0, 1e-6, 1e30
    theta = torch.rand(g if theta_shape == "gene" else (n, g), generator=generator, dtype=torch.float64) * 3 + 0.1
    theta.view(-1)[:3] = torch.tensor([1e-4, 1e7, 50.0], dtype=torch.float64)
    theta[..., 3] = 50.0  # with mu 1e30: NB(0) = exp(-2100) underflows
    logits = torch.randn(n, g, generator=generator, dtype=torch.float64) * 3
    logits[0, 2], logits[0, 3], logits[3, 3] = -20.0, 20.0, -800.0  # (3, 3): pi and NB(0) underflow
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), (x > 0).sum(1).cumsum(0)])
    counts = SparseCounts(crow, x.nonzero()[:, 1], x[x > 0], g)
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
