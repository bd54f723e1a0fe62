"""iSeg as its authors' code runs it: the KL k-means of the cross maps and the self-attention heads subset.

Known answers on small hand-made tensors.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import LayerInfo
from attnseg.diffusion.prompts import TokenSpans
from attnseg.methods.base import CapturePlan
from attnseg.methods.iseg import ISEG_PRESETS, ISeg, ISegConfig
from attnseg.ops.cluster import cluster_mean, grid_seeds, kl_kmeans, symmetric_kl

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
    emb = ISEG_PRESETS["embedded-code"]
    assert emb.cluster and emb.heads is None  # the heads name SD 2.1's heads of a layer this preset does not read
    assert emb == replace(ISEG_PRESETS["embedded"], cat_cross="embedding", normalise_first=True, cluster=True)
    for name, cfg in ISEG_PRESETS.items():
        if name not in ("code", "embedded-code"):
            assert not cfg.cluster and cfg.heads is None, name
