"""Grounded Diffusion's grounding module (Li et al., "Open-vocabulary Object Segmentation with Diffusion Models").

A small network trained on top of the frozen model (section 4.2, appendix A):

- **visual encoder**: the UNet's block outputs, concatenated per resolution (:mod:`attnseg.diffusion.features`),
  each reduced by a 1x1 conv, then from the coarsest up: upsample, concatenate with the next resolution, mix-conv
  (two 3x3 convs with batch-norm and a residual) -> fused features ``F`` (B, D, s, s) on the finest grid;
- **fusion**: the text-encoder embedding of each class word is a query of a 3-layer transformer decoder over visual
  tokens (``p x p`` patches of ``F``); an MLP maps each output to a mask embedding ``e`` (B, N, D);
- **masks**: logits ``F . e`` at image resolution (eq. 5-6); trained with BCE against oracle masks; mask =
  sigmoid > 0.5.

Sizes are far below the paper's (D 112 for three resolutions instead of 240 for four, width 128 instead of 512): the
module is trained on a few hundred 64-px images on a CPU; the defaults' sources are in :class:`GroundingConfig`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GroundingConfig:
    """Shape of the module. The first three fields describe the diffusion model it reads."""

    sides: tuple[int, ...]
    """Grid sides of the feature resolutions, coarsest first (the UNet's)."""
    in_channels: tuple[int, ...]
    """Channels of the concatenated block outputs at each side (the UNet's)."""
    text_dim: int
    """Width of the text encoder's token embeddings (the queries)."""
    image_size: int = 64
    """Side of the mask logits: the generated image's (paper: 512, Stable Diffusion's images; the embedded model's 64)."""
    base_channels: int = 16
    """Channels of the coarsest resolution after its 1x1 conv, doubled at each finer one (the authors' code,
    ldm/models/seg_module.py: 16, 32, 64, 128 over four resolutions)."""
    patch: int = 2
    """Side of a visual token's patch of the fused features (paper, appendix A: 4 on SD's 64-px latent grid, 256
    tokens; ours: 2 on the embedded model's 16-px grid, 64 tokens)."""
    width: int = 128
    """Width of the transformer decoder (paper: 512; ours: 128 is enough for 8 words and trains in minutes on a CPU)."""
    heads: int = 4
    """Attention heads of the decoder (paper's code: 8 at width 512; ours: 4 at 128, the same head width 32)."""
    ffn: int = 256
    """Hidden width of the decoder's feed-forward layers (paper's code: 2048 at width 512; ours: 2 x width)."""
    layers: int = 3
    """Decoder layers (paper, section 4.2: three)."""
    mlp_layers: int = 3
    """Layers of the MLP from decoder output to mask embedding (the authors' code: 3)."""

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * 2**i for i in range(len(self.sides)))

    @property
    def fused_channels(self) -> int:
        """D: channels of the fused visual features and of the mask embeddings."""
        return sum(self.level_channels)


class MixConv(nn.Module):
    """The paper's mix-conv (section 4.2; ``SegBlock`` of its code): BN-ReLU-conv-BN-ReLU-conv, plus the input.

    The paper calls its batch-norm conditional (after BigDatasetGAN); its code passes no condition, which leaves a
    batch-norm without affine parameters, as here.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels, eps=1e-4, affine=False)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(channels, eps=1e-4, affine=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(h)))


class VisualEncoder(nn.Module):
    """Block outputs of every resolution -> fused features (B, D, s, s) on the finest grid (paper fig. 3)."""

    def __init__(self, cfg: GroundingConfig) -> None:
        super().__init__()
        self.sides = cfg.sides
        out = cfg.level_channels
        self.reduce = nn.ModuleList(nn.Conv2d(c, o, 1, bias=False) for c, o in zip(cfg.in_channels, out, strict=True))
        self.mix = nn.ModuleList(MixConv(sum(out[: i + 1])) for i in range(1, len(out)))

    def forward(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        missing = [s for s in self.sides if s not in features]
        if missing:
            raise ValueError(f"features of grid sides {missing} are missing (the module reads {list(self.sides)})")
        f = self.reduce[0](features[self.sides[0]].float())
        for i, side in enumerate(self.sides[1:], 1):
            f = F.interpolate(f, size=(side, side), mode="bilinear", align_corners=False)
            f = self.mix[i - 1](torch.cat([f, self.reduce[i](features[side].float())], dim=1))
        return f


class DecoderLayer(nn.Module):
    """A pre-norm transformer decoder layer: queries attend to each other, then to the visual tokens (the paper's
    code: no positional encodings, no biases in the attention projections)."""

    def __init__(self, width: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.ReLU(), nn.Linear(ffn, width))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        h = self.norm2(q)
        q = q + self.cross_attn(h, tokens, tokens, need_weights=False)[0]
        return q + self.ffn(self.norm3(q))


def mask_logits(visual: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Paper eq. 6: the dot product of each pixel's features (B, D, H, W) with each mask embedding (B, N, D)."""
    return torch.einsum("bdhw,bnd->bnhw", visual, embeddings)


