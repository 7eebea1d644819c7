"""Networks that map (x_t, t) to a prediction (a UNet for images, an MLP for vectors), and the denoiser that
wraps one with its prediction type and loss uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .datasets import patch_coordinates
from .errors import FrugalError
from .noise import NoiseProcess, bcast
from .prediction import PredictionType
from .registry import Registry
from .weighting import Uncertainty

NETWORKS: Registry[nn.Module] = Registry("model.name")

#: UNet sizes by image side: channels, multipliers per resolution, residual blocks, and the side divided by which
#: gives the resolution with attention (about 8 px).
PRESETS: dict[str, dict[str, object]] = {
    "small": {"channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "attention_every": 4},
    "medium": {"channels": 32, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attention_every": 8},
    "large": {"channels": 32, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attention_every": 16},
}


def preset_for(side: int) -> str:
    """The preset of images ``side`` pixels wide: small up to 32, medium up to 64, large beyond."""
    return "small" if side <= 32 else "medium" if side <= 64 else "large"


def unet_size(preset: str, side: int) -> dict[str, object]:
    """The UNet keywords of ``preset`` for images of ``side``: attention at ⌈side / attention_every⌉ (none below 16
    px, where the coarsest maps are already tiny)."""
    size = dict(PRESETS[preset])
    every = size.pop("attention_every")
    size["attention_resolutions"] = [-(-side // every)] if side >= 16 else []
    return size


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``scale·t`` (t ∈ [0, 1]), shape [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP."""

    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.base))


class ClassEmbedding(nn.Module):
    """A learned vector per class, added to the time embedding; index ``num_classes`` is the null label (no class),
    which labels of None stand for. With 0 classes (unconditional) it has no parameters and adds nothing."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim) if num_classes else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=0.02)  # as DiT: the labels start as a small nudge

    def forward(self, emb: Tensor, labels: Tensor | None) -> Tensor:
        if self.table is None:
            return emb
        if labels is None:
            labels = torch.full((len(emb),), self.num_classes, dtype=torch.long, device=emb.device)
        return emb + self.table(labels).to(emb.dtype)


def norm_groups(channels: int, group_channels: int, section: str) -> int:
    """gcd(channels / group_channels, 32): the GroupNorm groups of ``channels`` (the ``section.group_channels``
    option; refused in one line when it does not divide them)."""
    if channels % group_channels:
        raise FrugalError(f"{section}.channels {channels} is not a multiple of {section}.group_channels "
                          f"{group_channels}; use e.g. {section}.group_channels = 4")
    return math.gcd(channels // group_channels, 32)


def _norm(channels: int, group_channels: int = 1) -> nn.GroupNorm:
    """GroupNorm in :func:`norm_groups` groups (one group when that is under 4)."""
    groups = norm_groups(channels, group_channels, "model")
    return nn.GroupNorm(groups if groups >= 4 else 1, channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, group_channels: int = 1) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin, group_channels), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            _norm(cout, group_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over pixels (heads of 32 channels)."""

    def __init__(self, channels: int, group_channels: int = 1) -> None:
        super().__init__()
        self.heads = max(1, channels // 32)
        self.norm = _norm(channels, group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, channels: Sequence[int], cout: int, emb_dim: int, dropout: float, attend: bool,
                 group_channels: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, cout, emb_dim, dropout, group_channels) for c in channels)
        self.attn = nn.ModuleList(Attention(cout, group_channels) if attend else nn.Identity() for _ in channels)


