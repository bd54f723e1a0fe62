"""Masks for images the model generates: CA (DiffuMask), CA.SA (Dataset Diffusion) and SeeDiff.

Inputs are maps aggregated over all denoising steps (:mod:`attnseg.generator`), grouped by
resolution: ``cross[s]`` (B, s*s, T) and ``self_attn[s]`` (B, s*s, s*s) for each grid side s.
Each method returns soft per-label maps (B, K, S, S) on the finest grid, in [0, 1].
Binarisation (beta), the uncertain band and PAMR are shared steps in :func:`finalize`.
"""

from __future__ import annotations

import itertools
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
    upsample: str = "bilinear"
    """How soft maps are resized to the image, and between SeeDiff's resolutions: "bilinear" (SeeDiff eq. 8) or
    "bicubic" (SeeDiff's code, src/seediff_app.py: cv2.INTER_CUBIC at every resize)."""
    pamr: bool = True
    """Refine the mask with PAMR (SeeDiff supplement S2.4; its comparison applies it to every method)."""
    pamr_input: str = "soft"
    """What PAMR refines. "soft": the upsampled soft maps, then beta (SeeDiff supplement S2.4: "we apply PAMR on a
    soft mask M_final ... before the binarization"). "binary": the code's order (src/seediff_app.py): the upsampled
    maps are min-maxed per label and binarised at beta, PAMR refines the binary masks, which are min-maxed again and
    kept where they reach ``pamr_threshold`` (the supplement's comparison also speaks of "the binary mask input to
    PAMR at beta = 0.3")."""
    pamr_threshold: float = 0.8
    """With ``pamr_input="binary"``: threshold of the refined, min-maxed masks (SeeDiff's code, src/seediff_app.py:
    0.8; the code keeps values above it, we keep those that reach it)."""
    pamr_iters: int = 10
    """PAMR iterations: 10 (ours); SeeDiff's code runs 5000 (src/seediff_app.py; src/seediff_main_origin.py runs
    30000 but saves no mask from them). Each iteration is one pass over the full-size masks: lower it on CPU."""
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    """Dilations of PAMR's 3x3 neighbourhood: PAMR's (Araslanov and Roth 2020); SeeDiff's code (1,) (src/pamr.py)."""
    pamr_std_scale: float = 0.1
    """Colour differences over this x the local colour std: PAMR's 0.1; SeeDiff's code 0.2 (src/pamr.py)."""
    pamr_std_centre: bool = False
    """Count the centre pixel in the local colour std: False (ours); True in PAMR and SeeDiff's code (src/pamr.py)."""


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
    """Seed threshold on the normalised maps (paper eq. 6 and 9, section "Implementation details"); the "code"
    variant uses Otsu's threshold instead."""
    seed_rank: int = 1
    """Resolution rank of the seed cross map (SD 2-base at 512 px: 16 px; paper eq. 6)."""
    variant: str = "paper"
    """"paper": seeds at alpha, expansion by the mean of the seeds' self rows at every resolution, one background
    expansion at the finest (eq. 6-11). "code": what the authors' released code computes (GitHub BAIKLAB-Admin/SeeDiff,
    src/seediff_app.py and src/seediff_main_origin.py, ``aggregate_attention``; read, not copied): at the seed resolution, seeds above Otsu's threshold of the
    squared min-maxed cross map and expansion by the summed cosine similarity of self rows to the seeds' rows,
    min-maxed; at every finer resolution the background cascade of :func:`background_cascade`. The ``code`` preset
    adds the code's resizing and PAMR settings (``upsample``, ``pamr_*``)."""


OTSU_LEVELS = 256
"""SeeDiff's code runs Otsu on the squared maps as integer levels ``floor(255 x^2)`` (src/seediff_app.py)."""


def sides_by_rank(sides: Sequence[int]) -> list[int]:
    """Grid sides sorted coarsest first: index = resolution rank."""
    return sorted(set(sides))


def _rank_side(sides: Sequence[int], rank: int) -> int:
    ss = sides_by_rank(sides)
    return ss[min(rank, len(ss) - 1)]


