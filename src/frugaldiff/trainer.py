"""The trainer: one optimizer step (:func:`train_step`) and the loop around it (:class:`Trainer`).

A step draws the global batch (data, times, noise: the same on every rank), hands each rank and micro-step its
share, accumulates the gradients, clips them and updates AdamW, the EMA, the timestep sampler and the loss
ledger. The loop does the periodic work (a metrics row, held-out losses, an evaluation, a checkpoint) when the
images seen cross its interval, as EDM2's loop does, and checkpoints on SIGINT/SIGTERM.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import checkpoint_info, checkpoint_path, intact_checkpoints
from .components import (
    Components,
    SampleSettings,
    TrainSettings,
    build,
    build_data,
    model_data,
    require_same_run,
    resolved_recipe,
    true_mixture,
)
from .config import Config
from .diagnostics import HeldoutGrid, bin_columns, csv_cells, fixed_grid, heldout_loss_by_bin
from .distributed import World, init_distributed
from .ema import save_snapshot
from .errors import FrugalError
from .generate import generate, run_guidance
from .guidance import guide_share
from .images import to_uint8
from .latent import check_same_autoencoder, load_autoencoder
from .metrics import Evaluator, eval_column
from .objective import Batch, Objective
from .plots import plot_eval
from .runs import METRIC_FIELDS, MetricsLog, RunFiles, RunLock, start_run
from .runtime import Probe, Runtime, compiled, precision_name, run_dtype
from .state import TrainState, empty_log

MAX_NONFINITE_IN_A_ROW = 10


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def train_step(state: TrainState, objective: Objective, model: nn.Module, settings: TrainSettings,
               world: World) -> tuple[float, float]:
    """One optimizer step of ``settings.batch_size`` samples over all ranks and ``grad_accum`` micro-steps;
    returns (loss, grad norm). A non-finite loss or norm skips the update (10 in a row stop the run)."""
    accum, parts = settings.grad_accum, settings.grad_accum * world.size
    for group in state.optimizer.param_groups:
        group["lr"] = settings.lr_at(state.images_seen)
    state.sampler.set_progress(state.images_seen / settings.images_seen)
    state.optimizer.zero_grad(set_to_none=True)
    batch = state.draw(settings.batch_size, objective)
    probe = state.sampler.probe(batch)  # a timestep sampler that learns from the update's effect (kim)
    before = None if probe is None else probe_objective(objective, state.denoiser, probe, world)
    total = torch.zeros((), device=state.device)
    feedback = []
    for k in range(accum):
        share = batch.part(k * world.size + world.rank, parts)  # the global batch is micro-step-major
        sync = k == accum - 1 or not world.distributed  # DDP averages gradients at the last micro-step
        with nullcontext() if sync else model.no_sync():
            losses, optimised = objective(model, share)
            loss = optimised.mean()
            (loss / accum).backward()
        total += loss.detach() / accum
        feedback.append(world.all_gather(torch.stack([share.t, losses.detach().float()], dim=1)))
    grad_norm = torch.nn.utils.clip_grad_norm_(state.denoiser.prediction_parameters(), settings.grad_clip or math.inf)
    # one device-to-host copy per step (each is a sync that drains a GPU's queue): loss, norm, (t, loss)s
    host = torch.cat([torch.stack([world.mean(total), grad_norm.float()]), *(f.flatten() for f in feedback)])
    result = _finish_step(state, host.cpu().double(), settings.batch_size)
    if probe is not None:
        state.sampler.learn(before, probe_objective(objective, state.denoiser, probe, world))
    return result


@torch.no_grad()
def probe_objective(objective: Objective, denoiser: nn.Module, probe: Batch, world: World) -> Tensor:
    """The objective per row of ``probe`` for the current weights, in eval mode (no dropout); averaged over ranks
    so that every rank's timestep sampler learns the same thing."""
    denoiser.eval()
    try:
        return world.mean(objective(denoiser, probe)[0].float())
    finally:
        denoiser.train()


