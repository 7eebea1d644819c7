"""Where and in what precision a run computes: the device, and bf16 autocast where it measures faster."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text, exclusive
from .datasets import cache_dir
from .errors import FrugalError

#: bf16 is chosen by ``auto`` only when it is at least this much faster than fp32 (fp32 is the more accurate)
BF16_MARGIN = 0.05
#: the autocast dtype of each precision a run can compute in (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


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
    """Whether bf16 autocast runs on ``device`` at all."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def bf16_fast(device: torch.device) -> bool:
    """The rule ``auto`` precision follows where there is no model to measure: bf16 on a CUDA device with bf16 or
    on a CPU with native bf16."""
    return bf16_supported(device) and (device.type != "cpu" or cpu_has_native_bf16())


def autocast_dtype(precision: str, device: torch.device, probe: Probe | None = None) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` (None = fp32); ``auto`` with a ``probe`` measures which is faster
    (:func:`measured_dtype`), without one it follows :func:`bf16_fast`."""
    if precision == "auto":
        if not bf16_supported(device):
            return None
        if probe is not None:
            return measured_dtype(device, probe)
        return torch.bfloat16 if bf16_fast(device) else None
    if precision == "fp32":
        return None
    if not bf16_supported(device):
        raise FrugalError(f"train.precision=bf16 is not supported on {device.type} here; use auto or fp32")
    return torch.bfloat16


@dataclass(frozen=True)
class Probe:
    """The work whose speed decides ``auto`` precision: ``model`` (called as ``model(x, t)``) on batches of
    ``batch`` inputs of ``shape``, forward and backward (training) or forward only (generation)."""

    model: nn.Module
    shape: tuple[int, ...]
    batch: int
    backward: bool

    def key(self, device: torch.device) -> str:
        """What the measurement depends on: the machine (processor or card, torch, threads) and the work."""
        work = f"{self.model!r}|{self.shape}|{self.batch}|{'train' if self.backward else 'generate'}"
        return (f"{machine_name(device)}|torch {torch.__version__}|{torch.get_num_threads()} threads|"
                f"{hashlib.sha256(work.encode()).hexdigest()[:16]}")

    def seconds(self, device: torch.device, dtype: torch.dtype | None, repeats: int = 3) -> float:
        """The fastest of ``repeats`` runs of the work under autocast to ``dtype`` (after one warm-up run), on a
        copy of the model and with the random state restored: the run it is measured for is left as it was."""
        model = copy.deepcopy(self.model).to(device).train(self.backward)
        x = torch.randn(self.batch, *self.shape, generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.linspace(0.05, 0.95, self.batch, device=device)
        runtime, best = Runtime(device, dtype), float("inf")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i in range(repeats + 1):
                start = time.perf_counter()
                with torch.inference_mode(not self.backward), runtime.autocast():
                    out = model(x, t)
                if self.backward:
                    out.float().square().mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:
                    best = min(best, time.perf_counter() - start)
        return best


def machine_name(device: torch.device) -> str:
    """The processor's or the card's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return device.type
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), device.type)


def measured_dtype(device: torch.device, probe: Probe) -> torch.dtype | None:
    """bf16 when the probe's work runs at least :data:`BF16_MARGIN` faster under bf16 autocast than in fp32 on
    this machine, else None (fp32). Measured once per machine and work and kept in the cache folder
    (``precision.json``), so that every run of a model on a machine computes in the same precision."""
    path, key = cache_dir() / "precision.json", probe.key(device)
    with exclusive(path.with_suffix(".lock")):  # processes starting together measure one after another
        choice = _kept_measurements(path).get(key, {}).get("choice")
        if choice not in PRECISIONS:
            fp32, bf16 = probe.seconds(device, None), probe.seconds(device, torch.bfloat16)
            choice = "bf16" if bf16 < (1 - BF16_MARGIN) * fp32 else "fp32"
            kept = {**_kept_measurements(path), key: {"fp32_s": fp32, "bf16_s": bf16, "choice": choice}}
            try:
                atomic_write_text(path, json.dumps(kept, indent=1))
            except OSError as e:
                warnings.warn(f"could not keep the precision measurement in {path} ({e}); set FRUGALDIFF_CACHE",
                              stacklevel=3)
    return PRECISIONS[choice]


def _kept_measurements(path: Path) -> dict[str, dict[str, Any]]:
    """The measurements kept in ``path`` (none when it is missing or not a JSON object of objects)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in kept.items() if isinstance(v, dict)} if isinstance(kept, dict) else {}


def run_dtype(precision: str, device: torch.device, recorded: str | None, probe: Probe) -> torch.dtype | None:
    """The autocast dtype of a run's training: an ``auto`` run keeps the precision its checkpoint ``recorded`` (a
    resumed run computes as it started, unless this device has no bf16), a new one measures on ``probe``; fp32
    and bf16 are what they say."""
    if precision == "auto" and recorded in PRECISIONS and (recorded == "fp32" or bf16_supported(device)):
        return PRECISIONS[recorded]
    return autocast_dtype(precision, device, probe)


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32`` or ``bf16``: what a run computes in, as its checkpoints record it."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)


@dataclass(frozen=True)
class Runtime:
    """A device and the autocast dtype of the network's forward pass there (None: fp32)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @classmethod
    def create(cls, device: str, precision: str, probe: Probe | None = None) -> Runtime:
        """From ``train.device`` and ``train.precision`` values (``auto`` resolved on this machine: measured on
        ``probe``'s work when given)."""
        where = select_device(device)
        return cls(where, autocast_dtype(precision, where, probe))

    def autocast(self) -> AbstractContextManager[object]:
        """Autocast to the runtime's dtype, or a no-op for fp32."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


CPU = Runtime(torch.device("cpu"))


def inductor_missing(device: torch.device) -> str | None:
    """Why torch.compile's inductor cannot build kernels for ``device`` here (None: it can)."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed (pip install triton)"
    if device.type != "cpu":
        return f"inductor does not compile for {device.type}"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler, or fails to import
        return "no C++ compiler was found (inductor needs g++, or one named by $CXX)"
    return None


def compiled(module: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(module)`` (inductor), or ``module`` itself after one line of notice where inductor cannot
    build kernels on this machine (train.compile)."""
    missing = inductor_missing(device)
    if missing is not None:
        warnings.warn(f"train.compile: {missing}; training without torch.compile", stacklevel=2)
        return module
    return torch.compile(module)
