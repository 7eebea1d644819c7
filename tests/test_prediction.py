import numpy as np
import pytest
import torch

from frugaldiff.components import build_network, unet_keys
from frugaldiff.config import Config
from frugaldiff.errors import FrugalError
from frugaldiff.networks import Denoiser
from frugaldiff.noise import PROCESSES, Flow, VPLinear
from frugaldiff.prediction import LINEAR_TYPES, PREDICTIONS, LinearPrediction, register_linear_prediction

DEGENERATE = {("flow", "acceleration"), ("vp-cosine", "acceleration")}
PAIRS = [(p, k) for p in PROCESSES.names() for k in LINEAR_TYPES if (p, k) not in DEGENERATE]


def _batch(process, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01).clamp(max=process.t_max)
    x0 = 0.5 * torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return t, x0, eps, process.add_noise(x0, eps, t)


@pytest.mark.parametrize("process_name,kind", PAIRS)
def test_true_target_converts_back_exactly(process_name, kind):
    process = PROCESSES.create(process_name)
    pred = PREDICTIONS.create(kind, process, 0.5)
    t, x0, eps, x_t = _batch(process)
    x0_hat = pred.to_x0(pred.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.to_eps(x0_hat, x_t, t), eps, rtol=0, atol=1e-10)


@pytest.mark.parametrize("process_name,kind", PAIRS)
def test_targets_have_unit_variance(process_name, kind):
    process = PROCESSES.create(process_name)
    pred = PREDICTIONS.create(kind, process, 0.5)
    g = torch.Generator().manual_seed(1)
    t = torch.full((200_000,), 0.37, dtype=torch.float64)
    x0 = 0.5 * torch.randn(200_000, generator=g, dtype=torch.float64)
    eps = torch.randn(200_000, generator=g, dtype=torch.float64)
    assert pred.target(x0, eps, t).std().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("process_name,kind", PAIRS)
def test_error_times_factor_is_x0_error(process_name, kind):
    """A²·(F-space error) equals the x0-space error of the same output."""
    process = PROCESSES.create(process_name)
    pred = PREDICTIONS.create(kind, process, 0.5)
    t, x0, eps, x_t = _batch(process)
    out = pred.target(x0, eps, t) + 0.1 * torch.randn(x0.shape, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(2))
    x0_err = (pred.to_x0(out, x_t, t) - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(pred.error(out, x0, eps, t).double() * pred.x0_factor(t), x0_err,
                               rtol=1e-5, atol=1e-12)


def test_amplification_matches_reference_table():
    process = VPLinear()
    t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=torch.float64)
    expected = {
        "eps": [0.174, 0.720, 3.413, 58.83],
        "x0": [0.5, 0.5, 0.5, 0.5],
        "v": [0.170, 0.504, 0.534, 0.500],
        "velocity": [0.170, 0.504, 0.534, 0.500],
        "acceleration": [0.718, 1.429, 0.773, 0.501],
    }
    for kind, values in expected.items():
        got = PREDICTIONS.create(kind, process, 0.5).amplification(t)
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-3, atol=6e-4)


