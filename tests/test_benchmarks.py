"""The benchmark scripts' seconds-long smoke versions run and write what they promise (CI runs only these)."""

import importlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from testkit import TINY_UNET

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the benchmarks folder on sys.path only while it is imported)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


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
    step, peak = results["steps"][0], results["matmul_peak_gflop_s"]["fp32"]
    assert step["gflop_s"] == pytest.approx(step["frugaldiff_img_s"] * step["gflop_per_image"])
    assert step["share_of_peak"] == pytest.approx(step["gflop_s"] / peak)
    (gen,) = results["generation"]
    assert (gen["solver"], gen["steps"], gen["samples"]) == ("dpm++2m", 10, 16) and gen["img_s"] > 0
    # ten steps of two network calls (autoguidance) of a forward pass that is a third of a training step's FLOPs
    assert gen["gflop_per_image"] == pytest.approx(20 * step["gflop_per_image"] / 3, rel=0.02)
    assert results["steps"][0]["ratio"] > 0 and results["mixed"]["mixed_img_s"] > 0
    assert results["conditional"]["conditional_img_s"] > 0 and results["conditional"]["batch_size"] == 4
    assert set(results["sampler_us"]["4"]) >= {"uniform", "stratified", "adaptive", "lognormal"}
    assert list(results["stable_target_us"]) == ["batch 4, 256 images", "batch 4, 4096 images"]
    assert all(v > 0 for v in results["stable_target_us"].values())


def test_sampling_and_guidance_smoke_score_every_setting(tmp_path):
    from frugaldiff.cli import main

    args = [a for k, v in {**TINY_UNET, "train.images_seen": 96, "train.guide_at": 0.4, "train.keep_checkpoints": 5,
                           "train.checkpoint_every": 32}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    runs = tmp_path / "runs"
    assert main(["train", *args, "--out", str(runs / "cond-s0"), "--no-progress"]) == 0
    assert main(["train", *args, "--set", "model.num_classes=0", "--out", str(runs / "uncond-s0"),
                 "--no-progress"]) == 0
    _run("sampling.py", str(runs / "cond-s0"), str(runs / "uncond-s0"), "--out", str(tmp_path / "sampling"))
    result = json.loads((tmp_path / "sampling" / "results.json").read_text())
    settings = [("ddim", 2, 2), ("ddim", 3, 3), ("heun", 2, 3), ("heun", 3, 5)]
    assert [(r["solver"], r["steps"], r["nfe"]) for r in result["rows"]] == settings * 2
    heun = [r["fid"] for r in result["rows"] if (r["solver"], r["steps"]) == ("heun", 3)]
    table = (tmp_path / "sampling" / "table.md").read_text()
    assert f"{statistics.mean(heun):.3f} ± {statistics.stdev(heun):.3f} [5] |" in table  # mean ± std over the runs
    _run("sampling.py", "--merge", str(tmp_path / "sampling" / "results.json"), "--out", str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "table.md").read_text() == table
    _run("guidance.py", "--runs", str(runs), "--out", str(tmp_path / "guidance"))
    rows = json.loads((tmp_path / "guidance" / "results.json").read_text())["rows"]
    cond = [r for r in rows if r["run"] == "cond-s0"]
    assert [(r["guide"], r["weight"]) for r in cond[:2]] == [("none", 1.0), ("cfg", 2.0)]
    assert {r["guide"] for r in cond[2:]} == {"step-00000002", "step-00000003", "step-00000004"}  # autoguidance
    assert all(0 <= r["conditional_accuracy"] <= 1 for r in cond)
    guides = [r["guide"] for r in rows if r["run"] == "uncond-s0" and r["weight"] == 2.0]
    assert guides[0] == "step-00000003" and "step-00000002" in guides  # RUN/guide first, then the checkpoints
    assert (tmp_path / "guidance" / "guidance.png").stat().st_size > 5000


def test_the_flop_counter_counts_a_two_layer_network_as_by_hand():
    counted_flops = _benchmark("throughput").counted_flops
    conv, linear = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 6 * 6, 5)
    x = torch.randn(4, 3, 6, 6)
    conv_mac, linear_mac = 4 * 8 * 6 * 6 * 3 * 3 * 3, 4 * 8 * 6 * 6 * 5  # multiply-adds of each forward
    assert counted_flops(lambda: conv(x)) == 2 * conv_mac
    # backward: both layers' weight gradients, and the input gradient of the linear layer only (x needs none)
    assert counted_flops(lambda: linear(conv(x).flatten(1)).sum().backward()) == 2 * (2 * conv_mac + 3 * linear_mac)


