"""iSeg (Sun et al. 2024): entropy-reduced self-attention and category-enhanced cross-attention.

Paper section 3 / algorithm 1: one forward at t = 100 with the class-token keys scaled by gamma = 1.6
(Cat-Cross, eq. 8); Cross = decoder cross maps, fused (the resolutions and weights, 16 px 0.7 and 32 px 0.3,
are the authors' code's), each sum-normalised; Self = the high-resolution self-attention of the last decoder
layer (on SD, as the code reads it, ``up_blocks.3.attentions.1``, 64 px) made sharper by one entropy-gradient
step (Ent-Self, eq. 6); N iterations Cross <- Self_ent . normalise(Cross). The ``code`` presets add two steps of
the authors' code that the paper does not describe: only self-attention heads 1 and 2 are averaged, and the fused
cross maps are clustered (KL k-means) and averaged per cluster before the iterations. Sources of every setting:
docs/METHODS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect
from attnseg.diffusion.prompts import TokenSpans
from attnseg.methods.base import CapturePlan, fused_cross, mean_self
from attnseg.ops.cluster import cluster_mean, grid_seeds, kl_kmeans
from attnseg.ops.maps import background_score, max_normalise, minmax, propagate, sum_normalise, with_background

EMBEDDED_SELF_LAYER = LayerSelect(kind="self", ranks=(99,), blocks=("down",), take=(0, 1))
"""The self-attention layer of the "embedded" presets: the first layer of the finest encoder level (the embedded
model's down_blocks.0.attentions.0, 16 px), chosen on validation scenes like T2M's (the decoder layer that T2M reads
scored within 0.5 of it for iSeg, so it was kept)."""


@dataclass
class ISegConfig:
    """Settings of iSeg with the paper's defaults (figure 6: lambda 0.02, N 8, gamma 1.6)."""

    timestep: int = 100
    template: str = "iseg"
    """"a photograph of A and B and other objects and background" """
    gamma: float = 1.6
    """Cat-Cross factor on the class tokens (1 disables it)."""
    cat_cross: str = "keys"
    """"keys": eq. 8, softmax(Q (W . K)^T / sqrt(d)) with the values untouched (the paper's equation); "embedding": the
    class tokens' text embedding scaled, so keys and values (Stable Diffusion's key and value projections have no
    bias), as Algorithm 1 ("category-enhanced text embeddings") and the authors' code do."""
    lam: float = 0.02
    """Ent-Self updating factor lambda."""
    iters: int = 8
    """Refinement iterations N."""
    ent_variant: str = "code"
    """"code": column-max normalise, a += lam log10(e a), clamp, row-normalise (the authors' code);
    "paper": eq. 6 on the raw probabilities, clamp, row-normalise."""
    cross: dict[int, float] = field(default_factory=lambda: {1: 0.7, 2: 0.3})
    """Decoder cross layers by resolution rank -> weight (SD: 16 px 0.7, 32 px 0.3). The paper fuses "the
    cross-attention maps at different decoder layers" and names neither resolutions nor weights: these are the
    authors' code's."""
    normalise_first: bool = False
    """False (ours): each layer's maps are sum-normalised after upsampling to the working grid, so that the weights
    compare maps of equal pixel counts; True: normalised at their own resolution, then upsampled, as the authors'
    code does (the weights then act on maps of different totals)."""
    self_layer: LayerSelect = field(default_factory=lambda: LayerSelect(kind="self", ranks=(3,), blocks=("up",), take=(1, 2)))
    """SD's up_blocks.3.attentions.1 (64 px); the finest decoder layer on smaller UNets."""
    heads: tuple[int, ...] | None = None
    """Self-attention heads to average, 0-based in the module's own head order (None: all, as the paper says
    nothing of heads). The authors' code averages heads (1, 2) of the five of SD 2.1's up_blocks.3.attentions.1
    (wsss/iSeg.py, ``self_attention_maps[64][:, [1, 2]]``)."""
    cluster: bool = False
    """Cluster the pixels of the fused cross maps and give each pixel its cluster's mean map, before the iterations.
    False: the paper (no clustering is described). True: the authors' code's default (wsss/iSeg.py
    ``process_cross_att``, on unless ``--no_use_cluster``): a k-means under the symmetric KL divergence of every
    pixel's vector of fused cross values over all prompt tokens (padding included), seeded on a grid
    (``ops.cluster.kl_kmeans``)."""
    cluster_k: int = 32
    """The code's number of clusters (``DFC_KL(32, ...)``); it sets the seed grid's stride floor(side / sqrt(k)):
    6 x 6 seeds on SD's 64-px grid. Empty clusters are dropped."""
    cluster_iters: int = 20
    """k-means iterations (the code's ``DFC_KL(32, 20, 64)``)."""
    draws: int = 1
    bg_power: float = 2.0
    bg_threshold: float | None = None
    """None: (1 - max)^2 as in T2M; a value: background wins where every label is below it."""
    synonyms: bool = False
    background_words: tuple[str, ...] = ()


ISEG_PRESETS: dict[str, ISegConfig] = {
    "paper": ISegConfig(),
    "wsss-voc": ISegConfig(lam=0.015, iters=10),
    "wsss-coco": ISegConfig(lam=0.1, iters=10, bg_threshold=0.45),
    "ov-voc": ISegConfig(lam=0.015, iters=8),
    "ov-context": ISegConfig(lam=0.002, iters=5),
    "ov-coco": ISegConfig(lam=0.2, iters=10),
    # The embedded ShapesWorld model: same reason as T2M's "embedded" preset, read at the 16-px encoder layer, and
    # the iterations chosen on validation scenes (step-6,500 weights) as the paper chose them per dataset (5-10
    # above): this layer leaks about half of an object cell's attention to the background, so every iteration
    # beyond the first spreads the maps (docs/EMBEDDED-MODEL-TRAINING.md). Background: the code's constant
    # threshold (its COCO preset: 0.45), chosen on the same validation scenes for ShapesWorld's small objects.
    "embedded": ISegConfig(iters=1, self_layer=EMBEDDED_SELF_LAYER, bg_threshold=0.5),
    # The same layer with the paper's iterations (N = 8), without Cat-Cross, and with the paper's background rule
    # (1 - max)^2: ablations on the embedded model.
    "embedded-n8": ISegConfig(self_layer=EMBEDDED_SELF_LAYER, bg_threshold=0.5),
    "embedded-no-cat": ISegConfig(gamma=1.0, iters=1, self_layer=EMBEDDED_SELF_LAYER, bg_threshold=0.5),
    "embedded-paper-bg": ISegConfig(iters=1, self_layer=EMBEDDED_SELF_LAYER),
    # As the authors' code runs it: Cat-Cross on the text embedding (keys and values), cross maps normalised at
    # their own resolution before fusing, self-attention heads 1-2 only, KL k-means clustering of the cross maps.
    "code": ISegConfig(cat_cross="embedding", normalise_first=True, heads=(1, 2), cluster=True),
}

# The embedded preset with the code's choices that do not depend on SD 2.1's weights: Cat-Cross on the embedding,
# normalisation before fusing and the clustering (a procedure, applied with the code's constants). Not the heads:
# (1, 2) name two heads of SD 2.1's up_blocks.3.attentions.1, a layer this preset does not read.
ISEG_PRESETS["embedded-code"] = replace(ISEG_PRESETS["embedded"], cat_cross="embedding", normalise_first=True, cluster=True)


def entropy_reduced_self(a: torch.Tensor, lam: float, variant: str = "code") -> torch.Tensor:
    """One step down the entropy gradient of a self-attention map (B, P, P), eq. 6.

    dE/dA = -(1 + log A), so A <- A + lam (1 + log A); entries driven below zero are cut and rows
    renormalised so the result is again row-stochastic.
    """
    if variant == "code":
        a = max_normalise(a, dim=1)  # column-max normalise
        upd = a + lam * torch.log10(math.e * a.clamp_min(1e-30))
        upd = torch.where(a > 0, upd, torch.zeros_like(a))
    elif variant == "paper":
        upd = a + lam * (1 + torch.log(a.clamp_min(1e-30)))
    else:
        raise ValueError(f"unknown Ent-Self variant {variant!r}: use 'code' or 'paper'")
    return sum_normalise(upd.clamp_min(0), dim=2)


class ISeg:
    name = "iseg"

    def __init__(self, config: ISegConfig | None = None) -> None:
        self.config = config or ISegConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        s = self.config.self_layer.resolve(inventory, latent)
        for lay in s if self.config.heads else ():
            bad = [h for h in self.config.heads if not 0 <= h < lay.heads]
            if bad:
                raise ValueError(
                    f"iSeg heads {list(self.config.heads)}: {lay.name} has {lay.heads} heads (0-based indices "
                    f"0..{lay.heads - 1}), so {bad} do not exist; pass heads=None to average all of them"
                )
        cross: dict[str, float] = {}
        for rank, w in self.config.cross.items():
            for lay in LayerSelect(kind="cross", ranks=(rank,), blocks=("up",)).resolve(inventory, latent):
                cross[lay.name] = cross.get(lay.name, 0.0) + w
        return CapturePlan(
            cross=cross,
            self_names=[lay.name for lay in s],
            grid=s[0].grid(latent),
            per_head=[lay.name for lay in s] if self.config.heads else [],
            key_scale_gamma=self.config.gamma if self.config.gamma != 1 else None,
            scale_values=self.config.cat_cross == "embedding",
        )

    def scores(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        cfg = self.config
        if cfg.cat_cross not in ("keys", "embedding"):
            raise ValueError(f"unknown Cat-Cross variant {cfg.cat_cross!r}: use 'keys' or 'embedding'")
        normalise = lambda m: sum_normalise(m, dim=1)  # noqa: E731
        cross = fused_cross(store, plan.cross, spans, plan.grid, normalise=normalise, normalise_first=cfg.normalise_first)
        if cfg.cluster:
            cross = cluster_mean(cross, self.clusters(store, spans, plan))
        a = entropy_reduced_self(mean_self(store, plan.self_names, cfg.heads), cfg.lam, cfg.ent_variant)
        fg = minmax(propagate(a, cross, cfg.iters, normalise=minmax))
        if cfg.bg_threshold is not None:
            bg = torch.full(fg.shape[:2], cfg.bg_threshold, dtype=fg.dtype, device=fg.device)
        else:
            bg = background_score(fg, cfg.bg_power)
        return with_background(fg, bg)

    def clusters(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        """Cluster labels (B, P) of the pixels of the fused cross maps, as the authors' code computes them.

        The code clusters the fused, per-token normalised maps of every prompt token (padding included) and averages
        them per cluster before it reads the class tokens; the cluster mean is linear, so applying it to the label maps
        afterwards gives the same maps.
        """
        cfg = self.config
        n_tokens = store.mean(next(iter(plan.cross))).shape[-1]
        every = replace(spans, spans=[[t] for t in range(n_tokens)], labels=[str(t) for t in range(n_tokens)])
        tokens = fused_cross(store, plan.cross, every, plan.grid, normalise=sum_normalise, normalise_first=cfg.normalise_first)
        labels, _ = kl_kmeans(tokens, grid_seeds(*plan.grid, cfg.cluster_k), cfg.cluster_iters)
        return labels
