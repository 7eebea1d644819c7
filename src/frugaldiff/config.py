"""The configuration: every key with its default, type and valid values, in dotted groups.

``Config`` is built from defaults, a TOML file and ``KEY=VALUE`` overrides; anything unknown or out
of range is refused with a one-line :class:`FrugalError` naming the key and what is valid.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text
from .datasets import TWEMOJI_VARIANTS, dataset_names
from .errors import FrugalError, short_repr
from .gmm import GMM_COMPONENTS, GMM_COVARIANCES, GMM_DIM
from .guidance import GUIDES
from .networks import NETWORKS, PRESETS
from .noise import PROCESSES, NoiseProcess
from .prediction import PREDICTIONS, PredictionType
from .registry import Registry
from .solvers import SCHEDULES, SOLVERS
from .timestep_samplers import TIMESTEP_SAMPLERS, TimestepSampler
from .weighting import WEIGHTINGS, Weighting


@dataclass(frozen=True)
class Option:
    """One config key: default, type, and either choices or a numeric range."""

    key: str
    default: Any
    help: str
    choices: Callable[[], list[str]] | None = None
    low: float | None = None
    high: float | None = None
    item: type | None = None  # element type of a list option
    min_items: int = 0  # the fewest elements of a list option
    max_length: int | None = None  # the longest string of a str option
    auto: type | None = None  # the option takes "auto" or a value of this type
    #: The value for a config saved before this key existed (None: the default), so a run resumed after an
    #: upgrade keeps training as it started.
    predating: Any = None

    @property
    def kind(self) -> type:
        return self.auto or type(self.default)

    def describe(self) -> str:
        """The valid values, for messages and ``frugaldiff config``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices())
        if self.kind is list:
            least = f"at least {self.min_items} " if self.min_items else ""
            auto = '"auto" or ' if self.auto else ""
            return f"{auto}a list of {least}{_KINDS[self.item][1]}" + _range_text(self.low, self.high, " each")
        if self.max_length is not None:
            return f"a string of at most {self.max_length} characters"
        return ('"auto" or ' if self.auto else "") + _KINDS[self.kind][0] + _range_text(self.low, self.high)

    def check(self, value: Any) -> Any:
        """The value converted to this option's type, or a FrugalError."""
        if self.auto and value == "auto":
            return value
        if self.kind is list:
            if not isinstance(value, list) or len(value) < self.min_items:
                raise self._bad(value)
            return [self._check_scalar(v, self.item) for v in value]
        return self._check_scalar(value, self.kind)

    def _check_scalar(self, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._bad(value)
        if kind is float and not math.isfinite(value):
            raise self._bad(value)
        if kind is str and len(value) > (self.max_length or MAX_STRING):
            raise self._bad(value)
        if self.choices is not None and value not in self.choices() and not _prefix_match(value, self.choices()):
            raise self._bad(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise self._bad(value)
        return value

    def _bad(self, value: Any) -> FrugalError:
        return FrugalError(f"config key '{self.key}' must be {self.describe()}; got {short_repr(value)}")


#: The data size (1 × 28 × 28, MNIST) the recipe was tuned on: diffusion.shift = auto scales from it.
BASE_SIZE = 784
#: The training recipe's settings that default to "auto" (resolved by components.resolved_recipe, saved resolved):
#: frugal's on every measured dataset, except no stable target with train.patch.
FRUGAL_RECIPE = {"diffusion.reference_images": 4096, "timestep_sampler.logit_normal.m": 0.5,
                 "timestep_sampler.logit_normal.stratified": True}
#: What "auto" means for them, in the help of each.
AUTO_RECIPE = (f"auto: frugal's (stable target over {FRUGAL_RECIPE['diffusion.reference_images']} images, "
               f"logit-normal m = {FRUGAL_RECIPE['timestep_sampler.logit_normal.m']}, stratified draws), best or "
               "tied on every dataset measured (docs/speedrun.md); no stable target with train.patch")

#: The longest string any config value may hold (paths included), and the largest seed.
MAX_STRING = 4096
MAX_SEED = 2**32 - 1
MAX_COMPONENT_INT = 10**6



#: how a type is named in messages: (one, several)
_KINDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "booleans")}


