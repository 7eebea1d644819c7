"""How the benchmarks report: where the numbers came from (the machine, the torch version, the threads and the
commit), how a table cell shows them (mean ± std over seeds) and where they go (results.json, table.md and a plot)."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from collections.abc import Callable
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


def write_results(out: Path, result: dict[str, Any], table: str, plot: Callable[[Path], None], png: str) -> None:
    """OUT/results.json, OUT/table.md and OUT/<png> of one result, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(table)
    plot(out / png)
    print(table, end="")
    print(f"wrote {out}/results.json, table.md, {png} ({result['machine']}, {result['commit']})")


def mean_std(values: list[float], digits: int) -> str:
    """A table cell: the mean ± std of ``values`` (the value alone for one, — for none)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
