"""Attention capture through the processor API."""

from __future__ import annotations

import pytest
import torch

from attnseg.diffusion.capture import capture_attention
from attnseg.diffusion.layers import LayerSelect, layer_inventory


@pytest.fixture(scope="module")
def inputs(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    unet = tiny_pipe.unet
    z = torch.randn((2, 4, 16, 16), generator=g)
    emb = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
    return unet, z, emb


def test_capture_leaves_unet_output_unchanged(inputs):
    unet, z, emb = inputs
    t = torch.tensor([150, 150])
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=emb).sample
        names = [lay.name for lay in layer_inventory(unet)]
        with capture_attention(unet, names) as store:
            out = unet(z, t, encoder_hidden_states=emb).sample
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert set(store.sums) == set(names)


def test_processors_restored_on_exit_and_on_error(inputs):
    unet, _z, _emb = inputs
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    name = layer_inventory(unet)[0].name
    with pytest.raises(RuntimeError, match="boom"), capture_attention(unet, [name]):
        raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_captured_maps_are_probabilities_and_head_means(inputs):
    unet, z, emb = inputs
    inv = layer_inventory(unet)
    cross = LayerSelect(kind="cross", ranks=(1,)).resolve(inv, 16)[0]
    selfl = LayerSelect(kind="self", ranks=(2,), blocks=("up",)).resolve(inv, 16)[0]
    with torch.no_grad(), capture_attention(unet, [cross.name, selfl.name], per_head=[selfl.name]) as store:
        unet(z, torch.tensor([10, 10]), encoder_hidden_states=emb)
    c = store.mean(cross.name)
    s = store.mean(selfl.name)
    assert c.shape == (2, 64, 77)  # 8x8 grid, 77 tokens
    assert s.shape == (2, selfl.heads, 256, 256)
    assert torch.allclose(c.sum(-1), torch.ones(2, 64), atol=1e-5)
    assert torch.allclose(s.sum(-1), torch.ones(2, selfl.heads, 256), atol=1e-5)


def test_running_mean_over_forwards(inputs):
    unet, z, emb = inputs
    name = LayerSelect(kind="cross", ranks=(0,)).resolve(layer_inventory(unet), 16)[0].name
    maps = []
    with torch.no_grad():
        for t in (100, 500):
            with capture_attention(unet, [name]) as st:
                unet(z, torch.tensor([t, t]), encoder_hidden_states=emb)
            maps.append(st.mean(name))
        with capture_attention(unet, [name]) as st:
            for t in (100, 500):
                unet(z, torch.tensor([t, t]), encoder_hidden_states=emb)
    assert st.counts[name] == 2
    assert torch.allclose(st.mean(name), (maps[0] + maps[1]) / 2, atol=1e-6)


def test_cfg_batch_keeps_only_conditional_half(inputs):
    unet, z, emb = inputs
    name = LayerSelect(kind="cross", ranks=(0,)).resolve(layer_inventory(unet), 16)[0].name
    zz = torch.cat([z[:1], z[:1]])
    ee = torch.cat([emb[1:], emb[:1]])  # uncond row first, cond row second
    with torch.no_grad():
        with capture_attention(unet, [name]) as full:
            ref = unet(zz, torch.tensor([50, 50]), encoder_hidden_states=ee).sample
        with capture_attention(unet, [name], cond_rows="second_half") as half:
            out = unet(zz, torch.tensor([50, 50]), encoder_hidden_states=ee).sample
    assert half.mean(name).shape[0] == 1
    assert torch.allclose(half.mean(name)[0], full.mean(name)[1], atol=1e-6)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_key_scale_reweights_chosen_tokens(inputs):
    unet, z, emb = inputs
    # The first cross-attention module: its input does not depend on other cross modules.
    name = next(lay.name for lay in layer_inventory(unet) if lay.kind == "cross")
    gamma = torch.ones(77)
    gamma[3] = 1.6
    with torch.no_grad():
        with capture_attention(unet, [name], per_head=[name], key_scale=torch.ones(77)) as a:
            unet(z, torch.tensor([50, 50]), encoder_hidden_states=emb)
        with capture_attention(unet, [name], per_head=[name], key_scale=gamma) as b:
            unet(z, torch.tensor([50, 50]), encoder_hidden_states=emb)
    pa, pb = a.mean(name), b.mean(name)
    assert not torch.allclose(pa[..., 3], pb[..., 3])
    # Only token 3's logit changed, so every other pair of tokens keeps its ratio, per head.
    assert torch.allclose(pa[..., 5] / pa[..., 6], pb[..., 5] / pb[..., 6], rtol=1e-4)


def test_cat_cross_on_the_embedding_equals_scaling_the_class_tokens_text(inputs):
    # iSeg's Algorithm 1 / code: scale the class tokens' text embedding; SD's key and value projections have no
    # bias, so scaling keys and values in the processor is the same as scaling those rows of the text states.
    unet, z, emb = inputs
    assert all(m.to_k.bias is None and m.to_v.bias is None for n, m in unet.named_modules() if n.endswith("attn2"))
    w = torch.ones(77)
    w[[3, 4]] = 1.6
    t = torch.tensor([100, 100])
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=emb * w.view(1, -1, 1)).sample
        with capture_attention(unet, [], key_scale=w, scale_values=True):
            both = unet(z, t, encoder_hidden_states=emb).sample
        with capture_attention(unet, [], key_scale=w):
            keys_only = unet(z, t, encoder_hidden_states=emb).sample
    assert torch.allclose(both, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(keys_only, ref, atol=1e-4)  # eq. 8 leaves the values alone: another output
