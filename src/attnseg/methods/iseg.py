"""iSeg (Sun et al. 2024): entropy-reduced self-attention and category-enhanced cross-attention.

Paper section 3 / algorithm 1: one forward at t = 100 with the class-token keys scaled by gamma = 1.6
(Cat-Cross, eq. 8); Cross = decoder cross maps, fused (the resolutions and weights, 16 px 0.7 and 32 px 0.3,
are the authors' code's), each sum-normalised; Self = the high-resolution self-attention of the last decoder
layer (on SD, as the code reads it, ``up_blocks.3.attentions.1``, 64 px) made sharper by one entropy-gradient
step (Ent-Self, eq. 6); N iterations Cross <- Self_ent . normalise(Cross). The ``code`` presets add what the
authors' code does and the paper does not describe: encoder as well as decoder cross layers, whose heads are pooled
per resolution and normalised once; background words appended to the prompt; only self-attention heads 1 and 2
averaged; the fused cross maps clustered (KL k-means) and averaged per cluster before the iterations. Sources of
every setting: docs/METHODS.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect
from attnseg.diffusion.prompts import ISEG_VOC_BACKGROUND_WORDS, TokenSpans
from attnseg.methods.base import CapturePlan, fused_cross, mean_self
from attnseg.ops.cluster import cluster_mean, grid_seeds, kl_kmeans
from attnseg.ops.maps import (
    background_score,
    grid_of,
    max_normalise,
    minmax,
    propagate,
    resize_columns,
    sum_normalise,
    token_maps,
    with_background,
)

EMBEDDED_SELF_LAYER = LayerSelect(kind="self", ranks=(99,), blocks=("down",), take=(0, 1))
"""The self-attention layer of the "embedded" presets: the first layer of the finest encoder level (the embedded
model's down_blocks.0.attentions.0, 16 px), chosen on validation scenes like T2M's (the decoder layer that T2M reads
scored within 0.5 of it for iSeg, so it was kept)."""

MMDIT_SELF_LAYER = LayerSelect(kind="self", names=("*.attn:self",), take=(-1, None))
"""The image-to-image block of a transformer's last attention over text and image (SD3's last joint block, Flux's
last single-stream block), iSeg's Self on transformers."""

CODE_CROSS_LAYERS: tuple[LayerSelect, ...] = (
    LayerSelect(kind="cross", ranks=(1,), blocks=("down",)),
    LayerSelect(kind="cross", ranks=(1,), blocks=("up",)),
    LayerSelect(kind="cross", ranks=(2,), blocks=("down",), take=(1, 2)),
    LayerSelect(kind="cross", ranks=(2,), blocks=("up",), take=(0, 2)),
)
"""The authors' code's cross layers (wsss/arguments.py, ``attention_layers_to_use``; it weights 16 px and 32 px only,
wsss/iSeg.py ``process_cross_att``): on SD 1.x / 2.x every 16-px encoder and decoder layer (down_blocks.2.attentions.0-1,
up_blocks.1.attentions.0-2) and, at 32 px, the second encoder layer and the first two decoder layers
(down_blocks.1.attentions.1, up_blocks.2.attentions.0-1). Selected by rank, block and position, so that on a smaller
UNet they name the same places (a position beyond a level's layers clips to its last)."""

# fmt: off
VOC_CROSS_HEADS: dict[int, tuple[int, ...]] = {
    1: (
        0, 1, 2, 3, 6, 8, 12, 13, 14, 16, 17, 19, 20, 22, 24, 27, 28, 30, 32, 33, 34,
        41, 43, 44, 46, 47, 51, 52, 58, 59, 60, 76, 77, 78, 81, 83, 87, 88, 93, 94, 96,
    ),
    2: (5, 6, 8, 13, 21, 22, 25, 27, 28),
}
"""The authors' code's VOC cross heads (wsss/iSeg.py, ``self.index``, read unless ``att_mean``, which its VOC
arguments leave off and its COCO and Context arguments turn on), by rank, in ascending order: 41 of SD 2.1's 100 heads at 16 px
(5 layers x 20) and 9 of its 30 at 32 px (3 layers x 10), as positions in the concatenation of the code's layers'
heads in forward order. Positions among SD 2.x's heads: other UNets have other head counts (SD 1.x: 40 and 24)."""
# fmt: on

