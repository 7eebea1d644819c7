import csv
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import frugaldiff
from frugaldiff.checkpoint import latest_checkpoint, list_checkpoints
from frugaldiff.config import Config
from frugaldiff.datasets import load_dataset
from frugaldiff.errors import FrugalError
from frugaldiff.noise import VPLinear, empirical_posterior_mean
from frugaldiff.prediction import PREDICTIONS
from frugaldiff.trainer import EMA, Interrupted, Trainer, combine_loss
from frugaldiff.weighting import WEIGHTINGS, Weighting
from tests.conftest import TINY_UNET


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
    data = trainer.data.heldout

    def heldout_loss():
        g = torch.Generator().manual_seed(123)
        t = 0.02 + 0.18 * torch.rand(len(data), generator=g)  # low noise: x0 is recoverable from x_t
        eps = torch.randn(data.shape, generator=g)
        with torch.no_grad():
            out = trainer.ema.model(trainer.process.add_noise(data, eps, t), t)
        return trainer.prediction.error(out, data, eps, t).mean().item()

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


@pytest.mark.parametrize("extra", [{}, {"diffusion.reference_images": 32}])
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, extra):
    values = {**TINY_UNET, "train.images_seen": 16 * 24, "train.checkpoint_every": 0, "train.lr_schedule": "cosine",
              "model.dropout": 0.1, **extra}
    whole = Trainer(Config(values), tmp_path / "whole", progress=False)
    whole.fit()

    interrupted = Trainer(Config(values), tmp_path / "part", progress=False)
    original_step = interrupted.train_step

    def step_then_signal():
        result = original_step()
        if interrupted.step == 11:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    interrupted.train_step = step_then_signal
    with pytest.raises(Interrupted) as e:
        interrupted.fit()
    assert e.value.checkpoint.name == "step-00000011"
    resumed = Trainer(Config(values), tmp_path / "part", resume=True, progress=False)
    assert resumed.step == 11
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
    from tests.conftest import TINY_UNET

    real_save = ck.torch.save
    calls = []
    def slow_save(obj, path):
        calls.append(path)
        if len(calls) == 2:            # the second checkpoint hangs half-written
            print("WRITING", flush=True)
            time.sleep(600)
        real_save(obj, path)
    ck.torch.save = slow_save
    config = Config({**TINY_UNET, "train.images_seen": 160, "train.checkpoint_every": 64})
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
    assert resumed.step == 4
    resumed.fit()
    assert latest_checkpoint(run).name == "step-00000010"


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(Config({**TINY_UNET, "train.images_seen": 16 * 30, "train.log_every": 1}), tmp_path / "r",
                      progress=False)
    real_error = trainer.prediction.error
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        err = real_error(*args)
        return err * float("nan") if calls["n"] == 3 or calls["n"] > 6 else err

    monkeypatch.setattr(trainer.prediction, "error", flaky)
    with pytest.raises(FrugalError, match="10 non-finite losses in a row"):
        trainer.fit()
    assert trainer.step == 5  # 6 good steps of 7 tries, then 10 bad ones
    with (tmp_path / "r" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["nonfinite_skipped"] == "1" and int(rows[-1]["step"]) == 5


def test_combine_loss_is_the_product_of_the_three_factors():
    class Fixed(Weighting):
        def x0_weight(self, process, t):
            return torch.tensor([3.0, 1.0])

    prediction = PREDICTIONS.create("eps", VPLinear(), 0.5)
    t = torch.tensor([0.3, 0.6])
    x0, eps, out = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    x_t = prediction.process.add_noise(x0, eps, t)
    error, importance = prediction.error(out, x0, eps, t), torch.tensor([0.5, 2.0])
    objective, optimised = combine_loss(prediction, out, x_t, x0, eps, t, importance, WEIGHTINGS.create("none"))
    assert torch.equal(objective, error) and torch.equal(optimised, error * importance)
    objective, optimised = combine_loss(prediction, out, x_t, x0, eps, t, importance, Fixed())
    expected = error * torch.tensor([3.0, 1.0]) * prediction.amplification(t) ** 2
    torch.testing.assert_close(objective, expected)
    torch.testing.assert_close(optimised, expected * importance)


def test_refuses_to_overwrite_a_run(tmp_path):
    run = frugaldiff.train({**TINY_UNET, "train.images_seen": 32}, run_dir=tmp_path / "r", progress=False)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(FrugalError, match="not empty"):
        frugaldiff.train({**TINY_UNET, "train.images_seen": 32}, run_dir=run, progress=False)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_batch_stream_is_a_function_of_position():
    from frugaldiff.trainer import BatchStream

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
    x0, _, _, eps = trainer.draw(0)
    t = torch.cat([torch.full((4,), 1e-3), torch.linspace(0.1, 1.0, len(x0) - 4)])
    x_t = trainer.process.add_noise(x0, eps, t)
    state = trainer.noise.get_state()
    x0_bar, eps_bar = trainer.target(x0, eps, x_t, t)
    if not images:
        assert x0_bar is x0 and eps_bar is eps
        return
    torch.testing.assert_close(trainer.process.add_noise(x0_bar, eps_bar, t), x_t, atol=2e-5, rtol=0)
    pool = trainer.data.train
    if images < len(pool):  # the batch, then `images` distinct training images drawn from the noise stream
        chosen = torch.randperm(len(pool), generator=torch.Generator().set_state(state))[:images]
        pool = torch.cat([x0, pool[chosen]])
    torch.testing.assert_close(x0_bar, empirical_posterior_mean(trainer.process, x_t, t, pool), atol=0, rtol=0)
    # near the data the sample's own image dominates: the target is the drawn pair
    torch.testing.assert_close(x0_bar[:4], x0[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_bar[:4], eps[:4], atol=1e-6, rtol=0)
    assert (x0_bar[-1] - x0[-1]).abs().max() > 0.1  # at t = 1 it is the references' mean
