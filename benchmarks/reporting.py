"""How the benchmarks report: where the numbers came from (the machine, the torch version, the threads and the
commit), how a table cell shows them (mean ± std over seeds) and where they go (results.json, table.md and a plot)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from frugaldiff.errors import FrugalError
from frugaldiff.trainer import Interrupted


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


Cell = TypeVar("Cell")


def add_shard_option(parser: argparse.ArgumentParser) -> None:
    """``--shard I/N``: this process trains every N-th run of the grid, from the I-th (one process per core)."""
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="train only every N-th run, from the I-th (e.g. 0/2 and 1/2 in two shells, each pinned "
                             "to its own core with taskset), then run once more without --shard for the report")


def shard_of(cells: list[Cell], shard: str) -> list[tuple[int, Cell]]:
    """(index, cell) of the ``cells`` that ``shard`` ("I/N") trains: every N-th, from the I-th."""
    try:
        index, count = (int(v) for v in shard.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be I/N (e.g. 0/2), got {shard!r}") from None
    if not 0 <= index < count:
        raise SystemExit(f"--shard {shard}: I must be in 0..N-1")
    return [(i, cell) for i, cell in enumerate(cells) if i % count == index]


def run_benchmark(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main`` as the CLI runs a command: a FrugalError (e.g. --report-only over runs of another
    config) ends in one line, and so does SIGINT/SIGTERM during a training run, which keeps its checkpoint: the same
    command continues from it."""
    try:
        main()
    except FrugalError as e:
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:
        print(f"{e}; run the same command again to continue from it", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
