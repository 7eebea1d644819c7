"""Training speed: one `frugaldiff train` step against a bare PyTorch loop, and per-component overheads.

    python benchmarks/throughput.py [--device cpu|cuda] [--batch-sizes 8 64] [--precisions fp32 bf16]
                                    [--blocks 5] [--steps 10] [--samples 256] [--set KEY=VALUE ...]
                                    [--only-steps] [--json OUT.json] [--smoke]

For each batch size and precision it times optimizer steps of (a) frugaldiff's train_step (x0 on
VP-linear, like the bare loop) with the loss ledger, the adaptive timestep sampler and EMA switched on (the
stable target off: its cost is measured on its own, below), and
(b) a bare loop written plainly here: the same network, AdamW, autocast and gradient clipping, uniform t, x0
targets, no EMA. Blocks of steps of the two alternate (so both see the same machine load) and the median step
time of each is reported, with their ratio (images/s of frugaldiff ÷ images/s of the bare loop; the target is
≥ 0.95). Then: the cost of each timestep sampler's sample + update per step (µs), the step time of the
mixed prediction and of a class-conditional model (mnist5000's 10 labels) against the bare loop, and the cost
of the stable target (``diffusion.reference_images``) per step (µs).
The model is the default config's UNet on mnist5000 (28×28); ``--set`` changes it for the step and generation
rows (e.g. ``--set model.name=dit``, or ``--set train.compile=true``: then the first step's time is the
compilation), ``--only-steps`` leaves out everything after them.

Utilisation: the machine's matmul peak in each precision (a 2048² matmul), the FLOPs per image of a training
step (forward + backward, ``torch.utils.flop_counter``) and of generation (the default solver and steps,
autoguided: two network calls per step), and the achieved GFLOP/s with its share of that peak, printed beside
images/s for training and generation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from reporting import provenance
from torch.utils.flop_counter import FlopCounterMode

from frugaldiff.components import SampleSettings, resolved_recipe
from frugaldiff.config import Config, parse_override
from frugaldiff.generate import AUTOGUIDANCE_WEIGHT, generate
from frugaldiff.guidance import Guidance
from frugaldiff.objective import stable_target
from frugaldiff.timestep_samplers import TIMESTEP_SAMPLERS
from frugaldiff.trainer import Trainer, train_step


def counted_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls and convolutions, forward and backward), as
    ``torch.utils.flop_counter`` counts them: a multiply-add is two."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(precision: str, device: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a ``size``² matmul in fp32 or bf16 on ``device``: the machine's practical peak for that
    precision (median of ``repeats``, after warm-up)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    times = time_calls(lambda: a @ b, repeats + 2, torch.device(device))[2:]
    return 2 * size**3 / statistics.median(times)


def step_flops_per_image(trainer: Trainer) -> float:
    """FLOPs per image of one training step of the trainer's network (forward and backward)."""
    batch = 2
    x = torch.randn(batch, *trainer.data.sample_shape, device=trainer.runtime.device)
    t = torch.rand(batch, device=trainer.runtime.device)
    net = trainer.parts.denoiser
    return counted_flops(lambda: net(x, t).float().square().mean().backward()) / batch


def utilisation(img_s: float, flops_per_image: float, peak: float) -> dict[str, float]:
    """Achieved GFLOP/s at ``img_s`` and its share of ``peak``."""
    achieved = img_s * flops_per_image
    return {"gflop_s": achieved / 1e9, "share_of_peak": achieved / peak}


def generation(trainer: Trainer, n: int) -> dict[str, Any]:
    """Images/s and FLOPs per image of generating ``n`` samples with the default sampling settings (dpm++2m,
    autoguidance with a guide of the same size: two network calls per step) under inference mode."""
    denoiser = trainer.parts.denoiser.eval()
    settings = SampleSettings.from_config(trainer.config)
    guidance = Guidance(AUTOGUIDANCE_WEIGHT, model=copy.deepcopy(denoiser))
    shape = trainer.data.sample_shape

    def run(count: int) -> torch.Tensor:
        with torch.inference_mode():
            return generate(denoiser, settings, count, shape, trainer.runtime, guidance=guidance)

    flops = counted_flops(lambda: run(2)) / 2
    run(2)  # warm-up
    seconds = time_calls(lambda: run(n), 1, trainer.runtime.device)[0]
    denoiser.train()
    return {"samples": n, "solver": settings.solver, "steps": settings.steps, "img_s": n / seconds,
            "seconds": seconds, "gflop_per_image": flops / 1e9}


def _median_step(blocks: list[list[float]]) -> float:
    return statistics.median(t for block in blocks for t in block)


