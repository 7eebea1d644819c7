"""Held-out grid, per-bin x0 errors and the prediction-type study."""

import json
import statistics
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import TINY_UNET

from frugaldiff import studies
from frugaldiff.cli import main
from frugaldiff.components import build_denoiser
from frugaldiff.config import Config
from frugaldiff.diagnostics import (
    LossLedger,
    denoiser_predictions,
    fixed_grid,
    gate_weights_by_bin,
    heldout_grid,
    heldout_loss_by_bin,
    heldout_x0_error_by_bin,
    x0_error_by_bin,
)
from frugaldiff.errors import FrugalError
from frugaldiff.images import make_grid, to_uint8
from frugaldiff.noise import VPLinear
from frugaldiff.runs import RunLock, read_metrics
from frugaldiff.studies import (
    kept_in_run,
    measured_blend,
    prediction_study,
    study_claims,
    study_table,
    train_or_reuse,
)
from frugaldiff.trainer import Trainer
from frugaldiff.weighting import WEIGHTINGS, Weighting

TINY_GMM = {"data.name": "gmm", "data.gmm_dim": 3, "data.gmm_components": 2, "data.num_samples": 256,
            "model.hidden": 16, "model.depth": 1, "train.batch_size": 16, "train.images_seen": 64,
            "train.warmup_images": 0, "train.checkpoint_every": 0, "diffusion.sigma_data": 0.8}


def _grid(seed=5):
    x0 = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    return heldout_grid(VPLinear(), x0, bins=4, per_bin=6, generator=torch.Generator().manual_seed(seed))


def test_grid_is_fixed_by_its_seed_and_binned():
    a, b = _grid(), _grid()
    assert a.edges == [0, 0.25, 0.5, 0.75, 1]
    for k, (ca, cb) in enumerate(zip(a.bins, b.bins, strict=True)):
        assert all(torch.equal(getattr(ca, f), getattr(cb, f)) for f in ("x0", "t", "eps", "x_t"))
        assert ca.x0.shape == (6, 3) and bool(((ca.t >= k / 4) & (ca.t <= (k + 1) / 4)).all())
        torch.testing.assert_close(ca.x_t, VPLinear().add_noise(ca.x0, ca.eps, ca.t))
    assert not torch.equal(a.bins[0].t, _grid(6).bins[0].t)


def test_errors_equal_a_direct_computation():
    grid = _grid()
    result = x0_error_by_bin(lambda x_t, t: {"half": 0.5 * x_t, "zero": torch.zeros_like(x_t)}, grid,
                             model_dtype=torch.float64, batch=4)
    for k, cell in enumerate(grid.bins):
        assert result["error"]["half"][k] == pytest.approx(float((0.5 * cell.x_t - cell.x0).pow(2).mean()), rel=1e-12)
        assert result["error"]["zero"][k] == pytest.approx(float(cell.x0.pow(2).mean()), rel=1e-12)
    assert "bayes" not in result


def test_mixed_denoiser_reports_heads_and_gates():
    config = Config({**TINY_GMM, "diffusion.process": "vp-linear", "diffusion.prediction": "mixed",
                     "diffusion.mixed.gate": "pixel"})
    denoiser = build_denoiser(config, (3,))
    grid = _grid()
    outputs = denoiser_predictions(denoiser)(grid.bins[0].x_t.float(), grid.bins[0].t.float())
    assert set(outputs) == {"model", "head:x0", "head:velocity", "head:acceleration"}
    gates = gate_weights_by_bin(denoiser, grid)
    assert list(gates) == ["x0", "velocity", "acceleration"]
    for k in range(4):
        assert sum(g[k] for g in gates.values()) == pytest.approx(1, abs=1e-6)
    with pytest.raises(FrugalError, match="only for diffusion.prediction = mixed"):
        gate_weights_by_bin(build_denoiser(Config(TINY_GMM), (3,)), grid)


