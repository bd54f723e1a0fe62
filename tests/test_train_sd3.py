"""The embedded transformer model's training: trains, resumes where it stopped, exports a loadable SD3 pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.mark.filterwarnings("ignore")
def _beside(first, work):
    """A new work folder that shares ``first``'s data (scenes, latents, VAE), as a run started from it does."""
    work.mkdir()
    for name in ("latents.npz", "scenes.npz", "vae.pt"):
        (work / name).symlink_to(first / name)
    return work


def _first_run(work, n_scenes: int, steps: int, arch):
    """A tiny run's data (its VAE the embedded model's) and its first steps, captions at 30% colour; its config."""
    from attnseg.diffusion.loading import EMBEDDED_DIR
    from attnseg.train.embedded.sd3 import stage_sd3
    from attnseg.train.embedded.train import TrainConfig, stage_data, stage_encode, stage_vae

    cfg = TrainConfig(work=str(work), n_scenes=n_scenes, unet_steps=steps, batch=2, ckpt_every=1, diag_every=1000, threads=1)
    cfg.colour_prob = 0.3
    stage_data(cfg)
    stage_vae(cfg, str(EMBEDDED_DIR))
    stage_encode(cfg)
    stage_sd3(cfg, arch, init_from=str(EMBEDDED_DIR))
    return cfg


def test_sd3_stage_trains_resumes_and_exports(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from attnseg.diffusion.loading import EMBEDDED_DIR
    from attnseg.train.embedded.sd3 import SD3_CALL, SD3Arch, stage_export_sd3, stage_sd3
    from attnseg.train.embedded.train import TrainConfig, stage_data, stage_encode, stage_vae

    cfg = TrainConfig(work=str(tmp_path), n_scenes=16, unet_steps=2, batch=2, ckpt_every=1, diag_every=1000, threads=1)
    stage_data(cfg)
    stage_vae(cfg, str(EMBEDDED_DIR))
    stage_encode(cfg)
    # The latents keep the scaling factor of the pipeline the VAE came from, not 1 / std of these 16 scenes.
    shipped = json.loads((EMBEDDED_DIR / "vae" / "config.json").read_text())["scaling_factor"]
    assert float(np.load(tmp_path / "latents.npz")["scaling_factor"]) == pytest.approx(shipped, rel=1e-6)
    stage_sd3(cfg, SD3Arch(layers=1), init_from=str(EMBEDDED_DIR))
    first = torch.load(tmp_path / "sd3-ckpt.pt", weights_only=True)
    assert first["step"] == 2 and first["config"]["sd3_arch"]["layers"] == 1
    # The text encoders start from the embedded model's trained token embeddings.
    from transformers import CLIPTextModel

    src = CLIPTextModel.from_pretrained(EMBEDDED_DIR / "text_encoder", dtype=torch.float32)
    start = getattr(src, "text_model", src).embeddings.token_embedding.weight
    moved = first["text_encoder"]["text_model.embeddings.token_embedding.weight"] - start
    assert moved.abs().max() < 0.01  # two small steps from there, not a fresh random table
    cfg.unet_steps = 3
    stage_sd3(cfg, SD3Arch(layers=4))  # resumes with the checkpoint's architecture
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "sd3" and r.get("resumed_at") == 2 for r in log)
    assert torch.load(tmp_path / "sd3-ckpt.pt", weights_only=True)["step"] == 3
    # The command line resumes the transformer's run with its own caption mix, not the default.
    from attnseg.train.embedded.command import main

    cfg.colour_prob, cfg.unet_steps = 0.3, 4
    stage_sd3(cfg, SD3Arch(layers=1))  # one more step, saved with 0.3 in the checkpoint
    main(["sd3", "--work", str(tmp_path), "--steps", "5", "--threads", "1"])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in log if r.get("resumed_at") == 4]
    assert resumed and resumed[-1]["colour_prob"] == 0.3
    # ... and with the noise-level distribution it was last given.
    main(["sd3", "--work", str(tmp_path), "--steps", "6", "--threads", "1", "--noise-mean", "0.5", "--noise-std", "1.25"])
    main(["sd3", "--work", str(tmp_path), "--steps", "7", "--threads", "1"])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["noise_mean"], r["noise_std"]) for r in log if r.get("resumed_at") in (5, 6)] == [(0.5, 1.25)] * 2
    cfg.unet_steps = 7

    out = stage_export_sd3(cfg, tmp_path / "pipe")
    pipe = StableDiffusion3Pipeline.from_pretrained(out, dtype=torch.float32, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.dtype == torch.float32 and pipe.transformer.config.num_layers == 1
    assert pipe.vae.config.shift_factor == 0.0
    im = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", **SD3_CALL).images
    assert im.shape == (1, 64, 64, 3) and np.isfinite(im).all()
    assert json.loads((out / "training.json").read_text())["step"] == 7
    # The pooled conditioning is off (the default): zero and frozen through training and in the exported pipeline.
    assert all(not p.text_projection.weight.any() for p in (pipe.text_encoder, pipe.text_encoder_2))
    _, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, device="cpu", do_classifier_free_guidance=False, **SD3_CALL)
    assert pooled.abs().max() == 0
    # A UNet folder teaches the transformer's targets, and a resumed run keeps its teacher; an SD3 folder cannot teach.
    untaught = [_beside(tmp_path, tmp_path / name) for name in ("own", "own-again")]
    for w in untaught:  # the same step from the same weights with the samples' own targets, twice
        (w / "sd3-ckpt.pt").write_bytes((tmp_path / "sd3-ckpt.pt").read_bytes())
        main(["sd3", "--work", str(w), "--steps", "8", "--threads", "1"])
    main(["sd3", "--work", str(tmp_path), "--steps", "8", "--threads", "1", "--teacher", str(EMBEDDED_DIR)])
    own, again, taught = (torch.load(w / "sd3-ckpt.pt", weights_only=True)["transformer"] for w in (*untaught, tmp_path))
    assert all(torch.equal(own[k], again[k]) for k in own) and any(not torch.equal(taught[k], own[k]) for k in own)
    main(["sd3", "--work", str(tmp_path), "--steps", "9", "--threads", "1"])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["teacher"] for r in log if r.get("resumed_at") in (7, 8)] == [str(EMBEDDED_DIR.resolve())] * 2
    with pytest.raises(SystemExit, match="not a UNet pipeline folder"):
        main(["sd3", "--work", str(tmp_path), "--steps", "10", "--threads", "1", "--teacher", str(out)])


