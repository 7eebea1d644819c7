"""Where and in what precision a run computes: the device, and bf16 autocast where it is fast."""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import FrugalError


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
    """Whether ``auto`` precision should pick bf16: a CUDA device with bf16, or a CPU with native bf16."""
    return bf16_supported(device) and (device.type != "cpu" or cpu_has_native_bf16())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` (None = fp32)."""
    if precision == "fp32" or (precision == "auto" and not bf16_fast(device)):
        return None
    if not bf16_supported(device):
        raise FrugalError(f"train.precision=bf16 is not supported on {device.type} here; use auto or fp32")
    return torch.bfloat16


@dataclass(frozen=True)
class Runtime:
    """A device and the autocast dtype of the network's forward pass there (None: fp32)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @classmethod
    def create(cls, device: str, precision: str) -> Runtime:
        """From ``train.device`` and ``train.precision`` values (``auto`` resolved on this machine)."""
        where = select_device(device)
        return cls(where, autocast_dtype(precision, where))

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
