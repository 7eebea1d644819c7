import copy
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fingerprints import machine_key
from safetensors import safe_open
from safetensors.torch import load_file
from testkit import TINY_UNET, RecordingObjective, fit_interrupted

import frugaldiff
from frugaldiff import trainer as trainer_module
from frugaldiff.checkpoint import checkpoint_info, latest_checkpoint, list_checkpoints
from frugaldiff.components import FRUGAL_RECIPE, resolved_recipe
from frugaldiff.config import Config
from frugaldiff.datasets import BatchStream, load_dataset
from frugaldiff.distributed import SINGLE_PROCESS
from frugaldiff.ema import EMA
from frugaldiff.errors import FrugalError
from frugaldiff.networks import Denoiser
from frugaldiff.noise import VPLinear, empirical_posterior_mean
from frugaldiff.objective import Batch, Objective, stable_target
from frugaldiff.prediction import PREDICTIONS
from frugaldiff.runtime import CPU
from frugaldiff.studies import train_or_reuse
from frugaldiff.trainer import Trainer, train_step
from frugaldiff.weighting import WEIGHTINGS, Weighting


def _weights(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))


def _assert_same_weights(a, b):
    for part_a, part_b in zip(a, b, strict=True):
        assert part_a.keys() == part_b.keys()
        for k in part_a:
            assert torch.equal(part_a[k], part_b[k]), k


def test_toy_training_learns_and_samples_land_on_the_data(tmp_path):
    config = Config({"data.name": "8gaussians", "data.num_samples": 4000, "model.hidden": 128, "model.depth": 3,
                     "train.batch_size": 128, "train.images_seen": 128 * 300, "train.lr": 2e-3,
                     "train.warmup_images": 2000, "train.ema_decay": 0.99, "diffusion.prediction": "x0",
                     "train.lr_schedule": "constant", "sample.solver": "dpm++2m", "sample.n": 2000, "sample.steps": 30})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    data, process = trainer.data.heldout, trainer.parts.process

    def heldout_loss():
        g = torch.Generator().manual_seed(123)
        t = 0.02 + 0.18 * torch.rand(len(data), generator=g)  # low noise: x0 is recoverable from x_t
        eps = torch.randn(data.shape, generator=g)
        with torch.no_grad():
            out = trainer.state.ema.model(process.add_noise(data, eps, t), t)
        return trainer.parts.prediction.error(out, data, eps, t).mean().item()

    before = heldout_loss()
    trainer.fit()
    after = heldout_loss()
    assert after < 0.3 * before, (before, after)  # measured: 0.105
    samples = frugaldiff.sample(tmp_path / "run", n=2000, steps=30)
    assert samples.shape == (2000, 2)
    nearest = torch.cdist(torch.from_numpy(samples), data).min(1).values
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    nearest_noise = torch.cdist(noise, data).min(1).values
    # 8 modes of std ~0.07 on a circle: most samples sit on a mode, unlike Gaussian noise (~40% there).
    assert (nearest < 0.3).float().mean() > 0.75 > 1.5 * (nearest_noise < 0.3).float().mean()
    assert nearest.median() < 0.5 * nearest_noise.median()


@pytest.mark.parametrize("extra", [{}, {"diffusion.reference_images": 32}, {"model.num_classes": 0},
                                   {"train.immiscible": True, "diffusion.timestep_sampler": "speed",
                                    "diffusion.weighting": "speed"},
                                   {"diffusion.timestep_sampler": "kim", "timestep_sampler.kim.every": 4}])
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, extra, monkeypatch):
    """digits has labels: a conditional run (label dropout, class-aware stable target) unless num_classes is 0."""
    values = {**TINY_UNET, "train.images_seen": 16 * 24, "train.checkpoint_every": 0, "train.lr_schedule": "cosine",
              "model.dropout": 0.1, **extra}
    whole = Trainer(Config(values), tmp_path / "whole", progress=False)
    whole.fit()

    interrupted = Trainer(Config(values), tmp_path / "part", progress=False)
    e = fit_interrupted(monkeypatch, trainer_module, "train_step", interrupted, 11, signal.SIGINT)
    assert e.checkpoint.name == "step-00000011"
    resumed = Trainer(Config(values), tmp_path / "part", resume=True, progress=False)
    assert resumed.state.step == 11
    resumed.fit()
    _assert_same_weights(_weights(tmp_path / "whole"), _weights(tmp_path / "part"))
    with (tmp_path / "part" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)), "metrics rows after the checkpoint must not be duplicated"


