"""``frugaldiff ema``: post-hoc EMA of a finished run (Karras et al. 2024), from the power-function EMA snapshots
that training keeps in RUN/phema (``train.phema_snapshots``).

:func:`write_posthoc` reconstructs the EMA of one relative width σ_rel at the end of training and writes it as a
checkpoint folder (``RUN/posthoc/sigma-0.100``) that ``sample --checkpoint``, ``report`` and the analyses take;
:func:`posthoc_sweep` scores a range of widths with the run's sampling settings and the dataset's headline metric,
which answers which EMA length a short run wants.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, load_into, write_checkpoint
from .components import SampleSettings, build_data, run_denoiser
from .ema import load_snapshots, reconstruct
from .errors import FrugalError
from .generate import generate, run_guidance, sampling_runtime
from .images import to_uint8
from .metrics import HIGHER_IS_BETTER, Evaluator
from .plots import plot_posthoc_sweep
from .runs import RunFiles, read_run_config


def _snapshots(run_dir: Path) -> list[Any]:
    snapshots = load_snapshots(RunFiles(run_dir).phema)
    if not snapshots:
        raise FrugalError(f"{run_dir} kept no EMA snapshots (RUN/phema); train it with train.phema_snapshots > 0")
    return snapshots


def write_posthoc(run_dir: str | Path, sigma_rel: float, out: Path | None = None) -> Path:
    """The EMA of relative width ``sigma_rel`` at the run's last snapshot, as a checkpoint folder under ``out``
    (default RUN/posthoc): the newest checkpoint's state with this average as its model and EMA weights."""
    run_dir = Path(run_dir)
    snapshots = _snapshots(run_dir)
    weights = reconstruct(snapshots, sigma_rel)
    state = load_checkpoint(latest_checkpoint(run_dir))
    state.pop("phema", None)
    images = max(s.images for s in snapshots)
    state["info"] = {**state["info"], "posthoc": {"sigma_rel": sigma_rel, "images": images,
                                                  "snapshots": len({s.images for s in snapshots})}}
    state["model"] = state["ema"] = weights
    return write_checkpoint((out or run_dir / "posthoc") / f"sigma-{sigma_rel:.3f}", state)


def posthoc_sweep(run_dir: str | Path, sigma_rels: list[float], n: int = 512, out: Path | None = None,
                  steps: int | None = None, solver: str | None = None) -> dict[str, Any]:
    """The headline metric of ``n`` samples (the run's sampling settings and guidance, or ``steps`` and ``solver``)
    of each post-hoc EMA in ``sigma_rels`` and of the run's own EMA; writes sweep.json, sweep.md and sweep.png under
    ``out`` (default RUN/posthoc)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    snapshots, newest = _snapshots(run_dir), latest_checkpoint(run_dir)
    state = load_checkpoint(newest)
    info, settings = state["info"], SampleSettings.from_config(config)
    settings = replace(settings, steps=steps or settings.steps, solver=solver or settings.solver)
    data = build_data(config)
    evaluator = Evaluator(data)
    if evaluator.headline is None:
        raise FrugalError(f"{data.name!r} has no quality metric (images without labels); sweep a labelled dataset")
    denoiser = run_denoiser(config, info).eval()
    runtime = sampling_runtime(config, denoiser, tuple(info["sample_shape"]), n)

    guidance = run_guidance(run_dir, settings, denoiser)  # the same guide for every length: loaded once

    def score(weights: dict[str, Any]) -> float:
        load_into(denoiser, weights, newest)
        x = generate(denoiser, settings, n, tuple(info["sample_shape"]), runtime, guidance=guidance)
        return evaluator(to_uint8(x) if data.kind == "image" else x.numpy())[evaluator.headline]

    result: dict[str, Any] = {"run": str(run_dir), "metric": evaluator.headline, "n": n, "solver": settings.solver,
                              "steps": settings.steps,
                              "higher_is_better": evaluator.headline in HIGHER_IS_BETTER,
                              "train_ema": {"decay": config["train.ema_decay"], "value": score(state["ema"])},
                              "posthoc": []}
    for sigma_rel in tqdm(sigma_rels, desc="post-hoc EMA", unit="length"):
        result["posthoc"].append({"sigma_rel": sigma_rel, "value": score(reconstruct(snapshots, sigma_rel))})
    train_ema = result["train_ema"]
    lines = [f"{result['metric']} of {n} samples per EMA length ({run_dir})", "", f"| EMA | {result['metric']} |",
             "|---|---:|", f"| training EMA (decay {train_ema['decay']}) | {train_ema['value']:.4g} |"]
    lines += [f"| post-hoc σ_rel = {r['sigma_rel']:.3f} | {r['value']:.4g} |" for r in result["posthoc"]]
    result["table"] = "\n".join(lines) + "\n"
    folder = out or run_dir / "posthoc"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "sweep.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(folder / "sweep.md", result["table"])
    plot_posthoc_sweep(result, folder / "sweep.png")
    return result
