"""The shipped embedded model: loads as a Stable Diffusion pipeline and gives sane masks."""

from __future__ import annotations

import numpy as np
import pytest

from attnseg.data.shapes import make_scene
from attnseg.models import EMBEDDED_DIR, embedded_model_path


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


@pytest.mark.parametrize("method", ["cross", "t2m", "iseg"])
def test_sane_masks_on_fixed_scenes(embedded, method):
    # Foreground IoU on 12 fixed held-out scenes: a loose bound that a broken model file cannot meet.
    ious = []
    for i in range(12):
        sc = make_scene(1, i)
        embedded.set_image(sc.image)
        r = embedded.segment(sc.labels, method=method, draws=1)
        ious.append(_fg_iou(r.mask, sc.semantic))
    assert np.mean(ious) > FG_IOU_BOUND, ious


FG_IOU_BOUND = 0.3
