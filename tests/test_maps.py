"""Known answers of the maths on small hand-made tensors."""

from __future__ import annotations

import math

import torch

from attnseg.methods import entropy_reduced_self, self_cross
from attnseg.ops.maps import background_score, minmax, propagate, resize_columns, token_maps, with_background


def _row_stochastic(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((1, n, n), generator=g, dtype=torch.float64) + 0.01
    return a / a.sum(dim=2, keepdim=True)


def test_self_cross_equals_explicit_matrix_power():
    a = _row_stochastic(6)
    c = torch.rand((1, 6, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for iters in (0, 1, 2, 3):
        expected = torch.linalg.matrix_power(a[0], iters) @ c[0]
        assert torch.allclose(self_cross(a, c, iters)[0], expected)


def test_self_cross_hand_computed():
    # Two pixels that swap attention: Self = [[0, 1], [1, 0]]; Self^2 = I.
    a = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    c = torch.tensor([[[1.0], [3.0]]])
    assert self_cross(a, c, 1).flatten().tolist() == [3.0, 1.0]
    assert self_cross(a, c, 2).flatten().tolist() == [1.0, 3.0]


def test_propagate_normalises_before_each_product():
    a = torch.eye(2)[None]
    c = torch.tensor([[[2.0], [4.0]]])
    out = propagate(a, c, 1, normalise=minmax)
    assert out.flatten().tolist() == [0.0, 1.0]


def test_minmax_per_column():
    m = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [2.0, 15.0]]])
    out = minmax(m)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(out[0, :, 1], torch.tensor([0.0, 1.0, 0.5]))


def test_background_score_paper_and_code_forms():
    fg = torch.tensor([[[0.2, 0.9], [0.0, 0.1], [1.0, 0.3]]])  # (1, P=3, K=2)
    bg = background_score(fg)
    assert torch.allclose(bg[0], torch.tensor([(1 - 0.9) ** 2, (1 - 0.1) ** 2, 0.0]))
    # (2 thr - max)^2 with thr = 0.5 is the paper's form; thr 0.4 shifts it.
    assert torch.allclose(background_score(fg, threshold=0.5), bg)
    assert torch.allclose(background_score(fg, threshold=0.4)[0], torch.tensor([0.0, 0.7**2, 0.0]))
    full = with_background(fg, bg)
    assert full.shape == (1, 3, 3)
    assert full.argmax(dim=2).flatten().tolist() == [2, 0, 1]


def test_token_maps_average_each_label_tokens():
    cross = torch.arange(12, dtype=torch.float32).reshape(1, 2, 6)  # P=2, T=6
    out = token_maps(cross, [[1, 2], [4]])
    assert out[0].tolist() == [[1.5, 4.0], [7.5, 10.0]]


def test_entropy_reduced_self_one_step_code_variant():
    a = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]], dtype=torch.float64)
    lam = 0.1
    colmax = a / a.amax(dim=1, keepdim=True)
    upd = (colmax + lam * torch.log10(math.e * colmax)).clamp_min(0)
    expected = upd / upd.sum(dim=2, keepdim=True)
    out = entropy_reduced_self(a, lam, "code")
    assert torch.allclose(out, expected)
    # Hand check of one entry: column 0 max is 0.5, so a[1,0] -> 0.2 + 0.1*log10(e*0.2) > 0.
    v = 0.2 + 0.1 * math.log10(math.e * 0.2)
    assert math.isclose(upd[0, 1, 0].item(), v, rel_tol=1e-12)
    assert torch.allclose(out.sum(dim=2), torch.ones(1, 3, dtype=torch.float64))


def test_entropy_reduced_self_paper_variant_sharpens():
    a = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]], dtype=torch.float64)
    out = entropy_reduced_self(a, 0.05, "paper")
    expected = (a + 0.05 * (1 + torch.log(a))).clamp_min(0)
    expected = expected / expected.sum(dim=2, keepdim=True)
    assert torch.allclose(out, expected)

    def ent(x):
        return -(x * torch.log(x.clamp_min(1e-12))).sum()

    assert ent(out) < ent(a)


def test_confidence_is_top2_margin():
    from attnseg.ops.refine import confidence_map

    s = torch.tensor([0.1, 0.5, 0.4]).reshape(3, 1, 1)  # (classes, H, W)
    conf, unc = confidence_map(s)
    assert torch.allclose(conf, torch.tensor([[0.1]])) and not unc.item()
    conf, unc = confidence_map(torch.tensor([0.30, 0.33, 0.2]).reshape(3, 1, 1))
    assert unc.item()  # margin 0.03 < 0.05


def test_resize_columns_identity_and_constant():
    m = torch.ones((1, 16, 2))
    assert torch.equal(resize_columns(m, (4, 4), (4, 4)), m)
    assert torch.allclose(resize_columns(m, (4, 4), (8, 8)), torch.ones((1, 64, 2)))


