"""The SD3 (MMDiT) backbone: joint attention read as cross and self maps, capture leaves outputs unchanged,
and segment / eval / generate / layers on an SD3 pipeline folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli import app

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from attnseg.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3", family="sd3")


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    from attnseg.predictor import AttnSegPredictor

    return AttnSegPredictor.from_pretrained(sd3_dir, device="cpu", dtype="float32")


def _inputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 4, 16, 16), generator=g), bb.encode_prompts(["a photo of a red circle", "a blue star"])


def _plain(bb, z, text, t=150.0):
    return bb.pipe.transformer(
        hidden_states=z,
        encoder_hidden_states=text.hidden,
        pooled_projections=text.added["pooled_projections"],
        timestep=torch.full((len(z),), t),
    ).sample


def test_layers_of_a_joint_transformer(sd3):
    layers = sd3.backbone.layers
    assert [(lay.name, lay.kind, lay.source, lay.block, lay.rank) for lay in layers] == [
        ("transformer_blocks.0.attn:cross", "cross", "joint", "joint", 0),
        ("transformer_blocks.0.attn:self", "self", "joint", "joint", 0),
        ("transformer_blocks.1.attn:cross", "cross", "joint", "joint", 0),
        ("transformer_blocks.1.attn:self", "self", "joint", "joint", 0),
    ]
    assert {lay.side(16) for lay in layers} == {16} and layers[0].module == "transformer_blocks.0.attn"


def test_capture_leaves_the_output_unchanged_and_restores_processors(sd3):
    from attnseg.diffusion.capture import AttentionStore, installed

    bb = sd3.backbone
    z, text = _inputs(bb)
    before = {k: type(v) for k, v in bb.pipe.transformer.attn_processors.items()}
    with torch.no_grad():
        ref = _plain(bb, z, text)
        ks = torch.ones((2, text.hidden.shape[1]))
        with installed(bb.pipe.transformer, bb._processors(AttentionStore(), [lay.name for lay in bb.layers], None)):
            out = _plain(bb, z, text)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert {k: type(v) for k, v in bb.pipe.transformer.attn_processors.items()} == before
    # Cat-Cross with factors of 1 changes nothing either.
    with torch.no_grad(), installed(bb.pipe.transformer, bb._processors(AttentionStore(), [], ks)):
        assert torch.allclose(_plain(bb, z, text), ref, atol=1e-5, rtol=1e-4)


def test_joint_maps_are_the_renormalised_blocks_of_the_joint_softmax(sd3):
    bb = sd3.backbone
    z, text = _inputs(bb, seed=1)
    module = bb.pipe.transformer.get_submodule("transformer_blocks.1.attn")
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    try:
        store = bb.forward(z, 300, text, ["transformer_blocks.1.attn:cross", "transformer_blocks.1.attn:self"])
    finally:
        hook.remove()
    h, e = seen["hidden_states"], seen["encoder_hidden_states"]
    with torch.no_grad():
        split = lambda x: x.view(2, -1, module.heads, x.shape[-1] // module.heads).transpose(1, 2)  # noqa: E731
        q = torch.cat([split(module.to_q(h)), split(module.add_q_proj(e))], dim=2)
        k = torch.cat([split(module.to_k(h)), split(module.add_k_proj(e))], dim=2)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (2, heads, 256 + 77, 256 + 77)
    cross = probs[:, :, :256, 256:]
    own = probs[:, :, :256, :256]
    want_cross = (cross / cross.sum(-1, keepdim=True)).mean(1)
    want_self = (own / own.sum(-1, keepdim=True)).mean(1)
    assert torch.allclose(store.mean("transformer_blocks.1.attn:cross"), want_cross, atol=1e-5)
    assert torch.allclose(store.mean("transformer_blocks.1.attn:self"), want_self, atol=1e-5)
    assert torch.allclose(want_cross.sum(-1), torch.ones(2, 256), atol=1e-5)


def test_cat_cross_scales_the_class_tokens_keys_inside_the_joint_softmax(sd3):
    """iSeg's eq. 8 on joint attention: the captured cross map is the renormalised image-to-text block of the softmax
    computed with the chosen text keys multiplied by gamma, and nothing else changes."""
    bb = sd3.backbone
    z, text = _inputs(bb, seed=2)
    name = "transformer_blocks.1.attn"
    module = bb.pipe.transformer.get_submodule(name)
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    gamma = torch.ones(text.hidden.shape[1])
    gamma[[3, 5]] = 1.6
    try:
        store = bb.forward(z, 300, text, [f"{name}:cross"], key_scale=gamma)
    finally:
        hook.remove()
    h, e = seen["hidden_states"], seen["encoder_hidden_states"]
    with torch.no_grad():
        split = lambda x: x.view(2, -1, module.heads, x.shape[-1] // module.heads).transpose(1, 2)  # noqa: E731
        q = split(module.to_q(h))
        k = torch.cat([split(module.to_k(h)), split(module.add_k_proj(e)) * gamma.view(1, 1, -1, 1)], dim=2)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[:, :, :, 256:]
    want = (probs / probs.sum(-1, keepdim=True)).mean(1)
    got = store.mean(f"{name}:cross")
    assert torch.allclose(got, want, atol=1e-5)
    plain = bb.forward(z, 300, text, [f"{name}:cross"]).mean(f"{name}:cross")
    assert (got[..., [3, 5]].sum() > plain[..., [3, 5]].sum()) and not torch.allclose(got, plain, atol=1e-3)


def test_iseg_reads_every_joint_cross_map_and_the_last_self_map(sd3):
    from attnseg.methods.registry import get_method

    plan = get_method("iseg", "mmdit").plan(sd3.inventory, 16)
    assert plan.cross == {"transformer_blocks.0.attn:cross": 1.0, "transformer_blocks.1.attn:cross": 1.0}
    assert plan.self_names == ["transformer_blocks.1.attn:self"] and plan.grid == (16, 16)
    assert plan.key_scale_gamma == 1.6 and not plan.scale_values
    sd3.set_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    res = sd3.segment(["red circle", "blue star"], method="iseg")
    assert res.settings["preset"] == "mmdit" and res.scores.shape == (3, 64, 64) and np.isfinite(res.scores).all()


def test_sd35_dual_attention_blocks_add_image_only_self_layers():
    from attnseg.diffusion.sd3 import SD3Backbone
    from attnseg.testing import build_tiny_sd3_pipeline

    bb = SD3Backbone(build_tiny_sd3_pipeline(dual_attention_layers=(0,)))
    assert [lay.name for lay in bb.layers if lay.source == "self"] == ["transformer_blocks.0.attn2"]
    z, text = _inputs(bb)
    with torch.no_grad():
        ref = _plain(bb, z, text)
        store = bb.forward(z, 150, text, [lay.name for lay in bb.layers])
        again = _plain(bb, z, text)
    assert torch.equal(ref, again)
    assert store.mean("transformer_blocks.0.attn2").shape == (2, 256, 256)
    # iSeg's Self is the last joint attention's image-to-image block, not a dual block's image-only attn2.
    from attnseg.methods.registry import get_method

    last_dual = SD3Backbone(build_tiny_sd3_pipeline(dual_attention_layers=(0, 1)))
    assert get_method("iseg", "mmdit").plan(last_dual.layers, 16).self_names == ["transformer_blocks.1.attn:self"]


def test_joint_maps_under_guidance_and_head_chunks_are_the_conditional_rows_blocks(sd3, monkeypatch):
    """With classifier-free guidance only the second half of the rows (the conditional ones) is read, and scoring a
    few heads at a time (a small budget) gives the same maps as all at once."""
    from attnseg.diffusion import capture
    from attnseg.diffusion.capture import AttentionStore, JointCaptureProcessor, installed

    bb = sd3.backbone
    z, text = _inputs(bb, seed=4)  # rows: [unconditional-like, conditional]
    name = "transformer_blocks.1.attn"
    module = bb.pipe.transformer.get_submodule(name)
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    monkeypatch.setattr(capture, "_SCORE_BUDGET", 1)  # one head at a time
    stores = {}
    try:
        for per_head in (False, True):
            store = AttentionStore(per_head=frozenset({f"{name}:cross"} if per_head else ()), cond_rows="second_half")
            proc = JointCaptureProcessor(store, {"cross": f"{name}:cross", "self": f"{name}:self"})
            with torch.no_grad(), installed(bb.pipe.transformer, {name: proc}):
                out = _plain(bb, z, text)
            stores[per_head] = store
    finally:
        hook.remove()
    with torch.no_grad():
        assert torch.allclose(out, _plain(bb, z, text), atol=1e-5, rtol=1e-4)
    h, e = seen["hidden_states"][1:], seen["encoder_hidden_states"][1:]
    with torch.no_grad():
        split = lambda x: x.view(1, -1, module.heads, x.shape[-1] // module.heads).transpose(1, 2)  # noqa: E731
        q = torch.cat([split(module.to_q(h)), split(module.add_q_proj(e))], dim=2)
        k = torch.cat([split(module.to_k(h)), split(module.add_k_proj(e))], dim=2)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[:, :, :256]
    cross, own = probs[..., 256:], probs[..., :256]
    cross, own = cross / cross.sum(-1, keepdim=True), own / own.sum(-1, keepdim=True)
    assert torch.allclose(stores[False].mean(f"{name}:cross"), cross.mean(1), atol=1e-5)
    assert torch.allclose(stores[False].mean(f"{name}:self"), own.mean(1), atol=1e-5)
    assert torch.allclose(stores[True].mean(f"{name}:cross"), cross, atol=1e-5)  # (1, heads, 256, T)


def test_segment_eval_generate_and_layers_from_the_command_line(sd3_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = CliRunner()
    r = run.invoke(app, ["layers", "--model", str(sd3_dir)])
    assert r.exit_code == 0 and "transformer_blocks.1.attn:cross" in r.output and " joint " in r.output
    assert run.invoke(app, ["shapes", "export", "sc", "--n", "2", "--seed", "1"]).exit_code == 0
    common = ["sc/JPEGImages", "--labels-file", "sc/labels.json", "--model", str(sd3_dir), "--device", "cpu"]
    r = run.invoke(app, ["segment", *common, "--method", "t2m", "--out", "seg"])
    assert r.exit_code == 0, r.output
    assert "preset 'mmdit' from the sd3 family" in r.output
    meta = json.loads((tmp_path / "seg" / "shapes_1_000000.json").read_text())
    assert meta["preset"] == "mmdit" and meta["method"] == "t2m"
    r = run.invoke(app, ["segment", *common, "--method", "iseg", "--out", "seg-iseg"])
    assert r.exit_code == 0 and "preset 'mmdit' from the sd3 family" in r.output
    r = run.invoke(app, ["segment", *common, "--method", "iseg", "--preset", "paper", "--out", "seg-iseg-paper"])
    assert r.exit_code == 2 and "iseg (paper) cannot read this sd3 model" in r.output
    assert "Traceback" not in r.output
    r = run.invoke(app, ["eval", "sc", "-m", "cross", "-m", "t2m", "-m", "diffseg", "--model", str(sd3_dir), "--out", "ev"])
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "ev" / "report.json").read_text())["methods"]) == {"cross", "t2m-mmdit", "diffseg"}
    for method in ("ca", "ca-sa", "seediff"):
        r = run.invoke(
            app,
            [
                "generate",
                "-c",
                "circle",
                "--per-class",
                "1",
                "--steps",
                "2",
                "--method",
                method,
                "--model",
                str(sd3_dir),
                "--out",
                f"gen-{method}",
            ],
        )
        assert r.exit_code == 0, r.output
        assert np.asarray(Image.open(tmp_path / f"gen-{method}" / "masks" / "000000.png")).shape == (64, 64)


def test_pipelines_attnseg_cannot_read_are_refused_by_name(tmp_path):
    from attnseg.diffusion.loading import ModelError, load_pipeline

    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ModelError, match="is a PixArtAlphaPipeline pipeline; attnseg reads StableDiffusionPipeline, "):
        load_pipeline(tmp_path / "xl")


def test_large_captures_take_fewer_rows_per_forward(sd3, monkeypatch):
    import attnseg.predictor as predictor_module

    plan = sd3.method("t2m").plan(sd3.inventory, 16)  # mmdit: every cross and self map of the 2 joint layers
    per_row = 4 * (2 * 256 * 77 + 2 * 256 * 256)
    assert sd3._rows_per_forward(plan, 16, 77) == sd3.max_batch
    monkeypatch.setattr(predictor_module, "CAPTURE_BUDGET", 3 * per_row)
    assert sd3._rows_per_forward(plan, 16, 77) == 3
    monkeypatch.setattr(predictor_module, "CAPTURE_BUDGET", 1)
    assert sd3._rows_per_forward(plan, 16, 77) == 1


def test_cat_cross_on_the_embedding_scales_the_text_states_before_the_projections(sd3):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from attnseg.diffusion.capture import AttentionStore, JointCaptureProcessor

    attn = sd3.backbone.pipe.transformer.get_submodule("transformer_blocks.0.attn")
    g = torch.Generator().manual_seed(3)
    h, e = torch.randn((1, 256, 32), generator=g), torch.randn((1, 77, 32), generator=g)
    w = torch.ones(77)
    w[[2, 3]] = 1.6
    with torch.no_grad():
        ref_img, ref_txt = JointAttnProcessor2_0()(attn, h, e * w.view(1, -1, 1))
        img, txt = JointCaptureProcessor(AttentionStore(), {}, key_scale=w, scale_values=True)(attn, h, e)
        keys_img, _ = JointCaptureProcessor(AttentionStore(), {}, key_scale=w)(attn, h, e)
    assert torch.allclose(img, ref_img, atol=1e-5) and torch.allclose(txt, ref_txt, atol=1e-5)
    assert not torch.allclose(keys_img, ref_img, atol=1e-4)  # eq. 8 scales the keys only: another output


def test_an_image_larger_than_the_position_table_is_a_clear_error(sd3):
    most = sd3.pipe.transformer.config.pos_embed_max_size
    if most is None:
        pytest.skip("this transformer has no position table limit")
    bb = sd3.backbone
    text = bb.encode_prompts(["a red circle"])
    patch = sd3.pipe.transformer.config.patch_size
    bb.forward(torch.zeros((1, 4, most * patch, most * patch)), 150, text)  # the largest it reads
    with pytest.raises(ValueError, match=f"at most {most} x {most} patches"):
        bb.forward(torch.zeros((1, 4, most * patch, (most + 1) * patch)), 150, text)


def test_the_families_bench_runs_a_plan_with_its_cat_cross(sd3):
    """`attnseg bench families` times iSeg as it runs: the class token's keys scaled in every joint block."""
    from dataclasses import replace

    from attnseg.jobs.bench import _forward_at
    from attnseg.methods.registry import get_method

    bb = sd3.backbone
    z, text = _inputs(bb, seed=3)
    plan = get_method("iseg", "mmdit").plan(bb.layers, 16)
    name = "transformer_blocks.0.attn:cross"
    got = _forward_at(bb, z, text, plan).mean(name)
    ks = torch.ones(text.hidden.shape[1])
    ks[1] = 1.6
    want = bb.forward(z, 150, text, plan.names, key_scale=ks).mean(name)
    plain = _forward_at(bb, z, text, replace(plan, key_scale_gamma=None)).mean(name)
    assert torch.allclose(got, want) and not torch.allclose(got, plain, atol=1e-4)
    assert _forward_at(bb, z, text, None).sums == {}  # None: the plain forward, nothing captured


def test_the_cross_baseline_reads_the_heads_a_preset_chooses(sd3):
    from attnseg.diffusion.layers import LayerSelect

    blocks = sorted({lay.module for lay in sd3.inventory if lay.kind == "cross"})
    heads = next(lay.heads for lay in sd3.inventory if lay.kind == "cross")
    assert heads > 1
    sd3.set_image(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def scores(**heads_of_block) -> np.ndarray:
        cross = tuple(LayerSelect(kind="cross", names=(f"{b}:cross",), **heads_of_block) for b in blocks)
        return sd3.segment(["red circle", "blue star"], method="cross", cross=cross).scores

    # Every head named: the per-head capture averaged is the head-mean capture; one head reads another map.
    assert np.allclose(scores(heads=tuple(range(heads))), scores(), atol=1e-5)
    assert not np.allclose(scores(heads=(0,)), scores(), atol=1e-3)
