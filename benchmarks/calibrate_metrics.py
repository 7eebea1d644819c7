"""Calibration of the domain metrics (docs/metrics.md): reference sets of known quality scored against the train split.

    python benchmarks/calibrate_metrics.py [--dataset mnist5000] [--image-size 64] [--blur 1.0] [--samples S.npz ...]

Prints the classifier's held-out accuracy and one row per set: the held-out split (the floor: real images the
classifier never saw), the held-out split blurred by a Gaussian of --blur pixels, with Gaussian noise of std
--noise added, with its colour channels rotated (R → G → B) and converted to grey (colour datasets), Gaussian
noise of the same count, and any --samples files (score them with the same number of samples as the held-out
split). Every degraded set must score clearly worse than the floor.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from frugaldiff.config import Config
from frugaldiff.metrics import Evaluator, add_noise, gaussian_blur, load_samples, shift_colours, to_grey

COLUMNS = ["domain_fid", "domain_kid", "precision", "recall", "label_entropy", "confidence", "high_freq_ratio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5000")
    parser.add_argument("--image-size", type=int, help="data.image_size (default: the dataset's own)")
    parser.add_argument("--blur", type=float, default=1.0, help="σ of the Gaussian blur, in pixels")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the noise added to the held-out images")
    parser.add_argument("--samples", type=Path, nargs="*", default=[], help=".npz files of samples to score too")
    args = parser.parse_args()

    start = time.perf_counter()
    data = {"data.name": args.dataset} | ({"data.image_size": args.image_size} if args.image_size else {})
    evaluator = Evaluator.for_dataset(Config(data), ref="train")
    print(f"{args.dataset}: classifier held-out accuracy {evaluator.accuracy:.4f}; evaluator ready in "
          f"{time.perf_counter() - start:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()})")
    heldout = evaluator.data.heldout.numpy()
    noise = np.clip(np.random.default_rng(0).normal(size=heldout.shape), -1, 1).astype(np.float32)
    sets = {"held-out vs train (floor)": heldout, f"held-out blurred (σ = {args.blur:g} px)":
            gaussian_blur(heldout, args.blur), f"held-out + noise (std {args.noise:g})": add_noise(heldout, args.noise)}
    if heldout.shape[1] == 3:
        sets |= {"held-out, colours rotated": shift_colours(heldout), "held-out in grey": to_grey(heldout)}
    sets |= {"Gaussian noise N(0, 1), clipped": noise, **{str(path): load_samples(path)[0] for path in args.samples}}
    print("| set | n | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, x in sets.items():
        result = evaluator(x)
        print(f"| {name} | {result['n_samples']} | " + " | ".join(f"{result[c]:.4g}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
