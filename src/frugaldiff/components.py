"""Everything a run is built from, assembled once from a :class:`Config`.

:func:`build` makes one noise process and hands it to the prediction type, the timestep sampler, the
denoiser and the objective; :class:`TrainSettings` and :class:`SampleSettings` hold the ``train.*`` and
``sample.*`` values as typed fields. The trainer, generation, the evaluator and the analyses take these
objects, not the config and its string keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from torch import Tensor

from .config import BASE_SIZE, FRUGAL_RECIPE, Config
from .datasets import Data, load_dataset
from .errors import FrugalError
from .gmm import GaussianMixture, gmm_mixture
from .latent import check_same_autoencoder, latent_data, load_autoencoder
from .networks import NETWORKS, Denoiser, preset_for, unet_size
from .noise import NoiseProcess, shifted
from .objective import Objective
from .prediction import PredictionType
from .runs import RunFiles
from .runtime import Runtime
from .timestep_samplers import TimestepSampler
from .weighting import Weighting


class _Settings:
    """A dataclass whose every field is the config key ``<section>.<field>`` (or one of ``borrowed``)."""

    section: ClassVar[str]
    borrowed: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_config(cls, config: Config) -> Self:
        return cls(**{f.name: config[cls.borrowed.get(f.name, f"{cls.section}.{f.name}")]
                      for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class TrainSettings(_Settings):
    """The ``train.*`` keys (``frugaldiff config`` explains each) and data.flip."""

    section = "train"
    borrowed = {"flip": "data.flip"}

    batch_size: int
    images_seen: int
    lr: float
    lr_schedule: str
    warmup_images: int
    weight_decay: float
    grad_clip: float
    ema_decay: float
    grad_accum: int
    precision: str
    seed: int
    flip: bool
    immiscible: bool
    patch: bool
    patch_full: float
    compile: bool
    checkpoint_every: int
    phema_snapshots: int
    label_dropout: float
    guide_at: float | str  # "auto" resolves in guidance.guide_share
    keep_checkpoints: int
    log_every: int
    ledger_bins: int
    heldout_every: int
    heldout_per_bin: int
    tensorboard: bool
    eval_every: int
    eval_samples: int
    device: str

    def lr_at(self, images: int) -> float:
        """The learning rate after ``images`` images (:func:`lr_at`)."""
        return lr_at(self.lr, images, self.warmup_images, self.lr_schedule, self.images_seen)


def lr_at(lr: float, images: int, warmup_images: int, schedule: str, budget: int) -> float:
    """The learning rate after ``images`` of ``budget`` images: linear warm-up, then constant or cosine to 0."""
    factor = min(1.0, (images + 1) / warmup_images) if warmup_images else 1.0
    if schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(1.0, images / budget)))
    return lr * factor


@dataclass(frozen=True)
class SampleSettings(_Settings):
    """The ``sample.*`` keys: how a trained model generates."""

    section = "sample"

    solver: str
    steps: int
    schedule: str
    eta: float
    clip: bool
    guidance: float | str  # "auto" resolves in generate.run_guidance
    guide: str
    guidance_interval: list[float]
    n: int
    seed: int


def build_data(config: Config) -> Data:
    """The configured dataset (``data.*`` keys)."""
    return load_dataset(config["data.name"], image_size=config["data.image_size"], color=config["data.color"],
                        heldout_fraction=config["data.heldout_fraction"], num_samples=config["data.num_samples"],
                        seed=config["data.seed"], gmm_dim=config["data.gmm_dim"],
                        gmm_components=config["data.gmm_components"], gmm_covariance=config["data.gmm_covariance"],
                        twemoji_variants=config["data.twemoji_variants"])


def model_data(config: Config, data: Data, progress: bool = False) -> Data:
    """The data the model trains on: ``data`` (from :func:`build_data`) itself, or with ``data.autoencoder`` its
    latents (encoded once and cached, :func:`~frugaldiff.latent.latent_data`)."""
    if not config["data.autoencoder"]:
        return data
    if config["data.flip"]:
        raise FrugalError("data.flip mirrors training samples, and a latent run's samples are cached latents, not "
                          "images; set data.flip = false for a run with data.autoencoder")
    return latent_data(data, load_autoencoder(config["data.autoencoder"]), progress)


def true_mixture(config: Config) -> GaussianMixture | None:
    """The mixture a gmm run's data is drawn from (its data.* keys), None for other datasets."""
    if config["data.name"] != "gmm":
        return None
    return gmm_mixture(config["data.seed"], config["data.gmm_dim"], config["data.gmm_components"],
                       config["data.gmm_covariance"])


