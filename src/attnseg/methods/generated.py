"""Masks for images the model generates: CA (DiffuMask), CA.SA (Dataset Diffusion) and SeeDiff.

Inputs are maps aggregated over all denoising steps (:mod:`attnseg.generator`), grouped by
resolution: ``cross[s]`` (B, s*s, T) and ``self_attn[s]`` (B, s*s, s*s) for each grid side s.
Each method returns soft per-label maps (B, K, S, S) on the finest grid, in [0, 1].
Binarisation (beta), the uncertain band and PAMR are shared steps in :func:`finalize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnseg.ops.maps import columns_to_images, max_normalise, minmax, propagate, resize_columns, token_maps
from attnseg.ops.refine import PAMRConfig, pamr


@dataclass
class GeneratedConfig:
    """Settings shared by the generated-image methods; each method's dataclass adds its own."""

    steps: int = 50
    """Denoising steps (SeeDiff: 50 with SD 2-base)."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    beta: float = 0.3
    """Threshold of the final soft mask (SeeDiff's comparison protocol for every method)."""
    uncertain_band: tuple[float, float] | None = None
    """Pixels whose score lies in [lo, hi) are marked 255 (Dataset Diffusion: [0.5, 0.6))."""
    pamr: bool = True
    """Refine the soft mask with PAMR before binarising."""
    pamr_iters: int = 10


@dataclass
class CAConfig(GeneratedConfig):
    """DiffuMask-style cross-attention aggregation over all resolutions."""


@dataclass
class CASAConfig(GeneratedConfig):
    """Dataset Diffusion: Self_32^tau . Cross_16 (SD at 512 px: ranks 2 and 1)."""

    tau: int = 4
    cross_rank: int = 1
    self_rank: int = 2
    beta: float = 0.6
    uncertain_band: tuple[float, float] | None = (0.5, 0.6)
    pamr: bool = False


@dataclass
class SeeDiffConfig(GeneratedConfig):
    """SeeDiff (AAAI 2025) with the paper's alpha 0.5, beta 0.3 and PAMR."""

    alpha: float = 0.5
    """Seed threshold on the normalised maps."""
    seed_rank: int = 1
    """Resolution rank of the seed cross map (SD 2-base at 512 px: 16 px)."""
    variant: str = "paper"
    """"paper": thresholds alpha and beta, mean of self rows; "code": two elements of the authors' code, Otsu
    thresholds and cosine similarity of self rows to the seeds (its background cascade, 0.8 threshold and long PAMR
    are not implemented; docs/METHODS.md)."""


def sides_by_rank(sides: Sequence[int]) -> list[int]:
    """Grid sides sorted coarsest first: index = resolution rank."""
    return sorted(set(sides))


def _rank_side(sides: Sequence[int], rank: int) -> int:
    ss = sides_by_rank(sides)
    return ss[min(rank, len(ss) - 1)]


def _hw(side: int) -> tuple[int, int]:
    return (side, side)


def otsu_threshold(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each row of ``x`` (B, N) with values in [0, 1]: (B,)."""
    out = []
    edges = torch.linspace(0, 1, bins + 1, device=x.device)
    centers = (edges[:-1] + edges[1:]) / 2
    for row in x:
        h = torch.histc(row.float().clamp(0, 1), bins=bins, min=0, max=1)
        p = h / h.sum().clamp_min(1)
        w0 = p.cumsum(0)
        mu = (p * centers).cumsum(0)
        mt = mu[-1]
        between = (mt * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
        out.append(centers[int(between.argmax())])
    return torch.stack(out)


def expand_regions(self_attn: torch.Tensor, seeds: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """Region expansion (SeeDiff eq. 7): mean over seed pixels of their self-attention rows.

    self_attn: (B, P, P); seeds: (B, P, K) boolean -> (B, P, K) max-normalised maps. With
    ``cosine`` the map is the mean cosine similarity of every pixel's row to the seed rows
    (the authors' code). A label with no seed gets an all-zero map.
    """
    w = seeds.float()
    n = w.sum(dim=1, keepdim=True)
    if cosine:
        rows = torch.nn.functional.normalize(self_attn.float(), dim=2)
        seed_mean = torch.bmm(rows.transpose(1, 2), w) / n.clamp_min(1)  # (B, P, K): mean seed row
        m = torch.bmm(rows, seed_mean).clamp_min(0)
    else:
        m = torch.bmm(self_attn.float().transpose(1, 2), w) / n.clamp_min(1)
    m = torch.where(n > 0, m, torch.zeros_like(m))
    return max_normalise(m, dim=1)


def _thresh(m: torch.Tensor, alpha: float, otsu: bool) -> torch.Tensor:
    """Seeds of (B, P, K) maps: ``>= alpha``, or ``>=`` Otsu's threshold per map."""
    if not otsu:
        return m >= alpha
    b, p, k = m.shape
    t = otsu_threshold(m.transpose(1, 2).reshape(b * k, p)).reshape(b, 1, k)
    return m >= t


def seediff(
    cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]], cfg: SeeDiffConfig
) -> torch.Tensor:
    """SeeDiff's soft masks (B, K, S, S) from aggregated maps."""
    otsu = cfg.variant == "code"
    cosine = cfg.variant == "code"
    sides = sides_by_rank(self_attn)
    s0 = _rank_side(list(cross), cfg.seed_rank)
    ca = token_maps(cross[s0], spans)  # eq. 6 thresholds the aggregate of eq. 5 as it is
    chain = [s for s in sides if s >= s0]
    m = ca
    side = s0
    for s in chain:
        m = resize_columns(m, _hw(side), _hw(s))
        side = s
        m = expand_regions(self_attn[s], _thresh(m, cfg.alpha, otsu), cosine)
    # Background expansion from the inverted class map, at the finest resolution (eq. 10-11).
    inv = 1 - m
    bg = expand_regions(self_attn[side], _thresh(inv, cfg.alpha, otsu), cosine)
    final = (1 - bg) * m  # eq. 11, thresholded at beta as it is
    return columns_to_images(final, _hw(side))


def cross_aggregation(cross: dict[int, torch.Tensor], spans: Sequence[Sequence[int]], cfg: CAConfig) -> torch.Tensor:
    """DiffuMask's CA: per-label cross maps of every resolution, upsampled to the finest, averaged."""
    side = max(cross)
    acc = None
    for s, c in cross.items():
        m = resize_columns(max_normalise(token_maps(c, spans), dim=1), _hw(s), _hw(side))
        acc = m if acc is None else acc + m
    return columns_to_images(minmax(acc / len(cross)), _hw(side))


def cross_self(
    cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]], cfg: CASAConfig
) -> torch.Tensor:
    """Dataset Diffusion's Self_32^tau . Cross_16, as tau repeated products."""
    sc = _rank_side(list(cross), cfg.cross_rank)
    ss = _rank_side(list(self_attn), cfg.self_rank)
    c = resize_columns(max_normalise(token_maps(cross[sc], spans), dim=1), _hw(sc), _hw(ss))
    out = propagate(self_attn[ss].float(), c, cfg.tau)
    return columns_to_images(minmax(out), _hw(ss))


