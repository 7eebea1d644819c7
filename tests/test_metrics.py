import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
from testkit import TINY_UNET

from frugaldiff import metrics
from frugaldiff.cli import main
from frugaldiff.config import Config
from frugaldiff.datasets import load_dataset
from frugaldiff.errors import FrugalError
from frugaldiff.gmm import gmm_mixture
from frugaldiff.images import to_uint8
from frugaldiff.metrics import (
    Evaluator,
    canonical_samples,
    evaluate,
    gaussian_blur,
    load_samples,
    mixture_metrics,
    mmd,
    sliced_wasserstein,
)
from frugaldiff.trainer import Trainer


def _noise(shape, seed=0):
    return np.clip(np.random.default_rng(seed).normal(size=shape), -1, 1).astype(np.float32)


def test_fid_ranks_itself_below_heldout_below_blur_below_noise():
    evaluator = Evaluator.for_dataset("digits", ref="train")
    train, heldout = evaluator.data.train.numpy(), evaluator.data.heldout.numpy()
    itself, real, blurred, noise = (evaluator(x) for x in (train, heldout, gaussian_blur(heldout, 0.5),
                                                            _noise(heldout.shape)))
    fid = [r["domain_fid"] for r in (itself, real, blurred, noise)]
    assert abs(fid[0]) < 1e-3 * fid[3]
    assert fid[1] < 0.05 * fid[3] and fid[1] < fid[2] < fid[3], fid  # measured: 0.0, 0.038, 1.7, 10.2
    kid = [r["domain_kid"] for r in (real, blurred, noise)]
    assert kid[0] < kid[1] < kid[2]
    assert itself["precision"] == itself["recall"] == 1.0
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and noise["precision"] < 0.2 and noise["recall"] < 0.2
    assert real["classifier_accuracy"] > 0.9 and real["confidence"] > noise["confidence"]
    assert real["label_entropy"] == pytest.approx(np.log(10), abs=0.01) and real["label_entropy_max"] == np.log(10)
    assert (real["n_samples"], real["n_ref"], real["ref"]) == (len(heldout), len(train), "train")
    ratio = [r["high_freq_ratio"] for r in (itself, real, blurred, noise)]  # fine detail against the reference's
    assert ratio[0] == pytest.approx(1, abs=1e-6) and 0.9 < ratio[1] < 1.1, ratio  # measured: 1, 1.002, 0.49, 1.86
    assert ratio[2] < 0.6 and ratio[3] > 1.5, ratio  # blur removes fine detail, noise adds it
    again = evaluator(heldout)  # every call starts from the reference statistics alone (after noise too)
    assert {k: again[k] for k in ("domain_fid", "domain_kid")} == {k: real[k] for k in ("domain_fid", "domain_kid")}


def test_high_freq_power_of_white_noise_is_its_variance_times_the_blur_residual_kernel():
    std, sigma = 0.3, metrics.HIGH_FREQ_SIGMA
    noise = std * torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    taps = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float64) / sigma) ** 2)
    kernel = torch.outer(taps / taps.sum(), taps / taps.sum())  # the separable blur as one 7×7 kernel
    expected = std**2 * (1 - 2 * kernel[3, 3] + kernel.square().sum()).item()  # E[(x − k∗x)²] for i.i.d. x
    assert metrics.high_freq_power(noise) == pytest.approx(expected, rel=0.02)
    assert metrics.high_freq_power(2 * noise) == pytest.approx(4 * metrics.high_freq_power(noise), rel=1e-5)
    assert metrics.high_freq_power(torch.full((2, 3, 8, 8), 0.7)) == pytest.approx(0, abs=1e-12)


def test_samples_of_another_size_or_color_are_converted_and_mismatches_refused():
    evaluator = Evaluator.for_dataset("digits")
    heldout = torch.from_numpy(evaluator.data.heldout.numpy())
    big_rgb = torch.nn.functional.interpolate(heldout, scale_factor=2, mode="nearest").expand(-1, 3, -1, -1)
    result = evaluator(to_uint8(big_rgb))
    assert result["domain_fid"] < 0.5 * evaluator(_noise(heldout.shape))["domain_fid"]
    with pytest.raises(FrugalError, match="aspect ratios differ"):
        evaluator(np.zeros((20, 8, 16), np.uint8))
    with pytest.raises(FrugalError, match="do not fit dataset 'digits'"):
        evaluator(np.zeros((20, 2), np.float32))
    with pytest.raises(FrugalError, match="at least 10"):
        evaluator(heldout[:5].numpy())


