"""The benchmark scripts' seconds-long smoke versions run and write what they promise (CI runs only these)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *args], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_recipes_smoke_writes_table_and_curves(tmp_path):
    out = _run("recipes.py", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["seed"]) for r in results["runs"]] == [("ddpm", 0), ("ddpm", 1), ("frugal", 0),
                                                                   ("frugal", 1)]
    assert all(r["images"] == [8, 16] and len(r["fid"]) == 2 for r in results["runs"])
    table = (tmp_path / "table.md").read_text()
    assert "| ddpm |" in table and "| frugal |" in out
    fid = [r["fid"] for r in results["runs"] if r["recipe"] == "frugal"]  # seeds 0, 1 at 8 and 16 images
    cells = [f"{statistics.mean(f):.2f} ± {statistics.stdev(f):.2f}" for f in zip(*fid, strict=True)]
    assert "| batch 8 | FID at 8 images | FID at 16 images |" in table
    assert f"| frugal | {cells[0]} | {cells[1]} |" in table
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_throughput_smoke_reports_every_measurement(tmp_path):
    _run("throughput.py", "--json", str(tmp_path / "t.json"))
    results = json.loads((tmp_path / "t.json").read_text())
    assert [(r["batch_size"], r["precision"]) for r in results["steps"]] == [(4, "fp32")]
    assert results["steps"][0]["ratio"] > 0 and results["mixed"]["mixed_img_s"] > 0
    assert set(results["sampler_us"]["4"]) >= {"uniform", "stratified", "adaptive", "lognormal"}
    assert list(results["stable_target_us"]) == ["batch 4, 256 images", "batch 4, 4096 images"]
    assert all(v > 0 for v in results["stable_target_us"].values())