def grounding_loss(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Paper section 4.3: binary cross-entropy of the masks ``keep`` (B, N) selects, mean over their pixels.

    logits, targets: (B, N, H, W); ``keep`` drops padding queries and, in "training without zero masks", the
    queries whose oracle mask is empty. Zero when nothing is kept.
    """
    per_mask = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").flatten(2).mean(2)
    return (per_mask * keep).sum() / keep.sum().clamp_min(1)


def binary_masks(logits: torch.Tensor) -> torch.Tensor:
    """Paper section 4.3: a pixel belongs to a class where sigmoid(logit) > 0.5, i.e. logit > 0."""
    return logits > 0


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """(K, H, W) mask logits of one image's classes -> (H, W) long: k + 1 for the class of the highest logit where it
    is above 0 (sigmoid > 0.5), else 0 (background); where masks overlap the most confident class wins."""
    top, arg = logits.max(dim=0)
    return torch.where(top > 0, arg + 1, torch.zeros_like(arg))


@dataclass(frozen=True)
class GroundedConfig:
    """``attnseg generate --method grounding``: a trained module's masks of the images generated for its prompts
    (:mod:`attnseg.grounder` pairs the module with the model). The module is not a setting: it is a file
    (``--module``; default: the one shipped with the embedded model)."""

    steps: int = 20
    """Denoising steps; the module reads the block outputs of the last one (paper eq. 2). The shipped module was
    trained on 20-step generations (``attnseg grounding train --gen-steps``)."""
    guidance: float = 5.0
    """Classifier-free guidance scale (the shipped module's training generations: 5)."""


GROUNDED_PRESETS = {"paper": GroundedConfig()}


class Grounded:
    """The label map of a grounded generation (the registry's ``build`` for ``grounding``)."""

    name = "grounding"

    def __init__(self, config: GroundedConfig) -> None:
        self.config = config

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """One image's sigmoid scores (K, H, W) -> (H, W) uint8: k + 1 where class k scores highest and above 0.5
        (paper section 4.3), else 0; the same map as :func:`label_map` of the logits."""
        top, arg = probs.max(dim=0)
        return torch.where(top > 0.5, arg + 1, torch.zeros_like(arg)).to(torch.uint8)


class GroundingModule(nn.Module):
    """The grounding module: ``forward(features, queries, padding)`` -> mask logits (B, N, image, image).

    features: {grid side: (B, C, side, side)}; queries: (B, N, text_dim) class-word embeddings; padding: (B, N) True
    where a query is padding (images with fewer classes than the batch's largest).
    """

    def __init__(self, config: GroundingConfig) -> None:
        super().__init__()
        self.config = config
        d = config.fused_channels
        self.visual = VisualEncoder(config)
        self.to_k = nn.Linear(d * config.patch**2, config.width, bias=False)
        self.to_q = nn.Linear(config.text_dim, config.width, bias=False)
        self.decoder = nn.ModuleList(DecoderLayer(config.width, config.heads, config.ffn) for _ in range(config.layers))
        dims = [config.width] * config.mlp_layers + [d]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(
        self, features: Mapping[int, torch.Tensor], queries: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        fused = self.visual(features)
        side = fused.shape[-1]
        if side % self.config.patch:
            raise ValueError(f"the finest grid side {side} is not a multiple of the patch side {self.config.patch}")
        tokens = self.to_k(F.unfold(fused, self.config.patch, stride=self.config.patch).transpose(1, 2))
        q = self.to_q(queries.float())
        for layer in self.decoder:
            q = layer(q, tokens, padding)
        for i, lin in enumerate(self.mlp):
            q = lin(q) if i == len(self.mlp) - 1 else F.relu(lin(q))
        size = self.config.image_size
        visual = F.interpolate(fused, size=(size, size), mode="bilinear", align_corners=False)
        return mask_logits(visual, q)
