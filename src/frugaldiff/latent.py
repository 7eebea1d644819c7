"""Latent diffusion: a diffusers ``AutoencoderKL`` folder as the data's codec, and the dataset's latents, cached.

:func:`load_autoencoder` reads a local folder (``config.json`` + weights, or a pipeline folder with a ``vae/``
sub-folder); nothing is downloaded. :func:`latent_data` encodes a dataset once (the posterior mean, in fp32) and
caches the raw latents under the cache folder, keyed by the autoencoder's files and the images themselves; the model
trains on ``(z - shift) · scale``, with the autoencoder's own ``scaling_factor`` / ``shift_factor`` or, when its
``config.json`` states none, the measured mean and standard deviation of the training latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .datasets import Data, cached_arrays
from .errors import FrugalError, short_repr

LATENT_EXTRA = 'pip install -e ".[latent]"'
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: Images encoded or latents decoded per autoencoder call.
CODEC_BATCH = 64
_LAYOUT = "give a folder in diffusers' AutoencoderKL layout (config.json + diffusion_pytorch_model.safetensors)"


def autoencoder_class() -> Any:
    """diffusers' AutoencoderKL, or a one-line error naming the extra that installs it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers import AutoencoderKL
    except ImportError:
        raise FrugalError(f"latent diffusion (data.autoencoder) needs diffusers; install it: {LATENT_EXTRA}") from None
    return AutoencoderKL


@dataclasses.dataclass(frozen=True, eq=False)
class Autoencoder:
    """An AutoencoderKL with the affine map between its latents and the model's: ``z_model = (z - shift) · scale``.

    Shared, never copied (a denoiser's EMA copy keeps the same one); not a torch module, so it is in no checkpoint.
    """

    vae: Any
    folder: Path
    digest: str
    scale: float | None  # None: the folder states no scaling_factor; measured on the data by latent_data
    shift: float

    def __deepcopy__(self, memo: dict) -> Autoencoder:
        return self

    @property
    def channels(self) -> int:
        """Latent channels."""
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def factor(self) -> int:
        """Downsampling factor per side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def with_factors(self, scale: float, shift: float) -> Autoencoder:
        return dataclasses.replace(self, scale=scale, shift=shift)

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode_raw(self, x: Tensor, progress: bool = False) -> Tensor:
        """Posterior means (unscaled latents) of images [N, C, H, W] in [-1, 1], in batches, fp32, on the CPU."""
        device, out = self._device(), []
        with torch.inference_mode():
            for start in tqdm(range(0, len(x), CODEC_BATCH), desc=f"encoding {len(x)} images", unit="batch",
                              disable=not progress):
                batch = x[start:start + CODEC_BATCH].to(device, torch.float32)
                out.append(self.vae.encode(batch).latent_dist.mode().float().cpu())
        return torch.cat(out)

    def to_model(self, z: Tensor) -> Tensor:
        """Raw latents → the model's (standardised) latents."""
        return (z - self.shift) * self._scale()

    def decode(self, z: Tensor) -> Tensor:
        """The model's latents [N, c, h, w] → images [N, C, H, W] in [-1, 1] (fp32, batched, on z's device)."""
        self.vae.to(z.device)
        raw = z.float() / self._scale() + self.shift
        with torch.inference_mode():
            images = [self.vae.decode(raw[s:s + CODEC_BATCH]).sample.float() for s in range(0, len(raw), CODEC_BATCH)]
        return torch.cat(images).clamp(-1, 1)

    def _scale(self) -> float:
        if self.scale is None:
            raise FrugalError(f"{self.folder} states no scaling_factor and this run recorded none; train the run "
                              "again, or add scaling_factor to its config.json")
        return self.scale


