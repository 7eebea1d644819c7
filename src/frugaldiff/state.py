"""The training state: everything that changes while a run trains, and whose state dict is its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, load_into, save_checkpoint
from .components import Components, TrainSettings
from .datasets import BatchStream, Data, mirror_randomly, random_patches
from .diagnostics import LossLedger
from .ema import EMA, PowerEMA
from .latent import check_same_autoencoder
from .noise import immiscible_order
from .objective import Batch, Objective


def empty_log() -> dict[str, float]:
    """Running sums of one logging period of metrics.csv."""
    return {"loss": 0.0, "count": 0, "grad_norm": 0.0, "images": 0, "time": 0.0}


class TrainState:
    """Model, EMA, AdamW, timestep sampler, data position, noise generator, counters and the current logging
    period (running sums and the loss ledger) of one run.

    The data order, the times and the noise come from generators of their own (seeded by ``train.seed``), so
    :meth:`state_dict` with torch's global generator (dropout) makes a resumed run identical to an uninterrupted
    one.
    """

    def __init__(self, parts: Components, data: Data, settings: TrainSettings) -> None:
        self.denoiser, self.sampler, self.process = parts.denoiser, parts.sampler, parts.process
        self.train, self.classes = data.train, parts.denoiser.num_classes
        self.train_labels = data.train_labels if self.classes else None
        #: images per class in the train split (what generated samples imitate: :func:`~.generate.default_labels`),
        #: on the denoiser before the EMA copies it
        self.denoiser.class_counts = (torch.bincount(self.train_labels, minlength=self.classes).tolist()
                                      if self.classes else None)
        self.ema = EMA(self.denoiser, settings.ema_decay)
        self.phema = PowerEMA(self.denoiser) if settings.phema_snapshots else None
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        self.label_dropout, self.flip = settings.label_dropout, settings.flip and data.kind == "image"
        self.immiscible = settings.immiscible
        self.patch, self.patch_full, self.latent = settings.patch, settings.patch_full, data.autoencoder is not None
        self.stream = BatchStream(torch.arange(len(data.train)), settings.seed)
        self.noise = torch.Generator().manual_seed(settings.seed + 1)
        self.step = self.images_seen = self.nonfinite_total = self.nonfinite_in_a_row = 0
        self.log = empty_log()
        self.ledger = LossLedger(settings.ledger_bins)  # this logging period's losses per t bin, all ranks
        self.sample_shape, self.data_kind = data.sample_shape, data.kind
        #: a latent run records its autoencoder's digest and scaling: sampling needs them, not the cached latents
        self.autoencoder = data.autoencoder
        #: what the training computes in (fp32, bf16), recorded so that a resumed ``auto`` run keeps it (None: not
        #: known yet, or a checkpoint from before it was recorded)
        self.precision: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def draw(self, n: int, objective: Objective) -> Batch:
        """The next global batch of ``n``: data, then times, then (train.patch) which images are mirrored and the
        crops, then noise, then (data.flip without train.patch) which images are mirrored, then (train.immiscible)
        the noise paired with the images by least total distance, then the stable target's references, then
        (conditional training) which labels are dropped to the null label."""
        device = self.device
        index = self.stream.next(n)
        x0 = self.train[index].to(device)
        t, importance = self.sampler.draw(x0)
        coords = None
        if self.patch:  # mirrored before cropping, so that each crop's coordinates stay where its pixels are
            x0 = mirror_randomly(x0, self.noise) if self.flip else x0
            x0, coords = random_patches(x0, self.noise, self.patch_full, self.latent)
        eps = torch.randn((n, *x0.shape[1:]), generator=self.noise).to(device)
        if self.flip and not self.patch:
            x0 = mirror_randomly(x0, self.noise)
        if self.immiscible:  # every rank computes the same assignment of the same global batch
            eps = eps[immiscible_order(x0, eps).to(device)]
        labels = None if self.train_labels is None else self.train_labels[index].to(device)
        reference, reference_labels = objective.references(x0, labels, self.noise, batch_in_pool=not self.flip)
        if labels is not None:
            dropped = (torch.rand(n, generator=self.noise) < self.label_dropout).to(device)
            labels = labels.masked_fill(dropped, self.classes)
        return Batch(x0, self.process.clamp(t).to(device, torch.float32), importance.to(device, torch.float32), eps,
                     reference, labels, reference_labels, coords)

    def info(self) -> dict[str, Any]:
        """Counters and data facts (``state.json`` beside each checkpoint)."""
        return {"step": self.step, "images_seen": self.images_seen, "nonfinite_skipped": self.nonfinite_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "sample_shape": list(self.sample_shape),
                "data_kind": self.data_kind, "num_classes": self.classes,
                **({} if self.denoiser.class_counts is None else {"class_counts": self.denoiser.class_counts}),
                **({} if self.precision is None else {"precision": self.precision}),
                **({} if self.autoencoder is None else {"latent_factors": [self.autoencoder.scale,
                                                                           self.autoencoder.shift],
                                                        "autoencoder_digest": self.autoencoder.digest})}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: weights (``model``, ``ema``), ``trainer`` state and ``info``."""
        cuda = self.device.type == "cuda"
        trainer = {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                   "noise_rng": self.noise.get_state(), "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if cuda else [], "stream_position": self.stream.position,
                   "log": dict(self.log), "ledger": self.ledger.state_dict()}
        state = {"model": self.denoiser.state_dict(), "ema": self.ema.model.state_dict(), "trainer": trainer,
                 "info": self.info()}
        if self.phema is not None:
            state["phema"] = self.phema.state_dict(self.denoiser)
        return state

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Continue from ``state`` (a checkpoint's, read from ``source``)."""
        load_into(self.denoiser, state["model"], source)
        load_into(self.ema.model, state["ema"], source)
        if self.phema is not None and "phema" in state:
            self.phema.load_state_dict(state["phema"], self.denoiser)
        elif self.phema is not None:  # a run that tracked none before starts its averages here
            self.phema.reset(self.denoiser)
        trainer, info = state["trainer"], state["info"]
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.sampler.load_state_dict(trainer["sampler"])
        self.noise.set_state(trainer["noise_rng"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        self.stream.position = trainer["stream_position"]
        self.log = trainer["log"]
        if "ledger" in trainer:  # checkpoints from before the ledger start it empty
            self.ledger.load_state_dict(trainer["ledger"])
        self.step, self.images_seen = info["step"], info["images_seen"]
        self.nonfinite_total, self.nonfinite_in_a_row = info["nonfinite_skipped"], info["nonfinite_in_a_row"]
        self.precision = info.get("precision")

    def save(self, folder: Path, keep: int) -> Path:
        """Write the checkpoint of the current step under ``folder``, keeping the newest ``keep``."""
        return save_checkpoint(folder, self.step, self.state_dict(), keep)

    def restore(self, checkpoint: Path) -> None:
        """Continue from the checkpoint folder ``checkpoint`` (of a run on the same autoencoder, if latent)."""
        state = load_checkpoint(checkpoint)
        if self.autoencoder is not None:
            check_same_autoencoder(self.autoencoder, state["info"], checkpoint.parent.parent)
        self.load_state_dict(state, checkpoint)

