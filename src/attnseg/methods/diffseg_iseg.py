"""DiffSeg refined by iSeg (iSeg, section 4.3 and appendix B, "unsupervised segmentation").

"We treat the segmentation results of DiffSeg as initial cross-attention maps, and employ our proposed
entropy-reduced self-attention module to perform iterative refinement, while the other settings are consistent
with DiffSeg." DiffSeg's segments (the argmax of its merged proposals), one-hot on the grid, are refined by N
iterations ``map <- Ent-Self . minmax(map)`` of iSeg's self layer, read from DiffSeg's own forward (same
timestep, same empty prompt), and every pixel takes its largest refined map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect
from attnseg.methods.base import CapturePlan, mean_self
from attnseg.methods.diffseg import DiffSeg, DiffSegConfig
from attnseg.methods.iseg import entropy_reduced_self
from attnseg.methods.t2m import EMBEDDED_SELF_LAYER as T2M_SELF_LAYER
from attnseg.ops.maps import minmax, propagate, resize_columns


@dataclass
class DiffSegISegConfig(DiffSegConfig):
    """DiffSeg's settings, then iSeg's refinement (its paper's lambda and N, figure 6)."""

    self_layer: LayerSelect = field(default_factory=lambda: LayerSelect(kind="self", ranks=(3,), blocks=("up",), take=(1, 2)))
    """iSeg's self layer: SD's up_blocks.3.attentions.1 (64 px, the authors' code's reading of "the last decoder layer")."""
    lam: float = 0.02
    """Ent-Self updating factor lambda (iSeg)."""
    ent_variant: str = "code"
    """Ent-Self form (iSeg's code; :func:`~attnseg.methods.iseg.entropy_reduced_self`)."""
    refine_iters: int = 8
    """Refinement iterations N (iSeg; the paper does not give a separate value for this task)."""


DIFFSEG_ISEG_PRESETS = {
    "default": DiffSegISegConfig(),
    # The embedded model: DiffSeg's embedded threshold; the refinement reads T2M's embedded layer (the paper's maps
    # onto this model's near-uniform last decoder layer), its iterations chosen on validation scenes (world seed 3;
    # docs/BENCHMARKS.md).
    "embedded": DiffSegISegConfig(kl_threshold=0.1, self_layer=T2M_SELF_LAYER, refine_iters=1),
}


@dataclass
class RefinePlan(CapturePlan):
    """DiffSeg's capture plan with the self layer that refines its segments."""

    refine_names: list[str] = field(default_factory=list)
    refine_grid: tuple[int, int] = (0, 0)


def refine_segments(
    proposals: torch.Tensor, self_attn: torch.Tensor, grid: tuple[int, int], cfg: DiffSegISegConfig
) -> torch.Tensor:
    """One image's DiffSeg proposals (Q, S, S) -> refined maps (Q', h, w) on the self map's ``grid`` (h, w).

    The segments (argmax of the proposals; Q' of them are non-empty) become one-hot maps, resized to ``grid``, and
    are refined by ``cfg.refine_iters`` products with Ent-Self of ``self_attn`` (P, P), min-max per segment.
    """
    q, s, _ = proposals.shape
    seg = proposals.reshape(q, s * s).argmax(dim=0)
    present = seg.unique()
    onehot = (seg[:, None] == present[None, :]).float()[None]  # (1, S*S, Q')
    init = resize_columns(onehot, (s, s), grid)
    a = entropy_reduced_self(self_attn[None].float(), cfg.lam, cfg.ent_variant)
    fg = minmax(propagate(a, init, cfg.refine_iters, normalise=minmax))[0]  # (P, Q')
    return fg.T.reshape(len(present), *grid)


class DiffSegISeg(DiffSeg):
    """DiffSeg, then iSeg's iterative refinement of its segments, in one forward."""

    name = "diffseg-iseg"

    def __init__(self, config: DiffSegISegConfig | None = None) -> None:
        super().__init__(config or DiffSegISegConfig())

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> RefinePlan:
        base = super().plan(inventory, latent)
        refine = self.config.self_layer.resolve(inventory, latent)
        names = [lay.name for lay in refine]
        return RefinePlan(
            cross={},
            self_names=base.self_names,
            grid=base.grid,
            refine_names=names,
            refine_grid=refine[0].grid(latent),
        )

    def proposals(self, store: AttentionStore, plan: RefinePlan) -> list[torch.Tensor]:
        """Per image, the refined segment maps (Q', h, w) on the refining layer's grid."""
        a = mean_self(store, plan.refine_names)
        props = super().proposals(store, plan)
        return [refine_segments(p, a[i], plan.refine_grid, self.config) for i, p in enumerate(props)]
