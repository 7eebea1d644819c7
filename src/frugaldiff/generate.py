"""Generation from a trained run: load its EMA model and run a solver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import damage, latest_checkpoint, load_into, load_trainer_state, load_weights
from .components import SampleSettings, build_denoiser
from .config import Config
from .errors import FrugalError
from .images import save_grid, to_uint8
from .networks import Denoiser
from .plots import plot_points
from .runs import read_run_config
from .runtime import CPU, Runtime
from .solvers import solve


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[Config, Denoiser, dict]:
    """(config, EMA denoiser in eval mode, checkpoint info and its folder's name) of a run folder: its newest intact
    checkpoint, or ``checkpoint``."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    reason = damage(ckpt) if checkpoint is not None else None
    if reason is not None:
        raise FrugalError(f"checkpoint {ckpt} cannot be used ({reason}); pass another --checkpoint or none")
    _, info = load_trainer_state(ckpt)
    info["checkpoint"] = ckpt.name
    denoiser = build_denoiser(config, tuple(info["sample_shape"]))
    load_into(denoiser, load_weights(ckpt, "ema"), ckpt)
    return config, denoiser.eval().requires_grad_(False), info


def generate(denoiser: Denoiser, settings: SampleSettings, n: int, sample_shape: tuple[int, ...],
             runtime: Runtime = CPU, steps: int | None = None, solver: str | None = None, seed: int | None = None,
             progress: bool = False) -> torch.Tensor:
    """``n`` samples (float, data scale) from ``denoiser`` on ``runtime`` with ``settings`` unless given."""
    device = runtime.device
    denoiser = denoiser.to(device)
    generator = torch.Generator().manual_seed(settings.seed if seed is None else seed)
    clip = settings.clip and len(sample_shape) == 3

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            x0 = denoiser.denoise(x, t.to(device, torch.float32)).float()
        return x0.clamp(-1, 1) if clip else x0

    return solve(denoise, denoiser.process, (n, *sample_shape), steps or settings.steps,
                 solver=solver or settings.solver, schedule=settings.schedule, eta=settings.eta,
                 generator=generator, device=device, progress=progress).cpu()


def sample(run_dir: str | Path, n: int = 64, steps: int | None = None, solver: str | None = None,
           seed: int = 0, checkpoint: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """Samples of a run's EMA model: uint8 [N, H, W, C] for images, float32 [N, D] for vectors."""
    config, denoiser, info = load_run(run_dir, checkpoint)
    runtime = Runtime.create(config["train.device"], config["train.precision"])
    x = generate(denoiser, SampleSettings.from_config(config), n, tuple(info["sample_shape"]), runtime, steps, solver,
                 seed, progress)
    return to_uint8(x) if info["data_kind"] == "image" else x.numpy().astype(np.float32)


def save_samples(samples: np.ndarray, png: Path, reference: np.ndarray | None = None) -> None:
    """A PNG of samples: a grid for images (uint8 [N,H,W,C]), a scatter for vectors."""
    if samples.dtype == np.uint8:
        save_grid(samples, png)
    else:
        plot_points(samples, png, reference)
