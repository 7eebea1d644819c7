"""Run folders: where a run's files live, its saved config, and its metrics.csv (with a TensorBoard mirror)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .checkpoint import atomic_write_text, checkpoint_info, resume_point
from .config import Config
from .errors import FrugalError, short_repr

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

    @property
    def guide(self) -> Path:
        """The early checkpoint kept for autoguidance (``train.guide_at``)."""
        return self.root / "guide"

    @property
    def phema(self) -> Path:
        """Snapshots of the power-function EMAs (``train.phema_snapshots``)."""
        return self.root / "phema"


class RunLock:
    """An advisory lock on a run folder (``fcntl.flock`` on ``RUN/.lock``, which holds the holder's PID) while a
    process trains it; it dies with the process, so a killed trainer never leaves the folder locked. A folder
    locked by another process is an error, or with ``wait`` a one-line notice and a wait until it is free."""

    def __init__(self, root: Path, wait: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._file: Any = (root / ".lock").open("a+")
        if fcntl is None:  # no flock on this platform: no lock
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read(32).strip() or "another process"
            if not wait:
                self._file.close()
                raise FrugalError(f"run folder {root} is being trained by process {holder}; wait for it to finish "
                                  f"(or stop it: kill {holder}), then resume it") from None
            warnings.warn(f"run folder {root} is in use by process {holder}; waiting until it is free", stacklevel=2)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        """Let another process train the folder."""
        self._file.close()


#: What a run folder may hold when its run never completed a checkpoint (so a new run may reuse the folder).
UNFINISHED = {".lock", "config.toml", "metrics.csv", "tensorboard", "checkpoints", "phema", "guide"}


def unfinished(root: Path) -> bool:
    """Whether ``root`` holds only a run that never completed its first checkpoint (killed while writing it)."""
    names = {p.name for p in root.iterdir()}
    checkpoints = root / "checkpoints"
    return (root / "config.toml").is_file() and names <= UNFINISHED and \
        not (checkpoints.is_dir() and any(not p.name.startswith(".") for p in checkpoints.iterdir()))


def start_run(root: Path, resume: bool) -> Path | None:
    """Ready ``root`` for the trainer that holds its lock; returns the checkpoint to continue from (None: step 0).

    A new run needs an empty folder, or one whose earlier run never completed a checkpoint (it is cleared, with a
    warning). A resumed run continues from its newest intact checkpoint (:func:`~frugaldiff.checkpoint.resume_point`)
    or, when it has none, starts over from step 0 with a warning."""
    if not resume:
        others = [p for p in root.iterdir() if p.name != ".lock"]
        if others and not unfinished(root):
            raise FrugalError(f"run folder {root} is not empty; resume it with --resume {root} or choose another --out")
        if others:
            warnings.warn(f"reusing {root}: the run in it never completed a checkpoint", stacklevel=2)
            for path in others:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    point = resume_point(root)
    if point is None:
        warnings.warn(f"{root} has no intact checkpoint (its first one never completed, or all are damaged); "
                      "training it from step 0", stacklevel=2)
    _drop_after(root, 0 if point is None else checkpoint_info(point)["images_seen"])
    return point


def _drop_after(root: Path, images: int) -> None:
    """Remove what the run kept after ``images`` images (the resumed run writes it again): EMA snapshots and an
    early checkpoint for autoguidance, so nothing of an abandoned stretch mixes with the new one."""
    files = RunFiles(root)
    for snapshot in files.phema.glob("*.safetensors"):
        if snapshot.stem.isdigit() and int(snapshot.stem) > images:
            snapshot.unlink()
    for guide in files.guide.glob("step-*"):
        if checkpoint_info(guide).get("images_seen", 0) > images:
            shutil.rmtree(guide)


def read_run_config(run_dir: Path, overrides: Iterable[str] = ()) -> Config:
    """The config.toml of a run folder (with ``KEY=VALUE`` overrides), or a one-line error if it is none."""
    path = RunFiles(Path(run_dir)).config
    if not path.is_file():
        raise FrugalError(f"{run_dir} is not a run folder (no config.toml); pass the folder `frugaldiff train` wrote")
    return Config.load(path, overrides, saved=True)


def new_run_dir(config: Config, parent: Path = Path("runs"), kind: str = "") -> Path:
    """``runs/<timestamp>-<name>`` (the name defaults to dataset-prediction, or dataset-``kind``)."""
    name = config["train.name"] or f"{config['data.name']}-{kind or config['diffusion.prediction']}"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "run"
    return parent / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{safe}"


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv; a damaged one (not UTF-8 text, a header without step and images_seen, a row with
    more or fewer cells than the header or a cell that is no number) is refused in one line."""
    path = Path(path)
    fix = "restore it, or move it away (a resumed run then starts a new one)"
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FrugalError(f"cannot read {path} as a metrics.csv ({type(e).__name__}); {fix}") from None
    if not rows or rows[0][:2] != ["step", "images_seen"]:
        header = short_repr(rows[0] if rows else "")
        raise FrugalError(f"{path} is not a metrics.csv (its header is {header}); {fix}")
    header = rows[0]
    for line, cells in enumerate(rows[1:], start=2):
        if len(cells) != len(header):
            raise FrugalError(f"{path} line {line} has {len(cells)} cells and the header {len(header)}: the file is "
                              f"damaged; {fix}")
        bad = next((c for c in cells if c and not _is_number(c)), None)
        if bad is not None:
            raise FrugalError(f"{path} line {line} holds {short_repr(bad)}, not a number: the file is damaged; {fix}")
    return [dict(zip(header, cells, strict=True)) for cells in rows[1:]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def training_clock(metrics_csv: Path) -> list[tuple[dict[str, str], float]]:
    """Each row of metrics.csv with the seconds spent in optimizer steps up to it (from the rows' images and
    images/s: evaluations, held-out losses and checkpoints are not counted)."""
    clock, total, previous = [], 0.0, 0
    for row in read_metrics(metrics_csv):
        images = int(row["images_seen"])
        total += (images - previous) / max(float(row["images_per_s"]), 1e-9)
        previous = images
        clock.append((row, total))
    return clock


def training_seconds(metrics_csv: Path) -> float:
    """Seconds spent in optimizer steps over the whole run."""
    clock = training_clock(metrics_csv)
    return clock[-1][1] if clock else 0.0


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
        try:
            rows = read_metrics(self.path)
        except FrugalError as e:  # keep the damaged file beside the run, start a new one
            aside = self.path.with_name(f"metrics.damaged-{datetime.now():%Y%m%d-%H%M%S}.csv")
            self.path.rename(aside)
            warnings.warn(f"{e}; moved it to {aside.name} and started a new metrics.csv", stacklevel=2)
            return
        fields = list(dict.fromkeys([*(rows[0] if rows else self.fields), *self.fields]))
        rows = [r for r in rows if float(r["step"]) <= step]
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
