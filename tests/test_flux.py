"""The Flux backbone: double- and single-stream attention read as cross and self maps (text tokens first, RoPE),
capture leaves outputs unchanged, packing and noise, guidance-distilled and schnell layouts, and layers / segment /
generate on a Flux pipeline folder."""

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

T5_TOKENS = 32  # the tiny pipeline's T5 length
GRID = 8  # 64 px / VAE scale 4 = 16 latent, packed 2 x 2
P = GRID * GRID


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from attnseg.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("flux") / "tiny-flux", family="flux")


@pytest.fixture(scope="module")
def flux(flux_dir):
    from attnseg.predictor import AttnSegPredictor

    return AttnSegPredictor.from_pretrained(flux_dir, device="cpu", dtype="float32")


def _inputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 16, 16, 16), generator=g), bb.encode_prompts(["a photo of a red circle", "a blue star"])


def _heads(attn, x):
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def _rope(x, image_rotary_emb):
    """RoPE as complex rotations, written apart from diffusers: pair (x_2j, x_2j+1) turned by its angle, whose cos and
    sin the embedding holds twice (once per element of the pair)."""
    cos, sin = image_rotary_emb
    turn = torch.complex(cos[:, ::2].float(), sin[:, ::2].float())  # (N, d/2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * turn).flatten(-2)


def _inputs_of(module, run):
    """The keyword inputs ``module`` is called with during ``run()``."""
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    try:
        out = run()
    finally:
        hook.remove()
    return seen, out


def test_layers_of_a_flux_transformer(flux):
    layers = flux.backbone.layers
    assert [(lay.name, lay.kind, lay.block, lay.source, lay.rank, lay.heads) for lay in layers] == [
        ("transformer_blocks.0.attn:cross", "cross", "joint", "joint", 0, 2),
        ("transformer_blocks.0.attn:self", "self", "joint", "joint", 0, 2),
        ("transformer_blocks.1.attn:cross", "cross", "joint", "joint", 0, 2),
        ("transformer_blocks.1.attn:self", "self", "joint", "joint", 0, 2),
        ("single_transformer_blocks.0.attn:cross", "cross", "single", "single", 0, 2),
        ("single_transformer_blocks.0.attn:self", "self", "single", "single", 0, 2),
        ("single_transformer_blocks.1.attn:cross", "cross", "single", "single", 0, 2),
        ("single_transformer_blocks.1.attn:self", "self", "single", "single", 0, 2),
    ]
    bb = flux.backbone
    assert bb.family == "flux" and bb.native_resolution == 64 and bb.latent_side(64) == 16
    assert {lay.side(bb.latent_side(64)) for lay in layers} == {GRID}  # the packed grid
    assert bb.default_presets == {"t2m": "mmdit", "iseg": "mmdit"} and bb.t5_tokens == T5_TOKENS and bb.guided


