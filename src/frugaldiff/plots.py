"""PNG plots of training output: the loss curve and 2-D samples."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics_csv: Path, out: Path) -> None:
    """Loss and learning rate against images seen."""
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    images = np.array([float(r["images_seen"]) for r in rows])
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(images, [float(r["loss"]) for r in rows])
    ax_loss.set(xlabel="images seen", ylabel="training loss", yscale="log", title="loss (mean per log interval)")
    ax_lr.plot(images, [float(r["lr"]) for r in rows])
    ax_lr.set(xlabel="images seen", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_points(samples: np.ndarray, out: Path, reference: np.ndarray | None = None) -> None:
    """Scatter of 2-D samples (first two coordinates), over reference points if given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgrey", label="held-out data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
