"""``frugaldiff train-autoencoder``: a small diffusers ``AutoencoderKL`` trained on the user's images, written as the
folder that ``data.autoencoder`` takes.

The loss of a batch: L1 reconstruction of the images from a posterior sample, plus ``kl_weight`` × the KL term
(summed over latent values, as Stable Diffusion's autoencoder counts it) and ``gradient_weight`` × the L1 error of the
images' horizontal and vertical differences (edges, without a perceptual network whose weights would have to be
downloaded). The run folder, progress bar, checkpoints, resume and SIGINT/SIGTERM handling are those of ``train``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, checkpoint_path, load_checkpoint, load_into, save_checkpoint
from .components import _Settings, build_data, lr_at
from .config import Config
from .datasets import BatchStream, mirror_randomly
from .ema import EMA
from .errors import FrugalError
from .images import save_grid, to_uint8
from .latent import Autoencoder, autoencoder_class, measured_factors
from .networks import norm_groups
from .runs import MetricsLog, RunFiles, RunLock, start_run
from .runtime import Runtime
from .trainer import Interrupted, crossed, signals_to_flag

#: The columns of an autoencoder run's metrics.csv.
AE_FIELDS = ["step", "images_seen", "loss", "recon_l1", "kl", "lr", "images_per_s"]
#: ``autoencoder.factor = auto`` aims at latents of about this side: at 128 px, 32 × 32 latents (factor 4) gave
#: clearly better samples than 16 × 16 (factor 8) at equal CPU time (docs/latent.md).
AUTO_LATENT_SIDE = 32
#: The kind recorded in an autoencoder checkpoint's state.json (a diffusion run's checkpoints have none).
KIND = "autoencoder"


@dataclass(frozen=True)
class AutoencoderSettings(_Settings):
    """The ``autoencoder.*`` keys, and the ``train.*`` keys an autoencoder run shares with ``train``."""

    section = "autoencoder"
    borrowed = {k: f"train.{k}" for k in ("seed", "device", "precision", "checkpoint_every", "keep_checkpoints",
                                          "log_every", "warmup_images", "lr_schedule", "tensorboard")} | {
        "flip": "data.flip"}

    factor: int | str  # "auto" resolves in new_autoencoder
    latent_channels: int
    channels: int
    group_channels: int
    batch_size: int
    images_seen: int
    lr: float
    kl_weight: float
    gradient_weight: float
    ema_decay: float
    seed: int
    device: str
    precision: str
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    warmup_images: int
    lr_schedule: str
    tensorboard: bool
    flip: bool


def new_autoencoder(settings: AutoencoderSettings, image_channels: int, side: int) -> Any:
    """A fresh AutoencoderKL for ``side``-px images: ``log2(factor) + 1`` levels of widths channels × 1, 2, 4, 4, …
    with one residual block each and no attention (a small model for a CPU), its GroupNorms in
    gcd(channels / group_channels, 32) groups."""
    factor = settings.factor
    if factor == "auto":
        factor = min(8, max(2, 2 ** round(math.log2(side / AUTO_LATENT_SIDE))))
    levels = round(math.log2(factor)) + 1
    if 2 ** (levels - 1) != factor:
        raise FrugalError(f"autoencoder.factor is {factor}; use a power of 2, e.g. 4 or 8")
    if side % factor:
        raise FrugalError(f"data.image_size {side} is not a multiple of autoencoder.factor {factor}; use "
                          f"e.g. data.image_size = {max(1, round(side / factor)) * factor}")
    groups = norm_groups(settings.channels, settings.group_channels, "autoencoder")
    widths = [settings.channels * min(2**i, 4) for i in range(levels)]
    return autoencoder_class()(
        in_channels=image_channels, out_channels=image_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(widths), layers_per_block=1,
        latent_channels=settings.latent_channels, norm_num_groups=groups, sample_size=side,
        mid_block_add_attention=False)


def autoencoder_loss(vae: Any, x: Tensor, generator: torch.Generator, kl_weight: float,
                     gradient_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, L1 reconstruction error, KL per image) of images ``x`` in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    recon = vae.decode(z).sample.float()
    l1 = (recon - x).abs().mean()
    kl = posterior.kl().float().mean()
    loss = l1 + kl_weight * kl
    if gradient_weight:
        for dim in (-1, -2):
            loss = loss + gradient_weight * (recon.diff(dim=dim) - x.diff(dim=dim)).abs().mean()
    return loss, l1.detach(), kl.detach()


class AutoencoderTrainer:
    """Trains one autoencoder run folder; ``resume`` continues from its newest checkpoint (bit-identically on CPU)."""

    def __init__(self, config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.config, self.settings = config, AutoencoderSettings.from_config(config)
        self.files, self.progress = RunFiles(Path(run_dir)), progress
        s = self.settings
        if config["data.autoencoder"]:
            raise FrugalError("train-autoencoder trains on images; drop data.autoencoder")
        self.runtime = Runtime.create(s.device, s.precision)
        torch.manual_seed(s.seed)
        self.data = build_data(config)
        if self.data.kind != "image":
            raise FrugalError(f"train-autoencoder needs images and {self.data.name!r} holds vectors; pick an image "
                              "dataset")
        channels, side, _ = self.data.sample_shape
        self.vae = new_autoencoder(s, channels, side).to(self.runtime.device).train()
        self.ema = EMA(self.vae, s.ema_decay)
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=s.lr, weight_decay=0.0)
        self.stream = BatchStream(torch.arange(len(self.data.train)), s.seed)
        self.noise = torch.Generator().manual_seed(s.seed + 1)
        self.step = self.images_seen = 0
        self.lock = RunLock(self.files.root)
        try:
            point = start_run(self.files.root, resume)
            if point is not None:
                self._load(point)
            config.save(self.files.config)
            self.metrics = MetricsLog(self.files, AE_FIELDS, s.tensorboard)
            if resume:
                self.metrics.truncate(self.step)
        except BaseException:
            self.lock.release()
            raise

    @property
    def folder(self) -> Path:
        """Where the trained autoencoder is written (the folder ``data.autoencoder`` takes)."""
        return self.files.root / "autoencoder"

    def state_dict(self) -> dict[str, Any]:
        trainer = {"optimizer": self.optimizer.state_dict(), "noise_rng": self.noise.get_state(),
                   "torch_rng": torch.get_rng_state(), "stream_position": self.stream.position}
        info = {"kind": KIND, "step": self.step, "images_seen": self.images_seen,
                "sample_shape": list(self.data.sample_shape), "data_kind": "image"}
        return {"model": self.vae.state_dict(), "ema": self.ema.model.state_dict(), "trainer": trainer, "info": info}

    def _load(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, KIND)
        load_into(self.vae, state["model"], checkpoint)
        load_into(self.ema.model, state["ema"], checkpoint)
        trainer, info = state["trainer"], state["info"]
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.noise.set_state(trainer["noise_rng"])
        torch.set_rng_state(trainer["torch_rng"])
        self.stream.position = trainer["stream_position"]
        self.step, self.images_seen = info["step"], info["images_seen"]

    def save(self) -> Path:
        return save_checkpoint(self.files.checkpoints, self.step, self.state_dict(), self.settings.keep_checkpoints)

    def train_step(self) -> dict[str, float]:
        """One AdamW step on the next batch (mirrored with probability 1/2 under data.flip)."""
        s, device = self.settings, self.runtime.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(s.lr, self.images_seen, s.warmup_images, s.lr_schedule, s.images_seen)
        x = self.data.train[self.stream.next(s.batch_size)].to(device)
        if s.flip:
            x = mirror_randomly(x, self.noise)
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            loss, l1, kl = autoencoder_loss(self.vae, x, self.noise, s.kl_weight, s.gradient_weight)
        loss.backward()
        self.images_seen += s.batch_size
        values = torch.stack([loss.detach().float(), l1, kl]).tolist()
        if not all(math.isfinite(v) for v in values):
            raise FrugalError(f"autoencoder training diverged at step {self.step} (non-finite loss); lower "
                              "autoencoder.lr or set train.precision = fp32")
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.vae, self.step)
        return dict(zip(("loss", "recon_l1", "kl"), values, strict=True))

    def fit(self) -> Path:
        """Train to ``autoencoder.images_seen``, then write the autoencoder folder, its held-out reconstruction
        error (RUN/eval.json) and RUN/reconstructions.png. Returns the autoencoder folder."""
        try:
            self._train()
            self.save()
            self.export()
            return self.folder
        finally:
            self.metrics.close()
            self.lock.release()

    def _train(self) -> None:
        s, stop = self.settings, []
        period: list[tuple[dict[str, float], float]] = []  # (losses, seconds) of the steps since the last row
        bar = tqdm(total=s.images_seen, initial=min(self.images_seen, s.images_seen), unit="img", unit_scale=True,
                   disable=not self.progress, dynamic_ncols=True, mininterval=1.0, desc="autoencoder")
        with signals_to_flag(stop), bar:
            while self.images_seen < s.images_seen:
                start, before = time.perf_counter(), self.images_seen
                values = self.train_step()
                seconds = time.perf_counter() - start
                period.append((values, seconds))
                done = self.images_seen >= s.images_seen
                if self.step % s.log_every == 0 or done:
                    self._log(period)
                    period = []
                bar.update(self.images_seen - before)
                bar.set_postfix(l1=f"{values['recon_l1']:.4f}", img_s=f"{s.batch_size / seconds:.0f}", refresh=False)
                if crossed(before, self.images_seen, s.checkpoint_every, math.inf) and not done:
                    self.save()
                if stop:
                    raise Interrupted(stop[0], self.save())

    def _log(self, period: list[tuple[dict[str, float], float]]) -> None:
        """One metrics.csv row: the mean losses and the images per second of ``period``'s steps."""
        seconds = sum(t for _, t in period)
        means = {key: sum(v[key] for v, _ in period) / len(period) for key in period[0][0]}
        self.metrics.write({"step": self.step, "images_seen": self.images_seen,
                            "lr": f"{self.optimizer.param_groups[0]['lr']:.6g}",
                            "images_per_s": f"{len(period) * self.settings.batch_size / max(seconds, 1e-9):.1f}",
                            **{key: f"{value:.6g}" for key, value in means.items()}})

    def export(self) -> dict[str, Any]:
        """Write the EMA autoencoder as a diffusers folder (RUN/autoencoder, replaced atomically) with the measured
        scaling of its training latents, and its held-out reconstruction error and picture."""
        vae = self.ema.model.eval()
        codec = Autoencoder(vae, self.folder, "", 1.0, 0.0)
        latents = codec.encode_raw(self.data.train, self.progress)
        scale, shift = measured_factors(latents)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        tmp = self.files.root / f".tmp-autoencoder-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        vae.save_pretrained(str(tmp), safe_serialization=True)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.rename(tmp, self.folder)
        heldout = self.data.heldout
        codec = codec.with_factors(scale, shift)
        recon = codec.decode(codec.to_model(codec.encode_raw(heldout)))
        mse = float(((recon - heldout) ** 2).mean())
        result = {"heldout_images": len(heldout), "heldout_mse": mse, "heldout_psnr_db": 10 * math.log10(4 / mse),
                  "heldout_l1": float((recon - heldout).abs().mean()), "latent_shape": list(latents.shape[1:]),
                  "scaling_factor": scale, "shift_factor": shift, "images_seen": self.images_seen,
                  "checkpoint": checkpoint_path(self.files.checkpoints, self.step).name}
        atomic_write_text(self.files.root / "eval.json", json.dumps(result, indent=1) + "\n")
        show = min(16, len(heldout))
        pairs = torch.stack([heldout[:show], recon[:show]], 1).flatten(0, 1)  # original, reconstruction, ...
        save_grid(to_uint8(pairs), self.files.root / "reconstructions.png", ncols=min(16, 2 * show))
        return result
