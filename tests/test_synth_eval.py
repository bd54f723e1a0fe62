"""Oracle scoring of generated masks: numbers on a hand-made folder, the ShapesWorld detector and prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnseg.io.images import palette_png
from attnseg.jobs.score_generated import load_detector, markdown, score_generated
from attnseg.shapes.oracle import ColourDetector, shapes_phrase
from attnseg.shapes.world import COLOURS, shapes_prompts


def _folder(root, mask):
    """One 4x4 item: a red 2x2 square top-left (the prompt's circle), grey elsewhere."""
    img = np.full((4, 4, 3), 128, np.uint8)
    img[:2, :2] = COLOURS["red"]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(img).save(root / "images" / "0.png")
    palette_png(mask.astype(np.uint8)).save(root / "masks" / "0.png")
    rec = {
        "id": "0",
        "index": 0,
        "prompt": "a photo of a red circle.",
        "labels": ["circle"],
        "seed": 0,
        "image": "images/0.png",
        "mask": "masks/0.png",
    }
    (root / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    (root / "classes.txt").write_text("background\ncircle\n")
    (root / "run.json").write_text(json.dumps({"method": "ca", "preset": None}))
    return root


def test_score_generated_counts_by_hand(tmp_path):
    # mask: the red square's top row and a wrong pixel below it; one uncertain pixel (left out).
    mask = np.zeros((4, 4))
    mask[0, :2] = 1
    mask[2, 0] = 1
    mask[3, 3] = 255
    r = score_generated(_folder(tmp_path / "g", mask), ColourDetector())
    # oracle: circle = 4 px top-left. Among the 15 scored px: circle TP 2, FN 2, FP 1; background TP 10.
    s = r["scores"]["method"]
    assert s["per_class"]["circle"] == pytest.approx(2 / 5)
    assert s["per_class"]["background"] == pytest.approx(10 / 13)
    assert r["uncertain"] == pytest.approx(1 / 16)
    # references on the same oracle map (16 px): all background -> bg 12/16, circle 0
    assert r["scores"]["all-background"]["per_class"]["background"] == pytest.approx(12 / 16)
    assert r["scores"]["first-label"]["per_class"]["circle"] == pytest.approx(4 / 16)
    assert "ca" in markdown([r])


def test_detector_and_phrases():
    assert shapes_phrase("a photo including a green triangle, and a pink star.", "star") == "pink star"
    assert shapes_phrase("a star", "star") == "star"
    with pytest.raises(ValueError, match="names no ShapesWorld colour"):
        ColourDetector()(np.zeros((2, 2, 3), np.uint8), "star")
    assert isinstance(load_detector("shapes"), ColourDetector)
    assert load_detector("attnseg.shapes.oracle:ColourDetector") is not None
    with pytest.raises(ValueError, match="cannot load detector"):
        load_detector("attnseg.nothing:Here")
    with pytest.raises(ValueError, match=r"package\.module:name"):
        load_detector("maskrcnn")


def test_shapes_prompts_name_each_object_by_colour():
    ps = shapes_prompts(50, seed=3, max_objects=2)
    assert ps == shapes_prompts(50, seed=3, max_objects=2)
    for prompt, labels in ps:
        assert 1 <= len(labels) <= 2 and len(set(labels)) == len(labels)
        for lab in labels:
            assert shapes_phrase(prompt, lab).split()[0] in COLOURS
    assert any(len(labs) == 2 for _, labs in ps) and any(len(labs) == 1 for _, labs in ps)


def test_score_generated_refuses_a_plain_folder(tmp_path):
    with pytest.raises(ValueError, match="not an `attnseg generate` folder"):
        score_generated(tmp_path, ColourDetector())
