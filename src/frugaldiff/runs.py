"""Run folders: where a run's files live, its saved config, and its metrics.csv (with a TensorBoard mirror)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import Config
from .errors import FrugalError

#: The first columns of metrics.csv; the loss ledger, held-out grid and evaluation columns follow.
METRIC_FIELDS = ["step", "images_seen", "loss", "lr", "grad_norm", "images_per_s", "nonfinite_skipped"]


@dataclass
class RunFiles:
    """Paths inside a run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples.png"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval_plot(self) -> Path:
        return self.root / "eval.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def read_run_config(run_dir: Path, overrides: Iterable[str] = ()) -> Config:
    """The config.toml of a run folder (with ``KEY=VALUE`` overrides), or a one-line error if it is none."""
    path = RunFiles(Path(run_dir)).config
    if not path.is_file():
        raise FrugalError(f"{run_dir} is not a run folder (no config.toml); pass the folder `frugaldiff train` wrote")
    return Config.load(path, overrides, saved=True)


def new_run_dir(config: Config, parent: Path = Path("runs")) -> Path:
    """``runs/<timestamp>-<name>`` (the name defaults to dataset-prediction)."""
    name = config["train.name"] or f"{config['data.name']}-{config['diffusion.prediction']}"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "run"
    return parent / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{safe}"


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def training_seconds(metrics_csv: Path) -> float:
    """Seconds spent in optimizer steps, from metrics.csv's images and images/s per row."""
    total, previous = 0.0, 0
    for row in read_metrics(metrics_csv):
        images = int(row["images_seen"])
        total += (images - previous) / max(float(row["images_per_s"]), 1e-9)
        previous = images
    return total


class MetricsLog:
    """Rows of a run's metrics.csv (columns ``fields`` when the file is new) and, when ``tensorboard`` and the
    package is installed, the same numbers as TensorBoard scalars against images seen."""

    def __init__(self, files: RunFiles, fields: list[str], tensorboard: bool) -> None:
        self.path, self.fields, self.tensorboard_dir = files.metrics, fields, files.tensorboard
        self._writer: Any = None if tensorboard else False

    def truncate(self, step: int) -> None:
        """Drop the rows written after optimizer step ``step`` (a resumed run rewrites them); columns this run
        adds (e.g. eval_<metric>) join the file's, and the cells a row lacks stay empty."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(r["step"]) <= step]
        fields = list(dict.fromkeys([*(reader.fieldnames or []), *self.fields]))
        text = io.StringIO()
        writer = csv.DictWriter(text, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (in the file's own columns once it exists)."""
        self._write_tensorboard(row)
        new = not self.path.exists()
        if new:
            fields = self.fields
        else:
            with self.path.open(newline="") as f:
                fields = next(csv.reader(f))
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _write_tensorboard(self, row: Mapping[str, Any]) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # the optional tensorboard extra
            except ImportError:
                self._writer = False
                return
            self._writer = SummaryWriter(str(self.tensorboard_dir))
        if self._writer:
            images = float(row["images_seen"])
            for key, value in row.items():
                if key not in ("step", "images_seen") and value != "":
                    group = key.split("_t")[0] if "_t" in key else "train"
                    self._writer.add_scalar(f"{group}/{key}", float(value), images)
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