def test_every_accepted_layout_gives_the_same_canonical_array(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, (6, 5, 7, 1), dtype=np.uint8)
    expected = u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    layouts = [u8[..., 0], u8, u8.transpose(0, 3, 1, 2), u8 / 255.0, u8.astype(np.float32) / 127.5 - 1,
               u8.astype(np.int64)]
    for a in layouts:
        np.testing.assert_allclose(canonical_samples(a), expected, atol=1e-6)
    rgb = np.repeat(u8, 3, axis=-1)
    np.testing.assert_array_equal(canonical_samples(rgb), canonical_samples(rgb.transpose(0, 3, 1, 2)))
    np.save(tmp_path / "a.npy", u8)
    np.savez(tmp_path / "b.npz", samples=u8[..., 0], other=np.zeros(3))
    for path in ("a.npy", "b.npz"):
        samples, labels = load_samples(tmp_path / path)
        np.testing.assert_allclose(samples, expected, atol=1e-6)
        assert labels is None
    np.savez(tmp_path / "c.npz", images=u8, labels=np.arange(6))
    assert load_samples(tmp_path / "c.npz")[1].tolist() == list(range(6))
    vectors = np.random.default_rng(0).normal(size=(9, 2))
    np.testing.assert_array_equal(canonical_samples(vectors), vectors.astype(np.float32))


@pytest.mark.parametrize("array,message", [
    (np.zeros((2, 3, 4, 5, 1)), "shape"),
    (np.zeros(7), "shape"),
    (np.zeros((4, 8, 8, 5)), "shape"),
    (np.full((4, 8, 8), 200.0), "values in"),
    (np.full((4, 8, 8), np.nan), "NaN"),
    (np.zeros((0, 2)), "empty"),
])
def test_bad_arrays_are_refused_in_one_line(array, message):
    with pytest.raises(FrugalError, match=message) as e:
        canonical_samples(array)
    assert "\n" not in str(e.value)


def test_files_that_are_not_samples_are_refused(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)))
    (tmp_path / "junk.npz").write_text("not a zip")
    for name, message in [("two.npz", "name it 'samples' or 'images'"), ("junk.npz", "cannot read"),
                          ("missing.npz", "no file")]:
        with pytest.raises(FrugalError, match=message):
            load_samples(tmp_path / name)


def test_gmm_exact_draws_cover_every_mode_and_a_missing_mode_shows():
    mixture = gmm_mixture(0)
    x, labels = mixture.sample(20000, torch.Generator().manual_seed(1))
    exact = mixture_metrics(x, mixture)
    assert exact["mode_coverage"] == 1.0 and exact["mode_kl"] < 0.005
    missing = mixture_metrics(x[labels != 0], mixture)
    assert missing["mode_coverage"] == 1 - 1 / 8
    assert missing["mode_kl"] > 0.5 * -np.log(1 - mixture.weights[0].item()) > 0.02
    result = evaluate(x[:4000].float().numpy(), "gmm")
    assert result["loglik"] == pytest.approx(result["loglik_ref"], abs=0.2)
    assert result["swd"] < 0.05 and {"mode_coverage", "mode_kl", "mmd"} <= set(result)
    blurry = evaluate((x[:4000] + 0.3 * torch.randn(4000, 16)).float().numpy(), "gmm")
    assert blurry["loglik"] < result["loglik"] - 1


def test_sliced_wasserstein_and_mmd_grow_with_a_shift():
    data = load_dataset("moons")
    reference = data.heldout
    swd = [sliced_wasserstein(data.train[:2000] + shift, reference) for shift in (0.0, 0.1, 0.5)]
    assert swd[0] < swd[1] < swd[2] and swd[0] < 0.05
    assert sliced_wasserstein(reference, reference) == 0.0
    mmds = [mmd(data.train[:2000] + shift, reference, 1.0) for shift in (0.0, 0.1, 0.5)]
    assert abs(mmds[0]) < 0.2 * mmds[1] and mmds[1] < mmds[2]
    result = evaluate(data.train[:500].numpy(), "moons")
    assert result["dataset"] == "moons" and result["n_ref"] == len(reference) and "domain_fid" not in result


