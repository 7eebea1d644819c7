"""Studies that train several runs and compare them: the prediction-type study and the batch-size sweep.

Each trains (or reuses, when finished) one run per model under its folder at equal budget, so a rerun skips
what is done, then measures every run on the same fixed held-out grid.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write_text, checkpoint_info, latest_checkpoint
from .components import build_data, build_process, model_data, true_mixture
from .config import Config
from .diagnostics import (
    GRID_SEED,
    denoiser_predictions,
    fixed_grid,
    gate_weights_by_bin,
    heldout_loss_by_bin,
    x0_error_by_bin,
)
from .errors import FrugalError
from .generate import class_labels
from .gmm import GaussianMixture
from .images import make_grid, to_uint8
from .metrics import EVALUATOR_VERSION, HIGHER_IS_BETTER, Evaluator
from .networks import Denoiser
from .plots import plot_batch_sweep, plot_error_by_bin, plot_gate_weights, plot_sample_panels
from .prediction import MixedPrediction, inverse_error_shares
from .runs import training_seconds
from .trainer import Trainer


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FrugalError(message)


def _write_json(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def train_or_reuse(config: Config, run: Path, progress: bool = True) -> Trainer:
    """A trainer of ``config`` in ``run`` trained to its budget: started, continued or, when finished, reused
    (an experiment rerun skips what is done); a run of another config there is an error. A run of this config
    that was stopped before its first checkpoint starts again from step 0 (the trainer does that). A run that
    another process holds (a study sharing the folder) is waited for, then continued or reused."""
    started = (run / "config.toml").is_file()
    trainer = Trainer(config, run, resume=started, progress=progress, wait=True, same_config=True)
    if trainer.done:
        trainer.close()  # nothing to train: let another process (or a later study) open the folder
    else:
        trainer.fit()
    return trainer


def kept_in_run(path: Path, key: dict[str, Any], compute: Callable[[], Any] | None) -> Any:
    """A measurement of a run computed once per ``key`` and kept in ``path`` (JSON ``{"kept": [{key, value},
    ...]}``, one entry per key, written atomically), so that a rerun of an experiment reuses it; ``compute`` None
    reads only (an error when ``path`` keeps no value for ``key``)."""
    kept = json.loads(path.read_text()) if path.is_file() else {"kept": []}
    entries = kept.get("kept", [kept])  # a file of one {key, value} (written before several keys were kept)
    for entry in entries:
        if entry.get("key") == key:
            return entry["value"]
    if compute is None:
        raise FrugalError(f"{path} keeps no value for {key}; run the experiment without reading only")
    value = compute()
    _write_json(path, {"kept": [*entries, {"key": key, "value": value}]})
    return value


def scored_once(run: Path, trainer: Trainer | None, evaluator: Evaluator, samples: int) -> float:
    """The headline metric of ``samples`` EMA samples of the finished run in ``run``, computed once and kept in
    ``RUN/study-score.json`` (keyed by the run's last checkpoint, the sample count and the evaluator), so that a
    rerun of an experiment reuses the scores of the runs it reuses; ``trainer`` (the run's) None reads only."""
    key = {"step": checkpoint_info(latest_checkpoint(run))["step"], "samples": samples, "metric": evaluator.headline,
           "ref": evaluator.ref, "evaluator_version": EVALUATOR_VERSION, "inception": evaluator.inception is not None,
           "labels": "train-proportions"}  # a conditional run's classes as in its train split (balanced before)
    compute = None if trainer is None else lambda: trainer.evaluate(evaluator, samples)
    return float(kept_in_run(run / "study-score.json", key, compute))


# ---------------------------------------------------------------------------------------------------------
# The prediction-type study

PANEL_SAMPLES, PANEL_COLUMNS = 30, 6  # samples.png of a study: this many samples of each model, in this many columns

#: The study runs on vp-linear, where every named type (acceleration too) is defined; per dataset: its budget.
STUDY_PROCESS = "vp-linear"
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gmm": {"diffusion.sigma_data": 0.8, "train.images_seen": 200_000, "train.batch_size": 32,
            "train.warmup_images": 2000, "sample.n": 512},
    "mnist5000": {"train.images_seen": 20_000, "train.batch_size": 32},
    "twemoji": {"train.images_seen": 20_000, "train.batch_size": 32},
}