def test_claims_flag_exactly_the_bins_where_a_mixture_is_significantly_worse():
    noise = 0.01 * torch.randn(5, 2, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def errors(means, k):
        return [m + noise[k, b] for b, m in enumerate(means)]

    # bin 0: the mixture's best head is 1e-4 better than the mixture, far inside the paired noise (SE ~ 7e-4)
    samples = {"x0": errors([1.0, 4.0], 0), "velocity": errors([2.0, 3.0], 1), "mixed-heads": errors([0.5, 3.5], 2),
               "mixed-heads head:x0": errors([1.0, 3.0], 3), "mixed-heads head:velocity": errors([0.4999, 5.0], 4)}
    results = {"edges": [0, 0.5, 1], "models": {k: [float(v.mean()) for v in bins] for k, bins in samples.items()}}
    claims = study_claims(results, samples, ["x0", "velocity"])
    assert claims["best_single_type_per_bin"] == ["x0", "velocity"]
    assert claims["mixtures"]["mixed-heads"]["bins_worse_than_own_best_head"] == [1]
    assert claims["mixtures"]["mixed-heads"]["bins_worse_than_best_single_model"] == [1]


def test_measured_blend_is_the_inverse_error_share_and_its_printed_keys_configure_it():
    models = {"eps": [0.01, 0.3, 189.0], "x0": [0.12, 0.3, 0.35], "mixed-heads": [0.01, 0.3, 0.35]}
    blend = measured_blend(models, ["eps", "x0", "velocity"])
    # x0's share: E_eps / (E_eps + E_x0) per bin
    assert blend == {"types": ["eps", "x0"], "weights": [round(0.01 / 0.13, 3), 0.5, round(189 / 189.35, 3)]}
    assert measured_blend(models, ["x0"]) is None  # one single type: nothing to blend
    assert measured_blend({"x0": [0.1, -0.01], "eps": [0.2, 0.1]}, ["x0", "eps"]) is None  # excess over Bayes
    results = {"dataset": "d", "images_seen": 1, "batch_size": 1, "process": "vp-linear", "edges": [0, 0.5, 1],
               "measure": "x0 error", "models": {"eps": [1.0, 2.0], "x0": [3.0, 1.0]},
               "blend": measured_blend({"eps": [1.0, 2.0], "x0": [3.0, 1.0]}, ["eps", "x0"])}
    line = study_table(results).strip().splitlines()[-1].strip()
    overrides = [arg.strip("'") for arg in line.split(" --set ")]
    overrides[0] = overrides[0].removeprefix("--set ").strip("'")
    config = Config.load(overrides=overrides)
    assert config["diffusion.blend.types"] == ["eps", "x0"] and config["diffusion.blend.weights"] == [0.25, 0.667]


def test_study_writes_its_outputs_and_reuses_finished_runs(tmp_path, monkeypatch):
    base = Config(TINY_GMM)
    results = prediction_study(base, tmp_path, types=["x0", "velocity"], strategies=["joint", "heads"], bins=3,
                               per_bin=8, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"x0", "velocity", "mixed-joint", "mixed-heads", "results.json",
                                                     "table.md", "x0_error.png", "gates.png"}
    assert (tmp_path / "x0" / f"seed-{base['train.seed']}" / "config.toml").is_file()
    assert set(results["models"]) == {"x0", "velocity", "mixed-joint", "mixed-joint head:x0",
                                      "mixed-joint head:velocity", "mixed-heads", "mixed-heads head:x0",
                                      "mixed-heads head:velocity"}
    assert results["measure"] == "excess x0 error over Bayes" and len(results["bayes"]) == 3
    assert json.loads((tmp_path / "results.json").read_text())["claims"] == results["claims"]
    assert "| mixed-heads head:velocity |" in (tmp_path / "table.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    with monkeypatch.context() as patch:  # each run's grid measurement is kept in it: a rerun measures nothing
        patch.setattr(studies, "x0_error_by_bin", lambda *args, **kwargs: pytest.fail("measured the grid again"))
        again = prediction_study(base, tmp_path, types=["x0", "velocity"], strategies=["joint", "heads"], bins=3,
                                 per_bin=8, progress=False)
    assert again["models"] == results["models"] and again["gates"] == results["gates"]
    assert again["claims"] == results["claims"] and again["bayes"] == results["bayes"]
    assert prediction_study(base, tmp_path, types=["x0"], strategies=[], bins=2, per_bin=8,  # another grid: anew
                            progress=False)["edges"] == pytest.approx([0, 0.5, 1])
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == stamps
    with pytest.raises(FrugalError, match="holds a run of another config"):
        prediction_study(base.updated({"train.lr": 5e-4}), tmp_path, types=["x0"], strategies=[], progress=False)


def test_study_scores_samples_of_every_seed_and_trains_the_blend_and_measured_gates(tmp_path):
    base = Config(TINY_GMM)
    results = prediction_study(base, tmp_path, types=["x0", "velocity"], strategies=["heads"], bins=3, per_bin=8,
                               progress=False, gates=["timestep", "analytic", "switch"],
                               blend={"diffusion.blend.weights": [0.3, 0.7]}, seeds=[0, 1], samples=64)
    names = ["x0", "velocity", "blend", "mixed-heads", "mixed-heads-analytic", "mixed-heads-switch"]
    assert list(results["quality"]) == names and set(results["gates"]) == set(names[3:])
    assert all(len(q["values"]) == len(q["train_seconds"]) == 2 for q in results["quality"].values())
    assert {p.name for p in (tmp_path / "blend").iterdir()} == {"seed-0", "seed-1"}
    saved = {name: Config.load(tmp_path / name / "seed-1" / "config.toml") for name in ("blend", "x0")}
    assert saved["blend"]["diffusion.blend.weights"] == [0.3, 0.7]  # the blend's own keys, no other model's
    assert saved["x0"]["diffusion.blend.weights"] == base["diffusion.blend.weights"]
    table = (tmp_path / "table.md").read_text()
    assert f"| blend | {statistics.mean(results['quality']['blend']['values']):.4g} ± " in table
    # the per-bin errors are the mean over seeds of each seed's own measurement
    single = [prediction_study(base, tmp_path, types=["x0"], strategies=[], bins=3, per_bin=8, progress=False,
                               seeds=[s])["models"]["x0"] for s in (0, 1)]
    assert results["models"]["x0"] == pytest.approx([(a + b) / 2 for a, b in zip(*single, strict=True)], rel=1e-9)
    for gates in results["gates"].values():  # mean weights per study bin: a distribution over the heads
        assert [a + b for a, b in zip(gates["x0"], gates["velocity"], strict=True)] == pytest.approx([1.0] * 3)
    quality = results["claims"]["quality"]
    assert quality["best_single_type"] in ("x0", "velocity") and quality["best_model"] in names


def test_study_on_images_shows_the_first_seeds_samples_of_every_model(tmp_path, monkeypatch):
    base = Config({**TINY_UNET, "diffusion.process": "vp-linear", "train.images_seen": 32, "train.tensorboard": False,
                   "train.heldout_every": 0, "train.checkpoint_every": 0})
    shown = {}
    monkeypatch.setattr(studies, "plot_sample_panels", lambda panels, title, out: shown.update(panels, title=title))
    prediction_study(base, tmp_path, types=["x0", "eps"], strategies=[], bins=2, per_bin=4, progress=False,
                     seeds=[1, 0], samples=16)
    assert list(shown) == ["x0", "eps", "title"] and "seed 1" in shown["title"]
    for name in ("x0", "eps"):  # the run's own samples, in a grid of PANEL_COLUMNS columns
        run = train_or_reuse(base.updated({"diffusion.prediction": name, "train.name": name, "train.seed": 1}),
                             tmp_path / name / "seed-1", progress=False)
        expected = make_grid(to_uint8(run.samples(studies.PANEL_SAMPLES)), ncols=studies.PANEL_COLUMNS)
        assert np.array_equal(shown[name], expected)
    monkeypatch.undo()
    prediction_study(base, tmp_path, types=["x0"], strategies=[], bins=2, per_bin=4, progress=False, samples=16)
    with Image.open(tmp_path / "samples.png") as picture:
        assert picture.size[0] > 300 and picture.mode in ("RGB", "RGBA")


def test_study_keeps_each_runs_score_and_a_rerun_reuses_it(tmp_path, monkeypatch):
    base = Config(TINY_GMM)
    study = dict(types=["x0"], strategies=[], bins=2, per_bin=4, progress=False)
    first = prediction_study(base, tmp_path, samples=32, **study)
    kept = tmp_path / "x0" / f"seed-{base['train.seed']}" / "study-score.json"
    assert json.loads(kept.read_text())["kept"][0]["value"] == first["quality"]["x0"]["values"][0]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", lambda *args, **kwargs: pytest.fail("a kept score was computed again"))
        assert prediction_study(base, tmp_path, samples=32, **study)["quality"] == first["quality"]
    prediction_study(base, tmp_path, samples=16, **study)  # another sample count is scored anew, beside the first
    assert [entry["key"]["samples"] for entry in json.loads(kept.read_text())["kept"]] == [32, 16]


def test_kept_in_run_computes_once_per_key_and_reads_only_when_asked(tmp_path):
    path, calls = tmp_path / "kept.json", []

    def compute():
        calls.append(1)
        return {"mean": 0.5 * len(calls)}

    assert kept_in_run(path, {"step": 3}, compute) == {"mean": 0.5}
    assert kept_in_run(path, {"step": 3}, compute) == {"mean": 0.5} and len(calls) == 1
    assert kept_in_run(path, {"step": 3}, None) == {"mean": 0.5}  # read only: the kept value
    with pytest.raises(FrugalError, match="keeps no value for {'step': 4}"):
        kept_in_run(path, {"step": 4}, None)
    assert kept_in_run(path, {"step": 4}, compute) == {"mean": 1.0}  # another key is measured anew
    assert kept_in_run(path, {"step": 3}, None) == {"mean": 0.5}  # and the first is still kept
    assert json.loads(path.read_text()) == {"kept": [{"key": {"step": 3}, "value": {"mean": 0.5}},
                                                     {"key": {"step": 4}, "value": {"mean": 1.0}}]}
    old = tmp_path / "old.json"  # the one-entry file of earlier versions is read, and kept when a key is added
    old.write_text(json.dumps({"key": {"step": 3}, "value": 7.0}))
    assert kept_in_run(old, {"step": 3}, None) == 7.0
    assert kept_in_run(old, {"step": 5}, lambda: 8.0) == 8.0 and kept_in_run(old, {"step": 3}, None) == 7.0


def test_analyze_command(tmp_path, capsys):
    sets = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY_GMM.items()), [])
    assert main(["analyze", "prediction-types", "--types", "x0", "eps", "--strategies", "heads", "--bins", "2",
                 "--per-bin", "4", "--out", str(tmp_path / "s"), "--no-progress", *sets]) == 0
    out = capsys.readouterr().out
    assert "| mixed-heads head:eps |" in out and "bins_worse_than_own_best_head" in out
    assert main(["analyze", "prediction-types", "--types", "x0", "--strategies", "--blend", "x0", "eps",
                 "--blend-weights", "0.25", "0.75", "--blend-set", "diffusion.weighting=type_loss", "--bins", "2",
                 "--per-bin", "4", "--out", str(tmp_path / "s"),
                 "--no-progress", *sets]) == 0
    blend = Config.load(tmp_path / "s" / "blend" / f"seed-{Config(TINY_GMM)['train.seed']}" / "config.toml")
    assert (blend["diffusion.blend.types"], blend["diffusion.blend.weights"]) == (["x0", "eps"], [0.25, 0.75])
    assert blend["diffusion.weighting"] == "type_loss"
    x0 = Config.load(tmp_path / "s" / "x0" / f"seed-{Config(TINY_GMM)['train.seed']}" / "config.toml")
    assert x0["diffusion.weighting"] == Config(TINY_GMM)["diffusion.weighting"]  # the blend's keys are its own
    assert main(["analyze", "prediction-types", "--bins", "0", "--out", str(tmp_path / "t")]) == 2


