"""Pixel space against latent diffusion at equal CPU time, on 128 px colour images (OpenMoji).

    python benchmarks/latent.py --out OUT [--minutes 20] [--autoencoder-minutes 6] [--factors auto 4]
        [--samples 256] [--seed 0] [--set KEY=VALUE ...] [--smoke]

Both sides get --minutes of wall-clock training. The pixel side trains `frugaldiff train` on the images; the latent
side spends --autoencoder-minutes on `frugaldiff train-autoencoder`, encodes the data with it, and trains the
diffusion model on the latents for what is left (encoding included). Each side's budget in images is its measured
throughput (a few timed steps first) × its minutes, so the learning-rate schedule ends where the time does. Then
--samples samples of each (the default sampling settings and guidance; latents decoded) are scored by the domain
evaluator against the held-out images, beside the floor (held-out against train images). Writes OUT/results.json,
OUT/table.md and OUT/latent.png (real images, pixel-space samples and each latent side's samples side by side), one
latent side per --factors value (autoencoder.factor: its latents' downsampling per side); the runs stay
under OUT for `frugaldiff sample`/`report`. --smoke: a 1-minute race at 32 px.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reporting import provenance, run_benchmark, write_results

from frugaldiff.api import train_autoencoder
from frugaldiff.autoencoder import AutoencoderTrainer
from frugaldiff.components import build_data, model_data
from frugaldiff.config import Config, parse_override
from frugaldiff.generate import sample_run
from frugaldiff.images import make_grid, to_uint8
from frugaldiff.metrics import Evaluator
from frugaldiff.plots import pyplot, save_figure
from frugaldiff.trainer import Trainer, train_step

SCORES = ("domain_fid", "domain_kid", "precision", "recall", "conditional_accuracy")


def _rate(step: Any, batch: int, warmup: int = 2, timed: int = 4) -> float:
    """Images per second of ``step()`` (one optimizer step of ``batch`` images) after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    return timed * batch / (time.perf_counter() - start)


def _probe(trainer: Trainer | AutoencoderTrainer, step: Any, batch: int, folder: Path) -> float:
    """:func:`_rate` of ``trainer``'s ``step``, then the throw-away run folder is closed and removed."""
    try:
        return _rate(step, batch)
    finally:
        trainer.metrics.close()
        trainer.lock.release()
        shutil.rmtree(folder)


def diffusion_rate(config: Config, folder: Path) -> float:
    """Training images per second of ``config``'s diffusion run (a throw-away run folder)."""
    trainer = Trainer(config.updated({"train.images_seen": 10**9}), folder, progress=False)
    s = trainer.settings
    return _probe(trainer, lambda: train_step(trainer.state, trainer.parts.objective, trainer.model, s, trainer.world),
                  s.batch_size, folder)


def autoencoder_rate(config: Config, folder: Path) -> float:
    """Training images per second of ``config``'s autoencoder run (a throw-away run folder)."""
    trainer = AutoencoderTrainer(config.updated({"autoencoder.images_seen": 10**9}), folder, progress=False)
    return _probe(trainer, trainer.train_step, trainer.settings.batch_size, folder)


