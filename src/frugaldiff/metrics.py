"""Sample quality computed offline: domain FID/KID, precision/recall, label statistics, exact GMM and toy metrics.

Image datasets with class labels get a small classifier trained deterministically on their train split and
cached; its penultimate layer is the feature space of FID and KID (torchmetrics) and of k-NN precision and
recall. These "domain" numbers are comparable only between samples scored against the same dataset, reference
split and EVALUATOR_VERSION, never with the Inception FID of papers (that one needs ``inception_weights``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .components import build_data, true_mixture
from .config import Config
from .datasets import LUMA, BatchStream, Data, cache_dir, image_layout, read_arrays
from .errors import FrugalError
from .gmm import GaussianMixture

EVALUATOR_VERSION = 1  # bump when the classifier or its training changes: cached weights are then rebuilt
FEATURES = 64  # width of the classifier's penultimate layer, the feature space of FID, KID, precision, recall
CLASSIFIER_IMAGES = 30_000  # images seen while training a classifier (at least one epoch)
CLASSIFIER_BATCH = 64
NEIGHBOURS = 3  # k of the k-NN manifolds of precision and recall (Kynkäänniemi et al. 2019)
KID_SUBSET = 500  # KID's subset size (fewer when either set is smaller)
KID_SUBSETS = 50
COVERAGE_SHARE = 0.1  # a GMM component is covered when it gets at least this share of its expected count
PROJECTIONS = 256  # random directions of the sliced Wasserstein distance
MAX_KERNEL_POINTS = 4096  # MMD uses at most this many points of each set (a fixed-seed subset)
MAX_SLICED_POINTS = 16384  # and the sliced Wasserstein distance this many
MIN_SAMPLES = 10
REFS = ("heldout", "train")
CHUNK = 1024
HIGH_FREQ_SIGMA = 1.0  # the blur whose residual is an image's fine detail (high_freq_ratio)
ACCEPTED = ("images [N,H,W], [N,H,W,C] or [N,C,H,W] (C = 1 or 3; uint8, or floats in [0, 1] or [-1, 1]) "
            "or float vectors [N,D]")


# ---------------------------------------------------------------------------------------------------------
# Samples from files and arrays


def canonical_samples(a: np.ndarray, source: str = "samples") -> np.ndarray:
    """Any accepted layout → float32 images [N, C, H, W] in [-1, 1], or float32 vectors [N, D]."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise FrugalError(f"{source} holds NaN or infinite values; save finite {ACCEPTED}")
    if a.ndim != 2:
        return np.ascontiguousarray(image_layout(a, source).transpose(0, 3, 1, 2))
    if a.dtype.kind not in "uif" or a.size == 0:
        raise FrugalError(f"{source} holds an empty or {a.dtype} array of shape {a.shape}; save {ACCEPTED}")
    return a.astype(np.float32)


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples from an .npz (one array, or the one named "samples" or "images") or .npy file, in the layout
    of :func:`canonical_samples`, and the classes they were asked for (an array "labels", as ``frugaldiff sample``
    writes for conditional runs; None without one)."""
    path = Path(path)
    arrays = read_arrays(path, "pass an .npz written by `frugaldiff sample --out` or numpy.savez")
    labels = arrays.pop("labels", None)
    key = next((k for k in ("samples", "images") if k in arrays), next(iter(arrays)) if len(arrays) == 1 else None)
    if key is None:
        raise FrugalError(f"{path} holds arrays {sorted(arrays)}; save one array, or name it 'samples' or 'images'")
    samples = canonical_samples(arrays[key], f"{path} ['{key}']")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != samples.shape[:1]):
        raise FrugalError(f"{path}: 'labels' is {labels.dtype} {labels.shape}; save integer labels, one per sample")
    return samples, labels


def _fit_images(x: Tensor, shape: tuple[int, ...], dataset: str) -> Tensor:
    """Images [N, C, H, W] converted to the dataset's (C, H, W): grey ↔ RGB, then a bilinear resize."""
    channels, height, width = shape
    if x.shape[1] == 3 and channels == 1:
        x = torch.einsum("nchw,c->nhw", x, torch.from_numpy(LUMA))[:, None]
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[2:] != (height, width):
        if x.shape[2] * width != x.shape[3] * height:
            raise FrugalError(f"samples are {x.shape[2]}×{x.shape[3]} images and {dataset} has {height}×{width}; "
                              "the aspect ratios differ, so crop the samples to its shape first")
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Images [N, C, H, W] blurred by a Gaussian of ``sigma`` pixels (reflected edges)."""
    radius = max(1, math.ceil(3 * sigma))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    kernel /= kernel.sum()
    n, c, h, w = x.shape
    x = F.pad(x.float().reshape(n * c, 1, h, w), (radius,) * 4, mode="reflect")
    x = F.conv2d(F.conv2d(x, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Images [N, C, H, W] blurred by a Gaussian of ``sigma`` pixels (reflected edges); the degradation
    used to calibrate the metrics in docs/metrics.md."""
    return _blur(torch.from_numpy(images), sigma).numpy()


