"""iSeg as its authors' code runs it: the KL k-means of the cross maps, the self-attention heads subset, the code's
cross layers pooled and normalised per resolution, its VOC cross heads and background words.

Known answers on small hand-made tensors, and the layers named on SD-shaped and tiny UNets.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import LayerInfo, LayerSelect, layer_inventory
from attnseg.diffusion.prompts import ISEG_VOC_BACKGROUND_WORDS, TokenSpans
from attnseg.jobs.bench import SD15_UNET
from attnseg.methods.base import CapturePlan, fused_cross
from attnseg.methods.iseg import (
    CODE_CROSS_LAYERS,
    EMBEDDED_SELF_LAYER,
    ISEG_PRESETS,
    VOC_CROSS_HEADS,
    ISeg,
    ISegConfig,
    resolution_fused_cross,
)
from attnseg.ops.cluster import cluster_mean, grid_seeds, kl_kmeans, symmetric_kl
from attnseg.ops.maps import sum_normalise
from attnseg.shapes.world import make_scene

# --- ops.cluster -----------------------------------------------------------------------------------------------


def test_grid_seeds_follow_the_codes_stride():
    # k = 32 on 64 x 64: stride floor(64 / sqrt(32)) = 11, so 6 x 6 seeds at rows and columns 0, 11, ..., 55.
    s = grid_seeds(64, 64, 32)
    assert s.numel() == 36
    assert s[:6].tolist() == [0, 11, 22, 33, 44, 55]
    assert s[6] == 11 * 64
    assert s[-1] == 55 * 64 + 55
    assert grid_seeds(16, 16, 32).numel() == 64  # stride 2
    assert grid_seeds(4, 4, 4).tolist() == [0, 2, 8, 10]
    with pytest.raises(ValueError, match="at least 1"):
        grid_seeds(4, 4, 0)


def test_symmetric_kl_hand_computed():
    a = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    x = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64)
    d = symmetric_kl(a, x, eps=0.0)
    want = 0.5 * ((0.5 - 0.9) * math.log(0.5 / 0.9) + (0.5 - 0.1) * math.log(0.5 / 0.1))
    assert d.shape == (1, 1, 2)
    assert d[0, 0, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert d[0, 0, 1].item() == pytest.approx(want)
    assert symmetric_kl(x[:, 1:], a, eps=0.0).item() == pytest.approx(want)  # symmetric


def _two_groups() -> torch.Tensor:
    """Six pixels near distribution A (mass on token 0), six near B (mass on token 2): (1, 12, 3)."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.8, 0.1, 0.1]) + 0.02 * torch.rand((6, 3), generator=g)
    b = torch.tensor([0.1, 0.1, 0.8]) + 0.02 * torch.rand((6, 3), generator=g)
    return torch.cat([a, b])[None]


def test_well_separated_distributions_cluster_apart():
    x = _two_groups()
    labels, n = kl_kmeans(x, torch.tensor([0, 6]), iters=5)
    assert labels.tolist() == [[0] * 6 + [1] * 6] and n.tolist() == [2]
    labels, _ = kl_kmeans(x, torch.tensor([6, 0]), iters=5)  # numbered in the order of the seeds
    assert labels.tolist() == [[1] * 6 + [0] * 6]


def test_a_centre_left_without_pixels_is_dropped_and_labels_stay_compact():
    x = _two_groups()
    x[0, 1] = x[0, 0]  # seeds 0 and 1 identical: every tie goes to the lower index, seed 1 keeps no pixel
    labels, n = kl_kmeans(x, torch.tensor([0, 1, 6]), iters=3)
    assert n.tolist() == [2]
    assert labels.tolist() == [[0] * 6 + [1] * 6]


def test_iterations_move_the_centres():
    # Binary distributions (t, 1 - t); seeds at t = 0.1 and 0.2. One pass puts 0.2..0.9 together; the second, with
    # the centres at 0.1 and mean(0.2, 0.3, 0.7, 0.8, 0.9) = 0.58, moves 0.3 over (KL 0.135 against 0.164).
    t = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], dtype=torch.float64)
    x = torch.stack([t, 1 - t], dim=1)[None]
    assert kl_kmeans(x, torch.tensor([0, 1]), iters=1)[0].tolist() == [[0, 1, 1, 1, 1, 1]]
    assert kl_kmeans(x, torch.tensor([0, 1]), iters=2)[0].tolist() == [[0, 0, 0, 1, 1, 1]]


