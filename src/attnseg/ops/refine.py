"""From score maps to masks: label map, confidence, dense CRF and PAMR."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

UNCERTAIN_MARGIN = 0.05


def confidence_map(scores: torch.Tensor, margin: float = UNCERTAIN_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 margin of (K + 1, H, W) scores and the mask of uncertain pixels (margin < ``margin``)."""
    if scores.shape[0] < 2:
        conf = torch.ones(scores.shape[1:], dtype=scores.dtype)
    else:
        top = scores.topk(2, dim=0).values
        conf = top[0] - top[1]
    return conf, conf < margin


@dataclass
class CRFConfig:
    """Dense CRF settings of T2M's code."""

    iters: int = 10
    pos_xy_std: float = 1.0
    pos_w: float = 3.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_w: float = 4.0


def scores_to_probs(scores: torch.Tensor, eps: float = 1e-5) -> np.ndarray:
    """Non-negative scores (C, H, W) -> class probabilities that sum to one per pixel."""
    s = scores.float().clamp_min(0) + eps
    return (s / s.sum(dim=0, keepdim=True)).numpy()


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig | None = None) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl and Koltun) over ``probs`` (C, H, W); returns (C, H, W).

    ``image`` must be (H, W, 3) RGB uint8 at the size of ``probs``; anything else is refused
    rather than wrapped (T2M's code fed a wrapped uint8 image).
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError("dense CRF needs pydensecrf: pip install 'attnseg[crf]' (pydensecrf2)") from e
    cfg = cfg or CRFConfig()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense CRF needs an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    c, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and scores {(h, w)} differ in size")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w)
    d.addPairwiseBilateral(
        sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std, rgbim=np.array(image, dtype=np.uint8, order="C", copy=True), compat=cfg.bi_w
    )
    q = d.inference(cfg.iters)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


@dataclass
class PAMRConfig:
    """Pixel-adaptive mask refinement (Araslanov and Roth 2020)."""

    iters: int = 10
    """Refinement iterations; each costs one pass over the masks."""
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)
    """Dilations of the 3x3 neighbourhood (PAMR's; SeeDiff's code uses (1,))."""
    std_scale: float = 0.1
    """Colour differences are divided by this times the local colour std (PAMR's 0.1; SeeDiff's code 0.2)."""
    std_with_centre: bool = False
    """Count the centre pixel, once per dilation, in the local std, as PAMR's and SeeDiff's code do; False leaves
    it out (ours)."""


def _neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8 * len(dilations), H, W) values of the 3x3 ring at each dilation."""
    outs = []
    for d in dilations:
        p = F.pad(x, (d, d, d, d), mode="replicate")
        h, w = x.shape[-2:]
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                outs.append(p[..., d + dy : d + dy + h, d + dx : d + dx + w])
    return torch.stack(outs, dim=2)


def pamr_affinity(image: torch.Tensor, cfg: PAMRConfig | None = None) -> torch.Tensor:
    """PAMR's kernel: (B, 3, H, W) float image -> (B, N, H, W) weights of each pixel's N = 8 * len(dilations) neighbours.

    A softmax over the neighbours of minus the colour distance divided by ``std_scale`` x the local colour std,
    averaged over the channels. The weights of each pixel sum to one.
    """
    cfg = cfg or PAMRConfig()
    img = image.float()
    nb = _neighbours(img, cfg.dilations)  # (B, 3, N, H, W)
    diff = (img.unsqueeze(2) - nb).abs()
    if cfg.std_with_centre:
        centre = img.unsqueeze(2).expand(-1, -1, len(cfg.dilations), -1, -1)
        std = torch.cat([nb, centre], dim=2).std(dim=2, keepdim=True)
    else:
        std = nb.std(dim=2, keepdim=True)
    aff = -(diff / (1e-8 + cfg.std_scale * std)).mean(dim=1)  # (B, N, H, W)
    return aff.softmax(dim=1)


def pamr(image: torch.Tensor, masks: torch.Tensor, cfg: PAMRConfig | None = None) -> torch.Tensor:
    """Refine (B, K, H, W) masks by ``cfg.iters`` convex combinations of neighbours weighted by colour similarity.

    image: (B, 3, H, W) float; the weights are :func:`pamr_affinity`'s.
    """
    cfg = cfg or PAMRConfig()
    aff = pamr_affinity(image, cfg)
    m = masks.float()
    for _ in range(cfg.iters):
        m = (_neighbours(m, cfg.dilations) * aff.unsqueeze(1)).sum(dim=2)
    return m