def _hw(side: int) -> tuple[int, int]:
    return (side, side)


UPSAMPLE_MODES = ("bilinear", "bicubic")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use {' or '.join(repr(c) for c in choices)}")


def _resize(maps: torch.Tensor, src: int, dst: int, mode: str) -> torch.Tensor:
    """Resize the columns of (B, P, K) maps between square grids, bilinearly or bicubically."""
    if mode == "bilinear" or src == dst:
        return resize_columns(maps, _hw(src), _hw(dst))
    b, _p, k = maps.shape
    img = maps.transpose(1, 2).reshape(b, k, src, src).float()
    img = torch.nn.functional.interpolate(img, size=_hw(dst), mode=mode, align_corners=False)
    return img.reshape(b, k, dst * dst).transpose(1, 2)


def otsu_level(levels: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Otsu's threshold of each row of integer ``levels`` (N, P) in [0, n_levels): (N,) level t, upper class ``> t``.

    The first level of largest between-class variance, as OpenCV picks it; a constant row gives 0.
    """
    n = levels.shape[0]
    h = torch.zeros((n, n_levels), dtype=torch.float64, device=levels.device)
    h.scatter_add_(1, levels.long(), torch.ones(levels.shape, dtype=torch.float64, device=levels.device))
    p = h / h.sum(dim=1, keepdim=True).clamp_min(1)
    w0 = p.cumsum(1)
    mu = (p * torch.arange(n_levels, dtype=torch.float64, device=levels.device)).cumsum(1)
    between = (mu[:, -1:] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return between.argmax(dim=1)


def otsu_threshold(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each row of ``x`` (B, N) with values in [0, 1], on ``bins`` bins: (B,).

    The lower edge of the first bin of the upper class: ``x >= t`` is the upper class.
    """
    levels = (x.float().clamp(0, 1) * bins).floor().clamp_max(bins - 1)
    return (otsu_level(levels, bins) + 1).float() / bins


def otsu_seeds(m: torch.Tensor) -> torch.Tensor:
    """Seeds of (B, P, K) maps as SeeDiff's code takes them: pixels above Otsu's threshold of the squared map.

    Per column, on the integer levels ``floor(255 m^2)`` (src/seediff_app.py); a constant column has none when it is 0.
    """
    b, p, k = m.shape
    levels = (m.float() ** 2).clamp(0, 1).mul(OTSU_LEVELS - 1).floor().transpose(1, 2).reshape(b * k, p)
    t = otsu_level(levels, OTSU_LEVELS).reshape(b * k, 1)
    return (levels > t).reshape(b, k, p).transpose(1, 2)


def expand_regions(self_attn: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Region expansion (SeeDiff eq. 7): mean over seed pixels of their self-attention rows.

    self_attn: (B, P, P); seeds: (B, P, K) boolean -> (B, P, K) max-normalised maps. A label with no seed gets an
    all-zero map.
    """
    w = seeds.float()
    n = w.sum(dim=1, keepdim=True)
    m = torch.bmm(self_attn.float().transpose(1, 2), w) / n.clamp_min(1)
    m = torch.where(n > 0, m, torch.zeros_like(m))
    return max_normalise(m, dim=1)


def cosine_regions(self_attn: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Region expansion of SeeDiff's code: per pixel, the sum over seed pixels of the cosine similarity of its
    self-attention row to the seed's row, min-maxed per label.

    self_attn: (B, P, P); seeds: (B, P, K) boolean -> (B, P, K) in [0, 1]. A label with no seed gets an all-zero map.
    """
    rows = torch.nn.functional.normalize(self_attn.float(), dim=2)
    w = seeds.float()
    m = torch.bmm(rows, torch.bmm(rows.transpose(1, 2), w))  # (B, P, K): sum over the seeds of <row_p, row_seed>
    m = torch.where(w.sum(dim=1, keepdim=True) > 0, minmax(m, dim=1), torch.zeros_like(m))
    return m


def background_cascade(self_attn: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """One step of SeeDiff's code at a finer resolution (src/seediff_app.py, ``aggregate_attention`` at 32 and 64 px).

    prev: (B, P, K) the previous resolution's map upsampled to this grid; self_attn: (B, P, P). Background seeds
    are the pixels *not* above Otsu's threshold of ``prev^2``; their :func:`cosine_regions` map is the background
    ``bg``; the result is ``minmax(minmax(prev) * (1 - bg))``: the finer self-attention only removes background.
    """
    bg = cosine_regions(self_attn, ~otsu_seeds(prev))
    return minmax(minmax(prev, dim=1) * (1 - bg), dim=1)


def _chain(cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], cfg: SeeDiffConfig) -> tuple[int, list[int]]:
    """The seed cross map's side and the self-attention sides SeeDiff walks through, coarsest first."""
    s0 = _rank_side(list(cross), cfg.seed_rank)
    return s0, [s for s in sides_by_rank(self_attn) if s >= s0]


def seed_map(
    cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]], cfg: SeeDiffConfig
) -> torch.Tensor:
    """The (B, P, K) map SeeDiff takes its first seeds from, on the first self-attention grid of the chain.

    "paper": the aggregated cross map (eq. 6 thresholds the aggregate of eq. 5 as it is); "code": min-maxed.
    """
    s0, chain = _chain(cross, self_attn, cfg)
    m = _resize(token_maps(cross[s0], spans), s0, chain[0], cfg.upsample)
    return minmax(m, dim=1) if cfg.variant == "code" else m