def test_batch_rows_cluster_independently():
    x = torch.cat([_two_groups(), _two_groups().flip(1)])
    labels, n = kl_kmeans(x, torch.tensor([0, 6]), iters=5)
    for i in range(2):
        assert torch.equal(labels[i], kl_kmeans(x[i : i + 1], torch.tensor([0, 6]), iters=5)[0][0])
    assert labels[1].tolist() == [0] * 6 + [1] * 6 and n.tolist() == [2, 2]


def test_kl_kmeans_rejects_bad_input():
    x = _two_groups()
    with pytest.raises(ValueError, match="at least one iteration"):
        kl_kmeans(x, torch.tensor([0]), iters=0)
    with pytest.raises(ValueError, match="pixel indices"):
        kl_kmeans(x, torch.tensor([12]), iters=1)
    with pytest.raises(ValueError, match=r"\(B, P, C\)"):
        kl_kmeans(x[0], torch.tensor([0]), iters=1)


def test_cluster_mean_hand_computed():
    maps = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [10.0, 5.0]]])
    out = cluster_mean(maps, torch.tensor([[0, 0, 1]]))
    assert out.tolist() == [[[2.0, 1.0], [2.0, 1.0], [10.0, 5.0]]]
    assert torch.equal(out.sum(dim=1), maps.sum(dim=1))  # column sums kept


# --- ISeg ----------------------------------------------------------------------------------------------------------

SPANS = TokenSpans(input_ids=[0, 1, 2], spans=[[1]], labels=["thing"])


def _store(cross: torch.Tensor, self_attn: torch.Tensor) -> AttentionStore:
    store = AttentionStore(per_head=frozenset({"s"} if self_attn.dim() == 4 else ()))
    store.add("c", cross)
    store.add("s", self_attn)
    return store


def _plan(side: int, per_head: bool) -> CapturePlan:
    return CapturePlan(cross={"c": 1.0}, self_names=["s"], grid=(side, side), per_head=["s"] if per_head else [])


def test_heads_subset_averages_only_those_heads():
    # 2 x 2 grid; head 0 is the identity, heads 1 and 2 reverse the pixel order. Averaging heads (1, 2) must give the
    # reversed map exactly (a permutation stays one through Ent-Self); all three heads do not.
    rev = torch.eye(4).flip(1)
    per_head = torch.stack([torch.eye(4), rev, rev])[None]  # (1, 3, 4, 4)
    cross = torch.zeros((1, 4, 3))
    cross[0, :, 1] = torch.tensor([1.0, 2.0, 3.0, 10.0])  # min-max: 0, 1/9, 2/9, 1
    store = _store(cross, per_head)
    cfg = ISegConfig(iters=1, bg_threshold=0.5)
    fg = ISeg(replace(cfg, heads=(1, 2))).scores(store, SPANS, _plan(2, True))[0, :, 1]
    assert torch.allclose(fg, torch.tensor([1.0, 2 / 9, 1 / 9, 0.0]))
    fg0 = ISeg(replace(cfg, heads=(0,))).scores(store, SPANS, _plan(2, True))[0, :, 1]
    assert torch.allclose(fg0, torch.tensor([0.0, 1 / 9, 2 / 9, 1.0]))
    every = ISeg(cfg).scores(store, SPANS, _plan(2, True))[0, :, 1]
    assert not torch.allclose(every, fg)


def test_plan_captures_per_head_and_rejects_missing_heads():
    inv = [
        LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", "up", 1, 1, 4),
        LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 1, 1, 4),
        LayerInfo("up_blocks.2.attentions.0.transformer_blocks.0.attn2", "cross", "up", 0, 2, 4),
        LayerInfo("up_blocks.2.attentions.0.transformer_blocks.0.attn1", "self", "up", 0, 2, 4),
    ]
    cfg = ISegConfig()  # its self layer, rank 3 on SD, is the finest: here up_blocks.2
    self_name = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"
    assert ISeg(replace(cfg, heads=(1, 2))).plan(inv, 8).per_head == [self_name]
    assert ISeg(cfg).plan(inv, 8).per_head == []
    with pytest.raises(ValueError, match=r"has 4 heads .* \[4\] do not exist"):
        ISeg(replace(cfg, heads=(1, 4))).plan(inv, 8)


