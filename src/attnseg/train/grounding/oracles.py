"""A class-aware ShapesWorld oracle, which misses badly drawn objects as the papers' detector does.

The colour oracle (``--detector shapes``) finds every object by its colour, so its masks are never empty. The
papers' Mask R-CNN recognises classes: where the diffusion model drew an object badly it returns nothing, the
all-zero masks that "training without zero masks" ignores (Grounded Diffusion section 4.3). This detector returns
the colour's pixels only when the ShapesWorld shape classifier names the prompt's shape in them; use it with
``--detector attnseg.train.grounding.oracles:ShapeCheckedDetector``.
"""

from __future__ import annotations

import numpy as np

from attnseg.shapes.oracle import ShapesOracle
from attnseg.shapes.world import COLOURS, SHAPES


class ShapeCheckedDetector:
    """``(image, "colour shape") -> mask``: the colour's pixels if the classifier names that shape, else all zero."""

    def __init__(self) -> None:
        self.oracle = ShapesOracle()

    def __call__(self, image: np.ndarray, phrase: str) -> np.ndarray:
        words = phrase.lower().split()
        colours = [w for w in words if w in COLOURS]
        shapes = [w for w in words if w in SHAPES]
        if not colours or not shapes:
            raise ValueError(f"the phrase {phrase!r} must name a ShapesWorld colour and shape, e.g. 'red circle'")
        found = self.oracle.find(image, colours[-1], shapes[-1])
        return found.mask if found.present else np.zeros(image.shape[:2], bool)
