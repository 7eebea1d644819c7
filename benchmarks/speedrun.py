"""Speedrun: CPU-minutes until each recipe's samples first reach a fixed quality, at the default run's budget.

    python benchmarks/speedrun.py --out DIR [--recipes ...] [--seeds 0 1 2] [--eval-every 4000]
        [--eval-samples 256] [--final-samples N] [--minutes 5] [--threads N] [--set KEY=VALUE] [--shard I/N]
        [--report-only] [--smoke]

Every recipe of ``benchmarks/recipes.py`` trains with the default run's batch size and budget in images (the
user's ``frugaldiff train``), is evaluated every --eval-every images (domain FID of --eval-samples EMA samples with
the user's sampling settings) and its clock counts only the optimizer steps (evaluations excluded). Three targets
per dataset, fixed before any candidate is looked at: **easy**, the median final FID of ``ddpm`` (the classic
recipe at the default budget), **hard**, halfway from it to the real-data floor (training images scored against
the held-out split at the same sample count) on the log scale, and **harder**, three quarters of the way. For each
recipe: the training minutes until its curve first reaches each target (between the two evaluations around the
crossing, log FID linear in time; median over seeds; a seed that never reaches it counts as infinite), its FID at
--minutes minutes of training (the last evaluation by then) and at the end; with --final-samples N also the FID of
N samples of each finished run (less noisy than the curve's, to rank recipes whose curves end close together;
scored once and kept in the run). Runs are folders DIR/<recipe>/b<batch>-s<seed>, the same as the recipe grid's,
reused when finished. Writes DIR/results.json, DIR/table.md (the table, with machine and commit) and
DIR/speedrun.png (FID against training minutes, the targets as lines). The clock is wall time: run one process
per core (``--shard 0/2`` and ``--shard 1/2``, each pinned with ``taskset`` and ``--threads 1``), nothing else on
the machine, then once more with ``--report-only``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recipes import COMMON, RECIPES, cell_config, measured, train_cell
from reporting import add_shard_option, provenance, run_benchmark, shard_of, write_results

from frugaldiff.config import Config, parse_override
from frugaldiff.metrics import Evaluator
from frugaldiff.plots import pyplot, save_figure

#: The default targets: how far each lies from ddpm's final FID towards the real-data floor, on the log scale.
TARGETS = {"easy": 0.0, "hard": 0.5, "harder": 0.75}


def floor(evaluator: Evaluator, eval_samples: int) -> float:
    """``evaluator``'s headline metric of ``eval_samples`` real training images (seed 0)."""
    train = evaluator.data.train.numpy()
    pick = np.random.default_rng(0).choice(len(train), size=min(eval_samples, len(train)), replace=False)
    return float(evaluator(train[pick])[evaluator.headline])


def minutes_to(run: dict[str, Any], target: float) -> float:
    """Training minutes until the run's curve first reaches ``target``: between the last evaluation above it and the
    first at or below it, where the line through them (log FID against minutes) crosses it; the first evaluation's
    minutes when that one already is at or below it (or is not positive: no log); infinite when none is."""
    points = list(zip(run["fid"], run["clock"], strict=True))
    for i, (fid, seconds) in enumerate(points):
        if fid <= target:
            if i == 0 or fid <= 0:
                return seconds / 60
            before, start = points[i - 1]
            way = math.log(before / target) / math.log(before / fid)
            return (start + way * (seconds - start)) / 60
    return math.inf