def time_calls(step: Callable[[], Any], steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


class BareLoop:
    """The plain PyTorch training step frugaldiff is measured against."""

    def __init__(self, trainer: Trainer) -> None:
        self.net = trainer.parts.denoiser  # the same network (a fresh copy of its weights would train the same)
        self.runtime = trainer.runtime
        self.device = trainer.runtime.device
        self.data = trainer.data.train.to(self.device)
        self.batch, self.clip = trainer.settings.batch_size, trainer.settings.grad_clip
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4)

    def step(self) -> None:
        x0 = self.data[torch.randint(len(self.data), (self.batch,), device=self.device)]
        t = torch.rand(self.batch, device=self.device).clamp(1e-5, 1.0)
        log_alpha_bar = -(0.1 * t + 0.5 * (20.0 - 0.1) * t**2) / 2  # VP-linear, β from 0.1 to 20
        alpha = log_alpha_bar.exp().view(-1, 1, 1, 1)
        sigma = (1 - alpha**2).sqrt()
        eps = torch.randn_like(x0)
        x_t = alpha * x0 + sigma * eps
        with self.runtime.autocast():
            out = self.net(x_t, t)
        loss = (out.float() - x0).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.optimizer.step()


def compare(batch: int, precision: str, device: str, blocks: int, steps: int, run_root: Path,
            extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], Trainer]:
    """Median step times of frugaldiff and the bare loop, in alternating blocks, and the trainer they timed."""
    config = Config({"data.name": "mnist5000", "model.num_classes": 0, "train.batch_size": batch,
                     "train.precision": precision,
                     "train.device": device, "diffusion.process": "vp-linear", "diffusion.prediction": "x0",
                     "diffusion.timestep_sampler": "adaptive", "diffusion.reference_images": 0,
                     "train.heldout_every": 0, "train.tensorboard": False, "train.images_seen": 10**9, **(extra or {})})
    trainer = Trainer(config, run_root / f"b{batch}-{precision}-{len(list(run_root.glob('*')))}", progress=False)
    bare = BareLoop(trainer)

    def ours_step() -> None:
        train_step(trainer.state, trainer.parts.objective, trainer.model, trainer.settings, trainer.world)

    device = trainer.runtime.device
    first = time_calls(ours_step, 1, device)[0]  # with train.compile: the compilation
    for fn in (ours_step, bare.step):  # warm-up
        time_calls(fn, 2, device)
    ours: list[list[float]] = []
    theirs: list[list[float]] = []
    for _ in range(blocks):
        ours.append(time_calls(ours_step, steps, device))
        theirs.append(time_calls(bare.step, steps, device))
    t_ours, t_bare = _median_step(ours), _median_step(theirs)
    return {"batch_size": batch, "precision": precision, "autocast": str(trainer.runtime.amp_dtype),
            "frugaldiff_img_s": batch / t_ours, "bare_img_s": batch / t_bare, "ratio": t_bare / t_ours,
            "first_step_s": first}, trainer


def sampler_overheads(batch: int, repeats: int) -> dict[str, float]:
    """µs per step of each timestep sampler's sample(batch) + update(t, losses) on the CPU."""
    config = resolved_recipe(Config({"train.batch_size": batch}))  # the default run's recipe
    result = {}
    for name in TIMESTEP_SAMPLERS.names():
        sampler = config.timestep_sampler(config.process(), name)
        losses = torch.rand(batch, dtype=torch.float64)
        start = time.perf_counter()
        for i in range(repeats):
            sampler.set_progress(i / repeats)
            t, _ = sampler.sample(batch)
            sampler.update(t, losses)
        result[name] = (time.perf_counter() - start) / repeats * 1e6
    return result


