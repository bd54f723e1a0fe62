"""Pure tensor operations on attention maps, shared by every method.

Layout conventions (one place decides them):
- a cross-attention map is ``(B, P, T)``: P pixels of an ``h x w`` grid in row-major order, T tokens;
- a self-attention map is ``(B, P, P)``, row-stochastic (row = query pixel);
- per-label maps are ``(B, P, K)``: one column per label;
- score images are ``(B, K, h, w)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grid_side(p: int) -> int:
    s = round(p**0.5)
    if s * s != p:
        raise ValueError(f"{p} pixels is not a square grid")
    return s


def grid_of(p: int, like: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of ``p`` pixels that is a level of the same latent as the grid ``like``: a coarser level halves
    both sides, rounding up; a finer one is a grid that halves to ``like`` that way (a unique one, else an error)."""
    h, w = like
    while h * w > p and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w == p:
        return h, w
    finer = {tuple(like)}
    while finer and min(a * b for a, b in finer) < p:
        finer = {(a, b) for ph, pw in finer for a in (2 * ph - 1, 2 * ph) for b in (2 * pw - 1, 2 * pw)}
        hits = {g for g in finer if g[0] * g[1] == p}
        if len(hits) > 1:
            raise ValueError(f"{p} pixels fit several levels finer than {like[0]} x {like[1]}: {sorted(hits)}")
        if hits:
            return hits.pop()
    raise ValueError(f"{p} pixels is not a level of a {like[0]} x {like[1]} grid")


def resize_columns(maps: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize the columns of ``maps`` (B, P_src, C) from grid ``src`` to ``dst``."""
    if tuple(src) == tuple(dst):
        return maps
    b, _p, c = maps.shape
    img = maps.transpose(1, 2).reshape(b, c, *src)
    img = F.interpolate(img.float(), size=dst, mode="bilinear", align_corners=False)
    return img.reshape(b, c, dst[0] * dst[1]).transpose(1, 2)


def columns_to_images(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, P, K) -> (B, K, h, w)."""
    b, _p, k = maps.shape
    return maps.transpose(1, 2).reshape(b, k, *hw)


def minmax(maps: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise along ``dim`` (per column of a (B, P, K) map by default)."""
    lo = maps.amin(dim=dim, keepdim=True)
    hi = maps.amax(dim=dim, keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def sum_normalise(maps: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    return maps / maps.sum(dim=dim, keepdim=True).clamp_min(eps)


def max_normalise(maps: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    return maps / maps.amax(dim=dim, keepdim=True).clamp_min(eps)


def token_maps(cross: torch.Tensor, spans: Sequence[Sequence[int]]) -> torch.Tensor:
    """Average the token columns of each label: (B, P, T), K spans -> (B, P, K)."""
    cols = [cross[:, :, list(s)].mean(dim=2) for s in spans]
    return torch.stack(cols, dim=2)


def propagate(self_attn: torch.Tensor, maps: torch.Tensor, iters: int, normalise=None) -> torch.Tensor:
    """Apply ``maps <- self_attn @ maps`` ``iters`` times (SelfCross, iSeg's refinement).

    Repeated matrix-vector products, never a matrix power: ``iters`` products of (P, P) by (P, K),
    linear in ``iters``. ``normalise`` (a function of a (B, P, K) tensor) is applied before each
    product when given (iSeg renormalises every iteration).
    """
    out = maps
    a = self_attn.to(maps.dtype)
    for _ in range(iters):
        if normalise is not None:
            out = normalise(out)
        out = torch.bmm(a, out)
    return out


def background_score(fg: torch.Tensor, power: float = 2.0, threshold: float | None = None) -> torch.Tensor:
    """T2M's background score from min-max foreground maps (B, P, K) -> (B, P).

    Paper: (1 - max_k SC_k)^power with power 2. The authors' code variant, ``(2 thr - max)^2``,
    is used when ``threshold`` is given (0.5 for VOC), clamped at 0 before the power.
    """
    m = fg.amax(dim=2) if fg.shape[2] > 0 else torch.zeros(fg.shape[:2], dtype=fg.dtype, device=fg.device)
    base = (1 - m) if threshold is None else (2 * threshold - m)
    return base.clamp_min(0) ** power


def with_background(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Stack background first: (B, P, K), (B, P) -> (B, P, K + 1)."""
    return torch.cat([bg.unsqueeze(2), fg], dim=2)


def connected_components(on: torch.Tensor) -> torch.Tensor:
    """8-connected components of a boolean image (h, w): int64 labels, 0 off, each component its own positive id.

    Label propagation by 3x3 max-pooling until nothing changes: every pixel ends with the largest
    (row-major index + 1) of its component.
    """
    h, w = on.shape
    ids = (torch.arange(h * w, dtype=torch.float32).reshape(h, w) + 1) * on
    while True:
        grown = F.max_pool2d(ids[None, None], 3, stride=1, padding=1)[0, 0] * on
        if torch.equal(grown, ids):
            return ids.long()
        ids = grown


def box_mask(maps: torch.Tensor, hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """Union of the bounding boxes of each map's regions above ``threshold`` x its maximum: (B, P, K) -> (B, P, K) 0/1.

    Regions are 8-connected components of the pixels strictly above the threshold, each boxed on its own (CLIP-ES's
    class-aware attention affinity, which T2M's code uses to restrict Self to where a label can be). A map with no
    such pixel (all zero, as a constant map is after min-max) gets an empty mask.
    """
    b, p, k = maps.shape
    h, w = hw
    r = torch.arange(h).view(h, 1).expand(h, w)
    c = torch.arange(w).view(1, w).expand(h, w)
    out = torch.zeros((b, p, k), dtype=maps.dtype, device=maps.device)
    img = columns_to_images(maps.detach().float().cpu(), hw)
    for i in range(b):
        for j in range(k):
            m = img[i, j]
            labels = connected_components(m > threshold * m.max())
            ids = labels.unique()
            ids = ids[ids > 0].view(-1, 1, 1)
            if len(ids) == 0:
                continue
            sel = labels[None] == ids  # (C, h, w): one component a plane
            y0, y1 = torch.where(sel, r, h).amin((1, 2)), torch.where(sel, r, -1).amax((1, 2))
            x0, x1 = torch.where(sel, c, w).amin((1, 2)), torch.where(sel, c, -1).amax((1, 2))
            box = lambda lo, hi, g: (g >= lo.view(-1, 1, 1)) & (g <= hi.view(-1, 1, 1))  # noqa: E731
            inside = (box(y0, y1, r) & box(x0, x1, c)).any(dim=0)
            out[i, :, j] = inside.flatten().to(out.dtype)
    return out
