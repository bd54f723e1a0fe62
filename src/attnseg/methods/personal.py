"""Personalized referring segmentation (T2M section 5.3): which segment of a class region is which queried object.

Given the maps of one image on a grid of P pixels:

1. the class region: pixels where T2M's score of the class word (prompt "a photo including mug.") beats the
   background score (the paper), or the whole image (``PersonalConfig.class_region``, ours);
2. segments: spectral clustering of the self-attention restricted to the region (:mod:`attnseg.ops.spectral`),
   into the number of segments the eigengap rule picks, or into a fixed number (``PersonalConfig.segments``, ours);
3. attribution: per queried instance ("a <my-mug> mug with cola"), T2M's SelfCross of its attribution words (the
   learned token and the context words; not the class word, which every instance shares, nor function words),
   weighted at each pixel by its share of all queries' maps there (``PersonalConfig.compare``, ours), averaged over
   each segment -> a (Q, S) table;
4. assignment: each instance takes its best segment ("bf", before filtering: each object alone) or the Hungarian
   algorithm assigns instances to distinct segments maximising the total attribution ("af": all instances together).

Metrics (T2M section 5.3, "Evaluation"): bf_acc and af_acc, the share of instances given their true segment (the
segment matched to the instance by centre positions), and mIoU of the instances' masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnseg.ops.spectral import spectral_clusters

FUNCTION_WORDS: frozenset[str] = frozenset(
    "a an the of with and in on including photo photograph picture image next to other".split()
)
"""Words of a query that are not attribution words (ours: they name no object)."""


@dataclass
class PersonalConfig:
    """Settings of personalized referring segmentation."""

    t2m_preset: str | None = None
    """T2M's settings for every map (None: the model's default T2M preset); the paper uses "the same
    hyper-parameters as in Section 5.1"."""
    draws: int = 1
    """Noise draws (paper, appendix A: 1 for Mug19)."""
    region_template: str = "a photo including {cls}."
    """The class query that finds the object area (paper section 5.3)."""
    class_region: bool = False
    """True: split the class region (the paper); False: split the whole image (ours). On the embedded model the class
    region cuts objects: at ``region_threshold`` 0.1 it holds 80% of the objects' grid cells, and 51% of its cells are
    background. Over the whole image a background segment scores low for every query and is not chosen. With
    ``segments`` 12 this lifts one-query hits from 52.5% to 63.0% and the IoU of all-query (af) masks from 35.8 to 47.5
    (shipped model, colour queries, ShapesWorld personal scenes of world seed 0, the validation scenes;
    docs/BENCHMARKS.md)."""
    region_threshold: float | None = 0.1
    """With ``class_region``: None, the region is where T2M's class score beats its background score (the paper); a
    value, where the class's min-max SelfCross exceeds it (ours: on the embedded model the class map of several
    look-alike objects peaks on a few of them, and the background rule keeps half of their pixels; 0.1 chosen on the
    validation scenes)."""
    spatial_sigma: float | None = 0.125
    """None: the affinity is the self-attention alone; a value: it is multiplied by exp(-d^2 / (2 sigma^2)) of the
    pixels' distance d in grid sides, the spatial term of normalized cuts (Shi and Malik 2000, the clustering T2M
    cites; sigma ours, chosen with ``region_threshold``: look-alike objects attend to each other)."""
    segments: int | None = 12
    """A fixed number of segments (at least the number of queried instances): an over-segmentation in which an object
    is one segment or a few (ours, chosen with ``class_region`` on the validation scenes, where 10 to 16 are within 2
    points of each other); None: the eigengap rule picks the number (the paper does not say how many)."""
    compare: bool = True
    """Weight each query's map at each pixel by its share of all the queries' maps there (ours, a reading of the
    paper's "we compare the attribution map of different instances"): a pixel that every query's words attend to
    counts less than one that only this query's do. With one query it changes nothing. On the validation scenes (12
    segments, shipped model, all objects queried together) bf_acc 61.9 -> 67.9 for colour queries and 51.1 -> 62.0
    for colour and look word, af_acc 72.3 -> 73.5 and 79.3 -> 79.1 (docs/BENCHMARKS.md)."""
    max_segments: int = 8
    """With ``segments`` None, the most segments the region is split into; the eigengap rule picks the number between
    the number of queried instances and this (ours)."""
    assignment: str = "af"
    """Which assignment makes the masks: "af" (Hungarian over all queried instances) or "bf" (each alone) (ours: the
    paper reports both as accuracies; af is the higher one)."""


PERSONAL_PRESETS: dict[str, PersonalConfig] = {
    "default": PersonalConfig(),
    "bf": PersonalConfig(assignment="bf"),
    # The class region, thresholded, split by the eigengap rule.
    "class-region": PersonalConfig(class_region=True, segments=None, compare=False),
    # The paper's steps as written: the region of T2M's own background rule, the self-attention alone as the affinity.
    "plain": PersonalConfig(class_region=True, segments=None, compare=False, region_threshold=None, spatial_sigma=None),
}


def attribution_words(query: str, class_word: str) -> list[str]:
    """The words of ``query`` whose maps attribute it: all but the class word and :data:`FUNCTION_WORDS`.

    A query made of the class word alone (and function words) is attributed by the class word."""
    words = [w for w in query.replace(",", " ").replace(".", " ").split()]
    keep = [w for w in words if w.lower() not in FUNCTION_WORDS and w.lower() != class_word.lower()]
    return keep or [w for w in words if w.lower() == class_word.lower()]


