"""Generation settings of a finished run: every solver × steps × schedule, scored at equal sample count and seed.

    python benchmarks/sampling.py RUN_DIR [RUN_DIR ...] --out DIR [--samples 500] [--seed 0]
        [--solvers ddpm ddim heun dpm++2m] [--steps 10 20 50 100] [--schedules karras logsnr uniform] [--smoke]
    python benchmarks/sampling.py --merge A/results.json B/results.json --out DIR   # one table from two sweeps

The run's EMA model (its newest checkpoint; a conditional run's labels in its train split's class mix, as
`frugaldiff sample` draws them; no guidance, so only the solver changes) generates --samples images from the same
seed for every setting; the domain FID against the held-out split (the run's dataset) is reported against the
number of network evaluations (NFE: one per step, Heun two but on its last step), with the seconds each setting
took on this machine. Writes DIR/results.json, DIR/table.md and DIR/fid_vs_nfe.png. The settings the README ships
as `sample.*` defaults are the best of these at a modest NFE; the docs/guidance.md tables come from this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from reporting import joined_provenance, mean_std, provenance, write_results

from frugaldiff.components import SampleSettings
from frugaldiff.generate import generate, load_run, sampling_runtime
from frugaldiff.images import to_uint8
from frugaldiff.metrics import Evaluator
from frugaldiff.plots import pyplot, save_figure
from frugaldiff.solvers import SCHEDULES, SOLVERS


def nfe(solver: str, steps: int) -> int:
    """Network evaluations of a solver run of ``steps`` steps (the step onto t = 0 returns x̂0 itself)."""
    return 2 * steps - 1 if solver == "heun" else steps


def sweep(run: Path, samples: int, seed: int, solvers: list[str], steps: list[int], schedules: list[str]
          ) -> dict[str, Any]:
    """The FID, KID and seconds of every (solver, schedule, steps) for the run's EMA model."""
    config, denoiser, info = load_run(run)
    runtime = sampling_runtime(config, denoiser, tuple(info["sample_shape"]), samples)  # as `frugaldiff sample`
    base = SampleSettings.from_config(config)
    evaluator = Evaluator.for_dataset(config)
    rows = []
    for solver in solvers:
        for schedule in schedules:
            for k in steps:
                settings = replace(base, solver=solver, schedule=schedule, steps=k)
                start = time.perf_counter()
                with torch.inference_mode():
                    x = generate(denoiser, settings, samples, tuple(info["sample_shape"]), runtime, seed=seed)
                seconds = time.perf_counter() - start
                scores = evaluator(to_uint8(x))
                rows.append({"run": str(run), "solver": solver, "schedule": schedule, "steps": k,
                             "nfe": nfe(solver, k), "fid": scores["domain_fid"], "kid": scores["domain_kid"],
                             "precision": scores["precision"], "recall": scores["recall"],
                             "seconds": seconds})
                print(f"{run.name} {solver:>8} {schedule:>7} {k:>4} steps (NFE {nfe(solver, k):>3}): FID "
                      f"{rows[-1]['fid']:.3f}, {seconds:.1f} s", flush=True)
    return {"runs": [str(run)], "images_seen": info["images_seen"], "samples": samples, "seed": seed,
            "num_classes": denoiser.num_classes, "rows": rows}


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from sweeps of the same budget, samples and seed: several runs (seeds of a recipe: the table
    gives mean ± std over them), or one run swept twice (the later row wins a repeated setting)."""
    keys = ("images_seen", "samples", "seed")
    if any(tuple(r[k] for k in keys) != tuple(results[0][k] for k in keys) for r in results):
        raise SystemExit("--merge takes sweeps of one budget with the same --samples and --seed")
    rows = {(r["run"], r["solver"], r["schedule"], r["steps"]): r for result in results for r in result["rows"]}
    runs = list(dict.fromkeys(run for result in results for run in result["runs"]))
    return {**results[0], "runs": runs, "rows": list(rows.values()), **joined_provenance(results)}


def _cells(result: dict[str, Any]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """The rows of each (solver, schedule, steps), one per run."""
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        cells.setdefault((r["solver"], r["schedule"], r["steps"]), []).append(r)
    return cells


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per solver and schedule, FID at each step count (NFE in brackets; mean ± std over runs),
    then the domain precision and recall of every setting."""
    cells, names = _cells(result), ", ".join(Path(r).name for r in result["runs"])
    steps = sorted({k for _, _, k in cells})
    over = f", mean ± std over {len(result['runs'])} runs" if len(result["runs"]) > 1 else ""
    lines = [f"domain FID of {result['samples']} samples (seed {result['seed']}) of {names} "
             f"({result['images_seen']} images), no guidance{over}; [NFE]", "",
             "| solver | schedule | " + " | ".join(f"{k} steps" for k in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    for solver in dict.fromkeys(solver for solver, _, _ in cells):
        for schedule in dict.fromkeys(schedule for _, schedule, _ in cells):
            if not any((solver, schedule, k) in cells for k in steps):
                continue
            row = [cells.get((solver, schedule, k)) for k in steps]
            lines.append(f"| {solver} | {schedule} | " + " | ".join(
                f"{mean_std([r['fid'] for r in rows], 3)} [{rows[0]['nfe']}]" if rows else "—" for rows in row) + " |")
    lines += ["", "| solver | schedule | steps | precision | recall |", "|---|---|---:|---:|---:|"]
    lines += [f"| {solver} | {schedule} | {k} | {mean_std([r['precision'] for r in rows], 3)} | "
              f"{mean_std([r['recall'] for r in rows], 3)} |"
              for (solver, schedule, k), rows in cells.items() if all("precision" in r for r in rows)]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cells = _cells(result)
    for i, solver in enumerate(dict.fromkeys(solver for solver, _, _ in cells)):
        for schedule, style in zip(dict.fromkeys(schedule for _, schedule, _ in cells), ("-", "--", ":"),
                                   strict=False):
            points = sorted((rows[0]["nfe"], statistics.mean(r["fid"] for r in rows))
                            for (a, b, _), rows in cells.items() if (a, b) == (solver, schedule))
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", color=f"C{i}", label=f"{solver} {schedule}")
    runs = ", ".join(Path(r).name for r in result["runs"])
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="domain FID",
           title=f"{result['samples']} samples of {runs}" + (" (mean)" if len(result["runs"]) > 1 else ""))
    ax.legend(fontsize="x-small", ncol=2)
    save_figure(plt, fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="*", metavar="RUN_DIR",
                        help="runs to sweep (several: seeds of one recipe, reported as mean ± std)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="no sweep: join earlier results.json files of one run (e.g. a 100-step sweep run later) "
                             "into one table and plot")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solvers", nargs="+", default=SOLVERS.names())
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES.names())
    parser.add_argument("--smoke", action="store_true", help="seconds-long check (CI): 2 solvers, 2 steps, 20 samples")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.solvers, args.steps, args.schedules = 20, ["ddim", "heun"], [2, 3], ["karras"]
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
    elif not args.runs:
        parser.error("give RUN_DIRs to sweep or --merge RESULTS_JSON ...")
    else:
        result = merge([{**sweep(run, args.samples, args.seed, args.solvers, args.steps, args.schedules),
                            **provenance()} for run in args.runs])
    write_results(args.out, result, table(result), lambda png: plot(result, png), "fid_vs_nfe.png")


if __name__ == "__main__":
    main()