@pytest.mark.parametrize("process_name", ["vp-linear", "vp-cosine"])
def test_velocity_points_like_v_on_vp_paths(process_name):
    process = PROCESSES.create(process_name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    a_vel, b_vel, c_vel = PREDICTIONS.create("velocity", process, 0.5).scaled_coefficients(t)
    a_v, b_v, c_v = PREDICTIONS.create("v", process, 0.5).scaled_coefficients(t)
    torch.testing.assert_close(a_vel * b_v - b_vel * a_v, torch.zeros_like(t), rtol=0, atol=1e-9)  # parallel
    assert bool(torch.all(a_vel / c_vel * a_v / c_v + b_vel / c_vel * b_v / c_v > 0.999))  # same way round


def test_velocity_on_flow_is_eps_minus_x0():
    pred = PREDICTIONS.create("velocity", Flow(), 0.5)
    t, x0, eps, _ = _batch(Flow())
    _, _, c = pred.scaled_coefficients(t)
    torch.testing.assert_close(pred.target(x0, eps, t) * c[:, None, None, None], eps - x0)


@pytest.mark.parametrize("process_name", ["flow", "vp-cosine"])
def test_acceleration_is_refused_where_degenerate(process_name):
    with pytest.raises(FrugalError) as e:
        Config({"diffusion.prediction": "acceleration", "diffusion.process": process_name})
    message = str(e.value)
    assert f"'{process_name}'" in message and "'acceleration'" in message and "vp-linear" in message
    assert "\n" not in message


def test_degenerate_pair_is_refused_with_one_line():
    with pytest.raises(FrugalError) as e:
        LinearPrediction(PROCESSES.create("flow"), 0.5, lambda p, t: (torch.zeros_like(t), torch.zeros_like(t)),
                         name="zero")
    message = str(e.value)
    assert "'zero'" in message and "'flow'" in message and "\n" not in message


def test_user_registered_pair_works_everywhere():
    register_linear_prediction("half_x0_half_eps", lambda p, t: (0.5 * torch.ones_like(t), 0.5 * torch.ones_like(t)))
    try:
        pred = PREDICTIONS.create("half_x0_half_eps", VPLinear(), 0.5)
        t, x0, eps, x_t = _batch(VPLinear())
        torch.testing.assert_close(pred.to_x0(pred.target(x0, eps, t), x_t, t), x0, rtol=0, atol=1e-11)
    finally:
        PREDICTIONS._entries.pop("half_x0_half_eps")
        LINEAR_TYPES.remove("half_x0_half_eps")


def test_denoiser_scales_input_to_unit_variance():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t, labels=None):
            seen["std"] = x.std().item()
            return torch.zeros_like(x)

    process = VPLinear()
    denoiser = Denoiser(Probe(), PREDICTIONS.create("eps", process, 0.5))
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(4096, 8, generator=g)
    t = torch.full((4096,), 0.1)
    x_t = process.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    denoiser(x_t, t)
    assert seen["std"] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(("side", "expected"), [
    (8, {"channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "attention_resolutions": []}),
    (28, {"channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "attention_resolutions": [7]}),
    (32, {"channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "attention_resolutions": [8]}),
    (64, {"channels": 32, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attention_resolutions": [8]}),
    (128, {"channels": 32, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attention_resolutions": [8]}),
])
def test_presets_give_the_documented_unets_and_keys_override_them(side, expected):
    config = Config()
    assert unet_keys(config, side) == expected
    assert unet_keys(Config({"model.channels": 24, "model.preset": "small"}), side)["channels"] == 24
    if side in (32, 64):
        net = build_network(config, PREDICTIONS.create("velocity", PROCESSES.create("flow"), 0.5), (3, side, side))
        x = torch.randn(2, 3, side, side)
        assert net(x, torch.rand(2)).shape == x.shape


# ---- blend: one head, a t-dependent target between two types ------------------------------------------------

BLEND_PAIRS = [("vp-linear", ["velocity", "x0"]), ("vp-linear", ["eps", "x0"]), ("flow", ["velocity", "x0"]),
               ("vp-cosine", ["v", "x0"]), ("vp-linear", ["acceleration", "velocity"])]


@pytest.mark.parametrize(("process_name", "types"), BLEND_PAIRS)
def test_blend_target_converts_back_exactly_on_a_dense_t_grid(process_name, types):
    process = PROCESSES.create(process_name)
    pred = PREDICTIONS.create("blend", process, 0.5, types=types, weights=[0.9, 0.1, 0.6, 0.3, 1.0, 0.0])
    t = torch.linspace(process.t_min, process.t_max, 4001, dtype=torch.float64)
    _, x0, eps, _ = _batch(process, n=4001)
    x_t = process.add_noise(x0, eps, t)
    x0_hat = pred.to_x0(pred.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-11)
    torch.testing.assert_close(pred.to_eps(x0_hat, x_t, t), eps, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("process_name", "types"), BLEND_PAIRS)
def test_blend_with_a_pure_types_weights_is_that_type(process_name, types):
    process = PROCESSES.create(process_name)
    t = torch.linspace(process.t_min, process.t_max, 1001, dtype=torch.float64)
    _, x0, eps, _ = _batch(process, n=1001)
    x_t = process.add_noise(x0, eps, t)
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for weights, pure in (([0.0], types[0]), ([0.0, 0.0, 0.0], types[0]), ([1.0, 1.0], types[1])):
        blend = PREDICTIONS.create("blend", process, 0.5, types=types, weights=weights)
        single = PREDICTIONS.create(pure, process, 0.5)
        sign = torch.sign(blend.determinant(t) * single.determinant(t))  # the second type oriented like the first
        torch.testing.assert_close(blend.target(x0, eps, t), bcast_like(sign, x0) * single.target(x0, eps, t),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(blend.to_x0(bcast_like(sign, out) * out, x_t, t), single.to_x0(out, x_t, t),
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(blend.amplification(t), single.amplification(t), rtol=1e-12, atol=0)


def test_blend_x0_is_the_lambda_average_of_the_two_types_estimates():
    """Outputs o1, o2 of the two types, blended as the target is, give λ·x̂0(o2) + (1 − λ)·x̂0(o1)."""
    process = VPLinear()
    weights = [0.2, 0.7, 0.5, 0.95]
    blend = PREDICTIONS.create("blend", process, 0.5, types=["velocity", "x0"], weights=weights)
    first, second = (PREDICTIONS.create(k, process, 0.5) for k in ("velocity", "x0"))
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_t, o1, o2 = (torch.randn(99, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lam = torch.from_numpy(np.interp(t.numpy(), [0.125, 0.375, 0.625, 0.875], weights))
    (a1, b1, c1), (a2, b2, c2), (a, b, c) = (k.scaled_coefficients(t) for k in (first, second, blend))
    sign = torch.sign(first.determinant(t) * second.determinant(t))
    # the target's share of the second type: (a, b) = (1 − w)(a1, b1)/c1 + w·sign·(a2, b2)/c2
    w = (b - b1 / c1) / (sign * b2 / c2 - b1 / c1)
    out = ((1 - w)[:, None] * o1 + w[:, None] * sign[:, None] * o2) / c[:, None]
    expected = (1 - lam)[:, None] * first.to_x0(o1, x_t, t) + lam[:, None] * second.to_x0(o2, x_t, t)
    torch.testing.assert_close(blend.to_x0(out, x_t, t), expected, rtol=0, atol=1e-10)


def bcast_like(v, x):
    return v.reshape(-1, *[1] * (x.dim() - 1))


def test_blend_refuses_bad_types_and_weights():
    for values, message in (({"diffusion.blend.types": ["x0"]}, "exactly two"),
                            ({"diffusion.blend.types": ["x0", "mixed"]}, "two linear types"),
                            ({"diffusion.blend.weights": [0.5, 1.5]}, "numbers in \\[0, 1\\]")):
        with pytest.raises(FrugalError, match=message) as info:
            PREDICTIONS.create("blend", VPLinear(), 0.5, **{k.split(".")[-1]: v for k, v in values.items()})
        assert "\n" not in str(info.value)
