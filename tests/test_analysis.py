"""Held-out loss per bin, disruption between t bins and timestep importance (frugaldiff.analysis)."""

import copy
import json

import pytest
import torch
from torch import nn

import frugaldiff
from frugaldiff.analysis import (
    DisruptionProbe,
    WindowDegraded,
    disruption,
    disruption_scaling,
    matrix_summary,
    noise_degrade,
    timestep_importance,
)
from frugaldiff.checkpoint import latest_checkpoint, load_trainer_state
from frugaldiff.cli import main
from frugaldiff.components import SampleSettings
from frugaldiff.config import Config
from frugaldiff.networks import Denoiser
from frugaldiff.noise import VPLinear, bcast
from frugaldiff.prediction import PREDICTIONS

# 40 steps of a tiny MLP on 3-D gmm data at a constant lr: far from converged, so a few steps in one bin help it
TINY_RUN = {"data.name": "gmm", "data.gmm_dim": 3, "data.gmm_components": 2, "data.num_samples": 256,
            "model.hidden": 32, "model.depth": 1, "train.batch_size": 16, "train.images_seen": 640,
            "train.warmup_images": 0, "train.lr_schedule": "constant", "train.lr": 3e-3,
            "train.checkpoint_every": 320, "diffusion.sigma_data": 0.8, "sample.n": 16, "sample.steps": 10}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return frugaldiff.train(TINY_RUN, run_dir=tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "analysis" not in p.parts}


def test_summary_and_scaling_of_matrices():
    assert matrix_summary([[-1.0, 2.0], [1.0, -0.5]]) == {"off_diagonal_share": 1.0, "mean_off_diagonal": 1.5,
                                                          "mean_diagonal": -0.75}
    assert matrix_summary([[1.0, 1.0], [0.0, -1.0]])["off_diagonal_share"] == 0.5
    assert matrix_summary([[-1.0, -2.0], [0.0, -1.0]])["off_diagonal_share"] is None
    matrices = [{"batch_size": 4, "steps": 1, "off_diagonal_share": 0.2, "mean_off_diagonal": 0.1, "mean_diagonal": 0},
                {"batch_size": 16, "steps": 1, "off_diagonal_share": 0.6, "mean_off_diagonal": 0.0, "mean_diagonal": 0}]
    (row,) = disruption_scaling(matrices, [4, 16], [1])
    assert row["share_slope_per_doubling"] == pytest.approx(0.2)
    assert row["mean_off_diagonal_slope_per_doubling"] == pytest.approx(-0.05)


def test_disruption_matrices_and_outputs(run, tmp_path):
    before = _files(run)
    result = disruption(run, tmp_path, bins=4, steps=[10, 1], batch_sizes=[64, 16], per_bin=128, progress=False)
    assert _files(run) == before  # the run folder is only read
    assert result["lr"] == pytest.approx(3e-3) and result["images_seen"] == 640 and len(result["loss_before"]) == 4
    assert [(m["batch_size"], m["steps"]) for m in result["matrices"]] == [(16, 1), (16, 10), (64, 1), (64, 10)]
    assert result["matrices"][0]["delta"] != result["matrices"][2]["delta"]  # batch 16 and 64 differ
    for m in result["matrices"]:
        assert len(m["delta"]) == 4 and all(len(row) == 4 for row in m["delta"])
        if m["steps"] == 10:  # ten steps on bin A lower the held-out loss in bin A
            assert sum(m["delta"][a][a] < 0 for a in range(4)) >= 3
    assert [s["steps"] for s in result["scaling"]] == [1, 10]
    assert json.loads((tmp_path / "disruption.json").read_text()) == json.loads(json.dumps(result))
    assert {p.name for p in tmp_path.iterdir()} == {
        "disruption.json", "off_diagonal_share.png",
        *(f"disruption_b{b}_k{k}.png" for b in (16, 64) for k in (1, 10))}


