"""Guidance on finished runs: classifier-free guidance and autoguidance, scored at equal samples and seed.

    python benchmarks/guidance.py --runs DIR --out OUT [--samples 500] [--weights 1 1.25 1.5 2 3]
        [--intervals 0,1 0,0.8 0.2,0.8] [--guides cfg checkpoints] [--only cond uncond]
        [--solver S --steps K --schedule NAME] [--smoke]
    python benchmarks/guidance.py --merge A/results.json B/results.json --out OUT   # one table from several

DIR holds run folders named ``cond-s<seed>`` (class-conditional, label dropout) and ``uncond-s<seed>``, trained at
the same budget (the same CPU time: a class embedding costs nothing measurable), with every checkpoint kept
(``train.keep_checkpoints``) and an early one in RUN/guide (``train.guide_at``). For every conditional run it scores
classifier-free guidance at each weight and interval (domain FID, KID and conditional accuracy: the share the
domain classifier puts in the class asked for); for every run (conditional or not), autoguidance at each weight from
each of its earlier checkpoints. Every score uses the same --samples, seed and solver settings (default: the run's
sample.* keys). Writes OUT/results.json, OUT/table.md (means ± std over seeds) and OUT/guidance.png (FID against w).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from reporting import joined_provenance, mean_std, provenance, write_results

from frugaldiff.checkpoint import checkpoint_info, intact_checkpoints
from frugaldiff.components import SampleSettings
from frugaldiff.generate import default_labels, generate, load_run, sampling_runtime
from frugaldiff.guidance import NONE, Guidance
from frugaldiff.images import to_uint8
from frugaldiff.metrics import Evaluator
from frugaldiff.plots import pyplot, save_figure


def _score(evaluator: Evaluator, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    scores = evaluator(to_uint8(x), None if labels is None else labels.numpy())
    return {k: scores[k] for k in ("domain_fid", "domain_kid", "conditional_accuracy") if k in scores}


def score_run(run: Path, samples: int, weights: list[float], intervals: list[tuple[float, float]],
              overrides: dict[str, Any], kinds: tuple[str, ...] = ("cfg", "checkpoints")) -> list[dict[str, Any]]:
    """Rows (guide, share of the budget the guide saw, weight, interval, scores) of one run: classifier-free
    guidance (conditional runs) and autoguidance from each earlier checkpoint, as ``kinds`` asks."""
    config, denoiser, info = load_run(run)
    runtime = sampling_runtime(config, denoiser, tuple(info["sample_shape"]), samples)  # as `frugaldiff sample`
    settings = replace(SampleSettings.from_config(config), **overrides)
    evaluator, shape = Evaluator.for_dataset(config), tuple(info["sample_shape"])
    labels = default_labels(samples, denoiser)  # as `frugaldiff sample`
    guides = [("cfg", None, 1.0)] if denoiser.num_classes and "cfg" in kinds else []
    if "checkpoints" in kinds:
        earlier = [*sorted((run / "guide").glob("step-*")), *intact_checkpoints(run)[:-1]]
        guides += [(p.name, load_run(run, p)[1], checkpoint_info(p)["images_seen"]
                    / info["images_seen"]) for p in earlier]
    rows = []
    for weight in weights:
        for name, model, share in (guides if weight != 1 else [("none", None, 1.0)]):
            for interval in (intervals if weight != 1 else [(0.0, 1.0)]):
                guidance = NONE if weight == 1 else Guidance(weight, interval, model)
                with torch.inference_mode():
                    x = generate(denoiser, settings, samples, shape, runtime, labels=labels, guidance=guidance)
                rows.append({"run": run.name, "guide": name, "guide_share": share, "weight": weight,
                             "interval": list(interval), **_score(evaluator, x, labels)})
                print(f"{run.name} guide {name} (share {share:.2f}) w {weight} interval {interval}: "
                      f"FID {rows[-1]['domain_fid']:.3f}", flush=True)
    return rows


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several of the same samples and solver settings (a later row wins a repeated setting)."""
    if any((r["samples"], r["settings"]) != (results[0]["samples"], results[0]["settings"]) for r in results):
        raise SystemExit("--merge takes results of the same --samples and solver settings")
    rows = {(r["run"], r["guide"], r["weight"], tuple(r["interval"])): r for result in results for r in result["rows"]}
    runs = list(dict.fromkeys(name for result in results for name in result["runs"]))
    return {**results[0], "runs": runs, "rows": list(rows.values()), **joined_provenance(results)}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: FID (mean ± std over seeds) per kind of run, guide, weight and interval."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        kind = r["run"].rsplit("-s", 1)[0]
        share = "" if r["guide"] in ("cfg", "none") else f"{r['guide_share']:.2f}"
        groups.setdefault((kind, r["guide"] if not share else "checkpoint", share, r["weight"], tuple(r["interval"])),
                          []).append(r)
    lines = ["| runs | guide | guide's share | w | interval | domain FID | conditional accuracy | seeds |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for (kind, guide, share, weight, interval), members in groups.items():
        accuracy = [m["conditional_accuracy"] for m in members if "conditional_accuracy" in m]
        lines.append(f"| {kind} | {guide} | {share} | {weight} | {list(interval)} | "
                     f"{mean_std([m['domain_fid'] for m in members], 3)} | {mean_std(accuracy, 3)} | {len(members)} |")
    return "\n".join(lines) + "\n"


def _guide_name(row: dict[str, Any]) -> str:
    return "CFG" if row["guide"] == "cfg" else f"autoguidance, guide at {row['guide_share']:.2f} of the budget"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """One panel per kind of run (conditional, unconditional): mean FID against w for each guide, solid for
    guidance over all t, dashed for an interval; every line starts at the unguided value (w = 1)."""
    plt = pyplot()
    kinds = list(dict.fromkeys(r["run"].rsplit("-s", 1)[0] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [r for r in rows if r["run"].rsplit("-s", 1)[0] == kind]
        base = statistics.mean(r["domain_fid"] for r in mine if r["weight"] == 1)
        ax.axhline(base, ls=":", color="black", lw=0.8, label="no guidance")
        series: dict[tuple[str, tuple[float, ...]], dict[float, list[float]]] = {}
        for r in mine:
            if r["weight"] != 1:
                series.setdefault((_guide_name(r), tuple(r["interval"])), {}).setdefault(r["weight"], []).append(
                    r["domain_fid"])
        colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(name for name, _ in series))}
        for (name, interval), points in series.items():
            weights = [1.0, *sorted(points)]
            full = interval == (0.0, 1.0)
            ax.plot(weights, [base, *(statistics.mean(points[w]) for w in weights[1:])], "-" if full else "--",
                    marker="o", color=colours[name], label=name + ("" if full else f", t in {list(interval)}"))
        ax.set(xlabel="guidance weight w", yscale="log", title=f"{kind} runs")
        ax.legend(fontsize="x-small")
    axes[0][0].set_ylabel("domain FID (mean over seeds)")
    save_figure(plt, fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="no scoring: join earlier results.json files (same samples and solver settings)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--intervals", nargs="+", default=["0,1"], help="lo,hi pairs of t")
    parser.add_argument("--guides", nargs="+", default=["cfg", "checkpoints"], choices=["cfg", "checkpoints"],
                        help="cfg (conditional runs) and/or autoguidance from every earlier checkpoint")
    parser.add_argument("--only", nargs="+", default=["cond", "uncond"], choices=["cond", "uncond"],
                        help="which runs of DIR to score")
    parser.add_argument("--solver")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--schedule")
    parser.add_argument("--smoke", action="store_true", help="seconds-long check (CI)")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("solver", args.solver), ("steps", args.steps), ("schedule", args.schedule))
                 if v is not None}
    if args.smoke:
        args.samples, args.weights, overrides = 20, [1.0, 2.0], {**overrides, "steps": 2}
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
    elif args.runs is None:
        parser.error("give --runs DIR to score or --merge RESULTS_JSON ...")
    else:
        intervals = [tuple(float(v) for v in text.split(",")) for text in args.intervals]
        prefixes = tuple(f"{kind}-s" for kind in args.only)
        runs = sorted(p for p in args.runs.iterdir() if p.is_dir() and p.name.startswith(prefixes))
        rows = [row for run in runs for row in score_run(run, args.samples, args.weights, intervals, overrides,
                                                         tuple(args.guides))]
        result = {"runs": [r.name for r in runs], "samples": args.samples, "settings": overrides, "rows": rows,
                  **provenance()}
    write_results(args.out, result, table(result["rows"]), lambda png: plot(result["rows"], png), "guidance.png")


if __name__ == "__main__":
    main()