_FORWARD_ORDER = {"down": 0, "mid": 1, "up": 2}
"""A UNet's blocks in the order its forward runs them (its module listing puts the mid block last)."""


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
    """Cross layers' resolution rank -> weight (SD: 16 px 0.7, 32 px 0.3). The paper fuses "the cross-attention maps
    at different decoder layers" and names neither resolutions nor weights: these are the authors' code's
    (wsss/iSeg.py, ``process_cross_att``)."""
    cross_layers: tuple[LayerSelect, ...] = ()
    """The cross layers read: each select names one rank of ``cross`` and its layers take that rank's weight. Empty:
    every decoder layer at each rank (the paper's "different decoder layers"; reading all of a level's is ours).
    The authors' code reads encoder layers too: ``CODE_CROSS_LAYERS``."""
    cross_norm: str = "layer"
    """"layer" (ours; the paper does not say): each layer's head-mean map is sum-normalised, label by label, and the
    layers averaged with their weights. "resolution" (the authors' code, wsss/iSeg.py ``process_cross_att``): the
    heads of all layers of one resolution are averaged together (a layer counts by its number of heads), each token's
    map of that mean is sum-normalised once, the resolutions are summed with their weights, and only then are a
    label's tokens averaged. The cross layers are then captured per head."""
    cross_heads: dict[int, tuple[int, ...]] | None = None
    """With ``cross_norm="resolution"``: per rank, the heads averaged, 0-based positions in the concatenation of that
    rank's layers' heads in forward order (encoder, mid block, decoder; block order within each); None: every head
    (the paper, and the authors' code on COCO and Context). ``VOC_CROSS_HEADS``: the code's VOC list, for SD 2.x."""
    normalise_first: bool = False
    """False (ours): the cross maps are sum-normalised after upsampling to the working grid, so that the weights
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
    """Words appended to the prompt after "... and background, " to absorb attention; their maps are not read (the
    paper appends none; the authors' code appends ``ISEG_VOC_BACKGROUND_WORDS`` on VOC)."""


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
    # Transformer (MMDiT) backbones: one grid, no decoder and no resolution ranks. Cross fuses the image-to-text block
    # of every attention over text and image (SD3's joint blocks; Flux's double- and single-stream blocks) with equal
    # weights (the paper fuses the layers that build the output, the decoder's; here every block does); Self is the
    # image-to-image block of the last of them, the one nearest the output, as up_blocks.3.attentions.1 is the UNet's
    # last (never SD3.5's image-only attn2). Cat-Cross scales the class tokens' keys inside that attention; lambda, N,
    # t and the background rule are the paper's.
    "mmdit": ISegConfig(
        cross={0: 1.0},
        cross_layers=(LayerSelect(kind="cross", ranks=(0,)),),
        self_layer=MMDIT_SELF_LAYER,
    ),
    # The paper's lambda and N with what the authors' code computes on VOC: Cat-Cross on the text embedding (keys and
    # values), its encoder and decoder cross layers with their heads pooled per resolution and normalised once, at
    # their own resolution, before fusing, its VOC background words, self-attention heads 1-2 only, KL k-means
    # clustering of the cross maps (the code's own VOC lambda and N are `wsss-voc`'s). Every cross head: the code's
    # VOC head list names SD 2.x's heads ("code-voc-heads").
    "code": ISegConfig(
        cat_cross="embedding",
        cross_layers=CODE_CROSS_LAYERS,
        cross_norm="resolution",
        normalise_first=True,
        heads=(1, 2),
        cluster=True,
        background_words=ISEG_VOC_BACKGROUND_WORDS,
    ),
}
# The embedded SD3 model (its attnseg.json makes this its default): `mmdit` with the noise level, background threshold
# and iterations chosen on validation scenes (`python scripts/probe_sd3.py MODEL iseg-sweep`: every block's cross maps
# beat the last block's alone, and the last block's Self every other block's; docs/EMBEDDED-MODEL-TRAINING.md).
ISEG_PRESETS["embedded-sd3"] = replace(ISEG_PRESETS["mmdit"], timestep=400, iters=2, bg_threshold=0.6)
# "code" with the code's VOC cross heads: for SD 2.x only (on other UNets the positions name other heads or none).
ISEG_PRESETS["code-voc-heads"] = replace(ISEG_PRESETS["code"], cross_heads=VOC_CROSS_HEADS)