def test_ledger_equals_a_direct_computation_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(300, generator=g, dtype=torch.float64)
    losses = torch.exp(3 * t) * torch.rand(300, generator=g, dtype=torch.float64)
    ledger = LossLedger(bins=7)
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 300)]:
        ledger.update(t[lo:hi], losses[lo:hi])
    index = (t * 7).long()
    for b in range(7):
        chunk = losses[index == b]
        assert ledger.count[b] == len(chunk)
        assert float(ledger.mean[b]) == pytest.approx(float(chunk.mean()), rel=1e-12)
        assert float(ledger.variance()[b]) == pytest.approx(float(chunk.var()), rel=1e-10)
    row = ledger.row()
    assert list(row) == ledger.columns() and row["loss_t0"] == f"{float(losses[index == 0].mean()):.6g}"
    restored = LossLedger(bins=7)
    restored.load_state_dict(ledger.state_dict())
    assert restored.row() == row
    ledger.reset()
    assert set(ledger.row().values()) == {""}


def test_heldout_loss_is_the_training_objective_on_the_grid():
    config = Config(TINY_GMM)
    denoiser = build_denoiser(config, (3,))
    grid = _grid()
    for w in (WEIGHTINGS.create("none"), WEIGHTINGS.create("snr")):
        losses = heldout_loss_by_bin(denoiser, grid, w, batch=4)
        assert losses == heldout_loss_by_bin(denoiser, grid, w, batch=4)  # same grid, same numbers
        assert heldout_loss_by_bin(denoiser, grid, w) == pytest.approx(losses, rel=1e-6)
        cell = grid.bins[2]
        x0, eps, x_t, t = (v.float() for v in (cell.x0, cell.eps, cell.x_t, cell.t))
        with torch.no_grad():
            direct = denoiser.prediction.loss(denoiser(x_t, t), x_t, x0, eps, t, w).mean()
        assert losses[2] == pytest.approx(float(direct), rel=1e-5)


