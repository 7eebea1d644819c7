"""Patch training (Patch Diffusion, Wang et al. 2023): random crops with coordinate channels, sampling at full size."""

import dataclasses
import signal

import pytest
import torch
from scipy import stats
from testkit import TINY_UNET, RecordingObjective, fit_interrupted

import frugaldiff.trainer as trainer_module
from frugaldiff.cli import main
from frugaldiff.config import Config
from frugaldiff.datasets import patch_coordinates, random_patches
from frugaldiff.errors import FrugalError
from frugaldiff.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
PATCH = {**TINY_UNET, "train.patch": True, "diffusion.reference_images": 0, "train.images_seen": 16 * 12,
         "train.checkpoint_every": 0}


def test_whole_image_coordinates_span_minus_one_to_one_by_column_then_row():
    zero = torch.zeros(2, dtype=torch.long)
    coords = patch_coordinates(5, 5, zero, zero)
    line = torch.linspace(-1, 1, 5)
    assert coords.shape == (2, 2, 5, 5)
    assert torch.allclose(coords[:, 0], line.expand(2, 5, 5))
    assert torch.allclose(coords[:, 1], line[:, None].expand(2, 5, 5))


def test_crops_hold_the_pixels_their_coordinates_name():
    side = 16
    image = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side)
    x = torch.cat([image, -image]).repeat(8, 3, 1, 1)  # 16 images, 3 channels
    generator = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(40):
        crops, coords = random_patches(x, generator, 0.5, latent=False)
        size = crops.shape[-1]
        sizes.add(size)
        assert crops.shape == (16, 3, size, size) and coords.shape == (16, 2, size, size)
        column, row = ((coords + 1) * (side - 1) / 2).round().long().unbind(1)  # back to pixel indices
        expected = (row * side + column).float()
        signs = torch.tensor([1.0, -1.0]).repeat(8).view(-1, 1, 1)
        for c in range(3):
            assert torch.equal(crops[:, c], signs * expected)
    assert sizes == {4, 8, 16}


def test_patch_sizes_follow_patch_diffusions_odds():
    x = torch.zeros(2, 1, 32, 32)
    generator = torch.Generator().manual_seed(1)
    counts = {32: 0, 16: 0, 8: 0}
    for _ in range(4000):
        counts[random_patches(x, generator, 0.4, latent=False)[0].shape[-1]] += 1
    expected = [0.4 * 4000, 0.6 * 3 / 5 * 4000, 0.6 * 2 / 5 * 4000]
    assert stats.chisquare(list(counts.values()), expected).pvalue > 1e-3
    latent = {random_patches(x, generator, 0.4, latent=True)[0].shape[-1] for _ in range(200)}
    assert latent == {16, 32}  # latents: half or whole, as Patch Diffusion's latent setting


def test_a_patch_trained_model_trains_on_crops_resumes_exactly_and_samples_at_full_size(tmp_path, monkeypatch):
    trainer = Trainer(Config(PATCH), tmp_path / "whole", progress=False)
    recorder = RecordingObjective(trainer.parts.objective)
    trainer.parts = dataclasses.replace(trainer.parts, objective=recorder)
    trainer.fit()
    sides = [b.x0.shape[-1] for b in recorder.batches]
    assert set(sides) == {2, 4, 8}
    assert all(b.coords.shape == (16, 2, s, s) for b, s in zip(recorder.batches, sides, strict=True))
    assert trainer.state.denoiser.net.stem.in_channels == 1 + 2
    samples = trainer.samples(6)
    assert samples.shape == (6, 1, 8, 8) and bool(torch.isfinite(samples).all())

    interrupted = Trainer(Config(PATCH), tmp_path / "part", progress=False)
    fit_interrupted(monkeypatch, trainer_module, "train_step", interrupted, 5, signal.SIGTERM)
    resumed = Trainer(Config(PATCH), tmp_path / "part", resume=True, progress=False)
    resumed.fit()
    for a, b in zip(resumed.state.denoiser.state_dict().values(), trainer.state.denoiser.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_patch_training_refuses_vectors_and_the_stable_target_in_one_line(tmp_path, capsys):
    for values, message in (({**TINY_UNET, "train.patch": True, "diffusion.reference_images": 32},
                             "set diffusion.reference_images = 0"),
                            ({"data.name": "gmm", "train.patch": True, "diffusion.reference_images": 0},
                             "holds vectors")):
        with pytest.raises(FrugalError, match=message) as info:
            Trainer(Config(values), tmp_path / "run", progress=False)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "run").exists()
    assert main(["train", "--set", "train.patch=true", "--set", "diffusion.reference_images=32", "--out",
                 str(tmp_path / "cli"), "--no-progress"]) == 2
    assert "train.patch" in capsys.readouterr().err
