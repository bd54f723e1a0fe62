"""Cross-attention baseline (DAAM / DiffuMask "CA"): mean cross maps of the chosen layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect, finest_grid, read_heads
from attnseg.diffusion.prompts import TokenSpans
from attnseg.methods.base import CapturePlan, fused_cross
from attnseg.ops.maps import background_score, minmax, with_background


@dataclass
class CrossConfig:
    """Settings of the cross-attention baseline.

    The baseline shares T2M's prompt, timestep and label scoring (min-max per label, background
    (1 - max)^2), so that the difference to T2M and iSeg is their refinement alone.
    """

    timestep: int = 150
    """Noise level t of T = 1000 at which the real image is read."""
    template: str = "t2m"
    """Prompt template (see ``attnseg.diffusion.prompts.TEMPLATES``)."""
    cross: LayerSelect | tuple[LayerSelect, ...] = field(default_factory=lambda: LayerSelect(kind="cross"))
    """Layers averaged (one selection or several, their union): every cross-attention layer, as DAAM does; every head
    of each, unless its selection chooses heads."""
    draws: int = 1
    """Noise draws averaged."""
    synonyms: bool = False
    background_words: tuple[str, ...] = ()
    bg_power: float = 2.0
    bg_threshold: float | None = None
    """None: T2M's paper rule (1 - max)^2; a value: its code's (2 thr - max)^2 (0.5 is the paper's rule)."""


EMBEDDED_SD3_CROSS = (
    LayerSelect(kind="cross", names=("transformer_blocks.0.attn:cross",), heads=(0,)),
    LayerSelect(kind="cross", names=("transformer_blocks.1.attn:cross", "transformer_blocks.4.attn:cross"), heads=(1,)),
)
"""The embedded SD3 model's cross maps that its presets average (``cross`` and ``t2m``): single heads, head 0 of joint
block 0 and head 1 of blocks 1 and 4, chosen on validation scenes (`python scripts/probe_sd3.py MODEL heads`)."""

CROSS_PRESETS: dict[str, CrossConfig] = {
    "default": CrossConfig(),
    # The embedded ShapesWorld model (its attnseg.json makes this its default), both settings chosen on validation
    # scenes (docs/EMBEDDED-MODEL-TRAINING.md). Background: ShapesWorld's objects cover 5-20% of the
    # image, and the paper's rule (thr 0.5), made for VOC's large objects, lets every label map spread over the
    # background; the threshold is the one T2M's ablation sweeps (its figure 8). Layers: the decoder's ("chosen
    # layers" of the baseline; the 4-px mid block of this model is inverted and its encoder layers localise colours).
    "embedded": CrossConfig(cross=LayerSelect(kind="cross", blocks=("up",)), bg_threshold=0.7),
    # Seg4Diff (Kim et al. 2025): one joint block of SD3, block 9 of 24, its "semantic grounding expert", read alone
    # (its image-to-text attention); on a smaller transformer the slice is clipped to its last block. The scoring
    # stays the baseline's, so this preset differs from `default` in its layer only.
    "seg4diff": CrossConfig(cross=LayerSelect(kind="cross", blocks=("joint",), take=(9, 10))),
    # The embedded SD3 model (its attnseg.json makes this its default): its heads, the noise level and the background
    # threshold chosen on 100 validation scenes (`python scripts/probe_sd3.py MODEL heads`, a greedy choice of single
    # heads, then `sweep --blocks 0h0+1h1+4h1`), checked on 200 others (docs/EMBEDDED-MODEL-TRAINING.md).
    "embedded-sd3": CrossConfig(timestep=150, cross=EMBEDDED_SD3_CROSS, bg_threshold=0.6),
}


class CrossAttentionBaseline:
    name = "cross"

    def __init__(self, config: CrossConfig | None = None) -> None:
        self.config = config or CrossConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        layers, heads = read_heads(self.config.cross, inventory, latent)
        return CapturePlan.averaged_cross(layers, heads, finest_grid(layers, latent))

    def scores(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        """(B, P, K + 1) scores on ``plan.grid``, background first."""
        fg = minmax(fused_cross(store, plan.cross, spans, plan.grid, heads=plan.cross_heads))
        return with_background(fg, background_score(fg, self.config.bg_power, self.config.bg_threshold))
