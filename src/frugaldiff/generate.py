"""Generation from a trained run: load its EMA model, choose labels and guidance, run a solver."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import checkpoint_info, damage, latest_checkpoint, load_into, load_trainer_state, load_weights
from .components import SampleSettings, run_denoiser
from .config import Config
from .errors import FrugalError
from .guidance import NONE, Guidance, guided
from .images import save_grid, to_uint8
from .networks import Denoiser
from .plots import plot_points
from .runs import RunFiles, read_run_config
from .runtime import CPU, Probe, Runtime
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
    denoiser = run_denoiser(config, info)
    load_into(denoiser, load_weights(ckpt, "ema"), ckpt)
    return config, denoiser.eval().requires_grad_(False), info


def class_labels(n: int, classes: int, which: int | str | None = None,
                 counts: list[int] | None = None) -> torch.Tensor | None:
    """Labels of ``n`` samples of a model of ``classes`` classes (None when it is unconditional), in class order:
    all ``which`` for a class number; in the proportions of ``counts`` (the training split's images per class) when
    given and ``which`` is None — sample i takes the class whose share of the cumulative counts holds (i + ½)/n, so
    the samples imitate the data as a whole and score against it; else balanced (sample i has class
    ⌊i·classes/n⌋), one grid row per class."""
    if not classes:
        if which is not None:
            raise FrugalError(f"--class {which} needs a class-conditional run and this one is unconditional; train "
                              "one with labelled data (model.num_classes = auto)")
        return None
    if isinstance(which, int):
        if not 0 <= which < classes:
            raise FrugalError(f"--class {which} is not a class of this run; choose 0 to {classes - 1} or all")
        return torch.full((n,), which, dtype=torch.long)
    if counts is not None and which is None:
        cumulative = torch.tensor(counts, dtype=torch.float64).cumsum(0)
        quantiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return torch.searchsorted(cumulative / cumulative[-1], quantiles, right=True)
    return torch.arange(n) * classes // n


def default_labels(n: int, denoiser: Denoiser) -> torch.Tensor | None:
    """The labels :func:`generate` gives ``n`` samples of ``denoiser`` when given none: its train split's class mix,
    so that the samples score against the data they imitate (balanced classes for a denoiser without class counts,
    e.g. of a checkpoint from before they were recorded)."""
    return class_labels(n, denoiser.num_classes, counts=denoiser.class_counts)


def generate(denoiser: Denoiser, settings: SampleSettings, n: int, sample_shape: tuple[int, ...],
             runtime: Runtime = CPU, steps: int | None = None, solver: str | None = None, seed: int | None = None,
             progress: bool = False, labels: torch.Tensor | None = None, guidance: Guidance = NONE) -> torch.Tensor:
    """``n`` samples (float, data scale; a latent run's decoded to images) from ``denoiser`` on ``runtime`` with
    ``settings`` unless given, for ``labels`` (default: :func:`default_labels`, the data's class mix) under
    ``guidance``. ``sample_shape`` is the shape the model generates (a latent run's: its latents')."""
    device = runtime.device
    denoiser = denoiser.to(device)
    if labels is None:
        labels = default_labels(n, denoiser)
    labels = None if labels is None else labels.to(device)
    if guidance.model is not None:
        guidance.model.to(device)
    generator = torch.Generator().manual_seed(settings.seed if seed is None else seed)
    codec = denoiser.autoencoder
    clip = settings.clip and len(sample_shape) == 3 and codec is None  # latents are not bounded
    size = chunk_size(sample_shape)
    steps, solver = steps or settings.steps, solver or settings.solver

    def one_chunk(start: int, count: int, progress: bool) -> torch.Tensor:
        model_x0 = guided(denoiser, None if labels is None else labels[start:start + count], guidance)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with runtime.autocast():
                x0 = model_x0(x, t.to(device, torch.float32)).float()
            return x0.clamp(-1, 1) if clip else x0

        x = solve(denoise, denoiser.process, (count, *sample_shape), steps, solver=solver, schedule=settings.schedule,
                  eta=settings.eta, generator=generator, device=device, progress=progress)
        return (x if codec is None else codec.decode(x)).cpu()

    starts = range(0, n, size)
    with torch.inference_mode():
        if len(starts) == 1:
            return one_chunk(0, n, progress)
        chunks = tqdm(starts, desc=f"{solver}, {n} samples in chunks of {size}", unit="chunk", disable=not progress)
        return torch.cat([one_chunk(start, min(size, n - start), False) for start in chunks])


#: Values (pixels × channels) generated together: enough samples per network call to keep the CPU's vector
#: units busy, few enough that no activation outgrows the allocator's reusable blocks. Generating 1,000 mnist
#: samples at once spent more time in the kernel (mapping and zeroing fresh memory every step) than computing.
CHUNK_VALUES = 2**16


def chunk_size(sample_shape: tuple[int, ...]) -> int:
    """Samples per generation chunk for samples of ``sample_shape`` (83 for 28×28 grey, 5 for 64×64 colour)."""
    return max(1, min(4096, CHUNK_VALUES // math.prod(sample_shape)))


def sampling_runtime(config: Config, denoiser: Denoiser, sample_shape: tuple[int, ...], n: int) -> Runtime:
    """Where and in what precision ``n`` samples of ``denoiser`` are generated: ``config``'s device and precision,
    ``auto`` measured on one generation chunk of this model."""
    probe = Probe(denoiser, sample_shape, min(n, chunk_size(sample_shape)), backward=False)
    return Runtime.create(config["train.device"], config["train.precision"], probe)


def early_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run kept at ``train.guide_at`` (RUN/guide), or None."""
    kept = sorted(p for p in RunFiles(run_dir).guide.glob("step-*") if p.is_dir())
    return kept[-1] if kept else None


#: ``sample.guidance = auto`` for autoguidance from the run's own early checkpoint: the weight that lowered the
#: default run's domain FID on every seed, conditional or not (docs/guidance.md).
AUTOGUIDANCE_WEIGHT = 2.0


def run_guidance(run_dir: Path, settings: SampleSettings, denoiser: Denoiser, weight: float | str | None = None,
                 guide_checkpoint: Path | None = None, model_images: int | None = None) -> Guidance:
    """The guidance of ``sample.guidance``/``sample.guide``/``sample.guidance_interval`` (``weight`` and
    ``guide_checkpoint`` take precedence) for a run's ``denoiser``.

    The ``auto`` guide is autoguidance from the run's early checkpoint (RUN/guide) when the run kept one and the
    weight is ``auto`` too; an explicit weight on a conditional model means classifier-free guidance (a guidance
    scale, as in diffusers). Otherwise it is that checkpoint where one exists, CFG for a conditional model, and no
    guidance at all when the run has nothing to guide with. The ``auto`` guide skips an early checkpoint that saw
    at least ``model_images`` (the images the sampled model saw, when given): a guide must be the weaker model. The
    ``auto`` weight is AUTOGUIDANCE_WEIGHT for autoguidance and 1 (none) otherwise: CFG costs the default run
    domain FID. Asking explicitly for a guide the run cannot give is an error."""
    guide, early = settings.guide, early_checkpoint(run_dir)
    if guide == "auto" and early is not None and model_images is not None:
        early = early if checkpoint_info(early)["images_seen"] < model_images else None  # a guide must be weaker
    weight = settings.guidance if weight is None else weight
    if guide_checkpoint is not None:
        guide, early = "early", guide_checkpoint
    elif guide == "auto":
        if early is not None and not (weight != "auto" and denoiser.num_classes):
            guide = "early"
        else:
            guide = "cfg" if denoiser.num_classes else "none"
    if weight == "auto":
        weight = AUTOGUIDANCE_WEIGHT if guide == "early" and early is not None else 1.0
    if weight == 1.0 or (settings.guide == "auto" and guide == "none"):
        return NONE  # auto with nothing to guide with: no guidance, as documented
    interval = (settings.guidance_interval[0], settings.guidance_interval[1])
    if guide == "none":
        raise FrugalError(f"guidance weight {weight} needs a guide and sample.guide is none; use sample.guide = auto, "
                          "pass --guide-checkpoint, or use --guidance 1")
    if guide == "cfg":
        if not denoiser.num_classes:
            raise FrugalError("sample.guide = cfg needs a class-conditional run; use sample.guide = early or auto")
        return Guidance(weight, interval)
    if early is None:
        raise FrugalError(f"{run_dir} kept no early checkpoint for autoguidance; train with train.guide_at > 0 or "
                          "pass --guide-checkpoint")
    return Guidance(weight, interval, load_run(early.parent.parent, early)[1])


@dataclass
class Samples:
    """Generated samples (uint8 images [N, H, W, C] or float32 vectors [N, D]) and their labels (None:
    unconditional)."""

    values: np.ndarray
    labels: np.ndarray | None


def sample_run(run_dir: str | Path, n: int = 64, steps: int | None = None, solver: str | None = None, seed: int = 0,
               checkpoint: str | Path | None = None, progress: bool = False, which: int | str | None = None,
               guidance: float | None = None, guide_checkpoint: str | Path | None = None) -> Samples:
    """Samples of a run's EMA model with its sampling settings: ``which`` is a class or "all" (``n`` per class, in
    class order) for conditional runs, which otherwise sample their classes in the training split's proportions;
    ``guidance`` a weight and ``guide_checkpoint`` a weaker model's checkpoint."""
    run_dir = Path(run_dir)
    config, denoiser, info = load_run(run_dir, checkpoint)
    settings = SampleSettings.from_config(config)
    classes = denoiser.num_classes
    total = n * classes if which == "all" and classes else n
    runtime = sampling_runtime(config, denoiser, tuple(info["sample_shape"]), total)
    labels = class_labels(total, classes, which, denoiser.class_counts)
    plan = run_guidance(run_dir, settings, denoiser, guidance, None if guide_checkpoint is None else
                        Path(guide_checkpoint), info["images_seen"])
    x = generate(denoiser, settings, total, tuple(info["sample_shape"]), runtime, steps, solver, seed, progress,
                 labels, plan)
    values = to_uint8(x) if info["data_kind"] == "image" else x.numpy().astype(np.float32)
    return Samples(values, None if labels is None else labels.numpy())


def sample(run_dir: str | Path, n: int = 64, steps: int | None = None, solver: str | None = None,
           seed: int = 0, checkpoint: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """Samples of a run's EMA model: uint8 [N, H, W, C] for images, float32 [N, D] for vectors."""
    return sample_run(run_dir, n, steps, solver, seed, checkpoint, progress).values


def save_samples(samples: np.ndarray, png: Path, reference: np.ndarray | None = None, rows: int | None = None) -> None:
    """A PNG of samples: a grid for images (uint8 [N,H,W,C]; ``rows`` rows, e.g. one per class), a scatter for
    vectors."""
    if samples.dtype == np.uint8:
        save_grid(samples, png, ncols=-(-len(samples) // rows) if rows else None)
    else:
        plot_points(samples, png, reference)