def test_classifier_is_cached_reused_and_rebuilt(fresh_cache, monkeypatch):
    monkeypatch.setattr(metrics, "CLASSIFIER_IMAGES", 128)  # a rough classifier is enough here
    data = load_dataset("digits")
    first, accuracy = metrics.domain_classifier(data)
    path = metrics.classifier_path(data)
    assert path.parent == fresh_cache / "evaluators" and path.is_file()
    trained = metrics._train_classifier
    monkeypatch.setattr(metrics, "_train_classifier", lambda *a: pytest.fail("retrained a cached classifier"))
    again, same = metrics.domain_classifier(data)
    assert same == accuracy
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    calls = []
    monkeypatch.setattr(metrics, "_train_classifier", lambda *a: calls.append(1) or trained(*a))
    path.unlink()
    metrics.domain_classifier(data)
    path.write_bytes(b"corrupt")
    metrics.domain_classifier(data)
    assert len(calls) == 2 and path.stat().st_size > 1000
    assert list(path.parent.iterdir()) == [path], "no temporary files are left behind"


def test_datasets_without_labels_skip_the_domain_metrics(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    name = f"npz:{tmp_path / 'd.npz'}"
    result = evaluate(images, name)
    assert "domain_fid" not in result and "no class labels" in result["skipped"]["domain metrics"]
    config = Config({**TINY_UNET, "data.name": name, "train.eval_every": 32})
    with pytest.raises(FrugalError, match="set train.eval_every=0"):
        Trainer(config, tmp_path / "run", progress=False).fit()


def test_eval_command_prints_one_json_line_or_a_table(tmp_path, capsys):
    data = load_dataset("digits")
    path = tmp_path / "s.npz"
    np.savez(path, images=to_uint8(data.heldout[:64]))
    assert main(["eval", str(path), "--dataset", "digits", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["n_samples"] == 64 and result["domain_fid"] >= 0 and result["ref"] == "heldout"
    assert main(["eval", str(path), "--dataset", "digits", "--ref", "train"]) == 0
    assert "domain_fid" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--dataset", "digits", "--set", "data.seed=x"], "data.seed"),
    (["--dataset", "nope"], "'data.name' must be"),
    (["--dataset", "moons"], "do not fit dataset 'moons'"),
    (["--dataset", "digits", "--inception-weights", "/does/not/exist.pth"], "no file /does/not/exist.pth"),
])
def test_eval_command_refuses_bad_input_in_one_line(args, message, tmp_path, capsys):
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((16, 8, 8, 1), np.uint8))
    assert main(["eval", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_weights_without_torch_fidelity_say_how_to_install(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((16, 8, 8, 1), np.uint8))
    assert main(["eval", str(samples), "--dataset", "digits", "--inception-weights", str(weights)]) == 2
    assert 'pip install "frugaldiff[inception]"' in capsys.readouterr().err


def _read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_training_evaluates_ema_samples_and_resume_adds_the_column(tmp_path):
    run = tmp_path / "run"
    values = {**TINY_UNET, "train.images_seen": 32, "train.log_every": 2, "train.eval_samples": 16}
    Trainer(Config(values), run, progress=False).fit()
    assert "eval_domain_fid" not in _read(run / "metrics.csv")[0] and not (run / "eval.png").exists()
    resumed = Config({**values, "train.images_seen": 96, "train.eval_every": 32})
    Trainer(resumed, run, resume=True, progress=False).fit()
    rows = _read(run / "metrics.csv")
    evaluated = {int(r["images_seen"]): float(r["eval_domain_fid"]) for r in rows if r["eval_domain_fid"]}
    assert sorted(evaluated) == [64, 96] and all(v > 0 for v in evaluated.values())
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows})
    assert rows[0]["eval_domain_fid"] == "" and (run / "eval.png").stat().st_size > 1000


def test_the_twemoji_evaluator_ranks_the_real_floor_below_every_degradation(fresh_cache, monkeypatch):
    monkeypatch.setattr(metrics, "CLASSIFIER_IMAGES", 3000)  # a quick classifier on 16-pixel emoji
    evaluator = Evaluator.for_dataset(Config({"data.name": "twemoji", "data.image_size": 16}), ref="train")
    heldout = evaluator.data.heldout.numpy()
    floor = evaluator(heldout)["domain_fid"]
    degraded = {"blur": gaussian_blur(heldout, 1.0), "noise": metrics.add_noise(heldout, 0.3),
                "rotated colours": metrics.shift_colours(heldout), "grey": metrics.to_grey(heldout)}
    scores = {name: evaluator(x)["domain_fid"] for name, x in degraded.items()}
    assert all(score > 3 * floor for score in scores.values()), (floor, scores)  # grey included: colour is seen