def num_classes(config: Config, data: Data) -> int:
    """``model.num_classes`` resolved on ``data``: auto is the number of its classes (0 for unlabelled data and for
    labels that only name mixture components); an explicit count must cover every label."""
    wanted = config["model.num_classes"]
    if wanted == "auto":
        return data.num_classes if data.classes_to_learn else 0
    if wanted and data.train_labels is None:
        raise FrugalError(f"model.num_classes = {wanted} needs class labels and {data.name!r} has none; give the data "
                          "labels (class sub-folders, or a 'labels' array in the npz) or set model.num_classes = 0")
    if wanted and wanted < data.num_classes:
        raise FrugalError(f"model.num_classes = {wanted} but {data.name!r} has labels up to {data.num_classes - 1}; "
                          f"set model.num_classes = auto or {data.num_classes}")
    return wanted


def build_process(config: Config, sample_shape: tuple[int, ...]) -> NoiseProcess:
    """The configured noise process, shifted by ``diffusion.shift`` (auto: √(size / BASE_SIZE) for images, 1 for
    vectors)."""
    shift = config["diffusion.shift"]
    if shift == "auto":
        shift = math.sqrt(math.prod(sample_shape) / BASE_SIZE) if len(sample_shape) == 3 else 1.0
    return shifted(config.process(), shift)


def resolved_recipe(config: Config) -> Config:
    """``config`` with its "auto" recipe settings (:data:`FRUGAL_RECIPE`'s keys) resolved: frugal's, without the stable
    target under train.patch (crops have no whole-image references); set keys stay. (SD3's settings were chosen above
    784 values per sample until class-balanced scoring was found to have favoured them on twemoji:
    docs/speedrun.md.)"""
    recipe = {**FRUGAL_RECIPE, "diffusion.reference_images": 0} if config["train.patch"] else FRUGAL_RECIPE
    auto = {key: value for key, value in recipe.items() if config[key] == "auto"}
    return config.updated(auto) if auto else config


def _diffusion_settings(config: Config) -> dict[str, Any]:
    """What decides a diffusion run: every key, the "auto" recipe resolved, except train-autoencoder's
    ``autoencoder.*`` (a diffusion run never reads them; ``data.autoencoder`` names the one it uses)."""
    settings = resolved_recipe(config).to_dict()
    settings.pop("autoencoder", None)
    return settings


def require_same_run(config: Config, run: Path) -> None:
    """Refuse in one line a ``run`` folder that holds a diffusion run started with another config than ``config``
    (both with their "auto" recipe resolved, so a run saved resolved matches its auto config)."""
    saved = RunFiles(run).config
    if saved.is_file() and _diffusion_settings(Config.load(saved, saved=True)) != _diffusion_settings(config):
        raise FrugalError(f"{run} holds a run of another config; remove it or choose another --out")


def unet_keys(config: Config, side: int) -> dict[str, Any]:
    """The UNet's size for images of ``side`` px: ``model.preset`` (auto: by the side), each model.* key overriding."""
    preset = config["model.preset"]
    keys = unet_size(preset_for(side) if preset == "auto" else preset, side)
    for key in keys:
        if config[f"model.{key}"] != "auto":
            keys[key] = config[f"model.{key}"]
    return keys


