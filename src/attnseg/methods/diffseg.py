"""DiffSeg (Tian et al. 2024), unsupervised: merge self-attention maps by KL distance.

1. Aggregate the self-attention of every layer on the finest grid: each layer's key maps are
   upsampled bilinearly and its query rows repeated (nearest) to the finest grid, weighted by the
   layer's resolution (weights proportional to the side, summing to one).
2. Anchors on a regular grid: each anchor's proposal is the mean of all attention maps within
   symmetric KL ``kl_threshold`` of its own; then ``iters - 1`` rounds of greedy merging of the
   proposals under the same threshold.
3. Every pixel takes the proposal whose map is largest there (non-maximum suppression).
Evaluated with Hungarian matching (per image) since its segments carry no class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, finest_grid
from attnseg.methods.base import CapturePlan
from attnseg.ops.maps import grid_side


@dataclass
class DiffSegConfig:
    """DiffSeg's settings (paper, COCO-Stuff-27): t = 300, empty prompt, 16x16 anchors, KL 1.1, 3 rounds."""

    timestep: int = 300
    """Timestep of the forward (paper: 300)."""
    prompt: str = ""
    anchors_per_side: int = 16
    kl_threshold: float = 1.1
    iters: int = 3
    noised: bool = True
    """True: the latent is noised to ``timestep`` (ours: the reading of "t = 300" every other method uses); False:
    the clean latent is given the ``timestep`` embedding, as the authors' benchmark code does."""
    merge: str = "unmatched"
    """Later merging rounds: each proposal not yet merged averages the *unmatched* proposals within the threshold
    ("unmatched", ours) or *every* proposal within it ("all", the authors' code)."""


DIFFSEG_PRESETS = {
    "default": DiffSegConfig(),
    # The paper's settings, under the name every method with a `code` preset has.
    "paper": DiffSegConfig(),
    "small-unet": DiffSegConfig(anchors_per_side=8),
    # The embedded model (16-px finest grid, 256-pixel attention rows): the paper's 1.1 was set on Stable
    # Diffusion's 64-px maps and merges every scene of this model into one segment. 0.1 was chosen on validation
    # scenes (seed 3; with 8 anchors mIoU is flat from 0.05 to 0.15 and 24 at 0.3, with the paper's 16 anchors
    # 47.3 / 47.0 / 45.9 at 0.07 / 0.1 / 0.14; docs/EMBEDDED-MODEL-TRAINING.md).
    "embedded": DiffSegConfig(kl_threshold=0.1),
    # As the authors' code runs it: the clean latent with the t = 300 embedding, merging over every proposal.
    "code": DiffSegConfig(noised=False, merge="all"),
    "embedded-code": DiffSegConfig(kl_threshold=0.1, noised=False, merge="all"),
}


def aggregate_self(maps: dict[int, torch.Tensor]) -> torch.Tensor:
    """(B, P_s, P_s) maps per side s -> one (B, S*S, S*S) map on the finest side S, rows summing to one."""
    side = max(maps)
    total = sum(maps)
    out = None
    for s, m in maps.items():
        b = m.shape[0]
        keys = m.reshape(b * s * s, 1, s, s).float()
        keys = F.interpolate(keys, size=(side, side), mode="bilinear", align_corners=False)
        keys = keys.reshape(b, s, s, side * side)
        rows = keys.repeat_interleave(side // s, dim=1).repeat_interleave(side // s, dim=2)
        rows = rows.reshape(b, side * side, side * side)
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)
        w = s / total
        out = rows * w if out is None else out + rows * w
    return out


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise symmetric KL between rows of a (N, P) and b (M, P) distributions: (N, M)."""
    la, lb = (a + eps).log(), (b + eps).log()
    ab = (a * la).sum(1, keepdim=True) - a @ lb.T  # KL(a || b)
    ba = (b * lb).sum(1)[None, :] - la @ b.T  # KL(b || a)
    return (ab + ba) / 2


def merge_proposals(attn: torch.Tensor, anchors: int, threshold: float, iters: int, merge: str = "unmatched") -> torch.Tensor:
    """Iterative attention merging on one image's aggregated map (P, P) -> proposals (Q, P).

    Round 1: each anchor's proposal is the mean of every pixel's attention map within symmetric KL
    ``threshold`` of the anchor's map. Later rounds: greedy clustering of the proposals: each not yet
    matched proposal takes the mean of the proposals within the threshold, the unmatched ones only
    (``merge="unmatched"``) or all of them (``"all"``), and marks them matched.
    """
    if merge not in ("unmatched", "all"):
        raise ValueError(f"unknown DiffSeg merge {merge!r}: use 'unmatched' or 'all'")
    p = attn.shape[0]
    side = grid_side(p)
    step = max(1, side // anchors)
    idx = torch.tensor([y * side + x for y in range(step // 2, side, step) for x in range(step // 2, side, step)])
    a = attn.float()
    close = symmetric_kl(a[idx], a) < threshold  # (anchors, P)
    props = (close.float() @ a) / close.sum(1, keepdim=True).clamp_min(1)
    for _ in range(max(0, iters - 1)):
        props = merge_round(props, threshold, merge)
    return props


def merge_round(props: torch.Tensor, threshold: float, merge: str = "unmatched") -> torch.Tensor:
    """One greedy merging round of proposals (Q, P) -> (Q', P), in order: each proposal not yet matched takes the
    mean of the proposals within symmetric KL ``threshold`` of it (the unmatched ones, or all with ``"all"``)."""
    d = symmetric_kl(props, props) < threshold
    matched = torch.zeros(len(props), dtype=torch.bool)
    merged = []
    for i in range(len(props)):
        if matched[i]:
            continue
        group = (d[i] & ~matched) if merge == "unmatched" else d[i].clone()
        group[i] = True
        merged.append(props[group].mean(0))
        matched |= group
    return torch.stack(merged)


def diffseg_proposals(maps: dict[int, torch.Tensor], cfg: DiffSegConfig) -> list[torch.Tensor]:
    """Per image, the merged proposals (Q, S, S) from self-attention maps by side."""
    agg = aggregate_self(maps)
    side = max(maps)
    return [merge_proposals(a, cfg.anchors_per_side, cfg.kl_threshold, cfg.iters, cfg.merge).reshape(-1, side, side) for a in agg]


def assign(proposals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Non-maximum suppression at ``size``: (Q, s, s) proposals -> (H, W) segment ids."""
    up = F.interpolate(proposals[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(0)


class DiffSeg:
    """DiffSeg on a backbone: capture every self-attention layer, merge, return proposals per image."""

    name = "diffseg"

    def __init__(self, config: DiffSegConfig | None = None) -> None:
        self.config = config or DiffSegConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        if not isinstance(latent, int) and latent[0] != latent[1]:
            raise ValueError(f"DiffSeg reads square latents; this one is {latent[0]} x {latent[1]}")
        layers = [lay for lay in inventory if lay.kind == "self"]
        return CapturePlan(cross={}, self_names=[lay.name for lay in layers], grid=finest_grid(layers, latent))

    def proposals(self, store: AttentionStore, plan: CapturePlan) -> list[torch.Tensor]:
        """Per image, the merged proposals (Q, S, S) from the captured maps, grouped by grid side."""
        by_side: dict[int, list[torch.Tensor]] = {}
        for n in plan.self_names:
            m = store.mean(n)
            by_side.setdefault(grid_side(m.shape[1]), []).append(m)
        return diffseg_proposals({s: torch.stack(v).mean(0) for s, v in by_side.items()}, self.config)
