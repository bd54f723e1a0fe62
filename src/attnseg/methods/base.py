"""What every real-image method shares: its capture plan and how fused cross maps are read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import LayerInfo
from attnseg.diffusion.prompts import TokenSpans
from attnseg.ops.maps import grid_of, resize_columns, token_maps


@dataclass
class CapturePlan:
    """The modules a method reads, resolved on one UNet at one latent size.

    cross: {name: weight}; self_names: self-attention modules (averaged); grid: (h, w) on which the
    method works; per_head: modules captured per head; key_scale_gamma: Cat-Cross factor or None.
    """

    cross: dict[str, float]
    self_names: list[str]
    grid: tuple[int, int]
    per_head: list[str] = field(default_factory=list)
    key_scale_gamma: float | None = None
    scale_values: bool = False
    """With ``key_scale_gamma``: scale the class tokens' values too (the text embedding, not only the keys)."""
    concepts: dict[str, float] = field(default_factory=dict)
    """ConceptAttention: {``<module>:concept``: weight} concept maps read; the forward then carries concept tokens,
    the image's labels followed by ``concept_background``."""
    concept_background: tuple[str, ...] = ()
    cross_heads: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The heads read of per-head cross modules: {module: 0-based heads of its own}; a module not named: all its
    heads. iSeg's per-resolution fusion pools them (its code's VOC cross heads); :func:`fused_cross` averages them
    (the heads a cross or T2M preset chooses)."""

    @classmethod
    def averaged_cross(
        cls,
        layers: list[LayerInfo],
        heads: dict[str, tuple[int, ...]],
        grid: tuple[int, int],
        self_names: list[str] | None = None,
    ) -> CapturePlan:
        """The plan of a method that averages the cross maps of ``layers`` with equal weights, reading ``heads``
        of those named (:func:`attnseg.diffusion.layers.read_heads`): the cross baseline and T2M."""
        return cls(
            cross={lay.name: 1.0 for lay in layers},
            self_names=self_names or [],
            grid=grid,
            per_head=list(heads),
            cross_heads=heads,
        )

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.cross, *self.self_names, *self.concepts]))


def fused_cross(
    store: AttentionStore,
    cross: dict[str, float],
    spans: TokenSpans,
    grid: tuple[int, int],
    normalise=None,
    normalise_first: bool = False,
    heads: Mapping[str, Sequence[int]] | None = None,
) -> torch.Tensor:
    """Weighted mean of per-label cross maps of several modules on ``grid``: (B, P, K).

    Each module's head-mean map (B, P_l, T) (the mean of its heads when it was captured per head, of its ``heads``
    when named there) is reduced to its labels' token averages, resized to ``grid``, optionally normalised per label
    (``normalise`` of a (B, P, K) tensor; at the module's own resolution before resizing with ``normalise_first``),
    then weighted.
    """
    total = None
    wsum = 0.0
    for name, w in cross.items():
        m = store.mean(name)
        if m.dim() == 4:  # per-head capture (B, H, P_l, T)
            m = m[:, list(heads[name])].mean(dim=1) if heads and name in heads else m.mean(dim=1)
        lab = token_maps(m, spans.spans)
        if normalise is not None and normalise_first:
            lab = normalise(lab)
        lab = resize_columns(lab, grid_of(m.shape[1], grid), grid)
        if normalise is not None and not normalise_first:  # after resizing: weights compare maps of equal pixel counts
            lab = normalise(lab)
        total = lab * w if total is None else total + lab * w
        wsum += w
    return total / wsum


def mean_self(store: AttentionStore, names: Sequence[str], heads: Sequence[int] | None = None) -> torch.Tensor:
    """Mean of self-attention maps (B, P, P) of modules that share one grid."""
    maps = []
    for n in names:
        m = store.mean(n)
        if m.dim() == 4:  # per-head capture
            m = m[:, list(heads)].mean(dim=1) if heads else m.mean(dim=1)
        maps.append(m)
    sides = {m.shape[1] for m in maps}
    if len(sides) != 1:
        raise ValueError(f"self-attention modules {list(names)} have different grids {sorted(sides)}")
    return torch.stack(maps).mean(dim=0)
