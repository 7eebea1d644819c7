"""Checkpoints written atomically: a checkpoint is a folder that appears whole or not at all.

Layout of ``RUN/checkpoints/step-00001234/``: ``model.safetensors`` and ``ema.safetensors`` (weights),
``trainer.pt`` (optimizer, timestep sampler, RNG states, ...), ``state.json`` (human-readable counters): the
four parts of a training state's state dict (``model``, ``ema``, ``trainer``, ``info``). Each is written into
``.tmp-step-...`` first, flushed to disk, and the folder is renamed into place, so a kill during writing leaves
the previous checkpoints untouched and loadable. Checkpoints from before the learned weighting moved into the
denoiser (a ``weighting.safetensors`` beside the weights, a second optimizer group) load as today's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import FrugalError

PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


WEIGHTS = ("model", "ema")  # the parts of a state dict saved as safetensors


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``folder``."""
    return folder / f"{PREFIX}{step:08d}"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` ({"model", "ema": tensors, "trainer": torch-saveable, "info": JSON}) as checkpoint
    ``step`` under ``folder`` atomically and keep only the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in WEIGHTS:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state[name].items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        torch.save(state["trainer"], tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state["info"], indent=2))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (e.g. interrupted right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first (temporary folders are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a run, or a FrugalError saying there is none."""
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FrugalError(f"no checkpoint in {run_dir}; train it first or pass another run folder")
    return found[-1]


def load_weights(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``NAME.safetensors`` of a checkpoint (an old learned weighting's as ``uncertainty.*``)."""
    state = load_file(str(checkpoint / f"{name}.safetensors"))
    old_weighting = checkpoint / "weighting.safetensors"
    if old_weighting.is_file():  # before the learned weighting moved into the denoiser (its EMA = its weights)
        state |= {f"uncertainty.{k}": v for k, v in load_file(str(old_weighting)).items()}
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """``module.load_state_dict(state)`` (strict), with a one-line error when the checkpoint does not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise FrugalError(
            f"checkpoint {checkpoint} does not fit the configured network ({first}); "
            "keep the run's model.* settings when resuming or sampling"
        ) from None


def load_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, info) of a checkpoint."""
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)
    info = json.loads((checkpoint / "state.json").read_text())
    groups = state["optimizer"]["param_groups"]
    if len(groups) == 2:  # an old learned weighting's own group: its parameters come last in the denoiser now
        groups[0]["params"] += groups.pop()["params"]
    return state, info


def load_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The state dict a checkpoint holds (see :func:`save_checkpoint`)."""
    trainer, info = load_trainer_state(checkpoint)
    return {**{name: load_weights(checkpoint, name) for name in WEIGHTS}, "trainer": trainer, "info": info}