def budget(rate: float, seconds: float, batch: int) -> int:
    """Images for ``seconds`` at ``rate``, a whole number of batches (at least one)."""
    return max(1, int(rate * seconds) // batch) * batch


def score(run: Path, evaluator: Evaluator, n: int) -> tuple[dict[str, float], np.ndarray]:
    drawn = sample_run(run, n=n)
    scores = evaluator(drawn.values, drawn.labels)
    return {k: float(scores[k]) for k in SCORES if k in scores}, drawn.values


def race(base: Config, out: Path, minutes: float, ae_minutes: float, samples: int,
         factors: list[int | str]) -> dict[str, Any]:
    """Train every side under ``out`` (pixel/, and autoencoder-f<F>/ + latent-f<F>/ per autoencoder factor) and
    score them."""
    out.mkdir(parents=True, exist_ok=True)
    images = build_data(base)  # rendered and cached before any clock starts
    evaluator = Evaluator(images)
    floor = Evaluator(images, ref="train")(to_uint8(images.heldout))  # trains (and caches) the classifier too
    result: dict[str, Any] = {**provenance(), "dataset": base["data.name"], "image_size": images.sample_shape[1],
                              "minutes": minutes, "autoencoder_minutes": ae_minutes, "samples": samples,
                              "floor": {k: float(floor[k]) for k in SCORES if k in floor}, "sides": {}}
    shown: dict[str, np.ndarray] = {"real": to_uint8(images.heldout[:16])}

    # pixel space
    rate = diffusion_rate(base, out / "probe-pixel")
    config = base.updated({"train.images_seen": budget(rate, 60 * minutes, base["train.batch_size"])})
    start = time.perf_counter()
    Trainer(config, out / "pixel").fit()
    seconds = time.perf_counter() - start
    scores, values = score(out / "pixel", evaluator, samples)
    result["sides"]["pixel"] = {"images_per_s": rate, "images_seen": config["train.images_seen"],
                                "train_minutes": seconds / 60, **scores}
    shown["pixel"] = values[:16]

    for factor in factors:  # latent: the autoencoder, then diffusion on its latents in the time left
        name = f"latent-f{factor}"
        ae_base = base.updated({"autoencoder.factor": factor})
        ae_rate = autoencoder_rate(ae_base, out / "probe-autoencoder")
        ae_config = ae_base.updated({"autoencoder.images_seen": budget(ae_rate, 60 * ae_minutes,
                                                                       base["autoencoder.batch_size"])})
        start = time.perf_counter()
        folder = train_autoencoder(ae_config, run_dir=out / f"autoencoder-f{factor}", progress=True)
        latent_base = base.updated({"data.autoencoder": str(folder)})
        model_data(latent_base, images, progress=True)  # encoded (and cached) inside the latent side's time
        ae_seconds = time.perf_counter() - start  # training, export and encoding the data
        rate_latent = diffusion_rate(latent_base, out / "probe-latent")
        left = max(60.0, 60 * minutes - ae_seconds)
        config = latent_base.updated({"train.images_seen": budget(rate_latent, left, base["train.batch_size"])})
        start = time.perf_counter()
        Trainer(config, out / name).fit()
        seconds = time.perf_counter() - start
        scores, values = score(out / name, evaluator, samples)
        reconstruction = json.loads((folder.parent / "eval.json").read_text())
        result["sides"][name] = {"images_per_s": rate_latent, "images_seen": config["train.images_seen"],
                                 "latent_shape": reconstruction["latent_shape"],
                                 "autoencoder_psnr_db": reconstruction["heldout_psnr_db"],
                                 "autoencoder_images_per_s": ae_rate,
                                 "autoencoder_images_seen": ae_config["autoencoder.images_seen"],
                                 "autoencoder_minutes": ae_seconds / 60, "train_minutes": (ae_seconds + seconds) / 60,
                                 **scores}
        shown[name] = values[:16]
    result["shown"] = {k: v.tolist() for k, v in shown.items()}
    return result


def table(result: dict[str, Any]) -> str:
    cols = [k for k in SCORES if k in result["floor"]]
    lines = [f"{result['dataset']} at {result['image_size']} px, {result['minutes']:g} CPU-minutes a side "
             f"({result['samples']} samples each; {result['machine']}, commit {result['commit']})", "",
             "| side | minutes | img/s (diffusion) | images seen | " + " | ".join(cols) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cols)]
    for name, side in result["sides"].items():
        seen = f"{side['images_seen']:,}"
        if name.startswith("latent"):
            shape = "×".join(map(str, side["latent_shape"]))
            seen += (f" on {shape} latents (+ {side['autoencoder_images_seen']:,} autoencoder, "
                     f"{side['autoencoder_minutes']:.1f} min, PSNR {side['autoencoder_psnr_db']:.1f} dB)")
        lines.append(f"| {name} | {side['train_minutes']:.1f} | {side['images_per_s']:.1f} | {seen} | " +
                     " | ".join(f"{side[k]:.4g}" for k in cols) + " |")
    lines.append("| floor (held-out vs train) | | | | " + " | ".join(f"{result['floor'][k]:.4g}" for k in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], png: Path) -> None:
    plt = pyplot()
    names = list(result["shown"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.6))
    for ax, name in zip(axes, names, strict=True):
        grid = make_grid(np.asarray(result["shown"][name], dtype=np.uint8), 4)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
        if name == "real":
            title = "held-out images"
        else:
            side = result["sides"][name]
            where = "pixel space" if name == "pixel" else "latent " + "×".join(map(str, side["latent_shape"]))
            title = f"{where}\ndomain FID {side['domain_fid']:.3g}"
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{result['dataset']} {result['image_size']} px, {result['minutes']:g} CPU-minutes each", y=1.0)
    fig.tight_layout()
    save_figure(plt, fig, png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0, help="training minutes per side")
    parser.add_argument("--autoencoder-minutes", type=float, default=6.0, help="the latent side's autoencoder share")
    parser.add_argument("--samples", type=int, default=256, help="samples scored per side")
    parser.add_argument("--factors", nargs="+", default=["auto"], help="autoencoder.factor of each latent side")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of every run")
    parser.add_argument("--smoke", action="store_true", help="a 1-minute race at 32 px (checks the script)")
    args = parser.parse_args()
    values: dict[str, Any] = {"data.name": "openmoji", "train.seed": args.seed, "train.eval_every": 0}
    if args.smoke:
        values |= {"data.image_size": 32, "model.channels": 8, "model.channel_mult": [1, 2],
                   "model.attention_resolutions": [], "train.batch_size": 16, "autoencoder.channels": 8}
        args.minutes, args.autoencoder_minutes, args.samples = 1.0, 0.3, 64
    base = Config(values).updated(dict(parse_override(o) for o in args.overrides))
    torch.manual_seed(args.seed)
    factors = [f if f == "auto" else int(f) for f in args.factors]
    result = race(base, args.out, args.minutes, args.autoencoder_minutes, args.samples, factors)
    write_results(args.out, result, table(result), lambda png: plot(result, png), "latent.png")


if __name__ == "__main__":
    run_benchmark(main)
