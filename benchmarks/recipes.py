"""Recipe comparison at small batch: frugaldiff's defaults against the recipes people copy.

    python benchmarks/recipes.py --out DIR [--recipes ddpm iddpm min-snr edm sd3 frugal] [--batch-sizes 8 64]
        [--seeds 0 1 2] [--images 8000] [--eval-every 4000] [--eval-samples 256] [--recipe-file JSON]
        [--shard I/N] [--smoke]

Every recipe trains the same network (the default UNet) with the same AdamW settings, warm-up and cosine
schedule and the same budget in images seen, once per batch size and seed, on mnist5000; the domain FID of
EMA samples (same solver and steps for all, fixed sample seed) is measured every --eval-every images.
Runs are folders under DIR and are reused when finished, so an interrupted grid continues where it stopped
and `--shard 0/2` plus `--shard 1/2` in two shells split the grid over two processes (then run once more
without --shard to write the report). ``--recipe-file`` adds recipes (or replaces them) from a JSON object
{name: {config key: value}}, e.g. candidates for frugaldiff's defaults. Beside the FID, each run's held-out x0
error (EMA model, mean over a fixed grid of 20 t bins × 32 draws on its own process) is reported: held-out loss
is not sample quality, so the ranking follows the FID. Writes DIR/results.json, DIR/table.md (mean ± std over
seeds, at equal images, with the training minutes) and DIR/curves.png (FID against images seen, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from reporting import add_shard_option, mean_std, provenance, run_benchmark, shard_of

from frugaldiff.checkpoint import checkpoint_info, latest_checkpoint
from frugaldiff.components import FRUGAL_RECIPE, require_same_run
from frugaldiff.config import Config, parse_override
from frugaldiff.diagnostics import fixed_grid, heldout_x0_error_by_bin
from frugaldiff.metrics import Evaluator
from frugaldiff.plots import pyplot, save_figure
from frugaldiff.runs import training_clock, training_seconds
from frugaldiff.studies import kept_in_run, scored_once, train_or_reuse
from frugaldiff.trainer import Trainer

HELDOUT_X0 = "heldout_x0.json"  # each run's held-out x0 error, kept in the run
X0_GRID = (20, 32)  # its grid: t bins, draws per bin

#: The published values of settings where frugaldiff's defaults differ: every anchor starts from them, so a change of
#: default never changes an anchor (stratified logit-normal draws are the value the anchors' runs were recorded with;
#: only sd3 and jit draw from the logit-normal, and they set it).
PUBLISHED = {"diffusion.reference_images": 0, "timestep_sampler.logit_normal.m": 0.0,
             "timestep_sampler.logit_normal.stratified": True}


def with_published(recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each recipe's settings on top of :data:`PUBLISHED`."""
    return {name: {**PUBLISHED, **settings} for name, settings in recipes.items()}


