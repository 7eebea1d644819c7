import pytest
import torch

from frugaldiff.noise import PROCESSES, NoiseProcess, VPLinear, ddpm_alphas_cumprod

T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_ddpm_grid_matches_vp_linear():
    alphas_cumprod = ddpm_alphas_cumprod(1000, 1e-4, 0.02)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    assert (VPLinear().alpha(t) ** 2 - alphas_cumprod).abs().max() < 1e-3


@pytest.mark.parametrize("name", PROCESSES.names())
@pytest.mark.parametrize("fn", ["d_alpha", "d_sigma", "dd_alpha", "dd_sigma"])
def test_closed_form_derivatives_match_autograd(name, fn):
    process = PROCESSES.create(name)
    base = fn.split("_")[1]
    numeric = NoiseProcess._derivative(process, base, T, fn.count("d"))
    torch.testing.assert_close(getattr(process, fn)(T), numeric, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PROCESSES.names())
def test_endpoints_and_log_snr(name):
    process = PROCESSES.create(name)
    zero = torch.zeros(1, dtype=torch.float64)
    assert process.alpha(zero).item() == pytest.approx(1.0, abs=1e-12)
    assert process.sigma(zero).item() == pytest.approx(0.0, abs=1e-12)
    assert process.alpha(torch.tensor([process.t_max])).item() < 0.01
    lam = process.log_snr(T)
    torch.testing.assert_close(lam, 2 * torch.log(process.alpha(T) / process.sigma(T)), rtol=1e-10, atol=1e-10)
    assert bool(torch.all(lam[1:] < lam[:-1])), "log-SNR must fall with t"


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine"])
def test_vp_paths_preserve_variance(name):
    process = PROCESSES.create(name)
    a, s = process.alpha(T), process.sigma(T)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(T), rtol=0, atol=1e-12)
    # α·α' + σ·σ' = 0 on every VP path
    torch.testing.assert_close(a * process.d_alpha(T) + s * process.d_sigma(T), torch.zeros_like(T), rtol=0, atol=1e-10)


def test_user_process_gets_derivatives_by_autograd():
    class Quadratic(NoiseProcess):
        def alpha(self, t):
            return 1 - t**2

        def sigma(self, t):
            return t

    p = Quadratic()
    torch.testing.assert_close(p.d_alpha(T), -2 * T)
    torch.testing.assert_close(p.dd_alpha(T), torch.full_like(T, -2.0))
    torch.testing.assert_close(p.dd_sigma(T), torch.zeros_like(T))