LEDGER_RUN = {"data.name": "8gaussians", "data.num_samples": 512, "model.hidden": 16, "model.depth": 1,
              "train.batch_size": 16, "train.images_seen": 16 * 6, "train.warmup_images": 0, "train.log_every": 3,
              "train.ledger_bins": 4, "train.heldout_every": 48, "train.heldout_per_bin": 8,
              "train.tensorboard": False}


def _ledger_run(tmp_path, **changes):
    trainer = Trainer(Config({**LEDGER_RUN, **changes}), tmp_path / "run", progress=False)
    recorded = []
    update = trainer.state.sampler.update

    def recording_update(t, losses):
        recorded.append((trainer.state.step, t.clone(), losses.clone()))
        update(t, losses)

    trainer.state.sampler.update = recording_update
    trainer.fit()
    return trainer, recorded, read_metrics(trainer.files.metrics)


def test_metrics_csv_ledger_and_heldout_columns_equal_a_direct_computation(tmp_path):
    trainer, recorded, rows = _ledger_run(tmp_path)
    assert [int(r["step"]) for r in rows] == [3, 6]
    previous = 0
    for row in rows:  # each row: the per-bin mean and variance of every loss fed back since the previous row
        step = int(row["step"])
        t = torch.cat([t for s, t, _ in recorded if previous < s <= step])
        losses = torch.cat([v for s, _, v in recorded if previous < s <= step])
        index = (t * 4).long().clamp(max=3)
        for b in range(4):
            mine = losses[index == b]
            assert float(row[f"loss_t{b}"]) == pytest.approx(mine.mean().item(), rel=1e-5)
            assert float(row[f"lossvar_t{b}"]) == pytest.approx(mine.var().item(), rel=1e-5)
        previous = step
    # held-out losses at 48 and 96 images; the last one is the final model's on the fixed grid
    assert all(row["heldout_t0"] for row in rows)
    final = trainer.heldout_losses()
    assert {k: float(v) for k, v in final.items()} == pytest.approx(
        {k: float(rows[-1][k]) for k in final}, rel=1e-5)