def _folder(path: str | Path) -> Path:
    """The AutoencoderKL folder at ``path`` (a pipeline folder's ``vae/`` sub-folder is taken too)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FrugalError(f"data.autoencoder: no folder {short_repr(str(folder))}; {_LAYOUT}")
    if not (folder / CONFIG_FILE).is_file() and (folder / "vae" / CONFIG_FILE).is_file():
        folder = folder / "vae"
    return folder


def read_folder_config(folder: Path) -> dict[str, Any]:
    """The config.json of an AutoencoderKL folder, checked: a one-line error for anything else."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FrugalError(f"data.autoencoder: {folder} has no {CONFIG_FILE}; {_LAYOUT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrugalError(f"data.autoencoder: cannot read {path} ({type(e).__name__}); {_LAYOUT}") from None
    found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
    if found != "AutoencoderKL":
        raise FrugalError(f"data.autoencoder: {folder} holds a {short_repr(found)}, not an AutoencoderKL; {_LAYOUT}")
    return config


def _weights(folder: Path) -> Path:
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise FrugalError(f"data.autoencoder: {folder} has no weights ({' or '.join(WEIGHT_FILES)}); {_LAYOUT}")
    return found


def folder_digest(folder: Path) -> str:
    """SHA-256 of an AutoencoderKL folder's config.json and weights."""
    hasher = hashlib.sha256()
    for path in (folder / CONFIG_FILE, _weights(folder)):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()


@lru_cache(maxsize=2)
def _read(folder: Path, stamp: tuple[int, ...]) -> tuple[Any, str]:
    """(the loaded AutoencoderKL in eval mode, its digest); cached while its files (``stamp``) are unchanged."""
    digest = folder_digest(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = autoencoder_class().from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FrugalError(f"data.autoencoder: cannot load {folder} as an AutoencoderKL ({short_repr(first)}); "
                          f"{_LAYOUT}") from None
    return vae.eval().requires_grad_(False), digest


def load_autoencoder(path: str | Path, factors: tuple[float, float] | list[float] | None = None) -> Autoencoder:
    """The AutoencoderKL folder at ``path`` with its scaling: the folder's scaling_factor / shift_factor where its
    config.json states them, else ``factors`` (scale, shift) as a run recorded them, else none yet (measured by
    :func:`latent_data`)."""
    folder = _folder(path)
    config = read_folder_config(folder)
    weights = _weights(folder)
    stamp = tuple(int(v) for p in (folder / CONFIG_FILE, weights) for v in (p.stat().st_size, p.stat().st_mtime_ns))
    vae, digest = _read(folder.resolve(), stamp)
    if config.get("scaling_factor") is not None:
        scale, shift = float(config["scaling_factor"]), float(config.get("shift_factor") or 0.0)
    elif factors is not None:
        scale, shift = float(factors[0]), float(factors[1])
    else:
        scale, shift = None, 0.0
    return Autoencoder(vae, folder, digest, scale, shift)


def check_same_autoencoder(autoencoder: Autoencoder, info: dict[str, Any], run: str | Path) -> None:
    """A one-line refusal when the autoencoder folder no longer holds the one a run's checkpoint (``info``) trained
    with: its latents would mean something else."""
    recorded = info.get("autoencoder_digest")
    if recorded is not None and recorded != autoencoder.digest:
        raise FrugalError(f"the autoencoder in {autoencoder.folder} changed since {run} trained on its latents "
                          f"(digest {autoencoder.digest[:12]}, the run's {recorded[:12]}); put the run's autoencoder "
                          "back, or train a new run on this one")


def measured_factors(latents: Tensor) -> tuple[float, float]:
    """(scale, shift) that give raw ``latents`` zero mean and unit variance over all their values."""
    return 1 / float(latents.std()), float(latents.mean())


def _data_digest(data: Data) -> str:
    hasher = hashlib.sha256()
    for part in (data.train, data.heldout):
        hasher.update(str(tuple(part.shape)).encode())
        hasher.update(part.contiguous().numpy().tobytes())
    return hasher.hexdigest()


def latent_data(data: Data, autoencoder: Autoencoder, progress: bool = False) -> Data:
    """``data`` with its images replaced by their latents (model scale), encoded once and cached as
    ``<cache>/latents/<name>-<key>.npz``, where the key digests the autoencoder's files and the images (a change of
    either encodes again). The result's ``autoencoder`` carries the scaling used."""
    if data.kind != "image":
        raise FrugalError(f"data.autoencoder encodes images and {data.name!r} holds vectors; drop data.autoencoder")
    if data.sample_shape[0] != autoencoder.image_channels:
        raise FrugalError(f"data.autoencoder {autoencoder.folder} takes {autoencoder.image_channels}-channel images "
                          f"and {data.name!r} has {data.sample_shape[0]}; set data.color = "
                          f"{'rgb' if autoencoder.image_channels == 3 else 'grey'}")
    side = data.sample_shape[1]
    if side % autoencoder.factor:
        fit = max(1, round(side / autoencoder.factor)) * autoencoder.factor
        raise FrugalError(f"data.image_size {side} is not a multiple of the autoencoder's downsampling factor "
                          f"{autoencoder.factor}; use e.g. data.image_size = {fit}")
    key = hashlib.sha256(f"{autoencoder.digest}:{_data_digest(data)}".encode()).hexdigest()[:24]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in data.name)[-60:]

    def encode() -> dict[str, np.ndarray]:
        return {"train": autoencoder.encode_raw(data.train, progress).numpy(),
                "heldout": autoencoder.encode_raw(data.heldout, progress).numpy()}

    arrays = cached_arrays(f"latents/{safe}-{key}", encode)
    train, heldout = torch.from_numpy(arrays["train"]), torch.from_numpy(arrays["heldout"])
    if autoencoder.scale is None:
        autoencoder = autoencoder.with_factors(*measured_factors(train))
    return dataclasses.replace(data, train=autoencoder.to_model(train), heldout=autoencoder.to_model(heldout),
                               autoencoder=autoencoder)
