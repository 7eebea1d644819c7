"""frugaldiff: diffusion training that works with small batches on one CPU or GPU.

The names below are loaded on first use, so ``import frugaldiff.noise`` (say) imports only what that module
needs.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS = {"Config": "config", "FrugalError": "errors", "register_linear_prediction": "prediction",
            "sample": "generate", "train": "api"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'frugaldiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
