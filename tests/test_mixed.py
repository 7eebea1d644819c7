"""The mixed prediction: K linear heads gated in x0 (timestep or pixel gate; joint, heads, heads+joint)."""

import json

import numpy as np
import pytest
import torch
from testkit import TINY_UNET

from frugaldiff.cli import main
from frugaldiff.components import SampleSettings
from frugaldiff.config import Config
from frugaldiff.errors import FrugalError
from frugaldiff.generate import generate, load_run
from frugaldiff.noise import PROCESSES, VPLinear
from frugaldiff.prediction import PREDICTIONS, MixedPrediction
from frugaldiff.solvers import SOLVERS
from frugaldiff.timestep_samplers import TIMESTEP_SAMPLERS
from frugaldiff.trainer import Trainer
from frugaldiff.weighting import WEIGHTINGS

pytestmark = pytest.mark.usefixtures("one_thread")  # toy networks: a second thread only contends
TYPES = ["x0", "velocity", "acceleration"]
TOY = {"data.name": "moons", "data.num_samples": 512, "model.hidden": 32, "model.depth": 2, "train.batch_size": 32,
       "train.images_seen": 32 * 6, "train.warmup_images": 0, "train.log_every": 3, "train.checkpoint_every": 0,
       "diffusion.process": "vp-linear", "diffusion.timestep_sampler": "uniform", "diffusion.prediction": "mixed",
       "sample.n": 16, "sample.steps": 8}


def _mixed(gate="timestep", strategy="heads", types=TYPES, process=None) -> MixedPrediction:
    return PREDICTIONS.create("mixed", process or VPLinear(), 0.5, types=types, gate=gate, strategy=strategy)


def _batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.linspace(0.02, 0.98, shape[0], dtype=torch.float64)
    return t, x0, eps, VPLinear().add_noise(x0, eps, t)


def _true_output(pred: MixedPrediction, x0, eps, t, gate_logits=None):
    """The network output whose every head is exactly its target (and, for the pixel gate, given logits)."""
    parts = [h.target(x0, eps, t) for h in pred.heads]
    if pred.gate == "pixel":
        parts += list(gate_logits)
    return torch.cat(parts, 1)


@pytest.mark.parametrize("gate", ["timestep", "pixel"])
def test_exact_heads_give_exact_x0_whatever_the_gate(gate):
    pred = _mixed(gate).double()
    t, x0, eps, x_t = _batch((40, 2, 3, 3))
    logits = torch.randn(3, 40, 2, 3, 3, dtype=torch.float64) * 3
    out = _true_output(pred, x0, eps, t, logits)
    assert out.shape[1] == pred.out_channels(2) == (2 if gate == "pixel" else 1) * 3 * 2
    torch.testing.assert_close(pred.heads_x0(out, x_t, t), x0[:, None].expand(-1, 3, -1, -1, -1), rtol=0,
                               atol=1e-11)
    with torch.no_grad():
        pred.gate_net is None or pred.gate_net[-1].bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(pred.to_x0(out, x_t, t), x0, rtol=0, atol=1e-11)


@pytest.mark.parametrize("gate", ["timestep", "pixel"])
def test_gate_weights_are_a_distribution(gate):
    pred = _mixed(gate)
    t = torch.rand(16)
    out = 4 * torch.randn(16, pred.out_channels(5))
    weights = pred.gate_weights(out, t)
    assert weights.shape == ((16, 3) if gate == "timestep" else (16, 3, 5))
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(1), torch.ones(weights.sum(1).shape))
    if gate == "timestep":  # zero-initialised last layer: equal weights at the start
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))


