"""Every timestep sampler and every weighting trains end to end on digits (tiny budget)."""

import csv
import math

import pytest
from safetensors.torch import load_file
from testkit import TINY_UNET

from frugaldiff.checkpoint import latest_checkpoint
from frugaldiff.config import Config
from frugaldiff.timestep_samplers import TIMESTEP_SAMPLERS
from frugaldiff.trainer import Trainer
from frugaldiff.weighting import WEIGHTINGS

BUDGET = {**TINY_UNET, "train.images_seen": 16 * 6, "train.log_every": 3, "train.checkpoint_every": 0}


def _train(tmp_path, values):
    trainer = Trainer(Config({**BUDGET, **values}), tmp_path / "run", progress=False)
    trainer.fit()
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert all(math.isfinite(float(r["loss"])) and r["nonfinite_skipped"] == "0" for r in rows)
    return trainer


@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS.names())
def test_every_timestep_sampler_trains_and_resumes(tmp_path, name):
    trainer = _train(tmp_path, {"diffusion.timestep_sampler": name})
    resumed = Trainer(trainer.config, tmp_path / "run", resume=True, progress=False)
    assert resumed.state.sampler.state_dict().keys() == trainer.state.sampler.state_dict().keys()
    assert resumed.state.sampler.generator.get_state().equal(trainer.state.sampler.generator.get_state())


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_trains(tmp_path, name):
    trainer = _train(tmp_path, {"diffusion.weighting": name, "diffusion.prediction": "v"})
    if name == "learned":  # its parameters are optimised and checkpointed with the model's
        saved = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
        assert {"uncertainty.linear.weight", "uncertainty.linear.bias"} <= set(saved)
        assert any(p.abs().sum() > 0 for p in trainer.state.denoiser.uncertainty.parameters())