def test_the_speedrun_table_has_as_many_cells_in_every_row_with_and_without_final_scores():
    speedrun = _benchmark("speedrun")
    speedrun_table, summarise = speedrun.speedrun_table, speedrun.summarise
    runs = [{"recipe": r, "seed": s, "fid": [9.0 - s, 4.0 + s], "clock": [30.0, 60.0], "train_seconds": 61.0,
             "final_fid": 3.5 + s} for r in ("ddpm", "frugal") for s in (0, 1)]
    for final_samples in (0, 512):
        results = {"dataset": "toy", "recipes": ["ddpm", "frugal"], "batch_size": 64, "images": 100, "eval_every": 50,
                   "eval_samples": 16, "final_samples": final_samples, "final_floor": 0.25 if final_samples else None,
                   "minutes": 0.75, "floor": 0.5, "targets": None, "machine": "m", "commit": "c", "runs": runs}
        results["summary"] = summarise(results)
        rows = [line for line in speedrun_table(results).splitlines() if line.startswith("|")]
        assert len(rows) == 4 and len({row.count("|") for row in rows}) == 1, rows
        assert ("final FID of 512 samples (range; floor 0.250)" in rows[0]) == bool(final_samples)
        assert rows[2].endswith("| 4.000 (3.500–4.500) |" if final_samples else "| 1.0 |")


def test_given_speedrun_targets_beyond_easy_and_hard_get_their_own_columns_and_rank_the_recipes():
    """--targets 9 6 4.5: a third column of minutes to FID 4.5; the recipe that reaches the lowest target first
    ranks first even when another reaches the easier ones sooner."""
    speedrun = _benchmark("speedrun")
    speedrun_table, summarise = speedrun.speedrun_table, speedrun.summarise
    runs = [{"recipe": "fast", "seed": 0, "fid": [5.0, 4.8], "clock": [30.0, 60.0], "train_seconds": 61.0},
            {"recipe": "deep", "seed": 0, "fid": [8.0, 4.0], "clock": [30.0, 60.0], "train_seconds": 61.0}]
    results = {"dataset": "toy", "recipes": ["fast", "deep"], "batch_size": 16, "images": 100, "eval_every": 50,
               "eval_samples": 16, "final_samples": 0, "final_floor": None, "minutes": 1.0, "floor": 0.5,
               "targets": [9.0, 6.0, 4.5], "machine": "m", "commit": "c", "runs": runs}
    results["summary"] = summarise(results)
    assert results["summary"]["targets"] == {"easy": 9.0, "hard": 6.0, "4.5": 4.5}
    rows = [line for line in speedrun_table(results).splitlines() if line.startswith("|")]
    assert rows[0].startswith("| recipe | seeds | min to easy | min to hard | min to 4.5 | FID at 1 min")
    assert len({row.count("|") for row in rows}) == 1
    # deep crosses 6 and 4.5 between its evaluations at 0.5 and 1 minute: 0.5 + 0.5·log(8/6)/log(2) = 0.71 and
    # 0.5 + 0.5·log(8/4.5)/log(2) = 0.91
    assert rows[2].startswith("| deep | 1 | 0.5 | 0.7 | 0.9 |") and rows[3].startswith("| fast | 1 | 0.5 | 0.5 | "
                                                                                        "not reached |")


def test_minutes_to_a_target_is_where_the_log_fid_line_between_two_evaluations_crosses_it():
    minutes_to = _benchmark("speedrun").minutes_to
    run = {"fid": [16.0, 4.0, 1.0, 2.0, 0.5], "clock": [60.0, 120.0, 240.0, 300.0, 360.0]}
    assert minutes_to(run, 8.0) == 1.5  # halfway in log between 16 and 4, halfway between minutes 1 and 2
    assert minutes_to(run, 2.0) == 3.0  # between 4 (2 min) and 1 (4 min); the later 2.0 does not count
    assert minutes_to(run, 4.0) == 2.0 and minutes_to(run, 16.0) == minutes_to(run, 99.0) == 1.0  # on, or at once
    assert minutes_to(run, 0.5) == 6.0 and minutes_to(run, 0.4) == float("inf")
    assert minutes_to({"fid": [3.0, 0.0], "clock": [60.0, 120.0]}, 1.0) == 2.0  # no log of 0: that evaluation's