def study_models(types: Sequence[str], strategies: Sequence[str], gates: Sequence[str] = ("timestep",),
                 blend: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Model name → config changes: one model per single type, the single-head ``blend`` when ``blend`` is given
    (its own ``diffusion.blend.*`` changes, which no other model carries; empty: the config's), and one per mixed
    strategy and gate over ``types`` (``mixed-<strategy>`` for the timestep gate, ``mixed-<strategy>-<gate>`` for
    the others)."""
    models: dict[str, dict[str, Any]] = {t: {"diffusion.prediction": t} for t in types}
    if blend is not None:
        models["blend"] = {"diffusion.prediction": "blend", **blend}
    for strategy in strategies:
        for gate in gates:
            name = f"mixed-{strategy}" if gate == "timestep" else f"mixed-{strategy}-{gate}"
            models[name] = {"diffusion.prediction": "mixed", "diffusion.mixed.types": list(types),
                            "diffusion.mixed.strategy": strategy, "diffusion.mixed.gate": gate}
    return models


def prediction_study(base: Config, out_dir: Path, types: Sequence[str] = ("x0", "velocity", "acceleration"),
                     strategies: Sequence[str] = ("joint", "heads", "heads+joint"), bins: int = 10,
                     per_bin: int = 512, progress: bool = True, gates: Sequence[str] = ("timestep",),
                     blend: Mapping[str, Any] | None = None, seeds: Sequence[int] | None = None,
                     samples: int = 0) -> dict[str, Any]:
    """Train (or reuse, when finished) one run per model of :func:`study_models` and seed (default: the config's)
    under ``out_dir/<model>/seed-<seed>`` at equal budget and batch, then measure each model's (and each mixed
    head's) x0 error per t bin on a fixed held-out grid (per-sample errors averaged over seeds), the gate weights
    over t, and, with ``samples`` > 0 on data that has a quality metric, the headline metric of that many EMA
    samples of every run (the run's own sampling settings) and its training seconds. Writes ``results.json``,
    ``table.md``, ``x0_error.png``, ``gates.png`` and, for scored images, ``samples.png`` (the first seed's).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds) if seeds else [base["train.seed"]]
    data = model_data(base, build_data(base))  # its held-out grid is in the model's space (latents or pixels)
    mixture = true_mixture(base)
    evaluator = Evaluator(build_data(base), mixture=mixture) if samples else None
    if evaluator is not None and evaluator.headline is None:
        evaluator = None  # no quality metric for this data: x0 errors only
    results: dict[str, Any] = {"dataset": base["data.name"], "images_seen": base["train.images_seen"],
                               "batch_size": base["train.batch_size"], "process": base["diffusion.process"],
                               "seeds": seeds, "models": {}, "gates": {}, "quality": {}}
    per_sample: dict[str, list[Tensor]] = {}
    panels: dict[str, np.ndarray] = {}  # the first seed's samples of every model, for samples.png
    for name, changes in study_models(types, strategies, gates, blend).items():
        runs: list[dict[str, list[Tensor]]] = []
        gate_runs: list[dict[str, list[float]]] = []
        quality: dict[str, Any] = {"values": [], "train_seconds": []}
        for seed in seeds:
            config = base.updated({**changes, "train.name": name, "train.seed": seed})
            trainer = train_or_reuse(config, out_dir / name / f"seed-{seed}", progress)
            grid_key = {"step": trainer.state.step, "bins": bins, "per_bin": per_bin, "grid_seed": GRID_SEED}
            measured = kept_in_run(trainer.files.root / "study-x0-error.json", grid_key,
                                   partial(measure_on_grid, trainer.state.ema.model.eval(), data.heldout, bins,
                                           per_bin, mixture))
            results["edges"] = measured["edges"]
            if "bayes" in measured:
                results["bayes"] = measured["bayes"]
            floor = measured.get("bayes", [0.0] * bins)  # excess over Bayes per sample: minus its bin's Bayes error
            runs.append({output: [torch.tensor(v, dtype=torch.float64) - b for v, b in zip(cells, floor, strict=True)]
                         for output, cells in measured["samples"].items()})
            if "gates" in measured:
                gate_runs.append(measured["gates"])
            if evaluator is not None and seed == seeds[0] and evaluator.data.kind == "image":
                labels = class_labels(PANEL_SAMPLES, trainer.state.classes)  # balanced, for looking
                panels[name] = make_grid(to_uint8(trainer.samples(PANEL_SAMPLES, labels=labels)), ncols=PANEL_COLUMNS)
            if evaluator is not None:
                quality["values"].append(scored_once(trainer.files.root, trainer, evaluator, samples))
                quality["train_seconds"].append(training_seconds(trainer.files.metrics))
        for output in runs[0]:
            label = name if output == "model" else f"{name} {output}"
            per_sample[label] = [sum(r[output][b] for r in runs) / len(runs) for b in range(bins)]
            results["models"][label] = [float(v.mean()) for v in per_sample[label]]
        if gate_runs:
            results["gates"][name] = {head: [sum(g[head][b] for g in gate_runs) / len(gate_runs) for b in range(bins)]
                                      for head in gate_runs[0]}
        if evaluator is not None:
            results["quality"][name] = quality
    results["measure"] = "excess x0 error over Bayes" if mixture is not None else "x0 error"
    if evaluator is not None:
        results["metric"], results["samples"] = evaluator.headline, samples
        results["higher_is_better"] = evaluator.headline in HIGHER_IS_BETTER
    results["claims"] = study_claims(results, per_sample, types)
    results["blend"] = measured_blend(results["models"], types)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out_dir / "table.md", study_table(results))
    plot_error_by_bin(results, out_dir / "x0_error.png")
    if results["gates"]:
        plot_gate_weights(results, out_dir / "gates.png")
    if panels:
        plot_sample_panels(panels, f"{results['dataset']}, {results['images_seen']} images, seed {seeds[0]}: "
                           f"{PANEL_SAMPLES} samples per model (its own sampling settings)", out_dir / "samples.png")
    return results


def measure_on_grid(denoiser: Denoiser, heldout: Tensor, bins: int, per_bin: int,
                    mixture: GaussianMixture | None = None) -> dict[str, Any]:
    """What the study measures of one run on the fixed held-out grid, as JSON: the bin edges, every output's
    per-sample x0 errors per bin (``samples``; a mixture's heads too), with a ``mixture`` the Bayes error per bin,
    and a mixed model's mean gate weights per bin (``gates``)."""
    grid = fixed_grid(denoiser.process, heldout, bins, per_bin)
    errors = x0_error_by_bin(denoiser_predictions(denoiser), grid, mixture, denoiser.process)
    measured: dict[str, Any] = {"edges": errors["edges"],
                                "samples": {o: [v.tolist() for v in cells] for o, cells in errors["samples"].items()}}
    if "bayes" in errors:
        measured["bayes"] = errors["bayes"]
    if isinstance(denoiser.prediction, MixedPrediction):
        measured["gates"] = gate_weights_by_bin(denoiser, grid)
    return measured


def study_claims(results: dict[str, Any], samples: dict[str, list[Tensor]], types: Sequence[str]) -> dict[str, Any]:
    """The study's questions, answered from its numbers: which single type is best per bin, and in which bins
    each mixture is worse than its own best head or than the best single-type model. "Worse" means the paired
    per-sample difference on the same grid points exceeds two standard errors (``samples``: per-sample errors of
    each model and bin), so noise alone is not reported as a loss."""
    models = results["models"]
    singles = [t for t in types if t in models]
    bins = len(results["edges"]) - 1

    def worse_bins(name: str, rivals: list[str]) -> list[int]:
        found = []
        for b in range(bins):
            best = min(rivals, key=lambda r: models[r][b])
            diff = samples[name][b] - samples[best][b]
            if diff.mean() > 2 * diff.std() / math.sqrt(len(diff)):
                found.append(b)
        return found

    claims: dict[str, Any] = {"best_single_type_per_bin": [min(singles, key=lambda t: models[t][b])
                                                           for b in range(bins)] if singles else [],
                              "mixtures": {}}
    for name, values in models.items():
        if not (name.startswith("mixed-") or name == "blend") or " " in name:
            continue
        heads = [f"{name} head:{t}" for t in types if f"{name} head:{t}" in models]
        claims["mixtures"][name] = {
            "bins_worse_than_own_best_head": worse_bins(name, heads) if heads else [],
            "bins_worse_than_best_single_model": worse_bins(name, singles) if singles else [],
            "mean": sum(values) / bins,
        }
    quality = results.get("quality") or {}
    rated = [t for t in singles if t in quality]
    if rated:
        sign = -1 if results.get("higher_is_better") else 1  # sign·value: lower is better
        mean = {n: sign * statistics.mean(q["values"]) for n, q in quality.items()}
        best = min(rated, key=mean.__getitem__)
        best_seed = min(sign * v for v in quality[best]["values"])
        claims["quality"] = {
            "best_model": min(mean, key=mean.__getitem__), "best_single_type": best,
            # every seed of the candidate better than every seed of the best single type
            "better_than_best_single_beyond_seed_spread": [n for n, q in quality.items() if n not in rated and all(
                sign * v < best_seed for v in q["values"])]}
    return claims


def measured_blend(models: dict[str, list[float]], types: Sequence[str]) -> dict[str, Any] | None:
    """The blend of the study's first two single types that its measurements call for: ``diffusion.blend.types``
    and, per t bin, ``diffusion.blend.weights`` = the second type's inverse-error share of x̂0 (None where fewer
    than two single types were trained or an error is not positive, e.g. an excess over Bayes)."""
    singles = [t for t in types if t in models][:2]
    if len(singles) < 2 or min(min(models[t]) for t in singles) <= 0:
        return None
    return {"types": singles, "weights": [round(w, 3) for w in inverse_error_shares(*(models[t] for t in singles))]}


def study_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per model (and mixed head), one column per t bin, plus the mean."""
    edges = results["edges"]
    head = [f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    lines = [f"{results['measure']} per t bin ({results['dataset']}, {results['images_seen']} images, "
             f"batch {results['batch_size']}, {results['process']})", "",
             "| model | " + " | ".join(head) + " | mean |", "|---|" + "---:|" * (len(head) + 1)]
    rows = dict(results["models"])
    if "bayes" in results:
        rows = {"(Bayes error itself)": results["bayes"], **rows}
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(sum(values) / len(values))} |")
    if results.get("quality"):
        lines += ["", f"{results['metric']} of {results['samples']} EMA samples per run (mean ± std over seeds "
                  f"{results['seeds']}), mean {results['measure']} and training seconds per run", "",
                  f"| model | {results['metric']} | {results['measure']} | train s |", "|---|---:|---:|---:|"]
        for name, q in results["quality"].items():
            values, error = q["values"], results["models"][name]
            spread = f" ± {statistics.stdev(values):.3g}" if len(values) > 1 else ""
            lines.append(f"| {name} | {statistics.mean(values):.4g}{spread} | {_fmt(sum(error) / len(error))} | "
                         f"{statistics.mean(q['train_seconds']):.0f} |")
    if results.get("blend"):
        types, weights = results["blend"]["types"], results["blend"]["weights"]
        lines += ["", f"The blend these errors call for ({types[1]}'s inverse-error share of x̂0 per bin), in this "
                  "study and in frugaldiff train:", "",
                  f"    --blend {' '.join(types)} --blend-weights {' '.join(map(str, weights))}",
                  f"    --set diffusion.prediction=blend --set 'diffusion.blend.types={json.dumps(types)}' "
                  f"--set 'diffusion.blend.weights={json.dumps(weights)}'"]
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Batch-size study

SWEEP_BATCH_SIZES = (4, 8, 16, 64)


def batch_sweep(base: Config, out_dir: str | Path, batch_sizes: Sequence[int] = SWEEP_BATCH_SIZES, bins: int = 10,
                per_bin: int = 256, samples: int = 512, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) one run of ``base`` per batch size at the same budget in images seen; for each, the
    headline metric of ``samples`` EMA samples, the EMA model's held-out loss per t bin on a fixed grid,
    optimizer steps and training seconds. Writes ``batch_sweep.json``, ``table.md`` and ``batch_sweep.png``."""
    _require(len(batch_sizes) >= 1 and all(b >= 1 for b in batch_sizes),
             f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    _require(bins >= 1 and per_bin >= 1 and samples >= 2, "--bins and --per-bin must be at least 1, --samples 2")
    out_dir = Path(out_dir)
    data = build_data(base)
    evaluator = Evaluator(data, mixture=true_mixture(base))
    _require(evaluator.headline is not None, f"{base['data.name']!r} has no quality metric (images without "
                                             "class labels); sweep a labelled dataset such as mnist5000 or digits")
    heldout = model_data(base, data).heldout  # the grid is in the model's space (latents or pixels)
    grid = fixed_grid(build_process(base, heldout.shape[1:]), heldout, bins, per_bin)
    result: dict[str, Any] = {"dataset": base["data.name"], "images_seen": base["train.images_seen"],
                              "metric": evaluator.headline, "higher_is_better": evaluator.headline in HIGHER_IS_BETTER,
                              "samples": samples, "edges": grid.edges, "runs": []}
    for size in batch_sizes:
        trainer = train_or_reuse(base.updated({"train.batch_size": size, "train.name": f"batch-{size}"}),
                                 out_dir / f"batch-{size}", progress)
        result["runs"].append({
            "batch_size": size, "steps": trainer.state.step, "metric": trainer.evaluate(evaluator, samples),
            "heldout": heldout_loss_by_bin(trainer.state.ema.model.eval(), grid, trainer.parts.weighting),
            "train_seconds": training_seconds(trainer.files.metrics)})
    _write_json(out_dir / "batch_sweep.json", result)
    atomic_write_text(out_dir / "table.md", sweep_table(result))
    plot_batch_sweep(result, out_dir / "batch_sweep.png")
    return result


def sweep_table(result: dict[str, Any]) -> str:
    """Markdown table of a batch sweep: one row per batch size."""
    edges = result["edges"]
    near, far = f"{edges[0]:.2g}–{edges[1]:.2g}", f"{edges[-2]:.2g}–{edges[-1]:.2g}"
    lines = [f"{result['dataset']}, {result['images_seen']} images seen per run, {result['metric']} of "
             f"{result['samples']} EMA samples\n",
             f"| batch | steps | {result['metric']} | held-out loss, mean over t | t {near} | t {far} | train s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        heldout = run["heldout"]
        lines.append(f"| {run['batch_size']} | {run['steps']} | {run['metric']:.4g} | "
                     f"{sum(heldout) / len(heldout):.4g} | {heldout[0]:.4g} | {heldout[-1]:.4g} | "
                     f"{run['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