def build_network(config: Config, prediction: PredictionType, sample_shape: tuple[int, ...], classes: int = 0) -> Any:
    """The ``model.*`` network for samples of ``sample_shape`` ((C, H, W) images or (D,) vectors), conditioned on
    ``classes`` labels (0: unconditional)."""
    name = config["model.name"]
    if name == "auto":
        name = "unet" if len(sample_shape) == 3 else "mlp"
    if name in ("unet", "dit"):
        if len(sample_shape) != 3:
            raise FrugalError(f"model.name={name} needs image data, got samples of shape {sample_shape}; use mlp")
        channels, side, _ = sample_shape
        coordinates = 2 if config["train.patch"] else 0  # Patch Diffusion's coordinate channels
        sizes = (unet_keys(config, side) | {"group_channels": config["model.group_channels"]}) if name == "unet" else {
            "width": config["model.hidden"], "depth": config["model.depth"], "patch_size": config["model.patch_size"]}
        return NETWORKS.create(name, channels + coordinates, prediction.out_channels(channels), side,
                               dropout=config["model.dropout"], num_classes=classes, **sizes)
    if len(sample_shape) != 1:
        raise FrugalError(f"model.name={name} needs vector data, got samples of shape {sample_shape}; use unet")
    features = math.prod(sample_shape)
    return NETWORKS.create(name, features, prediction.out_channels(features), hidden=config["model.hidden"],
                           depth=config["model.depth"], dropout=config["model.dropout"], num_classes=classes)


def build_denoiser(config: Config, sample_shape: tuple[int, ...], classes: int = 0, process: NoiseProcess | None = None,
                   weighting: Weighting | None = None) -> Denoiser:
    """Prediction type, network (conditioned on ``classes`` labels) and the weighting's uncertainty module, in this
    order (their initialisations draw from torch's global generator in it)."""
    process = process if process is not None else build_process(config, sample_shape)
    prediction = config.prediction(process)
    net = build_network(config, prediction, sample_shape, classes)
    weighting = weighting if weighting is not None else config.weighting()
    if config["train.patch"] and len(sample_shape) != 3:
        raise FrugalError(f"train.patch crops images, and {config['data.name']} holds vectors of shape {sample_shape}; "
                          "set train.patch = false")
    return Denoiser(net, prediction, weighting.uncertainty(process), coordinates=config["train.patch"])


def run_denoiser(config: Config, info: dict[str, Any]) -> Denoiser:
    """The denoiser of a run's checkpoint (``info``: its state.json; weights not loaded), with the class counts and,
    for a latent run, the autoencoder and latent scaling it recorded."""
    denoiser = build_denoiser(config, tuple(info["sample_shape"]), info.get("num_classes", 0))
    denoiser.class_counts = info.get("class_counts")  # absent in checkpoints from before it was recorded
    if config["data.autoencoder"]:
        denoiser.autoencoder = load_autoencoder(config["data.autoencoder"], info.get("latent_factors"))
        check_same_autoencoder(denoiser.autoencoder, info, "this run")
    return denoiser


@dataclass
class Components:
    """The built parts of a run; ``process`` is shared by all of them."""

    process: NoiseProcess
    prediction: PredictionType
    weighting: Weighting
    denoiser: Denoiser
    sampler: TimestepSampler
    objective: Objective


def build(config: Config, data: Data, runtime: Runtime) -> Components:
    """Every part of a run of ``config`` (its recipe resolved: :func:`resolved_recipe`) on ``data``; the denoiser and
    the stable target's pool on the device."""
    config = resolved_recipe(config)
    process = build_process(config, data.sample_shape)
    weighting = config.weighting()
    classes = num_classes(config, data)
    denoiser = build_denoiser(config, data.sample_shape, classes, process, weighting).to(runtime.device)
    denoiser.autoencoder = data.autoencoder
    if config["train.patch"] and config["diffusion.reference_images"]:
        raise FrugalError("train.patch trains on crops, which the stable target's whole-image references cannot "
                          f"match (diffusion.reference_images = {config['diffusion.reference_images']}); set "
                          "diffusion.reference_images = 0 (or auto) with train.patch")
    pool: Tensor | None = data.train.to(runtime.device) if config["diffusion.reference_images"] else None
    pool_labels = data.train_labels.to(runtime.device) if pool is not None and classes else None
    objective = Objective(denoiser, weighting, runtime, pool, config["diffusion.reference_images"], pool_labels)
    return Components(process, denoiser.prediction, weighting, denoiser, config.timestep_sampler(process), objective)