def _range_text(low: float | None, high: float | None, prefix: str = "") -> str:
    if low is not None and high is not None:
        return f"{prefix} in [{low}, {high}]"
    if low is not None:
        return f"{prefix} ≥ {low}"
    if high is not None:
        return f"{prefix} ≤ {high}"
    return ""


def _prefix_match(value: Any, choices: Iterable[str]) -> bool:
    """Choices ending in ':PATH' (e.g. 'folder:PATH') accept any value with that prefix."""
    return isinstance(value, str) and any(
        c.endswith(":PATH") and value.startswith(c[: -len("PATH")]) and len(value) > len(c) - 4 for c in choices
    )


OPTIONS: list[Option] = [
    Option("data.name", "mnist5000", "dataset: a bundled name, folder:PATH or npz:PATH", choices=dataset_names),
    Option("data.image_size", 0, "side of the (square) images; 0 keeps the dataset's own size", low=0, high=1024),
    Option("data.color", "auto", "channels of folder/npz images", choices=lambda: ["auto", "grey", "rgb"]),
    Option("data.heldout_fraction", 0.2, "held-out share where a dataset has no official split", low=0.01,
           high=0.9),
    Option("data.num_samples", 8000, "number of training points of generated data (2-D toys, gmm)", low=16,
           high=10**7),
    Option("data.gmm_dim", GMM_DIM, "dimension of dataset gmm", low=1, high=4096),
    Option("data.gmm_components", GMM_COMPONENTS, "number of mixture components of dataset gmm", low=1, high=1024),
    Option("data.gmm_covariance", "diagonal", "component covariances of dataset gmm",
           choices=lambda: list(GMM_COVARIANCES)),
    Option("data.flip", False, "mirror each training image left–right with probability 1/2 (images only)"),
    Option("data.twemoji_variants", "keep", "twemoji: keep or drop the skin-tone variants (60 % of the set)",
           choices=lambda: list(TWEMOJI_VARIANTS)),
    Option("data.seed", 0, "seed of the train/held-out split and of generated data", low=0, high=MAX_SEED),
    Option("data.autoencoder", "", "latent diffusion: a local diffusers AutoencoderKL folder (config.json + weights, "
           "e.g. from frugaldiff train-autoencoder); the model trains on its latents of the images and samples are "
           "decoded ('' = pixels; needs pip install -e \".[latent]\")", max_length=4096, predating=""),
    Option("model.name", "auto", "network: auto (unet for images, mlp for vectors), unet, dit (a patch transformer "
           "for images), mlp",
           choices=lambda: ["auto", *NETWORKS.names()]),
    Option("model.preset", "auto", "UNet size by image side: small (≤ 32 px; 16 channels × [1, 2, 4]), medium (≤ 64; "
           "32 × [1, 2, 2, 4]), large (32 × [1, 1, 2, 2, 4]); auto picks by the data; the model.* keys below override",
           choices=lambda: ["auto", *PRESETS]),
    Option("model.channels", "auto", "UNet base channels (auto: the preset's)", low=4, high=1024, auto=int),
    Option("model.channel_mult", "auto", "UNet channel multiplier per resolution (auto: the preset's)", item=int,
           low=1, high=16, min_items=1, auto=list),
    Option("model.num_res_blocks", "auto", "UNet residual blocks per resolution (auto: the preset's)", low=1, high=8,
           auto=int),
    Option("model.attention_resolutions", "auto", "resolutions (sides) with self-attention (auto: the preset's, "
           "about 8 px)", item=int, low=1, high=4096, auto=list),
    Option("model.group_channels", 1, "UNet: GroupNorm in gcd(width / this, 32) groups (1: each channel of the 16- "
           "and 32-channel levels normalised alone; 4 scored worse on twemoji: docs/benchmarks.md)",
           low=1, high=1024, predating=1),
    Option("model.dropout", 0.0, "dropout probability", low=0.0, high=0.9),
    Option("model.num_classes", "auto", "class-conditional on this many labels (a class embedding in the network; "
           "auto: the dataset's labels, none for unlabelled data; 0: unconditional)", low=0, high=100_000, auto=int,
           predating=0),
    Option("model.hidden", 256, "MLP width; DiT token width (a multiple of 64: heads of 64 features)", low=8,
           high=8192),
    Option("model.depth", 4, "MLP residual blocks; DiT transformer blocks", low=1, high=64),
    Option("model.patch_size", 2, "DiT: pixels per side of a patch (a token); must divide the image side", low=1,
           high=64, predating=2),
    Option("diffusion.process", "flow", "noise process", choices=PROCESSES.names),
    Option("diffusion.prediction", "velocity", "what the network predicts",
           choices=PREDICTIONS.names),
    Option("diffusion.timestep_sampler", "logit_normal", "how training draws t",
           choices=TIMESTEP_SAMPLERS.names),
    Option("diffusion.weighting", "none", "loss weight over t (in x0 space)",
           choices=WEIGHTINGS.names),
    Option("diffusion.shift", 1.0, "shift of the noise schedule's log-SNR by −2·ln(shift) (SD3's timestep shift on "
           "flow, simple diffusion's on VP paths; > 1: more time at high noise, for larger images); auto: "
           "√(pixels × channels / 784), the size against MNIST's on which the recipe was tuned", low=0.1, high=100.0,
           auto=float, predating=1.0),
    Option("diffusion.sigma_data", 0.5, "data standard deviation for target and input scaling", low=1e-3,
           high=100.0),
    Option("diffusion.reference_images", "auto", "stable target (Xu et al. 2023): train towards E[x0 | x_t] over the "
           "batch and this many random training images instead of the drawn x0 (0 = off; at least the train split's "
           f"size: all of it); {AUTO_RECIPE}", low=0, auto=int, predating=0),
    Option("train.name", "", "run name (default: dataset-prediction)", max_length=100),
    Option("train.batch_size", 16, "global batch size", low=1, high=65536),
    Option("train.images_seen", 28000, "training budget in images", low=1, high=10**10),
    Option("train.lr", 1e-3, "AdamW learning rate", low=0.0, high=1.0),
    Option("train.lr_schedule", "cosine", "learning rate after warm-up",
           choices=lambda: ["constant", "cosine"]),
    Option("train.warmup_images", 2000, "linear learning-rate warm-up, in images", low=0, high=10**10),
    Option("train.weight_decay", 0.0, "AdamW weight decay", low=0.0),
    Option("train.grad_clip", 1.0, "gradient-norm clipping (0 = off)", low=0.0),
    Option("train.ema_decay", 0.999, "EMA decay (with warm-up (1+n)/(10+n))", low=0.0, high=1.0),
    Option("train.phema_snapshots", 8, "snapshots of two power-function EMAs (EDM2: σ_rel 0.05 and 0.10) kept over the "
           "budget in RUN/phema, from which `frugaldiff ema` reconstructs an EMA of any length (0 = none)", low=0,
           high=1000, predating=0),
    Option("train.label_dropout", 0.1, "share of labels replaced by the null label in conditional training (the "
           "unconditional model classifier-free guidance needs)", low=0.0, high=1.0),
    Option("train.guide_at", "auto", "keep the checkpoint at this share of the budget in RUN/guide, the weaker model "
           "autoguidance (sample.guide = early) guides with (0 = none; auto: 0.8 for a class-conditional model, "
           "0.5 for an unconditional one, as measured in docs/guidance.md)", low=0.0, high=0.99, auto=float,
           predating=0.0),
    Option("train.immiscible", False, "immiscible diffusion (Li et al. 2024): pair each batch's noise draws with its "
           "images by least total distance (a linear assignment) before noising", predating=False),
    Option("train.patch", False, "Patch Diffusion (Wang et al. 2023): train on random crops with two coordinate "
           "channels and sample at full size (image data; diffusion.reference_images must be 0 or auto)",
           predating=False),
    Option("train.patch_full", 0.5, "train.patch: share of steps on full images; the others crop half the side "
           "or (pixels) a quarter, 3:2, one random position per image, as Patch Diffusion", low=0.0, high=1.0,
           predating=0.5),
    Option("train.compile", False, "torch.compile the network for training (inductor: a C++ compiler on a CPU, "
           "Triton on a GPU; without one a notice and eager training). Its first steps compile for minutes "
           "(docs/benchmarks.md): worth it for long runs only", predating=False),
    Option("train.grad_accum", 1, "micro-batches per optimizer step", low=1, high=65536),
    Option("train.precision", "auto", "fp32, bf16, or auto (bf16 autocast where it measures ≥ 5 % faster for "
           "this model and machine; measured once, kept in the cache folder; train-autoencoder: bf16 where the device "
           "has native bf16)",
           choices=lambda: ["auto", "fp32", "bf16"]),
    Option("train.seed", 0, "seed of weights, batches, noise and t", low=0, high=MAX_SEED),
    Option("train.checkpoint_every", 10000, "checkpoint interval in images (0 = only at the end)", low=0,
           high=10**10),
    Option("train.keep_checkpoints", 3, "how many checkpoints to keep", low=1, high=1000),
    Option("train.log_every", 20, "optimizer steps between rows of metrics.csv", low=1, high=10**9),
    Option("train.ledger_bins", 20, "equal-width t bins of the loss ledger (per-bin mean and variance of the "
           "training loss in metrics.csv) and of the held-out grid", low=1, high=1000),
    Option("train.heldout_every", 4000, "images between held-out losses per t bin on a fixed (image, t, noise) "
           "grid (heldout_t<bin> in metrics.csv; 0 = off)", low=0, high=10**10),
    Option("train.heldout_per_bin", 32, "held-out grid draws per t bin", low=1, high=100_000),
    Option("train.tensorboard", True, "also log metrics.csv's numbers to RUN/tensorboard when the tensorboard "
           "package is installed (pip install 'frugaldiff[tensorboard]')"),
    Option("train.eval_every", 0, "images between evaluations of EMA samples (eval_<metric> in metrics.csv, "
           "eval.png; 0 = off)", low=0, high=10**10),
    Option("train.eval_samples", 256, "samples generated (seed sample.seed) for each evaluation", low=10,
           high=100_000),
    Option("train.device", "auto", "auto, cpu, cuda or mps", choices=lambda: ["auto", "cpu", "cuda", "mps"]),
    Option("autoencoder.factor", "auto", "train-autoencoder: downsampling factor per side, a power of 2 (auto: the "
           "one giving about 32 × 32 latents, from 2 to 8: 4 at 128 px, as measured in docs/latent.md)", low=1,
           high=64, auto=int),
    Option("autoencoder.latent_channels", 4, "train-autoencoder: latent channels", low=1, high=64),
    Option("autoencoder.channels", 16, "train-autoencoder: width of the full-resolution level (each level down "
           "doubles it, up to 4×)", low=8, high=512),
    Option("autoencoder.group_channels", 4, "train-autoencoder: channels per GroupNorm group at the full-resolution "
           "level (gcd(autoencoder.channels / this, 32) groups; 4 as Stable Diffusion's autoencoder: one channel per "
           "group reconstructed 2.9 dB worse at 128 px, docs/latent.md)", low=1, high=512, predating=1),
    Option("autoencoder.batch_size", 16, "train-autoencoder: batch size", low=1, high=65536),
    Option("autoencoder.images_seen", 12000, "train-autoencoder: training budget in images", low=1, high=10**10),
    Option("autoencoder.lr", 1e-3, "train-autoencoder: AdamW learning rate (warm-up and schedule: train.*)",
           low=0.0, high=1.0),
    Option("autoencoder.kl_weight", 1e-6, "train-autoencoder: weight of the KL term (per image, summed over latent "
           "values)", low=0.0, high=1.0),
    Option("autoencoder.gradient_weight", 0.0, "train-autoencoder: weight of the L1 error of image differences "
           "(edges)", low=0.0, high=100.0),
    Option("autoencoder.ema_decay", 0.999, "train-autoencoder: EMA decay of the exported weights", low=0.0,
           high=1.0),
    Option("sample.solver", "dpm++2m", "generation solver (measured in docs/guidance.md)", choices=SOLVERS.names),
    Option("sample.steps", 10, "solver steps", low=1, high=10000),
    Option("sample.schedule", "karras", "time spacing of solver steps",
           choices=SCHEDULES.names),
    Option("sample.eta", 0.0, "DDIM η (0 = deterministic)", low=0.0, high=1.0),
    Option("sample.clip", True, "clamp x̂0 of images to [-1, 1] while generating (vectors are never clamped)"),
    Option("sample.guidance", "auto", "guidance weight w: x̂0 = x̂0_guide + w·(x̂0 − x̂0_guide) (1 = none; auto: "
           "2 for autoguidance of an unconditional model, else 1, as measured in docs/guidance.md)", low=0.0,
           high=100.0, auto=float, predating=1.0),
    Option("sample.guide", "auto", "what guidance contrasts with: cfg (the model without its label, classifier-free), "
           "early (the run's checkpoint at train.guide_at, autoguidance), none, or auto (cfg for conditional models, "
           "early where a run kept one, else none)", choices=lambda: list(GUIDES)),
    Option("sample.guidance_interval", [0.0, 1.0], "guide only for t in [lo, hi] (Kynkäänniemi et al. 2024)",
           item=float, low=0.0, high=1.0, min_items=2),
    Option("sample.n", 64, "samples drawn for the grid at the end of training", low=1, high=100_000),
    Option("sample.seed", 0, "seed of generation", low=0, high=MAX_SEED),
]