def test_strategies_route_the_gradients():
    """heads: head outputs get only their own targets' gradient, the gate only the mixture's;
    joint: the mixture's x0 error alone; heads+joint: the sum of both."""
    t, x0, eps, x_t = _batch((8, 4))
    x0, eps, x_t, t = x0.float(), eps.float(), x_t.float(), t.float()
    out0 = torch.randn(8, 12)

    def grads(strategy):
        pred = _mixed(strategy=strategy)
        with torch.no_grad():
            pred.gate_net[-1].bias.copy_(torch.tensor([0.3, -0.1, 0.2]))
        out = out0.clone().requires_grad_(True)
        pred.loss(out, x_t, x0, eps, t, WEIGHTINGS.create("none")).sum().backward()
        return out.grad, pred.gate_net[-1].bias.grad, pred

    g_heads, b_heads, pred = grads("heads")
    out = out0.clone().requires_grad_(True)
    sum(h.error(c, x0, eps, t) for h, c in zip(pred.heads, out.chunk(3, 1), strict=True)).sum().backward()
    torch.testing.assert_close(g_heads, out.grad)
    g_joint, b_joint, pred = grads("joint")
    out = out0.clone().requires_grad_(True)
    bias = pred.gate_net[-1].bias
    bias.grad = None
    ((pred.to_x0(out, x_t, t) - x0).pow(2).mean(1) / pred.x0_factor(t)).sum().backward()
    torch.testing.assert_close(g_joint, out.grad)
    torch.testing.assert_close(b_joint, bias.grad)
    torch.testing.assert_close(b_heads, b_joint)  # the gate sees the same mixture error either way
    g_both, b_both, _ = grads("heads+joint")
    torch.testing.assert_close(g_both, g_heads + g_joint)
    torch.testing.assert_close(b_both, b_heads + b_joint)


def test_unweighted_mixture_is_measured_in_its_best_heads_scale():
    pred, t = _mixed(), torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    factors = torch.stack([h.amplification(t) ** 2 for h in pred.heads])
    torch.testing.assert_close(pred.x0_factor(t), factors.min(0).values)


@pytest.mark.parametrize(("values", "message"), [
    ({"diffusion.process": "flow", "diffusion.mixed.types": TYPES},
     r"includes \['acceleration'\], which cannot recover x0 on process 'flow'; "
     r"set diffusion.mixed.types = \[\"x0\", \"velocity\"\]"),
    ({"diffusion.process": "vp-cosine", "diffusion.mixed.types": ["acceleration"]}, r"= \[\"x0\", \"velocity\"\]"),
    ({"diffusion.mixed.types": ["x0", "score"]}, r"distinct linear types; choose from: eps, x0"),
    ({"diffusion.mixed.types": ["x0", "x0"]}, "distinct linear types"),
    ({"diffusion.mixed.gate": "channel"}, "unknown diffusion.mixed.gate 'channel'; choose one of: timestep, pixel"),
    ({"diffusion.mixed.strategy": "both"}, "unknown diffusion.mixed.strategy 'both'"),
])
def test_bad_mixture_is_refused_at_config_time(values, message):
    with pytest.raises(FrugalError, match=message) as e:
        Config({"diffusion.process": "vp-linear", "diffusion.prediction": "mixed", **values})
    assert "\n" not in str(e.value)


def test_mixture_without_acceleration_works_on_every_process():
    for name in PROCESSES.names():
        Config({"diffusion.prediction": "mixed", "diffusion.process": name,
                "diffusion.mixed.types": ["x0", "velocity"]})


@pytest.mark.parametrize(("process", "types"), [("vp-linear", TYPES), ("flow", ["x0", "velocity"]),
                                                ("vp-cosine", ["x0", "velocity"])])
def test_default_types_are_those_the_process_defines(process, types):
    config = Config({"diffusion.prediction": "mixed", "diffusion.process": process})
    assert config["diffusion.mixed.types"] == []
    pred = config.prediction(config.process())
    assert pred.types == types and [h.name for h in pred.heads] == types
    assert pred.out_channels(1) == len(types) and pred.gate_net[-1].out_features == len(types)