def test_trials_start_from_the_checkpoint(run):
    probe = DisruptionProbe(run, bins=3, per_bin=32, seed=3)
    weights = copy.deepcopy(probe.state.denoiser.state_dict())
    first = probe.trial(0, 8, [1, 2])
    probe.trial(2, 8, [3])
    assert probe.trial(0, 8, [1, 2]) == first  # identical weights, optimizer state and data in every trial
    assert first[1] != first[2] != probe.loss_before
    probe.restore()
    assert all(torch.equal(v, weights[k]) for k, v in probe.state.denoiser.state_dict().items())
    saved = load_trainer_state(latest_checkpoint(run))[0]["optimizer"]["state"]
    state = probe.state.optimizer.state_dict()["state"]
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[i][m], saved[i][m]) for i in saved for m in ("exp_avg", "exp_avg_sq", "step"))
    assert probe.heldout_loss() == probe.loss_before
    for size in (4, 24):  # each trial trains at its own batch size, not the run's (16)
        probe.trial(1, size, [2])
        assert probe.state.stream.position == 2 * size


S = 1.0  # data N(0, S²I)


class ExactGaussian(Denoiser):
    """The Bayes x̂0 for N(0, S²I) data: α S²/(α² S² + σ²) · x_t."""

    def __init__(self) -> None:
        super().__init__(nn.Identity(), PREDICTIONS.create("x0", VPLinear(), S))

    def denoise(self, x_t, t, labels=None):
        a, sig = bcast(self.process.alpha(t), x_t), bcast(self.process.sigma(t), x_t)
        return a * S**2 / (a**2 * S**2 + sig**2) * x_t


def test_window_degrades_exactly_inside_its_bin():
    class Zero(ExactGaussian):
        def denoise(self, x_t, t, labels=None):
            return torch.zeros_like(x_t)

    t = torch.tensor([0.0, 0.2, 0.39, 0.4, 0.8, 1.0])
    inner = WindowDegraded(Zero(), 0.2, 0.4, lambda x0, x_t, t, labels, g: x0 + 1)
    last = WindowDegraded(Zero(), 0.8, 1.0, lambda x0, x_t, t, labels, g: x0 + 1)
    assert inner.denoise(torch.zeros(6, 2), t)[:, 0].tolist() == [0, 1, 1, 0, 0, 0]
    assert last.denoise(torch.zeros(6, 2), t)[:, 0].tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_importance_is_largest_where_the_injected_error_is(solver):
    """x̂0 is linear in x_t and the z stream is the same in every trial, so the displacement of trial b grows
    exactly with the square of bin b's error: 10× the error in one bin is 100× the cost there, 1× elsewhere."""
    bins, loud = 5, 1
    config = Config({"sample.solver": solver, "sample.steps": 20})

    def degrade_with(scale_loud):
        def degrade(x0, x_t, t, labels, generator):
            scale = torch.where((t * bins).floor().clamp(max=bins - 1) == loud, scale_loud, 0.1)
            return x0 + bcast(scale, x0) * torch.randn(x0.shape, generator=generator)
        return degrade

    def cost(degrade):
        result = timestep_importance(ExactGaussian(), SampleSettings.from_config(config), (4,), degrade, bins=bins,
                                     n=256, progress=False)
        assert result["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1])
        return result["metrics"]["displacement"]["cost"]

    even, peaked = cost(degrade_with(0.1)), cost(degrade_with(1.0))
    assert max(range(bins), key=peaked.__getitem__) == loud
    assert [p / e for p, e in zip(peaked, even, strict=True)] == pytest.approx([1, 100, 1, 1, 1], rel=1e-3)
    assert cost(noise_degrade(0.0)) == [0.0] * bins  # degraded and reference samples share every random draw


def test_analyze_commands(run, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["analyze", "disruption", str(run), "--bins", "2", "--steps", "1", "--batch-sizes", "4", "8",
                 "--per-bin", "16", "--out", str(out), "--no-progress"]) == 0
    assert "off-diagonal share" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"disruption.json", "off_diagonal_share.png", "disruption_b4_k1.png",
                                               "disruption_b8_k1.png"}
    for degrade in ("noise", "checkpoint"):
        assert main(["analyze", "importance", str(run), "--bins", "3", "--n", "32", "--steps", "6", "--degrade",
                     degrade, "--no-progress"]) == 0
        result = json.loads((run / "analysis" / "importance" / "importance.json").read_text())
        assert result["headline"] == "loglik" and set(result["metrics"]) == {"displacement", "loglik"}
        assert len(result["metrics"]["loglik"]["cost"]) == 3 and result["degrade"] == degrade
        assert (run / "analysis" / "importance" / "importance.png").is_file()
    assert result["degrade_images_seen"] == 320
    assert "cost in loglik per t bin" in capsys.readouterr().out


