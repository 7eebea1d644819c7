"""Studies that train several runs and compare them: the prediction-type study and the batch-size sweep.

Each trains (or reuses, when finished) one run per model under its folder at equal budget, so a rerun skips
what is done, then measures every run on the same fixed held-out grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .checkpoint import atomic_write_text
from .components import build_data, build_process, model_data, true_mixture
from .config import Config
from .diagnostics import denoiser_predictions, fixed_grid, gate_weights_by_bin, heldout_loss_by_bin, x0_error_by_bin
from .errors import FrugalError
from .metrics import HIGHER_IS_BETTER, Evaluator
from .plots import plot_batch_sweep, plot_error_by_bin, plot_gate_weights
from .prediction import MixedPrediction
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
    that was stopped before its first checkpoint starts again from step 0 (the trainer does that)."""
    started = (run / "config.toml").is_file()
    if started and Config.load(run / "config.toml", saved=True) != config:
        raise FrugalError(f"{run} holds a run of another config; remove it or choose another --out")
    trainer = Trainer(config, run, resume=started, progress=progress)
    if not trainer.done:
        trainer.fit()
    return trainer


# ---------------------------------------------------------------------------------------------------------
# The prediction-type study

#: The study runs on vp-linear, where every named type (acceleration too) is defined; per dataset: its budget.
STUDY_PROCESS = "vp-linear"
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gmm": {"diffusion.sigma_data": 0.8, "train.images_seen": 200_000, "train.batch_size": 32,
            "train.warmup_images": 2000, "sample.n": 512},
    "mnist5000": {"train.images_seen": 20_000, "train.batch_size": 32},
}


def study_models(types: Sequence[str], strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Model name → config changes: one model per single type, one per mixed strategy over ``types``."""
    models: dict[str, dict[str, Any]] = {t: {"diffusion.prediction": t} for t in types}
    for strategy in strategies:
        models[f"mixed-{strategy}"] = {"diffusion.prediction": "mixed", "diffusion.mixed.types": list(types),
                                       "diffusion.mixed.strategy": strategy}
    return models


def prediction_study(base: Config, out_dir: Path, types: Sequence[str] = ("x0", "velocity", "acceleration"),
                     strategies: Sequence[str] = ("joint", "heads", "heads+joint"), bins: int = 10,
                     per_bin: int = 512, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse, when finished) one run per model of :func:`study_models` under ``out_dir`` at equal
    budget and batch, then measure each model's (and each mixed head's) x0 error per t bin on a fixed held-out
    grid, and the gate weights over t. Writes ``results.json``, ``table.md``, ``x0_error.png``, ``gates.png``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = model_data(base, build_data(base))  # its held-out grid is in the model's space (latents or pixels)
    mixture = true_mixture(base)
    results: dict[str, Any] = {"dataset": base["data.name"], "images_seen": base["train.images_seen"],
                               "batch_size": base["train.batch_size"], "process": base["diffusion.process"],
                               "models": {}, "gates": {}}
    samples: dict[str, list[Tensor]] = {}
    for name, changes in study_models(types, strategies).items():
        trainer = train_or_reuse(base.updated({**changes, "train.name": name}), out_dir / name, progress)
        denoiser = trainer.state.ema.model.eval()
        grid = fixed_grid(denoiser.process, data.heldout, bins, per_bin)
        errors = x0_error_by_bin(denoiser_predictions(denoiser), grid, mixture, denoiser.process)
        results["edges"] = errors["edges"]
        if "bayes" in errors:
            results["bayes"] = errors["bayes"]
        key = "excess" if mixture is not None else "error"
        for output, values in errors[key].items():
            label = name if output == "model" else f"{name} {output}"
            results["models"][label], samples[label] = values, errors["samples"][output]
        if isinstance(denoiser.prediction, MixedPrediction):
            results["gates"][name] = gate_weights_by_bin(denoiser, grid)
    results["measure"] = "excess x0 error over Bayes" if mixture is not None else "x0 error"
    results["claims"] = study_claims(results, samples, types)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out_dir / "table.md", study_table(results))
    plot_error_by_bin(results, out_dir / "x0_error.png")
    if results["gates"]:
        plot_gate_weights(results, out_dir / "gates.png")
    return results


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
        if not name.startswith("mixed-") or " " in name:
            continue
        heads = [f"{name} head:{t}" for t in types if f"{name} head:{t}" in models]
        claims["mixtures"][name] = {
            "bins_worse_than_own_best_head": worse_bins(name, heads),
            "bins_worse_than_best_single_model": worse_bins(name, singles) if singles else [],
            "mean": sum(values) / bins,
        }
    return claims


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