def high_freq_power(x: Tensor) -> float:
    """Mean power of what a Gaussian blur of σ = ``HIGH_FREQ_SIGMA`` px removes from images [N, C, H, W]: their
    fine detail — edges, and grain or noise (in chunks of ``CHUNK`` images, so that large sets fit in memory)."""
    power = (((c.float() - _blur(c, HIGH_FREQ_SIGMA)).square().sum(dtype=torch.float64).item()) for c in x.split(CHUNK))
    return sum(power) / x.numel()


def to_grey(images: np.ndarray) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] with every channel replaced by their luma (grey in colour's shape)."""
    if images.shape[1] != 3:
        return images.copy()
    luma = np.einsum("nchw,c->nhw", images, LUMA)[:, None]
    return np.repeat(luma, 3, axis=1).astype(np.float32)


def shift_colours(images: np.ndarray) -> np.ndarray:
    """Images [N, C, H, W] with their colour channels rotated (R → G → B → R): every hue changes, nothing else."""
    return np.roll(images, 1, axis=1) if images.shape[1] == 3 else images.copy()


def add_noise(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Images with Gaussian noise of ``std`` added (clipped to [-1, 1])."""
    noise = np.random.default_rng(seed).normal(scale=std, size=images.shape)
    return np.clip(images + noise, -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The domain classifier


class _Scale(nn.Module):
    """Multiplication by a stored constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.value


class DomainClassifier(nn.Module):
    """A small CNN for images of ``shape`` (C, H, W); ``features`` (its penultimate layer, FEATURES wide, scaled
    to a root mean square of 1 on the train split) maps images in [-1, 1] to vectors."""

    def __init__(self, shape: tuple[int, ...], classes: int) -> None:
        super().__init__()
        channels, height, width = shape
        grid = (min(7, height // 4), min(7, width // 4))  # at most 7×7 cells reach the linear layer
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(), nn.Linear(64 * grid[0] * grid[1], FEATURES), nn.ReLU(), _Scale(),
        )
        self.features.num_features = FEATURES  # torchmetrics reads it instead of probing a 299×299 image
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _apply(module: nn.Module, x: Tensor) -> Tensor:
    """``module`` over ``x`` in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in x.split(CHUNK)])


def _accuracy(model: DomainClassifier, x: Tensor, labels: Tensor) -> float:
    return (_apply(model, x).argmax(1) == labels).float().mean().item()


def _train_classifier(data: Data, classes: int) -> tuple[DomainClassifier, float]:
    """A classifier trained on the train split (fixed seed, Adam, cosine decay) and its held-out accuracy."""
    x, labels = data.train, data.train_labels
    steps = math.ceil(max(CLASSIFIER_IMAGES, len(x)) / CLASSIFIER_BATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DomainClassifier(data.sample_shape, classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        batches = BatchStream(torch.arange(len(x)), seed=0)
        for _ in range(steps):
            idx = batches.next(CLASSIFIER_BATCH)
            loss = F.cross_entropy(model(x[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(False)
    scale = _apply(model.features, x).pow(2).mean().rsqrt()  # features of RMS 1; the head compensates
    model.features[-1].value.fill_(scale)
    model.head.weight.div_(scale)
    return model, _accuracy(model, data.heldout, data.heldout_labels)


def classifier_path(data: Data) -> Path:
    """The cache file of ``data``'s classifier: keyed by name, image shape, a digest of the labelled train
    split and EVALUATOR_VERSION."""
    digest = hashlib.sha256(data.train.numpy().tobytes())
    digest.update(data.train_labels.numpy().tobytes())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in data.name).strip("-")
    shape = "x".join(map(str, data.sample_shape))
    return cache_dir() / "evaluators" / f"{safe}-{shape}-{digest.hexdigest()[:16]}-v{EVALUATOR_VERSION}.safetensors"


def domain_classifier(data: Data) -> tuple[DomainClassifier, float]:
    """``data``'s classifier and its held-out accuracy, from the cache, else trained and cached atomically."""
    if min(data.sample_shape[1:]) < 4:
        raise FrugalError(f"{data.name} has {data.sample_shape[1]}×{data.sample_shape[2]} images; the domain "
                          "classifier needs at least 4×4 pixels, so use data.image_size=8 or more")
    classes = int(max(data.train_labels.max(), data.heldout_labels.max())) + 1
    path = classifier_path(data)
    model = DomainClassifier(data.sample_shape, classes)
    try:
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), "pt") as f:
            accuracy = float(f.metadata()["heldout_accuracy"])
        return model.eval().requires_grad_(False), accuracy
    except (OSError, SafetensorError, RuntimeError, KeyError, TypeError, ValueError):
        pass  # missing, corrupt or from another network: rebuild below
    model, accuracy = _train_classifier(data, classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(model.state_dict(), tmp, metadata={"heldout_accuracy": repr(accuracy), "dataset": data.name})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return model, accuracy


# ---------------------------------------------------------------------------------------------------------
# Metrics of point sets


def _subset(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """At most ``n`` rows of ``x``, a fixed-seed random choice."""
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def manifold_share(points: Tensor, manifold: Tensor, k: int = NEIGHBOURS) -> float:
    """Share of ``points`` inside the k-NN manifold of ``manifold``: the union of balls around each manifold
    point reaching its k-th nearest neighbour (Kynkäänniemi et al. 2019). Precision is
    ``manifold_share(samples, reference)``, recall ``manifold_share(reference, samples)``."""
    radii = torch.cat([torch.cdist(c, manifold).kthvalue(k + 1, dim=1).values for c in manifold.split(CHUNK)])
    inside = torch.cat([(torch.cdist(c, manifold) <= radii).any(1) for c in points.split(CHUNK)])
    return inside.double().mean().item()


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = PROJECTIONS, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance of point sets [N, D] and [M, D]: the root mean square, over fixed-seed
    random directions, of the 1-D W2 distance between the projections (compared at max(N, M) quantiles; at most
    MAX_SLICED_POINTS of each set, a fixed-seed subset)."""
    a, b = (_subset(x.double(), MAX_SLICED_POINTS) for x in (a, b))
    directions = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    directions /= directions.norm(dim=0)
    n = max(len(a), len(b))
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qa, qb = (torch.quantile(x @ directions, levels, dim=0) for x in (a, b))
    return (qa - qb).pow(2).mean().sqrt().item()


def median_distance(x: Tensor) -> float:
    """Median pairwise distance of (a fixed-seed subset of) ``x``: the RBF bandwidth of :func:`mmd`."""
    x = _subset(x.double(), MAX_KERNEL_POINTS // 2)
    d = torch.cdist(x, x)
    return d[torch.triu_indices(len(x), len(x), 1).unbind()].median().item()


def mmd(a: Tensor, b: Tensor, bandwidth: float) -> float:
    """Unbiased squared maximum mean discrepancy with the kernel exp(−‖x − y‖² / (2·bandwidth²))."""
    a, b = (_subset(x.double(), MAX_KERNEL_POINTS) for x in (a, b))

    def mean_kernel(x: Tensor, y: Tensor, same: bool) -> Tensor:
        k = torch.exp(-torch.cdist(x, y).pow(2) / (2 * bandwidth**2))
        return (k.sum() - k.diagonal().sum()) / (len(x) * (len(x) - 1)) if same else k.mean()

    return (mean_kernel(a, a, True) + mean_kernel(b, b, True) - 2 * mean_kernel(a, b, False)).item()


def mixture_metrics(x: Tensor, mixture: GaussianMixture) -> dict[str, float]:
    """Samples [N, D] against the true mixture: share of components covered (each sample assigned to its most
    responsible component; covered = at least COVERAGE_SHARE of the expected count), KL divergence of the
    assigned histogram from the true weights, and the mean log-likelihood under the true density."""
    x = x.double()
    ones = torch.ones(len(x), dtype=torch.float64)
    log_joint = mixture.components(x, ones, 0 * ones)[0]  # log w_j + log N(x; μ_j, Σ_j)
    counts = torch.bincount(log_joint.argmax(1), minlength=len(mixture.weights)).double()
    share = counts / len(x)
    kl = torch.where(share > 0, share * (share / mixture.weights).log(), 0.0).sum()
    return {"mode_coverage": (counts >= COVERAGE_SHARE * len(x) * mixture.weights).double().mean().item(),
            "mode_kl": kl.item(), "loglik": torch.logsumexp(log_joint, 1).mean().item()}


#: Metrics where a larger value means better samples (for the rest, smaller is better).
HIGHER_IS_BETTER = frozenset({"loglik", "mode_coverage", "precision", "recall", "label_entropy", "confidence"})


def headline_metric(data: Data) -> str | None:
    """The one number that sums up samples of ``data`` (None when nothing applies): domain FID for labelled
    images, the mean log-likelihood for gmm, the sliced Wasserstein distance for other vectors."""
    if data.kind == "image":
        return "domain_fid" if data.train_labels is not None else None
    return "loglik" if data.name == "gmm" else "swd"


def eval_column(data: Data) -> str:
    """The metrics.csv column ``eval_<headline metric>`` of ``train.eval_every``, or a FrugalError without one."""
    name = headline_metric(data)
    if name is None:
        raise FrugalError(f"train.eval_every needs a dataset with a quality metric and {data.name!r} has no class "
                          "labels; set train.eval_every=0")
    return f"eval_{name}"


# ---------------------------------------------------------------------------------------------------------
# The evaluator


class Evaluator:
    """Every metric that applies to a dataset, with its reference set prepared once; call it on samples.

    ``ref`` is the reference split of ``data``, "heldout" or "train"; ``mixture`` is the true distribution of gmm
    data (exact metrics); :meth:`for_dataset` builds both from a dataset name or config.
    """

    def __init__(self, data: Data, ref: str = "heldout", inception_weights: str | Path | None = None,
                 mixture: GaussianMixture | None = None) -> None:
        if ref not in REFS:
            raise FrugalError(f"ref {ref!r} is not a split; use one of: {', '.join(REFS)}")
        self.data, self.ref, self.mixture = data, ref, mixture
        self.reference = self.data.heldout if ref == "heldout" else self.data.train
        self.headline = headline_metric(self.data)
        self.skipped: dict[str, str] = {}
        self.classifier = self.inception = None
        if self.data.kind == "vector":
            if inception_weights is not None:
                raise FrugalError(f"Inception weights score images and {self.data.name} holds vectors; drop them")
            self.bandwidth = median_distance(self.reference)
            return
        self.reference_high_freq = high_freq_power(self.reference)
        if not self.reference_high_freq:
            self.skipped["high_freq_ratio"] = "the reference images have no fine detail (every image is flat)"
        if inception_weights is not None:
            self.inception = _inception_fid(Path(inception_weights))
            for chunk in self.reference.split(CHUNK):
                self.inception.update(_inception_input(chunk), real=True)
        else:
            self.skipped["inception_fid"] = "pass --inception-weights FILE (torch-fidelity's Inception-v3 weights)"
        if self.headline is not None:
            self._prepare_classifier()
        else:
            self.skipped["domain metrics"] = f"dataset {self.data.name!r} has no class labels to train a classifier"

    @classmethod
    def for_dataset(cls, dataset: str | Config, ref: str = "heldout",
                    inception_weights: str | Path | None = None) -> Evaluator:
        """The evaluator of a dataset name, or of the ``data.*`` keys of a config."""
        config = dataset if isinstance(dataset, Config) else Config({"data.name": dataset})
        return cls(build_data(config), ref, inception_weights, true_mixture(config))

    def _prepare_classifier(self) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.classifier, self.accuracy = domain_classifier(self.data)
        self.classes = self.classifier.head.out_features
        features = self.classifier.features
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
            self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
            self.kid = KernelInceptionDistance(feature=features, subsets=KID_SUBSETS, reset_real_features=False)
        for chunk in self.reference.split(CHUNK):
            self.fid.update(chunk, real=True)
            self.kid.update(chunk, real=True)
        self.reference_features = _apply(features, self.reference)

    def __call__(self, samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
        """Every metric that applies, for samples in any layout :func:`canonical_samples` accepts; with the
        ``labels`` they were generated for, also the conditional accuracy (the share the domain classifier puts in
        the requested class)."""
        x = torch.from_numpy(canonical_samples(samples))
        shape = self.data.sample_shape
        if (x.ndim == 4) != (self.data.kind == "image") or (x.ndim == 2 and tuple(x.shape[1:]) != shape):
            raise FrugalError(f"samples of shape {tuple(x.shape)} do not fit dataset {self.data.name!r}, whose "
                              f"samples have shape {shape}; pass the data they imitate (with --set data.* as trained)")
        if len(x) < MIN_SAMPLES:
            raise FrugalError(f"{len(x)} samples are too few to compare distributions; pass at least {MIN_SAMPLES}")
        result: dict[str, Any] = {"dataset": self.data.name, "ref": self.ref, "n_samples": len(x),
                                  "n_ref": len(self.reference), "evaluator_version": EVALUATOR_VERSION}
        if x.ndim == 2:
            result |= self._vector_metrics(x)
        else:
            x = _fit_images(x, shape, self.data.name)
            if self.reference_high_freq:
                result["high_freq_ratio"] = high_freq_power(x) / self.reference_high_freq
            if self.classifier is not None:
                result |= self._domain_metrics(x)
                if labels is not None:
                    result["conditional_accuracy"] = self.conditional_accuracy(x, labels)
            if self.inception is not None:
                self.inception.reset()
                for chunk in x.split(CHUNK):
                    self.inception.update(_inception_input(chunk), real=False)
                result["inception_fid"] = self.inception.compute().item()
        if self.skipped:
            result["skipped"] = dict(self.skipped)
        return result

    def conditional_accuracy(self, x: Tensor, labels: np.ndarray) -> float:
        """Share of images [N, C, H, W] in [-1, 1] that the domain classifier puts in the class they were asked for."""
        if len(labels) != len(x) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.classes):
            raise FrugalError(f"labels must be one class in 0..{self.classes - 1} per sample; got {len(labels)} labels "
                              f"for {len(x)} samples")
        predicted = _apply(self.classifier, x).argmax(1)
        return (predicted == torch.from_numpy(labels.astype(np.int64))).double().mean().item()

    def _vector_metrics(self, x: Tensor) -> dict[str, float]:
        result = {"swd": sliced_wasserstein(x, self.reference), "mmd": mmd(x, self.reference, self.bandwidth)}
        if self.mixture is not None:
            result |= mixture_metrics(x, self.mixture)
            result["loglik_ref"] = mixture_metrics(self.reference, self.mixture)["loglik"]
        return result

    def _domain_metrics(self, x: Tensor) -> dict[str, float]:
        self.fid.reset()
        self.kid.reset()
        self.kid.subset_size = min(KID_SUBSET, len(x), len(self.reference))  # KID needs subsets ≤ both sets
        for chunk in x.split(CHUNK):
            self.fid.update(chunk, real=False)
            self.kid.update(chunk, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # KID draws its subsets from the global generator
            kid, kid_std = self.kid.compute()
        features = _apply(self.classifier.features, x)
        probs = torch.softmax(self.classifier.head(features), dim=1)
        share = torch.bincount(probs.argmax(1), minlength=self.classes).double() / len(x)
        m = min(len(x), len(self.reference))  # precision and recall compare sets of equal size
        fake, real = _subset(features, m), _subset(self.reference_features, m)
        return {
            "classifier_accuracy": self.accuracy,
            "domain_fid": self.fid.compute().item(),
            "domain_kid": kid.item(),
            "domain_kid_std": kid_std.item(),
            "precision": manifold_share(fake, real),
            "recall": manifold_share(real, fake),
            "label_entropy": -torch.where(share > 0, share * share.log(), 0.0).sum().item(),
            "label_entropy_max": math.log(self.classes),
            "confidence": probs.max(1).values.mean().item(),
        }


def _inception_fid(weights: Path) -> Any:
    """torchmetrics' Inception FID with a local weights file (never downloaded)."""
    if not weights.is_file():
        raise FrugalError(f"no file {weights}; pass torch-fidelity's Inception-v3 weights file to --inception-weights")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise FrugalError('--inception-weights needs torch-fidelity; pip install "frugaldiff[inception]"')
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), normalize=True,
                                        reset_real_features=False)
    except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:  # not a weights file
        raise FrugalError(f"cannot load {weights} as Inception-v3 weights ({type(e).__name__}); pass "
                          "torch-fidelity's weights-inception-2015-12-05 file") from None


def _inception_input(x: Tensor) -> Tensor:
    """Images in [-1, 1] → RGB in [0, 1], as FrechetInceptionDistance(normalize=True) takes them."""
    return ((x + 1) / 2).expand(-1, 3, -1, -1)


def evaluate(samples: np.ndarray | str | Path, dataset: str | Config, ref: str = "heldout",
             inception_weights: str | Path | None = None, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Every metric that applies to ``samples`` (an array, or an .npz/.npy path whose "labels" are read too) against
    ``dataset``'s ``ref`` split, with ``n_samples``, ``n_ref``, ``dataset`` and ``ref``; see docs/metrics.md."""
    if not isinstance(samples, np.ndarray):
        samples, labels = load_samples(samples)
    return Evaluator.for_dataset(dataset, ref, inception_weights)(samples, labels)
