"""The Python API that mirrors the CLI: ``train``, ``train_autoencoder`` and ``sample`` (from ``generate``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .autoencoder import AutoencoderTrainer
from .config import OPTION_BY_KEY, Config, parse_override
from .distributed import close_distributed, init_distributed
from .errors import FrugalError, short_repr
from .generate import class_labels, save_samples
from .images import to_uint8
from .plots import plot_metrics
from .runs import new_run_dir, read_run_config
from .trainer import Trainer


def newest_run(parent: Path = Path("runs")) -> Path:
    """The most recent run folder under ``parent`` (names start with a timestamp)."""
    runs = sorted(p for p in parent.glob("*") if (p / "config.toml").is_file()) if parent.is_dir() else []
    if not runs:
        raise FrugalError(f"no run to resume under {parent}/; pass --resume RUN_DIR")
    return runs[-1]


#: The keys a resumed run may change (more images, other checkpoint or logging intervals, other sampling); the rest
#: decide what its checkpoints hold and how it learns.
RESUMABLE = ("train.", "sample.", "autoencoder.images_seen")


def check_resume_changes(saved: Config, config: Config) -> None:
    """A one-line refusal when ``config`` changes a key of ``saved`` that a resumed run must keep."""
    changed = [k for k in OPTION_BY_KEY if saved[k] != config[k] and (not k.startswith(RESUMABLE) or k == "train.seed")]
    if changed:
        key = changed[0]
        raise FrugalError(f"a resumed run keeps {key} ({short_repr(saved[key])}, asked {short_repr(config[key])}); "
                          "train a new run with --out to change it")


def _run_config(config: Config | Mapping[str, Any] | None, run_dir: str | Path | None,
                resume: str | Path | bool | None, overrides: Iterable[str], kind: str = "") -> tuple[Config, Path]:
    """(config, run folder) of a new run or of a resumed one (its config.toml with ``overrides``); a new run's
    folder defaults to runs/<timestamp>-<name>[-``kind``]."""
    if resume:
        if config is not None:
            raise FrugalError("a resumed run keeps its own config.toml; pass changes with --set, not --config")
        root = newest_run() if resume is True else Path(resume)
        config = read_run_config(root, overrides)
        check_resume_changes(read_run_config(root), config)
        return config, root
    config = config if isinstance(config, Config) else Config(config)
    config = config.updated(dict(parse_override(o) for o in overrides))
    return config, Path(run_dir) if run_dir is not None else new_run_dir(config, kind=kind)


def train_autoencoder(config: Config | Mapping[str, Any] | None = None, run_dir: str | Path | None = None,
                      resume: str | Path | bool | None = None, overrides: Iterable[str] = (),
                      progress: bool = True) -> Path:
    """Train an autoencoder run (``autoencoder.*`` keys, on the ``data.*`` images) and return the diffusers folder
    it wrote (RUN/autoencoder, the value ``data.autoencoder`` takes); ``resume`` as for :func:`train`."""
    config, root = _run_config(config, run_dir, resume, overrides, kind="autoencoder")
    return AutoencoderTrainer(config, root, resume=bool(resume), progress=progress).fit()


def train(config: Config | Mapping[str, Any] | None = None, run_dir: str | Path | None = None,
          resume: str | Path | bool | None = None, overrides: Iterable[str] = (), progress: bool = True) -> Path:
    """Train a run and return its folder.

    ``resume``: a run folder, or True for the newest one under ``runs/``; its config.toml is used,
    with ``overrides`` (``KEY=VALUE``) applied, e.g. a larger ``train.images_seen``. Under torchrun every
    process calls this; rank 0 alone writes files and the samples.
    """
    config, root = _run_config(config, run_dir, resume, overrides)
    world, _ = init_distributed(config["train.device"])
    root = world.broadcast(root)  # rank 0's timestamped folder on every rank
    try:
        trainer = Trainer(config, root, resume=bool(resume), progress=progress)
        trainer.fit()
        if world.is_main:  # a conditional run: sample.n // classes samples of each class, one grid row per class
            classes = trainer.parts.denoiser.num_classes
            n = max(1, config["sample.n"] // classes) * classes if classes else config["sample.n"]
            x = trainer.samples(n, progress=progress, labels=class_labels(n, classes))
            images = to_uint8(x) if trainer.data.kind == "image" else x.numpy()
            reference = None if trainer.data.kind == "image" else trainer.data.heldout.numpy()
            save_samples(images, trainer.files.samples, reference, rows=classes or None)
            plot_metrics(trainer.files.metrics, trainer.files.loss_plot)
    finally:
        close_distributed()
    return root