def first_seeds(m: torch.Tensor, cfg: SeeDiffConfig) -> torch.Tensor:
    """Seeds (B, P, K) of :func:`seed_map`'s map: ``>= alpha`` (paper eq. 6) or the code's :func:`otsu_seeds`."""
    return otsu_seeds(m) if cfg.variant == "code" else m >= cfg.alpha


def seediff(
    cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]], cfg: SeeDiffConfig
) -> torch.Tensor:
    """SeeDiff's soft masks (B, K, S, S) from aggregated maps."""
    _check_choice("variant", cfg.variant, ("paper", "code"))
    _check_choice("upsample", cfg.upsample, UPSAMPLE_MODES)
    s0, chain = _chain(cross, self_attn, cfg)
    if cfg.variant == "code":
        m = cosine_regions(self_attn[chain[0]], first_seeds(seed_map(cross, self_attn, spans, cfg), cfg))
        for src, dst in itertools.pairwise(chain):
            m = background_cascade(self_attn[dst], _resize(m, src, dst, cfg.upsample))
        return columns_to_images(m, _hw(chain[-1]))
    m = token_maps(cross[s0], spans)  # eq. 6 thresholds the aggregate of eq. 5 as it is
    side = s0
    for s in chain:
        m = _resize(m, side, s, cfg.upsample)
        side = s
        m = expand_regions(self_attn[s], m >= cfg.alpha)
    # Background expansion from the inverted class map, at the finest resolution (eq. 10-11).
    inv = 1 - m
    bg = expand_regions(self_attn[side], inv >= cfg.alpha)
    final = (1 - bg) * m  # eq. 11, thresholded at beta as it is
    return columns_to_images(final, _hw(side))


def unseeded_labels(
    cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]], cfg: SeeDiffConfig
) -> list[dict[int, str]]:
    """Per image, {label index: why} for the labels SeeDiff finds no first seed for: their masks are all zero."""
    s0, _ = _chain(cross, self_attn, cfg)
    m = seed_map(cross, self_attn, spans, cfg)
    none = ~first_seeds(m, cfg).any(dim=1)  # (B, K)
    peaks = m.amax(dim=1)
    out = []
    for b in range(none.shape[0]):
        why = {}
        for k in none[b].nonzero().flatten().tolist():
            if cfg.variant == "code":
                why[k] = (
                    f"its {s0}-px cross-attention map is flat, so Otsu's threshold leaves no seed; check that the label is a "
                    "word of the prompt that the model knows"
                )
            else:
                why[k] = (
                    f"its {s0}-px cross-attention map peaks at {float(peaks[b, k]):.3g}, below alpha {cfg.alpha:g}, so it has "
                    "no seed; lower alpha below that peak (e.g. generate_with_masks(..., alpha=...)) or use the 'code' preset "
                    "(Otsu's thresholds)"
                )
        out.append(why)
    return out


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


