"""Behaviour fingerprints: the final EMA weights of short CPU runs on digits, recorded before a redesign.

``python tests/fingerprints.py --record`` trains every case and writes ``tests/data/fingerprints.json``: per case
a SHA-256 digest of the EMA tensors (exact) and, per tensor, its sum, root mean square and a fixed pseudo-random
projection (compact, for machines whose kernels round differently). ``tests/test_fingerprints.py`` trains the
same cases and compares: bit for bit on a machine like the recording one (same torch and CPU kernel family),
within a small tolerance elsewhere. Runs go through the public API only (``frugaldiff.train``), so the cases stay
the same whatever the code behind it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import frugaldiff
from frugaldiff.checkpoint import latest_checkpoint

RECORD = Path(__file__).with_name("data") / "fingerprints.json"
FP32 = {"data.name": "digits", "train.device": "cpu", "train.precision": "fp32", "sample.n": 4, "sample.steps": 2,
        "train.tensorboard": False, "model.num_classes": 0}  # unconditional, as every run was when they were recorded
TINY = {**FP32, "model.channels": 8, "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
        "model.attention_resolutions": [4], "train.batch_size": 16, "train.warmup_images": 64}
#: name -> config of a single-process run
CASES: dict[str, dict[str, Any]] = {
    "default": {**FP32, "train.batch_size": 64, "train.images_seen": 640},  # the default batch when recorded
    "x0-vp-linear-adaptive": {**TINY, "diffusion.process": "vp-linear", "diffusion.prediction": "x0",
                              "diffusion.timestep_sampler": "adaptive", "train.images_seen": 16 * 24},
    "mixed-heads": {**TINY, "diffusion.process": "vp-linear", "diffusion.prediction": "mixed",
                    "diffusion.mixed.strategy": "heads", "train.images_seen": 16 * 16},
    "learned-weighting": {**TINY, "diffusion.weighting": "learned", "train.images_seen": 16 * 16},
    "stable-target-subset": {**TINY, "diffusion.reference_images": 32, "train.images_seen": 16 * 16},
    "dropout-cosine": {**TINY, "model.dropout": 0.1, "train.images_seen": 16 * 24, "train.checkpoint_every": 64},
}
#: the case that is also stopped by SIGINT at this optimizer step and resumed: it must end as the whole run
INTERRUPTED = ("dropout-cosine", 11)
#: the default recipe (stratified logit-normal t, stable target) on the tiny network, for 2 gloo processes under
#: torchrun against 1 process and against 2 micro-steps: the same run up to float rounding
DDP = {**TINY, "train.images_seen": 16 * 12}


def machine_key() -> str:
    """What decides the rounding of float kernels: torch's version and the CPU kernel family it dispatches to."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    amx = "amx" if "amx_bf16" in flags else "no-amx"
    return f"torch {torch.__version__} | {platform.machine()} {torch.backends.cpu.get_cpu_capability()} {amx}"


def _projection(x: torch.Tensor) -> float:
    """<x, r> for a fixed pseudo-random r of x's size (seeded by the size, so the same tensor gives the same r)."""
    r = torch.randn(x.numel(), generator=torch.Generator().manual_seed(x.numel()), dtype=torch.float64)
    return float(x.double().flatten() @ r)


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SHA-256 of every tensor (sorted by name) and per tensor [sum, rms, projection]."""
    digest = hashlib.sha256()
    stats = {}
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
        x = value.double()
        stats[key] = [float(x.sum()), float(x.pow(2).mean().sqrt()), _projection(x)]
    return {"sha256": digest.hexdigest(), "tensors": stats}


def ema_of(run: Path) -> dict[str, torch.Tensor]:
    """The EMA of the network and its prediction type (a learned weighting's uncertainty joined the EMA file when
    it moved into the denoiser; it was not recorded before)."""
    state = load_file(str(latest_checkpoint(run) / "ema.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("uncertainty.")}


def run_case(name: str, out: Path) -> dict[str, Any]:
    return run_config(CASES[name], out / name)


def run_config(config: dict[str, Any], run: Path) -> dict[str, Any]:
    return fingerprint(ema_of(frugaldiff.train(config, run_dir=run, progress=False)))


def run_interrupted(out: Path) -> dict[str, Any]:
    """The INTERRUPTED case stopped by SIGINT right after optimizer step k, then resumed to its end."""
    name, k = INTERRUPTED
    calls = []
    real_step = torch.optim.AdamW.step

    def step_then_signal(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    run = out / f"{name}-interrupted"
    torch.optim.AdamW.step = step_then_signal
    try:
        frugaldiff.train(CASES[name], run_dir=run, progress=False)
        raise AssertionError("the run was not interrupted")
    except Exception as e:  # the trainer's Interrupted, wherever it lives
        if type(e).__name__ != "Interrupted":
            raise
    finally:
        torch.optim.AdamW.step = real_step
    assert latest_checkpoint(run).name == f"step-{k:08d}"
    frugaldiff.train(resume=run, progress=False)
    return fingerprint(ema_of(run))


DDP_WORKER = """
import sys
import frugaldiff
from frugaldiff.config import parse_override
frugaldiff.train(dict(parse_override(o) for o in sys.argv[2:]), run_dir=sys.argv[1], progress=False)
"""


def run_ddp(out: Path, nproc: int = 2) -> dict[str, Any]:
    """The DDP config trained by ``nproc`` gloo processes under torchrun."""
    run = out / f"ddp-{nproc}"
    script = out / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    sets = [f"{k}={json.dumps(v)}" for k, v in DDP.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(script), str(run), *sets],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return fingerprint(ema_of(run))


def record(out: Path) -> dict[str, Any]:
    prints = {name: run_case(name, out) for name in CASES}
    prints["interrupted"] = run_interrupted(out)
    return {"machine": machine_key(), "threads": torch.get_num_threads(), "cases": prints}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"write {RECORD}")
    parser.add_argument("--out", type=Path, default=Path("/tmp/frugaldiff-fingerprints"), help="scratch folder")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    result = record(args.out)
    text = json.dumps(result, indent=1) + "\n"
    if args.record:
        RECORD.write_text(text)
        print(f"wrote {RECORD}")
    else:
        print(json.dumps({k: v["sha256"] for k, v in result["cases"].items()}, indent=1))


if __name__ == "__main__":
    main()
