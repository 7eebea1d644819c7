"""PNG plots of training output: the loss curve and 2-D samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FrugalError
from .noise import PROCESSES
from .prediction import PREDICTIONS
from .runs import read_metrics
from .timestep_samplers import TIMESTEP_SAMPLERS


def pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, fig: Any, out: Path) -> None:
    """Write ``fig`` as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_metrics(metrics_csv: Path, out: Path) -> None:
    """Loss and learning rate against images seen (nothing while metrics.csv has no rows)."""
    rows = read_metrics(metrics_csv) if metrics_csv.is_file() else []
    if not rows:
        return
    images = np.array([float(r["images_seen"]) for r in rows])
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(images, [float(r["loss"]) for r in rows])
    ax_loss.set(xlabel="images seen", ylabel="training loss", yscale="log", title="loss (mean per log interval)")
    ax_lr.plot(images, [float(r["lr"]) for r in rows])
    ax_lr.set(xlabel="images seen", ylabel="learning rate", title="learning rate")
    save_figure(plt, fig, out)


def plot_eval(metrics_csv: Path, column: str, out: Path) -> None:
    """One evaluation column of metrics.csv (empty in rows without an evaluation) against images seen."""
    rows = [r for r in read_metrics(metrics_csv) if r.get(column)]
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([float(r["images_seen"]) for r in rows], [float(r[column]) for r in rows], marker="o")
    ax.set(xlabel="images seen", ylabel=column, title=f"{column} of EMA samples (docs/metrics.md)")
    save_figure(plt, fig, out)


def plot_points(samples: np.ndarray, out: Path, reference: np.ndarray | None = None) -> None:
    """Scatter of vector samples (first two coordinates) over reference points if given; a histogram of 1-D ones."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if samples.shape[1] == 1:
        values = samples[:, 0] if reference is None else np.concatenate([samples[:, 0], reference[:, 0]])
        bins = np.linspace(values.min(), values.max() + 1e-9, 51)
        if reference is not None:
            ax.hist(reference[:, 0], bins=bins, density=True, color="lightgrey", label="held-out data")
        ax.hist(samples[:, 0], bins=bins, density=True, histtype="step", color="tab:blue", label="samples")
        ax.set(xlabel="x", ylabel="density")
    else:
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgrey", label="held-out data")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", label="samples")
        ax.set_aspect("equal")
    ax.legend(loc="upper right")
    save_figure(plt, fig, out)


def plot_timestep_densities(names: list[str], process_name: str, out: Path, n: int = 200_000,
                            params: dict | None = None) -> None:
    """Histogram density of ``n`` draws over t of each timestep sampler, with its mean importance weight per bin.

    ``params`` maps sampler names to their parameters (defaults otherwise); samplers that learn from
    losses are shown as they start, before any loss has come in.
    """
    params = params or {}
    process = PROCESSES.create(process_name)
    edges = np.linspace(0.0, 1.0, 51)
    plt = pyplot()
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sampler = TIMESTEP_SAMPLERS.create(name, process=process, params=params, **params.get(name, {}))
        t, w = (x.numpy() for x in sampler.sample(n))
        counts, _ = np.histogram(t, bins=edges)
        weight_sums, _ = np.histogram(t, bins=edges, weights=w)
        ax.stairs(counts / (n * np.diff(edges)), edges, fill=True, alpha=0.6, label="density p(t)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        mean_weight = np.divide(weight_sums, counts, out=np.full_like(weight_sums, np.nan), where=counts > 0)
        ax.stairs(mean_weight, edges, color="tab:red", label="mean weight")
        objective = "keeps the uniform objective" if sampler.keeps_objective else "changes the objective"
        ax.set(title=f"{name} ({objective})", xlabel="t", xlim=(0, 1), ylim=(0, None))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    save_figure(plt, fig, out)


def plot_amplification(types: list[str], process_names: list[str], out: Path, sigma_data: float = 0.5) -> None:
    """A(t) = σ·c/|D| of each prediction type over t, one panel per process (log scale).

    A(t) is how much an error of the network's unit-scale output grows in x0; degenerate pairs are left out.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(process_names), figsize=(5 * len(process_names), 4), squeeze=False)
    for ax, process_name in zip(axes[0], process_names, strict=True):
        process = PROCESSES.create(process_name)
        t = np.linspace(0.01, min(0.99, process.t_max), 197)
        for name in types:
            try:
                prediction = PREDICTIONS.create(name, process, sigma_data)
            except FrugalError:
                continue
            amplification = prediction.amplification(torch.from_numpy(t)).numpy()
            ax.plot(t, amplification, label=name)
        ax.set(xlabel="t", ylabel="A(t)", yscale="log", title=f"{process_name} (σ_data = {sigma_data})")
        ax.legend(fontsize="small")
    save_figure(plt, fig, out)