def test_analyze_errors(run, tmp_path, capsys):
    def error(*argv):
        assert main(["analyze", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    assert "is not a run folder" in error("disruption", str(tmp_path))
    assert "is not a run folder" in error("importance", str(tmp_path))
    assert "--bins must be at least 2" in error("disruption", str(run), "--bins", "1")
    assert "--bins must be at least 1" in error("importance", str(run), "--bins", "0")
    assert "--metric fid needs an image run" in error("importance", str(run), "--metric", "fid")
    assert "--batch-sizes must be positive" in error("batch-sweep", "--batch-sizes", "0", "--out", str(tmp_path / "s"))
    finished = tmp_path / "cosine"
    (finished / "checkpoints").mkdir(parents=True)
    checkpoint = latest_checkpoint(run)
    (finished / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    Config({**TINY_RUN, "train.lr_schedule": "cosine"}).save(finished / "config.toml")
    assert "pass --lr" in error("disruption", str(finished))


def test_batch_sweep_trains_each_batch_size_at_equal_images_and_reuses_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["analyze", "batch-sweep", "--batch-sizes", "4", "16", "--bins", "2", "--per-bin", "8", "--samples", "32",
            "--out", str(out), "--no-progress",
            *[a for k, v in TINY_RUN.items() if k != "train.batch_size" for a in ("--set", f"{k}={json.dumps(v)}")]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best loglik: batch" in printed
    result = json.loads((out / "batch_sweep.json").read_text())
    assert result["metric"] == "loglik" and result["higher_is_better"]
    assert [(r["batch_size"], r["steps"]) for r in result["runs"]] == [(4, 160), (16, 40)]  # 640 images each
    assert all(len(r["heldout"]) == 2 and r["train_seconds"] > 0 for r in result["runs"])
    assert (out / "batch_sweep.png").stat().st_size > 10_000
    assert "| 4 | 160 |" in (out / "table.md").read_text()
    checkpoints = sorted((out / "batch-4" / "checkpoints").iterdir())
    assert main(argv) == 0  # a rerun reuses the finished runs (nothing retrained) and scores the same samples
    assert sorted((out / "batch-4" / "checkpoints").iterdir()) == checkpoints
    again = json.loads((out / "batch_sweep.json").read_text())
    assert [r["metric"] for r in again["runs"]] == [r["metric"] for r in result["runs"]]


def test_report_renders_every_section_self_contained(run, tmp_path, capsys):
    from frugaldiff.report import SECTIONS

    assert main(["analyze", "ledger", str(run)]) == 0
    assert main(["analyze", "importance", str(run), "--bins", "2", "--n", "16", "--steps", "4", "--no-progress"]) == 0
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--n", "8", "--steps", "4", "--out", str(out)]) == 0
    page = out.read_text()
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened
    # a sample plot per kept checkpoint (320 and 640 images), the ledger and loss plots, the analyses' plots
    assert page.count("320 images seen") == 1 and page.count("640 images seen") == 1
    assert page.count("data:image/png;base64,") >= 2 + 2 + 1 + 1
    assert page.count("ledger_heatmap.png") == 1 and "[train]" in page and "importance.png" in page
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