# The embedded preset with the code's choices that do not depend on SD 2.1's weights or on VOC: Cat-Cross on the
# embedding, its cross layers (by rank, block and position) pooled and normalised per resolution before fusing, and
# the clustering (procedures, applied with the code's constants). Not the self heads: (1, 2) name two heads of SD
# 2.1's up_blocks.3.attentions.1, a layer this preset does not read. Not the background words: VOC's scenery, which
# ShapesWorld's captions never name (T2M's embedded presets drop theirs for the same reason).
ISEG_PRESETS["embedded-code"] = replace(
    ISEG_PRESETS["embedded"],
    cat_cross="embedding",
    cross_layers=CODE_CROSS_LAYERS,
    cross_norm="resolution",
    normalise_first=True,
    cluster=True,
)


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


def resolution_fused_cross(
    store: AttentionStore,
    cross: Mapping[str, float],
    spans: TokenSpans,
    grid: tuple[int, int],
    heads: Mapping[str, Sequence[int]] | None = None,
    normalise_first: bool = True,
) -> torch.Tensor:
    """Per-label cross maps (B, P, K) on ``grid``, normalised per resolution as iSeg's authors' code does.

    ``cross`` maps modules captured per head, (B, H, P_l, T), to weights. The modules of one grid are pooled: the
    mean of their heads (only ``heads[name]`` of a module named there), each head weighted by its module's weight, so
    that with equal weights every head counts once and a module counts by its number of heads (the code concatenates
    the heads of a resolution and averages them). Each token's pooled map is sum-normalised over the pixels, at its
    own grid with ``normalise_first`` (the code), else after resizing to ``grid``; a label's tokens are averaged after
    that normalisation (the code averages them last; every later step is linear). The resolutions are fused as
    sum_r W_r map_r / sum_r W_r, W_r the mean weight of resolution r's heads (the code's 0.7 and 0.3, which it sums
    without dividing: the same, as they add up to 1).
    """
    maps = {name: store.mean(name) for name in cross}
    groups: dict[int, list[str]] = {}
    for name, m in maps.items():
        if m.dim() != 4:
            raise ValueError(f"{name}: pooling heads per resolution needs its cross map captured per head")
        groups.setdefault(m.shape[2], []).append(name)
    total, wsum = None, 0.0
    for names in groups.values():
        pooled, head_weight, n_heads = None, 0.0, 0
        for name in names:
            m = maps[name]
            if heads is not None and name in heads:
                m = m[:, list(heads[name])]
            part = m.sum(dim=1) * cross[name]
            pooled = part if pooled is None else pooled + part
            head_weight += cross[name] * m.shape[1]
            n_heads += m.shape[1]
        pooled = pooled / head_weight
        src = grid_of(pooled.shape[1], grid)
        if normalise_first:
            lab = resize_columns(token_maps(sum_normalise(pooled), spans.spans), src, grid)
        else:
            lab = token_maps(sum_normalise(resize_columns(pooled, src, grid)), spans.spans)
        w = head_weight / n_heads
        total = lab * w if total is None else total + lab * w
        wsum += w
    return total / wsum


