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


def test_unet_group_channels_set_every_group_norm_and_a_saved_config_keeps_the_former_groups(tmp_path):
    """model.group_channels g: gcd(width / g, 32) groups (one group under 4) in every GroupNorm of the UNet; 1 (the
    default, and what a config saved before the key gets) is the former gcd(width, 32)."""
    from math import gcd

    from frugaldiff.components import build_network
    from frugaldiff.noise import PROCESSES

    def norms(config: Config) -> list[tuple[int, int]]:
        prediction = config.prediction(PROCESSES.create("flow"))
        net = build_network(config, prediction, (3, 16, 16))
        return [(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]

    def expected(found: list[tuple[int, int]], g: int) -> list[tuple[int, int]]:
        return [(c, gcd(c // g, 32) if gcd(c // g, 32) >= 4 else 1) for c, _ in found]

    keys = {"model.channels": 16, "model.channel_mult": [1, 2, 4]}
    former = norms(Config(keys))
    assert former == expected(former, 1) and (16, 16) in former  # 16 channels: one per group
    four = norms(Config({**keys, "model.group_channels": 4}))
    assert four == expected(four, 4) and (16, 4) in four and (64, 16) in four
    path = tmp_path / "config.toml"
    path.write_text("[model]\nchannels = 16\nchannel_mult = [1, 2, 4]\n")
    assert norms(Config.load(path, saved=True)) == former
    with pytest.raises(FrugalError, match="model.channels 16 is not a multiple of model.group_channels 3"):
        norms(Config({**keys, "model.group_channels": 3}))
