"""SeeDiff's `code` variant (the authors' released code) and the empty-mask report, on hand-made maps."""

from __future__ import annotations

import math

import pytest
import torch

from attnseg.generator import EmptyMaskWarning, report_unseeded
from attnseg.methods.generated import (
    SEEDIFF_PRESETS,
    CAConfig,
    SeeDiff,
    SeeDiffConfig,
    background_cascade,
    cosine_regions,
    finalize,
    otsu_seeds,
    otsu_threshold,
    seediff,
)
from attnseg.ops.refine import PAMRConfig, pamr_affinity


def test_otsu_seeds_threshold_the_squared_map():
    # Levels of x: 0, 0, 0.6, 1. Otsu on x splits {0} | {0.6, 1}; on x^2 (0, 0, 0.36, 1) the split {0, 0.36} | {1}
    # has the larger between-class variance (0.1875 * 0.88^2 > 0.25 * 0.68^2), so only the last pixel is a seed.
    x = torch.tensor([0.0, 0.0, 0.6, 1.0])
    assert otsu_seeds(x.view(1, 4, 1))[0, :, 0].tolist() == [False, False, False, True]
    assert (x >= otsu_threshold(x[None], bins=256)).tolist() == [False, False, True, True]
    assert not otsu_seeds(torch.zeros((1, 4, 1))).any()  # a flat (min-maxed) map has no seed


