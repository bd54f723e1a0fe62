"""A ShapesWorld oracle for generated images: find the prompt's objects by colour, name their shape.

The analogue of the papers' off-the-shelf detector (Mask R-CNN) for the embedded model's world:
- :func:`colour_mask` segments the pixels of a named colour (nearest palette colour within a
  distance), the region an object of that colour occupies;
- :class:`ShapeClassifier` names the shape of a binary region from rotation- and
  scale-invariant descriptors (solidity, hole ratio, circularity and the Fourier magnitudes of the
  radius-by-angle profile), by nearest neighbours over the visible objects of training scenes.
:class:`Detector` is the interface a user's own detector implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from attnseg.shapes.world import COLOURS, SHAPES, make_scene

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


class Detector(Protocol):
    """Anything that returns a binary mask (H, W) for a phrase in an RGB uint8 image."""

    def __call__(self, image: np.ndarray, phrase: str) -> np.ndarray: ...


def colour_mask(image: np.ndarray, colour: str, max_dist: float = 70.0) -> np.ndarray:
    """Pixels whose nearest object colour is ``colour`` and lies within ``max_dist`` (RGB units)."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    px = image.reshape(-1, 3).astype(np.float32)
    d = ((px[:, None, :] - _PALETTE[None]) ** 2).sum(-1) ** 0.5
    nearest = d.argmin(1)
    ok = (nearest == _NAMES.index(colour)) & (d.min(1) <= max_dist)
    m = ok.reshape(image.shape[:2])
    return ndimage.binary_opening(m, iterations=1) if m.sum() > 20 else m


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def shape_descriptor(mask: np.ndarray, harmonics: int = 8) -> np.ndarray:
    """Rotation/scale-invariant descriptor of a binary region."""
    from scipy.spatial import ConvexHull, QhullError

    filled = ndimage.binary_fill_holes(mask)
    area = float(mask.sum())
    hole = float(filled.sum() - area) / max(float(filled.sum()), 1.0)
    ys, xs = np.nonzero(filled)
    if len(xs) < 5:
        return np.zeros(4 + harmonics, np.float32)
    try:
        hull = ConvexHull(np.stack([xs, ys], 1).astype(float) + np.random.default_rng(0).uniform(-0.01, 0.01, (len(xs), 2)))
        solidity = float(filled.sum()) / max(hull.volume + 0.5 * hull.area, 1.0)
    except QhullError:
        solidity = 1.0
    edge = filled & ~ndimage.binary_erosion(filled)
    perim = float(edge.sum())
    circ = 4 * math.pi * float(filled.sum()) / max(perim**2, 1.0)
    cy, cx = ys.mean(), xs.mean()
    ey, ex = np.nonzero(edge)
    ang = np.arctan2(ey - cy, ex - cx)
    rad = np.hypot(ey - cy, ex - cx)
    bins = 64
    idx = ((ang + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    prof = np.zeros(bins)
    np.maximum.at(prof, idx, rad)
    # fill empty bins from neighbours
    for _ in range(3):
        empty = prof == 0
        if not empty.any():
            break
        prof[empty] = np.maximum(np.roll(prof, 1), np.roll(prof, -1))[empty]
    prof = prof / max(prof.mean(), 1e-6)
    spec = np.abs(np.fft.rfft(prof))[1 : harmonics + 1] / bins
    return np.concatenate([[solidity, hole * 3, circ, prof.std()], spec * 4]).astype(np.float32)


class ShapeClassifier:
    """Nearest-neighbour shape names from descriptors of rendered ShapesWorld shapes."""

    def __init__(self, scenes: int = 600, seed: int = 0, k: int = 5) -> None:
        # Visible masks of training-world scenes (seed 0), occlusions included.

        feats, labels = [], []
        for i in range(scenes):
            sc = make_scene(seed, i)
            for j, o in enumerate(sc.objects):
                m = sc.instance == j + 1
                if m.sum() >= 30:
                    feats.append(shape_descriptor(m))
                    labels.append(SHAPES.index(o.shape))
        self.feats = np.stack(feats)
        self.labels = np.array(labels)
        self.k = k

    def __call__(self, mask: np.ndarray) -> str:
        f = shape_descriptor(mask)
        d = ((self.feats - f) ** 2).sum(1)
        nn = self.labels[np.argsort(d)[: self.k]]
        return SHAPES[int(np.bincount(nn, minlength=len(SHAPES)).argmax())]


@dataclass
class OracleResult:
    present: bool
    colour_found: bool
    shape: str | None
    mask: np.ndarray


class ShapesOracle:
    """Checks generated images against their prompts' (colour, shape) objects."""

    def __init__(self, min_area: int = 25) -> None:
        self.classifier = ShapeClassifier()
        self.min_area = min_area

    def find(self, image: np.ndarray, colour: str, shape: str | None = None) -> OracleResult:
        m = largest_component(colour_mask(image, colour))
        if m.sum() < self.min_area:
            return OracleResult(False, False, None, np.zeros(image.shape[:2], bool))
        name = self.classifier(m)
        return OracleResult(shape is None or name == shape, True, name, colour_mask(image, colour))


class ColourDetector:
    """:class:`Detector` of ShapesWorld: the pixels of the colour its phrase names ("red circle" -> red).

    The mask is every pixel of that colour, not only the largest region: where the model drew the
    object in two pieces, both count.
    """

    def __call__(self, image: np.ndarray, phrase: str) -> np.ndarray:
        words = phrase.lower().split()
        named = [w for w in words if w in COLOURS]
        if not named:
            raise ValueError(f"the phrase {phrase!r} names no ShapesWorld colour ({', '.join(COLOURS)})")
        return colour_mask(image, named[-1])


def shapes_phrase(prompt: str, label: str) -> str:
    """The phrase of ``label`` in a ShapesWorld prompt: the label with the colour word just before it."""
    import re

    words = re.findall(r"[a-z]+", prompt.lower())
    for i, w in enumerate(words):
        if w == label.lower() and i > 0 and words[i - 1] in COLOURS:
            return f"{words[i - 1]} {label}"
    return label
