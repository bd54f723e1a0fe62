"""Images segmented with their aspect kept (T2M's code): sizes, non-square grids, and the same numbers as the square
path where the two must agree."""

from __future__ import annotations

import numpy as np
import pytest

from attnseg.diffusion.layers import LayerInfo, LayerSelect, finest_grid
from attnseg.diffusion.vae import aspect_size
from attnseg.methods.t2m import T2M_PRESETS
from attnseg.ops.maps import grid_of
from attnseg.shapes.world import make_scene


@pytest.mark.parametrize(
    "hw, size",
    [
        ((375, 500), (512, 704)),  # long side 500 -> 704: 528 x 704, 528 rounds to 512
        ((500, 375), (704, 512)),
        ((2000, 1000), (1024, 512)),  # long side 2000 -> 1024
        ((800, 600), (832, 576)),  # inside [704, 1024]: unchanged, then to multiples of 64 (12.5 rounds up)
        ((10, 1000), (64, 1024)),  # a side never rounds to zero
    ],
)
def test_aspect_size_keeps_the_aspect_and_brings_the_long_side_into_range(hw, size):
    assert aspect_size(*hw, (704, 1024), 64) == size


def test_aspect_size_refuses_a_bad_range():
    with pytest.raises(ValueError, match="lo <= hi"):
        aspect_size(10, 10, (1024, 704), 64)


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
    with pytest.raises(ValueError, match="not a level"):
        grid_of(10, (16, 24))


def test_t2m_code_keeps_the_aspect_and_the_embedded_presets_do_not():
    assert T2M_PRESETS["code"].long_side == (704, 1024) and T2M_PRESETS["coco-code"].long_side == (704, 1024)
    assert T2M_PRESETS["voc"].long_side is None and T2M_PRESETS["embedded-code"].long_side is None


def test_a_square_image_at_the_model_size_gives_the_square_path_numbers(predictor):
    r = predictor.resolution
    img = make_scene(7, 0).image
    assert img.shape[:2] == (r, r)
    predictor.set_image(img)
    square = predictor.segment(["circle", "star"], method="t2m", preset="embedded", draws=2, seed=3)
    kept = predictor.segment(["circle", "star"], method="t2m", preset="embedded", draws=2, seed=3, long_side=(r, r))
    assert np.array_equal(kept.scores, square.scores)
    assert square.settings["resolution"] == r and kept.settings["resolution"] == [r, r]


def test_a_wide_image_is_read_on_a_wide_grid_and_each_image_alike_alone_and_in_a_batch(predictor, monkeypatch):
    r, m = predictor.resolution, predictor.size_multiple
    wide = make_scene(7, 1).image[: r // 2]  # half as tall as wide
    tall = make_scene(7, 2).image[:, : r // 2]
    grids = []
    orig = predictor.score_maps

    def spy(latents, *a, **kw):
        out = orig(latents, *a, **kw)
        grids.append((tuple(latents.shape[-2:]), tuple(out[0][0].shape[-2:])))
        return out

    monkeypatch.setattr(predictor, "score_maps", spy)
    kw = dict(method="t2m", preset="embedded", draws=1, seed=0, long_side=(r, r))
    both = predictor.segment_batch([wide, tall], [["circle"], ["star"]], **kw)
    f = r // predictor.backbone.latent_side(r)
    (lw, gw), (lt, gt) = grids
    assert lw == (r // 2 // f, r // f) and lt == (r // f, r // 2 // f)  # each image's own latent, aspect kept
    assert gw[1] == 2 * gw[0] and gt[0] == 2 * gt[1]  # and its attention grid
    assert both[0].scores.shape == (2, *wide.shape[:2]) and both[1].mask.shape == tall.shape[:2]
    assert both[0].settings["resolution"] == [r // 2, r] and r % m == 0
    alone = predictor.segment_batch([tall], [["star"]], **kw)[0]
    assert np.allclose(alone.scores, both[1].scores, atol=2e-3)

