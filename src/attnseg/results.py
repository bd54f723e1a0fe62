"""What a segmentation returns: masks, scores and confidence of one image at its input size."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attnseg.ops.refine import CRFConfig, confidence_map, dense_crf, scores_to_probs

WEAK_PRESENCE = 0.3
"""A label whose presence is below this is listed in ``weak_labels``. Chosen on validation scenes of the embedded
model (world seed 3, one absent shape added to each scene's labels): it flags 34% of absent labels and 6% of present
ones (docs/BENCHMARKS.md)."""


@dataclass
class SegmentationResult:
    """Masks of one image at its input size.

    mask: (H, W) uint8, 0 = background, i = ``labels[i - 1]``.
    scores: (K + 1, H, W) float32 per-class scores, background first (CRF marginals with ``crf``).
    confidence: (H, W) top-2 margin of the scores; ``uncertain`` marks margins below 0.05.
    presence: per label, the peak of its raw cross-attention (the method's cross layers, before any normalisation)
    relative to the strongest label's, averaged over draws: 1 for the strongest; a label that is not in the image
    tends to lower values. Labels are assumed present; ``weak_labels`` names those below ``WEAK_PRESENCE``.
    """

    labels: list[str]
    mask: np.ndarray
    scores: np.ndarray
    confidence: np.ndarray
    uncertain: np.ndarray
    method: str
    prompt: str
    settings: dict = field(default_factory=dict)
    presence: list[float] = field(default_factory=list)

    @property
    def weak_labels(self) -> list[str]:
        """Labels whose presence is below ``WEAK_PRESENCE`` (none for unsupervised segments, which have no presence)."""
        return [lab for lab, p in zip(self.labels, self.presence, strict=False) if p < WEAK_PRESENCE]


def crf_config(crf: bool | CRFConfig) -> CRFConfig | None:
    """The dense CRF's settings of a ``crf`` argument: its own, the defaults for True, None for False."""
    return crf if isinstance(crf, CRFConfig) else CRFConfig() if crf else None


def make_result(image: np.ndarray, up: torch.Tensor, crf_cfg: CRFConfig | None, **fields) -> SegmentationResult:
    """The result of scores ``up`` (K + 1, H, W) at the image's size: refined by the CRF when asked, their argmax
    and confidence; ``fields`` are the result's other fields."""
    if crf_cfg is not None:
        up = torch.from_numpy(dense_crf(image, scores_to_probs(up), crf_cfg))
    conf, unc = confidence_map(up)
    scores = up.numpy().astype(np.float32)
    return SegmentationResult(
        mask=scores.argmax(axis=0).astype(np.uint8),  # numpy: torch's argmax over dim 0 is slow on CPU
        scores=scores,
        confidence=conf.numpy().astype(np.float32),
        uncertain=unc.numpy(),
        **fields,
    )