class ISeg:
    name = "iseg"

    def __init__(self, config: ISegConfig | None = None) -> None:
        self.config = config or ISegConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        cfg = self.config
        s = cfg.self_layer.resolve(inventory, latent)
        for lay in s if cfg.heads else ():
            bad = [h for h in cfg.heads if not 0 <= h < lay.heads]
            if bad:
                raise ValueError(
                    f"iSeg heads {list(cfg.heads)}: {lay.name} has {lay.heads} heads (0-based indices "
                    f"0..{lay.heads - 1}), so {bad} do not exist; pass heads=None to average all of them"
                )
        by_rank = self.cross_by_rank(inventory, latent)
        cross: dict[str, float] = {}
        for rank, lays in by_rank.items():
            for lay in lays:
                cross[lay.name] = cross.get(lay.name, 0.0) + cfg.cross[rank]
        pooled = self._cross_norm() == "resolution"
        if cfg.cross_heads is not None and not pooled:
            raise ValueError("iSeg cross_heads index the heads of a whole resolution: use cross_norm='resolution'")
        cross_heads = self._cross_head_subsets(by_rank)
        cross = {name: w for name, w in cross.items() if cross_heads.get(name) != ()}  # no head kept: not read
        return CapturePlan(
            cross=cross,
            self_names=[lay.name for lay in s],
            grid=s[0].grid(latent),
            per_head=[*(cross if pooled else ()), *(lay.name for lay in s if cfg.heads)],
            key_scale_gamma=cfg.gamma if cfg.gamma != 1 else None,
            scale_values=cfg.cat_cross == "embedding",
            cross_heads=cross_heads,
        )

    def cross_by_rank(self, inventory: list[LayerInfo], latent: Latent) -> dict[int, list[LayerInfo]]:
        """The cross layers read at each rank of ``cross``, in forward order (encoder, mid block, decoder)."""
        cfg = self.config
        selects = cfg.cross_layers or tuple(LayerSelect(kind="cross", ranks=(r,), blocks=("up",)) for r in cfg.cross)
        position = {lay.name: i for i, lay in enumerate(inventory)}
        by_rank: dict[int, list[LayerInfo]] = {}
        for sel in selects:
            if sel.kind != "cross" or len(sel.ranks) != 1 or sel.ranks[0] not in cfg.cross:
                raise ValueError(f"iSeg cross layers: {sel} must select cross layers of one rank of cross {sorted(cfg.cross)}")
            lays = by_rank.setdefault(sel.ranks[0], [])
            lays.extend(lay for lay in sel.resolve(inventory, latent) if lay not in lays)
        return {
            r: sorted(lays, key=lambda lay: (_FORWARD_ORDER.get(lay.block, 0), position[lay.name])) for r, lays in by_rank.items()
        }

    def _cross_norm(self) -> str:
        if self.config.cross_norm not in ("layer", "resolution"):
            raise ValueError(f"unknown iSeg cross_norm {self.config.cross_norm!r}: use 'layer' or 'resolution'")
        return self.config.cross_norm

    def _cross_head_subsets(self, by_rank: dict[int, list[LayerInfo]]) -> dict[str, tuple[int, ...]]:
        """``cross_heads`` (positions among a rank's heads) as each layer's own 0-based heads."""
        out: dict[str, tuple[int, ...]] = {}
        for rank, wanted in (self.config.cross_heads or {}).items():
            lays = by_rank.get(rank, [])
            total = sum(lay.heads for lay in lays)
            bad = [h for h in wanted if not 0 <= h < total]
            if not lays or bad:
                raise ValueError(
                    f"iSeg cross_heads at rank {rank}: its layers ({', '.join(lay.name for lay in lays) or 'none'}) "
                    f"have {total} heads together, so {bad or list(wanted)} do not exist (the code's VOC list names "
                    "SD 2.x's heads); pass cross_heads=None to average all of them"
                )
            start = 0
            for lay in lays:
                if lay.name in out:
                    raise ValueError(
                        f"iSeg cross_heads: {lay.name} is read at two ranks of this UNet, so its heads are ambiguous"
                    )
                out[lay.name] = tuple(h - start for h in sorted(wanted) if start <= h < start + lay.heads)
                start += lay.heads
        return out

    def fused(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        """The fused, normalised cross maps (B, P, K) of ``spans`` on the plan's grid (``cross_norm``)."""
        cfg = self.config
        if self._cross_norm() == "resolution":
            return resolution_fused_cross(store, plan.cross, spans, plan.grid, plan.cross_heads, cfg.normalise_first)
        return fused_cross(store, plan.cross, spans, plan.grid, normalise=sum_normalise, normalise_first=cfg.normalise_first)

    def scores(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        cfg = self.config
        if cfg.cat_cross not in ("keys", "embedding"):
            raise ValueError(f"unknown Cat-Cross variant {cfg.cat_cross!r}: use 'keys' or 'embedding'")
        cross = self.fused(store, spans, plan)
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
        labels, _ = kl_kmeans(self.fused(store, every, plan), grid_seeds(*plan.grid, cfg.cluster_k), cfg.cluster_iters)
        return labels