#: Anchor recipes rebuilt from frugaldiff's components, and frugaldiff's own (its defaults).
RECIPES: dict[str, dict[str, Any]] = with_published({
    "ddpm": {"diffusion.process": "vp-linear", "diffusion.prediction": "eps", "diffusion.timestep_sampler": "uniform",
             "diffusion.weighting": "none"},
    "iddpm": {"diffusion.process": "vp-cosine", "diffusion.prediction": "eps",
              "diffusion.timestep_sampler": "loss_second_moment", "diffusion.weighting": "none"},
    "min-snr": {"diffusion.process": "vp-linear", "diffusion.prediction": "v", "diffusion.timestep_sampler": "uniform",
                "diffusion.weighting": "min_snr", "weighting.min_snr.gamma": 5.0},
    "edm": {"diffusion.process": "vp-linear", "diffusion.prediction": "v", "diffusion.timestep_sampler": "lognormal",
            "timestep_sampler.lognormal.stratified": False, "diffusion.weighting": "edm"},
    "sd3": {"diffusion.process": "flow", "diffusion.prediction": "velocity",
            "diffusion.timestep_sampler": "logit_normal", "timestep_sampler.logit_normal.stratified": False,
            "diffusion.weighting": "none"},
    # the newer baselines (issue: recent baselines), each on the process and target its paper trains
    "speed": {"diffusion.process": "vp-linear", "diffusion.prediction": "eps", "diffusion.timestep_sampler": "speed",
              "diffusion.weighting": "speed"},
    "laplace": {"diffusion.process": "vp-cosine", "diffusion.prediction": "eps",
                "diffusion.timestep_sampler": "laplace", "timestep_sampler.laplace.stratified": False,
                "diffusion.weighting": "none"},
    "sigmoid": {"diffusion.process": "vp-cosine", "diffusion.prediction": "eps",
                "diffusion.timestep_sampler": "uniform", "diffusion.weighting": "sigmoid"},
    "immiscible": {"diffusion.process": "vp-linear", "diffusion.prediction": "eps",
                   "diffusion.timestep_sampler": "uniform", "diffusion.weighting": "none", "train.immiscible": True},
    "kim": {"diffusion.process": "vp-linear", "diffusion.prediction": "eps", "diffusion.timestep_sampler": "kim",
            "diffusion.weighting": "none"},
    "jit": {"diffusion.process": "flow", "diffusion.prediction": "x0", "diffusion.timestep_sampler": "logit_normal",
            "timestep_sampler.logit_normal.m": 0.8, "timestep_sampler.logit_normal.s": 0.8,
            "timestep_sampler.logit_normal.stratified": False, "diffusion.weighting": "flow_loss"},
})
RECIPES["frugal"] = {}  # the defaults: frugal-small's settings up to 784 values per image, sd3's above
#: frugal's settings for small images on any data (the defaults before they followed the data), and the candidates
#: and ablations built on them
RECIPES["frugal-small"] = dict(FRUGAL_RECIPE)
RECIPES["frugal+immiscible"] = {**FRUGAL_RECIPE, "train.immiscible": True}
RECIPES["frugal+kim"] = {**FRUGAL_RECIPE, "diffusion.timestep_sampler": "kim"}
RECIPES["frugal+x0"] = {**FRUGAL_RECIPE, "diffusion.prediction": "x0"}  # x0 beats velocity on colour (prediction study)
RECIPES["frugal-nostable"] = {**FRUGAL_RECIPE, "diffusion.reference_images": 0}  # without the stable target
RECIPES["frugal+shift"] = {**FRUGAL_RECIPE, "diffusion.shift": "auto"}  # the resolution shift: √(values / 784)
RECIPES["frugal-m0"] = {**FRUGAL_RECIPE, "timestep_sampler.logit_normal.m": 0.0}  # centred as sd3 (m = 0)
RECIPES["frugal-indep"] = {**FRUGAL_RECIPE, "timestep_sampler.logit_normal.stratified": False}  # sd3's draws
RECIPES["frugal+patch"] = {**FRUGAL_RECIPE, "train.patch": True, "diffusion.reference_images": 0}  # on crops
#: What every recipe shares: the dataset and the user's default sampling settings (so the ranking is the user's).
COMMON = {"data.name": "mnist5000", "train.heldout_every": 0, "train.tensorboard": False, "train.checkpoint_every": 0}
METRIC = "eval_domain_fid"


def cell_config(recipe: str, batch: int, seed: int, images: int, eval_every: int, eval_samples: int) -> Config:
    """The config of one run of the grid."""
    return Config({**COMMON, **RECIPES[recipe], "train.batch_size": batch, "train.seed": seed,
                   "train.images_seen": images, "train.eval_every": eval_every, "train.eval_samples": eval_samples,
                   "train.name": f"{recipe}-b{batch}-s{seed}"})


