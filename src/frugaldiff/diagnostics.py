"""Diagnostics: the training and held-out loss per timestep bin, and the x0 error on a fixed held-out grid.

The held-out grid fixes (sample, t, noise) per bin from a seed, so errors are comparable across models,
checkpoints and runs. For data drawn from a Gaussian mixture the Bayes error E‖E[x0 | x_t] − x0‖² is known
and each model's error is also reported in excess of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import FrugalError
from .gmm import GaussianMixture
from .networks import Denoiser
from .noise import NoiseProcess
from .prediction import MixedPrediction
from .weighting import Weighting

Predict = Callable[[Tensor, Tensor], dict[str, Tensor]]  # (x_t, t) -> named x̂0 predictions

#: Seed of the held-out grid, so that every analysis of every run measures on the same (sample, t, noise).
GRID_SEED = 1234


@dataclass
class GridBin:
    """One bin of the held-out grid: clean samples, their t, noise and noisy inputs (float64), and their labels."""

    x0: Tensor
    t: Tensor
    eps: Tensor
    x_t: Tensor
    labels: Tensor | None = None


@dataclass
class HeldoutGrid:
    """Fixed (sample, t, noise) triples in equal-width bins of t over [0, 1]."""

    edges: list[float]
    bins: list[GridBin]


def heldout_grid(process: NoiseProcess, x0: Tensor, bins: int = 10, per_bin: int | None = None,
                 generator: torch.Generator | None = None, labels: Tensor | None = None) -> HeldoutGrid:
    """Each bin draws t uniformly inside it (clamped to [t_min, t_max]) and fresh noise for every row of ``x0``
    or, with ``per_bin``, for that many rows drawn with replacement (their ``labels`` alongside). Same generator
    state, same grid."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x0 = x0.to(torch.float64)
    cells = []
    for b in range(bins):
        index = torch.arange(len(x0)) if per_bin is None else torch.randint(len(x0), (per_bin,), generator=generator)
        rows = x0[index]
        t = process.clamp((b + torch.rand(len(rows), generator=generator, dtype=torch.float64)) / bins)
        eps = torch.randn(rows.shape, generator=generator, dtype=torch.float64)
        cells.append(GridBin(rows, t, eps, process.add_noise(rows, eps, t), None if labels is None else labels[index]))
    return HeldoutGrid(torch.linspace(0, 1, bins + 1).tolist(), cells)


def fixed_grid(process: NoiseProcess, x0: Tensor, bins: int, per_bin: int, labels: Tensor | None = None
               ) -> HeldoutGrid:
    """The held-out grid every analysis, run and benchmark measures on: ``per_bin`` draws per bin from GRID_SEED."""
    return heldout_grid(process, x0, bins, per_bin, torch.Generator().manual_seed(GRID_SEED), labels)


def x0_error_by_bin(predict: Predict, grid: HeldoutGrid, mixture: GaussianMixture | None = None,
                    process: NoiseProcess | None = None, model_dtype: torch.dtype = torch.float32,
                    batch: int = 512) -> dict[str, Any]:
    """Mean ‖x̂0 − x0‖² / D per bin for every prediction ``predict(x_t, t)`` returns (inputs in ``model_dtype``).

    With a ``mixture`` (and its ``process``) also the per-bin ``bayes`` error and each prediction's
    ``excess`` over it. Returns {"edges", "error": {name: [...]}, "samples": {name: [per-sample errors of each
    bin]}, ["bayes", "excess": {name: [...]}]}.
    """
    samples: dict[str, list[Tensor]] = {}
    bayes: list[float] = []
    for cell in grid.bins:
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, len(cell.x0), batch):
            part = slice(start, start + batch)
            with torch.no_grad():
                outputs = predict(cell.x_t[part].to(model_dtype), cell.t[part].to(model_dtype))
            for name, x0_hat in outputs.items():
                parts.setdefault(name, []).append((x0_hat.to(torch.float64) - cell.x0[part]).pow(2).flatten(1).mean(1))
        for name, chunks in parts.items():
            samples.setdefault(name, []).append(torch.cat(chunks))
        if mixture is not None and process is not None:
            alpha, sigma = process.alpha(cell.t), process.sigma(cell.t)
            bayes.append(mixture.bayes_error(cell.x0, cell.x_t, alpha, sigma).mean().item())
    error = {name: [e.mean().item() for e in per_bin] for name, per_bin in samples.items()}
    result: dict[str, Any] = {"edges": grid.edges, "error": error, "samples": samples}
    if bayes:
        result["bayes"] = bayes
        result["excess"] = {n: [m - b for m, b in zip(v, bayes, strict=True)] for n, v in error.items()}
    return result