def test_dense_crf_follows_colour_edges():
    import numpy as np
    import pytest

    pytest.importorskip("pydensecrf")
    from attnseg.ops.refine import dense_crf

    img = np.zeros((20, 20, 3), np.uint8)
    img[:, 10:] = 255
    probs = np.full((2, 20, 20), 0.5, np.float32)
    probs[1, :, :8] = 0.4  # weak evidence: class 1 on the right, edge misplaced by two columns
    probs[1, :, 8:] = 0.6
    probs[0] = 1 - probs[1]
    q = dense_crf(img, probs)
    lab = q.argmax(0)
    assert (lab[:, :10] == 0).all() and (lab[:, 10:] == 1).all()
    with pytest.raises(ValueError, match="uint8 RGB"):
        dense_crf(img.astype(np.float32), probs)


def test_pamr_keeps_masks_inside_colour_regions():
    from attnseg.ops.refine import PAMRConfig, pamr

    img = torch.zeros((1, 3, 16, 16))
    img[..., 8:] = 1.0
    m = torch.zeros((1, 1, 16, 16))
    m[..., 6:] = 1.0  # spills two columns into the dark half
    out = pamr(img, m, PAMRConfig(iters=20, dilations=(1, 2)))
    assert out[..., 6:8].mean() < 0.5 < out[..., 8:].mean()


def test_cross_baseline_background_threshold_moves_the_object_boundary(monkeypatch):
    # Three pixels whose (min-max) label score is 0, 0.45, 1. The paper's rule (1 - max)^2 gives the middle pixel
    # to the label (0.45 > 0.55^2); the embedded preset's threshold 0.7, (1.4 - max)^2, gives it to the background.
    from attnseg.methods import cross as cross_mod
    from attnseg.methods import get_method
    from attnseg.methods.base import CapturePlan

    fg = torch.tensor([[[0.0], [0.45], [1.0]]])
    monkeypatch.setattr(cross_mod, "fused_cross", lambda *a, **kw: fg)
    plan = CapturePlan(cross={}, self_names=[], grid=(1, 3))
    paper = get_method("cross", "default").scores(None, None, plan)
    assert torch.allclose(paper[0, :, 0], torch.tensor([1.0, 0.3025, 0.0]))
    assert paper[0].argmax(1).tolist() == [0, 1, 1]
    embedded = get_method("cross", "embedded")
    assert embedded.config.bg_threshold == 0.7 and embedded.config.cross.blocks == ("up",)
    scores = embedded.scores(None, None, plan)
    assert torch.allclose(scores[0, :, 0], torch.tensor([1.96, 0.9025, 0.16]))
    assert scores[0].argmax(1).tolist() == [0, 0, 1]


def test_diffseg_merge_rounds_average_unmatched_or_all_proposals():
    from attnseg.methods.diffseg import merge_round

    # A ~ B and B ~ C under the threshold, A and C far apart.
    a, b, c = torch.tensor([0.8, 0.1, 0.1]), torch.tensor([0.45, 0.45, 0.1]), torch.tensor([0.1, 0.8, 0.1])
    props = torch.stack([a, b, c])
    ours = merge_round(props, threshold=0.5, merge="unmatched")
    code = merge_round(props, threshold=0.5, merge="all")
    assert torch.allclose(ours, torch.stack([(a + b) / 2, c]))  # B is taken by A; C stays alone
    assert torch.allclose(code, torch.stack([(a + b) / 2, (b + c) / 2]))  # C averages B too, matched or not


def test_diffseg_code_preset_reads_the_clean_latent(monkeypatch, predictor):
    from attnseg.shapes.world import make_scene

    added = []
    orig = predictor.backbone.add_noise
    monkeypatch.setattr(predictor.backbone, "add_noise", lambda *a: added.append(1) or orig(*a))
    img = make_scene(7, 0).image
    predictor.segment_unsupervised([img], "code")
    assert added == []
    predictor.segment_unsupervised([img], "default")
    assert added == [1]


def test_t2m_coco_presets_sample_once_as_the_paper_does():
    from attnseg.methods.registry import resolve

    # Appendix A: "For Pascal VOC 2012, MS COCO 2014, and Mug19 datasets, we sample 10, 1, and 1 times".
    assert resolve("t2m", "voc")[2].draws == 10
    assert resolve("t2m", "coco")[2].draws == 1 and resolve("t2m", "coco")[2].bg_threshold is None
    assert resolve("t2m", "coco-code")[2].bg_threshold == 0.35


