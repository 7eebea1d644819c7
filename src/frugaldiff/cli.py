"""Command line: ``frugaldiff train | sample | plot-timesteps | plot-amplification | config``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import FrugalError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugaldiff", description="Diffusion training on limited compute.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: MNIST-5000, a small UNet)")
    train.add_argument("--config", type=Path, help="TOML file with the keys to change")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="change one key, e.g. --set train.batch_size=16 (repeatable)")
    train.add_argument("--out", type=Path, help="run folder to create (default: runs/<timestamp>-<name>)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                       help="continue a run from its newest checkpoint (default: the newest run in runs/)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sample = sub.add_parser("sample", help="generate samples from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--steps", type=int, help="solver steps (default: the run's sample.steps)")
    sample.add_argument("--solver", help="solver (default: the run's sample.solver)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the newest)")
    sample.add_argument("--out", type=Path, required=True, help="output .npz; a PNG is written next to it")

    plot = sub.add_parser("plot-timesteps", help="draw timestep samplers' densities over t (PNG)")
    plot.add_argument("samplers", nargs="*", help="sampler names (default: all)")
    plot.add_argument("--config", type=Path, help="TOML file whose process and sampler parameters to use")
    plot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plot.add_argument("--out", type=Path, required=True, help="output PNG")

    amp = sub.add_parser("plot-amplification", help="draw each prediction type's x0 error amplification A(t) (PNG)")
    amp.add_argument("types", nargs="*", help="prediction types (default: all)")
    amp.add_argument("--process", action="append", dest="processes", help="noise process (repeatable; default: all)")
    amp.add_argument("--sigma-data", type=float, default=0.5)
    amp.add_argument("--out", type=Path, required=True, help="output PNG")

    config = sub.add_parser("config", help="print the fully resolved config with every key")
    config.add_argument("--config", type=Path, help="TOML file to resolve")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .api import train
    from .config import Config
    from .trainer import Interrupted

    if args.resume and (args.config or args.out):
        raise FrugalError("--resume continues a run in place with its own config; drop --config/--out")
    config = None if args.resume else Config.load(args.config, args.overrides)
    try:
        root = train(config, run_dir=args.out, resume=args.resume, overrides=args.overrides if args.resume else (),
                     progress=not args.no_progress)
    except Interrupted as e:
        print(f"frugaldiff: {e}; continue with: frugaldiff train --resume {e.checkpoint.parent.parent}",
              file=sys.stderr)
        return 128 + e.signum
    print(f"run finished: {root} (samples.png, metrics.csv, loss.png, config.toml, checkpoints/)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .generate import sample, save_samples

    if args.out.suffix != ".npz":
        raise FrugalError(f"--out must end in .npz, got {args.out}; e.g. --out samples.npz")
    if args.n < 1 or (args.steps is not None and args.steps < 1):
        raise FrugalError("--n and --steps must be at least 1")
    samples = sample(args.run_dir, n=args.n, steps=args.steps, solver=args.solver, seed=args.seed,
                     checkpoint=args.checkpoint, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    key = "images" if samples.dtype == np.uint8 else "samples"
    np.savez_compressed(args.out, **{key: samples})
    png = args.out.with_suffix(".png")
    save_samples(samples, png)
    print(f"wrote {args.out} ({key} {samples.dtype} {list(samples.shape)}) and {png}")
    return 0


def _plot_timesteps(args: argparse.Namespace) -> int:
    from .config import Config
    from .plots import plot_timestep_densities
    from .timestep_samplers import TIMESTEP_SAMPLERS

    config = Config.load(args.config, args.overrides)
    names = args.samplers or TIMESTEP_SAMPLERS.names()
    for name in names:
        TIMESTEP_SAMPLERS.get(name)  # one-line error for an unknown name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_timestep_densities(names, config["diffusion.process"], args.out, params=config.timestep_sampler_params())
    print(f"wrote {args.out}")
    return 0


def _plot_amplification(args: argparse.Namespace) -> int:
    from .noise import PROCESSES
    from .plots import plot_amplification
    from .prediction import LINEAR_TYPES, PREDICTIONS

    types = args.types or LINEAR_TYPES
    processes = args.processes or PROCESSES.names()
    for name in types:
        PREDICTIONS.get(name)  # one-line errors for unknown names
        if name not in LINEAR_TYPES:
            raise FrugalError(f"{name!r} has no single A(t); plot the types it mixes, e.g. --types "
                              f"{' '.join(LINEAR_TYPES)}")
    for name in processes:
        PROCESSES.get(name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_amplification(types, processes, args.out, args.sigma_data)
    print(f"wrote {args.out}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from .config import Config

    print(Config.load(args.config, args.overrides).to_toml(comments=True), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "sample": _sample, "plot-timesteps": _plot_timesteps,
                    "plot-amplification": _plot_amplification, "config": _config}
        return commands[args.command](args)
    except FrugalError as e:
        print(f"frugaldiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
