"""Command line: ``frugaldiff train | train-autoencoder | sample | ema | eval | analyze | report | config`` and the
plots."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .analysis import disruption, run_importance
from .api import train, train_autoencoder
from .components import resolved_recipe
from .config import Config, parse_override
from .errors import FrugalError, short_repr
from .generate import sample_run, save_samples
from .metrics import evaluate
from .noise import PROCESSES
from .plots import plot_amplification, plot_ledger, plot_timestep_densities
from .posthoc import posthoc_sweep, write_posthoc
from .prediction import GATES, LINEAR_TYPES, PREDICTIONS
from .report import render_report
from .runs import RunFiles
from .studies import STUDY_DEFAULTS, STUDY_PROCESS, batch_sweep, prediction_study
from .timestep_samplers import TIMESTEP_SAMPLERS
from .trainer import Interrupted


def _grid_options(parser: argparse.ArgumentParser, per_bin: int) -> None:
    """--bins and --per-bin of the held-out grid an analysis measures on."""
    parser.add_argument("--bins", type=int, default=10, help="equal-width bins of t")
    parser.add_argument("--per-bin", type=int, default=per_bin, help="held-out (sample, t, noise) draws per bin")


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

    tae = sub.add_parser("train-autoencoder", help="train a small diffusers AutoencoderKL on the data.* images; "
                         "writes RUN/autoencoder, the folder data.autoencoder takes (latent diffusion)")
    tae.add_argument("--config", type=Path, help="TOML file with the keys to change (autoencoder.*, data.*)")
    tae.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change one key, e.g. --set autoencoder.factor=4 (repeatable)")
    tae.add_argument("--out", type=Path, help="run folder to create (default: runs/<timestamp>-<data>-autoencoder)")
    tae.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an autoencoder run from its newest "
                     "checkpoint")
    tae.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sample = sub.add_parser("sample", help="generate samples from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--steps", type=int, help="solver steps (default: the run's sample.steps)")
    sample.add_argument("--solver", help="solver (default: the run's sample.solver)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the newest intact one)")
    sample.add_argument("--class", dest="which", type=_class_choice, metavar="K|all",
                        help="a class of a conditional run, or all: --n samples of each, one grid row per class "
                             "(default: --n in the proportions of the run's training classes, as the data it imitates)")
    sample.add_argument("--guidance", type=float, help="guidance weight w (default: the run's sample.guidance)")
    sample.add_argument("--classes", dest="which", type=_class_choice, metavar="all", help="the same as --class")
    sample.add_argument("--guide-checkpoint", type=Path,
                        help="autoguidance with this weaker checkpoint (of the run or another run)")
    sample.add_argument("--out", type=Path, required=True, help="output .npz; a PNG is written next to it")

    ema = sub.add_parser("ema", help="post-hoc EMA: reconstruct the EMA of any length from a run's snapshots "
                         "(a checkpoint sample, eval and report take), or score a range of lengths")
    ema.add_argument("run_dir", type=Path)
    ema.add_argument("--sigma-rel", type=float, nargs="+", default=[0.1],
                     help="relative EMA widths to reconstruct (EDM2: 0.05 short to 0.2 long)")
    ema.add_argument("--sweep", action="store_true", help="score each --sigma-rel with the domain metric (table + PNG)")
    ema.add_argument("--n", type=int, default=512, help="samples scored per length (--sweep)")
    ema.add_argument("--steps", type=int, help="solver steps of the scored samples (default: the run's sample.steps)")
    ema.add_argument("--solver", help="solver of the scored samples (default: the run's sample.solver)")
    ema.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/posthoc)")

    plot = sub.add_parser("plot-timesteps", help="draw timestep samplers' densities over t (PNG)")
    plot.add_argument("samplers", nargs="*", help="sampler names (default: all)")
    plot.add_argument("--config", type=Path, help="TOML file whose process and sampler parameters to use "
                      "(\"auto\" ones resolved for its data.*)")
    plot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plot.add_argument("--out", type=Path, required=True, help="output PNG")

    amp = sub.add_parser("plot-amplification", help="draw each prediction type's x0 error amplification A(t) (PNG)")
    amp.add_argument("types", nargs="*", help="prediction types (default: all)")
    amp.add_argument("--process", action="append", dest="processes", help="noise process (repeatable; default: all)")
    amp.add_argument("--sigma-data", type=float, default=0.5)
    amp.add_argument("--out", type=Path, required=True, help="output PNG")

    ev = sub.add_parser("eval", help="sample-quality metrics of samples against a dataset (offline)")
    ev.add_argument("samples", type=Path, help=".npz or .npy of images or vectors, e.g. from frugaldiff sample")
    ev.add_argument("--dataset", required=True, help="the data the samples imitate, e.g. mnist5000")
    ev.add_argument("--ref", choices=["heldout", "train"], default="heldout", help="reference split")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="data.* keys the run was trained with, e.g. --set data.seed=1")
    ev.add_argument("--inception-weights", type=Path, help="torch-fidelity's Inception-v3 weights: adds inception_fid")
    ev.add_argument("--json", action="store_true", help="print one JSON line")

    analyze = sub.add_parser("analyze", help="diagnostics that train or measure models").add_subparsers(
        dest="analysis", required=True)
    study = analyze.add_parser("prediction-types", help="train one model per prediction type and per mixed "
                               "strategy at equal budget; x0 error per t bin and gate weights (table + PNGs)")
    study.add_argument("--dataset", default="gmm", help="dataset (default: gmm; e.g. mnist5000)")
    study.add_argument("--types", nargs="+", default=["x0", "velocity", "acceleration"], help="single types")
    study.add_argument("--strategies", nargs="*", default=["joint", "heads", "heads+joint"],
                       help="mixed strategies to train (default: all three; none: no mixture)")
    study.add_argument("--gates", nargs="+", default=["timestep"], choices=list(GATES),
                       help="gates of the mixtures (default: timestep): each strategy is trained with each")
    study.add_argument("--blend", nargs="*", metavar="TYPE",
                       help="also train the single-head blend (diffusion.prediction = blend): of these two types "
                       "(diffusion.blend.types; none given: the config's)")
    study.add_argument("--blend-weights", type=float, nargs="+", metavar="W",
                       help="the blend's share of its second type per t bin (diffusion.blend.weights; default: the "
                       "config's); the table prints the shares the study's own errors call for")
    study.add_argument("--blend-set", dest="blend_overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="change a key of the blend alone, e.g. --blend-set diffusion.weighting=type_loss")
    study.add_argument("--seeds", type=int, nargs="+", help="training seeds per model (default: the config's)")
    study.add_argument("--samples", type=int, default=0,
                       help="score this many EMA samples of every run with the data's headline metric (0: none)")
    _grid_options(study, per_bin=512)
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="change a key of every model, e.g. --set train.images_seen=50000")
    study.add_argument("--out", type=Path, required=True, help="study folder (rerun to reuse finished runs)")
    study.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    dis = analyze.add_parser("disruption", help="from a run's newest checkpoint, k steps on t in one bin: relative "
                             "change of the held-out loss in every bin (JSON + heat maps)")
    dis.add_argument("run_dir", type=Path)
    _grid_options(dis, per_bin=256)
    dis.add_argument("--steps", type=int, nargs="+", default=[1, 10], help="optimizer steps per trial")
    dis.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64])
    dis.add_argument("--seed", type=int, default=0, help="seed of the batches, noise and t of every trial")
    dis.add_argument("--lr", type=float, help="learning rate (default: the run's at its newest checkpoint)")
    dis.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/analysis/disruption)")
    dis.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ledger = analyze.add_parser("ledger", help="heat map (t bin × images seen) and per-bin curves of the training "
                                "and held-out loss a run logged in metrics.csv (PNGs)")
    ledger.add_argument("run_dir", type=Path)
    ledger.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/analysis/ledger)")

    imp = analyze.add_parser("importance", help="degrade x̂0 only while the solver is in one t bin: cost in "
                             "sample quality per bin (JSON + bar chart)")
    imp.add_argument("run_dir", type=Path)
    imp.add_argument("--bins", type=int, default=10, help="equal-width bins of t")
    imp.add_argument("--degrade", choices=["noise", "checkpoint"], default="noise",
                     help="noise: x̂0 + error·z; checkpoint: the oldest kept checkpoint's EMA x̂0")
    imp.add_argument("--error", type=float, default=0.1, help="standard deviation of the added x̂0 error")
    imp.add_argument("--n", type=int, default=256, help="samples per trial")
    imp.add_argument("--steps", type=int, help="solver steps (default: the run's sample.steps)")
    imp.add_argument("--solver", help="solver (default: the run's sample.solver)")
    imp.add_argument("--seed", type=int, help="generation seed (default: the run's sample.seed)")
    imp.add_argument("--metric", choices=["auto", "displacement", "loglik", "fid"], default="auto",
                     help="score besides sample displacement: auto (loglik on gmm), loglik, fid (labelled images)")
    imp.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/analysis/importance)")
    imp.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sweep = analyze.add_parser("batch-sweep", help="the same budget in images at several batch sizes: final "
                               "metric and held-out loss per t bin (table + PNG)")
    sweep.add_argument("--config", type=Path, help="TOML file of the recipe (default: the default config)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="change a key of every run, e.g. --set train.images_seen=20000")
    sweep.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 64])
    _grid_options(sweep, per_bin=256)
    sweep.add_argument("--samples", type=int, default=512, help="EMA samples scored per run")
    sweep.add_argument("--out", type=Path, required=True, help="sweep folder (rerun to reuse finished runs)")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    report = sub.add_parser("report", help="one self-contained HTML page of a run: config, curves, ledger, samples "
                            "over training, metrics, analyses")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--n", type=int, default=16, help="samples per checkpoint")
    report.add_argument("--steps", type=int, help="solver steps (default: the run's sample.steps)")
    report.add_argument("--out", type=Path, help="HTML file (default: RUN_DIR/report.html)")

    config = sub.add_parser("config", help="print the fully resolved config with every key")
    config.add_argument("--config", type=Path, help="TOML file to resolve")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _fit(args: argparse.Namespace, fit: Callable[..., Path]) -> Path:
    """``fit`` (api.train or api.train_autoencoder) of a new run (--config, --set, --out) or a resumed one
    (--resume, with --set changes); SIGINT/SIGTERM surface as Interrupted, which :func:`main` reports."""
    if args.resume and (args.config or args.out):
        raise FrugalError("--resume continues a run in place with its own config; drop --config/--out")
    config = None if args.resume else Config.load(args.config, args.overrides)
    return fit(config, run_dir=args.out, resume=args.resume, overrides=args.overrides if args.resume else (),
               progress=not args.no_progress)


def _train(args: argparse.Namespace) -> int:
    root = _fit(args, train)
    written = [p.name + ("/" if p.is_dir() else "") for p in sorted(Path(root).iterdir()) if not p.name.startswith(".")]
    print(f"run finished: {root} ({', '.join(written)})")
    return 0


def _train_autoencoder(args: argparse.Namespace) -> int:
    folder = _fit(args, train_autoencoder)
    result = json.loads((folder.parent / "eval.json").read_text())
    print(f"autoencoder written: {folder} (latents {'×'.join(map(str, result['latent_shape']))}; held-out PSNR "
          f"{result['heldout_psnr_db']:.2f} dB, MSE {result['heldout_mse']:.4g}; originals beside reconstructions "
          f"in {folder.parent / 'reconstructions.png'})")
    print(f"train on its latents: frugaldiff train --set data.autoencoder={folder} (and the same data.* keys)")
    return 0


def _class_choice(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a class number or all, not {text!r}") from None


def _sample(args: argparse.Namespace) -> int:
    if args.out.suffix != ".npz":
        raise FrugalError(f"--out must end in .npz, got {args.out}; e.g. --out samples.npz")
    if not 1 <= args.n <= 100_000 or (args.steps is not None and not 1 <= args.steps <= 10_000):
        raise FrugalError("--n must be in 1..100000 and --steps in 1..10000")
    if args.guidance is not None and not 0 <= args.guidance <= 100:
        raise FrugalError(f"--guidance must be in [0, 100], got {args.guidance}")
    drawn = sample_run(args.run_dir, n=args.n, steps=args.steps, solver=args.solver, seed=args.seed,
                       checkpoint=args.checkpoint, progress=True, which=args.which, guidance=args.guidance,
                       guide_checkpoint=args.guide_checkpoint)
    samples = drawn.values
    args.out.parent.mkdir(parents=True, exist_ok=True)
    key = "images" if samples.dtype == np.uint8 else "samples"
    np.savez_compressed(args.out, **{key: samples}, **({} if drawn.labels is None else {"labels": drawn.labels}))
    png = args.out.with_suffix(".png")
    rows = len(np.unique(drawn.labels)) if args.which == "all" and drawn.labels is not None else None
    save_samples(samples, png, rows=rows)
    print(f"wrote {args.out} ({key} {samples.dtype} {list(samples.shape)}"
          f"{'' if drawn.labels is None else ', labels'}) and {png}")
    return 0


def _ema(args: argparse.Namespace) -> int:
    if args.sweep:
        result = posthoc_sweep(args.run_dir, args.sigma_rel, args.n, args.out, args.steps, args.solver)
        print(result["table"], end="")
        return 0
    for sigma_rel in args.sigma_rel:
        print(f"wrote {write_posthoc(args.run_dir, sigma_rel, args.out)}")
    return 0


def _plot_timesteps(args: argparse.Namespace) -> int:
    config = Config.load(args.config, args.overrides)
    config = resolved_recipe(config)
    names = args.samplers or TIMESTEP_SAMPLERS.names()
    for name in names:
        TIMESTEP_SAMPLERS.get(name)  # one-line error for an unknown name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_timestep_densities(names, config["diffusion.process"], args.out, params=config.timestep_sampler_params())
    print(f"wrote {args.out}")
    return 0


def _plot_amplification(args: argparse.Namespace) -> int:
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


def _eval(args: argparse.Namespace) -> int:
    config = Config.load(None, args.overrides).updated({"data.name": args.dataset})
    result = evaluate(args.samples, config, args.ref, args.inception_weights)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.samples}: {result['n_samples']} samples against {result['dataset']} "
          f"({result['ref']} split, {result['n_ref']} reference samples; evaluator v{result['evaluator_version']})")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"  {key:<22}{value:.6g}")
    for key, reason in result.get("skipped", {}).items():
        print(f"  {key:<22}skipped: {reason}")
    return 0


def _prediction_types(args: argparse.Namespace) -> int:
    if args.bins < 1 or args.per_bin < 1:
        raise FrugalError("--bins and --per-bin must be at least 1")
    values = {"data.name": args.dataset, "diffusion.process": STUDY_PROCESS, **STUDY_DEFAULTS.get(args.dataset, {})}
    base = Config(values).updated(dict(parse_override(o) for o in args.overrides))
    if args.samples < 0 or (args.samples and args.samples < 2):
        raise FrugalError("--samples must be 0 (no scoring) or at least 2")
    blend = None if args.blend is None and args.blend_weights is None and not args.blend_overrides else {
        **({"diffusion.blend.types": args.blend} if args.blend else {}),
        **({"diffusion.blend.weights": args.blend_weights} if args.blend_weights else {}),
        **dict(parse_override(o) for o in args.blend_overrides)}
    results = prediction_study(base, args.out, args.types, args.strategies, args.bins, args.per_bin,
                               progress=not args.no_progress, gates=args.gates, blend=blend, seeds=args.seeds,
                               samples=args.samples)
    print((args.out / "table.md").read_text(), end="")
    print(json.dumps(results["claims"]))
    print(f"wrote {args.out}/results.json, table.md, x0_error.png" + (", gates.png" if results["gates"] else "")
          + (", samples.png" if results["quality"] and (args.out / "samples.png").is_file() else ""))
    return 0


def _disruption(args: argparse.Namespace) -> int:
    result = disruption(args.run_dir, args.out, args.bins, args.steps, args.batch_sizes, args.per_bin, args.seed,
                        args.lr, progress=not args.no_progress)
    print(f"disruption of {result['checkpoint']} ({result['images_seen']} images, lr {result['lr']:.3g}):")
    for m in result["matrices"]:
        share = "n/a" if m["off_diagonal_share"] is None else f"{m['off_diagonal_share']:.3f}"
        print(f"  batch {m['batch_size']:>4}, {m['steps']:>3} step(s): off-diagonal share of the increase {share}, "
              f"mean off-diagonal ΔL {m['mean_off_diagonal']:+.4f}, mean diagonal ΔL {m['mean_diagonal']:+.4f}")
    out = args.out or args.run_dir / "analysis" / "disruption"
    print(f"wrote {out}/disruption.json, disruption_b*_k*.png, off_diagonal_share.png")
    return 0


def _importance(args: argparse.Namespace) -> int:
    result = run_importance(args.run_dir, args.out, args.bins, args.error, args.n, args.steps, args.solver,
                            args.degrade, args.metric, args.seed, progress=not args.no_progress)
    name = result["headline"]
    cost = ", ".join(f"{c:.4g}" for c in result["metrics"][name]["cost"])
    edges = result["edges"]
    worst = result["costliest_bin"]
    print(f"cost in {name} per t bin: {cost}; costliest bin {edges[worst]:.2g}–{edges[worst + 1]:.2g}")
    out = args.out or args.run_dir / "analysis" / "importance"
    print(f"wrote {out}/importance.json, importance.png")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    metrics = RunFiles(args.run_dir).metrics
    if not metrics.is_file():
        raise FrugalError(f"{args.run_dir} has no metrics.csv; pass a run folder that `frugaldiff train` wrote")
    written = plot_ledger(metrics, args.out or args.run_dir / "analysis" / "ledger")
    if not written:
        raise FrugalError(f"{metrics} has no per-bin columns (loss_t*, heldout_t*); it predates the loss ledger, "
                          "train a new run")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _batch_sweep(args: argparse.Namespace) -> int:
    result = batch_sweep(Config.load(args.config, args.overrides), args.out, args.batch_sizes, args.bins,
                         args.per_bin, args.samples, progress=not args.no_progress)
    print((args.out / "table.md").read_text(), end="")
    pick = max if result["higher_is_better"] else min
    best = pick(result["runs"], key=lambda r: r["metric"])
    print(f"best {result['metric']}: batch {best['batch_size']}")
    print(f"wrote {args.out}/batch_sweep.json, table.md, batch_sweep.png")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    analyses = {"prediction-types": _prediction_types, "disruption": _disruption, "importance": _importance,
                "ledger": _ledger, "batch-sweep": _batch_sweep}
    return analyses[args.analysis](args)


def _report(args: argparse.Namespace) -> int:
    if args.n < 1 or (args.steps is not None and args.steps < 1):
        raise FrugalError("--n and --steps must be at least 1")
    print(f"wrote {render_report(args.run_dir, args.out, args.n, args.steps)}")
    return 0


def _config(args: argparse.Namespace) -> int:
    print(Config.load(args.config, args.overrides).to_toml(comments=True), end="")
    return 0


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
                  line: str | None = None) -> None:
    """Warnings as one line on stderr, without the source line Python prints below them."""
    print(f"frugaldiff: warning: {message}", file=sys.stderr)


def _continue_hint(command: str, run: Path) -> str:
    """How to continue after an interrupt: train commands resume the run; the others (studies) reuse their
    finished runs and continue the interrupted one when the same command runs again."""
    if command in ("train", "train-autoencoder"):
        return f"continue with: frugaldiff {command} --resume {run}"
    return f"continue by running the same command again (it reuses finished runs and continues {run})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Every error prints one line and exits with status 2: the user's (FrugalError), the machine's
    (a full disk, missing permissions, too little memory), and, as the last resort, a bug (the traceback with
    FRUGALDIFF_DEBUG=1)."""
    args = _parser().parse_args(argv)
    commands = {"train": _train, "train-autoencoder": _train_autoencoder, "sample": _sample, "ema": _ema,
                "plot-timesteps": _plot_timesteps,
                "plot-amplification": _plot_amplification, "analyze": _analyze, "config": _config, "eval": _eval,
                "report": _report}
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            return commands[args.command](args)
        except Interrupted as e:  # a checkpoint was written: say how to continue
            print(f"frugaldiff: {e}; {_continue_hint(args.command, e.checkpoint.parent.parent)}", file=sys.stderr)
            return 128 + e.signum
        except FrugalError as e:
            message = str(e)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            message = f"{e.strerror or e}{where}; free space or fix the permissions, then run the command again"
        except MemoryError:
            message = "out of memory; use a smaller model (model.*), batch (train.batch_size) or --n"
        except KeyboardInterrupt:
            print("frugaldiff: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if os.environ.get("FRUGALDIFF_DEBUG"):
                raise
            message = (f"internal error ({type(e).__name__}: {short_repr(str(e))}); this is a bug in frugaldiff: rerun "
                       "with FRUGALDIFF_DEBUG=1 for the traceback and report it")
    print(f"frugaldiff: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
