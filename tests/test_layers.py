"""Layer presets resolve to the papers' modules on an SD 1.5-shaped UNet and degrade sanely on a small one."""

from __future__ import annotations

import pytest
import torch

from attnseg.diffusion.layers import LayerSelect, layer_inventory, read_heads
from attnseg.jobs.bench import SD15_UNET
from attnseg.methods import T2M, ISeg


@pytest.fixture(scope="module")
def sd15_inventory():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return layer_inventory(unet)


def test_sd15_inventory_sides(sd15_inventory):
    sides = {lay.name: lay.side(64) for lay in sd15_inventory}
    assert sides["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 64
    assert sides["down_blocks.2.attentions.1.transformer_blocks.0.attn2"] == 16
    assert sides["mid_block.attentions.0.transformer_blocks.0.attn2"] == 8
    assert sides["up_blocks.3.attentions.2.transformer_blocks.0.attn1"] == 64
    assert len([x for x in sd15_inventory if x.kind == "cross"]) == 16


def test_t2m_preset_is_compvis_layers_4_to_8_and_11(sd15_inventory):
    plan = T2M().plan(sd15_inventory, 64)
    assert sorted(plan.cross) == sorted(
        f"{b}.transformer_blocks.0.attn2"
        for b in (
            "down_blocks.2.attentions.0",
            "down_blocks.2.attentions.1",
            "mid_block.attentions.0",
            "up_blocks.1.attentions.0",
            "up_blocks.1.attentions.1",
        )
    )
    assert plan.self_names == ["up_blocks.2.attentions.1.transformer_blocks.0.attn1"]
    assert plan.grid == (32, 32)


def test_iseg_preset(sd15_inventory):
    plan = ISeg().plan(sd15_inventory, 64)
    assert plan.self_names == ["up_blocks.3.attentions.1.transformer_blocks.0.attn1"]
    assert plan.grid == (64, 64)
    w16 = [w for n, w in plan.cross.items() if n.startswith("up_blocks.1.")]
    w32 = [w for n, w in plan.cross.items() if n.startswith("up_blocks.2.")]
    assert len(w16) == 3 and len(w32) == 3 and set(w16) == {0.7} and set(w32) == {0.3}
    assert plan.key_scale_gamma == 1.6


def test_presets_on_small_unet(tiny_pipe):
    inv = layer_inventory(tiny_pipe.unet)
    t2m = T2M().plan(inv, 16)
    assert t2m.self_names == ["up_blocks.2.attentions.1.transformer_blocks.0.attn1"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in t2m.cross
    iseg = ISeg().plan(inv, 16)
    assert iseg.grid == (16, 16)


def test_select_by_side_and_names(sd15_inventory):
    by_side = LayerSelect(kind="self", sides=(32,)).resolve(sd15_inventory, 64)
    assert len(by_side) == 5 and all(x.side(64) == 32 for x in by_side)
    by_name, _ = read_heads([LayerSelect(kind="cross", names=("mid_block*",))], sd15_inventory)
    assert [x.name for x in by_name] == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        LayerSelect(kind="cross", names=("nothing*",)).resolve(sd15_inventory)


def test_take_slices_from_the_end_and_clips(sd15_inventory):
    up = [x.name for x in LayerSelect(kind="cross", blocks=("up",)).resolve(sd15_inventory)]
    assert len(up) == 9

    def take(a, b):
        return [x.name for x in LayerSelect(kind="cross", blocks=("up",), take=(a, b)).resolve(sd15_inventory)]

    assert take(-1, None) == up[-1:]
    assert take(-3, -1) == up[-3:-1]
    assert take(2, None) == up[2:]
    assert take(20, 21) == up[-1:]  # beyond the end: clipped to the last one
    assert take(-20, 1) == up[:1]  # before the start: from the first
    assert take(None, 2) == up[:2]


def test_a_choice_of_heads_is_read_by_the_cross_methods_and_refused_elsewhere(sd15_inventory):
    from attnseg.methods.cross import CrossAttentionBaseline, CrossConfig
    from attnseg.methods.registry import get_method
    from attnseg.methods.t2m import T2MConfig

    up = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    two = LayerSelect(kind="cross", names=(up,), heads=(1, 3))
    layers, heads = read_heads((two, LayerSelect(kind="cross", names=(mid,))), sd15_inventory)
    assert [x.name for x in layers] == [up, mid] and heads == {up: (1, 3)}  # the mid block: every head
    for plan in (
        CrossAttentionBaseline(CrossConfig(cross=(two, LayerSelect(kind="cross", names=(mid,))))).plan(sd15_inventory, 64),
        T2M(T2MConfig(cross=(two,))).plan(sd15_inventory, 64),
    ):
        assert plan.per_head == [up] and plan.cross_heads == {up: (1, 3)}
    with pytest.raises(ValueError, match="only the cross layers of the cross baseline and of T2M"):
        two.resolve(sd15_inventory)  # any other reader
    with pytest.raises(ValueError, match="only the cross layers of the cross baseline and of T2M"):
        get_method("iseg", cross_layers=(LayerSelect(kind="cross", ranks=(1,), heads=(0,)),)).plan(sd15_inventory, 64)
    with pytest.raises(ValueError, match="which has heads 0-7"):
        read_heads(LayerSelect(kind="cross", names=(up,), heads=(8,)), sd15_inventory)
    with pytest.raises(ValueError, match="chosen twice, with heads \\[1, 3\\] and \\[\\]"):
        read_heads((two, LayerSelect(kind="cross", names=(up,))), sd15_inventory)
