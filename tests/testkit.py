"""Constants and helpers shared by the test modules."""

import os

import pytest

from frugaldiff.trainer import Interrupted

# A network small enough that a few hundred steps take seconds on a 2-core CPU.
TINY_UNET = {
    "data.name": "digits",
    "train.precision": "fp32",  # the same in every session (auto would time the machine); tests of auto set it
    "model.channels": 8,
    "model.channel_mult": [1, 2],
    "model.num_res_blocks": 1,
    "model.attention_resolutions": [4],
    "train.batch_size": 16,
    "train.warmup_images": 64,
    "sample.n": 16,
    "sample.steps": 8,
}


class RecordingObjective:
    """Wraps a run's objective and records every batch it is given (the share one rank and micro-step trains on)."""

    def __init__(self, objective):
        self.objective, self.batches = objective, []

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, model, batch):
        self.batches.append(batch)
        return self.objective(model, batch)


def fit_interrupted(monkeypatch, owner, name: str, trainer, at: int, signum: int) -> Interrupted:
    """``trainer.fit()`` with ``owner.name`` (a step function whose first argument has ``.step``) sending ``signum``
    to this process once the step count reaches ``at``; returns the Interrupted it must raise."""
    original = getattr(owner, name)

    def step_then_signal(first, *args):
        result = original(first, *args)
        if first.step == at:
            os.kill(os.getpid(), signum)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, step_then_signal)
        with pytest.raises(Interrupted) as e:
            trainer.fit()
    return e.value
