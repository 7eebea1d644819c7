"""Labels, guidance (classifier-free, autoguidance, interval), post-hoc EMA and solver convergence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import TINY_UNET

from frugaldiff.cli import main
from frugaldiff.config import Config
from frugaldiff.datasets import load_dataset
from frugaldiff.ema import PowerEMA, gamma_of, load_snapshots, reconstruct, save_snapshot, sigma_rel_of
from frugaldiff.gmm import GaussianMixture
from frugaldiff.guidance import Guidance, guided
from frugaldiff.networks import MLP, Denoiser
from frugaldiff.noise import PROCESSES
from frugaldiff.prediction import PREDICTIONS
from frugaldiff.solvers import solve
from frugaldiff.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_ARGS = [arg for key, value in TINY_UNET.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


# ---- labels ------------------------------------------------------------------------------------------------

def test_class_sub_folders_give_labels_and_rgba_palette_grey_images_load_as_documented(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, colour in colours.items():
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 10), colour).save(tmp_path / "pets" / name / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path / 'pets'}", image_size=8, heldout_fraction=0.25)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.train_labels.bincount().tolist() == [3, 3] and data.heldout_labels.bincount().tolist() == [1, 1]
    for x, labels in ((data.train, data.train_labels), (data.heldout, data.heldout_labels)):
        red = x[:, 0].mean((1, 2)) > 0.5  # red images are class 0 ("cat"), blue ones class 1
        assert torch.equal(red, labels == 0)
    flat = tmp_path / "flat"
    flat.mkdir()
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black: white once composited
    transparent.save(flat / "a.png")
    Image.new("P", (8, 8), 3).save(flat / "b.png")
    Image.new("L", (8, 8), 128).save(flat / "c.png")
    data = load_dataset(f"folder:{flat}", image_size=8, heldout_fraction=0.34)
    assert data.train_labels is None and data.class_names is None and data.sample_shape == (3, 8, 8)
    everything = torch.cat([data.train, data.heldout])
    assert bool((everything.amax((1, 2, 3)) == 1.0).any())  # the transparent image is white


def test_npz_labels_load_and_a_length_mismatch_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 6, 6), dtype=np.uint8), np.repeat(np.arange(3), 10)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert torch.cat([data.train_labels, data.heldout_labels]).sort().values.tolist() == sorted(labels.tolist())
    np.savez(tmp_path / "bad.npz", images=images, labels=labels[:20])
    with pytest.raises(Exception, match="save integer labels, shape") as e:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    assert "\n" not in str(e.value)


def test_labelled_images_train_conditional_by_default_and_the_null_label_drops_the_expected_share(tmp_path):
    trainer = Trainer(Config({**TINY_UNET, "train.label_dropout": 0.3}), tmp_path / "r", progress=False)
    state = trainer.state
    assert state.classes == 10 == trainer.parts.denoiser.null_label
    batch = state.draw(4000, trainer.parts.objective)
    dropped = (batch.labels == 10).double().mean().item()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)  # 4 standard errors
    assert set(batch.labels[batch.labels != 10].tolist()) == set(range(10))
    again = Trainer(Config({**TINY_UNET, "train.label_dropout": 0.3}), tmp_path / "r2", progress=False)
    assert torch.equal(again.state.draw(4000, again.parts.objective).labels, batch.labels)  # a fixed seed
    toy = Trainer(Config({"data.name": "moons", "model.hidden": 8}), tmp_path / "toy", progress=False)
    assert toy.state.classes == 0  # labels that name mixture components are not classes to learn


# ---- guidance ----------------------------------------------------------------------------------------------

def _conditional_denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = MLP(4, 4, hidden=16, depth=2, num_classes=3)
    torch.nn.init.normal_(net.out[-1].weight, std=0.5)  # the zero-initialised output would ignore the labels
    return Denoiser(net, PREDICTIONS.create("eps", PROCESSES.create("vp-linear"), 0.5)).eval()


def test_generation_in_chunks_keeps_each_chunk_its_labels_and_the_first_chunk_its_samples(monkeypatch):
    import frugaldiff.generate as generation
    from frugaldiff.components import SampleSettings

    assert [generation.chunk_size(s) for s in ((1, 28, 28), (3, 64, 64), (2,))] == [83, 5, 4096]
    monkeypatch.setattr(generation, "CHUNK_VALUES", 20)  # chunks of 5 samples of 4 values
    denoiser, labels = _conditional_denoiser(0), torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 1, 1, 0, 0])
    settings = SampleSettings.from_config(Config({"sample.steps": 4}))
    chunked = generation.generate(denoiser, settings, 12, (4,), labels=labels)
    assert torch.equal(chunked, generation.generate(denoiser, settings, 12, (4,), labels=labels))
    assert torch.equal(chunked[:5], generation.generate(denoiser, settings, 5, (4,), labels=labels[:5]))
    swapped = generation.generate(denoiser, settings, 12, (4,), labels=torch.cat([labels[:5], 2 - labels[5:]]))
    assert torch.equal(swapped[:5], chunked[:5]) and not torch.equal(swapped[5:], chunked[5:])


def test_guidance_weights_interval_and_autoguidance_give_the_exact_predictions():
    denoiser, weak = _conditional_denoiser(0), _conditional_denoiser(1)
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        for t in (0.3, 0.7):
            tt = torch.full((6,), t)
            conditional = denoiser.denoise(x, tt, labels)
            unconditional = denoiser.denoise(x, tt, torch.full_like(labels, 3))
            assert not torch.allclose(conditional, unconditional)
            assert torch.equal(guided(denoiser, labels, Guidance(0.0))(x, tt), unconditional)
            assert torch.equal(guided(denoiser, labels, Guidance(1.0))(x, tt), conditional)
            expected = unconditional + 2.5 * (conditional - unconditional)
            torch.testing.assert_close(guided(denoiser, labels, Guidance(2.5))(x, tt), expected)
            assert torch.equal(guided(denoiser, labels, Guidance(2.5, model=denoiser))(x, tt), conditional)
            weak_x0 = weak.denoise(x, tt, labels)
            torch.testing.assert_close(guided(denoiser, labels, Guidance(2.0, model=weak))(x, tt),
                                       weak_x0 + 2.0 * (conditional - weak_x0))
            inside = guided(denoiser, labels, Guidance(3.0, interval=(0.2, 0.4)))(x, tt)
            assert torch.equal(inside, conditional) == (t == 0.7)  # outside the interval: the unguided x̂0
        mixed = guided(denoiser, labels, Guidance(3.0, interval=(0.2, 0.4)))(x, torch.tensor([0.3] * 3 + [0.7] * 3))
        assert torch.equal(mixed[3:], denoiser.denoise(x, torch.tensor([0.3] * 3 + [0.7] * 3), labels)[3:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A conditional and an unconditional tiny run on digits, each with an early checkpoint and EMA snapshots."""
    root = tmp_path_factory.mktemp("guided")
    common = [*TINY_ARGS, "--set", "train.images_seen=192", "--set", "train.guide_at=0.25", "--set",
              "train.phema_snapshots=6", "--no-progress"]
    assert main(["train", *common, "--out", str(root / "conditional")]) == 0
    assert main(["train", *common, "--set", "model.num_classes=0", "--out", str(root / "unconditional")]) == 0
    return root