def test_noise_levels_follow_the_logit_normal_asked_for():
    from attnseg.train.embedded.sd3 import noise_levels

    g = torch.Generator().manual_seed(0)
    sd3 = noise_levels(200_000, 0.0, 1.0, g)
    shifted = noise_levels(200_000, 0.5, 1.25, g)
    # lognorm(0, 1): median 0.5, P(s > 0.8) = P(z > logit 0.8 = 1.386) = 0.083.
    assert sd3.median() == pytest.approx(0.5, abs=0.005) and (sd3 > 0.8).float().mean() == pytest.approx(0.083, abs=0.003)
    # lognorm(0.5, 1.25): median sigmoid(0.5) = 0.622, P(s > 0.8) = P(z > (1.386 - 0.5) / 1.25 = 0.709) = 0.239.
    assert shifted.median() == pytest.approx(0.622, abs=0.005)
    assert (shifted > 0.8).float().mean() == pytest.approx(0.239, abs=0.004)


def test_a_noise_predictor_read_at_the_same_signal_to_noise_ratio_gives_the_flow_velocity():
    from attnseg.train.embedded.sd3 import teacher_velocity

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # the embedded UNet's schedule
    abar = torch.cumprod(1 - betas, 0).float()
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    # s = 0.935 is about the schedule's last step (sqrt(a / (1 - a)) = 0.069 = (1 - s) / s); 0.99 lies beyond it.
    s = torch.tensor([0.3, 0.6, 0.9, 0.99])
    zt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * e
    seen = {}

    def perfect(x, t):  # a noise predictor that knows the noise
        seen.update(x=x, t=t)
        return e

    v, inside = teacher_velocity(perfect, zt, s, abar)
    assert inside.tolist() == [True, True, True, False]
    assert torch.allclose(v, e - x0, atol=1e-4)
    # It was shown the DDPM sample of the same SNR, at the timestep whose alphas_cumprod is that sample's a.
    a = ((1 - s) / s) ** 2 / (1 + ((1 - s) / s) ** 2)
    expected = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * e
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    read = np.interp(seen["t"][:3].numpy(), np.arange(1000), np.log(abar.numpy()))
    assert np.allclose(read, np.log(a[:3].numpy()), atol=1e-3) and seen["t"][3] == 999