def fid_at(run: dict[str, Any], minutes: float) -> float:
    """The FID of the run's last evaluation within ``minutes`` of training (its first when none is)."""
    within = [f for f, s in zip(run["fid"], run["clock"], strict=True) if s <= 60 * minutes]
    return within[-1] if within else run["fid"][0]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _cell(value: float, digits: int) -> str:
    return "not reached" if math.isinf(value) else "—" if math.isnan(value) else f"{value:.{digits}f}"


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The targets and, per recipe, the median minutes to each, the FID at ``minutes`` and at the end (with the
    seeds' range)."""
    runs, recipes = results["runs"], results["recipes"]
    if results.get("targets"):  # given (another table's), so that its recipes are measured against the same
        easy, hard, *lower = results["targets"]
        targets = {"easy": easy, "hard": hard} | {f"{v:g}": v for v in lower}
    else:
        easy = _median([r["fid"][-1] for r in runs if r["recipe"] == "ddpm"])
        targets = {name: easy ** (1 - way) * results["floor"] ** way for name, way in TARGETS.items()}
    rows = {}
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        if not mine:
            continue
        at, final = [fid_at(r, results["minutes"]) for r in mine], [r["fid"][-1] for r in mine]
        rows[recipe] = {**{f"minutes_to_{k}": _median([minutes_to(r, v) for r in mine]) for k, v in targets.items()},
                        "fid_at_minutes": _median(at), "fid_at_minutes_range": [min(at), max(at)],
                        "fid_final": _median(final), "fid_final_range": [min(final), max(final)],
                        "train_minutes": statistics.mean(r["train_seconds"] for r in mine) / 60, "seeds": len(mine)}
        if results["final_samples"]:
            scored = [r["final_fid"] for r in mine]
            rows[recipe] |= {"fid_scored": _median(scored), "fid_scored_range": [min(scored), max(scored)]}
    return {"targets": targets, "rows": rows}


def _order(summary: dict[str, Any]) -> list[str]:
    """Recipes from the fastest to the last (hardest) target, then to the one before, ..., then by FID at the time
    limit."""
    rows, names = summary["rows"], list(reversed(summary["targets"]))
    return sorted(rows, key=lambda k: (*(rows[k][f"minutes_to_{t}"] for t in names), rows[k]["fid_at_minutes"]))


def speedrun_table(results: dict[str, Any]) -> str:
    """The speedrun table in markdown, with its targets, machine and commit."""
    summary, m = results["summary"], results["minutes"]
    t = summary["targets"]
    n = results["final_samples"]
    scored_head = f" final FID of {n} samples (range; floor {results['final_floor']:.3f}) |" if n else ""
    origin = "given" if results.get("targets") else ("ddpm's final FID, and a half and three quarters of the way from "
                                                     "it to the floor, log scale")
    listed = ", ".join(f"{name} {_cell(value, 3)}" if name in TARGETS else _cell(value, 3) for name, value in t.items())
    lines = [f"{results['dataset']}, batch {results['batch_size']}, {results['images']:,} images per run, domain FID "
             f"of {results['eval_samples']} samples every {results['eval_every']:,} images; machine: "
             f"{results['machine']}; commit {results['commit']}. Targets: {listed} ({origin}; the real-data floor is "
             f"{results['floor']:.3f}). Minutes are training minutes (median over seeds; evaluations excluded).\n",
             "| recipe | seeds |" + "".join(f" min to {name} |" for name in t)
             + f" FID at {m:g} min (range) | final FID (range) | train min |{scored_head}",
             "|---|---:|" + "---:|" * (len(t) + 3) + "---:|" * bool(scored_head)]
    for recipe in _order(summary):
        row = summary["rows"][recipe]
        lo, hi = row["fid_at_minutes_range"]
        flo, fhi = row["fid_final_range"]
        scored = ""
        if scored_head:
            slo, shi = row["fid_scored_range"]
            scored = f" {row['fid_scored']:.3f} ({slo:.3f}–{shi:.3f}) |"
        lines.append(f"| {recipe} | {row['seeds']} |" + "".join(f" {_cell(row[f'minutes_to_{n}'], 1)} |" for n in t)
                     + f" {row['fid_at_minutes']:.3f} ({lo:.3f}–{hi:.3f}) | "
                     f"{row['fid_final']:.3f} ({flo:.3f}–{fhi:.3f}) | {row['train_minutes']:.1f} |{scored}")
    return "\n".join(lines) + "\n"


def plot_speedrun(results: dict[str, Any], out: Path) -> None:
    """FID against training minutes, every seed of every recipe, with the targets and the time limit."""
    t, m = results["summary"]["targets"], results["minutes"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    tab20 = plt.get_cmap("tab20").colors  # one colour per recipe: more recipes than the default cycle's 10,
    palette = tab20[0::2] + tab20[1::2]  # its ten strong colours first (neighbours in tab20 are look-alike pairs)
    for k, recipe in enumerate(_order(results["summary"])):
        for i, r in enumerate(r for r in results["runs"] if r["recipe"] == recipe):
            ax.plot(np.array(r["clock"]) / 60, r["fid"], marker="o", ms=3, color=palette[k % len(palette)],
                    lw=2.5 if recipe == "frugal" else 1.0, label=recipe if i == 0 else None)
    for name, value in t.items():
        if value == value:
            ax.axhline(value, color="grey", ls="--", lw=0.8)
            ax.text(0.01, value, f"{name} target", transform=ax.get_yaxis_transform(), fontsize="small",
                    va="bottom", color="grey")
    ax.axvline(m, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="training minutes (evaluations excluded)", ylabel="domain FID", yscale="log",
           title=f"speedrun on {results['dataset']} (every seed)")
    ax.legend(fontsize="small", ncol=2)
    save_figure(plt, fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", nargs="+", help=f"recipes to race (default: {' '.join(RECIPES)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=4_000, help="images between evaluations")
    parser.add_argument("--eval-samples", type=int, default=256, help="samples per evaluation")
    parser.add_argument("--final-samples", type=int, default=0,
                        help="also score each finished run with this many samples (0: only the curve's evaluations)")
    parser.add_argument("--minutes", type=float, default=5.0, help="report each recipe's FID at this training time")
    parser.add_argument("--targets", type=float, nargs="+", metavar="FID",
                        help="fixed targets EASY HARD [LOWER ...] (e.g. another table's) instead of ddpm's final FID "
                             "and the points a half and three quarters of the way to the floor")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, as `frugaldiff train`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for every recipe, e.g. data.name=twemoji")
    add_shard_option(parser)
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check that everything runs (CI)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    COMMON.update(parse_override(item) for item in args.set)
    if args.smoke:
        args.recipes, args.seeds, args.eval_every, args.eval_samples = ["ddpm", "frugal"], [0, 1], 8, 16
        args.minutes, args.final_samples = 0.01, 24
        COMMON.update({"data.name": "digits", "sample.steps": 2, "model.channels": 8, "model.channel_mult": [1, 2],
                       "model.num_res_blocks": 1, "model.attention_resolutions": [4], "train.images_seen": 24,
                       "train.batch_size": 8})
    args.recipes = args.recipes or list(RECIPES)
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    if args.targets and len(args.targets) < 2:
        parser.error("--targets needs at least EASY and HARD")
    if "ddpm" not in args.recipes and not args.targets and args.shard == "0/1":
        parser.error("the targets come from ddpm's runs: include ddpm in --recipes, or give --targets EASY HARD")
    default = Config(COMMON)
    batch, images = default["train.batch_size"], default["train.images_seen"]
    # one evaluator (its data loaded once) for the final scores and the floors
    evaluator = Evaluator.for_dataset(default) if args.final_samples or args.shard == "0/1" else None
    final = (evaluator, args.final_samples) if args.final_samples else None
    runs = []
    cells = [(r, s) for s in args.seeds for r in args.recipes]  # seed-major: every recipe once first
    for i, (recipe, seed) in shard_of(cells, args.shard):
        run = args.out / recipe / f"b{batch}-s{seed}"
        if args.report_only and not measured(run):
            print(f"[{i + 1}/{len(cells)}] {recipe}, seed {seed}: not finished, left out", flush=True)
            continue
        print(f"[{i + 1}/{len(cells)}] {recipe}, seed {seed}", flush=True)
        config = cell_config(recipe, batch, seed, images, args.eval_every, args.eval_samples)
        runs.append({"recipe": recipe, "seed": seed, **train_cell(config, run, not args.smoke, not args.report_only,
                                                                   final)})
    if args.shard != "0/1":
        print("shard done; run again without --shard (and with --report-only) for the table")
        return
    results = {"dataset": default["data.name"], "recipes": args.recipes, "seeds": args.seeds, "batch_size": batch,
               "images": images, "eval_every": args.eval_every, "eval_samples": args.eval_samples,
               "final_samples": args.final_samples,
               "final_floor": floor(evaluator, args.final_samples) if args.final_samples else None,
               "minutes": args.minutes, "floor": floor(evaluator, args.eval_samples), "targets": args.targets,
               **provenance(), "common": COMMON,
               "settings": {k: RECIPES[k] for k in args.recipes}, "runs": runs}
    results["summary"] = summarise(results)
    write_results(args.out, results, speedrun_table(results), lambda path: plot_speedrun(results, path),
                  "speedrun.png")


if __name__ == "__main__":
    run_benchmark(main)
