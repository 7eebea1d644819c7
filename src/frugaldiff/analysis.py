"""Analyses of a trained run: disruption between t bins and timestep importance.

*Disruption* (``frugaldiff analyze disruption``): from the run's newest checkpoint, take k optimizer steps on
batches whose t all lie in one bin A and measure the relative change ΔL[A, B] of the held-out loss in every
bin B. *Timestep importance* (``frugaldiff analyze importance``): degrade x̂0 only while the solver is inside
one bin and measure how much the samples change or get worse. Studies that train several runs are in
:mod:`frugaldiff.studies`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, intact_checkpoints, latest_checkpoint
from .components import SampleSettings, TrainSettings, build, build_data, model_data, true_mixture
from .config import Config
from .diagnostics import fixed_grid, heldout_loss_by_bin
from .distributed import SINGLE_PROCESS
from .errors import FrugalError
from .generate import generate, load_run, sampling_runtime
from .images import to_uint8
from .metrics import MIN_SAMPLES, Evaluator
from .networks import Denoiser
from .noise import bcast
from .plots import plot_disruption, plot_disruption_scaling, plot_importance
from .runs import read_run_config
from .runtime import CPU, Runtime
from .state import TrainState
from .timestep_samplers import TIMESTEP_SAMPLERS, TimestepSampler
from .trainer import train_step, training_dtype


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FrugalError(message)


def _write_json(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Disruption


class DisruptionProbe:
    """A run's newest checkpoint (model, its learned uncertainty, AdamW moments) and a held-out grid, taking
    trials of optimizer steps in one t bin, each from a training state of its own restored to the checkpoint.

    The run folder is only read. Each trial takes the training step itself (:func:`~frugaldiff.trainer.train_step`:
    the run's objective and clipping) at batch size ``batch_size``, a constant learning rate ``lr`` (default: the
    run's at its images seen), t uniform in the bin, and batches, noise and t drawn from ``seed`` alone, so trials
    differ only in the bin.
    """

    def __init__(self, run_dir: str | Path, bins: int = 10, per_bin: int = 256, seed: int = 0,
                 lr: float | None = None) -> None:
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        self.checkpoint = latest_checkpoint(run_dir)
        runtime = Runtime.create(config["train.device"], "fp32")  # the device; the run's precision below
        self.data = model_data(config, build_data(config))
        self.parts = build(config, self.data, runtime)
        settings = TrainSettings.from_config(config)
        self.state = TrainState(self.parts, self.data, settings)
        self.state.restore(self.checkpoint)
        self.parts.objective.runtime = Runtime(runtime.device, training_dtype(
            self.state, self.parts, settings.precision, runtime.device, settings.batch_size // settings.grad_accum))
        self.images_seen, self.bins, self.seed = self.state.images_seen, bins, seed
        self.lr = settings.lr_at(self.images_seen) if lr is None else lr
        _require(self.lr > 0, f"the run's learning rate at {self.images_seen} images is 0 (its schedule has "
                              f"ended); pass --lr, e.g. its peak train.lr = {settings.lr}")
        self.settings = replace(settings, lr=self.lr, lr_schedule="constant", warmup_images=0, grad_accum=1,
                                seed=seed)
        self.grid = fixed_grid(self.parts.process, self.data.heldout, bins, per_bin)
        self._saved = copy.deepcopy({"model": self.state.denoiser.state_dict(),
                                     "optimizer": self.state.optimizer.state_dict()})
        self.loss_before = self.heldout_loss()

    def restore(self, sampler: TimestepSampler | None = None, batch_size: int | None = None) -> None:
        """A fresh state at the checkpoint's weights and optimizer moments (copies: AdamW updates them in place),
        with data and noise streams from the probe's seed and ``sampler`` (default: the run's)."""
        settings = replace(self.settings, batch_size=batch_size or self.settings.batch_size)
        self.state = TrainState(replace(self.parts, sampler=sampler or self.parts.sampler), self.data, settings)
        self.state.denoiser.load_state_dict(copy.deepcopy(self._saved["model"]))
        self.state.optimizer.load_state_dict(copy.deepcopy(self._saved["optimizer"]))

    def heldout_loss(self) -> list[float]:
        """The run's objective per bin of the held-out grid, for the current weights."""
        denoiser = self.state.denoiser.eval()
        try:
            return heldout_loss_by_bin(denoiser, self.grid, self.parts.weighting)
        finally:
            denoiser.train()

    def trial(self, source_bin: int, batch_size: int, steps: Sequence[int]) -> dict[int, list[float]]:
        """Held-out loss per bin after each k in ``steps`` optimizer steps on t in bin ``source_bin`` (one
        trial of max(steps) steps, measured on the way: a k-step trial is the start of a longer one). Reseeds
        torch's global generator (dropout) with the probe's seed."""
        lo, hi = source_bin / self.bins, (source_bin + 1) / self.bins
        sampler = TIMESTEP_SAMPLERS.create("range", process=self.parts.process, seed=self.seed, lo=lo, hi=hi)
        self.restore(sampler, batch_size)
        settings = replace(self.settings, batch_size=batch_size)
        torch.manual_seed(self.seed)
        after = {}
        for k in range(1, max(steps) + 1):
            train_step(self.state, self.parts.objective, self.state.denoiser, settings, SINGLE_PROCESS)
            if k in steps:
                after[k] = self.heldout_loss()
        return after