@pytest.mark.filterwarnings("ignore")
def test_a_run_starts_from_another_runs_weights_with_the_pooled_conditioning_and_text_mixing_turned_off(tmp_path):
    from attnseg.train.embedded.sd3 import SD3Arch, stage_sd3
    from attnseg.train.embedded.train import TrainConfig

    first = tmp_path / "t1"
    _first_run(first, 8, 1, SD3Arch(layers=2, pooled=True, mix_text=True))
    t1 = torch.load(first / "sd3-ckpt.pt", weights_only=True)
    assert t1["text_encoder"]["text_projection.weight"].abs().max() > 0  # pooled on: a trained projection
    # A checkpoint of the time before the setting existed reads as pooled on.
    from attnseg.train.embedded.sd3 import _arch_of

    assert t1["transformer"]["transformer_blocks.0.attn.to_add_out.weight"].abs().max() > 0  # the text stream trained
    # A checkpoint of the time before the settings existed reads as both on.
    legacy = {k: v for k, v in t1["config"]["sd3_arch"].items() if k not in ("pooled", "mix_text")}
    assert _arch_of({"sd3_arch": legacy}).pooled and _arch_of({"sd3_arch": legacy}).mix_text

    second = _beside(first, tmp_path / "t2")
    cfg2 = TrainConfig(work=str(second), n_scenes=8, unet_steps=2, batch=2, ckpt_every=1, diag_every=1000, threads=1)
    stage_sd3(cfg2, SD3Arch(layers=4), init_ckpt=str(first / "sd3-ckpt.pt"))  # sizes from the checkpoint
    t2 = torch.load(second / "sd3-ckpt.pt", weights_only=True)
    arch2 = t2["config"]["sd3_arch"]
    assert t2["step"] == 2 and arch2["layers"] == 2 and not arch2["pooled"] and not arch2["mix_text"]
    assert not t2["text_encoder"]["text_projection.weight"].any() and not t2["text_encoder_2"]["text_projection.weight"].any()
    # The text stream is frozen: the first block hands its text tokens on exactly as it received them.
    from attnseg.train.embedded.sd3 import build_transformer

    model = build_transformer(_arch_of(t2["config"]), 16, 4)
    model.load_state_dict(t2["transformer"])
    seen = {}
    model.transformer_blocks[0].register_forward_hook(
        lambda m, a, kw, out: seen.update(inp=kw["encoder_hidden_states"], out=out[0]), with_kwargs=True
    )
    with torch.no_grad():
        model(
            torch.randn(1, 4, 16, 16),
            encoder_hidden_states=torch.randn(1, 77, 256),
            pooled_projections=torch.zeros(1, 128),
            timestep=torch.tensor([400.0]),
        )
    assert torch.equal(seen["inp"], seen["out"])
    kept = [k for k in t1["transformer"] if "to_add_out" not in k and "ff_context.net.2" not in k]
    moved = max((t2["transformer"][k] - t1["transformer"][k]).abs().max() for k in kept)
    assert 0 < moved < 0.05  # two steps from T1's weights, not a fresh start
    # A scaled position table: the source's (SD3's) table times the factor, kept through training and in the export.
    fourth = _beside(first, tmp_path / "t4")
    cfg4 = TrainConfig(work=str(fourth), n_scenes=8, unet_steps=1, batch=2, ckpt_every=1, diag_every=1000, threads=1)
    stage_sd3(cfg4, SD3Arch(pos_scale=0.25), init_ckpt=str(first / "sd3-ckpt.pt"))
    t4 = torch.load(fourth / "sd3-ckpt.pt", weights_only=True)
    table = t1["transformer"]["pos_embed.pos_embed"]
    assert t4["config"]["sd3_arch"]["pos_scale"] == 0.25 and torch.allclose(
        t4["transformer"]["pos_embed.pos_embed"], 0.25 * table
    )
    from diffusers import SD3Transformer2DModel

    from attnseg.train.embedded.sd3 import stage_export_sd3

    out = stage_export_sd3(cfg4, tmp_path / "pipe4")
    loaded = SD3Transformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    assert torch.allclose(loaded.pos_embed.pos_embed, 0.25 * table, atol=1e-3)  # fp16 weights
    # Scaled text position embeddings: the source's times the factor, frozen through training and resuming.
    texty = _beside(first, tmp_path / "t4-text")
    cfg_t = TrainConfig(work=str(texty), n_scenes=8, unet_steps=1, batch=2, ckpt_every=1, diag_every=1000, threads=1)
    stage_sd3(cfg_t, SD3Arch(pos_scale=0.25, text_pos_scale=0.5), init_ckpt=str(first / "sd3-ckpt.pt"))
    cfg_t.unet_steps = 2
    stage_sd3(cfg_t, SD3Arch())  # resumes: its own checkpoint's settings
    tt = torch.load(texty / "sd3-ckpt.pt", weights_only=True)
    key = "text_model.embeddings.position_embedding.weight"
    assert tt["step"] == 2 and tt["config"]["sd3_arch"]["text_pos_scale"] == 0.5
    for enc in ("text_encoder", "text_encoder_2"):
        assert torch.equal(tt[enc][key], 0.5 * t1[enc][key])
    tok = "text_model.embeddings.token_embedding.weight"
    assert not torch.equal(tt["text_encoder"][tok], t1["text_encoder"][tok])  # the rest still trains
    # From a run whose table is already scaled, the factor counts from the lineage's start: 0.25 is half of 0.5.
    quarter = _beside(first, tmp_path / "t4-text-quarter")
    cfg_q = TrainConfig(work=str(quarter), n_scenes=8, unet_steps=1, batch=2, ckpt_every=1, diag_every=1000, threads=1)
    stage_sd3(cfg_q, SD3Arch(pos_scale=0.25, text_pos_scale=0.25), init_ckpt=str(texty / "sd3-ckpt.pt"))
    tq = torch.load(quarter / "sd3-ckpt.pt", weights_only=True)
    assert torch.equal(tq["text_encoder"][key], 0.5 * tt["text_encoder"][key])
    # From the command line a new run takes its caption mix from the run it starts from, not the default.
    from attnseg.train.embedded.command import main

    third = _beside(first, tmp_path / "t3")
    main(["sd3", "--work", str(third), "--init-ckpt", str(first / "sd3-ckpt.pt"), "--steps", "1", "--threads", "1"])
    assert torch.load(third / "sd3-ckpt.pt", weights_only=True)["config"]["colour_prob"] == 0.3
    # --layers grows the source run's transformer, whose position scale it keeps; a run without a source cannot grow.
    grown = _beside(first, tmp_path / "t5")
    main(
        [
            "sd3",
            "--work",
            str(grown),
            "--init-ckpt",
            str(fourth / "sd3-ckpt.pt"),
            "--layers",
            "3",
            "--steps",
            "1",
            "--threads",
            "1",
        ]
    )
    t5 = torch.load(grown / "sd3-ckpt.pt", weights_only=True)
    assert t5["config"]["sd3_arch"]["layers"] == 3 and "transformer_blocks.2.norm1.linear.weight" in t5["transformer"]
    assert t5["config"]["sd3_arch"]["pos_scale"] == 0.25
    assert torch.allclose(t5["transformer"]["pos_embed.pos_embed"], 0.25 * table)
    with pytest.raises(ValueError, match="--init-ckpt"):
        main(["sd3", "--work", str(tmp_path / "t6"), "--layers", "3", "--steps", "1", "--threads", "1"])
    # --patch re-patches the source's transformer: a coarser token grid, its own position table at the source's scale.
    coarse = _beside(first, tmp_path / "t5-patch2")
    main(["sd3", "--work", str(coarse), "--init-ckpt", str(fourth / "sd3-ckpt.pt"), "--patch", "2", "--steps", "1"])
    tp = torch.load(coarse / "sd3-ckpt.pt", weights_only=True)
    assert tp["step"] == 1 and tp["config"]["sd3_arch"]["patch"] == 2
    fresh = build_transformer(_arch_of(tp["config"]), 16, 4).pos_embed.pos_embed
    assert fresh.shape[1] == 64 and torch.allclose(tp["transformer"]["pos_embed.pos_embed"], 0.25 * fresh)
    with pytest.raises(ValueError, match="--init-ckpt"):
        main(["sd3", "--work", str(tmp_path / "t6"), "--patch", "2", "--steps", "1", "--threads", "1"])
    with pytest.raises(SystemExit):  # resuming keeps the run's scales: another one is refused, not ignored
        main(["sd3", "--work", str(texty), "--text-pos-scale", "0.1", "--steps", "3", "--threads", "1"])
    assert torch.load(texty / "sd3-ckpt.pt", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit):  # a factor of 0 would freeze an empty table for good
        main(["sd3", "--work", str(tmp_path / "t7"), "--text-pos-scale", "0", "--steps", "1", "--threads", "1"])
    assert not (tmp_path / "t7").exists()