def _finish_step(state: TrainState, host: Tensor, images: int) -> tuple[float, float]:
    """Count the step's images; then skip it (non-finite) or update AdamW, the EMA, the sampler and the ledger
    from the gathered (t, loss) pairs of every rank in ``host[2:]``."""
    loss, grad_norm = float(host[0]), float(host[1])
    state.images_seen += images
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        state.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_total += 1
        state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FrugalError(
                f"training diverged: {MAX_NONFINITE_IN_A_ROW} non-finite losses in a row at step {state.step}; "
                "lower train.lr or set train.precision=fp32 (the last checkpoint is intact)")
        return loss, grad_norm
    state.nonfinite_in_a_row = 0
    state.optimizer.step()
    state.step += 1
    state.ema.update(state.denoiser, state.step)
    if state.phema is not None:
        state.phema.update(state.denoiser, state.images_seen, images)
    t, losses = host[2:].view(-1, 2).unbind(1)
    state.sampler.update(t, losses)
    state.ledger.update(t, losses)
    return loss, grad_norm


def crossed(before: int, now: int, every: int, budget: int) -> bool:
    """Whether a step from ``before`` to ``now`` images passed a multiple of ``every`` (> 0) or reached the budget."""
    return bool(every) and (now // every > before // every or now >= budget)


@contextmanager
def signals_to_flag(flag: list[int]) -> Iterator[None]:
    """While active, SIGINT/SIGTERM only record themselves in ``flag``."""
    def handler(signum: int, frame: object) -> None:
        flag.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def training_dtype(state: TrainState, parts: Components, precision: str, device: torch.device,
                   micro_batch: int) -> torch.dtype | None:
    """The autocast dtype a run trains in (:func:`~frugaldiff.runtime.run_dtype`): ``auto`` keeps what the restored
    checkpoint recorded, or measures the model's training step at ``micro_batch`` on this machine."""
    probe = Probe(parts.denoiser, state.sample_shape, micro_batch, backward=True)
    return run_dtype(precision, device, state.precision, probe)


class Trainer:
    """Trains one run folder; ``resume`` continues from its newest checkpoint; ``wait``: when another process
    holds the folder, wait for it instead of refusing; ``same_config``: a run already in the folder must have been
    started with this config (its "auto" recipe resolved: :func:`~frugaldiff.components.resolved_recipe`),
    else an error before anything is written.

    Under torchrun (RANK/WORLD_SIZE set) each process trains its share of every global batch with
    DistributedDataParallel; every rank draws the same global data order, times and noise, so sampler state and
    checkpoints do not depend on the number of processes. Only rank 0 writes.
    """

    def __init__(self, config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
                 wait: bool = False, same_config: bool = False) -> None:
        self.world, device_name = init_distributed(config["train.device"])
        self.config = config = resolved_recipe(config)  # saved resolved: kept on resume
        self.settings = TrainSettings.from_config(config)
        self.files, self.progress = RunFiles(Path(run_dir)), progress and self.world.is_main
        s = self.settings
        if s.batch_size % (s.grad_accum * self.world.size):
            raise FrugalError(f"train.batch_size ({s.batch_size}) must be divisible by train.grad_accum × "
                              f"processes ({s.grad_accum} × {self.world.size}); change one of them")
        if same_config:  # before any data is loaded or encoded
            require_same_run(config, self.files.root)
        # the device now; the precision once the model is built and its checkpoint read (training_dtype)
        self.runtime = Runtime.create(device_name, "fp32" if s.precision == "auto" else s.precision)
        torch.manual_seed(s.seed)
        if resume and config["data.autoencoder"]:  # before encoding anything with an autoencoder the run never saw
            kept = intact_checkpoints(self.files.root)
            if kept:
                check_same_autoencoder(load_autoencoder(config["data.autoencoder"]), checkpoint_info(kept[-1]),
                                       self.files.root)
        self.images = build_data(config)  # what samples are compared with
        self.data = model_data(config, self.images, self.progress)  # what the model trains on: those, or latents
        self.parts = build(config, self.data, self.runtime)
        self.state = TrainState(self.parts, self.data, s)
        self.eval_column = eval_column(self.images) if s.eval_every else None
        # the folder is touched only now that the config has built: bad input leaves nothing behind
        self.lock = RunLock(self.files.root, wait) if self.world.is_main else None  # released at the end of fit
        point = self.world.broadcast(start_run(self.files.root, resume) if self.world.is_main else None)
        if point is not None:
            self.state.restore(point)
        dtype = self.world.broadcast(training_dtype(self.state, self.parts, s.precision, self.runtime.device,
                                                    s.batch_size // (s.grad_accum * self.world.size))
                                     if self.world.is_main else None)  # rank 0 decides: every rank computes alike
        self.runtime = self.parts.objective.runtime = Runtime(self.runtime.device, dtype)
        self.state.precision = precision_name(dtype)
        ledger = self.state.ledger
        heldout = bin_columns("heldout", ledger.bins) if self.settings.heldout_every else []
        fields = [*METRIC_FIELDS, *([self.eval_column] if self.eval_column else []), *ledger.columns(), *heldout]
        self.metrics = MetricsLog(self.files, fields, self.settings.tensorboard)
        if self.world.is_main:
            config.save(self.files.config)
            if resume:
                self.metrics.truncate(self.state.step)
        if self.world.rank:  # other ranks: their own dropout stream, derived from the seed, rank and step
            torch.manual_seed(self.settings.seed + 1_000_003 * self.world.rank + self.state.step)
        # what train_step calls: the denoiser, compiled (train.compile) and wrapped for DDP; parameters are shared
        self.model: nn.Module = compiled(self.parts.denoiser, self.runtime.device) if s.compile else self.parts.denoiser
        if self.world.distributed:
            ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self._grid: HeldoutGrid | None = None

    def heldout_losses(self) -> dict[str, str]:
        """The training objective of the current model per t bin on the fixed held-out grid, as metrics.csv cells:
        comparable across steps and runs."""
        if self._grid is None:
            self._grid = fixed_grid(self.parts.process, self.data.heldout, self.settings.ledger_bins,
                                    self.settings.heldout_per_bin, self.data.heldout_labels)
        denoiser = self.parts.denoiser.eval()
        try:
            losses = heldout_loss_by_bin(denoiser, self._grid, self.parts.weighting)
        finally:
            denoiser.train()
        return csv_cells(bin_columns("heldout", self.settings.ledger_bins), losses)

    def samples(self, n: int, progress: bool = False, labels: Tensor | None = None) -> Tensor:
        """``n`` samples of the EMA model with the run's sampling settings and guidance (seed ``sample.seed``;
        ``labels`` of a conditional run: by default in the train split's class proportions)."""
        model, settings = self.state.ema.model.eval(), SampleSettings.from_config(self.config)
        try:
            guidance = run_guidance(self.files.root, settings, model, model_images=self.state.images_seen)
            return generate(model, settings, n, self.data.sample_shape, self.runtime, progress=progress,
                            labels=labels, guidance=guidance)
        finally:
            model.train()

    def _keep(self, before: int) -> None:
        """Rank 0 keeps a power-function EMA snapshot and the early checkpoint for autoguidance when the images seen
        cross their times."""
        s, state, now = self.settings, self.state, self.state.images_seen
        if not self.world.is_main:
            return
        if state.phema is not None and crossed(before, now, max(1, s.images_seen // s.phema_snapshots), s.images_seen):
            save_snapshot(self.files.phema, state.phema, state.denoiser, now)
        guide_at = guide_share(s.guide_at, bool(state.denoiser.num_classes))
        if guide_at and before < int(guide_at * s.images_seen) <= now:
            state.save(self.files.guide, keep=1)

    def evaluate(self, evaluator: Evaluator, n: int | None = None) -> float:
        """The headline metric of ``n`` (default ``train.eval_samples``) EMA samples, scored as ``frugaldiff eval``
        scores what ``frugaldiff sample`` writes (a conditional run's classes in the train split's proportions)."""
        n = n or self.settings.eval_samples
        x = self.samples(n)
        return evaluator(to_uint8(x) if self.data.kind == "image" else x.numpy())[evaluator.headline]

    def save(self) -> Path:
        """Write a checkpoint of the current step (rank 0 writes; every rank waits for it)."""
        if self.world.is_main:
            self.state.save(self.files.checkpoints, self.settings.keep_checkpoints)
        self.world.barrier()
        return checkpoint_path(self.files.checkpoints, self.state.step)

    def _log(self, loss: float, grad_norm: float, seconds: float, extra: dict[str, str], force: bool) -> None:
        """Add the step to the logging period; every ``log_every`` steps (or when ``force``d) write its row."""
        log, state = self.state.log, self.state
        if math.isfinite(loss):
            log["loss"] += loss
            log["grad_norm"] += grad_norm
            log["count"] += 1
        log["images"] += self.settings.batch_size
        log["time"] += seconds
        if (not force and state.step % self.settings.log_every) or not log["count"]:
            return
        if self.world.is_main:
            values = [state.step, state.images_seen, f"{log['loss'] / log['count']:.6g}",
                      f"{self.settings.lr_at(state.images_seen):.6g}", f"{log['grad_norm'] / log['count']:.6g}",
                      f"{log['images'] / max(log['time'], 1e-9):.1f}", state.nonfinite_total]
            self.metrics.write({**dict(zip(METRIC_FIELDS, values, strict=True)), **state.ledger.row(), **extra})
        state.log = empty_log()
        state.ledger.reset()

    def _periodic(self, before: int, evaluator: Evaluator | None) -> tuple[dict[str, str], bool]:
        """The cells of this step's evaluation and held-out losses when their intervals were crossed (rank 0
        computes them), and whether the row must be written now (every rank agrees)."""
        s, now = self.settings, self.state.images_seen
        due_eval = crossed(before, now, s.eval_every, s.images_seen)
        due_heldout = crossed(before, now, s.heldout_every, s.images_seen)
        extra: dict[str, str] = {}
        if due_eval and evaluator is not None:
            extra[self.eval_column] = f"{self.evaluate(evaluator):.6g}"
        if due_heldout and self.world.is_main:
            extra.update(self.heldout_losses())
        return extra, now >= s.images_seen or due_eval or due_heldout

    @property
    def done(self) -> bool:
        """Whether the budget of images is spent."""
        return self.state.images_seen >= self.settings.images_seen

    def fit(self) -> Path:
        """Train until ``train.images_seen``; checkpoint periodically, at the end and on SIGINT/SIGTERM. The run
        folder's lock is released at the end, however training ends."""
        try:
            self._train()
            if self.state.step == 0 and self.state.nonfinite_total:
                raise FrugalError(f"training diverged: all {self.state.nonfinite_total} steps gave non-finite losses; "
                                  "lower train.lr or set train.precision=fp32")
            self.save()
            if self.eval_column:
                plot_eval(self.files.metrics, self.eval_column, self.files.eval_plot)
            return self.files.root
        finally:
            self.close()

    def close(self) -> None:
        """Close the metrics log and release the run folder's lock (``fit`` does it when it ends; a caller that
        only reuses a finished run does it itself)."""
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _train(self) -> None:
        s, state = self.settings, self.state
        evaluator = None
        if self.eval_column and self.world.is_main:  # rank 0 evaluates
            evaluator = Evaluator(self.images, mixture=true_mixture(self.config))
        shown: dict[str, str] = {}  # the latest evaluation, for the progress bar
        stop: list[int] = []
        bar = tqdm(total=s.images_seen, initial=min(state.images_seen, s.images_seen), unit="img", unit_scale=True,
                   disable=not self.progress, dynamic_ncols=True, mininterval=1.0)
        with signals_to_flag(stop), bar:
            while not self.done:
                start, before = time.perf_counter(), state.images_seen
                loss, grad_norm = train_step(state, self.parts.objective, self.model, s, self.world)
                seconds = time.perf_counter() - start
                extra, force = self._periodic(before, evaluator)
                shown = {k: f"{float(v):.4g}" for k, v in extra.items() if k == self.eval_column} or shown
                self._log(loss, grad_norm, seconds, extra, force)
                self._keep(before)
                bar.update(state.images_seen - before)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{s.batch_size / seconds:.0f}", **shown, refresh=False)
                if crossed(before, state.images_seen, s.checkpoint_every, math.inf) and not self.done:
                    self.save()
                if self.world.any(bool(stop), self.runtime.device):  # a signal stops every rank at the same step
                    raise Interrupted(stop[0] if stop else signal.SIGTERM, self.save())