def test_config_lists_the_mixture_keys(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "types = []" in text and "those of x0, velocity, acceleration the process defines" in text
    assert 'strategy = "heads"' in text


def _heldout_loss(trainer: Trainer) -> float:
    """The strategy's own loss on a fixed held-out batch."""
    g = torch.Generator().manual_seed(123)
    x0, parts = trainer.data.heldout, trainer.parts
    t = parts.process.clamp(torch.rand(len(x0), generator=g))
    eps = torch.randn(x0.shape, generator=g)
    x_t = parts.process.add_noise(x0, eps, t)
    with torch.no_grad():
        return float(parts.prediction.loss(parts.denoiser(x_t, t), x_t, x0, eps, t, parts.weighting).mean())


@pytest.mark.parametrize("gate", ["timestep", "pixel", "analytic", "switch"])
@pytest.mark.parametrize("strategy", ["joint", "heads", "heads+joint"])
def test_each_strategy_learns_on_a_toy_and_checkpoints_its_gate(tmp_path, strategy, gate):
    values = {**TOY, "train.images_seen": 32 * 60, "train.lr": 3e-3, "diffusion.mixed.strategy": strategy,
              "diffusion.mixed.gate": gate}
    trainer = Trainer(Config(values), tmp_path / "run", progress=False)
    before = _heldout_loss(trainer)
    trainer.fit()
    after = _heldout_loss(trainer)
    assert after < 0.9 * before, (before, after)
    _, ema, _ = load_run(tmp_path / "run")
    saved, live = ema.state_dict(), trainer.state.ema.model.state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    if gate == "timestep":
        assert any(k.startswith("prediction.gate_net.") for k in saved)
        assert saved["prediction.gate_net.2.weight"].abs().sum() > 0  # the gate moved away from equal weights
    if gate in ("analytic", "switch"):  # the measured errors are buffers: in the checkpoint and the EMA model
        assert int(saved["prediction.head_counts"].sum()) == 32 * 60
        assert not torch.equal(saved["prediction.head_errors"], torch.ones_like(saved["prediction.head_errors"]))


def _learns(tmp_path, values) -> Trainer:
    """Train a mixed toy model for 60 steps; its held-out loss must fall by 10 % and its gate must move."""
    values = {**TOY, "train.images_seen": 32 * 60, "train.lr": 3e-3, **values}
    trainer = Trainer(Config(values), tmp_path / "run", progress=False)
    before = _heldout_loss(trainer)
    trainer.fit()
    after = _heldout_loss(trainer)
    assert after < 0.9 * before, (before, after)
    assert trainer.parts.prediction.gate_net[-1].weight.abs().sum() > 0
    return trainer


@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS.names())
def test_mixed_learns_with_every_timestep_sampler(tmp_path, name):
    trainer = _learns(tmp_path, {"diffusion.timestep_sampler": name})
    resumed = Trainer(trainer.config, tmp_path / "run", resume=True, progress=False)
    assert resumed.state.sampler.state_dict().keys() == trainer.state.sampler.state_dict().keys()


@pytest.mark.parametrize("name", WEIGHTINGS.names())
@pytest.mark.parametrize("strategy", ["joint", "heads"])
def test_mixed_learns_with_every_weighting(tmp_path, name, strategy):
    # type_loss with its default x0 scale weighs every t alike, so on moons its held-out loss is mostly the
    # irreducible x0 error near t = 1 and cannot fall by 10 %; the velocity type's scale tests the same code path
    extra = {"weighting.type_loss.prediction": "velocity"} if name == "type_loss" else {}
    trainer = _learns(tmp_path, {"diffusion.weighting": name, "diffusion.mixed.strategy": strategy, **extra})
    uncertainty = list(trainer.parts.denoiser.uncertainty.parameters())
    assert bool(uncertainty) == (name == "learned")
    assert all(p.abs().sum() > 0 for p in uncertainty)  # the learned uncertainty is trained with the heads


def test_weighting_reaches_the_mixture_loss():
    class Fixed(WEIGHTINGS.get("snr")):
        def x0_weight(self, prediction, t):
            return torch.full_like(t, 2.0)

    pred = _mixed(strategy="joint")
    t, x0, eps, x_t = (v.float() for v in _batch((6, 4)))
    out = torch.randn(6, 12)
    unweighted = pred.loss(out, x_t, x0, eps, t, WEIGHTINGS.create("none"))
    weighted = pred.loss(out, x_t, x0, eps, t, Fixed())
    torch.testing.assert_close(weighted, unweighted * 2 * pred.x0_factor(t))