def matrix_summary(delta: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """Share of the positive ΔL mass that lies off the diagonal (None without any), mean off-diagonal and
    mean diagonal ΔL of one disruption matrix."""
    n = len(delta)
    diagonal = [delta[a][a] for a in range(n)]
    off = [delta[a][b] for a in range(n) for b in range(n) if a != b]
    positive_off = sum(max(v, 0.0) for v in off)
    positive = positive_off + sum(max(v, 0.0) for v in diagonal)
    return {"off_diagonal_share": positive_off / positive if positive > 0 else None,
            "mean_off_diagonal": sum(off) / len(off), "mean_diagonal": sum(diagonal) / n}


def _slope_per_doubling(sizes: Sequence[int], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of ``values`` against log2(size); None with fewer than two sizes that have values."""
    pairs = [(math.log2(s), v) for s, v in zip(sizes, values, strict=True) if v is not None]
    if len({x for x, _ in pairs}) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(v for _, v in pairs) / len(pairs)
    return sum((x - mx) * (v - my) for x, v in pairs) / sum((x - mx) ** 2 for x, _ in pairs)


def disruption_scaling(matrices: Sequence[dict[str, Any]], batch_sizes: Sequence[int],
                       steps: Sequence[int]) -> list[dict[str, Any]]:
    """Per k: the off-diagonal share and mean off-diagonal ΔL at each batch size, and their slopes per
    doubling of the batch size."""
    scaling = []
    for k in steps:
        rows = {m["batch_size"]: m for m in matrices if m["steps"] == k}
        share = [rows[b]["off_diagonal_share"] for b in batch_sizes]
        mean_off = [rows[b]["mean_off_diagonal"] for b in batch_sizes]
        scaling.append({"steps": k, "batch_sizes": list(batch_sizes), "off_diagonal_share": share,
                        "mean_off_diagonal": mean_off, "mean_diagonal": [rows[b]["mean_diagonal"] for b in batch_sizes],
                        "share_slope_per_doubling": _slope_per_doubling(batch_sizes, share),
                        "mean_off_diagonal_slope_per_doubling": _slope_per_doubling(batch_sizes, mean_off)})
    return scaling


def disruption(run_dir: str | Path, out_dir: str | Path | None = None, bins: int = 10,
               steps: Sequence[int] = (1, 10), batch_sizes: Sequence[int] = (4, 16, 64), per_bin: int = 256,
               seed: int = 0, lr: float | None = None, progress: bool = True) -> dict[str, Any]:
    """ΔL[A][B] = (L_after − L_before)/L_before of the held-out loss in bin B after k steps on bin A, for every
    batch size and k; writes ``disruption.json``, one heat map per (batch size, k) and ``off_diagonal_share.png``
    to ``out_dir`` (default RUN_DIR/analysis/disruption)."""
    _require(bins >= 2, f"--bins must be at least 2 for disruption (bins trained on and measured), got {bins}")
    _require(per_bin >= 1, f"--per-bin must be at least 1, got {per_bin}")
    _require(bool(steps) and min(steps) >= 1, f"--steps must be optimizer step counts of at least 1, got {steps}")
    _require(bool(batch_sizes) and min(batch_sizes) >= 1, f"--batch-sizes must be at least 1, got {batch_sizes}")
    _require(lr is None or lr > 0, f"--lr must be positive, got {lr}")
    steps, batch_sizes = sorted(set(steps)), sorted(set(batch_sizes))
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis" / "disruption"
    probe = DisruptionProbe(run_dir, bins, per_bin, seed, lr)
    before = probe.loss_before
    matrices = []
    with tqdm(total=bins * len(batch_sizes), desc="disruption", unit="trial", disable=not progress) as bar:
        for size in batch_sizes:
            delta: dict[int, list[list[float]]] = {k: [] for k in steps}
            for source in range(bins):
                for k, after in probe.trial(source, size, steps).items():
                    delta[k].append([(a - b) / b for a, b in zip(after, before, strict=True)])
                bar.update()
            matrices += [{"batch_size": size, "steps": k, "delta": delta[k], **matrix_summary(delta[k])}
                         for k in steps]
    result = {"run": str(run_dir), "checkpoint": probe.checkpoint.name, "images_seen": probe.images_seen,
              "lr": probe.lr, "bins": bins, "edges": probe.grid.edges, "per_bin": per_bin, "seed": seed,
              "steps": steps, "batch_sizes": batch_sizes, "loss_before": before,
              "measure": "relative change of the held-out training objective, delta[A][B]: trained on bin A, "
                         "measured in bin B",
              "matrices": matrices, "scaling": disruption_scaling(matrices, batch_sizes, steps)}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "disruption.json", result)
    for m in matrices:
        title = f"batch {m['batch_size']}, {m['steps']} step(s), lr {probe.lr:.3g}"
        plot_disruption(m["delta"], result["edges"], title, out / f"disruption_b{m['batch_size']}_k{m['steps']}.png")
    plot_disruption_scaling(result["scaling"], out / "off_diagonal_share.png")
    return result


# ---------------------------------------------------------------------------------------------------------
# Timestep importance

#: (x̂0, x_t, t, labels, generator) → degraded x̂0; the generator is reseeded for every trial.
Degrade = Callable[[Tensor, Tensor, Tensor, Tensor | None, torch.Generator], Tensor]


def noise_degrade(error: float) -> Degrade:
    """x̂0 + error·z, z ~ N(0, I) from the trial's generator."""
    def degrade(x0: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        return x0 + error * torch.randn(x0.shape, generator=generator).to(x0.device)

    return degrade


def prediction_degrade(other: Denoiser) -> Degrade:
    """Another model's x̂0 (e.g. an early checkpoint's EMA) in place of the model's."""
    def degrade(x0: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        return other.denoise(x_t, t, labels).float()

    return degrade


class WindowDegraded(Denoiser):
    """``base`` whose x̂0 is replaced by ``degrade``'s only while lo ≤ t < hi (hi = 1: t ≤ 1 too)."""

    def __init__(self, base: Denoiser, lo: float, hi: float, degrade: Degrade, seed: int = 0) -> None:
        super().__init__(base.net, base.prediction)
        self.base, self.lo, self.hi, self.degrade = base, lo, hi, degrade
        self.generator = torch.Generator().manual_seed(seed)

    def denoise(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        x0 = self.base.denoise(x_t, t, labels)
        inside = (t >= self.lo) & ((t < self.hi) | (self.hi >= 1))
        if not bool(inside.any()):
            return x0
        return torch.where(bcast(inside, x0), self.degrade(x0, x_t, t, labels, self.generator), x0)


@dataclass
class Score:
    """A sample-quality number of a batch of samples, and its direction."""

    fn: Callable[[Tensor], float]
    higher_is_better: bool


def displacement(x: Tensor, reference: Tensor) -> float:
    """Mean squared distance per coordinate, ‖x − reference‖²/D averaged over samples."""
    return (x.double() - reference.double()).pow(2).flatten(1).mean(1).mean().item()


def timestep_importance(denoiser: Denoiser, sampling: SampleSettings, sample_shape: tuple[int, ...],
                        degrade: Degrade, bins: int = 10, n: int = 256, scores: Mapping[str, Score] | None = None,
                        degrade_seed: int = 0, progress: bool = True, runtime: Runtime = CPU) -> dict[str, Any]:
    """For each bin, ``n`` samples (solver, steps and seed of ``sampling``) with x̂0 degraded only inside the bin
    (degrade generator seeded ``degrade_seed`` in every trial), against the undegraded samples of the same seed.
    Reports ``displacement`` from them and each score's change.

    Returns {"edges", "metrics": {name: {"reference", "per_bin", "cost", "higher_is_better"}}}; cost > 0 is
    worse (for displacement the displacement itself).
    """
    edges = torch.linspace(0, 1, bins + 1).tolist()

    def draw(model: Denoiser) -> Tensor:
        return generate(model, sampling, n, sample_shape, runtime)

    reference = draw(denoiser)
    scores = dict(scores or {})
    per_bin: dict[str, list[float]] = {"displacement": [], **{name: [] for name in scores}}
    for lo, hi in tqdm(list(zip(edges[:-1], edges[1:], strict=True)), desc="importance", unit="bin",
                       disable=not progress):
        x = draw(WindowDegraded(denoiser, lo, hi, degrade, degrade_seed))
        per_bin["displacement"].append(displacement(x, reference))
        for name, score in scores.items():
            per_bin[name].append(score.fn(x))
    metrics = {"displacement": {"reference": 0.0, "per_bin": per_bin["displacement"],
                                "cost": per_bin["displacement"], "higher_is_better": False}}
    for name, score in scores.items():
        ref = score.fn(reference)
        sign = -1 if score.higher_is_better else 1
        metrics[name] = {"reference": ref, "per_bin": per_bin[name], "cost": [sign * (v - ref) for v in per_bin[name]],
                         "higher_is_better": score.higher_is_better}
    return {"edges": edges, "metrics": metrics}


METRICS = ("auto", "displacement", "loglik", "fid")


def _scores(config: Config, data_kind: str, metric: str, n: int) -> dict[str, Score]:
    """The scores besides displacement: gmm's log-likelihood under its true mixture (auto or loglik), domain
    FID for labelled images (fid)."""
    _require(metric in METRICS, f"unknown --metric {metric!r}; choose one of: {', '.join(METRICS)}")
    mixture = true_mixture(config)
    if metric == "loglik" or (metric == "auto" and mixture is not None):
        _require(mixture is not None, f"--metric loglik needs a gmm run, this one is {config['data.name']!r}; "
                                      "use --metric displacement")
        return {"loglik": Score(lambda x: mixture.log_prob(x.double()).mean().item(), True)}
    if metric == "fid":
        _require(data_kind == "image", "--metric fid needs an image run; use --metric auto")
        _require(n >= MIN_SAMPLES, f"--metric fid needs --n of at least {MIN_SAMPLES}, got {n}")
        evaluator = Evaluator(build_data(config))
        _require(evaluator.headline == "domain_fid", f"--metric fid needs a dataset with class labels and "
                                                     f"{config['data.name']!r} has none; use --metric displacement")
        return {"domain_fid": Score(lambda x: evaluator(to_uint8(x))["domain_fid"], False)}
    return {}


def run_importance(run_dir: str | Path, out_dir: str | Path | None = None, bins: int = 10, error: float = 0.1,
                   n: int = 256, steps: int | None = None, solver: str | None = None, degrade: str = "noise",
                   metric: str = "auto", seed: int | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`timestep_importance` of a run's EMA model (newest checkpoint), degraded by ``error``·z (``degrade``
    = "noise") or by its oldest kept checkpoint's EMA prediction ("checkpoint"); writes ``importance.json`` and
    ``importance.png`` to ``out_dir`` (default RUN_DIR/analysis/importance)."""
    _require(bins >= 1, f"--bins must be at least 1, got {bins}")
    _require(n >= 1, f"--n must be at least 1, got {n}")
    _require(degrade in ("noise", "checkpoint"), f"unknown --degrade {degrade!r}; choose noise or checkpoint")
    _require(degrade != "noise" or error > 0, f"--error must be positive, got {error}")
    run_dir = Path(run_dir)
    config, denoiser, info = load_run(run_dir)
    runtime = sampling_runtime(config, denoiser, tuple(info["sample_shape"]), n)
    scores = _scores(config, info["data_kind"], metric, n)
    result: dict[str, Any] = {"run": str(run_dir), "checkpoint": info["checkpoint"],
                              "images_seen": info["images_seen"], "degrade": degrade}
    if degrade == "noise":
        fn, result["error"] = noise_degrade(error), error
    else:
        kept = intact_checkpoints(run_dir)
        _require(len(kept) >= 2, f"{run_dir} keeps only one checkpoint, so there is no earlier model; use "
                                 "--degrade noise, or train with train.checkpoint_every below train.images_seen")
        _, early, early_info = load_run(run_dir, kept[0])
        fn = prediction_degrade(early.to(runtime.device))
        result |= {"degrade_checkpoint": kept[0].name, "degrade_images_seen": early_info["images_seen"]}
    sampling = SampleSettings.from_config(config)
    sampling = replace(sampling, steps=steps or sampling.steps, solver=solver or sampling.solver,
                       seed=sampling.seed if seed is None else seed)
    result |= {"n": n, "steps": sampling.steps, "solver": sampling.solver, "seed": sampling.seed,
               "headline": next(iter(scores), "displacement")}
    result |= timestep_importance(denoiser, sampling, tuple(info["sample_shape"]), fn, bins, n, scores,
                                  progress=progress, runtime=runtime)
    cost = result["metrics"][result["headline"]]["cost"]
    result["costliest_bin"] = max(range(bins), key=cost.__getitem__)
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis" / "importance"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "importance.json", result)
    plot_importance(result, out / "importance.png")
    return result
