import inspect
import io
import math

import pytest
import torch

from frugaldiff.errors import FrugalError
from frugaldiff.noise import PROCESSES, Flow, VPLinear
from frugaldiff.prediction import PREDICTIONS, LinearPrediction
from frugaldiff.weighting import WEIGHTINGS, LearnedUncertainty

SIGMA_DATA = 0.5
FIXED = [n for n in WEIGHTINGS.names() if n not in ("none", "learned")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _on(process):
    """A prediction type on ``process``: the weightings other than none depend on its process alone."""
    return PREDICTIONS.create("x0", process, SIGMA_DATA)


def _grid(process, n=257, dtype=torch.float64):
    return torch.linspace(process.t_min, process.t_max, n, dtype=dtype)


def test_registered_names_and_keyword_only_typed_parameters():
    assert set(WEIGHTINGS.names()) == {"none", "snr", "min_snr", "soft_min_snr", "p2", "edm", "debias",
                                       "sigma_sqrt", "flow_loss", "cosmap", "sigmoid", "speed", "type_loss", "learned"}
    defaults = {}
    for name in WEIGHTINGS.names():
        for param in inspect.signature(WEIGHTINGS.get(name)).parameters.values():
            assert param.kind is param.KEYWORD_ONLY and param.annotation in ("float", "int", "bool", "str")
            assert type(param.default).__name__ == param.annotation
            defaults[f"{name}.{param.name}"] = param.default
    assert defaults == {"min_snr.gamma": 5.0, "min_snr.plus_one": True, "soft_min_snr.gamma": 5.0, "p2.k": 1.0,
                        "p2.gamma": 1.0,
                        "edm.sigma_data": 0.5, "learned.features": 32, "flow_loss.clip": 0.05, "sigmoid.bias": 2.0,
                        "speed.lam": 0.6, "speed.tau_log_snr": -5.0, "type_loss.prediction": "x0"}


# Hand-computed from the anchors' formulas on VP-linear, where SNR(0.1) = 8.641543 (> 5), SNR(0.3) = 0.656543
# (< 5); σ̃ = σ/α; s = σ/(α + σ) is SD3's σ.
HAND_VP = [
    ("snr", {}, [8.641543268, 0.656542988]),
    ("min_snr", {}, [5.0, 1.656542988]),  # min(SNR + 1, 5)
    ("min_snr", {"plus_one": False}, [5.0, 0.656542988]),  # min(SNR, 5), as published
    ("soft_min_snr", {}, [3.167362775, 0.580339431]),  # 1/(1/SNR + 1/5)
    ("p2", {}, [0.896282164, 0.396333203]),  # SNR·1/(1 + SNR)
    ("p2", {"k": 2.0, "gamma": 0.5}, [2.649042959, 0.402814174]),  # SNR·1/(2 + SNR)^0.5
    ("edm", {}, [12.641543268, 4.656542988]),  # (σ̃² + 0.25)/(0.5·σ̃)²
    ("edm", {"sigma_data": 1.0}, [9.641543268, 1.656542988]),
    ("debias", {}, [2.939650195, 0.810273403]),  # SNR·1/√SNR
    ("sigma_sqrt", {}, [240.896587860, 10.739317526]),  # s⁻²·s⁻²
    ("cosmap", {}, [15.906118622, 4.127186513]),  # 2/(π(1 − 2s + 2s²))·s⁻²
    ("sigmoid", {}, [3.983185315, 0.602967277]),  # SNR·sigmoid(2 − λ) = e²·sigmoid(λ − 2), λ = ln SNR
    ("sigmoid", {"bias": -3.0}, [0.049501870, 0.046277729]),
]


@pytest.mark.parametrize("name,params,expected", HAND_VP)
def test_hand_computed_values_on_vp_linear(name, params, expected):
    w = WEIGHTINGS.create(name, **params).x0_weight(_on(VPLinear()), torch.tensor([0.1, 0.3], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=0)


@pytest.mark.parametrize("name,expected", [
    ("sigma_sqrt", [256.0, 16.0, 2.44140625]),  # σ⁻² on the flow-matching loss, σ⁻² more to x0: t⁻⁴
    ("cosmap", [16.297466173, 5.092958179, 1.462821168]),  # 2/(π(1 − 2t + 2t²))·t⁻²
])
def test_sd3_weightings_on_the_flow_path(name, expected):
    w = WEIGHTINGS.create(name).x0_weight(_on(Flow()), torch.tensor([0.25, 0.5, 0.8], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=0)


def test_flow_loss_is_the_velocity_loss_clipped_at_small_noise():
    """On the flow path s = t: x0 weight 1/t², and 1/clip² below the clip, so an x0 model trained with it has the
    velocity type's own objective (JiT's)."""
    process, t = Flow(), torch.tensor([0.01, 0.05, 0.25, 0.5, 0.8], dtype=torch.float64)
    w = WEIGHTINGS.create("flow_loss").x0_weight(_on(process), t)
    torch.testing.assert_close(w, torch.tensor([400.0, 400.0, 16.0, 4.0, 1.5625], dtype=torch.float64), rtol=1e-9,
                               atol=0)
    velocity = PREDICTIONS.create("velocity", process, SIGMA_DATA)
    t = torch.linspace(0.05, 1.0, 97, dtype=torch.float64)
    torch.testing.assert_close(WEIGHTINGS.create("flow_loss").x0_weight(_on(process), t) * velocity.x0_factor(t),
                               torch.full_like(t, float(velocity.x0_factor(t[:1]) / t[0] ** 2)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("process", [VPLinear(), Flow()], ids=["vp-linear", "flow"])
def test_type_loss_trains_any_type_with_the_named_types_per_t_loss_scale(process):
    """type_loss(x0): the x0 weight of a direct x0 prediction (1/A_x0² = 1/σ_d²) whatever the model's type, so an
    ε or blend model's loss is its x0-space error exactly as an x0 model's own loss counts it."""
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    weighting, x0 = WEIGHTINGS.create("type_loss"), PREDICTIONS.create("x0", process, SIGMA_DATA)
    blend = PREDICTIONS.create("blend", process, SIGMA_DATA, types=["velocity", "x0"], weights=[0.1, 0.9])
    for model in (PREDICTIONS.create("velocity", process, SIGMA_DATA), blend, x0):
        torch.testing.assert_close(weighting.x0_weight(model, t), torch.full_like(t, SIGMA_DATA ** -2), rtol=1e-12,
                                   atol=0)
    g = torch.Generator().manual_seed(0)
    x0_true, eps = torch.randn(49, 3, generator=g, dtype=torch.float64), torch.randn(49, 3, generator=g,
                                                                                    dtype=torch.float64)
    x_t = process.alpha(t)[:, None] * x0_true + process.sigma(t)[:, None] * eps
    out = blend.target(x0_true, eps, t) + 0.1 * torch.randn(49, 3, generator=g, dtype=torch.float64)
    unit_error = (out - blend.target(x0_true, eps, t)).pow(2).mean(1)
    x0_error = (blend.to_x0(out, x_t, t) - x0_true).pow(2).mean(1)
    torch.testing.assert_close(weighting.weigh(unit_error, blend, t), x0_error / SIGMA_DATA ** 2, rtol=1e-9, atol=0)
    velocity = WEIGHTINGS.create("type_loss", prediction="velocity").x0_weight(x0, t)  # another named type
    torch.testing.assert_close(velocity, 1 / PREDICTIONS.create("velocity", process, SIGMA_DATA).x0_factor(t))
    with pytest.raises(FrugalError, match="weighting.type_loss.prediction' must be a linear type"):
        WEIGHTINGS.create("type_loss", prediction="mixed")


def test_speed_weighting_reproduces_speeds_weights_on_ddpms_linear_schedule():
    """SpeeD (lam 0.6): ε weights 0.409, 0.539, 0.599, 0.577, 0.516, 0.458, 0.423 at its steps 0, 100, …, 600 of
    1,000 (from Speed_IDDPM's normalised d(1 − ᾱ)/dt), 1 in the convergence area (step ≥ 700)."""
    weighting, process = WEIGHTINGS.create("speed"), VPLinear()
    t = torch.tensor([0.001, 0.101, 0.201, 0.301, 0.401, 0.501, 0.601, 0.8, 0.99], dtype=torch.float64)
    expected = [0.409, 0.539, 0.599, 0.577, 0.516, 0.458, 0.423, 1.0, 1.0]
    torch.testing.assert_close(weighting.eps_weight(process, t), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=0.012)
    snr = process.log_snr(t).exp()
    torch.testing.assert_close(weighting.x0_weight(_on(process), t), weighting.eps_weight(process, t) * snr)


@pytest.mark.parametrize("name,sd3_weight", [
    ("sigma_sqrt", lambda t: t**-2),
    ("cosmap", lambda t: 2 / (math.pi * (1 - 2 * t + 2 * t**2))),
])
def test_sd3_weightings_multiply_the_raw_flow_matching_loss(name, sd3_weight):
    """On the flow path, the objective of any type equals SD3's weight times ‖v̂ − (ε − x0)‖²."""
    process = Flow()
    velocity = LinearPrediction(process, SIGMA_DATA, lambda p, t: (p.d_alpha(t), p.d_sigma(t)), name="velocity")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x0 = SIGMA_DATA * torch.randn(64, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 8, generator=g, dtype=torch.float64)
    x_t = process.add_noise(x0, eps, t)
    x0_hat = x0 + 0.1 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    v_hat = (x_t - x0_hat) / t[:, None]  # x_t = x0 + t·v on the flow path
    raw = (v_hat - (eps - x0)).pow(2).mean(1)
    weighting = WEIGHTINGS.create(name)
    for pred in (velocity, *(PREDICTIONS.create(k, process, SIGMA_DATA) for k in ("eps", "x0", "v"))):
        out = pred.target(x0_hat, pred.to_eps(x0_hat, x_t, t), t)
        torch.testing.assert_close(weighting.weigh(pred.error(out, x0, eps, t), pred, t),
                                   sd3_weight(t) * raw, rtol=1e-4, atol=0)


@pytest.mark.parametrize("process_name", PROCESSES.names())
@pytest.mark.parametrize("name", FIXED)
def test_every_prediction_type_gives_the_same_objective(process_name, name):
    """A weighting is in x0 space: the same x̂0 gives weight·x0-MSE whichever type produced it."""
    process = PROCESSES.create(process_name)
    weighting = WEIGHTINGS.create(name)
    g = torch.Generator().manual_seed(1)
    t = process.clamp(torch.rand(64, generator=g, dtype=torch.float64))
    x0 = SIGMA_DATA * torch.randn(64, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 8, generator=g, dtype=torch.float64)
    x_t = process.add_noise(x0, eps, t)
    x0_hat = x0 + 0.1 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    expected = weighting.x0_weight(_on(process), t) * (x0_hat - x0).pow(2).mean(1)
    for kind in ("eps", "x0", "v"):
        pred = PREDICTIONS.create(kind, process, SIGMA_DATA)
        out = pred.target(x0_hat, pred.to_eps(x0_hat, x_t, t), t)
        error = pred.error(out, x0, eps, t)  # error() rounds the output to float32
        torch.testing.assert_close(weighting.weigh(error, pred, t), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("process_name", PROCESSES.names())
def test_snr_weighting_is_the_eps_types_own_loss(process_name):
    process = PROCESSES.create(process_name)
    t = _grid(process)
    eps_type = PREDICTIONS.create("eps", process, SIGMA_DATA)
    multiplier = WEIGHTINGS.create("snr").x0_weight(_on(process), t) * eps_type.x0_factor(t)
    torch.testing.assert_close(multiplier, torch.ones_like(t), rtol=1e-9, atol=0)


def test_x0_type_none_versus_snr():
    """x0 type: own loss is x0 weight 1/σ_d²; snr rescales it by SNR·σ_d² (the ε-MSE)."""
    process = VPLinear()
    t = _grid(process)
    x0_type = PREDICTIONS.create("x0", process, SIGMA_DATA)
    none = WEIGHTINGS.create("none")
    torch.testing.assert_close(none.x0_weight(x0_type, t), 1 / x0_type.x0_factor(t), rtol=0, atol=0)
    error = torch.rand_like(t)
    assert torch.equal(none.weigh(error, x0_type, t), error)  # exactly the type's own loss
    torch.testing.assert_close(x0_type.x0_factor(t), torch.full_like(t, SIGMA_DATA**2), rtol=1e-12, atol=0)
    multiplier = WEIGHTINGS.create("snr").x0_weight(_on(process), t) * x0_type.x0_factor(t)
    torch.testing.assert_close(multiplier, process.log_snr(t).exp() * SIGMA_DATA**2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("process_name", PROCESSES.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_min_snr_with_v_does_not_vanish_at_high_t(process_name, dtype):
    """The diffusers bug: min-SNR-5 on v went to zero at high t. By default the multiplier on v's own loss is
    min(SNR + 1, 5)·A_v², i.e. v's raw loss capped at 5: at high t it tends to A_v² ≈ σ_d², not to zero."""
    process = PROCESSES.create(process_name)
    t = torch.tensor([0.99, 0.999, process.t_max], dtype=dtype).clamp(max=process.t_max)
    v_type = PREDICTIONS.create("v", process, SIGMA_DATA)
    snr = process.log_snr(t).exp()
    multiplier = WEIGHTINGS.create("min_snr").x0_weight(_on(process), t) * v_type.x0_factor(t)
    torch.testing.assert_close(multiplier, (snr + 1) * v_type.x0_factor(t))  # SNR + 1 < 5 there
    assert bool(torch.all(multiplier > 0.9 * SIGMA_DATA**2)), multiplier
    if process_name.startswith("vp"):  # on the raw v-MSE (variance c²): min(SNR + 1, 5)/(SNR + 1) = 1
        c2 = process.alpha(t) ** 2 + process.sigma(t) ** 2 * SIGMA_DATA**2
        torch.testing.assert_close(multiplier, c2)
    published = WEIGHTINGS.create("min_snr", plus_one=False)  # Hang et al. as published: follows SNR down
    torch.testing.assert_close(published.x0_weight(_on(process), t) * v_type.x0_factor(t), snr * v_type.x0_factor(t))
    eps_type = PREDICTIONS.create("eps", process, SIGMA_DATA)  # and keeps the ε type's own weight 1 there
    torch.testing.assert_close(published.x0_weight(_on(process), t) * eps_type.x0_factor(t), torch.ones_like(t))


ALL_PARAMS = [(n, {}) for n in FIXED] + [("min_snr", {"gamma": 1.0}), ("soft_min_snr", {"gamma": 20.0}),
                                          ("p2", {"k": 0.1, "gamma": 0.5}), ("edm", {"sigma_data": 1.0})]


@pytest.mark.parametrize("process_name", PROCESSES.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_and_multipliers_are_finite_and_positive_everywhere(process_name, dtype):
    process = PROCESSES.create(process_name)
    t = _grid(process, 1001, dtype)
    preds = [PREDICTIONS.create(k, process, SIGMA_DATA) for k in ("eps", "x0", "v")]
    for name, params in ALL_PARAMS:
        w = WEIGHTINGS.create(name, **params).x0_weight(_on(process), t)
        assert w.shape == t.shape and w.dtype == dtype
        for values in (w, *(w * p.x0_factor(t) for p in preds)):
            assert bool(torch.all(torch.isfinite(values) & (values > 0))), (name, params)


@pytest.mark.parametrize("name,params,key", [
    ("min_snr", {"gamma": 0.0}, "min_snr.gamma"),
    ("min_snr", {"gamma": -5.0}, "min_snr.gamma"),
    ("min_snr", {"gamma": math.nan}, "min_snr.gamma"),
    ("soft_min_snr", {"gamma": math.inf}, "soft_min_snr.gamma"),
    ("p2", {"k": 0.0}, "p2.k"),
    ("p2", {"gamma": -0.5}, "p2.gamma"),
    ("edm", {"sigma_data": 0.0}, "edm.sigma_data"),
    ("learned", {"features": 0}, "learned.features"),
    ("learned", {"features": 2.5}, "learned.features"),
])
def test_bad_parameters_give_a_one_line_error(name, params, key):
    with pytest.raises(FrugalError, match=f"'weighting.{key}' must be") as info:
        WEIGHTINGS.create(name, **params)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["none", *FIXED])
def test_fixed_weightings_leave_the_loss_alone(name):
    loss, t = torch.rand(8), torch.rand(8)
    uncertainty = WEIGHTINGS.create(name).uncertainty(VPLinear())
    assert not list(uncertainty.parameters()) and not uncertainty.state_dict()
    assert torch.equal(uncertainty.adjust(loss, t), loss)


def test_learned_starts_as_the_types_own_loss():
    weighting = WEIGHTINGS.create("learned")
    x0_type = PREDICTIONS.create("x0", VPLinear(), SIGMA_DATA)
    t, loss = torch.rand(16), torch.rand(16)
    assert torch.equal(weighting.x0_weight(x0_type, t), 1 / x0_type.x0_factor(t))
    assert torch.equal(weighting.weigh(loss, x0_type, t), loss)
    uncertainty = weighting.uncertainty(VPLinear())
    assert isinstance(uncertainty, LearnedUncertainty)
    assert torch.equal(uncertainty.adjust(loss, t), loss)
    assert sum(p.numel() for p in uncertainty.parameters()) == 33


def _fit_learned(process, mean_loss, steps=400, batch=512):
    """Adam on adjust(L, t).mean() with L = mean_loss(t) times Gamma(4, 4) noise (mean 1)."""
    weighting = LearnedUncertainty(process)
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = process.t_min + (process.t_max - process.t_min) * torch.rand(batch, generator=g)
        noise = -torch.log(torch.rand(batch, 4, generator=g)).mean(1)
        loss = weighting.adjust(mean_loss(t) * noise, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return weighting


@pytest.mark.parametrize("process_name", ["vp-linear", "flow"])
def test_learned_fits_the_expected_loss(process_name):
    """e^u(t) ≈ E[L | t] within 10%, for the x0 type's loss on Gaussian data plus 0.05 (0.05 to 1.05)."""
    process = PROCESSES.create(process_name)

    def mean_loss(t):
        a2, s2 = process.alpha(t) ** 2, process.sigma(t) ** 2
        return s2 / (a2 * SIGMA_DATA**2 + s2) + 0.05

    weighting = _fit_learned(process, mean_loss)
    t = torch.linspace(0.05, 0.95, 91)
    with torch.no_grad():
        ratio = weighting(t).exp() / mean_loss(t)
    assert float(ratio.min()) > 0.9 and float(ratio.max()) < 1.1, (ratio.min(), ratio.max())


def test_learned_state_dict_round_trip_reproduces_u_exactly():
    process = VPLinear()
    trained = _fit_learned(process, lambda t: 0.1 + t, steps=20, batch=64)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = LearnedUncertainty(process)
    assert torch.equal(fresh.freqs, trained.freqs) and torch.equal(fresh.phases, trained.phases)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    t = _grid(process, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.equal(trained(t), torch.zeros_like(t))
        assert torch.equal(fresh(t), trained(t))