def test_fused_cross_normalises_before_or_after_resizing():
    from attnseg.diffusion.capture import AttentionStore
    from attnseg.diffusion.prompts import TokenSpans
    from attnseg.methods.base import fused_cross
    from attnseg.ops.maps import sum_normalise

    store = AttentionStore()
    store.add("a", torch.tensor([[[0.0, 1.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]]]))  # 2x2 grid, token 1
    store.add("b", torch.ones((1, 16, 2)))  # 4x4 grid, flat
    spans = TokenSpans(input_ids=[0, 1], spans=[[1]], labels=["x"])
    norm = lambda m: sum_normalise(m, dim=1)  # noqa: E731
    after = fused_cross(store, {"a": 0.7, "b": 0.3}, spans, (4, 4), normalise=norm)
    first = fused_cross(store, {"a": 0.7, "b": 0.3}, spans, (4, 4), normalise=norm, normalise_first=True)
    assert torch.allclose(after.sum(dim=1), torch.ones(1, 1))  # each map sums to 1 on the working grid
    # Normalised on its own 2x2 grid, the coarse map sums to 4 after upsampling to 4x4 (4 pixels per cell): it
    # outweighs the fine one, whose 16 pixels each keep 1/16.
    assert torch.allclose(first.sum(dim=1), torch.tensor([[0.7 * 4 + 0.3]]), atol=1e-5)


def test_connected_components_join_diagonal_neighbours_and_part_separate_regions():
    from attnseg.ops.maps import connected_components

    on = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    lab = connected_components(on)
    assert lab[0, 0] == lab[1, 1] > 0  # diagonal: one region (8-connectivity)
    assert lab[1, 3] == lab[2, 3] > 0 and lab[1, 3] != lab[0, 0]
    assert lab[3, 0] > 0 and lab[3, 0] not in (lab[0, 0], lab[1, 3])
    assert (lab[~on] == 0).all() and len(lab.unique()) == 4


def test_box_mask_is_the_union_of_each_region_box_above_the_relative_threshold():
    from attnseg.ops.maps import box_mask

    m = torch.zeros((5, 5))
    m[0, 0], m[1, 1] = 1.0, 0.9  # one region, diagonal: box rows 0-1, cols 0-1
    m[3, 4] = 0.5  # its own box
    m[4, 0] = 0.2  # not above 0.25 x max
    out = box_mask(torch.stack([m.flatten(), torch.zeros(25)], dim=1)[None], (5, 5), 0.25)
    want = torch.zeros((5, 5))
    want[0:2, 0:2] = 1
    want[3, 4] = 1
    assert torch.equal(out[0, :, 0].view(5, 5), want)
    assert out[0, :, 1].sum() == 0  # an all-zero map (a constant one after min-max) has no region: nothing is kept


def test_t2m_caa_restricts_self_to_the_boxes_of_the_label_cross_regions():
    from attnseg.diffusion.capture import AttentionStore
    from attnseg.diffusion.prompts import TokenSpans
    from attnseg.methods import T2M, T2MConfig
    from attnseg.methods.base import CapturePlan

    g = torch.Generator().manual_seed(0)
    cross = torch.rand((1, 16, 2), generator=g)
    cross[0, :, 1] = 0.01
    cross[0, [0, 1, 4], 1] = 1.0  # label's region: the top-left L of a 4x4 grid, boxed to rows 0-1, cols 0-1
    selfm = _row_stochastic(16).float()
    store = AttentionStore()
    store.add("c", cross)
    store.add("s", selfm)
    plan = CapturePlan(cross={"c": 1.0}, self_names=["s"], grid=(4, 4))
    spans = TokenSpans(input_ids=[0, 1], spans=[[1]], labels=["x"])
    got = T2M(T2MConfig(iters=2, caa_threshold=0.5)).foreground(store, spans, plan)
    box = torch.zeros(16)
    box[[0, 1, 4, 5]] = 1  # pixel 5 is inside the box, though not in the region
    col = cross[0, :, 1:2]
    want = minmax(((selfm[0] @ selfm[0]) * box[None, :]) @ col, dim=0)  # Self^2 with its columns outside the box zeroed
    assert torch.allclose(got[0], want, atol=1e-5)
    plain = T2M(T2MConfig(iters=2)).foreground(store, spans, plan)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_fused_cross_averages_the_chosen_heads_of_a_per_head_module():
    from attnseg.diffusion.capture import AttentionStore
    from attnseg.diffusion.prompts import TokenSpans
    from attnseg.methods.base import fused_cross

    store = AttentionStore(per_head=frozenset({"a"}))
    per_head = torch.zeros((1, 3, 4, 2))  # 3 heads, a 2x2 grid, token 1 on one pixel per head
    for h in range(3):
        per_head[0, h, h, 1] = 1.0
    store.add("a", per_head)
    spans = TokenSpans(input_ids=[0, 1], spans=[[1]], labels=["x"])
    every = fused_cross(store, {"a": 1.0}, spans, (2, 2))
    chosen = fused_cross(store, {"a": 1.0}, spans, (2, 2), heads={"a": (0, 2)})
    assert torch.allclose(every[0, :, 0], torch.tensor([1.0, 1.0, 1.0, 0.0]) / 3)
    assert torch.allclose(chosen[0, :, 0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