def test_a_grown_transformer_computes_what_its_source_did_until_it_trains():
    from attnseg.train.embedded.sd3 import SD3Arch, build_transformer, freeze_text_stream, grow_blocks

    torch.manual_seed(0)
    small = build_transformer(SD3Arch(layers=2), 8, 4)
    with torch.no_grad():  # a trained-looking source: non-zero gates everywhere
        for p in small.parameters():
            p.add_(0.05 * torch.randn_like(p))
    freeze_text_stream(small)
    big = build_transformer(SD3Arch(layers=5), 8, 4)
    freeze_text_stream(big)
    grow_blocks(big, small.state_dict(), 2)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8),
        encoder_hidden_states=torch.randn(2, 77, 256),
        pooled_projections=torch.randn(2, 128),
        timestep=torch.tensor([400.0, 700.0]),
    )
    with torch.no_grad():
        want, got = small(**inputs).sample, big(**inputs).sample
    assert want.abs().mean() > 0.01 and torch.allclose(want, got, atol=1e-5)
    # The source's last block is the grown model's last; the first keeps its place.
    for i, j in ((0, 0), (1, 4)):
        assert torch.equal(small.transformer_blocks[i].attn.to_q.weight, big.transformer_blocks[j].attn.to_q.weight)
    # The new blocks' gates can train: the loss reaches them.
    big(**inputs).sample.pow(2).mean().backward()
    assert big.transformer_blocks[2].norm1.linear.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="more layers"):
        grow_blocks(small, big.state_dict(), 5)