def excess_x0_error(denoise: Callable[[Tensor, Tensor], Tensor], mixture: GaussianMixture, process: NoiseProcess,
                    x0: Tensor, bins: int = 10, per_bin: int | None = None,
                    generator: torch.Generator | None = None,
                    model_dtype: torch.dtype = torch.float32) -> dict[str, list[float]]:
    """Per-bin ``model``, ``bayes`` and ``excess`` (model − bayes) x0 error of one denoiser on a mixture's data."""
    grid = heldout_grid(process, x0, bins, per_bin, generator)
    result = x0_error_by_bin(lambda x_t, t: {"model": denoise(x_t, t)}, grid, mixture, process, model_dtype)
    return {"edges": result["edges"], "model": result["error"]["model"], "bayes": result["bayes"],
            "excess": result["excess"]["model"]}


def denoiser_predictions(denoiser: Denoiser) -> Predict:
    """x̂0 of a denoiser as {"model": ...}; a mixed one also gives each head's x̂0 as "head:<type>"."""
    prediction = denoiser.prediction

    def predict(x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        out = denoiser(x_t, t).float()
        outputs = {"model": prediction.to_x0(out, x_t, t)}
        if isinstance(prediction, MixedPrediction):
            heads = prediction.heads_x0(out, x_t, t)
            outputs |= {f"head:{name}": heads[:, k] for k, name in enumerate(prediction.types)}
        return outputs

    return predict


def gate_weights_by_bin(denoiser: Denoiser, grid: HeldoutGrid) -> dict[str, list[float]]:
    """Mean gate weight of each head per bin (averaged over samples and, for the pixel gate, elements)."""
    prediction = denoiser.prediction
    if not isinstance(prediction, MixedPrediction):
        raise FrugalError("gate weights exist only for diffusion.prediction = mixed")
    means: list[Tensor] = []
    for cell in grid.bins:
        x_t, t = cell.x_t.float(), cell.t.float()
        with torch.no_grad():
            weights = prediction.gate_weights(denoiser(x_t, t).float(), t)
        means.append(weights.transpose(0, 1).flatten(1).mean(1))
    return {name: [m[k].item() for m in means] for k, name in enumerate(prediction.types)}


def bin_columns(prefix: str, bins: int) -> list[str]:
    """metrics.csv column names ``<prefix>_t<bin>`` of ``bins`` t bins, the bin zero-padded."""
    width = len(str(bins - 1))
    return [f"{prefix}_t{b:0{width}d}" for b in range(bins)]


def csv_cells(columns: Sequence[str], values: Sequence[float]) -> dict[str, str]:
    """metrics.csv cells: 6 significant digits, empty for NaN."""
    return {c: ("" if math.isnan(v) else f"{v:.6g}") for c, v in zip(columns, values, strict=True)}


class LossLedger:
    """Per-bin count, mean and variance (ddof = 1) of per-sample training losses since the last :meth:`reset`.

    Bins are equal-width in t over [0, 1]; batches are merged with Chan et al.'s parallel update, so the
    statistics equal a direct computation over every loss seen, whatever the batch sizes.
    """

    def __init__(self, bins: int = 20) -> None:
        if bins < 1:
            raise FrugalError(f"the loss ledger needs at least 1 bin, got {bins}; set train.ledger_bins >= 1")
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.count = torch.zeros(self.bins, dtype=torch.float64)
        self.mean = torch.zeros(self.bins, dtype=torch.float64)
        self.m2 = torch.zeros(self.bins, dtype=torch.float64)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Add per-sample ``losses`` [n] at times ``t`` [n]."""
        t, losses = t.detach().to("cpu", torch.float64).flatten(), losses.detach().to("cpu", torch.float64).flatten()
        index = (t * self.bins).long().clamp(0, self.bins - 1)
        count = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(losses))
        total = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, losses)
        mean = total / count.clamp(min=1)
        m2 = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, (losses - mean[index]) ** 2)
        merged = self.count + count
        delta = mean - self.mean
        safe = merged.clamp(min=1)
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / safe
        self.mean = self.mean + delta * count / safe
        self.count = merged

    def variance(self) -> Tensor:
        """Per-bin sample variance (NaN where a bin has fewer than 2 losses)."""
        return torch.where(self.count > 1, self.m2 / (self.count - 1).clamp(min=1), torch.nan)

    def columns(self, prefix: str = "loss") -> list[str]:
        """Column names ``<prefix>_t<bin>`` (mean) and ``<prefix>var_t<bin>`` (variance)."""
        return bin_columns(prefix, self.bins) + bin_columns(f"{prefix}var", self.bins)

    def row(self, prefix: str = "loss") -> dict[str, str]:
        """The current statistics as metrics.csv cells (empty where a bin saw no loss)."""
        means = torch.where(self.count > 0, self.mean, torch.nan)
        return csv_cells(self.columns(prefix), [*means.tolist(), *self.variance().tolist()])

    def state_dict(self) -> dict[str, Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.count, self.mean, self.m2 = state["count"].clone(), state["mean"].clone(), state["m2"].clone()


def _mean_by_bin(denoiser: Denoiser, grid: HeldoutGrid, per_sample: Callable[..., Tensor], batch: int) -> list[float]:
    """Mean of ``per_sample(x0, eps, x_t, t, labels)`` (a [B] tensor) over each bin of a fixed held-out grid, on the
    denoiser's device, without gradients; a conditional model is given the grid's labels."""
    device = next(denoiser.parameters()).device
    means = []
    for cell in grid.bins:
        total = 0.0
        for start in range(0, len(cell.x0), batch):
            part = slice(start, start + batch)
            x0, eps, x_t, t = (v[part].to(device, torch.float32) for v in (cell.x0, cell.eps, cell.x_t, cell.t))
            labels = cell.labels[part].to(device) if cell.labels is not None and denoiser.num_classes else None
            with torch.no_grad():
                total += per_sample(x0, eps, x_t, t, labels).sum().item()
        means.append(total / len(cell.x0))
    return means


def heldout_loss_by_bin(denoiser: Denoiser, grid: HeldoutGrid, weighting: Weighting, batch: int = 512) -> list[float]:
    """Mean training objective (the prediction type's loss under ``weighting``, importance and a learned
    uncertainty left out; a conditional model given the grid's labels) per bin of a fixed held-out grid: comparable
    across steps and runs of the same config. Runs on the denoiser's device. (A mixture's objective with the
    ``heads`` strategy is the sum of its heads' losses and the mixture's: not an x0 error.)"""
    prediction = denoiser.prediction
    return _mean_by_bin(denoiser, grid, lambda x0, eps, x_t, t, labels: prediction.loss(
        denoiser(x_t, t, labels), x_t, x0, eps, t, weighting), batch)


def heldout_x0_error_by_bin(denoiser: Denoiser, grid: HeldoutGrid, batch: int = 512) -> list[float]:
    """Mean squared error per value of the model's x̂0 (what the solvers use) per bin of a fixed held-out grid,
    comparable across prediction types, mixtures included."""
    return _mean_by_bin(denoiser, grid, lambda x0, eps, x_t, t, labels: (
        denoiser.denoise(x_t, t, labels) - x0).pow(2).flatten(1).mean(1), batch)


