"""The shipped embedded model: loads as a Stable Diffusion pipeline and gives sane masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnseg.diffusion.loading import EMBEDDED_DIR, embedded_model_path
from attnseg.shapes.world import make_scene


def test_embedded_model_files():
    root = embedded_model_path()
    for f in (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "README.md",
        "attnseg.json",
    ):
        assert (root / f).exists(), f
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2**20
    assert not list(EMBEDDED_DIR.rglob("*.bin"))


@pytest.fixture(scope="module")
def embedded():
    from attnseg.predictor import AttnSegPredictor

    return AttnSegPredictor.from_pretrained(None, device="cpu", dtype="float32")


def test_loads_with_plain_diffusers():
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(str(embedded_model_path()), dtype=torch.float32)
    tok = CLIPTokenizer(str(embedded_model_path() / "tokenizer/vocab.json"), str(embedded_model_path() / "tokenizer/merges.txt"))
    text = "a photo of a red circle and a blue star"
    assert tok(text).input_ids == pipe.tokenizer(text).input_ids


def _fg_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(((pred > 0) & (gt > 0)).sum() / max(((pred > 0) | (gt > 0)).sum(), 1))


def test_masks_beat_all_foreground(embedded):
    # Loose bounds that a broken model file or profile cannot meet: mean foreground IoU on 12 fixed held-out
    # scenes was 0.45 (cross) and 0.67 (T2M with the model's preset) for a shipped model (0.46 / 0.62 for an earlier
    # one), against 0.12 for "everything is foreground".
    ious: dict[str, list[float]] = {"cross": [], "t2m": []}
    all_fg = []
    for i in range(12):
        sc = make_scene(1, i)
        embedded.set_image(sc.image)
        for m in ious:
            ious[m].append(_fg_iou(embedded.segment(sc.labels, method=m, draws=1).mask, sc.semantic))
        all_fg.append(float((sc.semantic > 0).mean()))
    assert np.mean(ious["cross"]) > 0.3 > 0.15 > np.mean(all_fg), (ious, np.mean(all_fg))
    assert np.mean(ious["t2m"]) > 0.45, ious


def test_profile_points_t2m_and_iseg_at_an_object_coherent_self_attention_layer(embedded):
    # The shipped attnseg.json must name presets whose self-attention layer exists in this model and keeps an
    # object cell's attention on its object well above uniform (lift 1; the chosen layer measured about 5).
    from attnseg.methods import get_method, resolve
    from attnseg.train.embedded.diagnose import self_attention_report

    assert embedded.default_presets == dict.fromkeys(
        ("cross", "t2m", "iseg", "diffseg", "diffseg-iseg", "interactive"), "embedded"
    )
    chosen = {"t2m": "up_blocks.2.attentions.0", "iseg": "down_blocks.0.attentions.0"}  # on validation scenes
    interactive = resolve("interactive", "embedded")[2].self_layer.resolve(embedded.inventory)
    assert [lay.name for lay in interactive] == [chosen["t2m"] + ".transformer_blocks.0.attn1"]
    baseline = get_method("cross", embedded.default_presets["cross"]).config.cross.resolve(embedded.inventory)
    assert [lay.name.split(".transformer_blocks")[0] for lay in baseline] == [
        f"up_blocks.{b}.attentions.{a}" for b in (1, 2) for a in (0, 1)
    ]
    for method in ("t2m", "iseg"):
        cfg = get_method(method, embedded.default_presets[method]).config
        (layer,) = cfg.self_layer.resolve(embedded.inventory)
        assert layer.name == chosen[method] + ".transformer_blocks.0.attn1", (method, layer.name)
        rep = self_attention_report(embedded.pipe, n=8, timesteps=(cfg.timestep,))  # the method's own timestep
        assert rep[f"t{cfg.timestep}/" + layer.name.replace(".transformer_blocks.0.attn1", "")]["lift"] > 2.5, (method, rep)


def test_diffseg_with_the_model_profile_finds_objects(embedded):
    # The profile's DiffSeg threshold splits scenes into segments that cover objects (best segment IoU per object
    # was 0.07-0.45, mean 0.34, on scenes 0-5 for the shipped model); the paper's threshold merges each scene
    # into one segment on this model.
    ious = []
    for i in range(6):
        sc = make_scene(1, i)
        seg = embedded.segment_unsupervised([sc.image])[0]
        assert len(np.unique(seg)) >= 2, i
        for obj in np.unique(sc.instance)[1:]:
            m = sc.instance == obj
            ious.append(max(((seg == k) & m).sum() / ((seg == k) | m).sum() for k in np.unique(seg)))
    assert np.mean(ious) > 0.2, ious


@pytest.mark.parametrize("method", ["t2m", "iseg"])
def test_refined_methods_give_masks_with_background_and_objects(embedded, method):
    sc = make_scene(1, 3)
    embedded.set_image(sc.image)
    r = embedded.segment(sc.labels, method=method, draws=1)
    assert r.mask.shape == sc.semantic.shape
    assert 0 < (r.mask > 0).mean() < 1


def test_caption_lowers_the_denoising_error(embedded):
    import torch

    from attnseg.shapes.world import caption

    pipe = embedded.pipe
    scenes = [make_scene(1, i) for i in range(16)]
    z0 = embedded.encode_images([s.image for s in scenes])
    rng = np.random.default_rng(0)
    caps = [caption(s.objects, rng) for s in scenes]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(scenes),), 400)
    zt = pipe.scheduler.add_noise(z0, noise, t)
    with torch.inference_mode():
        err = {}
        for name, texts in (("caption", caps), ("empty", [""] * len(caps))):
            pred = pipe.unet(zt, t, encoder_hidden_states=embedded.backbone.encode_prompts(texts).hidden).sample
            err[name] = float((pred - noise).pow(2).mean())
    assert err["caption"] < err["empty"] < 0.5, err


def test_text_layers_follow_the_model_being_continued(tmp_path):
    import torch

    from attnseg.train.embedded.train import TrainConfig, _text_layers

    cfg = TrainConfig(work=str(tmp_path))
    assert _text_layers(cfg, None, None) == 3
    assert _text_layers(cfg, 0, None) == 0
    assert (
        _text_layers(cfg, None, str(EMBEDDED_DIR))
        == json.loads((EMBEDDED_DIR / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    )
    torch.save({"config": {"text_layers": 0}}, tmp_path / "ckpt.pt")
    assert _text_layers(cfg, None, None) == 0
    with pytest.raises(SystemExit, match="new --work folder"):
        _text_layers(cfg, 3, None)
    # a new run started from another run's checkpoint keeps its depth, or drops layers, never adds them
    fresh = TrainConfig(work=str(tmp_path / "new"))
    (tmp_path / "src").mkdir()
    torch.save({"config": {"text_layers": 2}}, tmp_path / "src" / "ckpt.pt")
    source = str(tmp_path / "src" / "ckpt.pt")
    assert _text_layers(fresh, None, None, source) == 2
    assert _text_layers(fresh, 0, None, source) == 0
    with pytest.raises(SystemExit, match="2 or fewer"):
        _text_layers(fresh, 3, None, source)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from attnseg.train.embedded.train import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1e-3, warmup=10)
    assert learning_rate(cfg, 0, 0, None) == pytest.approx(1e-4)
    assert learning_rate(cfg, 500, 0, None) == pytest.approx(1e-3)
    assert learning_rate(cfg, 500, 0, 100) == pytest.approx(1e-3)  # decay asked for but lr_decay_steps = 0
    cfg.lr_decay_steps = 200
    assert learning_rate(cfg, 100, 0, 100) == pytest.approx(1e-3)
    assert learning_rate(cfg, 200, 0, 100) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert learning_rate(cfg, 300, 0, 100) == pytest.approx(1e-4)
    assert learning_rate(cfg, 10_000, 0, 100) == pytest.approx(1e-4)  # stays at the floor
    assert learning_rate(cfg, 105, 100, 100) == pytest.approx(1e-3 * 6 / 10, rel=2e-3)  # fresh warm-up still applies


def test_lr_decay_length_follows_the_run_being_continued():
    from attnseg.train.embedded.train import _lr_decay_steps

    assert _lr_decay_steps(None, None) == 0
    assert _lr_decay_steps(None, 500) == 500
    assert _lr_decay_steps({"lr_decay_steps": 0}, 500) == 500  # a constant-lr run may start decaying
    assert _lr_decay_steps({"lr_decay_steps": 3500}, None) == 3500
    assert _lr_decay_steps({"lr_decay_steps": 3500}, 3500) == 3500
    for asked in (1000, 0):  # a decay once begun keeps its length: no jump in lr
        with pytest.raises(SystemExit, match="decays over 3500 steps"):
            _lr_decay_steps({"lr_decay_steps": 3500}, asked)
    with pytest.raises(SystemExit, match=">= 0"):
        _lr_decay_steps(None, -1)


def test_training_loop_turns_a_termination_signal_into_a_stop_request():
    import os
    import signal

    from attnseg.train.embedded.train import _stop_requests

    before = signal.getsignal(signal.SIGTERM)
    with _stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the handler
        assert stop == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_model_card_states_the_learning_rate_schedule():
    from attnseg.train.embedded.release import _lr_text

    assert _lr_text({"lr": 3e-4}, []) == "0.0003"
    assert _lr_text({"lr": 3e-4}, [(None, 0), (9000, 0)]) == "0.0003"
    cfg = {"lr": 3e-4, "lr_decay_steps": 3500, "lr_floor": 0.1}
    assert _lr_text(cfg, [(None, 0), (9000, 3500)]) == "0.0003, cosine-decayed to 3e-05 over steps 9,000-12,500"
    three = _lr_text(cfg, [(9000, 3500), (12500, 2000), (14500, 4000)])
    assert three == (
        "0.0003, cosine-decayed to 3e-05 over steps 9,000-12,500, then re-warmed and decayed again over steps "
        "12,500-14,500 and 14,500-18,500"
    )
    meta = json.loads((EMBEDDED_DIR / "training.json").read_text())
    last = f"{meta['decay_from']:,}-{meta['decay_from'] + meta['train_config']['lr_decay_steps']:,}"
    assert last in (EMBEDDED_DIR / "README.md").read_text()  # the shipped card names the last decay


def test_model_card_history_drops_the_unet_of_runs_a_fresh_unet_did_not_continue():
    from attnseg.train.embedded.release import busy_seconds, lineage_log

    data = [{"stage": "data", "elapsed": 100.0}, {"stage": "vae", "step": 0, "psnr": 20.0, "elapsed": 50.0}]
    old_unet = [{"stage": "unet", "step": 50, "loss": 0.5, "elapsed": 1000.0}, {"stage": "diag", "step": 50}]
    # a later folder continues the old UNet: its whole history counts
    cont = [
        {"stage": "unet", "init_ckpt": "old/ckpt.pt", "step": 50},
        {"stage": "unet", "step": 100, "loss": 0.4, "elapsed": 30.0},
    ]
    assert lineage_log([data + old_unet, cont]) == data + old_unet + cont
    # a folder that trains its UNet from scratch on the old folder's data keeps only the data-side records
    fresh = [
        {"stage": "unet", "step": 50, "loss": 0.6, "elapsed": 20.0},
        {"stage": "unet", "step": 100, "loss": 0.3, "elapsed": 40.0},
    ]
    assert lineage_log([data + old_unet, fresh]) == data + fresh
    assert lineage_log([data + old_unet, cont, fresh]) == data + fresh
    assert lineage_log([data]) == data
    # a folder warm-started from a released pipeline folder starts a lineage too (the release's history is in its log)
    warm = [{"stage": "unet", "init_from": "shipped", "step": 100, "released_history": {"hours": 1.0}}, *cont[1:]]
    assert lineage_log([data + old_unet, warm]) == data + warm
    # compute time: the last 'elapsed' of each process (a drop starts a new one)
    assert busy_seconds(data + fresh) == 100.0 + 50.0 + 40.0
    assert busy_seconds(data + old_unet + cont) == 100.0 + 1000.0 + 30.0
    assert busy_seconds([]) == 0.0


def test_a_run_continued_from_a_released_model_carries_its_history_on():
    from attnseg.train.embedded.release import lineage_history

    released = {
        "runs": [{"step": 100, "colour_prob": 0.8, "look_prob": 0.0, "look_word_prob": 0.0, "decay": [50, 50]}],
        "hours": 2.0,
        "text_dropped_at": 30,
        "vae": {"steps": 1000, "psnr": 26.1},
    }
    run = {"step": 160, "colour_prob": 0.3, "look_prob": 0.3, "look_word_prob": 0.8, "decay": (100, 60)}
    # a warm start from the released folder: the shipped VAE kept (no PSNR logged), 0.5 h of data and UNet
    log = [
        {"stage": "data", "elapsed": 1080.0},
        {"stage": "vae", "init_from": "shipped"},
        {"stage": "unet", "init_from": "shipped", "step": 100, "released_history": released},
        {"stage": "unet", "step": 160, "loss": 0.03, "elapsed": 720.0},
    ]
    hist = lineage_history(released, [run], log)
    assert hist == {"runs": [*released["runs"], run], "hours": 2.5, "text_dropped_at": 30, "vae": released["vae"]}
    # a lineage from scratch: its own VAE and text-layer drop, nothing released before it
    own = [
        {"stage": "vae", "step": 499, "psnr": 24.0, "elapsed": 360.0},
        {"stage": "unet", "init_ckpt": "a/ckpt.pt", "step": 40, "dropped": 12},
    ]
    assert lineage_history(None, [run], own) == {
        "runs": [run],
        "hours": 0.1,
        "text_dropped_at": 40,
        "vae": {"steps": 500, "psnr": 24.0},
    }


def test_the_shipped_card_states_the_history_its_training_json_keeps():
    from attnseg.train.embedded.release import _lr_text, caption_history, looks_text

    meta = json.loads((EMBEDDED_DIR / "training.json").read_text())
    runs = meta["history"]["runs"]
    card = " ".join((EMBEDDED_DIR / "README.md").read_text().split())
    for line in (
        caption_history([(r["step"], r["colour_prob"]) for r in runs]),
        looks_text(runs),
        _lr_text(meta["train_config"], [r["decay"] for r in runs]),
        f"{meta['history']['hours']:.1f} h of compute",
        f"up to step {meta['history']['text_dropped_at']:,} the text encoder",
        f"PSNR {meta['history']['vae']['psnr']:.1f} dB",
    ):
        assert " ".join(line.split()) in card


def test_model_card_states_a_change_of_caption_mix():
    from attnseg.train.embedded.release import caption_history

    assert caption_history([(3500, 0.8), (12500, 0.8)]) == ""
    assert caption_history([]) == ""
    line = caption_history([(3500, 0.8), (12500, 0.8), (14500, 0.3)])
    assert (
        line
        == "- Caption mix by phase (share of objects named by colour and shape): 80% over steps 0-12,500; 30% over steps 12,500-14,500.\n"
    )


def test_unet_layout_follows_the_run_being_continued_and_builds_the_asked_blocks():
    from attnseg.train.embedded.arch import ToyArch, build_unet
    from attnseg.train.embedded.train import _unet_layout

    assert _unet_layout(None, None, None) == ((64, 128, 128), False)
    assert _unet_layout(None, "64,128", True) == ((64, 128), True)
    assert _unet_layout({}, None, None) == ((64, 128, 128), False)  # checkpoints older than the option
    run3 = {"unet_channels": (64, 128), "unet_cross_every_level": True}
    assert _unet_layout(run3, None, None) == ((64, 128), True)
    with pytest.raises(SystemExit, match="new --work folder"):
        _unet_layout(run3, "64,128,128", None)
    with pytest.raises(SystemExit, match="new --work folder"):
        _unet_layout(run3, None, False)
    for bad in ("64,x", "64,100", "64", "32,32,32,32,32"):
        with pytest.raises(SystemExit, match="--unet-channels"):
            _unet_layout(None, bad, None)

    small = dict(unet_heads=2, text_hidden=32)
    sd = build_unet(ToyArch(**small)).config
    assert sd.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert sd.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    every = build_unet(ToyArch(unet_channels=(32, 64), unet_cross_every_level=True, **small))
    assert every.config.down_block_types == ("CrossAttnDownBlock2D",) * 2
    assert every.config.up_block_types == ("CrossAttnUpBlock2D",) * 2
    cross = [k for k in every.attn_processors if k.endswith("attn2.processor")]
    assert len(cross) == 1 + 1 + 1 + 2 + 2  # two encoder levels, the mid block, two decoder levels of 2


def test_model_card_describes_the_unet_layout_it_ships():
    from attnseg.train.embedded.release import unet_layout_text

    sd_like = unet_layout_text(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "UNetMidBlock2DCrossAttn", 16)
    assert sd_like == (
        "CrossAttnDown (16 px), CrossAttnDown (8 px), Down (4 px), cross-attention mid block (4 px), mirrored up "
        "blocks; self- and cross-attention at 16 and 8 px and in the mid block"
    )
    two = unet_layout_text(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "UNetMidBlock2DCrossAttn", 16)
    assert two == (
        "CrossAttnDown (16 px), CrossAttnDown (8 px), cross-attention mid block (8 px), mirrored up blocks; "
        "self- and cross-attention at 16 and 8 px and in the mid block"
    )
    three = unet_layout_text(["CrossAttnDownBlock2D"] * 3, "UNetMidBlock2DCrossAttn", 32)
    assert three.endswith("at 32, 16 and 8 px and in the mid block")
    cfg = json.loads((EMBEDDED_DIR / "unet" / "config.json").read_text())
    shipped = unet_layout_text(cfg["down_block_types"], cfg["mid_block_type"], cfg["sample_size"])
    assert shipped in (EMBEDDED_DIR / "README.md").read_text()


def test_warm_start_sources_give_their_unet_layout_and_old_configs_rebuild_the_shipped_unet(tmp_path):
    import torch

    from attnseg.train.embedded.arch import build_unet
    from attnseg.train.embedded.train import _source_layout, _unet_layout, train_arch

    assert _source_layout(None, None) is None
    shipped = _source_layout(str(EMBEDDED_DIR), None)
    assert shipped == {"unet_channels": (64, 128, 128), "unet_cross_every_level": False}
    torch.save({"config": {"unet_channels": (64, 128), "unet_cross_every_level": True}}, tmp_path / "ckpt.pt")
    assert _unet_layout(_source_layout(None, str(tmp_path / "ckpt.pt")), None, None) == ((64, 128), True)
    with pytest.raises(SystemExit, match="fresh run"):
        _unet_layout(shipped, "64,128", True)
    # The shipped model's training config predates the layout fields: it must rebuild the UNet it ships.
    meta = json.loads((EMBEDDED_DIR / "training.json").read_text())
    rebuilt = build_unet(train_arch(meta["train_config"])).config
    cfg = json.loads((EMBEDDED_DIR / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "up_block_types", "mid_block_type"):
        assert json.loads(json.dumps(rebuilt[key])) == cfg[key], key


def test_shipped_card_and_profile_are_generated_from_the_method_configs(embedded):
    from attnseg.diffusion.loading import EMBEDDED_DIR
    from attnseg.train.embedded.release import presets_text
    from attnseg.train.embedded.train import EMBEDDED_PROFILE

    # Every preset value the card states is read from the registry's configs, and the shipped card says the same.
    assert presets_text(embedded.pipe.unet) in (EMBEDDED_DIR / "README.md").read_text()
    assert json.dumps(EMBEDDED_PROFILE, indent=1) + "\n" == (EMBEDDED_DIR / "attnseg.json").read_text()
