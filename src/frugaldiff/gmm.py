"""Gaussian mixtures: exact density, samples and the Bayes-optimal denoiser E[x0 | x_t].

For x_t = α·x0 + σ·ε and component j, x_t is Gaussian with mean α·μ_j and covariance α²Σ_j + σ²I. Writing
Σ_j = U_j diag(λ_j) U_jᵀ, that covariance is U_j diag(α²λ_j + σ²) U_jᵀ for every (α, σ), so densities and
posterior means need one eigendecomposition per component, computed once, and no per-sample solves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .errors import FrugalError

GMM_DIM = 16  # dimension and components of the registered "gmm" dataset
GMM_COMPONENTS = 8
GMM_COVARIANCES = ("diagonal", "full")


@dataclass
class GaussianMixture:
    """Mixture of K Gaussians in D dimensions: weights [K], means [K, D], covariances [K, D, D] (float64)."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    @classmethod
    def random(cls, dim: int = 16, components: int = 8, seed: int = 0, diagonal: bool = True) -> GaussianMixture:
        """A seeded random mixture: means ~ N(0, 0.75²I), component stds 0.15–0.4 along random axes
        (the coordinate axes when ``diagonal``), weights ∝ U(1, 2). Overall per-coordinate std ≈ 0.8."""
        if dim < 1 or components < 1:
            raise FrugalError(f"a mixture needs dim ≥ 1 and components ≥ 1, got dim={dim}, components={components}")
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        weights = 1 + torch.rand(components, generator=g, dtype=f64)
        means = 0.75 * torch.randn(components, dim, generator=g, dtype=f64)
        stds = 0.15 + 0.25 * torch.rand(components, dim, generator=g, dtype=f64)
        axes = torch.eye(dim, dtype=f64).expand(components, dim, dim)
        if not diagonal:
            axes = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=f64)).Q
        covs = axes @ torch.diag_embed(stds**2) @ axes.mT
        return cls(weights / weights.sum(), means, (covs + covs.mT) / 2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @cached_property
    def _eigh(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues [K, D] and eigenvectors [K, D, D] of the component covariances."""
        return torch.linalg.eigh(self.covs.to(torch.float64))

    def mean(self) -> Tensor:
        """The mixture mean [D]."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """The mixture covariance [D, D]."""
        centred = self.means - self.mean()
        return torch.einsum("k,kde->de", self.weights, self.covs + centred[:, :, None] * centred[:, None, :])

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` points [n, D] (float64) and their component labels [n] (int64)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[labels] + (chol[labels] @ z[:, :, None]).squeeze(-1), labels

    def components(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """log w_j + log N(x_t; α·μ_j, α²Σ_j + σ²I) [n, K] and E[x0 | x_t, j] [n, K, D], α and σ per sample."""
        x_t = x_t.to(torch.float64)
        a, s = (v.to(torch.float64).reshape(-1, 1, 1) for v in (alpha, sigma))
        lam, u = self._eigh
        y = torch.einsum("kdi,nd->nki", u, x_t) - a * torch.einsum("kdi,kd->ki", u, self.means)  # Uᵀ(x_t − αμ)
        var = a**2 * lam + s**2  # [n, K, D]
        log_density = -0.5 * (y**2 / var + torch.log(var) + math.log(2 * math.pi)).sum(-1)
        posterior = self.means + torch.einsum("kdi,nki->nkd", u, a * lam / var * y)
        return torch.log(self.weights) + log_density, posterior

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact mixture log-density [n] of points ``x`` [n, D]."""
        ones = torch.ones(len(x), dtype=torch.float64)
        return torch.logsumexp(self.components(x, ones, 0 * ones)[0], dim=1)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The Bayes-optimal denoiser E[x0 | x_t] [n, D] (float64) for x_t = α·x0 + σ·ε, α and σ [n]."""
        log_joint, posterior = self.components(x_t, alpha, sigma)
        return torch.einsum("nk,nkd->nd", torch.softmax(log_joint, dim=1), posterior)

    def bayes_error(self, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Per-sample squared error ‖E[x0 | x_t] − x0‖² / D [n] of the Bayes-optimal denoiser."""
        return (self.posterior_mean(x_t, alpha, sigma) - x0.to(torch.float64)).pow(2).mean(-1)


def gmm_mixture(seed: int, dim: int = GMM_DIM, components: int = GMM_COMPONENTS,
                covariance: str = "diagonal") -> GaussianMixture:
    """The mixture behind dataset "gmm" (``data.seed``, ``data.gmm_dim``, ``data.gmm_components``,
    ``data.gmm_covariance``)."""
    if covariance not in GMM_COVARIANCES:
        raise FrugalError(f"unknown gmm covariance {covariance!r}; choose one of: {', '.join(GMM_COVARIANCES)}")
    return GaussianMixture.random(dim, components, seed, diagonal=covariance == "diagonal")
