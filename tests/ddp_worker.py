"""Started by tests/test_distributed.py under torchrun: train a run and dump this rank's state.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N tests/ddp_worker.py OUT KEY=VALUE...
Writes OUT/rank<r>.pt with the model, EMA, learned weighting and sampler state and every (t, x0) drawn.
"""

import sys
from pathlib import Path

import torch

from frugaldiff.config import Config, parse_override
from frugaldiff.distributed import close_distributed
from frugaldiff.trainer import Trainer


def main() -> None:
    out = Path(sys.argv[1])
    config = Config(dict(parse_override(o) for o in sys.argv[2:]))
    trainer = Trainer(config, out / "run", progress=False)
    drawn: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    draw = trainer.draw

    def recording_draw(micro_step: int) -> tuple[torch.Tensor, ...]:
        x0, t, importance, eps = draw(micro_step)
        drawn.append((trainer.step, t.clone(), x0.clone()))
        return x0, t, importance, eps

    trainer.draw = recording_draw
    trainer.fit()
    torch.save({"model": trainer.denoiser.state_dict(), "ema": trainer.ema.model.state_dict(),
                "weighting": trainer.weighting.state_dict() if isinstance(trainer.weighting, torch.nn.Module) else {},
                "sampler": trainer.sampler.state_dict(), "drawn": drawn, "step": trainer.step},
               out / f"rank{trainer.world.rank}.pt")
    close_distributed()


if __name__ == "__main__":
    main()