def pamr_config(cfg: GeneratedConfig) -> PAMRConfig:
    """The PAMR settings of a generated-image config."""
    return PAMRConfig(
        iters=cfg.pamr_iters, dilations=cfg.pamr_dilations, std_scale=cfg.pamr_std_scale, std_with_centre=cfg.pamr_std_centre
    )


def _image_minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max each (H, W) map of (B, K, H, W) scores; a constant map becomes 0."""
    return minmax(x.flatten(2), dim=2).view_as(x)


def refine_binary(up: torch.Tensor, image: torch.Tensor | None, cfg: GeneratedConfig) -> torch.Tensor:
    """SeeDiff's code after the soft maps (src/seediff_app.py): (B, K, H, W) upsampled maps -> refined scores in [0, 1].

    Each map is min-maxed and binarised at beta; PAMR (when on and given ``image``) refines the binary masks, which
    are min-maxed again, to be thresholded at ``pamr_threshold``.
    """
    on = (_image_minmax(up) >= cfg.beta).float()
    if cfg.pamr and image is not None:
        on = pamr(image, on, pamr_config(cfg))
    return _image_minmax(on)


def finalize(
    soft: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int], cfg: GeneratedConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft maps (B, K, s, s) -> (scores at ``size``, label map (B, H, W) uint8).

    Upsample, then with ``pamr_input="soft"`` optional PAMR on ``image`` (B, 3, H, W) and per pixel the label with
    the highest score if it reaches beta, else background; with ``"binary"`` the scores of :func:`refine_binary` and
    ``pamr_threshold``. Scores inside the uncertain band become 255.
    """
    _check_choice("pamr_input", cfg.pamr_input, ("soft", "binary"))
    _check_choice("upsample", cfg.upsample, UPSAMPLE_MODES)
    up = torch.nn.functional.interpolate(soft.float(), size=size, mode=cfg.upsample, align_corners=False)
    if cfg.pamr_input == "binary":
        up, threshold = refine_binary(up, image, cfg), cfg.pamr_threshold
    else:
        if cfg.pamr and image is not None:
            up = pamr(image, up, pamr_config(cfg))
        threshold = cfg.beta
    top, arg = up.max(dim=1)
    lab = torch.where(top >= threshold, arg + 1, torch.zeros_like(arg)).to(torch.uint8)
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

    def unseeded(
        self, cross: dict[int, torch.Tensor], self_attn: dict[int, torch.Tensor], spans: Sequence[Sequence[int]]
    ) -> list[dict[int, str]]:
        """Per image, {label index: why} for the labels whose masks are empty because the method found no seed for
        them (none for methods without seeds)."""
        return [{} for _ in range(next(iter(cross.values())).shape[0])]


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

    def unseeded(self, cross, self_attn, spans):
        return unseeded_labels(cross, self_attn, spans, self.config)


CA_PRESETS = {"default": CAConfig()}
CASA_PRESETS = {"default": CASAConfig(), "seediff-comparison": CASAConfig(beta=0.3, uncertain_band=None, pamr=True)}
SEEDIFF_PRESETS = {
    "default": SeeDiffConfig(),
    # The paper's settings, under the name every method with a `code` preset has.
    "paper": SeeDiffConfig(),
    # The authors' code (BAIKLAB-Admin/SeeDiff: src/seediff_app.py, src/pamr.py). Its 5000 PAMR iterations take about
    # 2.5 minutes per 512-px image and label on one CPU thread: lower pamr_iters there.
    "code": SeeDiffConfig(
        variant="code",
        upsample="bicubic",
        pamr_input="binary",
        pamr_threshold=0.8,
        pamr_iters=5000,
        pamr_dilations=(1,),
        pamr_std_scale=0.2,
        pamr_std_centre=True,
    ),
}