def parameter_options(group: str, registry: Registry[Any]) -> list[Option]:
    """Options ``GROUP.<name>.<param>`` for the keyword-only parameters of each registered class (integers bounded by
    ±MAX_COMPONENT_INT, so no value allocates without limit; each component checks its own ranges too)."""
    options = []
    for name in registry.names():
        factory = registry.get(name)
        summary = (inspect.getdoc(factory) or name).splitlines()[0].rstrip(".")
        for param in inspect.signature(factory).parameters.values():
            if param.kind is not param.KEYWORD_ONLY or param.default is param.empty:
                continue
            default, item = param.default, None
            if isinstance(default, list):
                item = type(default[0]) if default else str
            bound = MAX_COMPONENT_INT if int in (type(default), item) else None
            options.append(Option(f"{group}.{name}.{param.name}", default, f"{name}: {summary}", item=item,
                                  low=-bound if bound else None, high=bound))
    return options


OPTIONS += (parameter_options("diffusion", PREDICTIONS) + parameter_options("timestep_sampler", TIMESTEP_SAMPLERS)
            + parameter_options("weighting", WEIGHTINGS))
#: The recipe's timestep-sampler parameters: "auto" by default, resolved with diffusion.reference_images.
DATA_DEPENDENT = tuple(key for key in FRUGAL_RECIPE if key.startswith("timestep_sampler."))
OPTIONS = [replace(o, default="auto", auto=type(o.default), predating=o.default, help=f"{o.help}; {AUTO_RECIPE}")
           if o.key in DATA_DEPENDENT else o for o in OPTIONS]