def test_cosine_regions_sum_cosines_to_the_seed_rows_then_min_max():
    rows = torch.tensor([[[3.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]])  # cos(r0, r1) = 0.6, r2 orthogonal
    seeds = torch.tensor([[[True, False, False], [False, True, False], [False, False, False]]])
    m = cosine_regions(rows, seeds)
    assert torch.allclose(m[0, :, 0], torch.tensor([1.0, 0.6, 0.0]), atol=1e-6)  # sums 1, 0.6, 0
    assert torch.allclose(m[0, :, 1], torch.tensor([0.6, 1.0, 0.0]), atol=1e-6)
    assert torch.equal(m[0, :, 2], torch.zeros(3))  # no seed: empty


def test_background_cascade_removes_what_the_finer_self_attention_calls_background():
    # Pixels 0, 1 attend to each other, 2, 3 to each other. prev = 1, .9, .35, 0 (and an all-zero second label).
    # Otsu on the levels of prev^2 (255, 206, 31, 0) splits {0, 31} | {206, 255}: background seeds 2 and 3, whose
    # cosine map is 0, 0, 1, 1. Result: minmax(prev * (1 - bg)) = 1, .9, 0, 0: pixel 2's .35 is removed.
    s = torch.tensor([[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]])
    prev = torch.tensor([[[1.0, 0.0], [0.9, 0.0], [0.35, 0.0], [0.0, 0.0]]])
    out = background_cascade(s, prev)
    assert torch.allclose(out[0, :, 0], torch.tensor([1.0, 0.9, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(out[0, :, 1], torch.zeros(4))


def _block_world(side: int):
    """Pixels in the left half attend to the left half only, same for the right."""
    p = side * side
    left = torch.tensor([(i % side) < side // 2 for i in range(p)])
    same = (left[:, None] == left[None, :]).float()
    return (same / same.sum(1, keepdim=True))[None]


def test_code_variant_on_a_hand_made_world():
    # 4 px: one seed at the top-left; its cosine map is the left half (1) and the right half (0). Bilinear to 8 px,
    # each row: 1, 1, 1, .75, .25, 0, 0, 0. Otsu of the squares' levels (255 x3, 143, 15, 0 x3) puts 15 in the
    # background: background seeds are columns 4-7, the right half, so column 4's .25 goes and the rest stays.
    cross = torch.full((1, 16, 3), 0.1)
    cross[0, 0, 1] = 1.0
    cfg = SeeDiffConfig(seed_rank=0, variant="code")
    soft = seediff({4: cross}, {4: _block_world(4), 8: _block_world(8)}, [[1]], cfg)
    want = torch.tensor([1.0, 1.0, 1.0, 0.75, 0.0, 0.0, 0.0, 0.0]).expand(8, 8)
    assert torch.allclose(soft[0, 0], want, atol=1e-6)


def test_finalize_binary_refines_the_mask_at_beta_then_keeps_what_reaches_0_8():
    # One row, a flat image: every PAMR weight is 1/8 (the 3x3 ring with replicated borders: 3 left, 3 right, 2 above
    # and below). The soft row is binarised at beta .3: 1 1 1 0 0 0. One iteration: (3 left + 3 right + 2 centre) / 8
    # = 1, 1, 5/8, 3/8, 0, 0, min-maxed as it is. 0.8 keeps two pixels; 0.5 would keep three.
    soft = torch.tensor([0.9, 0.7, 0.35, 0.2, 0.1, 0.0]).view(1, 1, 1, 6)
    image = torch.zeros((1, 3, 1, 6))
    code = dict(pamr_input="binary", pamr_iters=1, pamr_dilations=(1,), pamr_std_scale=0.2, pamr_std_centre=True)
    scores, lab = finalize(soft, image, (1, 6), SeeDiffConfig(**code))
    assert torch.allclose(scores[0, 0, 0], torch.tensor([1, 1, 5 / 8, 3 / 8, 0, 0]), atol=1e-6)
    assert lab[0, 0].tolist() == [1, 1, 0, 0, 0, 0]
    _, lab = finalize(soft, image, (1, 6), SeeDiffConfig(**code, pamr_threshold=0.5))
    assert lab[0, 0].tolist() == [1, 1, 1, 0, 0, 0]


def test_pamr_affinity_with_the_codes_local_std():
    # Pixel 0 of the row [0, 1]: its ring (replicated borders) holds 3 ones and 5 zeros. With the centre the 9
    # values have std 1/2, so a one's logit is -1 / (0.2 * 0.5) = -10; without it std is sqrt(120/448), scale 0.1.
    image = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    ones_at = 2  # ring order (-1,-1), (-1,0), (-1,1), ...: (-1, +1) is the right neighbour

    def weight(logit: float) -> float:
        return math.exp(logit) / (5 + 3 * math.exp(logit))

    code = pamr_affinity(image, PAMRConfig(dilations=(1,), std_scale=0.2, std_with_centre=True))
    assert code[0, ones_at, 0, 0].item() == pytest.approx(weight(-10.0), rel=1e-4)
    ours = pamr_affinity(image, PAMRConfig(dilations=(1,)))
    assert ours[0, ones_at, 0, 0].item() == pytest.approx(weight(-1 / (0.1 * math.sqrt(120 / 448))), rel=1e-4)
    assert torch.allclose(code.sum(dim=1), torch.ones(1, 1, 2))


def test_a_label_below_alpha_is_reported_and_its_mask_is_empty():
    cross = torch.full((1, 16, 4), 0.1)
    cross[0, 0, 1] = 1.0  # label 0 ("circle") reaches alpha
    cross[0, 5, 2] = 0.4  # label 1 ("star") peaks at 0.4 < alpha 0.5
    selfm = {4: _block_world(4), 8: _block_world(8)}
    method = SeeDiff(SeeDiffConfig(seed_rank=0))
    assert method.soft({4: cross}, selfm, [[1], [2]])[0, 1].abs().max() == 0
    why = method.unseeded({4: cross}, selfm, [[1], [2]])
    assert list(why[0]) == [1] and "peaks at 0.4, below alpha 0.5" in why[0][1]
    with pytest.warns(EmptyMaskWarning, match=r"seediff: label 'star' of prompt 'a circle and a star' gets an empty mask"):
        assert report_unseeded("seediff", "a circle and a star", ["circle", "star"], why[0]) == ["star"]
    # The code variant's Otsu seeds find the 0.4 peak; a flat map has none.
    code = SeeDiff(SeeDiffConfig(seed_rank=0, variant="code"))
    assert code.unseeded({4: cross}, selfm, [[1], [2]]) == [{}]
    flat = code.unseeded({4: cross}, selfm, [[1], [3]])[0]
    assert list(flat) == [1] and "flat" in flat[1]


def test_code_preset_carries_the_codes_constants():
    cfg = SEEDIFF_PRESETS["code"]
    assert (cfg.variant, cfg.upsample, cfg.pamr_input, cfg.beta, cfg.pamr_threshold) == ("code", "bicubic", "binary", 0.3, 0.8)
    assert (cfg.pamr_iters, tuple(cfg.pamr_dilations), cfg.pamr_std_scale, cfg.pamr_std_centre) == (5000, (1,), 0.2, True)
    with pytest.raises(ValueError, match="unknown pamr_input 'hard'"):
        finalize(torch.zeros((1, 1, 2, 2)), None, (2, 2), CAConfig(pamr_input="hard"))


def test_generate_with_the_code_preset_on_the_tiny_pipeline(predictor):
    from attnseg.generator import generate_with_masks

    gens = [torch.Generator().manual_seed(0)]
    items = generate_with_masks(
        predictor.backbone, ["a photo of a circle"], [["circle"]], preset="code", generators=gens, steps=2, pamr_iters=3
    )
    (it,) = items
    assert it.mask.shape == it.image.shape[:2] and it.soft.shape == (1, *it.image.shape[:2])
    assert set(it.mask.flatten().tolist()) <= {0, 1} and isinstance(it.unseeded, list)