@NETWORKS.register("unet")
class UNet(nn.Module):
    """A DDPM-style UNet: GroupNorm (``group_channels`` channels per group at the base width), sinusoidal time
    embedding, attention at chosen resolutions."""

    def __init__(self, in_channels: int, out_channels: int, image_size: int, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (7,), dropout: float = 0.0, num_classes: int = 0,
                 group_channels: int = 1) -> None:
        super().__init__()
        norm_groups(channels, group_channels, "model")  # refuses a group size that does not divide the base width
        emb_dim = 4 * channels
        self.time = TimeEmbedding(channels, emb_dim)
        self.label = ClassEmbedding(num_classes, emb_dim)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        attend = [(image_size + 2**i - 1) // 2**i in attention_resolutions for i in range(len(widths))]
        skips, cur = [channels], channels
        for i, width in enumerate(widths):
            ins = [cur] + [width] * (num_res_blocks - 1)
            self.down.append(Level(ins, width, emb_dim, dropout, attend[i], group_channels))
            skips += [width] * num_res_blocks
            cur = width
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = Level([cur, cur], cur, emb_dim, dropout, True, group_channels)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            ins = [cur + skips.pop()] + [width + skips.pop() for _ in range(num_res_blocks)]
            self.up.append(Level(ins, width, emb_dim, dropout, attend[i], group_channels))
            cur = width
            if i > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.out = nn.Sequential(_norm(cur, group_channels), nn.SiLU(), nn.Conv2d(cur, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.label(self.time(t), labels)
        h = self.stem(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(h, emb))
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attn, strict=True):
            h = attn(block(h, emb))
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return self.out(h)


def sincos_positions(rows: int, columns: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position features [rows·columns, dim] of a token grid (DiT's): half of the features encode
    the row, half the column."""
    quarter = dim // 4
    freqs = 1 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(columns, dtype=torch.float32),
                          indexing="ij")
    angles = [axis.flatten()[:, None] * freqs for axis in (r, c)]
    return F.pad(torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1), (0, dim - 4 * quarter))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT): shift, scale and gate of both sublayers from the time
    (and label) embedding, the gates starting at 0 so the block starts as the identity."""

    def __init__(self, width: int, heads: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = (nn.LayerNorm(width, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 6 * width))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb)[:, None].chunk(6, dim=-1)
        b, n, w = h.shape
        x = self.norm1(h) * (1 + scale1) + shift1
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        h = h + gate1 * self.proj(attended)
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


@NETWORKS.register("dit")
class DiT(nn.Module):
    """A small patch transformer (DiT / JiT style): ``patch_size``² pixel patches as tokens of ``width`` features
    with fixed sin-cos positions, ``depth`` adaLN-Zero blocks of 64-feature heads, a zero-initialised linear
    decoder back to pixels. Its matrix products suit matrix units (AMX, tensor cores) better than narrow
    convolutions."""

    def __init__(self, in_channels: int, out_channels: int, image_size: int, width: int = 256, depth: int = 4,
                 patch_size: int = 2, dropout: float = 0.0, num_classes: int = 0) -> None:
        super().__init__()
        if image_size % patch_size:
            raise FrugalError(f"model.patch_size = {patch_size} does not divide the image side {image_size}; choose "
                              f"a divisor of {image_size}")
        if width % 64 and width >= 64 or width < 8:
            raise FrugalError(f"model.hidden = {width} must be a multiple of 64 for model.name = dit (its heads have "
                              "64 features), or a width of 8 to 63 (one head)")
        self.patch, self.out_channels = patch_size, out_channels
        emb_dim = width
        self.time = TimeEmbedding(min(width, 256), emb_dim)
        self.label = ClassEmbedding(num_classes, emb_dim)
        self.embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(DiTBlock(width, max(1, width // 64), emb_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * width))
        self.decode = nn.Linear(width, patch_size * patch_size * out_channels)
        for layer in (self.ada[-1], self.decode):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        b, _, height, width = x.shape
        rows, columns = height // self.patch, width // self.patch
        emb = self.label(self.time(t), labels)
        h = self.embed(x).flatten(2).transpose(1, 2)  # [B, tokens, width]
        h = h + sincos_positions(rows, columns, h.shape[-1]).to(h)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.ada(emb)[:, None].chunk(2, dim=-1)
        out = self.decode(self.norm(h) * (1 + scale) + shift)  # [B, tokens, p·p·C]
        out = out.view(b, rows, columns, self.patch, self.patch, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, height, width)


@NETWORKS.register("mlp")
class MLP(nn.Module):
    """A residual MLP for vector data; the time embedding is added in every block."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 256, depth: int = 4,
                 dropout: float = 0.0, num_classes: int = 0) -> None:
        super().__init__()
        self.time = TimeEmbedding(min(hidden, 128), hidden)
        self.label = ClassEmbedding(num_classes, hidden)
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_features))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.label(self.time(t), labels)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


class Denoiser(nn.Module):
    """A network together with its prediction type (the preconditioner) and the loss uncertainty of its weighting.

    ``forward`` gives the raw output (trained by the prediction type's loss); :meth:`denoise` gives x̂0, which
    every solver uses. A mixed prediction's gate and EDM2's learned uncertainty are submodules, so the
    optimizer, the EMA, DDP and checkpoints carry them with the network.
    """

    def __init__(self, net: nn.Module, prediction: PredictionType, uncertainty: Uncertainty | None = None,
                 coordinates: bool = False) -> None:
        super().__init__()
        self.net = net
        #: Patch Diffusion: the network also reads each pixel's position in the full image (two channels)
        self.coordinates = coordinates
        self.prediction = prediction
        self.uncertainty = uncertainty if uncertainty is not None else Uncertainty()
        #: A latent run's :class:`~frugaldiff.latent.Autoencoder`: generation decodes with it (None: pixels)
        self.autoencoder: Any = None
        #: A conditional run's train-split images per class: generation's default labels follow them, so that
        #: samples imitate the data as a whole (None: balanced classes)
        self.class_counts: list[int] | None = None

    @property
    def process(self) -> NoiseProcess:
        return self.prediction.process

    def prediction_parameters(self) -> list[nn.Parameter]:
        """The parameters x̂0 depends on (the network's and a mixed prediction's gate), not the uncertainty's:
        gradient clipping bounds their step."""
        return [p for name, p in self.named_parameters() if not name.startswith("uncertainty.")]

    @property
    def num_classes(self) -> int:
        """How many classes the network is conditioned on (0: unconditional, or a network without a label input)."""
        return getattr(getattr(self.net, "label", None), "num_classes", 0)

    @property
    def null_label(self) -> int:
        """The label that stands for no class (classifier-free guidance's unconditional model)."""
        return self.num_classes

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, coords: Tensor | None = None) -> Tensor:
        """The raw output for ``x_t`` at ``t``; a patch-trained network also takes its pixels' coordinates
        (default: the whole image's, as when sampling)."""
        x = x_t * bcast(self.prediction.input_scale(t), x_t)
        if self.coordinates:
            if coords is None:
                side = x_t.shape[-1]
                coords = patch_coordinates(side, side, torch.zeros(len(x_t), dtype=torch.long),
                                           torch.zeros(len(x_t), dtype=torch.long)).to(x_t.device)
            x = torch.cat([x, coords.to(x.dtype)], 1)
        return self.net(x, t, labels)

    def denoise(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """x̂0(x_t, t) in float32, for ``labels`` (None: no class)."""
        return self.prediction.to_x0(self(x_t, t, labels).float(), x_t, t)
