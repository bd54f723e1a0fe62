"""The SDXL backbone: two text encoders and added conditioning behind the same interface as SD 1.x."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from attnseg.cli import app

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from attnseg.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from attnseg.predictor import AttnSegPredictor

    return AttnSegPredictor.from_pretrained(sdxl_dir, device="cpu", dtype="float32")


def test_text_states_carry_the_pooled_embedding_and_size_conditioning(sdxl):
    bb = sdxl.backbone
    assert bb.family == "sdxl" and bb.native_resolution == 64
    text = bb.encode_prompts(["a red circle", "a blue star"])
    assert text.hidden.shape == (2, 77, 64)  # both encoders' states, concatenated
    assert text.added["text_embeds"].shape == (2, 32)
    assert text.added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # original = target size, no crop
    # The pipeline's own encoding, row for row.
    states, _, pooled, _ = bb.pipe.encode_prompt(prompt=["a blue star"], device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(text.hidden[1], states[0]) and torch.allclose(text.added["text_embeds"][1], pooled[0])


def test_capture_leaves_the_unet_output_unchanged(sdxl):
    bb = sdxl.backbone
    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, 4, 16, 16), generator=g)
    text = bb.encode_prompts(["a red circle", "a blue star"])
    t = torch.tensor([150, 150])
    with torch.no_grad():
        ref = bb.pipe.unet(z, t, encoder_hidden_states=text.hidden, added_cond_kwargs=text.added).sample
    names = [lay.name for lay in bb.layers]
    assert any(".transformer_blocks.1.attn2" in n for n in names)  # SDXL's several transformer layers per block
    store = bb.forward(z, 150, text, names)
    with torch.no_grad():
        again = bb.pipe.unet(z, t, encoder_hidden_states=text.hidden, added_cond_kwargs=text.added).sample
    assert torch.equal(ref, again)
    assert set(store.sums) == set(names)


def test_segment_and_generate_on_an_sdxl_folder(sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = CliRunner()
    assert run.invoke(app, ["shapes", "export", "sc", "--n", "1", "--seed", "1"]).exit_code == 0
    r = run.invoke(
        app,
        [
            "segment",
            "sc/JPEGImages",
            "--labels-file",
            "sc/labels.json",
            "--model",
            str(sdxl_dir),
            "--method",
            "iseg",
            "--out",
            "seg",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "seg" / "shapes_1_000000.json").read_text())["method"] == "iseg"
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
            "ca-sa",
            "--model",
            str(sdxl_dir),
            "--out",
            "gen",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "gen" / "masks" / "000000.png").exists()


def test_pipelines_built_on_a_family_are_read_by_its_backbone(tiny_pipe, sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from attnseg.diffusion.loading import backbone_for
    from attnseg.diffusion.unet import SDXLBackbone, UNetBackbone

    class MySD(StableDiffusionPipeline):
        pass

    class MyXL(StableDiffusionXLPipeline):
        pass

    assert type(backbone_for(MySD(**tiny_pipe.components))) is UNetBackbone
    assert type(backbone_for(MyXL(**sdxl.pipe.components))) is SDXLBackbone


def test_sdxl_size_conditioning_follows_the_latents(sdxl, monkeypatch):
    bb = sdxl.backbone
    seen = []
    orig = bb.pipe.unet.forward
    monkeypatch.setattr(
        bb.pipe.unet, "forward", lambda *a, **kw: seen.append(kw["added_cond_kwargs"]["time_ids"]) or orig(*a, **kw)
    )
    bb.forward(torch.zeros((1, 4, 8, 8)), 150, bb.encode_prompts(["a red circle"]))
    assert seen[0].tolist() == [[32, 32, 0, 0, 32, 32]]  # 8-px latents of a 4x VAE: a 32-px image
    bb.forward(torch.zeros((1, 4, 8, 12)), 150, bb.encode_prompts(["a red circle"]))
    assert seen[1].tolist() == [[32, 48, 0, 0, 32, 48]]  # (height, width), as the pipeline's original and target sizes
