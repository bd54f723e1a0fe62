"""Are two objects of the same shape told apart by their colour words? (the embedded model's colour test)

Held-out ShapesWorld scenes (seed 1) holding two objects of the same shape in different colours are
segmented with the labels "<colour A> <shape>" and "<colour B> <shape>". For each object the IoU of
its own phrase's mask with its instance mask is compared with the IoU of the *other* phrase's mask
with it (the swapped assignment). A method that reads only the shape word, or only saliency, scores
the same both ways; telling the objects apart by colour shows as own > swapped.
"""

from __future__ import annotations

import numpy as np

from attnseg.shapes.world import make_scene

HOLDOUT_SEED = 1


def _same_shape_pair(scene, min_pixels: int) -> tuple[int, int] | None:
    """The first two objects of one shape that are both visible enough, or None."""
    n = len(scene.objects)
    for a in range(n):
        for b in range(a + 1, n):
            if scene.objects[a].shape == scene.objects[b].shape and all(
                (scene.instance == j + 1).sum() >= min_pixels for j in (a, b)
            ):
                return a, b
    return None


def pair_scenes(n: int, seed: int = HOLDOUT_SEED, min_pixels: int = 30, max_index: int = 20000) -> list:
    """The first ``n`` scenes with two visible objects of one shape (each >= ``min_pixels`` visible)."""
    out = []
    for i in range(max_index):
        sc = make_scene(seed, i)
        pair = _same_shape_pair(sc, min_pixels)
        if pair is not None:
            out.append((sc, *pair))
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} same-shape scenes among the first {max_index} of seed {seed}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 0.0


def same_shape_report(predictor, n: int = 50, methods=("cross", "t2m", "iseg"), seed: int = 0) -> dict:
    """Per method: mean IoU of each object with its own phrase vs with the other phrase, and the
    fraction of objects whose own IoU is higher."""
    scenes = pair_scenes(n)
    res = {}
    for spec in methods:
        method, _, preset = spec.partition(":")
        preset = preset or predictor.default_presets.get(method)  # the model's own preset, named in the key
        own, swapped, wins = [], [], 0
        for sc, a, b in scenes:
            phrases = [sc.objects[a].phrase, sc.objects[b].phrase]
            r = predictor.segment_batch([sc.image], [phrases], method=method, preset=preset, seed=seed)[0]
            for k, j in enumerate((a, b)):  # label k + 1 names object j; label 2 - k names the other one
                inst = sc.instance == j + 1
                own.append(_iou(r.mask == k + 1, inst))
                swapped.append(_iou(r.mask == 2 - k, inst))
                wins += own[-1] > swapped[-1]
        res[f"{method}:{preset}" if preset else method] = {
            "objects": len(own),
            "own_iou": float(np.mean(own)),
            "swapped_iou": float(np.mean(swapped)),
            "own_higher": wins / len(own),
        }
    return res
