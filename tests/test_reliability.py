"""Hostile input: one line and status 2 instead of a traceback, damaged checkpoints skipped, locked run folders,
no dead ends, nothing already written changed or lost."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import TINY_UNET

from frugaldiff import checkpoint as checkpoint_module
from frugaldiff.checkpoint import clean_stale, damage, latest_checkpoint, list_checkpoints
from frugaldiff.cli import main
from frugaldiff.config import OPTIONS, Config
from frugaldiff.errors import FrugalError
from frugaldiff.prediction import LinearPrediction
from frugaldiff.trainer import Trainer

TINY_ARGS = [arg for key, value in TINY_UNET.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
SMALL = {**TINY_UNET, "train.checkpoint_every": 32, "train.images_seen": 96, "train.tensorboard": False,
         "train.heldout_every": 0, "sample.n": 4, "sample.steps": 2}
SMALL_ARGS = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys, code: int, expected: str = "") -> str:
    """The command exited with status 2 and printed exactly one line (the error) to stderr, without a traceback."""
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("frugaldiff: error: "), err[-2000:]
    assert expected in err and "internal error" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with three checkpoints (steps 2, 4 and 6)."""
    out = tmp_path_factory.mktemp("reliable") / "run"
    assert main(["train", *SMALL_ARGS, "--out", str(out), "--no-progress"]) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004",
                                                                      "step-00000006"]
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# ---- the fuzz test ------------------------------------------------------------------------------------------

def _bad_values(rng: random.Random) -> list[str]:
    """TOML literals a hostile user might give any key."""
    return ['""', '"' + "x" * rng.randint(300, 6000) + '"', "-1", str(2**rng.randint(31, 80)), "-1e308", "nan",
            "inf", "true", "[]", "[[1], [2]]", "[" * 300 + "]" * 300, "{a = 1}", '"../../etc"', '"\\u00e9\\u4e2d"',
            str(rng.uniform(-1e6, 1e6)), str(rng.randint(-10**12, 10**12)), '["x0", "velocity", "nope"]',
            '"folder:' + "y" * 5000 + '"', '"npz:/dev/null"']


def test_fuzzed_config_values_and_files_never_give_a_traceback(tmp_path, capsys):
    rng = random.Random(0)
    values = _bad_values(rng)
    cases = [["config", "--set", f"{rng.choice(OPTIONS).key}={rng.choice(values)}"] for _ in range(300)]
    for i, raw in enumerate([os.urandom(64), b"\xff\xfe" + "a = 1".encode("utf-16-le"), "é = 'ü'".encode("latin-1"),
                             b"[a]\n" * 3, b"a = [" * 2000, ("[" + ".".join(["k"] * 3000) + "]\nx = 1").encode(),
                             b"train = 5", b"[train]\nseed = 99999999999999999999", b"\x00" * 100]):
        path = tmp_path / f"bad{i}.toml"
        path.write_bytes(raw)
        cases.append(["config", "--config", str(path)])
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases += [["config", "--config", str(loop)], ["config", "--config", str(tmp_path)], ["config", "--config", ""]]
    for argv in cases:
        code = main(argv)
        captured = capsys.readouterr()
        assert code in (0, 2), argv
        assert "Traceback" not in captured.err and "internal error" not in captured.err, (argv, captured.err)
        if code:
            assert captured.err.count("\n") == 1, (argv, captured.err)


def _npy(array: np.ndarray) -> bytes:
    path = Path(os.environ["FRUGALDIFF_CACHE"]).parent / "tmp.npy"
    np.save(path, array)
    return path.read_bytes()


