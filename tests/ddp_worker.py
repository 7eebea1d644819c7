"""Started by tests/test_distributed.py under torchrun: train a run and dump this rank's state.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N tests/ddp_worker.py OUT KEY=VALUE...
Writes OUT/rank<r>.pt with the model (its learned uncertainty included), EMA and sampler state and the (step, t,
x0) of every micro-batch this rank trained on.
"""

import sys
from pathlib import Path

import torch
from testkit import RecordingObjective

from frugaldiff.config import Config, parse_override
from frugaldiff.distributed import close_distributed
from frugaldiff.trainer import Trainer


class StepRecording(RecordingObjective):
    """Records the optimizer step of every batch too."""

    def __init__(self, objective, state) -> None:
        super().__init__(objective)
        self.state, self.steps = state, []

    def __call__(self, model, batch):
        self.steps.append(self.state.step)
        return super().__call__(model, batch)


def main() -> None:
    out = Path(sys.argv[1])
    config = Config(dict(parse_override(o) for o in sys.argv[2:]))
    trainer = Trainer(config, out / "run", progress=False)
    state = trainer.state
    recording = StepRecording(trainer.parts.objective, state)
    trainer.parts.objective = recording
    trainer.fit()
    drawn = [(step, b.t.clone(), b.x0.clone()) for step, b in zip(recording.steps, recording.batches, strict=True)]
    torch.save({"model": state.denoiser.state_dict(), "ema": state.ema.model.state_dict(),
                "sampler": state.sampler.state_dict(), "drawn": drawn, "step": state.step},
               out / f"rank{trainer.world.rank}.pt")
    close_distributed()


if __name__ == "__main__":
    main()