def test_extending_the_budget_continues_training(tmp_path):
    run = frugaldiff.train({**TINY_UNET, "train.images_seen": 160}, run_dir=tmp_path / "r", progress=False)
    frugaldiff.train(resume=run, overrides=["train.images_seen=320"], progress=False)
    assert latest_checkpoint(run).name == "step-00000020"
    assert Config.load(run / "config.toml").train.images_seen == 320


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import frugaldiff.checkpoint as ck
    from frugaldiff.config import Config
    from frugaldiff.trainer import Trainer
    from testkit import TINY_UNET, RecordingObjective

    real_save = ck.torch.save
    calls = []
    def slow_save(obj, path):
        calls.append(path)
        if len(calls) == 2:            # the second checkpoint hangs half-written
            print("WRITING", flush=True)
            time.sleep(600)
        real_save(obj, path)
    ck.torch.save = slow_save
    config = Config({**TINY_UNET, "train.images_seen": 160, "train.checkpoint_every": 64,
                     "train.guide_at": 0})  # no RUN/guide: only checkpoints call torch.save
    Trainer(config, sys.argv[1], progress=False).fit()
""")


def test_checkpoint_survives_a_kill_during_writing(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run)], stdout=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(__file__)),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == b"WRITING"
    proc.kill()
    proc.wait()
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(name.startswith(".tmp-") for name in leftovers)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004"]
    resumed = Trainer(Config.load(run / "config.toml"), run, resume=True, progress=False)
    assert resumed.state.step == 4
    resumed.fit()
    assert latest_checkpoint(run).name == "step-00000010"


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(Config({**TINY_UNET, "train.images_seen": 16 * 30, "train.log_every": 1}), tmp_path / "r",
                      progress=False)
    real_error = trainer.parts.prediction.error
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        err = real_error(*args)
        return err * float("nan") if calls["n"] == 3 or calls["n"] > 6 else err

    monkeypatch.setattr(trainer.parts.prediction, "error", flaky)
    with pytest.raises(FrugalError, match="10 non-finite losses in a row"):
        trainer.fit()
    assert trainer.state.step == 5  # 6 good steps of 7 tries, then 10 bad ones
    with (tmp_path / "r" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["nonfinite_skipped"] == "1" and int(rows[-1]["step"]) == 5


class _Fixed(torch.nn.Module):
    """A "model" whose raw output is fixed, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x_t, t, labels=None):
        return self.out


def test_objective_is_the_weighted_loss_times_importance_through_the_uncertainty():
    class Fixed(Weighting):
        def x0_weight(self, prediction, t):
            return torch.tensor([3.0, 1.0])

    prediction = PREDICTIONS.create("eps", VPLinear(), 0.5)
    t = torch.tensor([0.3, 0.6])
    x0, eps, out = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    batch = Batch(x0, t, torch.tensor([0.5, 2.0]), eps)
    error = prediction.error(out, x0, eps, t)
    fixed = torch.tensor([3.0, 1.0]) * prediction.amplification(t) ** 2
    for weighting, weight in ((WEIGHTINGS.create("none"), 1.0), (Fixed(), fixed)):
        objective = Objective(Denoiser(torch.nn.Identity(), prediction), weighting, CPU)
        losses, optimised = objective(_Fixed(out), batch)
        torch.testing.assert_close(losses, error * weight, rtol=1e-6, atol=0)
        torch.testing.assert_close(optimised, error * weight * batch.importance, rtol=1e-6, atol=0)
    learned = WEIGHTINGS.create("learned")
    denoiser = Denoiser(torch.nn.Identity(), prediction, learned.uncertainty(prediction.process))
    with torch.no_grad():
        denoiser.uncertainty.linear.bias.fill_(0.7)  # u = 0.7 everywhere
    losses, optimised = Objective(denoiser, learned, CPU)(_Fixed(out), batch)
    torch.testing.assert_close(optimised, (losses * math.exp(-0.7) + 0.7) * batch.importance)


