"""The networks' shapes and wiring: the patch transformer (DiT)."""

import pytest
import torch
from testkit import TINY_UNET

from frugaldiff.config import Config
from frugaldiff.errors import FrugalError
from frugaldiff.networks import NETWORKS, sincos_positions
from frugaldiff.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dit_starts_at_zero_and_maps_each_patch_back_to_its_own_pixels():
    net = NETWORKS.create("dit", 3, 3, 8, width=16, depth=0, patch_size=2)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert torch.equal(net(x, t), torch.zeros(2, 3, 8, 8))  # zero-initialised decoder
    with torch.no_grad():
        net.decode.weight.normal_()
    base = net(x, t)
    moved = x.clone()
    moved[:, :, 2:4, 4:6] += 1.0  # the patch in token row 1, column 2
    changed = (net(moved, t) - base).abs().sum((0, 1)) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)  # without blocks no token sees another: only that patch's pixels move


def test_sincos_positions_tell_every_token_apart():
    pos = sincos_positions(4, 7, 32)
    assert pos.shape == (28, 32) and torch.cdist(pos, pos).fill_diagonal_(1).min() > 0.1


def test_dit_trains_samples_and_refuses_a_patch_size_that_does_not_divide_the_side(tmp_path):
    values = {**TINY_UNET, "model.name": "dit", "model.hidden": 32, "model.depth": 2, "model.patch_size": 2,
              "train.images_seen": 16 * 10}
    trainer = Trainer(Config(values), tmp_path / "run", progress=False)
    trainer.fit()
    assert type(trainer.state.denoiser.net).__name__ == "DiT"
    samples = trainer.samples(4)
    assert samples.shape == (4, 1, 8, 8) and bool(torch.isfinite(samples).all())
    with pytest.raises(FrugalError, match="model.patch_size = 3 does not divide the image side 8") as info:
        Trainer(Config({**values, "model.patch_size": 3}), tmp_path / "bad", progress=False)
    assert "\n" not in str(info.value)
