"""Images segmented with their aspect kept (T2M's code): sizes, non-square grids, and the same numbers as the square
path where the two must agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnseg.diffusion.layers import LayerInfo, LayerSelect, finest_grid
from attnseg.diffusion.prompts import T2M_SYNONYMS, T2M_VOC_CLASS_BACKGROUND_WORDS, compose_prompt
from attnseg.io.images import resize_pad
from attnseg.methods.t2m import PAD_COLOUR, T2M_PRESETS, code_size
from attnseg.ops.maps import grid_of
from attnseg.shapes.world import make_scene


def T2M_PROMPT_OF(labels):
    cfg = T2M_PRESETS["code"]
    assert cfg.class_background_words is T2M_VOC_CLASS_BACKGROUND_WORDS
    words = tuple(dict.fromkeys(w for lab in labels for w in cfg.class_background_words.get(lab, cfg.background_words)))
    p = compose_prompt(labels, cfg.template, synonyms=T2M_SYNONYMS, background_words=words)
    return p.text, p.char_spans


@pytest.mark.parametrize(
    "hw, scale, multiple, sizes",
    [
        ((375, 500), 1, 64, ((576, 768), (576, 768))),  # VOC's 4:3: ratio 1.33 -> 12 units of 64 px
        ((300, 500), 1, 64, ((499, 832), (512, 832))),  # 5:3 -> 13 units; 499 padded to 512
        ((1000, 400), 1, 64, ((1024, 409), (1024, 448))),  # 5:2 -> 16 units; width padded
        ((100, 100), 1, 64, ((704, 704), (704, 704))),  # square: 11 units
        ((48, 64), 0.125, 16, ((72, 96), (80, 96))),  # a 64-px model: the same rule at an eighth of the size
    ],
)
def test_code_size_follows_the_authors_buckets_and_pads_to_the_multiple(hw, scale, multiple, sizes):
    assert code_size(*hw, scale, multiple) == sizes


def test_resize_pad_fills_the_bottom_and_right():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = resize_pad(img, (2, 3), (4, 5), PAD_COLOUR)
    assert out.shape == (4, 5, 3) and np.array_equal(out[:2, :3], img)
    assert (out[2:] == PAD_COLOUR).all() and (out[:, 3:] == PAD_COLOUR).all()
    with pytest.raises(ValueError, match="cannot pad"):
        resize_pad(img, (2, 3), (1, 5), PAD_COLOUR)


def test_t2m_code_prompt_lists_labels_and_each_labels_background_words():
    text, spans = T2M_PROMPT_OF(["cat", "boat", "tvmonitor"])
    assert text == (
        "a photo including cat, boat, tv monitor screen, tree, river, sea, lake, water, railway, railroad, track, "
        "stone, rocks, mountain, keyboard, and wall."
    )
    assert compose_prompt(["cat"], "t2m-code", background_words=("tree",)).text == "a photo including cat, tree."
    assert len(spans) == 3 and spans[2] == (text.index("tv monitor screen"), text.index("tv monitor screen") + 17)


def test_layer_grids_of_a_non_square_latent_halve_each_side_rounding_up():
    lay = LayerInfo("x", "self", "up", 2, 0, 1)
    assert lay.grid((11, 16)) == (3, 4) and lay.pixels((11, 16)) == 12 and lay.side((11, 16)) == 4
    assert lay.grid(16) == (4, 4)
    fine = LayerInfo("y", "self", "up", 0, 1, 1)
    assert finest_grid([lay, fine], (11, 16)) == (11, 16)
    assert LayerSelect(kind="self", sides=(4,)).resolve([lay, fine], (11, 16)) == [lay]


def test_grid_of_finds_the_level_of_a_pixel_count():
    assert grid_of(24, (16, 24)) == (4, 6)
    assert grid_of(12, (5, 7)) == (3, 4)
    assert grid_of(35, (5, 7)) == (5, 7)
    assert grid_of(1024, (16, 16)) == (32, 32)  # a finer level: a 32-px cross map read on a 16-px grid
    assert grid_of(99, (5, 6)) == (9, 11)  # 9 x 11 halves to 5 x 6; of the grids that do, the only one of 99 pixels
    with pytest.raises(ValueError, match="not a level"):
        grid_of(10, (16, 24))


def test_t2m_code_keeps_the_aspect_and_the_embedded_presets_do_not():
    assert T2M_PRESETS["code"].resize == "code" and T2M_PRESETS["coco-code"].resize == "code"
    assert T2M_PRESETS["voc"].resize == "square" and T2M_PRESETS["embedded-code"].resize == "square"


def test_the_code_resize_reads_each_image_padded_at_its_own_size_and_alike_alone_and_in_a_batch(predictor, monkeypatch):
    r = predictor.resolution
    scale, mult = predictor.backbone.native_resolution / 512, predictor.size_multiple
    wide = make_scene(7, 1).image[: r // 2]  # half as tall as wide
    tall = make_scene(7, 2).image[:, : r // 2]
    seen = []
    orig = predictor.score_maps

    def spy(latents, *a, **kw):
        out = orig(latents, *a, **kw)
        seen.append((tuple(latents.shape[-2:]), tuple(out[0][0].shape[-2:])))
        return out

    monkeypatch.setattr(predictor, "score_maps", spy)
    kw = dict(method="t2m", preset="embedded", draws=1, seed=0, resize="code")
    both = predictor.segment_batch([wide, tall], [["circle"], ["star"]], **kw)
    f = r // predictor.backbone.latent_side(r)
    (_, pw), (_, pt) = code_size(*wide.shape[:2], scale, mult), code_size(*tall.shape[:2], scale, mult)
    (lw, gw), (lt, gt) = seen
    assert lw == (pw[0] // f, pw[1] // f) and lt == (pt[0] // f, pt[1] // f)  # each image padded at its own size
    assert gw[1] == 2 * gw[0] and gt[0] == 2 * gt[1]  # and read on a grid of its aspect
    assert both[0].scores.shape == (2, *wide.shape[:2]) and both[1].mask.shape == tall.shape[:2]
    assert both[0].settings["resolution"] == list(pw)
    alone = predictor.segment_batch([tall], [["star"]], **kw)[0]
    assert np.allclose(alone.scores, both[1].scores, atol=2e-3)


def test_the_padding_is_cropped_from_the_scores(predictor, monkeypatch):
    r = predictor.resolution
    wide = make_scene(7, 1).image[: r // 2]
    (h, w), (ph, pw) = code_size(*wide.shape[:2], predictor.backbone.native_resolution / 512, predictor.size_multiple)
    assert (ph, pw) != (h, w)
    scores = torch.full((2, ph, pw), 0.5)
    scores[0] = 0.0
    scores[0, h:] = scores[0, :, w:] = 1.0  # background wins on the padding only

    def fake(latents, labels, *a, **kw):  # scores at the padded pixel size: the crop is exact there
        return [scores], ["p"], [[1.0]]

    monkeypatch.setattr(predictor, "score_maps", fake)
    res = predictor.segment_batch([wide], [["circle"]], method="t2m", preset="embedded", draws=1, resize="code")[0]
    assert res.scores.shape == (2, *wide.shape[:2]) and (res.mask == 1).all()
    assert np.allclose(res.scores[0], 0.0)


def test_cross_maps_finer_than_the_working_grid_are_resized_down(predictor):
    coarse = LayerSelect(kind="self", ranks=(0,))  # the coarsest self layer: every decoder cross map is finer
    predictor.set_image(make_scene(7, 0).image[:, :48])
    plan = predictor.method("iseg", "embedded", self_layer=coarse).plan(predictor.inventory, (16, 12))
    assert plan.grid == (4, 3)
    res = predictor.segment(["circle"], method="iseg", preset="embedded", self_layer=coarse)
    assert res.scores.shape == (2, 64, 48) and np.isfinite(res.scores).all()


def test_the_code_resize_encodes_each_image_once_and_not_at_the_square(predictor, monkeypatch):
    r = predictor.resolution
    wide = make_scene(7, 1).image[: r // 2]
    calls = []
    orig = predictor.backbone.encode_posteriors
    monkeypatch.setattr(predictor.backbone, "encode_posteriors", lambda ims, size, *a: calls.append(size) or orig(ims, size, *a))
    predictor.segment_batch([wide], [["circle"]], method="t2m", preset="embedded", draws=1, resize="code")
    assert calls == [code_size(*wide.shape[:2], 1.0 * r / 512, predictor.size_multiple)[1]]  # no square encoding
    calls.clear()
    predictor.set_image(wide)
    assert calls == [r]  # set_image encodes the square image for every other method
    for _ in range(2):
        predictor.segment(["circle"], method="t2m", preset="embedded", draws=1, resize="code")
    assert len(calls) == 2  # the padded image once, kept for the second call


def test_t2m_coco_code_writes_the_codes_coco_names(predictor):
    text, spans = predictor.prompt_for(["tv", "person", "cup"], "t2m", "coco-code")
    assert text == (
        "a photo including tv monitor screen, person with clothes, cup, tree, river, sea, lake, water, railway, "
        "railroad, track, stone, and rocks."
    )
    assert len(spans.spans) == 3
    with pytest.raises(ValueError, match="unknown synonyms 'ade'"):
        predictor.prompt_for(["tv"], predictor.method("t2m", "coco", synonyms="ade"))
