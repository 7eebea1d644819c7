import csv
import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from PIL import Image
from testkit import TINY_UNET

from frugaldiff.cli import main
from frugaldiff.config import OPTIONS, flatten

TINY_ARGS = [arg for key, value in TINY_UNET.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny end-to-end CLI run on digits, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as patch:
        printed = []
        patch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        code = main(["train", *TINY_ARGS, "--set", "train.images_seen=192", "--set", "train.checkpoint_every=96",
                     "--set", "train.log_every=2", "--out", str(out), "--no-progress"])
    assert code == 0
    assert printed[-1].startswith(f"run finished: {out} (checkpoints/, config.toml, guide/, loss.png, metrics.csv, "
                                  "phema/, samples.png")  # what the folder holds (tensorboard/ when installed)
    return out


def test_train_writes_every_file(run_dir):
    assert tomllib.loads((run_dir / "config.toml").read_text())["data"]["name"] == "digits"
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = ["step", "images_seen", "loss", "lr", "grad_norm", "images_per_s", "nonfinite_skipped"]
    ledger = [f"loss{kind}_t{b:02d}" for kind in ("", "var") for b in range(20)]
    assert list(rows[0]) == columns + ledger + [f"heldout_t{b:02d}" for b in range(20)]
    assert rows[0]["heldout_t00"] == "" and rows[-1]["heldout_t00"] != ""  # held-out grid at the end of the budget
    assert [int(r["step"]) for r in rows] == list(range(2, 13, 2))
    assert int(rows[-1]["images_seen"]) == 192
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000006", "step-00000012"]
    assert {p.name for p in (run_dir / "checkpoints" / "step-00000012").iterdir()} == {
        "model.safetensors", "ema.safetensors", "phema.safetensors", "trainer.pt", "state.json"}
    assert len(list((run_dir / "phema").glob("*.safetensors"))) == 8  # train.phema_snapshots over the budget
    with Image.open(run_dir / "samples.png") as grid:  # a conditional run (digits' labels): one row per class
        assert grid.size[1] >= 10 * 64 and grid.size[0] >= 64  # cells upscaled to ≥ 64 px
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_sample_writes_npz_and_png(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(run_dir), "--n", "5", "--steps", "4", "--solver", "ddim", "--out", str(out)]) == 0
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    assert out.with_suffix(".png").is_file()
    # same seed, same samples; another seed, other samples
    again = tmp_path / "again.npz"
    main(["sample", str(run_dir), "--n", "5", "--steps", "4", "--solver", "ddim", "--out", str(again)])
    assert np.array_equal(np.load(again)["images"], images)
    main(["sample", str(run_dir), "--n", "5", "--steps", "4", "--solver", "ddim", "--seed", "1", "--out", str(again)])
    assert not np.array_equal(np.load(again)["images"], images)


def test_config_prints_every_key(capsys):
    assert main(["config", "--set", "train.batch_size=8"]) == 0
    printed = capsys.readouterr().out
    resolved = tomllib.loads(printed)
    assert resolved["train"]["batch_size"] == 8
    assert len(flatten(resolved)) == len(OPTIONS)


@pytest.mark.parametrize("args,expected", [
    (["train", "--set", "train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["train", "--set", "diffusion.process=vp"], "config key 'diffusion.process' must be one of"),
    (["train", "--set", "data.name=folder:/does/not/exist"], "/does/not/exist"),
    (["train", "--config", "/does/not/exist.toml"], "does not exist"),
    (["sample", "/does/not/exist", "--out", "x.npz"], "not a run folder"),
    (["train", "--resume", "/does/not/exist"], "not a run folder"),
])
def test_bad_input_gives_one_line_and_status_2(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "nothing may be written for bad input"


def test_sample_refuses_non_npz_output(run_dir, capsys):
    assert main(["sample", str(run_dir), "--out", "grid.png"]) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "frugaldiff", "config"], capture_output=True, text=True,
                            check=True)
    assert tomllib.loads(result.stdout)["data"]["name"] == "mnist5000"


def test_plot_timesteps_writes_a_png(tmp_path):
    out = tmp_path / "t.png"
    assert main(["plot-timesteps", "uniform", "near_zero", "--set", "timestep_sampler.near_zero.k=3.0",
                 "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size[0] > 200
    assert main(["plot-timesteps", "nope", "--out", str(out)]) == 2


def test_plot_amplification_writes_a_png_and_refuses_unknown_types(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["plot-amplification", "eps", "acceleration", "--process", "vp-linear", "--process", "flow",
                 "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size[0] > 500
    assert main(["plot-amplification", "score", "--out", str(out)]) == 2
    assert "unknown diffusion.prediction 'score'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["train"], "continue with: frugaldiff train --resume {run}"),
    (["analyze", "prediction-types", "--out", "x"],
     "continue by running the same command again (it reuses finished runs and continues {run})"),
])
def test_an_interrupt_says_how_to_continue(argv, hint, tmp_path, monkeypatch, capsys):
    """Only the train commands have --resume; a study continues when the same command runs again."""
    import signal

    from frugaldiff import cli
    from frugaldiff.trainer import Interrupted
    run = tmp_path / "run"

    def interrupted(args):
        raise Interrupted(signal.SIGTERM, run / "checkpoints" / "step-5.pt")

    monkeypatch.setattr(cli, f"_{argv[0]}", interrupted)
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(hint.format(run=run))
