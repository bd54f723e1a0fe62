"""The ShapesWorld oracle that checks generated images."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from attnseg.shapes.oracle import ShapesOracle, colour_mask
from attnseg.shapes.world import make_scene


@pytest.fixture(scope="module")
def oracle():
    return ShapesOracle()


def test_oracle_finds_objects_of_held_out_scenes(oracle):
    hits = total = 0
    for i in range(60):
        s = make_scene(4242, i)
        for o in s.objects:
            hits += oracle.find(s.image, o.colour, o.shape).present
            total += 1
    assert hits / total > 0.8  # measured 0.91 on 300 scenes; occlusion makes some shapes ambiguous


def test_oracle_rejects_absent_objects(oracle):
    s = make_scene(4242, 3)
    absent = [
        c
        for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
        if c not in {o.colour for o in s.objects}
    ]
    assert not any(oracle.find(s.image, c).present for c in absent)
    grey = np.full((64, 64, 3), 128, np.uint8)
    assert not oracle.find(grey, "red", "circle").present


def test_colour_mask_matches_ground_truth():
    s = make_scene(4242, 5)
    o = s.objects[-1]  # drawn last: fully visible
    gt = s.instance == len(s.objects)
    m = colour_mask(s.image, o.colour)
    iou = (m & gt).sum() / (m | gt).sum()
    assert iou > 0.8


def test_same_shape_pairs_report_on_a_perfect_and_a_swapping_predictor():
    from attnseg.train.embedded.pairs import pair_scenes, same_shape_report

    scenes = pair_scenes(3)
    for sc, a, b in scenes:
        assert sc.objects[a].shape == sc.objects[b].shape and sc.objects[a].colour != sc.objects[b].colour

    class Perfect:
        swap = False
        default_presets = MappingProxyType({})

        def segment_batch(self, images, labels, **kw):
            sc, a, b = next(t for t in scenes if np.array_equal(t[0].image, images[0]))
            m = np.zeros(sc.instance.shape, np.uint8)
            first, second = (b, a) if self.swap else (a, b)
            m[sc.instance == first + 1], m[sc.instance == second + 1] = 1, 2
            return [type("R", (), {"mask": m})()]

    r = same_shape_report(Perfect(), 3, methods=("cross",))["cross"]
    assert r == {"objects": 6, "own_iou": 1.0, "swapped_iou": 0.0, "own_higher": 1.0}
    p = Perfect()
    p.swap = True
    r = same_shape_report(p, 3, methods=("cross",))["cross"]
    assert r["own_iou"] == 0.0 and r["swapped_iou"] == 1.0 and r["own_higher"] == 0.0