def test_profile_step_smoke_reports_the_network_share_and_the_top_operators(tmp_path):
    out = _run("profile_step.py", "--json", str(tmp_path / "p.json"))
    (row,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert (row["data"], row["image_size"], row["batch_size"]) == ("digits", 8, 4)
    assert 0 < row["network_share"] == pytest.approx(row["step_img_s"] / row["network_img_s"])
    assert len(row["top_ops"]) == 8 and all(0 < o["self_share"] <= 1 for o in row["top_ops"])
    assert "of the step is the network's forward and backward" in out


def test_speedrun_smoke_reports_minutes_to_each_target_from_the_runs_clock(tmp_path):
    """Two shards train the grid's cells between them (seed-major: ddpm, frugal at seed 0, then at seed 1) and
    write no table; the unsharded call reuses every run and reports."""
    def trained() -> set[str]:
        return {f"{p.parent.name}/{p.name}" for p in tmp_path.glob("*/b8-s*") if (p / "heldout_x0.json").is_file()}

    assert "shard done" in _run("speedrun.py", "--out", str(tmp_path), "--shard", "0/2")
    assert trained() == {"ddpm/b8-s0", "ddpm/b8-s1"} and not (tmp_path / "results.json").exists()
    _run("speedrun.py", "--out", str(tmp_path), "--shard", "1/2")
    assert trained() == {"ddpm/b8-s0", "ddpm/b8-s1", "frugal/b8-s0", "frugal/b8-s1"}
    csvs = {p: p.read_bytes() for p in tmp_path.glob("*/b8-s*/metrics.csv")}
    out = _run("speedrun.py", "--out", str(tmp_path))
    assert {p: p.read_bytes() for p in tmp_path.glob("*/b8-s*/metrics.csv")} == csvs  # reused, not trained again
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["seed"]) for r in results["runs"]] == [("ddpm", 0), ("frugal", 0), ("ddpm", 1),
                                                                   ("frugal", 1)]
    for r in results["runs"]:
        assert r["images"] == [8, 16, 24] and len(r["fid"]) == len(r["clock"]) == 3
        assert 0 < r["clock"][0] < r["clock"][1] < r["clock"][2] <= r["train_seconds"] + 1e-9
    summary = results["summary"]
    ddpm_final = sorted(r["fid"][-1] for r in results["runs"] if r["recipe"] == "ddpm")
    assert summary["targets"]["easy"] == statistics.median(ddpm_final)
    assert abs(summary["targets"]["hard"] - (summary["targets"]["easy"] * results["floor"]) ** 0.5) < 1e-12
    assert summary["targets"]["harder"] == pytest.approx(summary["targets"]["easy"] ** 0.25 * results["floor"] ** 0.75,
                                                         rel=1e-12)
    minutes_to = _benchmark("speedrun").minutes_to
    for recipe, row in summary["rows"].items():  # the median over seeds of each run's crossing of the target
        runs = [r for r in results["runs"] if r["recipe"] == recipe]
        crossings = [minutes_to(r, summary["targets"]["easy"]) for r in runs]
        assert row["minutes_to_easy"] == statistics.median(crossings)
    for recipe, row in summary["rows"].items():  # each finished run scored once with --final-samples, kept in it
        scored = [r["final_fid"] for r in results["runs"] if r["recipe"] == recipe]
        assert row["fid_scored"] == statistics.median(scored) and row["fid_scored_range"] == [min(scored), max(scored)]
    [kept] = json.loads((tmp_path / "frugal" / "b8-s0" / "study-score.json").read_text())["kept"]
    assert kept["key"]["samples"] == 24 and kept["value"] == results["runs"][1]["final_fid"]
    assert "| ddpm | 2 |" in out and "final FID of 24 samples" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "speedrun.png").stat().st_size > 10_000
    # a report reads only runs of the recipes it names: runs of another config in --out are refused in one line
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "speedrun.py"), "--smoke", "--out", str(tmp_path),
                              "--report-only", "--set", "train.lr=0.5"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == f"error: {tmp_path / 'ddpm' / 'b8-s0'} holds a run of another config; remove it " \
                                     "or choose another --out"


def test_only_frugal_takes_the_auto_recipe_every_other_recipe_fixes_its_settings():
    RECIPES = _benchmark("recipes").RECIPES
    from frugaldiff.components import FRUGAL_RECIPE
    from frugaldiff.config import Config

    assert RECIPES["frugal"] == {} and RECIPES["frugal-small"] == FRUGAL_RECIPE
    for name, settings in RECIPES.items():
        config = Config(settings)
        assert all((config[key] == "auto") == (name == "frugal") for key in FRUGAL_RECIPE), name


def test_an_interrupted_or_refused_benchmark_ends_in_one_line(capsys):
    import signal

    from frugaldiff.errors import FrugalError
    from frugaldiff.trainer import Interrupted

    run_benchmark = _benchmark("reporting").run_benchmark

    def stopped() -> None:
        raise Interrupted(signal.SIGTERM, Path("out/ddpm/b16-s0/checkpoints/step-00000100"))

    def refused() -> None:
        raise FrugalError("out/ddpm/b16-s0 holds a run of another config")

    with pytest.raises(SystemExit) as stop:
        run_benchmark(stopped)
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ("stopped by SIGTERM; checkpoint saved at out/ddpm/b16-s0/checkpoints/"
                                       "step-00000100; run the same command again to continue from it\n")
    with pytest.raises(SystemExit) as refusal:
        run_benchmark(refused)
    assert refusal.value.code == "error: out/ddpm/b16-s0 holds a run of another config"