def finalize(
    soft: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int], cfg: GeneratedConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft maps (B, K, s, s) -> (soft at ``size``, label map (B, H, W) uint8).

    Upsample, optional PAMR on ``image`` (B, 3, H, W), then per pixel: the label with the highest
    score if it reaches beta, else background; scores inside the uncertain band become 255.
    """
    up = torch.nn.functional.interpolate(soft.float(), size=size, mode="bilinear", align_corners=False)
    if cfg.pamr and image is not None:
        up = pamr(image, up, PAMRConfig(iters=cfg.pamr_iters))
    top, arg = up.max(dim=1)
    lab = torch.where(top >= cfg.beta, arg + 1, torch.zeros_like(arg)).to(torch.uint8)
    if cfg.uncertain_band is not None:
        lo, hi = cfg.uncertain_band
        lab = torch.where((top >= lo) & (top < hi), torch.full_like(lab, 255), lab)
    return up, lab


class GeneratedMethod:
    """A generated-image method: its config, the maps it reads, and its soft masks.

    ``step_normalise`` says which maps are max-normalised at every step before the running mean (SeeDiff eq. 5):
    ``"all"`` (cross per token, self per map) or ``"cross"`` (self maps stay row-stochastic, for Self^tau).
    """

    name: str
    step_normalise: str = "cross"

    def __init__(self, config: GeneratedConfig) -> None:
        self.config = config

    def sides(self, cross_sides: Sequence[int], self_sides: Sequence[int]) -> tuple[list[int], list[int]]:
        """Grid sides of the cross and self maps the method reads (only those layers are captured)."""
        raise NotImplementedError

    def soft(self, cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]]):
        """Soft per-label masks (B, K, S, S) in [0, 1] from the maps aggregated over the steps."""
        raise NotImplementedError


class CA(GeneratedMethod):
    name = "ca"

    def sides(self, cross_sides, self_sides):
        return sorted(set(cross_sides)), []

    def soft(self, cross, self_attn, spans):
        return cross_aggregation(cross, spans, self.config)


class CASA(GeneratedMethod):
    name = "ca-sa"

    def sides(self, cross_sides, self_sides):
        return [_rank_side(cross_sides, self.config.cross_rank)], [_rank_side(self_sides, self.config.self_rank)]

    def soft(self, cross, self_attn, spans):
        return cross_self(cross, self_attn, spans, self.config)


class SeeDiff(GeneratedMethod):
    name = "seediff"
    step_normalise = "all"

    def sides(self, cross_sides, self_sides):
        s0 = _rank_side(cross_sides, self.config.seed_rank)
        return [s0], [s for s in sorted(set(self_sides)) if s >= s0]

    def soft(self, cross, self_attn, spans):
        return seediff(cross, self_attn, spans, self.config)


CA_PRESETS = {"default": CAConfig()}
CASA_PRESETS = {"default": CASAConfig(), "seediff-comparison": CASAConfig(beta=0.3, uncertain_band=None, pamr=True)}
SEEDIFF_PRESETS = {"default": SeeDiffConfig(), "code": SeeDiffConfig(variant="code")}