def heldout_x0_error(run: Path, trainer: Trainer | None) -> float:
    """Mean held-out x0 squared error of the run's EMA model's x̂0 (a conditional model's unconditional one) over a
    fixed (image, t, noise) grid, kept in the run per checkpoint (``trainer``, the run's, is needed only while no
    value is kept for its newest checkpoint)."""
    key = {"step": checkpoint_info(latest_checkpoint(run))["step"], "bins": X0_GRID[0], "per_bin": X0_GRID[1]}

    def measure() -> dict[str, Any]:
        grid = fixed_grid(trainer.parts.process, trainer.data.heldout, *X0_GRID)
        per_bin = heldout_x0_error_by_bin(trainer.state.ema.model.eval(), grid)
        return {"per_bin": per_bin, "mean": statistics.mean(per_bin)}

    return kept_in_run(run / HELDOUT_X0, key, measure if trainer is not None else None)["mean"]


def measured(run: Path) -> bool:
    """Whether a run of a grid was trained and measured (what ``--report-only`` reports)."""
    return (run / HELDOUT_X0).is_file()


def curve(run: Path) -> tuple[list[int], list[float], list[float]]:
    """(images seen, FID, training seconds so far) at each evaluation of a run."""
    points = [(int(r["images_seen"]), float(r[METRIC]), seconds)
              for r, seconds in training_clock(run / "metrics.csv") if r.get(METRIC)]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def train_cell(config: Config, run: Path, progress: bool, train: bool = True,
               final: tuple[Evaluator, int] | None = None) -> dict[str, Any]:
    """Train (or reuse) one run of a grid: its evaluation curve, training seconds, held-out x0 error and, with
    ``final`` = (evaluator, samples), the evaluator's headline metric of that many samples of the finished run
    (scored once and kept in the run). Not ``train``: only read a run whose config is ``config`` (another run
    there is an error, as when training)."""
    if train:
        trainer = train_or_reuse(config, run, progress=progress)
    else:
        require_same_run(config, run)
        trainer = None
    images, fid, clock = curve(run)
    cell = {"images": images, "fid": fid, "clock": clock, "train_seconds": training_seconds(run / "metrics.csv"),
            "heldout_x0": heldout_x0_error(run, trainer)}
    if final is not None:
        cell["final_fid"] = scored_once(run, trainer, *final)
    return cell


def evaluation_table(results: dict[str, Any], batch: int) -> list[str]:
    """Markdown rows: each recipe's FID (mean ± std over seeds, 2 decimals) at every evaluation of batch ``batch``."""
    runs = [r for r in results["runs"] if r["batch_size"] == batch]
    points = sorted({i for r in runs for i in r["images"]})
    lines = [f"| batch {batch} | " + " | ".join(f"FID at {i:,} images" for i in points) + " |",
             "|---|" + "---:|" * len(points)]
    for recipe in results["recipes"]:
        mine = [dict(zip(r["images"], r["fid"], strict=True)) for r in runs if r["recipe"] == recipe]
        if mine:
            lines.append(f"| {recipe} | " + " | ".join(mean_std([m[i] for m in mine if i in m], 2)
                                                       for i in points) + " |")
    return lines


