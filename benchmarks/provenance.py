"""Where a benchmark's numbers came from: the machine, the torch version, the threads and the commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def machine() -> str:
    """The GPU (when torch sees one) or the processor model, torch version and threads."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        try:
            device = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
        except (OSError, StopIteration):
            device = platform.processor() or platform.machine()
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def provenance() -> dict[str, str]:
    """The machine and the repository's commit, recorded beside every result."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"machine": machine(), "commit": commit}


def joined_provenance(results: list[dict[str, Any]]) -> dict[str, str]:
    """The machines and commits of merged results, each named once."""
    return {k: " + ".join(dict.fromkeys(r[k] for r in results)) for k in ("machine", "commit")}
