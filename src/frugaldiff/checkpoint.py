"""Checkpoints written atomically and verified when read: a checkpoint is a folder that appears whole or not at all.

Layout of ``RUN/checkpoints/step-00001234/``: ``model.safetensors`` and ``ema.safetensors`` (weights),
``trainer.pt`` (optimizer, timestep sampler, RNG states, ...: tensors and plain values only, read with
``weights_only=True``, so opening a run folder never runs code), ``state.json`` (human-readable counters and
the SHA-256 of every other file): the four parts of a training state's state dict (``model``, ``ema``,
``trainer``, ``info``). Each is written into ``.tmp-step-...`` first, flushed to disk, and the folder is renamed
into place, so a kill during writing leaves the previous checkpoints untouched and loadable; a step written again
replaces the old folder by two renames. Readers take the newest checkpoint that is intact and say which newer
ones they skipped and why. Checkpoints from before the learned weighting moved into the denoiser (a
``weighting.safetensors`` beside the weights, a second optimizer group) load as today's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import FrugalError

PREFIX = "step-"
WEIGHTS = ("model", "ema")  # the parts of a state dict saved as safetensors (every checkpoint has them)
OPTIONAL_WEIGHTS = ("phema",)  # parts saved as safetensors when present (the power-function EMAs)
DIFFUSION = "diffusion"  # the kind of a run whose state.json names none (autoencoder runs say "autoencoder")
FILES = ("model.safetensors", "ema.safetensors", "trainer.pt")  # the files every checkpoint has
#: What reading a damaged file can raise (beside FrugalError).
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError,
                json.JSONDecodeError, UnicodeDecodeError, pickle.UnpicklingError)


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


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an advisory lock on the file ``lock`` (created if missing) for the block, waiting while another process
    holds it (no lock where the platform has no ``flock`` or the folder cannot be written)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        file = lock.open("a")
    except OSError:
        yield
        return
    with file:
        if fcntl is not None:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        yield


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``folder``."""
    return folder / f"{PREFIX}{step:08d}"


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _write(tmp: Path, state: dict[str, Any]) -> None:
    """The files of checkpoint ``state`` in the folder ``tmp``, flushed to disk, digests in state.json."""
    for name in (*WEIGHTS, *(n for n in OPTIONAL_WEIGHTS if n in state)):
        save_file({k: v.detach().cpu().contiguous() for k, v in state[name].items()}, str(tmp / f"{name}.safetensors"))
    torch.save(state["trainer"], tmp / "trainer.pt")
    info = {**state["info"], "files": {p.name: _digest(p) for p in sorted(tmp.iterdir())}}
    (tmp / "state.json").write_text(json.dumps(info, indent=2))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def write_checkpoint(final: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` ({"model", "ema": tensors, "trainer": tensors and plain values, "info": JSON}) as the checkpoint
    folder ``final``, atomically (an existing one is replaced by two renames). A full disk (or any write error) is a
    one-line FrugalError with the previous checkpoints intact."""
    folder = final.parent
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write(tmp, state)
        if final.exists():  # the same step again (e.g. interrupted right after a save): replace it by renames
            old = folder / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(folder)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)
        reason = "the disk is full" if full else f"{type(e).__name__}: {str(e)[:120]}"
        run = folder.parent
        raise FrugalError(f"could not write checkpoint {final} ({reason}); the previous checkpoints are intact: "
                          f"free space, then resume with frugaldiff train --resume {run}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``folder`` (:func:`write_checkpoint`) and keep the newest
    ``keep``."""
    final = write_checkpoint(checkpoint_path(folder, step), state)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temporary folders that killed writes left under ``folder`` (call it only while holding the run's
    lock); a step left only as ``.old-step-*`` (killed between the two renames of a replacement) is put back.
    Returns what was removed."""
    removed = []
    for path in sorted(folder.glob(".*")) if folder.is_dir() else []:
        final = folder / path.name.split("-", 1)[-1].rsplit("-", 1)[0]
        if path.name.startswith(".old-") and not final.exists():
            os.rename(path, final)
        elif path.name.startswith((".tmp-", ".old-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first (temporary folders are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be used (a missing, unreadable or altered file, or a trainer.pt that holds more than
    tensors and plain values), or None when it is intact. Files are checked against their digests where state.json
    has them (older checkpoints: by reading them)."""
    try:
        info = checkpoint_info(checkpoint)
        if not isinstance(info, dict) or not {"step", "images_seen", "sample_shape", "data_kind"} <= set(info):
            return "state.json lacks its counters"
        missing = [name for name in FILES if not (checkpoint / name).is_file()]
        if missing:
            return f"{missing[0]} is missing"
        listed = info.get("files", {})
        altered = [name for name in listed if not (checkpoint / name).is_file() or _digest(checkpoint / name) !=
                   listed[name]]
        if altered:
            return f"{altered[0]} does not match its digest in state.json"
        load_trainer_state(checkpoint, info.get("kind", DIFFUSION))  # tensors and plain values only, whatever the
        # digests say
        if "files" not in info:  # written before digests: the weights must at least read
            for name in WEIGHTS:
                load_weights(checkpoint, name)
        return None
    except FileNotFoundError as e:
        return f"{Path(e.filename or 'state.json').name} is missing"
    except (FrugalError, *_READ_ERRORS) as e:
        return f"{type(e).__name__} while reading it"


def intact_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints of a run that are intact, oldest first; each damaged one is skipped with a warning."""
    intact = []
    for checkpoint in list_checkpoints(Path(run_dir) / "checkpoints"):
        reason = damage(checkpoint)
        if reason is None:
            intact.append(checkpoint)
        else:
            warnings.warn(f"skipped damaged checkpoint {checkpoint.name} of {run_dir}: {reason}", stacklevel=2)
    return intact


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest intact checkpoint of a run (damaged newer ones skipped with a warning), or a FrugalError."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    intact = intact_checkpoints(run_dir) if found else []
    if not found:
        raise FrugalError(f"no checkpoint in {run_dir}; train it first or pass another run folder")
    if not intact:
        raise FrugalError(f"every checkpoint of {run_dir} is damaged (see the warnings); train it again with "
                          f"frugaldiff train --resume {run_dir}, which starts over from step 0")
    return intact[-1]


def resume_point(run_dir: Path) -> Path | None:
    """Where a trainer that holds the run's lock continues: its newest intact checkpoint, or None to start over
    (none was ever completed, or all are damaged). Stale temporary folders are removed first, and damaged checkpoints
    newer than the one returned are renamed ``damaged-step-*`` (kept for inspection, out of every listing)."""
    folder = Path(run_dir) / "checkpoints"
    clean_stale(folder)
    intact = intact_checkpoints(run_dir)
    newest = intact[-1] if intact else None
    for checkpoint in list_checkpoints(folder):
        if newest is None or checkpoint.name > newest.name:
            os.rename(checkpoint, checkpoint.with_name(f"damaged-{checkpoint.name}"))
    return newest


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
            f"checkpoint {checkpoint} does not fit the configured network ({first[:200]}); "
            "keep the run's model.* settings when resuming or sampling"
        ) from None


def checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's state.json: its counters (step, images_seen), sample shape, data kind and file digests."""
    return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))


def load_trainer_state(checkpoint: Path, kind: str = DIFFUSION) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, info) of a checkpoint of a ``kind`` run; trainer.pt is read with ``weights_only=True`` (no
    code runs). A checkpoint of the other kind (an autoencoder's for a diffusion run) is refused in one line."""
    info = checkpoint_info(checkpoint)
    found = info.get("kind", DIFFUSION)
    if found != kind:
        run = checkpoint.parent.parent
        fix = (f"give data.autoencoder = {run / 'autoencoder'} to a diffusion run" if found == "autoencoder"
               else "resume it with frugaldiff train")
        raise FrugalError(f"{run} holds {found} checkpoints, not {kind} ones; {fix}")
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    if len(groups) == 2:  # an old learned weighting's own group: its parameters come last in the denoiser now
        groups[0]["params"] += groups.pop()["params"]
    return state, info


def load_checkpoint(checkpoint: Path, kind: str = DIFFUSION) -> dict[str, Any]:
    """The state dict a checkpoint of a ``kind`` run holds (see :func:`save_checkpoint`)."""
    trainer, info = load_trainer_state(checkpoint, kind)
    optional = [name for name in OPTIONAL_WEIGHTS if (checkpoint / f"{name}.safetensors").is_file()]
    return {**{name: load_weights(checkpoint, name) for name in (*WEIGHTS, *optional)}, "trainer": trainer,
            "info": info}