@pytest.mark.parametrize("solver", SOLVERS.names())
def test_every_solver_generates_from_a_mixed_model(tmp_path, solver):
    trainer = Trainer(Config(TOY), tmp_path / "run", progress=False)
    trainer.fit()
    x = generate(trainer.state.ema.model, SampleSettings.from_config(trainer.config), 32, (2,), steps=6,
                 solver=solver)
    assert x.shape == (32, 2) and bool(torch.isfinite(x).all())


def test_sample_command_works_from_a_mixed_image_model(tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"{k}={json.dumps(v)}" for k, v in {**TINY_UNET, "train.images_seen": 32, "diffusion.prediction": "mixed",
                                                  "diffusion.process": "vp-linear",
                                                  "diffusion.mixed.gate": "pixel"}.items()]
    assert main(["train", "--out", str(run), "--no-progress", *sum((["--set", s] for s in sets), [])]) == 0
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "4", "--steps", "3", "--out", str(out)]) == 0
    with np.load(out) as f:
        images = f[f.files[0]]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8


def test_analytic_gate_is_inverse_error_weighting_and_switch_picks_the_best_head():
    t = torch.tensor([0.05, 0.3, 0.55, 0.8])
    for gate in ("analytic", "switch"):
        pred = _mixed(gate, types=["x0", "velocity"], process=VPLinear())
        weights = pred.gate_weights(torch.zeros(4, pred.out_channels(3)), t)
        torch.testing.assert_close(weights, torch.full((4, 2), 0.5) if gate == "analytic" else
                                   torch.tensor([[1.0, 0.0]] * 4))  # nothing measured: equal errors
        errors = torch.tensor([[0.01, 0.04], [0.2, 0.1], [0.3, 0.3], [0.5, 0.7]])
        pred.head_errors.copy_(errors.repeat_interleave(5, 0))  # 20 bins: four blocks of five
        weights = pred.gate_weights(torch.zeros(4, pred.out_channels(3)), t)
        assert bool((weights >= 0).all()) and torch.allclose(weights.sum(1), torch.ones(4))
        if gate == "analytic":  # w_k = (1/E_k) / Σ_j 1/E_j, i.e. (E_2, E_1)/(E_1 + E_2) for two heads
            expected = errors.flip(1) / errors.sum(1, keepdim=True)
        else:
            expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)


def test_measured_gate_keeps_running_per_bin_means_of_each_heads_x0_error_in_training_only():
    pred = _mixed("analytic", types=["x0", "velocity"], process=VPLinear()).double()
    pred.decay = 0.5
    t, x0, eps, x_t = _batch((40, 2, 3, 3))
    offsets = torch.tensor([0.1, 0.3], dtype=torch.float64)  # head k's x̂0 is x0 + offset_k: error offset_k²

    def loss_with(scale: float) -> None:  # ∂x̂0/∂F = −σ·c/D: an output change of −δ·D/(σ·c) moves x̂0 by δ
        def moved(h):
            _, _, c = h.scaled_coefficients(t)
            return (h.determinant(t) / (h.process.sigma(t) * c)).reshape(-1, 1, 1, 1)

        out = torch.cat([h.target(x0, eps, t) - scale * o * moved(h) for h, o in zip(pred.heads, offsets,
                                                                                     strict=True)], 1)
        pred.loss(out, x_t, x0, eps, t, WEIGHTINGS.create("none"))

    pred.eval()
    loss_with(1.0)
    pred.train()
    with torch.no_grad():
        loss_with(1.0)
    assert torch.equal(pred.head_counts, torch.zeros(20, dtype=torch.long))  # neither eval mode nor no_grad counts
    pred.train()
    loss_with(1.0)
    assert int(pred.head_counts.sum()) == 40
    seen = pred.head_counts > 0
    torch.testing.assert_close(pred.head_errors[seen], (offsets**2).expand(int(seen.sum()), 2), rtol=1e-5,
                               atol=1e-9)
    assert torch.equal(pred.head_errors[~seen], torch.ones(int((~seen).sum()), 2, dtype=torch.float64))
    loss_with(2.0)  # second observation of each bin: rate max(n/count, 1 − decay) = 1/2
    torch.testing.assert_close(pred.head_errors[seen], ((offsets**2) * 2.5).expand(int(seen.sum()), 2),
                               rtol=1e-5, atol=1e-9)
