"""Where a training step's time goes: the network's forward and backward against everything else.

    python benchmarks/profile_step.py [--data twemoji] [--image-sizes 32 64] [--batch 64] [--precision auto]
                                      [--blocks 3] [--steps 5] [--json OUT.json] [--smoke]

For each image size it builds the default run's parts for that data (``model.preset = auto`` sizes the UNet)
and times, in alternating blocks so both see the same machine load, (a) frugaldiff's whole optimizer step
(``train_step``: drawing the batch, noise, the stable target, the objective, forward, backward, clipping, AdamW,
EMA, sampler and ledger updates) and (b) the network's forward and backward alone on a batch of the same shape
under the same autocast. The share (b)/(a) is the part of the step that is the network's own work. Then one
step under ``torch.profiler`` lists the operators with the most self time, so what is left to remove is named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from reporting import provenance
from throughput import time_calls

from frugaldiff.config import Config
from frugaldiff.trainer import Trainer, train_step


def profile(data: str, image_size: int, batch: int, precision: str, blocks: int, steps: int, root: Path,
            top: int = 8) -> dict[str, Any]:
    """Images/s of the whole step and of the network alone, the share, and the operators with most self time."""
    config = Config({"data.name": data, "data.image_size": image_size, "train.batch_size": batch,
                     "train.precision": precision, "train.tensorboard": False, "train.images_seen": 10**9,
                     "train.heldout_every": 0})
    trainer = Trainer(config, root / f"{data}-{image_size}", progress=False)
    state, objective, device = trainer.state, trainer.parts.objective, trainer.runtime.device
    net = trainer.model
    drawn = state.draw(batch, objective)
    x_t = trainer.parts.process.add_noise(drawn.x0, drawn.eps, drawn.t)

    def whole() -> None:
        train_step(state, objective, net, trainer.settings, trainer.world)

    def network() -> None:
        with trainer.runtime.autocast():
            out = net(x_t, drawn.t, drawn.labels)
        out.float().square().mean().backward()

    for fn in (whole, network):
        time_calls(fn, 2, device)
    times: dict[str, list[float]] = {"whole": [], "network": []}
    for _ in range(blocks):
        times["whole"] += time_calls(whole, steps, device)
        times["network"] += time_calls(network, steps, device)
    t_whole, t_net = statistics.median(times["whole"]), statistics.median(times["network"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        whole()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"data": data, "image_size": image_size, "batch_size": batch, "precision": precision,
            "autocast": str(trainer.runtime.amp_dtype), "parameters": sum(p.numel() for p in net.parameters()),
            "step_img_s": batch / t_whole, "network_img_s": batch / t_net, "network_share": t_net / t_whole,
            "top_ops": [{"op": e.key, "self_share": e.self_cpu_time_total / total, "calls": e.count} for e in ops]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="twemoji")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="seconds-long check (CI): digits at 8 px, batch 4")
    args = parser.parse_args()
    if args.smoke:
        args.data, args.image_sizes, args.batch, args.blocks, args.steps = "digits", [8], 4, 1, 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.image_sizes:
            row = profile(args.data, size, args.batch, args.precision, args.blocks, args.steps, Path(tmp))
            rows.append(row)
            print(f"{row['data']} {size} px, batch {row['batch_size']}, {row['autocast']} autocast, "
                  f"{row['parameters'] / 1e6:.1f}M parameters: step {row['step_img_s']:.1f} img/s, network alone "
                  f"{row['network_img_s']:.1f} img/s: {100 * row['network_share']:.1f} % of the step is the "
                  "network's forward and backward", flush=True)
            print("  most self time: " + ", ".join(f"{o['op']} {100 * o['self_share']:.1f} %" for o in row["top_ops"]))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **provenance()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