def test_packing_puts_image_tokens_in_row_major_order_of_the_patch_grid(flux):
    bb = flux.backbone
    z = torch.randn((2, 16, 6, 4))
    tokens = bb.pack(z)  # (B, 3 * 2, 64)
    assert tokens.shape == (2, 6, 64)
    for i in range(6):
        r, c = divmod(i, 2)
        assert torch.equal(tokens[:, i], z[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(2, -1))
    ids = bb.pipe._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32)  # RoPE positions of those tokens
    assert ids.tolist() == [[0, i // 2, i % 2] for i in range(6)]
    with pytest.raises(ValueError, match="latent side must be even"):
        bb.pack(torch.zeros((1, 16, 5, 4)))


def test_text_is_t5s_stream_with_pooled_clip_and_guidance(flux):
    from attnseg.diffusion.prompts import compose_prompt

    bb = flux.backbone
    text = bb.encode_prompts(["a photo of a red circle", "a blue star"])
    assert text.hidden.shape == (2, T5_TOKENS, 32)  # T5 states, padded
    assert text.added["pooled_projections"].shape == (2, 32)  # CLIP's pooled embedding
    assert text.added["guidance"].tolist() == [3.5, 3.5]
    again = bb.encode_prompts(["a blue star"])
    assert torch.equal(again.hidden[0], text.hidden[1])
    prompt = compose_prompt(["red circle", "blue star"], flux.method("t2m").config.template)
    spans = bb.token_spans(prompt.text, prompt.char_spans, prompt.labels)
    tokens = bb.pipe.tokenizer_2.convert_ids_to_tokens(spans.input_ids)
    assert [[tokens[i] for i in sp] for sp in spans.spans] == [["\u2581red", "\u2581circle"], ["\u2581blue", "\u2581star"]]
    assert tokens[-1] == "</s>" and bb.word_pieces("circle") == 1 and bb.word_pieces("zorbly") > 1


def test_add_noise_is_rectified_flow(flux):
    x0, e = torch.randn((1, 16, 4, 4)), torch.randn((1, 16, 4, 4))
    assert torch.allclose(flux.backbone.add_noise(x0, e, 250), 0.75 * x0 + 0.25 * e)


def test_capture_leaves_the_output_unchanged_and_restores_processors(flux):
    from attnseg.diffusion.capture import AttentionStore, installed

    bb = flux.backbone
    z, text = _inputs(bb)
    before = {k: type(v) for k, v in bb.pipe.transformer.attn_processors.items()}
    ones = torch.ones((2, T5_TOKENS))
    with torch.no_grad():
        ref = bb._predict(z, 300, text)
        with installed(bb.pipe.transformer, bb._processors(AttentionStore(), [lay.name for lay in bb.layers], T5_TOKENS)):
            out = bb._predict(z, 300, text)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
        for scale_values in (False, True):  # Cat-Cross with factors of 1 changes nothing either
            with installed(bb.pipe.transformer, bb._processors(AttentionStore(), [], T5_TOKENS, ones, scale_values)):
                assert torch.allclose(bb._predict(z, 300, text), ref, atol=1e-5, rtol=1e-4)
    assert {k: type(v) for k, v in bb.pipe.transformer.attn_processors.items()} == before


@pytest.mark.parametrize("module_name", ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"])
def test_maps_are_the_renormalised_blocks_of_the_softmax_text_first(flux, module_name):
    bb = flux.backbone
    z, text = _inputs(bb, seed=1)
    attn = bb.pipe.transformer.get_submodule(module_name)
    names = [f"{module_name}:cross", f"{module_name}:self"]
    seen, store = _inputs_of(attn, lambda: bb.forward(z, 300, text, names))
    h, rope = seen["hidden_states"], seen["image_rotary_emb"]
    with torch.no_grad():
        q, k = attn.norm_q(_heads(attn, attn.to_q(h))), attn.norm_k(_heads(attn, attn.to_k(h)))
        if seen.get("encoder_hidden_states") is not None:  # double-stream: the text stream's own projections, first
            e = seen["encoder_hidden_states"]
            q = torch.cat([attn.norm_added_q(_heads(attn, attn.add_q_proj(e))), q], dim=2)
            k = torch.cat([attn.norm_added_k(_heads(attn, attn.add_k_proj(e))), k], dim=2)
        q, k = _rope(q, rope), _rope(k, rope)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (2, heads, T + P, T + P)
    assert probs.shape[-1] == T5_TOKENS + P
    cross, own = probs[:, :, T5_TOKENS:, :T5_TOKENS], probs[:, :, T5_TOKENS:, T5_TOKENS:]
    want_cross = (cross / cross.sum(-1, keepdim=True)).mean(1)
    want_self = (own / own.sum(-1, keepdim=True)).mean(1)
    got_cross, got_self = store.mean(names[0]), store.mean(names[1])
    assert got_cross.shape == (2, P, T5_TOKENS) and got_self.shape == (2, P, P)
    assert torch.allclose(got_cross, want_cross, atol=1e-5) and torch.allclose(got_self, want_self, atol=1e-5)
    # What is returned: each block renormalised over its own columns, so rows are distributions (sum 1, <= 1);
    # the raw blocks share an image token's attention (their masses sum to 1).
    assert torch.allclose(got_cross.sum(-1), torch.ones(2, P), atol=1e-5)
    assert torch.allclose(got_self.sum(-1), torch.ones(2, P), atol=1e-5)
    assert bool((got_cross >= 0).all()) and bool((got_self >= 0).all())
    assert torch.allclose(cross.sum(-1) + own.sum(-1), torch.ones_like(cross.sum(-1)), atol=1e-5)


def test_cat_cross_on_the_embedding_scales_the_text_states_before_the_projections(flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from attnseg.diffusion.capture import AttentionStore, FluxCaptureProcessor
    from attnseg.diffusion.flux import apply_rotary_emb

    bb = flux.backbone
    g = torch.Generator().manual_seed(3)
    n = T5_TOKENS + P
    ids = torch.cat([torch.zeros((T5_TOKENS, 3)), bb.pipe._prepare_latent_image_ids(1, GRID, GRID, "cpu", torch.float32)])
    rope = bb.pipe.transformer.pos_embed(ids)
    w = torch.ones(T5_TOKENS)
    w[[2, 3]] = 1.6
    ws = w.view(1, -1, 1)

    def ours(**kw):
        return FluxCaptureProcessor(AttentionStore(), {}, T5_TOKENS, apply_rotary_emb, key_scale=w, **kw)

    with torch.no_grad():
        joint = bb.pipe.transformer.get_submodule("transformer_blocks.0.attn")
        h, e = torch.randn((1, P, 32), generator=g), torch.randn((1, T5_TOKENS, 32), generator=g)
        ref_img, ref_txt = FluxAttnProcessor()(joint, h, e * ws, None, rope)
        img, txt = ours(scale_values=True)(joint, h, e, None, rope)
        assert torch.allclose(img, ref_img, atol=1e-5) and torch.allclose(txt, ref_txt, atol=1e-5)
        keys_img, _ = ours()(joint, h, e, None, rope)
        assert not torch.allclose(keys_img, ref_img, atol=1e-4)  # eq. 8 scales the keys only: another output
        single = bb.pipe.transformer.get_submodule("single_transformer_blocks.0.attn")
        x = torch.randn((1, n, 32), generator=g)
        ref = FluxAttnProcessor()(single, torch.cat([x[:, :T5_TOKENS] * ws, x[:, T5_TOKENS:]], dim=1), None, None, rope)
        assert torch.allclose(ours(scale_values=True)(single, x, None, None, rope), ref, atol=1e-5)


def test_denoising_error_is_against_the_velocity(flux):
    bb = flux.backbone
    z, text = _inputs(bb, seed=2)
    e = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    err = bb.denoising_error(z, e, 400, text)
    with torch.no_grad():
        pred = bb._predict(bb.add_noise(z, e, 400), 400, text)
    pred = bb.pipe._unpack_latents(pred, 64, 64, bb.pipe.vae_scale_factor)  # back to (B, 16, 16, 16)
    assert err.shape == (2,) and err.dtype == torch.float32
    assert torch.allclose(err, (pred - (e - z)).square().flatten(1).mean(1), rtol=1e-5)
    assert torch.allclose(bb.denoising_error(z[1:], e[1:], 400, text.rows([1])), err[1:], rtol=1e-4)


def test_schnell_layout_has_no_guidance_and_fewer_t5_tokens():
    from attnseg.diffusion.flux import FluxBackbone
    from attnseg.diffusion.prompts import PromptError
    from attnseg.testing import build_tiny_flux_pipeline

    dev = FluxBackbone(build_tiny_flux_pipeline(t5_tokens=512))
    schnell = FluxBackbone(build_tiny_flux_pipeline(guidance_embeds=False, t5_tokens=512))
    assert (dev.t5_tokens, dev.call_kwargs) == (512, {"max_sequence_length": 512})
    assert (schnell.t5_tokens, schnell.guided) == (256, False)
    text = schnell.encode_prompts(["a red circle"])
    assert set(text.added) == {"pooled_projections"} and text.hidden.shape[1] == 256
    store = schnell.forward(torch.zeros((1, 16, 4, 4)), 100, text, ["single_transformer_blocks.1.attn:cross"])
    assert store.mean("single_transformer_blocks.1.attn:cross").shape == (1, 4, 256)
    text = "a " * 300 + "dog"  # within the tokenizer's 512, beyond the 256 tokens schnell reads
    with pytest.raises(PromptError, match="beyond the 256 T5 tokens"):
        schnell.token_spans(text, [(600, 603)], ["dog"])
    assert dev.token_spans(text, [(600, 603)], ["dog"]).spans == [[300]]
    no_t5 = build_tiny_flux_pipeline()
    no_t5.text_encoder_2 = None
    with pytest.raises(ValueError, match=r"through T5 \(text_encoder_2\)"):
        FluxBackbone(no_t5)


def test_the_predictor_segments_with_cross_t2m_and_iseg(flux):
    img = np.random.default_rng(0).integers(0, 256, (80, 48, 3), dtype=np.uint8)  # not square, not 64 px
    flux.set_image(img)
    for method in ("iseg", "cross", "t2m"):
        res = flux.segment(["red circle", "blue star"], method=method)
        assert res.mask.shape == (80, 48) and res.scores.shape == (3, 80, 48) and res.confidence.shape == (80, 48)
        assert np.isfinite(res.scores).all() and res.scores.min() >= 0 and res.scores.max() <= 1 + 1e-5
        assert set(np.unique(res.mask)) <= {0, 1, 2} and len(res.presence) == 2 and max(res.presence) == 1
    assert res.settings["preset"] == "mmdit"  # the flux family's default for t2m and iseg


def test_generate_reads_every_row_over_the_steps(flux):
    bb = flux.backbone
    names = ["transformer_blocks.0.attn:cross", "single_transformer_blocks.1.attn:self"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    images, store = bb.generate(["a red circle", "a blue star"], 2, 7.5, gens, names)  # guidance > 1: no CFG half
    assert images.shape == (2, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    assert store.mean(names[0]).shape == (2, P, T5_TOKENS) and store.mean(names[1]).shape == (2, P, P)
    assert store.counts == {n: 2 for n in names}
    again, _ = bb.generate(["a red circle", "a blue star"], 2, 7.5, [torch.Generator().manual_seed(i) for i in range(2)])
    assert np.allclose(again, images, atol=1e-5)  # capture does not change the generation


def test_layers_segment_and_generate_from_the_command_line(flux_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = CliRunner()
    r = run.invoke(app, ["layers", "--model", str(flux_dir)])
    assert r.exit_code == 0, r.output
    assert "transformer_blocks.1.attn:cross" in r.output and " joint " in r.output
    assert "single_transformer_blocks.1.attn:self" in r.output and " single " in r.output and "side=  8" in r.output
    assert run.invoke(app, ["shapes", "export", "sc", "--n", "1", "--seed", "1"]).exit_code == 0
    common = ["sc/JPEGImages", "--labels-file", "sc/labels.json", "--model", str(flux_dir), "--device", "cpu"]
    r = run.invoke(app, ["segment", *common, "--method", "t2m", "--out", "seg"])
    assert r.exit_code == 0, r.output
    assert "preset 'mmdit' from the flux family" in r.output
    meta = json.loads((tmp_path / "seg" / "shapes_1_000000.json").read_text())
    assert meta["preset"] == "mmdit" and meta["method"] == "t2m"
    args = ["generate", "-c", "circle", "--per-class", "1", "--steps", "2", "--method", "ca", "--model", str(flux_dir)]
    r = run.invoke(app, [*args, "--out", "gen"])
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "gen" / "masks" / "000000.png")).shape == (64, 64)


def test_flux_folders_load_and_incomplete_or_other_pipelines_are_refused(flux_dir, tmp_path):
    import shutil

    from attnseg.diffusion.flux import FluxBackbone
    from attnseg.diffusion.loading import ModelError, load_backbone, load_pipeline

    assert isinstance(load_backbone(flux_dir), FluxBackbone)
    partial = tmp_path / "no-t5"
    shutil.copytree(flux_dir, partial)
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(ModelError, match="has no text_encoder_2/ folder"):
        load_pipeline(partial)
    (tmp_path / "pixart").mkdir()
    (tmp_path / "pixart" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ModelError, match=r"is a PixArtAlphaPipeline pipeline; attnseg reads .*FluxPipeline"):
        load_pipeline(tmp_path / "pixart")
