"""Protocol II: `attnseg train-segmenter` learns, resumes exactly, refuses bad folders; `eval --segmenter` scores it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.io.datasets import VOCDataset
from attnseg.io.images import palette_png
from attnseg.jobs.evaluate import evaluate
from attnseg.segnet import Segmenter, SegmenterError, SegNet
from attnseg.train.segmenter import SegmenterConfig, augment, train_segmenter


def _save(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    (palette_png(arr) if palette else Image.fromarray(arr.astype(np.uint8))).save(path)


def _generated(root, n=6, side=16):
    """A folder as `attnseg generate` writes it: a red square (class 1) and a blue bar (class 2) on grey."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = np.full((side, side, 3), 120, np.uint8)
        mask = np.zeros((side, side), np.uint8)
        y, x = rng.integers(0, side - 6, 2)
        img[y : y + 6, x : x + 6] = (230, 30, 30)
        mask[y : y + 6, x : x + 6] = 1
        c = int(rng.integers(0, side - 3))
        img[:, c : c + 3] = (30, 30, 230)
        mask[:, c : c + 3] = 2
        mask[0, 0] = 255  # uncertain pixels are ignored by the loss
        _save(root / "images" / f"{i:06d}.png", img)
        _save(root / "masks" / f"{i:06d}.png", mask, palette=True)
        lines.append(
            json.dumps(
                {
                    "id": f"{i:06d}",
                    "index": i,
                    "prompt": "p",
                    "labels": ["square"],
                    "seed": 0,
                    "image": f"images/{i:06d}.png",
                    "mask": f"masks/{i:06d}.png",
                }
            )
        )
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("background\nsquare\nbar\n")
    return root


CFG = SegmenterConfig(steps=40, batch=4, lr=5e-3, width=8, size=16, ckpt_every=10)


def test_augment_identity_and_flip_on_hand_made_batch():
    img = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    mask = torch.arange(16).reshape(1, 4, 4) % 3
    g = torch.Generator().manual_seed(0)
    out_i, out_m = augment(img, mask, g, min_scale=1.0, vflip=False)
    # scale 1: either unchanged or mirrored left-right, image and mask alike
    if torch.equal(out_m, mask):
        assert torch.allclose(out_i, img, atol=1e-5)
    else:
        assert torch.equal(out_m, mask.flip(-1))
        assert torch.allclose(out_i, img.flip(-1), atol=1e-5)


def test_segmenter_learns_and_resumes_exactly(tmp_path):
    data = _generated(tmp_path / "gen")
    torch.set_num_threads(1)
    rec = train_segmenter(data, tmp_path / "a", CFG, progress=False)
    assert rec["finished"] and rec["classes"] == ["background", "square", "bar"]
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    part = train_segmenter(data, tmp_path / "b", CFG, progress=False, stop_after=15)
    assert not part["finished"] and (tmp_path / "b" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    train_segmenter(data, tmp_path / "b", CFG, progress=False)
    a, b = Segmenter.load(tmp_path / "a"), Segmenter.load(tmp_path / "b")
    for (k, va), vb in zip(a.net.state_dict().items(), b.net.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    # it learned: on a training image it finds the square and the bar far better than all-background
    img = np.asarray(Image.open(data / "images" / "000000.png"))
    gt = np.asarray(Image.open(data / "masks" / "000000.png"))
    pred = a.predict(img)
    acc = float((pred == gt)[gt != 255].mean())
    assert acc > float((gt == 0)[gt != 255].mean()) + 0.1
    # already trained: a no-op; other settings: refused
    assert train_segmenter(data, tmp_path / "a", CFG, progress=False)["finished"]
    with pytest.raises(SegmenterError, match="other settings"):
        train_segmenter(data, tmp_path / "a", SegmenterConfig(steps=41, batch=4, width=8, size=16), progress=False)


def test_segmenter_bad_input(tmp_path):
    with pytest.raises(SegmenterError, match="does not exist"):
        train_segmenter(tmp_path / "nope", tmp_path / "m", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegmenterError, match="neither"):
        train_segmenter(tmp_path / "empty", tmp_path / "m", CFG)
    data = _generated(tmp_path / "gen", n=2)
    _save(data / "masks" / "000001.png", np.full((16, 16), 7), palette=True)
    with pytest.raises(SegmenterError, match=r"beyond classes\.txt"):
        train_segmenter(data, tmp_path / "m", CFG, progress=False)
    with pytest.raises(SegmenterError, match="not a trained segmenter"):
        Segmenter.load(tmp_path / "m")


class _LeftHalf(torch.nn.Module):
    """Logits favouring class 2 on the left half of the input, class 0 elsewhere."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        out[:, 2, :, : x.shape[-1] // 2] = 1
        out[:, 0, :, x.shape[-1] // 2 :] = 1
        return out


def test_eval_scores_a_segmenter_by_class_name(voc, tmp_path, monkeypatch):
    # dataset classes: background, cat, dog. The segmenter's classes: background, dog, cat (other order).
    model = tmp_path / "seg"
    model.mkdir()
    from safetensors.torch import save_file

    net = SegNet(3, 8)
    save_file(net.state_dict(), str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"classes": ["background", "dog", "cat"], "config": {"width": 8, "size": 4}}))
    import attnseg.segnet as segmod

    orig = segmod.Segmenter.load

    def load(folder):
        s = orig(folder)
        s.net = _LeftHalf()
        return s

    monkeypatch.setattr(segmod.Segmenter, "load", load)
    rep = evaluate(None, VOCDataset(voc), [], tmp_path / "rep", segmenters=[model], progress=False)
    # Predicted "cat" (segmenter id 2) on the left half of both images, background on the right.
    # a: gt cat on the left -> cat TP 4, bg TP 4. b: left 4 px are bg predicted cat (FP), right: bg 1 TP,
    # dog 2 px predicted bg (FN), 1 px ignored. cat IoU 4/8, bg IoU 5/(5+4+2) , dog 0/2.
    m = rep["methods"]["segmenter-seg"]
    assert m["per_class"]["cat"] == pytest.approx(4 / 8)
    assert m["per_class"]["background"] == pytest.approx(5 / 11)
    assert m["per_class"]["dog"] == 0.0
    assert m["miou"] == pytest.approx((4 / 8 + 5 / 11 + 0) / 3)


def test_eval_refuses_a_segmenter_with_unknown_classes(tmp_path):
    model = tmp_path / "seg"
    model.mkdir()
    from safetensors.torch import save_file

    save_file(SegNet(2, 8).state_dict(), str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"classes": ["background", "zebra"], "config": {"width": 8, "size": 4}}))
    seg = Segmenter.load(model)
    with pytest.raises(SegmenterError, match="zebra"):
        seg.lut_to(["background", "cat"])


def test_cli_train_segmenter_then_eval(tmp_path):
    from typer.testing import CliRunner

    from attnseg.cli import app

    data = _generated(tmp_path / "gen")
    args = ["train-segmenter", str(data), "--out", str(tmp_path / "m"), "--steps", "3", "--batch", "2", "--width", "8"]
    r = CliRunner().invoke(app, [*args, "--size", "16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model.safetensors").exists()
    r = CliRunner().invoke(app, [*args, "--size", "32"])
    assert r.exit_code == 2 and "other settings" in r.output
    r = CliRunner().invoke(app, ["eval", str(data), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "--method" in r.output
    r = CliRunner().invoke(app, ["train-segmenter", str(tmp_path / "none"), "--out", str(tmp_path / "m2")])
    assert r.exit_code == 2 and "does not exist" in r.output