def test_objective_trains_towards_the_stable_target_when_the_batch_has_references():
    process = VPLinear()
    prediction = PREDICTIONS.create("x0", process, 0.5)
    g = torch.Generator().manual_seed(1)
    x0, eps, out = torch.randn(3, 6, 4, generator=g)
    t = torch.linspace(0.2, 0.9, 6)
    reference = torch.cat([x0, torch.randn(10, 4, generator=g)])
    objective = Objective(Denoiser(torch.nn.Identity(), prediction), WEIGHTINGS.create("none"), CPU)
    drawn, _ = objective(_Fixed(out), Batch(x0, t, torch.ones(6), eps))
    stable, _ = objective(_Fixed(out), Batch(x0, t, torch.ones(6), eps, reference))
    x0_bar, eps_bar = stable_target(process, process.add_noise(x0, eps, t), t, x0, eps, reference)
    torch.testing.assert_close(stable, prediction.error(out, x0_bar, eps_bar, t), rtol=0, atol=0)
    assert (stable - drawn).abs().min() > 1e-4


def test_refuses_to_overwrite_a_run(tmp_path):
    run = frugaldiff.train({**TINY_UNET, "train.images_seen": 32}, run_dir=tmp_path / "r", progress=False)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(FrugalError, match="not empty"):
        frugaldiff.train({**TINY_UNET, "train.images_seen": 32}, run_dir=run, progress=False)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_batch_stream_is_a_function_of_position():
    data = torch.arange(10.0)[:, None]
    a = BatchStream(data, seed=3)
    first = torch.cat([a.next(4) for _ in range(5)])  # two whole epochs
    assert sorted(first[:10, 0].tolist()) == list(range(10)) and sorted(first[10:, 0].tolist()) == list(range(10))
    b = BatchStream(data, seed=3)
    b.position = 8
    assert torch.equal(b.next(12), first[8:])


def test_bundled_digits_loads_for_training():
    data = load_dataset("digits")
    assert data.sample_shape == (1, 8, 8) and np.isclose(float(data.train.max()), 1.0)


