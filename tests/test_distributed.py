"""torchrun on CPU: 2 gloo processes against 1 process (issue: scale out with torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugaldiff.config import Config, parse_override
from frugaldiff.distributed import World, rank_share
from frugaldiff.errors import FrugalError
from frugaldiff.trainer import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")
TOY = ["data.name=8gaussians", "data.num_samples=512", "model.hidden=32", "model.depth=2", "train.batch_size=16",
       "train.images_seen=160", "train.warmup_images=0", "train.lr=1e-2", "train.ema_decay=0.9",
       "train.device=cpu", "train.precision=fp32", "train.log_every=1", "train.seed=3"]


def _torchrun(args: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _two_ranks(tmp_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    _torchrun([str(WORKER), str(tmp_path), *TOY, *overrides])
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def _assert_equal_states(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].is_floating_point() and not exact:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_equal_states(a[k], b[k], exact)
        else:
            assert a[k] == b[k], k


def test_rank_share_splits_in_rank_order():
    x = torch.arange(12)
    assert torch.equal(torch.cat([rank_share(x, r, 3) for r in range(3)]), x)
    assert torch.equal(World(1, 2).share(x), torch.arange(6, 12))


def test_ranks_stay_identical_and_stratification_spans_ranks_and_micro_steps(tmp_path):
    # stratified t, 2 micro-steps on each of 2 ranks (4 samples per micro-batch), a learned weighting and a
    # mixed prediction whose gate is trained: every parameter must agree bit for bit on both ranks
    rank0, rank1 = _two_ranks(tmp_path, ["diffusion.timestep_sampler=stratified", "train.grad_accum=2",
                                         "diffusion.weighting=learned", "diffusion.prediction=mixed",
                                         "diffusion.mixed.types=[\"x0\", \"velocity\"]"])
    assert rank0["step"] == rank1["step"] == 10
    for part in ("model", "ema", "sampler"):
        _assert_equal_states(rank0[part], rank1[part])
    assert any("gate" in k for k in rank0["model"]) and any(k.startswith("uncertainty.") for k in rank0["model"])
    for step in range(10):  # the 16 draws of one optimizer step fill the 16 strata exactly once
        t = torch.cat([t for s, t, _ in rank0["drawn"] + rank1["drawn"] if s == step]).double()
        assert len(t) == 16
        assert sorted((t * 16).floor().long().tolist()) == list(range(16))
    # the two ranks see different data
    assert not torch.equal(rank0["drawn"][0][2], rank1["drawn"][0][2])


def test_two_processes_match_one_and_the_checkpoint_resumes_on_one(tmp_path):
    adaptive = ["diffusion.timestep_sampler=adaptive", "timestep_sampler.adaptive.stratify=false",
                "timestep_sampler.adaptive.warmup=1", "diffusion.weighting=learned"]
    rank0, rank1 = _two_ranks(tmp_path / "two", adaptive)
    _assert_equal_states(rank0["sampler"], rank1["sampler"])
    _assert_equal_states(rank0["model"], rank1["model"])

    config = Config(dict(parse_override(o) for o in [*TOY, *adaptive]))
    one = Trainer(config, tmp_path / "one", progress=False)
    one.fit()
    # the same global batches, times and noise: equal up to the order of float sums in the gradient average
    _assert_equal_states(rank0["model"], one.state.denoiser.state_dict(), exact=False)
    _assert_equal_states(rank0["sampler"], one.state.sampler.state_dict(), exact=False)

    # the 2-process checkpoint continues on 1 process exactly like the 1-process run continues
    longer = ["train.images_seen=320"]
    resumed = Trainer(config.updated(dict(parse_override(o) for o in longer)), tmp_path / "two" / "run", resume=True,
                      progress=False)
    resumed.fit()
    reference = Trainer(config.updated(dict(parse_override(o) for o in longer)), tmp_path / "one", resume=True,
                        progress=False)
    reference.fit()
    assert resumed.state.step == reference.state.step == 20
    _assert_equal_states(resumed.state.denoiser.state_dict(), reference.state.denoiser.state_dict(), exact=False)


def test_the_policy_sampler_and_the_analytic_gate_learn_the_same_on_every_rank(tmp_path):
    """kim's probes are averaged over ranks and the measured gate's errors are buffers DDP broadcasts from rank 0,
    so both stay identical on every rank."""
    rank0, rank1 = _two_ranks(tmp_path, ["diffusion.timestep_sampler=kim", "timestep_sampler.kim.every=2",
                                         "diffusion.prediction=mixed", 'diffusion.mixed.types=["x0","velocity"]',
                                         "diffusion.mixed.gate=analytic"])
    _assert_equal_states(rank0["sampler"], rank1["sampler"])
    _assert_equal_states(rank0["model"], rank1["model"])
    assert rank0["sampler"]["draws"] == 10 and rank0["sampler"]["policy"] is not None
    assert int(rank0["model"]["prediction.head_counts"].sum()) > 0


def test_torchrun_cli_writes_one_run_from_rank_zero(tmp_path):
    out = tmp_path / "run"
    _torchrun(["-m", "frugaldiff", "train", "--no-progress", "--out", str(out),
               *[a for o in [*TOY, "sample.n=64", "sample.steps=5"] for a in ("--set", o)]])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,images_seen") and len(rows) == 1 + 10  # one row per step, written once
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 11)]
    assert (out / "samples.png").is_file() and (out / "config.toml").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000010"]


def test_torchrun_trains_a_latent_run(tmp_path):
    """Every rank encodes (or reads the cached) latents; rank 0 writes a run whose samples are decoded images."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8).save_pretrained(str(tmp_path / "vae"))
    out = tmp_path / "run"
    latent = ["data.name=digits", f"data.autoencoder='{tmp_path / 'vae'}'", "model.channels=8",
              "model.channel_mult=[1]", "model.attention_resolutions=[]", "train.batch_size=16", "train.images_seen=64",
              "train.device=cpu", "sample.n=8", "sample.steps=3"]
    _torchrun(["-m", "frugaldiff", "train", "--no-progress", "--out", str(out),
               *[a for o in latent for a in ("--set", o)]])
    assert (out / "samples.png").is_file()
    info = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert info["sample_shape"] == [4, 4, 4] and "latent_factors" in info


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("frugaldiff.trainer.init_distributed", lambda device: (World(0, 3), "cpu"))
    config = Config(dict(parse_override(o) for o in TOY))
    with pytest.raises(FrugalError, match=r"train.batch_size \(16\) must be divisible by train.grad_accum × "
                                          r"processes \(1 × 3\)"):
        Trainer(config, tmp_path / "run", progress=False)