def test_a_repatched_transformer_embeds_and_writes_each_patch_as_its_source_did():
    from attnseg.train.embedded.sd3 import SD3Arch, build_transformer, repatched

    torch.manual_seed(0)
    fine = build_transformer(SD3Arch(layers=1, patch=1), 8, 4)
    with torch.no_grad():
        for p in fine.parameters():
            p.add_(0.05 * torch.randn_like(p))
    coarse = build_transformer(SD3Arch(layers=1, patch=2), 8, 4)
    coarse.load_state_dict(repatched(fine.state_dict(), coarse, 1))
    # The blocks are the source's; the position table is the coarse grid's own (4 x 4 tokens).
    assert torch.equal(coarse.transformer_blocks[0].attn.to_q.weight, fine.transformer_blocks[0].attn.to_q.weight)
    assert coarse.pos_embed.pos_embed.shape[1] == 16
    # A latent that is constant over each 2 x 2 patch: the coarse token is the fine tokens' embedding (no positions).
    x = torch.randn(1, 4, 4, 4).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    with torch.no_grad():
        want = fine.pos_embed.proj(x)[:, :, ::2, ::2]
        got = coarse.pos_embed.proj(x)
    assert torch.allclose(want, got, atol=1e-5)
    # Each latent pixel of a patch gets what the source's output projection wrote for one token.
    h = torch.randn(3, 128)
    with torch.no_grad():
        want, got = fine.proj_out(h), coarse.proj_out(h).view(3, 2, 2, 4)
    assert torch.allclose(got, want[:, None, None, :].expand(3, 2, 2, 4), atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        repatched(coarse.state_dict(), build_transformer(SD3Arch(layers=1, patch=3), 9, 4), 2)


@pytest.mark.filterwarnings("ignore")
def test_a_run_starts_from_a_released_pipeline_folder(tmp_path):
    """The released model's folder holds what a run needs to continue it: its weights (fp16, read as fp32), the step
    they were exported at, and its run config and architecture."""
    from attnseg.train.embedded.command import main
    from attnseg.train.embedded.sd3 import SD3Arch, _arch_of, build_transformer, load_source, stage_export_sd3

    first = tmp_path / "t1"
    cfg = _first_run(first, 16, 2, SD3Arch(layers=2, pos_scale=0.25))
    released = stage_export_sd3(cfg, tmp_path / "released")
    state = torch.load(first / "sd3-ckpt.pt", weights_only=True)
    source = load_source(released)
    assert source["step"] == 2 and source["config"]["colour_prob"] == 0.3
    assert source["config"]["sd3_arch"]["layers"] == 2 and source["config"]["sd3_arch"]["pos_scale"] == 0.25
    key = "transformer_blocks.1.attn.to_q.weight"
    names = [n for n, _ in build_transformer(_arch_of(state["config"]), 16, 4).named_parameters()]
    ema = dict(zip(names, state["ema"], strict=False))[key]  # the export holds the EMA, in fp16
    assert source["transformer"][key].dtype == torch.float32
    assert torch.equal(source["transformer"][key], ema.half().float())

    meta = json.loads((released / "training.json").read_text())  # a release's card writes its lineage there
    history = {
        "runs": [{"run": "T1", "from": 0, "to": 2, "change": "from scratch", "colour": 30}],
        "hours": 0.1,
        "arch": meta["arch"],
    }
    (released / "training.json").write_text(json.dumps({**meta, "history": history}))
    second = _beside(first, tmp_path / "t2")
    main(["sd3", "--work", str(second), "--init-ckpt", str(released), "--patch", "2", "--steps", "1", "--threads", "1"])
    t2 = torch.load(second / "sd3-ckpt.pt", weights_only=True)
    assert t2["step"] == 1 and t2["config"]["sd3_arch"]["patch"] == 2 and t2["config"]["colour_prob"] == 0.3
    log = [json.loads(x) for x in (second / "log.jsonl").read_text().splitlines()]
    start = [r for r in log if r.get("init_ckpt")]
    assert start[0]["from_step"] == 2 and start[0]["init_ckpt"] == str(released.resolve())
    assert start[0]["released_history"] == history  # carried on, for the next release's card
    with pytest.raises(SystemExit):  # a folder that export-sd3 did not write: said, not a stack trace
        main(["sd3", "--work", str(tmp_path / "t3"), "--init-ckpt", str(first), "--steps", "1", "--threads", "1"])
    with pytest.raises(SystemExit):  # the UNet stage starts from a run's ckpt.pt (or --init-from a folder)
        main(["unet", "--work", str(tmp_path / "t4"), "--init-ckpt", str(released), "--steps", "1", "--threads", "1"])
    assert not (tmp_path / "t3" / "sd3-ckpt.pt").exists() and not (tmp_path / "t4").exists()