OPTION_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}


def component_params(config: Config, group: str, name: str) -> dict[str, Any]:
    """The configured keyword parameters of component ``name`` in ``group`` (e.g. a timestep sampler)."""
    prefix = f"{group}.{name}."
    return {key[len(prefix):]: config[key] for key in OPTION_BY_KEY if key.startswith(prefix)}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; keys that are already dotted pass through. Iterative, so any depth works."""
    flat: dict[str, Any] = {}
    stack = [(prefix, iter(tree.items()))]
    while stack:
        base, items = stack[-1]
        for key, value in items:
            if isinstance(value, Mapping):
                stack.append((f"{base}{key}.", iter(value.items())))
                break
            flat[f"{base}{key}"] = value
        else:
            stack.pop()
    return flat


def _unknown_key(key: str) -> FrugalError:
    close = difflib.get_close_matches(key, OPTION_BY_KEY, n=1) if len(key) <= 200 else []
    hint = f"did you mean '{close[0]}'? " if close else ""
    return FrugalError(f"unknown config key {short_repr(key)}; {hint}run `frugaldiff config` to list every key")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' → ('train.lr', 0.0003); values are TOML literals, bare words are strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FrugalError(f"--set needs KEY=VALUE, got {short_repr(text)}; e.g. --set train.batch_size=16")
    if "\n" in raw:
        raise FrugalError(f"--set {key}= holds a line break; give one TOML value on one line")
    try:
        value = parse_toml(f"v = {raw}")["v"]
    except FrugalError as e:
        if "nest too deeply" in str(e):
            raise FrugalError(f"--set {key}= {e}; give a flat value") from None
        value = raw.strip()
    return key, value


class Config:
    """A validated, fully resolved configuration. Read keys as ``cfg["train.lr"]`` or ``cfg.train.lr``."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        resolved = {o.key: o.default for o in OPTIONS}
        for key, value in flatten(values or {}).items():
            if key not in OPTION_BY_KEY:
                raise _unknown_key(key)
            resolved[key] = OPTION_BY_KEY[key].check(value)
        self._values = resolved
        self._check_combinations()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Iterable[str] = (), saved: bool = False) -> Config:
        """Defaults, then the TOML file at ``path``, then ``KEY=VALUE`` overrides. ``saved``: the file is a config a
        run saved (every key), so keys added since it was written take their ``predating`` value, not today's
        default."""
        values: dict[str, Any] = flatten(read_toml(path)) if path is not None else {}
        if saved:
            values.update({o.key: o.predating for o in OPTIONS if o.key not in values and o.predating is not None})
        values.update(parse_override(o) for o in overrides)
        return cls(values)

    def updated(self, values: Mapping[str, Any]) -> Config:
        """A copy with some keys changed (dotted or nested)."""
        return Config({**self._values, **flatten(values)})

    def _check_combinations(self) -> None:
        if self["train.batch_size"] % self["train.grad_accum"]:
            raise FrugalError(
                f"train.batch_size ({self['train.batch_size']}) must be divisible by train.grad_accum "
                f"({self['train.grad_accum']}); change one of them"
            )
        with torch.random.fork_rng(devices=[]):  # components that build modules draw from torch's generator
            self._check_components()

    def _check_components(self) -> None:
        process = self.process()
        self.prediction(process)
        for name in PREDICTIONS.names():  # the parameters of unused types too, on the process that defines them all
            params = component_params(self, "diffusion", name)
            if params and name != self["diffusion.prediction"]:
                PREDICTIONS.create(name, PROCESSES.create("vp-linear"), self["diffusion.sigma_data"], **params)
        params = {name: {key: value for key, value in values.items() if value != "auto"}
                  for name, values in self.timestep_sampler_params().items()}  # "auto": resolved when a run is built
        for name in TIMESTEP_SAMPLERS.names():  # parameters of every component, used or not, must be valid
            self._timestep_sampler(process, name, params)
        for name in WEIGHTINGS.names():
            self.weighting(name)

    def process(self) -> NoiseProcess:
        """A new instance of the configured noise process."""
        return PROCESSES.create(self["diffusion.process"])

    def prediction(self, process: NoiseProcess) -> PredictionType:
        """The configured prediction type on ``process`` (with its ``diffusion.<name>.*`` parameters)."""
        name = self["diffusion.prediction"]
        return PREDICTIONS.create(name, process, self["diffusion.sigma_data"],
                                  **component_params(self, "diffusion", name))

    def timestep_sampler(self, process: NoiseProcess, name: str | None = None) -> TimestepSampler:
        """The configured timestep sampler (or sampler ``name``) on ``process``, seeded with ``train.seed``; its
        "auto" parameters must have been resolved (:func:`frugaldiff.components.resolved_recipe`)."""
        params = self.timestep_sampler_params()
        auto = [key for key in DATA_DEPENDENT if self[key] == "auto"]
        if auto:
            raise FrugalError(f"{auto[0]} = auto is resolved when a run is built, and this config was not; give "
                              "it a value (or resolve it with frugaldiff.components.resolved_recipe)")
        return self._timestep_sampler(process, name or self["diffusion.timestep_sampler"], params)

    def _timestep_sampler(self, process: NoiseProcess, name: str, params: dict[str, dict[str, Any]]) -> TimestepSampler:
        return TIMESTEP_SAMPLERS.create(name, process=process, seed=self["train.seed"], params=params, **params[name])

    def timestep_sampler_params(self) -> dict[str, dict[str, Any]]:
        """Every timestep sampler's configured parameters, by sampler name."""
        return {n: component_params(self, "timestep_sampler", n) for n in TIMESTEP_SAMPLERS.names()}

    def weighting(self, name: str | None = None) -> Weighting:
        """The configured loss weighting (or weighting ``name``)."""
        name = name or self["diffusion.weighting"]
        return WEIGHTINGS.create(name, **component_params(self, "weighting", name))

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise _unknown_key(key)
        value = self._values[key]
        return list(value) if isinstance(value, list) else value

    def __getattr__(self, section: str) -> _Section:
        if section.startswith("_") or not any(k.startswith(section + ".") for k in self._values):
            raise AttributeError(section)
        return _Section(self, section)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and other._values == self._values

    def to_dict(self) -> dict[str, Any]:
        """Nested dictionary of every key."""
        tree: dict[str, Any] = {}
        for key, value in self._values.items():
            *sections, leaf = key.split(".")
            node = tree
            for s in sections:
                node = node.setdefault(s, {})
            node[leaf] = value
        return tree

    def to_toml(self, comments: bool = False) -> str:
        """The resolved config as TOML; with ``comments``, each key's help and valid values."""
        return dump_toml(self.to_dict(), comments=comments)

    def save(self, path: str | Path) -> None:
        """Write ``to_toml()`` atomically."""
        atomic_write_text(Path(path), self.to_toml())