def test_fuzzed_eval_files_never_give_a_traceback(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = _npy(rng.integers(0, 256, (20, 8, 8), dtype=np.uint8))
    files = {"truncated.npy": good[: len(good) // 2], "header.npy": good[:70], "noise.npy": os.urandom(300),
             "flipped.npy": good[:60] + bytes([good[60] ^ 0xFF]) + good[61:], "object.npy": b"",
             "text.npz": b"PK not a zip", "empty.npy": b""}
    np.save(tmp_path / "object.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    files["object.npy"] = (tmp_path / "object.npy").read_bytes()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 8)})
    files["huge.npy"] = header.getvalue()  # declares 3 TB in a few bytes
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "noarray.npz", "w") as z:
        z.writestr("notes.txt", "no array here")
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", _npy(np.zeros((10**5, 10**4), np.uint8))[:128] + b"\0" * (20 << 20))
    np.savez(tmp_path / "vectors.npz", samples=np.full((20, 2), np.nan, np.float32))
    np.savez(tmp_path / "layout.npz", samples=np.zeros((20, 5, 5, 5, 5), np.float32))
    for path in sorted(tmp_path.iterdir()):
        for dataset in ("moons", "digits"):
            code = main(["eval", str(path), "--dataset", dataset])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (path.name, err)
            assert "internal error" not in err, (path.name, err)


# ---- damaged checkpoints --------------------------------------------------------------------------------------

DAMAGES = {
    "truncated weights": lambda c: (c / "ema.safetensors").write_bytes((c / "ema.safetensors").read_bytes()[:100]),
    "empty weights": lambda c: (c / "ema.safetensors").write_bytes(b""),
    "truncated trainer.pt": lambda c: (c / "trainer.pt").write_bytes((c / "trainer.pt").read_bytes()[:500]),
    "bad state.json": lambda c: (c / "state.json").write_text("{not json"),
    "empty folder": lambda c: [p.unlink() for p in c.iterdir()],
    "flipped byte": lambda c: _flip(c / "ema.safetensors"),
}


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # inside the last tensor: safetensors itself cannot tell
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning_line(copy, kind, tmp_path, capsys):
    newest = copy / "checkpoints" / "step-00000006"
    DAMAGES[kind](newest)
    assert damage(newest) is not None and damage(copy / "checkpoints" / "step-00000004") is None
    out = tmp_path / "s.npz"
    assert main(["sample", str(copy), "--n", "4", "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("frugaldiff: warning:") == 1 and "skipped damaged checkpoint step-00000006" in err, err
    assert main(["report", str(copy), "--n", "2", "--steps", "2", "--out", str(tmp_path / "r.html")]) == 0
    assert "step-00000006" in capsys.readouterr().err
    before = _files(copy / "checkpoints" / "step-00000004")
    assert main(["train", "--resume", str(copy), "--set", "train.images_seen=128", "--no-progress"]) == 0
    assert "skipped damaged checkpoint step-00000006" in capsys.readouterr().err
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert "damaged-step-00000006" in names and "step-00000008" in names  # kept aside, out of every listing
    assert _files(copy / "checkpoints" / "step-00000004") == before  # the checkpoint it resumed from is unchanged


def test_a_flipped_byte_is_caught_by_the_digest(copy):
    checkpoint = latest_checkpoint(copy)
    assert set(json.loads((checkpoint / "state.json").read_text())["files"]) == {
        "model.safetensors", "ema.safetensors", "phema.safetensors", "trainer.pt"}
    _flip(checkpoint / "model.safetensors")
    assert damage(checkpoint) == "model.safetensors does not match its digest in state.json"


def test_every_checkpoint_loads_without_running_code_and_a_pickle_bomb_is_refused(copy, tmp_path):
    old = Path(__file__).with_name("data") / "learned-weighting-v1" / "checkpoints" / "step-00000005"
    for checkpoint in [*list_checkpoints(copy / "checkpoints"), old]:
        torch.load(checkpoint / "trainer.pt", weights_only=True)  # raises on anything but tensors and plain values
    marker = tmp_path / "ran"

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    newest = latest_checkpoint(copy)
    (newest / "trainer.pt").write_bytes(pickle.dumps({"optimizer": Bomb()}))
    assert damage(newest) == "trainer.pt does not match its digest in state.json"
    info = json.loads((newest / "state.json").read_text())  # a sender can make the digests match, too
    info["files"]["trainer.pt"] = checkpoint_module._digest(newest / "trainer.pt")
    (newest / "state.json").write_text(json.dumps(info))
    assert damage(newest) == "UnpicklingError while reading it"
    assert latest_checkpoint(copy).name == "step-00000004"
    assert main(["sample", str(copy), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.npz")]) == 0
    assert not marker.exists()


def test_a_checkpoint_replaced_at_the_same_step_stays_whole(copy):
    folder = copy / "checkpoints"
    newest = latest_checkpoint(copy)
    state = checkpoint_module.load_checkpoint(newest)
    checkpoint_module.save_checkpoint(folder, 6, state, keep=3)
    assert damage(newest) is None and not any(p.name.startswith(".") for p in folder.iterdir())
    os.rename(newest, folder / ".old-step-00000006-123")  # killed between the two renames of a replacement
    clean_stale(folder)
    assert damage(newest) is None


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(copy, capsys, monkeypatch):
    before = _files(copy / "checkpoints")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.torch, "save", full)
        code = main(["train", "--resume", str(copy), "--set", "train.images_seen=128", "--no-progress"])
    err = _one_line(capsys, code, "the disk is full")
    assert "the previous checkpoints are intact" in err and "--resume" in err
    assert _files(copy / "checkpoints") == before
    assert main(["train", "--resume", str(copy), "--set", "train.images_seen=128", "--no-progress"]) == 0
    assert latest_checkpoint(copy).name == "step-00000008"


# ---- locks, dead ends, resumed settings -----------------------------------------------------------------------

def test_a_second_trainer_on_a_folder_is_refused_with_the_holders_pid(copy):
    config = Config.load(copy / "config.toml")
    first = Trainer(config, copy, resume=True, progress=False)
    with pytest.raises(FrugalError, match=f"being trained by process {os.getpid()}"):
        Trainer(config, copy, resume=True, progress=False)
    first.fit()  # releases the lock at its end
    Trainer(config, copy, resume=True, progress=False)


SLOW = textwrap.dedent("""
    import sys, time
    import frugaldiff.checkpoint as ck
    from frugaldiff.cli import main
    real = ck.torch.save
    def slow(obj, path):
        if sys.argv[2] == "hang":
            print("WRITING", flush=True)
            time.sleep(600)
        real(obj, path)
        print("SAVED", flush=True)
        time.sleep(600 if sys.argv[2] == "after" else 0)
    ck.torch.save = slow
    sys.exit(main(["train", "--out", sys.argv[1], "--no-progress", *sys.argv[3:]]))
""")


def _start(run: Path, mode: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", SLOW, str(run), mode, *SMALL_ARGS], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert process.stdout.readline().strip() in (b"WRITING", b"SAVED")
    return process


def test_two_processes_on_one_folder_one_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    process = _start(run, "after")  # a trainer that saved its first checkpoint and keeps the folder locked
    try:
        code = main(["train", "--resume", str(run), "--no-progress"])
        _one_line(capsys, code, f"being trained by process {process.pid}")
        code = main(["train", *SMALL_ARGS, "--out", str(run), "--no-progress"])
        _one_line(capsys, code, f"being trained by process {process.pid}")
    finally:
        process.kill()
        process.wait()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # the lock died with the process


def test_a_run_killed_during_its_first_checkpoint_resumes_from_scratch_or_is_reused(tmp_path, capsys):
    run = tmp_path / "run"
    process = _start(run, "hang")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list_checkpoints(run / "checkpoints")
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    reused = tmp_path / "reused"
    shutil.copytree(run, reused)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "training it from step 0" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step-00000006"
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # the stale write is gone
    assert main(["train", *SMALL_ARGS, "--out", str(reused), "--no-progress"]) == 0
    assert "never completed a checkpoint" in capsys.readouterr().err
    assert latest_checkpoint(reused).name == "step-00000006"


def test_a_resumed_run_refuses_a_change_of_what_its_checkpoints_hold(copy, capsys):
    before = _files(copy)
    code = main(["train", "--resume", str(copy), "--set", "diffusion.weighting=learned"])
    _one_line(capsys, code, "a resumed run keeps diffusion.weighting ('none', asked 'learned')")
    assert _files(copy) == before


@pytest.mark.parametrize("content", [b"garbage\x00\xff", b"step,images_seen\n1,x\n", b"a,b,c\n1,2,3\n",
                                     b"step,images_seen,loss\n1,16,0.5,7\n", os.urandom(200)])
def test_a_damaged_metrics_csv_gives_a_report_with_a_note_and_one_line_elsewhere(copy, content, tmp_path, capsys):
    (copy / "metrics.csv").write_bytes(content)
    assert main(["report", str(copy), "--n", "2", "--steps", "2", "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "metrics.csv" in page and ("damaged" in page or "not a metrics.csv" in page or "cannot read" in page)
    _one_line(capsys, main(["analyze", "ledger", str(copy)]), "metrics.csv")


# ---- data ----------------------------------------------------------------------------------------------------

def test_vectors_are_checked_and_one_dimensional_ones_train_and_sample(tmp_path, capsys):
    for name, values, expected in (("nan", np.full((50, 2), np.nan), "NaN or infinite"),
                                   ("huge", np.full((50, 2), 1e30), "standardise")):
        np.savez(tmp_path / f"{name}.npz", x=values.astype(np.float32))
        _one_line(capsys, main(["train", "--set", f"data.name=npz:{tmp_path / name}.npz", "--out",
                                str(tmp_path / name)]), expected)
        assert not (tmp_path / name).exists()
    np.savez(tmp_path / "one.npz", x=np.random.default_rng(0).normal(size=(200, 1)).astype(np.float32))
    assert main(["train", "--set", f"data.name=npz:{tmp_path / 'one.npz'}", "--set", "train.images_seen=128",
                 "--set", "sample.n=8", "--set", "sample.steps=2", "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0
    assert (tmp_path / "one" / "samples.png").is_file()


def test_a_run_whose_every_step_is_non_finite_ends_in_one_line(tmp_path, capsys, monkeypatch):
    real = LinearPrediction.error
    monkeypatch.setattr(LinearPrediction, "error", lambda *a: real(*a) * float("nan"))
    code = main(["train", *TINY_ARGS, "--set", "train.images_seen=64", "--out", str(tmp_path / "r"), "--no-progress"])
    _one_line(capsys, code, "all 4 steps gave non-finite losses")


def test_an_unexpected_error_is_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("frugaldiff.cli.render_report", lambda *a: 1 / 0)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (ZeroDivisionError" in err and "FRUGALDIFF_DEBUG=1" in err
    monkeypatch.setenv("FRUGALDIFF_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["report", str(tmp_path)])
