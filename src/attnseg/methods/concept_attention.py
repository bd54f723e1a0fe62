"""ConceptAttention (Helbling et al. 2025, "ConceptAttention: Diffusion Transformers Learn Highly Interpretable
Features"): saliency in the output space of a transformer's joint attention.

Each label, and each background word, becomes a *concept token*: its text-encoder states ride along at the end of the
text stream through every block, with the text stream's own projections, norms and MLPs. No image or prompt token
attends to a concept token, so the forward is the plain one for them; a concept token attends to the image tokens
and to the other concepts, not to the prompt (:func:`~attnseg.diffusion.capture.concept_mask`). In each read layer
the image tokens' attention outputs are compared with the concept tokens' by a dot product and a softmax over the
concepts (:func:`~attnseg.diffusion.capture.concept_maps`); the maps are averaged over the read layers (and over
noise draws). A pixel's label is its most probable concept; the background is the sum of the background concepts'
probabilities, or, with no background word, T2M's rule over min-max label maps (as the cross baseline).

Only joint attention carries concept tokens: SD3 / SD3.5 and Flux. A UNet's backbone refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect, finest_grid
from attnseg.diffusion.prompts import TokenSpans
from attnseg.methods.base import CapturePlan
from attnseg.ops.maps import background_score, grid_of, minmax, resize_columns, with_background


@dataclass
class ConceptAttentionConfig:
    """Settings of ConceptAttention on a real image (one noised forward, as the other real-image methods)."""

    timestep: int = 150
    """Noise level t of T = 1000 at which the real image is read (ours: the cross baseline's, so that the two differ
    in their maps only; the paper averages over the steps of a generation or of an encoded image's denoising)."""
    template: str = "t2m"
    """Prompt of the text stream (the cross baseline's). The concept tokens are the labels, not the prompt."""
    layers: LayerSelect = field(default_factory=lambda: LayerSelect(kind="cross"))
    """Joint layers read (their modules' concept maps), averaged: every joint layer here (ours); the paper's Flux
    setting reads the last double-stream blocks, 15-18 (preset ``flux``)."""
    background_words: tuple[str, ...] = ("background",)
    """Concepts added after the labels, whose probabilities sum to the background score (ours: the paper's concept
    sets name the scene's other things; with one label a softmax over one concept would be 1 everywhere). Empty: no
    background concept, T2M's background rule over min-max label maps."""
    draws: int = 1
    """Noise draws averaged."""
    bg_power: float = 2.0
    """With no background word: T2M's background exponent."""
    bg_threshold: float | None = None
    """With no background word: None, T2M's paper rule (1 - max)^2; a value, its code's (2 thr - max)^2."""


CONCEPT_PRESETS: dict[str, ConceptAttentionConfig] = {
    "default": ConceptAttentionConfig(),
    # The paper's Flux layers: double-stream blocks 15-18 of FLUX.1's 19 (clipped to the last ones on smaller models).
    "flux": ConceptAttentionConfig(layers=LayerSelect(kind="cross", blocks=("joint",), take=(15, 19))),
}


def concept_name(cross_layer: str) -> str:
    """The store key of a joint module's concept map, from its cross layer's name (``<module>:cross``)."""
    module, _, _ = cross_layer.partition(":")
    return f"{module}:concept"


class ConceptAttention:
    """ConceptAttention's scores; the predictor hands its backbone the concept tokens the plan names."""

    name = "concept-attention"

    def __init__(self, config: ConceptAttentionConfig | None = None) -> None:
        self.config = config or ConceptAttentionConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        layers = self.config.layers.resolve(inventory, latent)
        if any(lay.source not in ("joint", "single") for lay in layers):
            raise ValueError(
                "ConceptAttention reads joint attention (SD3, SD3.5, Flux): this model's cross-attention layers "
                f"({layers[0].name}, ...) take no concept tokens"
            )
        return CapturePlan(
            cross={},
            self_names=[],
            grid=finest_grid(layers, latent),
            concepts={concept_name(lay.name): 1.0 for lay in layers},
            concept_background=tuple(self.config.background_words),
        )

    def scores(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        """(B, P, K + 1) scores on ``plan.grid``, background first, from the concept maps (B, P_l, K + background
        words) of the plan's modules, whose first K concepts are the labels."""
        k = len(spans.spans)
        total = None
        for name, w in plan.concepts.items():
            m = store.mean(name).float()
            m = resize_columns(m, grid_of(m.shape[1], plan.grid), plan.grid) * w
            total = m if total is None else total + m
        maps = total / sum(plan.concepts.values())
        fg = maps[:, :, :k]
        if plan.concept_background:
            return with_background(fg, maps[:, :, k:].sum(dim=2))
        fg = minmax(fg)
        return with_background(fg, background_score(fg, self.config.bg_power, self.config.bg_threshold))