def test_sample_draws_classes_and_guides_as_asked(runs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs / "conditional"), "--classes", "all", "--n", "3", "--steps", "4", "--guidance",
                 "2", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["images"].shape == (30, 8, 8, 1) and f["labels"].tolist() == [c for c in range(10) for _ in range(3)]
    assert main(["sample", str(runs / "conditional"), "--class", "7", "--n", "4", "--steps", "4", "--out",
                 str(out)]) == 0
    with np.load(out) as f:
        assert f["labels"].tolist() == [7] * 4
    capsys.readouterr()
    assert main(["sample", str(runs / "unconditional"), "--class", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a class-conditional run" in err
    guide = sorted((runs / "unconditional" / "guide").iterdir())
    assert [json.loads((p / "state.json").read_text())["images_seen"] for p in guide] == [48]
    images = []
    for extra in (["--guidance", "1"], ["--guidance", "1.5"],
                  ["--guidance", "1.5", "--guide-checkpoint", str(guide[0])]):
        assert main(["sample", str(runs / "unconditional"), "--n", "4", "--steps", "3", "--out", str(out), *extra]) == 0
        with np.load(out) as f:
            images.append(f["images"])
    assert not np.array_equal(images[0], images[1])  # auto: autoguidance from the run's early checkpoint
    assert np.array_equal(images[1], images[2])  # which is that checkpoint


def test_the_auto_guidance_is_autoguidance_from_the_kept_checkpoint_and_an_explicit_weight_is_cfg(runs):
    from frugaldiff.components import SampleSettings
    from frugaldiff.generate import AUTOGUIDANCE_WEIGHT, NONE, early_checkpoint, load_run, run_guidance
    from frugaldiff.guidance import guide_share

    assert (guide_share("auto", True), guide_share("auto", False), guide_share(0.3, True)) == (0.8, 0.5, 0.3)
    assert Config()["train.guide_at"] == Config()["sample.guidance"] == Config()["sample.guide"] == "auto"
    for name in ("conditional", "unconditional"):
        config, denoiser = load_run(runs / name)[:2]
        settings = SampleSettings.from_config(config.updated({"sample.guidance": "auto"}))
        plan = run_guidance(runs / name, settings, denoiser)
        assert plan.weight == AUTOGUIDANCE_WEIGHT == 2.0 and plan.interval == (0.0, 1.0)
        expected = load_run(runs / name, early_checkpoint(runs / name))[1]
        assert all(torch.equal(a, b) for a, b in zip(plan.model.state_dict().values(),
                                                     expected.state_dict().values(), strict=True))
        explicit = run_guidance(runs / name, settings, denoiser, weight=3.0)
        assert explicit.weight == 3.0 and (explicit.model is None) == (name == "conditional")  # CFG when labelled
        unguided = SampleSettings.from_config(config.updated({"sample.guide": "none", "sample.guidance": "auto"}))
        assert run_guidance(runs / name, unguided, denoiser) == NONE
    config, denoiser = load_run(runs / "conditional")[:2]
    cfg = SampleSettings.from_config(config.updated({"sample.guide": "cfg", "sample.guidance": "auto"}))
    assert run_guidance(runs / "conditional", cfg, denoiser) == NONE  # the auto weight of CFG is 1
    # a checkpoint no further than the guide (48 images) is not guided by it: the guide must be the weaker model
    config, denoiser = load_run(runs / "unconditional")[:2]
    auto = SampleSettings.from_config(config.updated({"sample.guidance": "auto"}))
    assert run_guidance(runs / "unconditional", auto, denoiser, model_images=48) == NONE
    assert run_guidance(runs / "unconditional", auto, denoiser, model_images=49).weight == 2.0


def test_a_conditional_run_scores_its_requested_classes(runs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs / "conditional"), "--n", "20", "--steps", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["conditional_accuracy"] <= 1 and result["n_samples"] == 20


def test_samples_imitate_the_training_class_proportions_and_a_grid_is_balanced(runs, tmp_path, monkeypatch):
    """Scored samples must have the data's class mix (an imbalanced set such as twemoji, 60 % one class, scored
    balanced samples against its held-out split as if they were worse); grids (--class all) stay one row per class."""
    from frugaldiff import trainer as trainer_module
    from frugaldiff.generate import class_labels, default_labels, load_run
    from frugaldiff.runs import read_run_config

    assert class_labels(1000, 4, counts=[600, 300, 100, 0]).bincount(minlength=4).tolist() == [600, 300, 100, 0]
    assert class_labels(7, 3, counts=[5, 1, 1]).tolist() == [0, 0, 0, 0, 0, 1, 2]
    assert class_labels(6, 3, counts=[3, 3, 3]).tolist() == class_labels(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert class_labels(6, 3, "all", counts=[5, 1, 0]).tolist() == [0, 0, 1, 1, 2, 2]
    config = read_run_config(runs / "conditional")
    counts = load_dataset("digits").train_labels.bincount().tolist()
    [state] = [json.loads(p.read_text()) for p in (runs / "conditional" / "checkpoints").glob("*/state.json")][-1:]
    assert state["class_counts"] == counts and len(set(counts)) > 1  # digits' train split is nearly, not exactly, even
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs / "conditional"), "--n", "50", "--steps", "2", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["labels"].tolist() == class_labels(50, 10, counts=counts).tolist()
    _, loaded, _ = load_run(runs / "conditional")
    assert loaded.class_counts == counts
    assert default_labels(50, loaded).tolist() == class_labels(50, 10, counts=counts).tolist()
    trainer = Trainer(config, runs / "conditional", resume=True, progress=False)
    asked = []

    def generate(model, settings, n, shape, runtime, progress=False, labels=None, guidance=None):  # what it draws
        asked.append(default_labels(n, model) if labels is None else labels)
        return torch.zeros(n, 1, 8, 8)

    monkeypatch.setattr(trainer_module, "generate", generate)

    class Scorer:
        headline = "domain_fid"

        def __call__(self, images: np.ndarray) -> dict[str, float]:
            return {"domain_fid": float(len(images))}

    assert trainer.evaluate(Scorer(), 30) == 30.0
    trainer.close()
    assert asked[0].tolist() == class_labels(30, 10, counts=counts).tolist()  # the EMA model carries the counts
    assert trainer.state.ema.model.class_counts == counts


# ---- post-hoc EMA ---------------------------------------------------------------------------------------------

def test_power_function_widths_and_the_reconstruction_of_a_directly_tracked_ema(tmp_path):
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_of(gamma_of(0.08)) == pytest.approx(0.08, rel=1e-12)
    model = torch.nn.Linear(1, 3, bias=False)
    tracked, direct = PowerEMA(model), PowerEMA(model, (0.08,))
    g = torch.Generator().manual_seed(0)
    batch, steps = 16, 800
    for k in range(1, steps + 1):
        with torch.no_grad():  # a drifting, noisy trajectory of the weights
            model.weight.copy_(torch.tensor([[math.sin(k / 60)], [k / steps], [(k / steps) ** 3]])
                               + 0.05 * torch.randn(3, 1, generator=g))
        tracked.update(model, k * batch, batch)
        direct.update(model, k * batch, batch)
        if k % 100 == 0:
            save_snapshot(tmp_path, tracked, model, k * batch)
    snapshots = load_snapshots(tmp_path)
    assert len(snapshots) == 16 and {s.sigma_rel for s in snapshots} == {0.05, 0.10}
    rebuilt = reconstruct(snapshots, 0.08)["weight"]
    assert (rebuilt - direct.averages[0][0]).abs().max() < 2e-3  # the weights span about 1
    last = reconstruct(snapshots, 0.05)["weight"]  # a tracked profile is its own last snapshot
    torch.testing.assert_close(last, tracked.averages[0][0], rtol=0, atol=1e-5)


def test_ema_command_writes_a_checkpoint_that_sample_takes_and_sweeps(runs, tmp_path, capsys):
    run = runs / "conditional"
    assert len(list((run / "phema").glob("*.safetensors"))) == 6
    assert main(["ema", str(run), "--sigma-rel", "0.08"]) == 0
    checkpoint = run / "posthoc" / "sigma-0.080"
    assert json.loads((checkpoint / "state.json").read_text())["posthoc"]["sigma_rel"] == 0.08
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--checkpoint", str(checkpoint), "--n", "4", "--steps", "3", "--out",
                 str(out)]) == 0
    assert main(["report", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "r.html")]) == 0
    assert "post-hoc EMA σ_rel = 0.08" in (tmp_path / "r.html").read_text()
    assert main(["ema", str(run), "--sweep", "--sigma-rel", "0.05", "0.15", "--n", "20", "--out",
                 str(tmp_path / "sweep")]) == 0
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in result["posthoc"]] == [0.05, 0.15] and result["metric"] == "domain_fid"
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 5000
    # the sweep scores the training EMA as `frugaldiff eval` scores what `frugaldiff sample` draws (classes included)
    assert main(["sample", str(run), "--n", "20", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["domain_fid"] == pytest.approx(result["train_ema"]["value"], rel=1e-6)
    assert main(["ema", str(runs / "conditional"), "--sigma-rel", "0.5"]) == 2
    assert "outside (0, 0.28)" in capsys.readouterr().err


# ---- solvers on an exact denoiser ---------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm++2m"])
@pytest.mark.parametrize("process_name", ["vp-linear", "flow"])
def test_every_deterministic_solver_converges_as_steps_grow_on_an_exact_gmm_denoiser(solver, process_name):
    mixture = GaussianMixture.random(dim=4, components=3, seed=2)
    process = PROCESSES.create(process_name)

    def exact(x, t):
        return mixture.posterior_mean(x.double(), process.alpha(t.double()), process.sigma(t.double())).float()

    def run(steps):
        return solve(exact, process, (512, 4), steps, solver=solver, generator=torch.Generator().manual_seed(0))

    reference = run(1000)
    errors = [(run(steps) - reference).pow(2).mean().sqrt().item() for steps in (10, 20, 50, 100)]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