def test_tensorboard_gets_the_same_numbers_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, rows = _ledger_run(tmp_path, **{"train.tensorboard": True})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"train/loss", "loss/loss_t0", "lossvar/lossvar_t3", "heldout/heldout_t2"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("loss/loss_t1")]
    assert logged == [(int(r["images_seen"]), pytest.approx(float(r["loss_t1"]), rel=1e-5)) for r in rows]


def test_analyze_ledger_draws_the_heat_map_and_curves(tmp_path, capsys):
    _ledger_run(tmp_path)
    assert main(["analyze", "ledger", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "analysis" / "ledger"
    assert (out / "ledger_heatmap.png").stat().st_size > 10_000 and (out / "ledger_curves.png").is_file()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.csv").write_text("step,images_seen,loss\n1,16,0.5\n")
    assert main(["analyze", "ledger", str(tmp_path / "old")]) == 2
    assert "predates the loss ledger" in capsys.readouterr().err


def test_train_or_reuse_restarts_a_run_stopped_before_its_first_checkpoint_and_refuses_another_config(tmp_path):
    config = Config({**TINY_GMM, "train.tensorboard": False, "train.heldout_every": 0})
    run = tmp_path / "run"
    run.mkdir()
    config.save(run / "config.toml")
    (run / "metrics.csv").write_text("step,images_seen,loss\n1,16,9.9\n")  # a run killed before it saved anything
    trainer = train_or_reuse(config, run, progress=False)
    assert trainer.state.images_seen == 64
    rows = read_metrics(run / "metrics.csv")
    assert rows[0]["loss"] != "9.9" and int(rows[-1]["images_seen"]) == 64
    assert train_or_reuse(config, run, progress=False).state.images_seen == 64  # finished: reused
    with pytest.raises(FrugalError, match="holds a run of another config"):
        train_or_reuse(config.updated({"train.images_seen": 128}), run, progress=False)


def test_train_or_reuse_waits_for_a_run_another_process_holds(tmp_path):
    config = Config({**TINY_GMM, "train.tensorboard": False, "train.heldout_every": 0})
    run = tmp_path / "run"
    finished = train_or_reuse(config, run, progress=False).state.ema.model.state_dict()
    holder = RunLock(run)  # another study reusing (or training) the same run folder
    with pytest.raises(FrugalError, match="is being trained by process"):
        Trainer(config, run, resume=True, progress=False)  # a plain train or resume refuses a held folder
    release = threading.Timer(0.5, holder.release)
    release.start()
    with pytest.warns(UserWarning, match="in use by process .*; waiting until it is free"):
        trainer = train_or_reuse(config, run, progress=False)
    release.join()
    assert trainer.done and trainer.state.images_seen == 64
    assert all(torch.equal(v, finished[k]) for k, v in trainer.state.ema.model.state_dict().items())


def test_heldout_x0_error_is_the_models_x0_error_and_a_heads_mixtures_objective_is_not():
    """The flow mixture's "3× x0 error" (docs/benchmarks.md) was this: measured through the training objective with
    a unit x0 weight, a ``heads`` mixture of K types counts its K heads' errors plus its own."""
    torch.manual_seed(0)
    config = Config({"data.name": "digits", "diffusion.prediction": "mixed",
                     "diffusion.mixed.types": ["x0", "velocity"], "model.channels": 8, "model.channel_mult": [1, 2],
                     "model.num_res_blocks": 1, "model.attention_resolutions": [4]})
    denoiser = build_denoiser(config, (1, 8, 8)).eval()
    with torch.no_grad():  # heads that differ from each other and from x0
        denoiser.net.out[-1].weight.normal_(0, 0.3)
    grid = fixed_grid(denoiser.process, 0.5 * torch.randn(64, 1, 8, 8), 4, 16)
    errors = x0_error_by_bin(denoiser_predictions(denoiser), grid)["error"]
    assert heldout_x0_error_by_bin(denoiser, grid) == pytest.approx(errors["model"], rel=1e-5)

    class UnitX0(Weighting):  # the old measure: the objective at x0 weight 1
        def x0_weight(self, prediction, t):
            return torch.ones_like(t)

    summed = [sum(errors[k][b] for k in ("model", "head:x0", "head:velocity")) for b in range(4)]
    assert heldout_loss_by_bin(denoiser, grid, UnitX0()) == pytest.approx(summed, rel=1e-5)