def _halves() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4 x 4 grid whose left half attends to token 0 and right half to token 2; the label token (1) grows with the
    column (1, 2 | 5, 6). Every row is the same. Returns cross (1, 16, 3) and an identity Self (1, 16, 16)."""
    col = torch.arange(16) % 4
    left = (col < 2).float()
    cross = torch.stack([left + 0.01, torch.tensor([1.0, 2.0, 5.0, 6.0])[col], 1 - left + 0.01], dim=1)[None]
    return cross, torch.eye(16)[None]


def test_clusters_of_the_cross_maps_are_the_two_halves():
    cross, self_attn = _halves()
    # k = 4: seeds at pixels 0, 2, 8, 10; 8 and 10 repeat 0 and 2 (same columns) and lose every tie.
    labels = ISeg(ISegConfig(cluster=True, cluster_k=4)).clusters(_store(cross, self_attn), SPANS, _plan(4, False))
    assert labels.tolist() == [[0, 0, 1, 1] * 4]


def test_clustering_flattens_the_label_map_within_each_cluster():
    cross, self_attn = _halves()
    store = _store(cross, self_attn)
    cfg = ISegConfig(iters=0, bg_threshold=0.5, cluster_k=4)
    plain = ISeg(cfg).scores(store, SPANS, _plan(4, False))[0, :4, 1]
    assert torch.allclose(plain, torch.tensor([0.0, 0.2, 0.8, 1.0]))
    clustered = ISeg(replace(cfg, cluster=True)).scores(store, SPANS, _plan(4, False))[0, :4, 1]
    assert torch.allclose(clustered, torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_code_presets():
    code = ISEG_PRESETS["code"]
    assert code.heads == (1, 2) and code.cluster and (code.cluster_k, code.cluster_iters) == (32, 20)
    assert code.cat_cross == "embedding" and code.normalise_first
    assert code.cross_layers == CODE_CROSS_LAYERS and code.cross_norm == "resolution" and code.cross == {1: 0.7, 2: 0.3}
    assert code.background_words == ISEG_VOC_BACKGROUND_WORDS and code.cross_heads is None
    assert ISEG_PRESETS["code-voc-heads"] == replace(code, cross_heads=VOC_CROSS_HEADS)
    # the embedded preset stays as it was; embedded-code adds the code's procedures, not its SD 2.1 heads or VOC words
    assert ISEG_PRESETS["embedded"] == ISegConfig(iters=1, self_layer=EMBEDDED_SELF_LAYER, bg_threshold=0.5)
    emb = ISEG_PRESETS["embedded-code"]
    base = ISEG_PRESETS["embedded"]
    changed = {f.name for f in fields(ISegConfig) if getattr(emb, f.name) != getattr(base, f.name)}
    assert changed == {"cat_cross", "cross_layers", "cross_norm", "normalise_first", "cluster"}
    assert (emb.cat_cross, emb.cross_layers, emb.cross_norm) == ("embedding", CODE_CROSS_LAYERS, "resolution")
    assert emb.heads is None and emb.background_words == () and emb.cross_heads is None
    every_joint_block = (LayerSelect(kind="cross", ranks=(0,)),)  # the transformer presets' one grid, every block
    for name, cfg in ISEG_PRESETS.items():
        if name not in ("code", "code-voc-heads", "embedded-code"):
            assert not cfg.cluster and cfg.heads is None, name
            layers = every_joint_block if name in ("mmdit", "embedded-sd3") else ()
            assert (cfg.cross_layers, cfg.cross_norm, cfg.cross_heads, cfg.background_words) == (layers, "layer", None, ()), name
    assert ISEG_PRESETS["mmdit"].cross == {0: 1.0} and ISEG_PRESETS["mmdit"].cat_cross == "keys"


def test_voc_background_words_are_the_nine_the_code_assigns():
    # wsss/iSeg.py assigns one string literal; the two lines under it are statements of their own, not part of it.
    assert ISEG_VOC_BACKGROUND_WORDS == ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water")
    assert sum(len(v) for v in VOC_CROSS_HEADS.values()) == 50  # 41 at 16 px, 9 at 32 px
    assert [len(VOC_CROSS_HEADS[1]), len(VOC_CROSS_HEADS[2]), max(VOC_CROSS_HEADS[1]), max(VOC_CROSS_HEADS[2])] == [41, 9, 96, 28]


# --- per-resolution normalisation --------------------------------------------------------------------------------


def _per_head_store(maps: dict[str, torch.Tensor]) -> AttentionStore:
    store = AttentionStore(per_head=frozenset(maps))
    for name, m in maps.items():
        store.add(name, m)
    return store


def _head_maps(label_cols: list[list[float]]) -> torch.Tensor:
    """(1, H, P, 3) per-head cross maps whose token 1 holds ``label_cols[h]``; tokens 0 and 2 hold ones."""
    cols = torch.tensor(label_cols)
    ones = torch.ones_like(cols)
    return torch.stack([ones, cols, ones], dim=2)[None]


def _two_layers_one_resolution() -> dict[str, torch.Tensor]:
    """Two 2 x 2 layers: a1 with two heads (token 1: 3 1 0 0 and 1 3 0 0), a2 with one (0 0 1 1)."""
    return {"a1": _head_maps([[3, 1, 0, 0], [1, 3, 0, 0]]), "a2": _head_maps([[0, 0, 1, 1]])}


def test_per_resolution_pools_every_head_then_normalises_once():
    store = _per_head_store(_two_layers_one_resolution())
    cross = {"a1": 0.7, "a2": 0.7}
    # The code: the three heads averaged, (4 4 1 1) / 3, then normalised once: (4 4 1 1) / 10.
    pooled = resolution_fused_cross(store, cross, SPANS, (2, 2))[0, :, 0]
    assert torch.allclose(pooled, torch.tensor([0.4, 0.4, 0.1, 0.1]))
    # Per layer (the paper preset): a1's head mean (2 2 0 0) and a2 each normalised, then averaged.
    per_layer = fused_cross(store, cross, SPANS, (2, 2), normalise=sum_normalise)[0, :, 0]
    assert torch.allclose(per_layer, torch.tensor([0.25, 0.25, 0.25, 0.25]))
    # Pooling the layers' head means instead of the heads would give (2 2 1 1) / 6: a layer counts by its heads.
    assert not torch.allclose(pooled, torch.tensor([2, 2, 1, 1]) / 6)


def test_per_resolution_normalises_each_token_before_a_label_averages_them():
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 3.0], [1.0, 0.0, 3.0]])[None, None]  # 1 head, 3 tokens
    store = _per_head_store({"a": m})
    two = TokenSpans(input_ids=[0, 1, 2], spans=[[1, 2]], labels=["two words"])
    # (0.5 0.5 0 0) and (0 0 0.5 0.5) averaged; averaging first, then normalising, gives (1 1 3 3) / 8.
    got = resolution_fused_cross(store, {"a": 1.0}, two, (2, 2))[0, :, 0]
    assert torch.allclose(got, torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert torch.allclose(
        fused_cross(store, {"a": 1.0}, two, (2, 2), normalise=sum_normalise)[0, :, 0], torch.tensor([1, 1, 3, 3]) / 8
    )


def test_resolutions_are_fused_with_their_weights():
    # A 1 x 1 layer (weight 0.7) and the two 2 x 2 layers (0.3). Normalised at its own grid the 1 x 1 map is 1 and
    # upsamples to 1 everywhere: 0.7 * 1 + 0.3 * (0.4 0.4 0.1 0.1), the weights summing to 1.
    maps = {"c": _head_maps([[5.0]]), **_two_layers_one_resolution()}
    store = _per_head_store(maps)
    cross = {"c": 0.7, "a1": 0.3, "a2": 0.3}
    first = resolution_fused_cross(store, cross, SPANS, (2, 2), normalise_first=True)[0, :, 0]
    assert torch.allclose(first, torch.tensor([0.82, 0.82, 0.73, 0.73]))
    # Normalised after upsampling, the 1 x 1 map is 0.25 per pixel: 0.7 * 0.25 + 0.3 * (0.4 0.4 0.1 0.1).
    after = resolution_fused_cross(store, cross, SPANS, (2, 2), normalise_first=False)[0, :, 0]
    assert torch.allclose(after, torch.tensor([0.295, 0.295, 0.205, 0.205]))


def test_cross_heads_pool_only_the_kept_heads():
    store = _per_head_store(_two_layers_one_resolution())
    # a1's head 1 (1 3 0 0) and a2's head 0 (0 0 1 1): (1 3 1 1) / 6.
    got = resolution_fused_cross(store, {"a1": 1.0, "a2": 1.0}, SPANS, (2, 2), heads={"a1": (1,), "a2": (0,)})[0, :, 0]
    assert torch.allclose(got, torch.tensor([1, 3, 1, 1]) / 6)


def test_per_resolution_needs_per_head_maps_and_a_known_mode():
    store = AttentionStore()
    store.add("a", torch.ones((1, 4, 3)))
    with pytest.raises(ValueError, match="captured per head"):
        resolution_fused_cross(store, {"a": 1.0}, SPANS, (2, 2))
    with pytest.raises(ValueError, match="unknown iSeg cross_norm 'tokens'"):
        ISeg(ISegConfig(cross_norm="tokens")).fused(store, SPANS, CapturePlan(cross={"a": 1.0}, self_names=[], grid=(2, 2)))


def test_code_preset_scores_from_the_pooled_maps():
    # Identity Self, one iteration, no clustering: the label map is the min-max of the pooled, normalised map.
    store = _per_head_store(_two_layers_one_resolution())
    store.add("s", torch.eye(4)[None])
    plan = CapturePlan(cross={"a1": 1.0, "a2": 1.0}, self_names=["s"], grid=(2, 2), per_head=["a1", "a2"])
    cfg = ISegConfig(iters=1, bg_threshold=0.5, cross_norm="resolution", normalise_first=True)
    fg = ISeg(cfg).scores(store, SPANS, plan)[0, :, 1]
    assert torch.allclose(fg, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # (0.4 0.4 0.1 0.1), min-max


# --- the code's layers, heads and prompt on real UNet layouts ---------------------------------------------------


def _inventory(**overrides):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return layer_inventory(UNet2DConditionModel(**{**SD15_UNET, **overrides}))


@pytest.fixture(scope="module")
def sd15_inventory():
    return _inventory()


@pytest.fixture(scope="module")
def sd21_inventory():
    # SD 2.1's UNet: 5, 10, 20, 20 heads per level (its config's attention_head_dim), 1024-wide text states.
    return _inventory(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)


def _attn2(block: str) -> str:
    return f"{block}.transformer_blocks.0.attn2"


CODE_16 = ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1"] + [f"up_blocks.1.attentions.{i}" for i in range(3)]
CODE_32 = ["down_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]


def test_code_preset_reads_the_codes_cross_layers_on_sd15(sd15_inventory):
    plan = ISeg(ISEG_PRESETS["code"]).plan(sd15_inventory, 64)
    assert plan.cross == {**{_attn2(b): 0.7 for b in CODE_16}, **{_attn2(b): 0.3 for b in CODE_32}}
    assert plan.per_head == [*plan.cross, "up_blocks.3.attentions.1.transformer_blocks.0.attn1"]
    assert plan.cross_heads == {}
    paper = ISeg(ISEG_PRESETS["paper"]).plan(sd15_inventory, 64)  # decoder only, head means
    assert sorted(paper.cross) == sorted(_attn2(f"up_blocks.{b}.attentions.{i}") for b in (1, 2) for i in range(3))
    assert paper.per_head == [] and paper.cross_heads == {}


def test_voc_cross_heads_map_to_each_layers_own_heads_on_sd21(sd21_inventory):
    plan = ISeg(ISEG_PRESETS["code-voc-heads"]).plan(sd21_inventory, 64)
    # 16 px: 20 heads a layer, in forward order down_blocks.2.attentions.0, .1, up_blocks.1.attentions.0, .1, .2.
    # Positions 81 83 87 88 93 94 96 fall in the fifth layer (80-99); 60 76 77 78 in the fourth.
    assert plan.cross_heads[_attn2("up_blocks.1.attentions.2")] == (1, 3, 7, 8, 13, 14, 16)
    assert plan.cross_heads[_attn2("up_blocks.1.attentions.1")] == (0, 16, 17, 18)
    # 32 px: 10 heads a layer; 5 6 8 in down_blocks.1.attentions.1, 13 in up_blocks.2.attentions.0, 21-28 in .1.
    assert plan.cross_heads[_attn2("down_blocks.1.attentions.1")] == (5, 6, 8)
    assert plan.cross_heads[_attn2("up_blocks.2.attentions.0")] == (3,)
    assert plan.cross_heads[_attn2("up_blocks.2.attentions.1")] == (1, 2, 5, 7, 8)
    assert sorted(plan.cross_heads) == sorted(_attn2(b) for b in CODE_16 + CODE_32)
    assert sum(map(len, plan.cross_heads.values())) == 50


def test_voc_cross_heads_are_refused_where_they_do_not_exist(sd15_inventory, tiny_pipe):
    with pytest.raises(ValueError, match=r"have 40 heads together, so \[41, 43"):
        ISeg(ISEG_PRESETS["code-voc-heads"]).plan(sd15_inventory, 64)
    with pytest.raises(ValueError, match="have 6 heads together"):  # 3 layers of 2 heads at 8 px
        ISeg(replace(ISEG_PRESETS["code-voc-heads"], heads=None)).plan(layer_inventory(tiny_pipe.unet), 16)
    with pytest.raises(ValueError, match="use cross_norm='resolution'"):
        ISeg(ISegConfig(cross_heads={1: (0,)})).plan(sd15_inventory, 64)
    with pytest.raises(ValueError, match="one rank of cross"):
        ISeg(ISegConfig(cross_layers=CODE_CROSS_LAYERS, cross={1: 1.0})).plan(sd15_inventory, 64)


def test_code_layers_on_the_tiny_pipeline(tiny_pipe):
    # The embedded layout: cross layers at 16 px (down_blocks.0, up_blocks.2) and 8 px (down_blocks.1, up_blocks.1)
    # and the 4-px mid block. The code's 16-px layers are this UNet's rank-1 (8 px) ones; at rank 2 its one encoder
    # layer stands for the code's second, and both decoder layers are read. The mid block is not.
    inv = layer_inventory(tiny_pipe.unet)
    plan = ISeg(ISEG_PRESETS["embedded-code"]).plan(inv, 16)
    assert plan.cross == {
        _attn2("down_blocks.1.attentions.0"): 0.7,
        _attn2("up_blocks.1.attentions.0"): 0.7,
        _attn2("up_blocks.1.attentions.1"): 0.7,
        _attn2("down_blocks.0.attentions.0"): 0.3,
        _attn2("up_blocks.2.attentions.0"): 0.3,
        _attn2("up_blocks.2.attentions.1"): 0.3,
    }
    assert plan.per_head == list(plan.cross)  # no self heads in embedded-code
    embedded = ISeg(ISEG_PRESETS["embedded"]).plan(inv, 16)
    assert list(embedded.cross) == [_attn2(f"up_blocks.{b}.attentions.{i}") for b in (1, 2) for i in (0, 1)]


def test_code_prompt_appends_the_background_words_and_reads_only_label_tokens(predictor):
    # "tree" is a label and a background word: the label's token is the first "tree", before the background words.
    text, spans = predictor.prompt_for(["circle", "tree"], ISeg(ISEG_PRESETS["code"]))
    assert text == (
        "a photograph of circle and tree and other objects and background, "
        "ground, land, grass, tree, building, wall, sky, lake, water"
    )
    tok = predictor.pipe.tokenizer
    ids = tok(text)["input_ids"]
    assert [tok.decode([ids[i] for i in s]).strip() for s in spans.spans] == ["circle", "tree"]
    first_bg = len(tok("a photograph of circle and tree and other objects and background,")["input_ids"]) - 1  # no EOS
    assert max(max(s) for s in spans.spans) < first_bg
    assert ids[first_bg:-1] == tok(", ".join(ISEG_VOC_BACKGROUND_WORDS), add_special_tokens=False)["input_ids"]
    _, plain = predictor.prompt_for(["circle", "tree"], ISeg(ISEG_PRESETS["paper"]))
    assert plain.spans == spans.spans  # the words only follow the labels


def test_code_presets_segment_on_the_tiny_pipeline(predictor):
    # Cross layers captured per head through the predictor; the tiny UNet has 2 heads, so not the code's self heads.
    predictor.set_image(make_scene(7, 0).image)
    for preset in ("code", "embedded-code"):
        r = predictor.segment(["red circle", "star"], method="iseg", preset=preset, draws=1, heads=None)
        assert r.scores.shape[0] == 3 and np.isfinite(r.scores).all(), preset
        assert r.prompt.endswith(", lake, water") == (preset == "code"), preset
