"""Interactive segmentation (iSeg, section 4.3 and appendix C): a point, box or scribble gives each object's initial
map, which iSeg's iterative refinement with entropy-reduced self-attention (Ent-Self) turns into its mask.

The paper shows points, boxes and lines fed to "our iterative refinement with Self-Ent module" and fixes nothing
else: how a prompt becomes an initial map, the text of the forward, the background rule and the restriction of a
box's object to its box are ours (docs/METHODS.md). Everything is on the self-attention grid; prompts are given in
input-image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect
from attnseg.methods.base import CapturePlan, mean_self
from attnseg.methods.iseg import entropy_reduced_self
from attnseg.methods.t2m import EMBEDDED_SELF_LAYER as T2M_SELF_LAYER
from attnseg.ops.maps import minmax, propagate, with_background


@dataclass(frozen=True)
class VisualPrompt:
    """One object, shown by points ``((x, y), ...)``, a box ``(x0, y0, x1, y1)`` (inclusive corners) or a scribble
    (an (H, W) boolean mask at the image's size), in input-image pixels; exactly one of the three."""

    points: tuple[tuple[float, float], ...] = ()
    box: tuple[float, float, float, float] | None = None
    scribble: np.ndarray | None = field(default=None, compare=False)
    name: str | None = None

    @property
    def kind(self) -> str:
        given = [
            k for k, v in (("point", self.points), ("box", self.box), ("scribble", self.scribble)) if v is not None and len(v)
        ]
        if len(given) != 1:
            raise ValueError(f"a visual prompt is one of points, a box or a scribble; this one has {given or 'none'}")
        return given[0]

    def check(self, hw: tuple[int, int]) -> None:
        """Raise ``ValueError`` when the prompt does not lie on an (H, W) image or is empty."""
        h, w = hw
        kind = self.kind
        if kind == "point":
            for x, y in self.points:
                if not (0 <= x < w and 0 <= y < h):
                    raise ValueError(f"point {x:g},{y:g} is outside the {w}x{h} image (x in 0..{w - 1}, y in 0..{h - 1})")
        elif kind == "box":
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
                raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is not X0,Y0,X1,Y1 with X0<=X1<{w} and Y0<=Y1<{h}")
        else:
            if tuple(self.scribble.shape) != (h, w):
                raise ValueError(
                    f"a scribble of {self.scribble.shape[1]}x{self.scribble.shape[0]} on a {w}x{h} image: give it the image's size"
                )
            if not self.scribble.any():
                raise ValueError("the scribble marks no pixel")

    def label(self, index: int) -> str:
        """The object's name: the one given, else "point 1", "box 2", ... (``index`` counts from 1 over all prompts)."""
        return self.name or f"{self.kind} {index}"


@dataclass
class InteractiveConfig:
    """Settings of interactive segmentation; the refinement's are iSeg's paper defaults (figure 6)."""

    timestep: int = 100
    """Noise level t (iSeg: 100)."""
    prompt: str = ""
    """Text of the forward: the self-attention alone is read, so no words are needed (ours)."""
    self_layer: LayerSelect = field(default_factory=lambda: LayerSelect(kind="self", ranks=(3,), blocks=("up",), take=(1, 2)))
    """iSeg's self layer: SD's up_blocks.3.attentions.1 (64 px), the authors' code's reading of "the last decoder layer"."""
    heads: tuple[int, ...] | None = None
    """Self-attention heads averaged (None: all)."""
    lam: float = 0.02
    """Ent-Self updating factor lambda (iSeg, figure 6)."""
    ent_variant: str = "code"
    """Ent-Self form (iSeg's code; see :func:`~attnseg.methods.iseg.entropy_reduced_self`)."""
    iters: int = 8
    """Refinement iterations N (iSeg, figure 6)."""
    bg_threshold: float = 0.5
    """Background score: a pixel whose refined, min-max map stays below this for every object is background (ours)."""
    clip_to_box: bool = True
    """A box's object is kept inside its box (ours: the box bounds the object)."""


INTERACTIVE_PRESETS: dict[str, InteractiveConfig] = {
    "paper": InteractiveConfig(),
    # The embedded ShapesWorld model: the paper's layer maps onto its near-uniform last decoder layer (as for T2M and
    # iSeg); the layer (T2M's embedded one, the first 16-px decoder layer), the iterations and the background
    # threshold were chosen on validation scenes (world seed 3; docs/BENCHMARKS.md, interactive segmentation).
    "embedded": InteractiveConfig(self_layer=T2M_SELF_LAYER, iters=3, bg_threshold=0.5),
}


def _cell_range(lo: float, hi: float, size: int, cells: int) -> tuple[int, int]:
    """Grid cells [a, b) of an axis of ``cells`` cells that the pixel span [lo, hi] (of ``size`` pixels) touches."""
    a = int(np.floor(lo * cells / size))
    b = int(np.floor(hi * cells / size)) + 1
    return max(0, min(a, cells - 1)), max(1, min(b, cells))


def initial_maps(prompts: Sequence[VisualPrompt], hw: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Each prompt's initial map on the ``grid`` of an (H, W) image: (P, K), column k in [0, 1].

    A point marks its grid cell; a box, every cell it touches; a scribble, each cell by the fraction of its pixels
    that the scribble covers.
    """
    h, w = hw
    gh, gw = grid
    cols = []
    for p in prompts:
        m = torch.zeros((gh, gw))
        kind = p.kind
        if kind == "point":
            for x, y in p.points:
                m[min(int(y * gh / h), gh - 1), min(int(x * gw / w), gw - 1)] = 1.0
        elif kind == "box":
            x0, y0, x1, y1 = p.box
            r0, r1 = _cell_range(y0, y1, h, gh)
            c0, c1 = _cell_range(x0, x1, w, gw)
            m[r0:r1, c0:c1] = 1.0
        else:
            s = torch.from_numpy(np.asarray(p.scribble, dtype=np.float32))[None, None]
            m = F.adaptive_avg_pool2d(s, (gh, gw))[0, 0]
        cols.append(m.flatten())
    return torch.stack(cols, dim=1)


def clip_to_boxes(scores: torch.Tensor, prompts: Sequence[VisualPrompt]) -> torch.Tensor:
    """Zero each box prompt's object score outside its box: scores (K + 1, H, W), background first."""
    out = scores.clone()
    for k, p in enumerate(prompts):
        if p.box is not None:
            x0, y0, x1, y1 = (round(v) for v in p.box)
            inside = torch.zeros(scores.shape[1:], dtype=torch.bool)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            out[k + 1][~inside] = 0
    return out


class Interactive:
    name = "interactive"

    def __init__(self, config: InteractiveConfig | None = None) -> None:
        self.config = config or InteractiveConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        s = self.config.self_layer.resolve(inventory, latent)
        names = [lay.name for lay in s]
        return CapturePlan(cross={}, self_names=names, grid=s[0].grid(latent), per_head=names if self.config.heads else [])

    def scores(self, store: AttentionStore, initial: torch.Tensor, plan: CapturePlan) -> torch.Tensor:
        """(B, P, K) initial maps -> (B, P, K + 1) scores, background first: N products with Ent-Self, min-max."""
        cfg = self.config
        a = entropy_reduced_self(mean_self(store, plan.self_names, cfg.heads), cfg.lam, cfg.ent_variant)
        fg = minmax(propagate(a, initial.to(a.dtype), cfg.iters, normalise=minmax))
        return with_background(fg, torch.full(fg.shape[:2], cfg.bg_threshold, dtype=fg.dtype, device=fg.device))
