"""The trainer: AdamW, EMA, warm-up, clipping, accumulation, bf16 autocast, atomic checkpoints, exact resume."""

from __future__ import annotations

import copy
import csv
import io
import math
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    atomic_write_text,
    checkpoint_path,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from .config import Config
from .datasets import Data, load_dataset
from .diagnostics import GRID_SEED, HeldoutGrid, LossLedger, bin_columns, csv_cells, heldout_grid, heldout_loss_by_bin
from .distributed import SINGLE_PROCESS, World, init_distributed
from .errors import FrugalError
from .images import to_uint8
from .networks import NETWORKS
from .noise import bcast, empirical_posterior_mean
from .plots import plot_eval
from .prediction import Denoiser, PredictionType
from .timestep_samplers import TimestepSampler
from .weighting import Weighting

METRIC_FIELDS = ["step", "images_seen", "loss", "lr", "grad_norm", "images_per_s", "nonfinite_skipped"]
MAX_NONFINITE_IN_A_ROW = 10


def empty_log() -> dict[str, float]:
    """Running sums of one logging period of metrics.csv."""
    return {"loss": 0.0, "count": 0, "grad_norm": 0.0, "images": 0, "time": 0.0}


def _crossed(before: int, now: int, every: int, budget: int) -> bool:
    """Whether a step from ``before`` to ``now`` images passed a multiple of ``every`` or reached the budget."""
    return now // every > before // every or now >= budget


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def select_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; an explicit device (``cuda:1`` too) that is missing is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(name.split(":")[0], False):
        raise FrugalError(f"train.device={name} is not available on this machine; use train.device=auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512_BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def bf16_fast(device: torch.device) -> bool:
    """Whether ``auto`` precision should pick bf16: a CUDA device with bf16, or a CPU with native bf16."""
    return bf16_supported(device) and (device.type != "cpu" or cpu_has_native_bf16())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` (None = fp32)."""
    if precision == "fp32" or (precision == "auto" and not bf16_fast(device)):
        return None
    if not bf16_supported(device):
        raise FrugalError(f"train.precision=bf16 is not supported on {device.type} here; use auto or fp32")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast context for ``dtype``, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def build_denoiser(config: Config, sample_shape: tuple[int, ...]) -> Denoiser:
    """Network + prediction type for data of ``sample_shape`` ((C, H, W) images or (D,) vectors)."""
    prediction = config.prediction()
    name = config["model.name"]
    if name == "auto":
        name = "unet" if len(sample_shape) == 3 else "mlp"
    if name == "unet":
        if len(sample_shape) != 3:
            raise FrugalError(f"model.name=unet needs image data, got samples of shape {sample_shape}; use mlp")
        channels, size, _ = sample_shape
        net = NETWORKS.create(
            "unet", channels, prediction.out_channels(channels), size, channels=config["model.channels"],
            channel_mult=config["model.channel_mult"], num_res_blocks=config["model.num_res_blocks"],
            attention_resolutions=config["model.attention_resolutions"], dropout=config["model.dropout"],
        )
    else:
        features = math.prod(sample_shape)
        if len(sample_shape) != 1:
            raise FrugalError(f"model.name={name} needs vector data, got samples of shape {sample_shape}; use unet")
        net = NETWORKS.create(name, features, prediction.out_channels(features), hidden=config["model.hidden"],
                              depth=config["model.depth"], dropout=config["model.dropout"])
    return Denoiser(net, prediction)


def load_data(config: Config) -> Data:
    """The configured dataset."""
    return load_dataset(config["data.name"], image_size=config["data.image_size"], color=config["data.color"],
                        heldout_fraction=config["data.heldout_fraction"], num_samples=config["data.num_samples"],
                        seed=config["data.seed"], gmm_dim=config["data.gmm_dim"],
                        gmm_components=config["data.gmm_components"], gmm_covariance=config["data.gmm_covariance"])


class BatchStream:
    """Batches in shuffled epochs; the order is a function of (seed, position) alone, so resuming is exact.

    Under torchrun every rank walks the same global order and keeps its share of each global batch: a
    distributed sampler that needs no state of its own, whatever the number of processes.
    """

    def __init__(self, data: Tensor, seed: int) -> None:
        self.data, self.seed, self.position = data, seed, 0
        self._order: tuple[int, Tensor] | None = None  # (epoch, permutation) of the epoch in use

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data), generator=generator))
        return self._order[1]

    def next(self, n: int, world: World = SINGLE_PROCESS) -> Tensor:
        """This rank's share of the next ``n`` × ``world.size`` samples."""
        n *= world.size
        idx: list[Tensor] = []
        while n:
            epoch, offset = divmod(self.position, len(self.data))
            take = min(n, len(self.data) - offset)
            idx.append(self._epoch_order(epoch)[offset:offset + take])
            self.position += take
            n -= take
        return self.data[world.share(torch.cat(idx))]


class EMA:
    """Exponential moving average of a model's parameters, with warm-up min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params, params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameters")
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # one multi-tensor kernel instead of one per tensor
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def combine_loss(prediction: PredictionType, out: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor,
                 importance: Tensor, weighting: Weighting) -> tuple[Tensor, Tensor]:
    """The one place where sampler weight × weighting × prediction type meet.

    ``out`` is the network's raw output for ``x_t`` = α·``x0`` + σ·``eps``. Returns (objective, optimised):
    the per-sample loss of the chosen objective (the prediction type's loss under the weighting's x0 weight,
    fed back to the timestep sampler) and the loss that is minimised, i.e. the objective (adjusted by a
    learned weighting) times the importance weight.
    """
    objective = prediction.objective(out, x_t, x0, eps, t, weighting.x0_weight(prediction.process, t))
    return objective, weighting.adjust(objective, t) * importance


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


def read_run_config(run_dir: Path, overrides: Iterable[str] = ()) -> Config:
    """The config.toml of a run folder (with ``KEY=VALUE`` overrides), or a one-line error if it is none."""
    path = RunFiles(Path(run_dir)).config
    if not path.is_file():
        raise FrugalError(f"{run_dir} is not a run folder (no config.toml); pass the folder `frugaldiff train` wrote")
    return Config.load(path, overrides, saved=True)


def new_run_dir(config: Config, parent: Path = Path("runs")) -> Path:
    """``runs/<timestamp>-<name>`` (the name defaults to dataset-prediction)."""
    name = config["train.name"] or f"{config['data.name']}-{config['diffusion.prediction']}"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "run"
    return parent / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{safe}"


@contextmanager
def _signals_to_flag(flag: list[int]) -> Iterator[None]:
    """While active, SIGINT/SIGTERM only record themselves in ``flag``."""
    def handler(signum: int, frame: object) -> None:
        flag.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer:
    """Trains one run folder; ``resume`` continues from its newest checkpoint.

    Under torchrun (RANK/WORLD_SIZE set) each process trains its share of every global batch with
    DistributedDataParallel; every rank draws the same global data order, times and noise and keeps its
    share, so sampler state and checkpoints do not depend on the number of processes. Only rank 0 writes.
    """

    def __init__(self, config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        c = config
        self.world, device_name = init_distributed(c["train.device"])
        self.config, self.files, self.progress = config, RunFiles(Path(run_dir)), progress and self.world.is_main
        if not resume and self.files.root.exists() and any(self.files.root.iterdir()):
            raise FrugalError(f"run folder {run_dir} is not empty; resume it with --resume {run_dir} or choose "
                              "another --out")
        parts = c["train.grad_accum"] * self.world.size
        if c["train.batch_size"] % parts:
            raise FrugalError(f"train.batch_size ({c['train.batch_size']}) must be divisible by train.grad_accum × "
                              f"processes ({c['train.grad_accum']} × {self.world.size}); change one of them")
        self.world.barrier()  # every rank has checked the folder before rank 0 writes to it
        self.device = select_device(device_name)
        self.amp_dtype = autocast_dtype(c["train.precision"], self.device)
        torch.manual_seed(c["train.seed"])
        self.data = load_data(c)
        self.denoiser = build_denoiser(c, self.data.sample_shape).to(self.device)
        self.process, self.prediction = self.denoiser.process, self.denoiser.prediction
        self.ema = EMA(self.denoiser, c["train.ema_decay"])
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=c["train.lr"],
                                           weight_decay=c["train.weight_decay"])
        self.sampler: TimestepSampler = c.timestep_sampler(self.world.rank, self.world.size)
        self.weighting: Weighting = c.weighting()
        if isinstance(self.weighting, nn.Module):  # learned weighting: its own parameter group
            self.weighting.to(self.device)
            self.optimizer.add_param_group({"params": list(self.weighting.parameters()), "weight_decay": 0.0})
        self.stream = BatchStream(self.data.train, c["train.seed"])
        self.noise = torch.Generator().manual_seed(c["train.seed"] + 1)
        self.step = self.images_seen = self.nonfinite_total = self.nonfinite_in_a_row = 0
        self.log = empty_log()
        self.ledger = LossLedger(c["train.ledger_bins"])  # this logging period's losses per t bin, all ranks
        self._grid: HeldoutGrid | None = None
        self._reference_pool: Tensor | None = None  # the train split on the device, for diffusion.reference_images
        self._tensorboard: Any = None
        if resume:
            self._restore(latest_checkpoint(self.files.root))
        if self.world.is_main:
            self.files.root.mkdir(parents=True, exist_ok=True)
            config.save(self.files.config)
        if self.world.rank:  # other ranks: their own dropout stream, derived from the seed, rank and step
            torch.manual_seed(c["train.seed"] + 1_000_003 * self.world.rank + self.step)
        self.model: nn.Module = self.denoiser
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.denoiser, device_ids=ids)

    # ---- state -------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise_rng": self.noise.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "stream_position": self.stream.position,
            "log": dict(self.log),
            "ledger": self.ledger.state_dict(),
        }

    def info(self) -> dict[str, Any]:
        """Counters and data facts stored beside each checkpoint (``state.json``)."""
        return {
            "step": self.step, "images_seen": self.images_seen, "nonfinite_skipped": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row, "sample_shape": list(self.data.sample_shape),
            "data_kind": self.data.kind,
        }

    def save(self) -> Path:
        """Write a checkpoint of the current step (rank 0 writes; every rank waits for it)."""
        if self.world.is_main:
            save_checkpoint(self.files.checkpoints, self.step, self._modules(), self._trainer_state(), self.info(),
                            keep=self.config["train.keep_checkpoints"])
        self.world.barrier()
        return checkpoint_path(self.files.checkpoints, self.step)

    def _modules(self) -> dict[str, nn.Module]:
        """Everything with weights: the model, its EMA and a learned weighting."""
        modules = {"model": self.denoiser, "ema": self.ema.model}
        if isinstance(self.weighting, nn.Module):
            modules["weighting"] = self.weighting
        return modules

    def _restore(self, checkpoint: Path) -> None:
        for name, module in self._modules().items():
            load_weights(checkpoint, name, module)
        state, info = load_trainer_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.stream.position = state["stream_position"]
        self.log = state["log"]
        if "ledger" in state:  # checkpoints from before the ledger start it empty
            self.ledger.load_state_dict(state["ledger"])
        self.step, self.images_seen = info["step"], info["images_seen"]
        self.nonfinite_total, self.nonfinite_in_a_row = info["nonfinite_skipped"], info["nonfinite_in_a_row"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric rows written after the checkpoint we resume from (rank 0's file)."""
        if not self.world.is_main or not self.files.metrics.exists():
            return
        with self.files.metrics.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(r["step"]) <= self.step]
        # the file's columns, then any this run adds (e.g. eval_<metric>); cells a row lacks stay empty
        fields = list(dict.fromkeys([*(reader.fieldnames or []), *self._metric_fields()]))
        text = io.StringIO()
        writer = csv.DictWriter(text, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.files.metrics, text.getvalue())

    def _eval_column(self) -> str | None:
        """The metrics.csv column of ``train.eval_every``'s metric, ``eval_<name>`` (None while it is 0)."""
        if not self.config["train.eval_every"]:
            return None
        from .metrics import headline_metric  # metrics imports this module

        name = headline_metric(self.data)
        if name is None:
            raise FrugalError(f"train.eval_every needs a dataset with a quality metric and {self.data.name!r} has "
                              "no class labels; set train.eval_every=0")
        return f"eval_{name}"

    def _metric_fields(self) -> list[str]:
        """The columns of a new metrics.csv: the basics, the evaluation metric, the ledger, the held-out grid."""
        column = self._eval_column()
        heldout = bin_columns("heldout", self.ledger.bins) if self.config["train.heldout_every"] else []
        return [*METRIC_FIELDS, *([column] if column else []), *self.ledger.columns(), *heldout]

    def heldout_losses(self) -> dict[str, str]:
        """The training objective (weighting included, importance weights not) of the current model per t bin
        on a fixed held-out (image, t, noise) grid, as metrics.csv cells: comparable across steps and runs."""
        if self._grid is None:
            c = self.config
            self._grid = heldout_grid(self.process, self.data.heldout, c["train.ledger_bins"],
                                      c["train.heldout_per_bin"], torch.Generator().manual_seed(GRID_SEED))
        self.denoiser.eval()
        try:
            losses = heldout_loss_by_bin(self.denoiser, self._grid, self.weighting)
        finally:
            self.denoiser.train()
        return csv_cells(bin_columns("heldout", self.ledger.bins), losses)

    def evaluate(self, evaluator: Any, n: int | None = None) -> float:
        """The headline metric of ``n`` (default ``train.eval_samples``) EMA samples (seed ``sample.seed``),
        scored as ``frugaldiff eval`` scores what ``frugaldiff sample`` writes."""
        from .generate import generate  # generate imports this module

        model = self.ema.model.eval()
        try:
            x = generate(model, self.config, n or self.config["train.eval_samples"], self.data.sample_shape)
        finally:
            model.train()
        return evaluator(to_uint8(x) if self.data.kind == "image" else x.numpy())[evaluator.headline]

    # ---- training ----------------------------------------------------------------------------
    def lr_at(self, images: int) -> float:
        c = self.config
        factor = min(1.0, (images + 1) / c["train.warmup_images"]) if c["train.warmup_images"] else 1.0
        if c["train.lr_schedule"] == "cosine":
            factor *= 0.5 * (1 + math.cos(math.pi * min(1.0, images / c["train.images_seen"])))
        return c["train.lr"] * factor

    @property
    def micro_batch(self) -> int:
        """Samples per rank and micro-step (read from the config, which an analysis may change between steps)."""
        c = self.config
        return c["train.batch_size"] // (c["train.grad_accum"] * self.world.size)

    def draw(self, micro_step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This rank's (x0, t, importance, eps) of micro-step ``micro_step``, on the device."""
        n = self.micro_batch
        x0 = self.stream.next(n, self.world).to(self.device)
        t, importance = self.sampler.sample(n, micro_step)
        eps = self.world.share(torch.randn((n * self.world.size, *x0.shape[1:]), generator=self.noise))
        return (x0, self.process.clamp(t).to(self.device, torch.float32),
                importance.to(self.device, torch.float32), eps.to(self.device))

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The (x0, ε) the loss aims at: the drawn pair, or with ``diffusion.reference_images`` > 0 the stable
        target, x̄0 = E[x0 | x_t] over the batch and that many random training images (all when they are at
        least the train split) and the ε̄ with α·x̄0 + σ·ε̄ = x_t."""
        n = self.config["diffusion.reference_images"]
        if not n:
            return x0, eps
        if self._reference_pool is None:
            self._reference_pool = self.data.train.to(self.device)
        pool = self._reference_pool
        if n < len(pool):  # the batch's own images, then n others (the whole pool holds the batch already)
            pool = torch.cat([x0, pool[torch.randperm(len(pool), generator=self.noise)[:n].to(self.device)]])
        x0_bar = empirical_posterior_mean(self.process, x_t, t, pool)
        # ε̄ = (x_t − α·x̄0)/σ, written so that it is exactly ε where x̄0 = x0 (t near 0, σ tiny)
        ratio = bcast(self.process.alpha(t) / self.process.sigma(t), x0)
        return x0_bar, eps + ratio * (x0 - x0_bar)

    def _micro_batch_loss(self, micro_step: int) -> tuple[Tensor, Tensor, Tensor]:
        x0, t, importance, eps = self.draw(micro_step)
        x_t = self.process.add_noise(x0, eps, t)
        with autocast(self.device, self.amp_dtype):
            out = self.model(x_t, t)
        x0, eps = self.target(x0, eps, x_t, t)
        objective, optimised = combine_loss(self.prediction, out, x_t, x0, eps, t, importance, self.weighting)
        return optimised.mean(), t, objective.detach()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm)."""
        c = self.config
        accum = c["train.grad_accum"]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.images_seen)
        self.sampler.set_progress(self.images_seen / c["train.images_seen"])
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        feedback = []
        for k in range(accum):
            # DDP averages gradients over ranks once per optimizer step, at the last micro-step
            sync = k == accum - 1 or not self.world.distributed
            with nullcontext() if sync else self.model.no_sync():
                loss, t, objective = self._micro_batch_loss(k)
                (loss / accum).backward()
            total += loss.detach() / accum
            feedback.append(self.world.all_gather(torch.stack([t, objective.float()], dim=1)))
        if self.world.distributed and isinstance(self.weighting, nn.Module):  # outside DDP: average by hand
            for p in self.weighting.parameters():
                if p.grad is not None:
                    p.grad.copy_(self.world.mean(p.grad))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), c["train.grad_clip"] or math.inf)
        # one device-to-host copy per step (each is a sync that drains a GPU's queue): loss, norm, (t, objective)s
        host = torch.cat([torch.stack([self.world.mean(total), grad_norm.float()]),
                          *(f.flatten() for f in feedback)]).cpu().double()
        total, grad_norm = float(host[0]), float(host[1])
        self.images_seen += c["train.batch_size"]
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise FrugalError(
                    f"training diverged: {MAX_NONFINITE_IN_A_ROW} non-finite losses in a row at step {self.step}; "
                    "lower train.lr or set train.precision=fp32 (the last checkpoint is intact)")
            return total, grad_norm
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.denoiser, self.step)
        for gathered in host[2:].view(accum, -1, 2):  # every rank's (t, objective), the same on every rank
            t, objective = gathered.unbind(1)
            self.sampler.update(t, objective)
            self.ledger.update(t, objective)
        return total, grad_norm

    def _log(self, loss: float, grad_norm: float, seconds: float, force: bool = False,
             extra: dict[str, str] | None = None) -> None:
        log = self.log
        if math.isfinite(loss):
            log["loss"] += loss
            log["grad_norm"] += grad_norm
            log["count"] += 1
        log["images"] += self.config["train.batch_size"]
        log["time"] += seconds
        if not force and self.step % self.config["train.log_every"]:
            return
        if not log["count"]:
            return
        if self.world.is_main:
            self._write_metrics_row(extra or {})
        self.log = empty_log()
        self.ledger.reset()

    def _write_metrics_row(self, extra: dict[str, str]) -> None:
        """Append the row of the current logging period (with ``extra`` cells) to metrics.csv and TensorBoard."""
        log = self.log
        values = [self.step, self.images_seen, f"{log['loss'] / log['count']:.6g}",
                  f"{self.lr_at(self.images_seen):.6g}", f"{log['grad_norm'] / log['count']:.6g}",
                  f"{log['images'] / max(log['time'], 1e-9):.1f}", self.nonfinite_total]
        row = {**dict(zip(METRIC_FIELDS, values, strict=True)), **self.ledger.row(), **extra}
        self._write_tensorboard(row)
        new = not self.files.metrics.exists()
        if new:
            fields = self._metric_fields()
        else:
            with self.files.metrics.open(newline="") as f:
                fields = next(csv.reader(f))
        with self.files.metrics.open("a", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        """Numbers of a metrics.csv row as TensorBoard scalars (x: images seen), when tensorboard is installed."""
        if not self.config["train.tensorboard"]:
            return
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional extra is not installed
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(str(self.files.root / "tensorboard"))
        if self._tensorboard:
            for key, value in row.items():
                if key not in ("step", "images_seen") and value != "":
                    group = key.split("_t")[0] if "_t" in key else "train"
                    self._tensorboard.add_scalar(f"{group}/{key}", float(value), self.images_seen)
            self._tensorboard.flush()

    def fit(self) -> Path:
        """Train until ``train.images_seen``; checkpoint periodically, at the end and on SIGINT/SIGTERM."""
        c = self.config
        budget, every = c["train.images_seen"], c["train.checkpoint_every"]
        eval_every, heldout_every = c["train.eval_every"], c["train.heldout_every"]
        column = self._eval_column() if self.world.is_main else None  # rank 0 evaluates
        if column:
            from .metrics import Evaluator  # metrics imports this module

            evaluator = Evaluator(c, data=self.data)
        shown: dict[str, str] = {}  # the latest evaluation, for the progress bar
        stop: list[int] = []
        bar = tqdm(total=budget, initial=min(self.images_seen, budget), unit="img", unit_scale=True,
                   disable=not self.progress, dynamic_ncols=True, mininterval=1.0)
        with _signals_to_flag(stop), bar:
            while self.images_seen < budget:
                start = time.perf_counter()
                before = self.images_seen
                loss, grad_norm = self.train_step()
                seconds = time.perf_counter() - start
                # rows with an evaluation end a logging period on every rank; rank 0 alone computes them
                due_eval = bool(eval_every) and _crossed(before, self.images_seen, eval_every, budget)
                due_heldout = bool(heldout_every) and _crossed(before, self.images_seen, heldout_every, budget)
                extra: dict[str, str] = {}
                if due_eval and column:
                    evaluation = self.evaluate(evaluator)
                    extra[column], shown = f"{evaluation:.6g}", {column: f"{evaluation:.4g}"}
                if due_heldout and self.world.is_main:
                    extra.update(self.heldout_losses())
                self._log(loss, grad_norm, seconds, force=self.images_seen >= budget or due_eval or due_heldout,
                          extra=extra)
                bar.update(self.images_seen - before)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{c['train.batch_size'] / seconds:.0f}", **shown,
                                refresh=False)
                if every and self.images_seen // every > before // every and self.images_seen < budget:
                    self.save()
                if self.world.any(bool(stop), self.device):  # a signal stops every rank at the same step
                    raise Interrupted(stop[0] if stop else signal.SIGTERM, self.save())
        self.save()
        if column:
            plot_eval(self.files.metrics, column, self.files.eval_plot)
        if self._tensorboard:
            self._tensorboard.close()
        return self.files.root