def stable_target_overhead(batch: int, images: int, device: str, repeats: int, run_root: Path) -> float:
    """µs per step of the stable target (``diffusion.reference_images`` = ``images``) on mnist5000."""
    config = Config({"data.name": "mnist5000", "train.batch_size": batch, "train.device": device,
                     "diffusion.reference_images": images, "train.tensorboard": False})
    trainer = Trainer(config, run_root / f"stable-b{batch}-n{images}", progress=False)
    state, objective, process = trainer.state, trainer.parts.objective, trainer.parts.process
    drawn = state.draw(batch, objective)
    x_t = process.add_noise(drawn.x0, drawn.eps, drawn.t)

    def target() -> None:
        reference, _ = objective.references(drawn.x0, None, state.noise)
        stable_target(process, x_t, drawn.t, drawn.x0, drawn.eps, reference)

    times = time_calls(target, repeats + 1, trainer.runtime.device)
    return statistics.median(times[1:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per measurement")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--samples", type=int, default=256, help="samples generated for the generation speed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value of the timed model (step and generation rows), e.g. model.name=dit")
    parser.add_argument("--only-steps", action="store_true", help="only the step and generation rows")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that everything runs (CI)")
    args = parser.parse_args()
    model = dict(parse_override(item) for item in args.set)
    if args.smoke:
        args.batch_sizes, args.precisions, args.blocks, args.steps = [4], ["fp32"], 1, 1
    results: dict[str, Any] = {**provenance(), "torch": torch.__version__, "model": model,
                               "threads": torch.get_num_threads(), "device": args.device, "steps": []}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peaks = {p: matmul_peak(p, args.device, 256 if args.smoke else 2048) for p in args.precisions}
        results["matmul_peak_gflop_s"] = {p: v / 1e9 for p, v in peaks.items()}
        print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()), flush=True)
        for batch in args.batch_sizes:
            for precision in args.precisions:
                row, trainer = compare(batch, precision, args.device, args.blocks, args.steps, root, model)
                row["gflop_per_image"] = step_flops_per_image(trainer) / 1e9
                row.update(utilisation(row["frugaldiff_img_s"], row["gflop_per_image"] * 1e9, peaks[precision]))
                results["steps"].append(row)
                print(f"batch {batch:>3} {precision}: frugaldiff {row['frugaldiff_img_s']:.1f} img/s "
                      f"({row['gflop_s']:.0f} GFLOP/s, {100 * row['share_of_peak']:.1f} % of the {precision} peak), "
                      f"bare loop {row['bare_img_s']:.1f} img/s, ratio {row['ratio']:.3f}; first step "
                      f"{row['first_step_s']:.1f} s", flush=True)
                if batch == args.batch_sizes[-1]:
                    gen = generation(trainer, 16 if args.smoke else args.samples)
                    gen.update(precision=precision, **utilisation(gen["img_s"], gen["gflop_per_image"] * 1e9,
                                                                  peaks[precision]))
                    results.setdefault("generation", []).append(gen)
                    print(f"generation {precision} ({gen['samples']} samples, {gen['solver']}/{gen['steps']}, "
                          f"autoguided): {gen['img_s']:.1f} img/s ({gen['gflop_s']:.0f} GFLOP/s, "
                          f"{100 * gen['share_of_peak']:.1f} % of the peak)", flush=True)
        if args.only_steps:
            _write(results, args.json)
            return
        batch = args.batch_sizes[0]
        mixed, _ = compare(batch, "fp32", args.device, args.blocks, args.steps, root,
                           {"diffusion.prediction": "mixed"})
        results["mixed"] = {"batch_size": batch, "x0_over_mixed_step_time": mixed["ratio"],
                            "mixed_img_s": mixed["frugaldiff_img_s"], "bare_x0_img_s": mixed["bare_img_s"]}
        print(f"batch {batch} mixed (x0, velocity, acceleration heads): {mixed['frugaldiff_img_s']:.1f} img/s, "
              f"{mixed['ratio']:.3f} of the bare x0 loop's speed", flush=True)
        conditional, _ = compare(batch, "fp32", args.device, args.blocks, args.steps, root,
                                 {"model.num_classes": "auto", "train.label_dropout": 0.1})
        results["conditional"] = {"batch_size": batch, "bare_over_conditional_step_time": conditional["ratio"],
                                  "conditional_img_s": conditional["frugaldiff_img_s"],
                                  "bare_img_s": conditional["bare_img_s"]}
        print(f"batch {batch} class-conditional (10 classes, label dropout 0.1): "
              f"{conditional['frugaldiff_img_s']:.1f} img/s, {conditional['ratio']:.3f} of the bare unconditional "
              "loop's speed", flush=True)
        results["stable_target_us"] = {
            f"batch {b}, {n} images": stable_target_overhead(b, n, args.device, 3 if args.smoke else 50, root)
            for b in args.batch_sizes for n in (256, 4096)}
        print("stable target µs per step: " +
              ", ".join(f"{k} {v:.0f}" for k, v in results["stable_target_us"].items()), flush=True)
    repeats = 20 if args.smoke else 2000
    results["sampler_us"] = {str(b): sampler_overheads(b, repeats) for b in args.batch_sizes}
    for b, overheads in results["sampler_us"].items():
        print(f"timestep sampler µs per step at batch {b}: " +
              ", ".join(f"{k} {v:.0f}" for k, v in sorted(overheads.items(), key=lambda kv: kv[1])))
    _write(results, args.json)


def _write(results: dict[str, Any], path: Path | None) -> None:
    """The results as JSON (when asked), after checking every step row is finite."""
    assert all(math.isfinite(r["ratio"]) for r in results["steps"])
    if path:
        path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