def report(results: dict[str, Any], out: Path) -> None:
    """table.md and curves.png from the finished runs of the grid (batch sizes without any are left out)."""
    batch_sizes = [b for b in results["batch_sizes"] if any(r["batch_size"] == b for r in results["runs"])]
    if not batch_sizes:
        (out / "table.md").write_text("no finished runs yet\n")
        return
    sampling = Config(COMMON)
    lines = [f"domain FID (lower is better) of {results['eval_samples']} EMA samples ({sampling['sample.solver']}, "
             f"{sampling['sample.steps']} steps) after {results['images']} images, mean ± std over seeds "
             f"{results['seeds']}; held-out x0 MSE ×1000 of the EMA model beside it (not a quality ranking); "
             "train min = training minutes per run (mean)\n",
             "| recipe | " + " | ".join(f"batch {b} FID | x0 MSE | train min" for b in batch_sizes) + " |",
             "|---|" + "---:|---:|---:|" * len(batch_sizes)]
    for recipe in results["recipes"]:
        cells = []
        for b in batch_sizes:
            runs = [r for r in results["runs"] if r["recipe"] == recipe and r["batch_size"] == b]
            cells += [mean_std([r["fid"][-1] for r in runs], 1), mean_std([1000 * r["heldout_x0"] for r in runs], 1),
                      f"{statistics.mean(r['train_seconds'] for r in runs) / 60:.1f}" if runs else "—"]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    for b in batch_sizes:
        lines += ["", *evaluation_table(results, b)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes, strict=True):
        for recipe in results["recipes"]:
            runs = [r for r in results["runs"] if r["recipe"] == recipe and r["batch_size"] == b]
            if not runs:
                continue
            fid = np.mean([r["fid"] for r in runs], axis=0)
            ax.plot(runs[0]["images"], fid, marker="o", label=recipe, lw=2.5 if recipe == "frugal" else 1.2)
        ax.set(xlabel="images seen", ylabel="domain FID (mean over seeds)", yscale="log", title=f"batch {b}")
        ax.legend(fontsize="small")
    save_figure(plt, fig, out / "curves.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", nargs="+", help=f"recipes to run (default: {' '.join(RECIPES)})")
    parser.add_argument("--recipe-file", type=Path, help="JSON {name: {config key: value}} of extra recipes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=8_000, help="budget in images seen per run")
    parser.add_argument("--eval-every", type=int, default=4_000, help="images between evaluations")
    parser.add_argument("--eval-samples", type=int, default=256, help="samples per evaluation")
    add_shard_option(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for every recipe, as `frugaldiff train --set`, e.g. train.precision=fp32")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that everything runs (CI)")
    args = parser.parse_args()
    if args.recipe_file:
        RECIPES.update(with_published(json.loads(args.recipe_file.read_text())))
    args.recipes = args.recipes or list(RECIPES)
    COMMON.update(parse_override(item) for item in args.set)
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)} or add them with --recipe-file")
    if args.smoke:
        args.recipes, args.batch_sizes, args.seeds = ["ddpm", "frugal"], [8], [0, 1]
        args.images, args.eval_every, args.eval_samples = 16, 8, 16
        COMMON.update({"data.name": "digits", "sample.steps": 2, "model.channels": 8, "model.channel_mult": [1, 2],
                       "model.num_res_blocks": 1, "model.attention_resolutions": [4]})
    cells = [(r, b, s) for r in args.recipes for b in args.batch_sizes for s in args.seeds]
    runs = []
    for i, (recipe, batch, seed) in shard_of(cells, args.shard):
        run = args.out / recipe / f"b{batch}-s{seed}"
        config = cell_config(recipe, batch, seed, args.images, args.eval_every, args.eval_samples)
        if args.report_only and not measured(run):
            print(f"[{i + 1}/{len(cells)}] {recipe}, batch {batch}, seed {seed}: not finished, left out", flush=True)
            continue
        print(f"[{i + 1}/{len(cells)}] {recipe}, batch {batch}, seed {seed}", flush=True)
        runs.append({"recipe": recipe, "batch_size": batch, "seed": seed,
                     **train_cell(config, run, not args.smoke, not args.report_only)})
    if args.shard != "0/1":
        print("shard done; run again without --shard for the report")
        return
    results = {"recipes": args.recipes, "batch_sizes": args.batch_sizes, "seeds": args.seeds, "images": args.images,
               "eval_every": args.eval_every, "eval_samples": args.eval_samples, **provenance(),
               "settings": {k: RECIPES[k] for k in args.recipes},
               "common": COMMON, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results, args.out)
    print((args.out / "table.md").read_text(), end="")
    print(f"wrote {args.out}/results.json, table.md, curves.png")


if __name__ == "__main__":
    run_benchmark(main)
