import math

import pytest
import torch
from scipy.stats import multivariate_normal

from frugaldiff.components import build_data
from frugaldiff.datasets import load_dataset
from frugaldiff.diagnostics import excess_x0_error
from frugaldiff.gmm import GMM_COMPONENTS, GMM_DIM, GaussianMixture, gmm_mixture
from frugaldiff.noise import PROCESSES

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full(dim: int = 4, components: int = 3) -> GaussianMixture:
    return GaussianMixture.random(dim, components, seed=1, diagonal=False)


def _noisy(mixture: GaussianMixture, alpha: float, sigma: float, n: int = 2000):
    """(x0, x_t, α, σ) for n mixture samples at one noise level."""
    x0, _ = mixture.sample(n, _gen(3))
    a, s = torch.full((n,), alpha, dtype=F64), torch.full((n,), sigma, dtype=F64)
    return x0, a[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=_gen(4), dtype=F64), a, s


@pytest.mark.parametrize("diagonal", [True, False])
def test_random_is_seeded_and_valid(diagonal):
    m = GaussianMixture.random(dim=6, components=4, seed=5, diagonal=diagonal)
    again = GaussianMixture.random(dim=6, components=4, seed=5, diagonal=diagonal)
    assert torch.equal(m.covs, again.covs) and torch.equal(m.means, again.means)
    assert m.weights.sum().item() == pytest.approx(1) and (m.weights > 0).all()
    assert (torch.linalg.eigvalsh(m.covs) > 0).all()
    assert diagonal == bool((m.covs == torch.diag_embed(m.covs.diagonal(dim1=-2, dim2=-1))).all())
    assert 0.5 < m.covariance().diagonal().mean().sqrt() < 1


def test_sample_moments_match():
    m = _full()
    x, labels = m.sample(100_000, _gen())
    assert x.dtype == F64 and x.shape == (100_000, 4) and labels.max() < 3
    torch.testing.assert_close(torch.bincount(labels).double() / len(x), m.weights, atol=0.01, rtol=0)
    torch.testing.assert_close(x.mean(0), m.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), m.covariance(), atol=0.015, rtol=0)


def test_log_prob_exact():
    m = _full()
    x, _ = m.sample(50, _gen())
    single = GaussianMixture(torch.ones(1, dtype=F64), m.means[:1], m.covs[:1])
    scipy_lp = multivariate_normal(m.means[0].numpy(), m.covs[0].numpy()).logpdf(x.numpy())
    torch.testing.assert_close(single.log_prob(x), torch.from_numpy(scipy_lp))
    brute = torch.stack(
        [
            math.log(w) + torch.distributions.MultivariateNormal(mu, c).log_prob(x)
            for w, mu, c in zip(m.weights.tolist(), m.means, m.covs, strict=True)
        ]
    ).logsumexp(0)
    torch.testing.assert_close(m.log_prob(x), brute)


def test_posterior_mean_single_gaussian_closed_form():
    m = _full(components=1)
    x0, x_t, a, s = _noisy(m, 0.6, 0.8, n=20)
    mu, cov = m.means[0], m.covs[0]
    gain = 0.6 * cov @ torch.linalg.inv(0.36 * cov + 0.64 * torch.eye(4, dtype=F64))
    torch.testing.assert_close(m.posterior_mean(x_t, a, s), mu + (x_t - 0.6 * mu) @ gain.T)


def test_posterior_mean_limits():
    m = _full()
    _, x_t, a, s = _noisy(m, 0.7, 1e-9, n=50)
    torch.testing.assert_close(m.posterior_mean(x_t, a, s), x_t / 0.7)
    _, x_t, a, s = _noisy(m, 1e-12, 1.0, n=50)
    torch.testing.assert_close(m.posterior_mean(x_t, a, s), m.mean().expand(50, -1))


def test_bayes_error_beats_baselines():
    m = GaussianMixture.random(dim=8, components=5, seed=2)
    x0, x_t, a, s = _noisy(m, 0.8, 0.6, n=4000)
    bayes = m.bayes_error(x0, x_t, a, s).mean()
    gaussian = GaussianMixture(torch.ones(1, dtype=F64), m.mean()[None], m.covariance()[None])
    moment_matched = (gaussian.posterior_mean(x_t, a, s) - x0).pow(2).mean()
    identity = (x_t / 0.8 - x0).pow(2).mean()
    assert bayes < 0.8 * moment_matched and moment_matched < identity


@pytest.mark.parametrize("name", PROCESSES.names())
def test_excess_error_zero_for_bayes_positive_for_perturbed(name):
    process = PROCESSES.create(name)
    m = GaussianMixture.random(dim=4, components=3, seed=0)
    x0, _ = m.sample(256, _gen())

    def bayes(x_t, t):
        return m.posterior_mean(x_t, process.alpha(t), process.sigma(t))

    def run(denoise, dtype=F64):
        return excess_x0_error(denoise, m, process, x0, bins=5, generator=_gen(7), model_dtype=dtype)

    exact = run(bayes)
    assert len(exact["edges"]) == 6 and exact["edges"][-1] == 1
    assert all(math.isfinite(v) and v > 0 for v in exact["bayes"])
    assert max(map(abs, exact["excess"])) < 1e-12
    assert max(map(abs, run(bayes, torch.float32)["excess"])) < 1e-5
    perturbed = run(lambda x_t, t: bayes(x_t, t) + 0.05)
    assert min(perturbed["excess"]) > 0 and perturbed["bayes"] == exact["bayes"]
    assert len(excess_x0_error(bayes, m, process, x0, bins=2, per_bin=10, generator=_gen())["model"]) == 2


def test_gmm_dataset():
    data = load_dataset("gmm", num_samples=500, heldout_fraction=0.2, seed=3)
    assert data.kind == "vector" and data.train.dtype == torch.float32
    assert data.train.shape == (500, GMM_DIM) and data.heldout.shape == (100, GMM_DIM)
    assert data.train_labels.shape == (500,) and data.heldout_labels.max() < GMM_COMPONENTS
    again = load_dataset("gmm", num_samples=500, heldout_fraction=0.2, seed=3)
    assert torch.equal(data.train, again.train) and torch.equal(data.heldout_labels, again.heldout_labels)
    assert not torch.equal(data.train, load_dataset("gmm", num_samples=500, seed=4).train)
    # the data follow their seed's mixture, not another seed's
    x = data.train.double()
    assert gmm_mixture(3).log_prob(x).mean() > gmm_mixture(4).log_prob(x).mean() + 10


def test_gmm_config_keys_shape_the_dataset() -> None:
    from frugaldiff.config import Config
    config = Config().updated({"data.name": "gmm", "data.num_samples": 64, "data.gmm_dim": 3,
                               "data.gmm_components": 2, "data.gmm_covariance": "full", "data.seed": 5})
    data = build_data(config)
    assert data.train.shape == (64, 3) and int(data.train_labels.max()) <= 1
    mixture = gmm_mixture(5, 3, 2, "full")
    assert not torch.allclose(mixture.covs, torch.diag_embed(torch.diagonal(mixture.covs, dim1=1, dim2=2)))
    assert torch.equal(gmm_mixture(5, 3, 2, "diagonal").covs,
                       torch.diag_embed(torch.diagonal(gmm_mixture(5, 3, 2).covs, dim1=1, dim2=2)))


def test_gmm_bad_covariance_is_one_line() -> None:
    from frugaldiff.errors import FrugalError

    with pytest.raises(FrugalError, match="covariance 'dense'.*diagonal, full"):
        gmm_mixture(0, covariance="dense")