def region_mask(fg: torch.Tensor, bg: torch.Tensor, min_pixels: int = 1, threshold: float | None = None) -> torch.Tensor:
    """(P,) bool: pixels whose class score ``fg`` (P,) beats the background ``bg`` (P,), or exceeds ``threshold``
    when one is given; at least the ``min_pixels`` highest-scoring pixels, so that a faint class still has a region."""
    on = fg > bg if threshold is None else fg > threshold
    if int(on.sum()) < min_pixels:
        on = torch.zeros_like(on)
        on[torch.topk(fg - bg, min(min_pixels, len(fg))).indices] = True
    return on


def spatial_affinity(grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """(P, P) exp(-d^2 / (2 sigma^2)) of the distances d of the pixels of an h x w grid, in units of the longer side."""
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()], dim=1) / max(h, w)
    return torch.exp(-torch.cdist(coords, coords).square() / (2 * sigma**2))


def region_segments(
    self_attn: torch.Tensor, region: torch.Tensor, k_min: int, k_max: int, spatial: torch.Tensor | None = None
) -> torch.Tensor:
    """(P,) segment ids: -1 outside ``region`` (P,) bool, 0..S-1 inside, by spectral clustering of the affinity
    ``self_attn`` (P, P), times ``spatial`` (P, P) when given, restricted to the region's pixels."""
    idx = torch.nonzero(region).flatten()
    affinity = self_attn.float() if spatial is None else self_attn.float() * spatial
    labels = spectral_clusters(affinity[idx][:, idx], k_min, k_max)
    out = torch.full((len(region),), -1, dtype=torch.long)
    out[idx] = torch.unique(labels, return_inverse=True)[1]  # consecutive ids: k-means may leave a cluster empty
    return out


def compared(maps: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """(Q, P) each non-negative map times its share of the sum of the ``maps`` (Q, P) at each pixel."""
    return maps * maps / maps.sum(dim=0, keepdim=True).clamp_min(eps)


def segment_scores(maps: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(Q, S) mean of each instance's map (Q, P) over each segment's pixels (segment ids (P,), -1 ignored)."""
    n = int(segments.max()) + 1 if len(segments) else 0
    out = torch.zeros((len(maps), max(n, 0)))
    for j in range(n):
        out[:, j] = maps[:, segments == j].float().mean(dim=1)
    return out


def assign_bf(scores: torch.Tensor) -> torch.Tensor:
    """(Q,) each instance's best segment of a (Q, S) table (bf: instances considered one at a time)."""
    return scores.argmax(dim=1)


def assign_af(scores: torch.Tensor) -> torch.Tensor:
    """(Q,) distinct segments of the Hungarian assignment maximising the total score of a (Q, S) table (af: all
    instances together); -1 for instances left without a segment when S < Q."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-scores.double().numpy())
    out = torch.full((scores.shape[0],), -1, dtype=torch.long)
    out[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return out


def segment_centres(segments: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) (row, col) centres of segments 0..n-1 of an id image (-1: none); NaN for an empty segment."""
    out = np.full((n, 2), np.nan)
    for j in range(n):
        ys, xs = np.nonzero(segments == j)
        if len(ys):
            out[j] = ys.mean(), xs.mean()
    return out


def true_segments(instance: np.ndarray, n_instances: int, segments: np.ndarray) -> np.ndarray:
    """(Q,) the segment each ground-truth instance (ids 1..Q of ``instance``) corresponds to: instances and segments
    paired one to one by the Hungarian algorithm on the distances of their centres (the paper pairs them "based on the
    relative relationship between the center positions"); -1 for an instance left without one."""
    from scipy.optimize import linear_sum_assignment

    n_seg = int(segments.max()) + 1
    inst = segment_centres(instance.astype(np.int64) - 1, n_instances)
    seg = segment_centres(segments, n_seg)
    d = np.linalg.norm(inst[:, None] - seg[None], axis=2)
    d = np.where(np.isnan(d), 1e9, d)
    out = np.full(n_instances, -1, np.int64)
    rows, cols = linear_sum_assignment(d)
    out[rows] = cols
    return out


def accuracy(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """Share of instances whose predicted segment is their true one (an unassigned instance, -1, is wrong)."""
    p, t = np.asarray(predicted), np.asarray(truth)
    if len(t) == 0:
        raise ValueError("no instances to score")
    return float(np.mean((p == t) & (t >= 0)))


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


@dataclass
class PersonalMaps:
    """Personalized referring segmentation of one image on the attention grid (P = h * w pixels).

    fg, bg: (P,) T2M's class and background scores of the region query; region: (P,) bool; segments: (P,) ids, -1
    outside the region; instance: (Q, P) each query's attribution map (weighted by its share with ``compare``);
    scores: (Q, S) its segment means; bf, af: (Q,) the segment of each query, each alone and all together (-1: none)."""

    queries: list[str]
    class_word: str
    grid: tuple[int, int]
    fg: torch.Tensor
    bg: torch.Tensor
    region: torch.Tensor
    segments: torch.Tensor
    instance: torch.Tensor
    scores: torch.Tensor
    bf: torch.Tensor
    af: torch.Tensor
    prompts: list[str]


def mask_segments(chosen: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The segment each query's mask shows (-1: none), from the assignment ``chosen`` (Q,) and the (Q, S) scores: a
    segment that several queries chose (bf, each query alone) goes to the one that scores it highest, the others get
    no mask; a mask is one segment of one query."""
    out = chosen.clone()
    for j in set(out.tolist()) - {-1}:
        qs = (out == j).nonzero().flatten()
        if len(qs) > 1:
            keep = qs[scores[qs, j].argmax()]
            out[qs[qs != keep]] = -1
    return out