class _Section:
    """``cfg.train`` → attribute access to the keys of one group."""

    def __init__(self, config: Config, name: str) -> None:
        self._config, self._name = config, name

    def __getattr__(self, key: str) -> Any:
        return self._config[f"{self._name}.{key}"]


#: The largest config file read (a config of every key is about 5 kB).
MAX_CONFIG_BYTES = 1 << 20


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, with one-line errors for a file that is missing, unreadable, too large, not UTF-8 text or
    not valid TOML."""
    path = Path(path)
    where = f"config file {short_repr(str(path))}"
    try:
        if path.is_dir():
            raise FrugalError(f"{where} is a folder; pass a TOML file to --config")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise FrugalError(f"{where} does not exist; check the path given to --config") from None
    except OSError as e:
        raise FrugalError(f"cannot read {where} ({e.strerror or e}); pass a readable TOML file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise FrugalError(f"{where} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a short TOML file")
    try:
        return parse_toml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FrugalError(f"{where} is not UTF-8 text; save it as UTF-8 TOML (see `frugaldiff config`)") from None
    except FrugalError as e:
        raise FrugalError(f"{where} is not valid TOML ({e}); fix the file") from None


def parse_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads``, with nesting too deep to parse reported as a FrugalError."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FrugalError(str(e)) from None
    except RecursionError:
        raise FrugalError("its arrays or tables nest too deeply") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(tree: Mapping[str, Any], comments: bool = False, prefix: str = "") -> str:
    """Write a nested dict of scalars and lists as TOML tables."""
    lines, tables = [], []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
            continue
        line = f"{key} = {_toml_value(value)}"
        option = OPTION_BY_KEY.get(prefix + key)
        if comments and option is not None:
            line = f"{line:<40} # {option.help}; {option.describe()}"
        lines.append(line)
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        out += f"\n[{prefix}{key}]\n" + dump_toml(value, comments, f"{prefix}{key}.")
    return out.lstrip("\n")