def _bin_centres(edges: list[float]) -> np.ndarray:
    e = np.asarray(edges)
    return (e[:-1] + e[1:]) / 2


def plot_error_by_bin(results: dict[str, Any], out: Path) -> None:
    """A study's x0 error (or excess error) per t bin: whole models in one panel, the mixed models' heads in
    another. Excess errors can be slightly negative (estimation noise): then the axis is symmetric-log."""
    plt = pyplot()
    centres = _bin_centres(results["edges"])
    groups = [(title, {n: v for n, v in results["models"].items() if (" head:" in n) == heads})
              for title, heads in (("models", False), ("heads of the mixed models", True))]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for ax, (title, models) in zip(axes[0], groups, strict=True):
        for name, values in models.items():
            ax.plot(centres, values, marker="o", ms=3, lw=1.5, label=name)
        if "bayes" in results:
            ax.plot(centres, results["bayes"], color="black", lw=1, ls=":", label="Bayes error itself")
        if min(min(v) for v in models.values()) <= 0:
            ax.set_yscale("symlog", linthresh=1e-4)
        else:
            ax.set_yscale("log")
        ax.set(xlabel="t (bin centre)", ylabel=results["measure"], title=f"{results['dataset']}: {title}")
        ax.legend(fontsize="x-small")
    save_figure(plt, fig, out)


def plot_sample_panels(panels: dict[str, np.ndarray], title: str, out: Path) -> None:
    """One panel per model, each a uint8 grid image [H, W, C] of its samples, side by side under ``title``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    save_figure(plt, fig, out)


def plot_gate_weights(results: dict[str, Any], out: Path) -> None:
    """Learned gate weight of each head over t, one panel per mixed model."""
    plt = pyplot()
    gates = results["gates"]
    fig, axes = plt.subplots(1, len(gates), figsize=(4.5 * len(gates), 3.5), squeeze=False)
    centres = _bin_centres(results["edges"])
    for ax, (model, weights) in zip(axes[0], gates.items(), strict=True):
        for head, values in weights.items():
            ax.plot(centres, values, marker="o", ms=3, label=head)
        ax.set(xlabel="t (bin centre)", ylabel="mean gate weight", ylim=(0, 1), title=model)
        ax.legend(fontsize="small")
    save_figure(plt, fig, out)


def plot_disruption(delta: list[list[float]], edges: list[float], title: str, out: Path) -> None:
    """Heat map of ΔL[A][B] (rows: bin trained on, columns: held-out bin), diverging colours centred at 0."""
    plt = pyplot()
    values = np.asarray(delta, dtype=float)
    limit = float(np.nanmax(np.abs(values))) or 1e-12
    labels = [f"{lo:.2g}–{hi:.2g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax, label="relative change of held-out loss ΔL")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="held-out bin B (t)", ylabel="trained on bin A (t)", title=f"disruption: {title}")
    save_figure(plt, fig, out)


def plot_disruption_scaling(scaling: list[dict[str, Any]], out: Path) -> None:
    """Off-diagonal share of the ΔL increase and mean off-diagonal ΔL against batch size, one line per k."""
    plt = pyplot()
    fig, (ax_share, ax_mean) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = scaling[0]["batch_sizes"]
    x = np.log2(sizes)  # evenly spaced doublings; a log axis fails on a panel without finite values
    for row in scaling:
        share = [np.nan if v is None else v for v in row["off_diagonal_share"]]
        ax_share.plot(x, share, marker="o", label=f"{row['steps']} step(s)")
        ax_mean.plot(x, row["mean_off_diagonal"], marker="o", label=f"{row['steps']} step(s)")
    ax_share.set(ylabel="off-diagonal share of the ΔL increase", ylim=(0, 1.05),
                 title="how much of the damage lands in other bins")
    ax_mean.axhline(0, color="grey", lw=0.8)
    ax_mean.set(ylabel="mean off-diagonal ΔL", title="mean change in other bins")
    for ax in (ax_share, ax_mean):
        ax.set_xticks(x, [str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.legend(fontsize="small")
    save_figure(plt, fig, out)


def plot_importance(result: dict[str, Any], out: Path) -> None:
    """Bars of each metric's cost per t bin when x̂0 is degraded only inside that bin."""
    plt = pyplot()
    metrics = result["metrics"]
    edges = np.asarray(result["edges"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], metrics.items(), strict=True):
        ax.bar(_bin_centres(result["edges"]), values["cost"], width=np.diff(edges) * 0.9)
        ax.axhline(0, color="grey", lw=0.8)
        worse = "drop" if values["higher_is_better"] else "increase"
        ax.set(xlabel="t (bin where x̂0 is degraded)", ylabel=f"{name} {worse}", xlim=(0, 1),
               title=f"cost per bin: {name}")
    what = f"error {result['error']}" if result["degrade"] == "noise" else f"x̂0 of {result['degrade_checkpoint']}"
    fig.suptitle(f"timestep importance ({what}; {result['solver']}, {result['steps']} steps, n = {result['n']})",
                 fontsize=10)
    save_figure(plt, fig, out)


