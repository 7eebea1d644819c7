"""Checkpoints written atomically: a checkpoint is a folder that appears whole or not at all.

Layout of ``RUN/checkpoints/step-00001234/``: ``model.safetensors`` and ``ema.safetensors`` (weights),
``trainer.pt`` (optimizer, timestep sampler, RNG states, ...), ``state.json`` (human-readable counters).
Each is written into ``.tmp-step-...`` first, flushed to disk, and the folder is renamed into place,
so a kill during writing leaves the previous checkpoints untouched and loadable.
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


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``folder``."""
    return folder / f"{PREFIX}{step:08d}"


def save_checkpoint(folder: Path, step: int, modules: dict[str, torch.nn.Module], trainer_state: dict[str, Any],
                    info: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` under ``folder`` atomically and keep only the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, module in modules.items():
            save_file(_state_tensors(module), str(tmp / f"{name}.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(info, indent=2))
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


def load_weights(checkpoint: Path, name: str, module: torch.nn.Module) -> None:
    """Load ``NAME.safetensors`` of a checkpoint into ``module`` (strict)."""
    state = load_file(str(checkpoint / f"{name}.safetensors"))
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
    return state, info