def test_ema_update_is_the_warmed_up_average_of_every_parameter_and_copies_buffers() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
    ema.update(model, step=5)  # warm-up: decay = min(0.9, 6/15) = 0.4
    for e, s, p in zip(ema.model.parameters(), start, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.4 * s + 0.6 * p, rtol=0, atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    before = [e.clone() for e in ema.model.parameters()]
    ema.update(model, step=10**6)  # past warm-up: decay 0.9
    for e, b, p in zip(ema.model.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p, rtol=0, atol=1e-6)
        assert not e.requires_grad


@pytest.mark.parametrize("images", [0, 40, 100_000])
def test_stable_target_keeps_x_t_and_is_the_posterior_mean_over_its_references(tmp_path, images):
    trainer = Trainer(Config({**TINY_UNET, "diffusion.reference_images": images}), tmp_path / "r", progress=False)
    state, process = trainer.state, trainer.parts.process
    noise = state.noise.get_state()
    batch = state.draw(16, trainer.parts.objective)
    x0, eps = batch.x0, batch.eps
    if not images:
        assert batch.reference is None
        return
    pool = trainer.data.train
    if images < len(pool):  # the batch, then `images` distinct training images drawn after the noise
        g = torch.Generator().set_state(noise)
        torch.randn(eps.shape, generator=g)
        pool = torch.cat([x0, pool[torch.randperm(len(pool), generator=g)[:images]]])
    assert torch.equal(batch.reference, pool)
    t = torch.cat([torch.full((4,), 1e-3), torch.linspace(0.1, 1.0, len(x0) - 4)])
    x_t = process.add_noise(x0, eps, t)
    x0_bar, eps_bar = stable_target(process, x_t, t, x0, eps, batch.reference)
    torch.testing.assert_close(process.add_noise(x0_bar, eps_bar, t), x_t, atol=2e-5, rtol=0)
    torch.testing.assert_close(x0_bar, empirical_posterior_mean(process, x_t, t, pool), atol=0, rtol=0)
    # near the data the sample's own image dominates: the target is the drawn pair
    torch.testing.assert_close(x0_bar[:4], x0[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_bar[:4], eps[:4], atol=1e-6, rtol=0)
    assert (x0_bar[-1] - x0[-1]).abs().max() > 0.1  # at t = 1 it is the references' mean


def test_a_step_trains_on_the_samplers_draw_split_over_micro_steps_with_its_importance_weights(tmp_path):
    config = Config({**TINY_UNET, "train.grad_accum": 2, "diffusion.timestep_sampler": "near_zero",
                     "timestep_sampler.near_zero.keep_objective": True})
    trainer = Trainer(config, tmp_path / "r", progress=False)
    state, parts = trainer.state, trainer.parts
    expected_t, expected_w = copy.deepcopy(state.sampler).sample(16)
    recording = RecordingObjective(parts.objective)
    loss, _ = train_step(state, recording, state.denoiser, trainer.settings, SINGLE_PROCESS)
    first, second = recording.batches
    assert len(first.t) == len(second.t) == 8
    torch.testing.assert_close(torch.cat([first.t, second.t]), parts.process.clamp(expected_t).float())
    torch.testing.assert_close(torch.cat([first.importance, second.importance]), expected_w.float())
    assert expected_w.std() > 0.1  # the weights are not all 1
    with torch.no_grad():
        optimised = torch.cat([parts.objective(state.denoiser, b)[1] for b in (first, second)])
    assert loss == pytest.approx(float(optimised.mean()), rel=1e-2)  # the weights changed since: close, not equal


def test_the_ema_of_a_run_is_the_warmed_up_average_of_the_models_after_each_step(tmp_path):
    trainer = Trainer(Config({**TINY_UNET, "train.ema_decay": 0.95}), tmp_path / "r", progress=False)
    state = trainer.state
    expected = [p.detach().clone() for p in state.denoiser.parameters()]
    for step in range(1, 4):
        train_step(state, trainer.parts.objective, state.denoiser, trainer.settings, SINGLE_PROCESS)
        decay = min(0.95, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, state.denoiser.parameters(),
                                                                         strict=True)]
    for e, a in zip(expected, state.ema.model.parameters(), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


OLD_RUN = Path(__file__).with_name("data") / "learned-weighting-v1"  # written before the learned weighting moved


def test_a_checkpoint_from_before_the_learned_weighting_moved_into_the_denoiser_resumes_as_it_did(tmp_path):
    """tests/data/learned-weighting-v1 was trained for 5 steps by the code before the redesign (its learned
    weighting in weighting.safetensors and a second AdamW group); resumed to 10 steps now, it must end where that
    code's own resume ended (…-resumed.safetensors): bit for bit on a machine like the recording one."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    with safe_open(str(OLD_RUN.parent / "learned-weighting-v1-resumed.safetensors"), "pt") as f:
        expected, recorded_on = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()["machine"]
    torch.set_num_threads(1)
    frugaldiff.train(resume=run, overrides=["train.images_seen=160"], progress=False)
    checkpoint = latest_checkpoint(run)
    assert checkpoint.name == "step-00000010" and not (checkpoint / "weighting.safetensors").exists()
    model, ema = (load_file(str(checkpoint / f"{name}.safetensors")) for name in ("model", "ema"))
    found = {**{f"model.{k}": v for k, v in model.items() if not k.startswith("uncertainty.")},
             **{f"ema.{k}": v for k, v in ema.items() if not k.startswith("uncertainty.")},
             **{f"weighting.{k[len('uncertainty.'):]}": v for k, v in model.items() if k.startswith("uncertainty.")}}
    assert found.keys() == expected.keys()
    exact = machine_key() == recorded_on
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-6, msg=key)
    assert len(frugaldiff.sample(run, n=4, steps=2)) == 4


def test_data_flip_mirrors_about_half_of_the_images_and_keeps_them_in_the_stable_targets_pool(tmp_path):
    config = Config({**TINY_UNET, "data.flip": True, "diffusion.reference_images": 100_000})
    trainer = Trainer(config, tmp_path / "r", progress=False)
    batch = trainer.state.draw(512, trainer.parts.objective)
    index = BatchStream(torch.arange(len(trainer.data.train)), config["train.seed"]).next(512)
    original = trainer.data.train[index]
    same = (batch.x0 == original).flatten(1).all(1)
    mirrored = (batch.x0 == original.flip(-1)).flatten(1).all(1) & ~same
    assert bool((same | mirrored).all()) and abs(mirrored.double().mean().item() - 0.5) < 4 * (0.25 / 512) ** 0.5
    assert torch.equal(batch.reference[:512], batch.x0)  # the batch (mirrored or not) leads the pool
    plain = Trainer(Config({**TINY_UNET, "diffusion.reference_images": 100_000}), tmp_path / "p", progress=False)
    assert torch.equal(plain.state.draw(512, plain.parts.objective).x0, original)


COMPILE_TOY = {"data.name": "8gaussians", "data.num_samples": 256, "model.hidden": 32, "model.depth": 2,
               "train.batch_size": 16, "train.images_seen": 16 * 6, "train.precision": "fp32",
               "train.checkpoint_every": 0, "sample.n": 16, "sample.steps": 4}


def test_compiled_training_matches_eager_training_within_float_rounding(tmp_path):
    eager = Trainer(Config(COMPILE_TOY), tmp_path / "eager", progress=False)
    eager.fit()
    fast = Trainer(Config({**COMPILE_TOY, "train.compile": True}), tmp_path / "compiled", progress=False)
    assert fast.model is not fast.parts.denoiser  # the compiled module, sharing the denoiser's parameters
    fast.fit()
    for (name, a), b in zip(eager.state.denoiser.state_dict().items(), fast.state.denoiser.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_a_missing_compiler_falls_back_to_eager_training_with_one_line_of_notice(tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no g++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.warns(UserWarning, match="^train.compile: no C\\+\\+ compiler was found") as caught:
        trainer = Trainer(Config({**COMPILE_TOY, "train.compile": True}), tmp_path / "run", progress=False)
    assert all("\n" not in str(w.message) for w in caught)
    assert trainer.model is trainer.parts.denoiser
    trainer.fit()
    assert trainer.state.step == 6


PRECISION_TOY = {**TINY_UNET, "train.precision": "auto", "train.images_seen": 16 * 4, "train.checkpoint_every": 0}


def timed(monkeypatch, fp32: float, bf16: float) -> list:
    """Probe.seconds replaced by fixed times (bf16 runs everywhere): the calls it gets, as (batch, shape, backward,
    dtype)."""
    from frugaldiff import runtime as runtime_module
    monkeypatch.setattr(runtime_module, "bf16_supported", lambda device: True)
    calls = []

    def seconds(probe, device, dtype, repeats=3):
        calls.append((probe.batch, probe.shape, probe.backward, dtype))
        return bf16 if dtype == torch.bfloat16 else fp32

    monkeypatch.setattr(runtime_module.Probe, "seconds", seconds)
    return calls


@pytest.mark.parametrize("fp32, bf16, expected", [(1.0, 0.5, torch.bfloat16), (1.0, 0.97, None), (1.0, 1.5, None)])
def test_auto_precision_is_the_measured_faster_one_and_is_measured_once(fp32, bf16, expected, tmp_path, monkeypatch,
                                                                          fresh_cache):
    calls = timed(monkeypatch, fp32, bf16)
    first = Trainer(Config(PRECISION_TOY), tmp_path / "a", progress=False)
    # the training step's work: the micro-batch of the run's samples, forward and backward, in both precisions
    assert calls == [(16, (1, 8, 8), True, None), (16, (1, 8, 8), True, torch.bfloat16)]
    assert first.runtime.amp_dtype == expected and first.parts.objective.runtime is first.runtime
    kept = json.loads((fresh_cache / "precision.json").read_text())
    assert [v["choice"] for v in kept.values()] == ["bf16" if expected else "fp32"]
    again = Trainer(Config({**PRECISION_TOY, "train.seed": 1}), tmp_path / "b", progress=False)
    assert len(calls) == 2 and again.runtime.amp_dtype == expected  # kept: the same model is not measured again
    other = Trainer(Config({**PRECISION_TOY, "train.batch_size": 8}), tmp_path / "c", progress=False)
    assert len(calls) == 4 and other.runtime.amp_dtype == expected  # other work: measured
    assert Trainer(Config({**PRECISION_TOY, "train.precision": "fp32"}), tmp_path / "d",
                   progress=False).runtime.amp_dtype is None and len(calls) == 4


def test_a_resumed_auto_run_keeps_the_precision_its_checkpoint_recorded(tmp_path, monkeypatch, fresh_cache):
    calls = timed(monkeypatch, 1.0, 0.5)
    trainer = Trainer(Config({**PRECISION_TOY, "train.checkpoint_every": 32}), tmp_path / "run", progress=False)
    trainer.fit()
    assert checkpoint_info(latest_checkpoint(tmp_path / "run"))["precision"] == "bf16"
    (fresh_cache / "precision.json").write_text("[1, 2]")  # a cache that is no object: as if none were kept
    calls = timed(monkeypatch, 0.5, 1.0)  # fp32 would now measure faster
    resumed = Trainer(Config({**PRECISION_TOY, "train.checkpoint_every": 32, "train.images_seen": 16 * 6}),
                      tmp_path / "run", resume=True, progress=False)
    assert resumed.runtime.amp_dtype == torch.bfloat16 and calls == []  # kept from the checkpoint, not measured
    fresh = Trainer(Config(PRECISION_TOY), tmp_path / "new", progress=False)
    assert fresh.runtime.amp_dtype is None and len(calls) == 2  # a new run measures (the damaged cache is rewritten)
    assert [v["choice"] for v in json.loads((fresh_cache / "precision.json").read_text()).values()] == ["fp32"]


def test_auto_precision_where_bf16_does_not_run_is_fp32_without_measuring(tmp_path, monkeypatch, fresh_cache):
    from frugaldiff import runtime as runtime_module
    monkeypatch.setattr(runtime_module, "bf16_supported", lambda device: False)
    assert Trainer(Config(PRECISION_TOY), tmp_path / "a", progress=False).runtime.amp_dtype is None
    assert not (fresh_cache / "precision.json").exists()


def test_processes_starting_together_measure_the_precision_one_after_another(monkeypatch, fresh_cache):
    """The measurement holds the cache's precision.lock, and a process that waited for the lock takes the choice
    the first one kept instead of measuring again (so every run of a model on a machine computes alike)."""
    import fcntl
    import threading

    from frugaldiff import runtime as runtime_module
    from frugaldiff.runtime import Probe, measured_dtype
    calls, lock = timed(monkeypatch, 1.0, 0.5), fresh_cache / "precision.lock"
    measure = runtime_module.Probe.seconds

    def locked_seconds(probe, device, dtype, repeats=3):
        with lock.open("a") as other:  # another open of the lock: refused while the measurement holds it
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return measure(probe, device, dtype, repeats)

    monkeypatch.setattr(runtime_module.Probe, "seconds", locked_seconds)
    cpu = torch.device("cpu")
    first, second = Probe(torch.nn.Identity(), (4,), 2, False), Probe(torch.nn.Identity(), (4,), 3, False)
    assert measured_dtype(cpu, first) == torch.bfloat16 and len(calls) == 2
    fresh_cache.mkdir(exist_ok=True)
    with lock.open("a") as held:  # another process is measuring `second`
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = []
        waiting = threading.Thread(target=lambda: result.append(measured_dtype(cpu, second)))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and len(calls) == 2  # it waits for the lock
        kept = json.loads((fresh_cache / "precision.json").read_text())
        kept[second.key(cpu)] = {"fp32_s": 1.0, "bf16_s": 2.0, "choice": "fp32"}  # what the other process kept
        (fresh_cache / "precision.json").write_text(json.dumps(kept))
    waiting.join()
    assert result == [None] and len(calls) == 2  # the kept choice, not a measurement of its own


def test_a_recorded_bf16_is_kept_only_where_bf16_runs(monkeypatch, fresh_cache):
    from frugaldiff import runtime as runtime_module
    from frugaldiff.runtime import Probe, run_dtype
    calls, cpu = timed(monkeypatch, 0.5, 1.0), torch.device("cpu")
    probe = Probe(torch.nn.Identity(), (4,), 2, False)
    assert run_dtype("auto", cpu, "bf16", probe) == torch.bfloat16 and calls == []  # kept, though fp32 measures faster
    monkeypatch.setattr(runtime_module, "bf16_supported", lambda device: False)  # resumed where bf16 does not run
    assert run_dtype("auto", cpu, "bf16", probe) is None and calls == []
    assert run_dtype("auto", cpu, "fp32", probe) is None


def test_measuring_the_precision_leaves_the_run_as_it_would_be_without(tmp_path, monkeypatch, fresh_cache):
    """The real measurement (a copy of the model, the random state restored) changes no weight, batch or noise: with
    fp32 chosen, an auto run is bit-identical to an fp32 run; bf16 itself trains and samples."""
    from frugaldiff import runtime as runtime_module
    monkeypatch.setattr(runtime_module, "bf16_supported", lambda device: True)  # bf16 autocast runs on any CPU
    monkeypatch.setattr(runtime_module, "BF16_MARGIN", 1.0)  # bf16 never wins: the measurement runs, fp32 is chosen
    runs = {}
    for precision in ("auto", "fp32", "bf16"):
        runs[precision] = Trainer(Config({**PRECISION_TOY, "model.dropout": 0.1, "train.precision": precision}),
                                  tmp_path / precision, progress=False)
        runs[precision].fit()
    for (name, a), b in zip(runs["auto"].state.denoiser.state_dict().items(),
                            runs["fp32"].state.denoiser.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    kept = json.loads((fresh_cache / "precision.json").read_text())
    assert len(kept) == 1 and all(v["fp32_s"] > 0 and v["bf16_s"] > 0 for v in kept.values())
    assert runs["bf16"].runtime.amp_dtype == torch.bfloat16 and runs["bf16"].state.precision == "bf16"
    assert torch.isfinite(runs["bf16"].samples(4)).all()


@pytest.mark.parametrize(("data", "recipe"), [({}, FRUGAL_RECIPE),
                                              ({"data.color": "rgb", "data.image_size": 24, "train.patch": True},
                                               {**FRUGAL_RECIPE, "diffusion.reference_images": 0})])
def test_a_run_trains_and_saves_its_resolved_recipe(tmp_path, data, recipe):
    config = Config({**TINY_UNET, **data, "train.images_seen": 32, "train.checkpoint_every": 0})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    sampler, objective = trainer.parts.sampler, trainer.parts.objective
    assert (objective.reference_images, sampler.m, sampler.stratified) == tuple(recipe.values())
    assert (objective.pool is None) == (recipe["diffusion.reference_images"] == 0)
    saved = Config.load(tmp_path / "run" / "config.toml", saved=True)
    assert saved == trainer.config == resolved_recipe(config)  # resolved, kept on resume
    assert {key: saved[key] for key in recipe} == recipe
    trainer.fit()
    reused = train_or_reuse(config, tmp_path / "run", progress=False)  # the same auto config: the same run
    assert reused.done
    with pytest.raises(FrugalError, match="holds a run of another config"):
        train_or_reuse(config.updated({"timestep_sampler.logit_normal.m": 0.25}), tmp_path / "run", progress=False)
    # train-autoencoder's keys are not the diffusion run's: another value there (or a key added since, whose
    # predating value differs from today's default) is still the same run
    assert train_or_reuse(config.updated({"autoencoder.lr": 0.5, "autoencoder.group_channels": 1}), tmp_path / "run",
                          progress=False).done