def bin_series(rows: list[dict[str, str]], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(images seen [n], values [bins, n]) of the ``<prefix>_t<bin>`` columns over the rows that have any
    (NaN where a bin is empty)."""
    columns = sorted(k for k in (rows[0] if rows else {}) if k.startswith(f"{prefix}_t"))
    kept = [r for r in rows if any(r.get(c) for c in columns)]
    values = np.array([[float(r[c]) if r.get(c) else np.nan for r in kept] for c in columns], dtype=float)
    return np.array([float(r["images_seen"]) for r in kept]), values


def plot_ledger(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """From metrics.csv: ``ledger_heatmap.png`` (t bin × images seen: training loss per bin, and held-out loss
    relative to its first evaluation) and ``ledger_curves.png`` (one curve per bin). Returns the files written."""
    rows = read_metrics(metrics_csv)
    panels = [(name, *bin_series(rows, prefix)) for name, prefix in
              (("training loss (ledger)", "loss"), ("held-out loss (fixed grid)", "heldout"))]
    panels = [p for p in panels if p[2].size]
    if not panels:
        return []
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    heat, curves = out_dir / "ledger_heatmap.png", out_dir / "ledger_curves.png"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, images, values) in zip(axes[0], panels, strict=True):
        bins = len(values)
        if name.startswith("held-out"):
            shown, label = np.log2(values / values[:, :1]), "log2(loss / first evaluation)"
            limit = np.nanmax(np.abs(shown)) or 1.0
            image = ax.pcolormesh(_edges_of(images), np.linspace(0, 1, bins + 1), shown, cmap="RdBu_r",
                                  vmin=-limit, vmax=limit, shading="flat")
        else:
            shown, label = np.log10(values), "log10(mean loss)"
            image = ax.pcolormesh(_edges_of(images), np.linspace(0, 1, bins + 1), shown, cmap="viridis",
                                  shading="flat")
        fig.colorbar(image, ax=ax, label=label)
        ax.set(xlabel="images seen", ylabel="t", title=name)
    save_figure(plt, fig, heat)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, images, values) in zip(axes[0], panels, strict=True):
        colours = plt.cm.viridis(np.linspace(0, 1, len(values)))
        for b, (series, colour) in enumerate(zip(values, colours, strict=True)):
            ax.plot(images, series, color=colour, lw=1, label=f"t≈{(b + 0.5) / len(values):.2f}")
        ax.set(xlabel="images seen", ylabel="loss", yscale="log", title=f"{name} per t bin")
    axes[0][-1].legend(fontsize=6, ncol=2, loc="upper right")
    save_figure(plt, fig, curves)
    return [heat, curves]


def _edges_of(x: np.ndarray) -> np.ndarray:
    """Cell edges around the points ``x`` for pcolormesh (midpoints; the ends mirrored)."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def plot_batch_sweep(result: dict[str, Any], out: Path) -> None:
    """Metric against batch size, and the held-out loss per t bin of each batch size."""
    plt = pyplot()
    runs = result["runs"]
    sizes = [r["batch_size"] for r in runs]
    fig, (ax_metric, ax_bins) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.log2(sizes)
    ax_metric.plot(x, [r["metric"] for r in runs], marker="o")
    ax_metric.set_xticks(x, [str(b) for b in sizes])
    ax_metric.set(xlabel="batch size", ylabel=result["metric"],
                  title=f"{result['metric']} at {result['images_seen']} images seen")
    centres = _bin_centres(result["edges"])
    for run, colour in zip(runs, plt.cm.viridis(np.linspace(0, 0.9, len(runs))), strict=True):
        ax_bins.plot(centres, run["heldout"], marker=".", color=colour, label=f"batch {run['batch_size']}")
    ax_bins.set(xlabel="t", ylabel="held-out loss (EMA model)", yscale="log", title="held-out loss per t bin")
    ax_bins.legend(fontsize="small")
    save_figure(plt, fig, out)


def plot_posthoc_sweep(result: dict[str, Any], out: Path) -> None:
    """The metric of each post-hoc EMA length against σ_rel, with the training EMA as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sigmas = [r["sigma_rel"] for r in result["posthoc"]]
    ax.plot(sigmas, [r["value"] for r in result["posthoc"]], marker="o", label="post-hoc EMA")
    ax.axhline(result["train_ema"]["value"], color="grey", ls="--",
               label=f"training EMA (decay {result['train_ema']['decay']})")
    ax.set(xlabel="σ_rel (EMA length relative to training time)", ylabel=result["metric"],
           title=f"{result['metric']} of {result['n']} samples")
    ax.legend(fontsize="small")
    save_figure(plt, fig, out)
