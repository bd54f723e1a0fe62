"""Grounded Diffusion: block features by hooks, the grounding module's maths, its data, training, evaluation and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attnseg.diffusion.features import block_features
from attnseg.grounder import PAPER_TEMPLATE
from attnseg.jobs.generate import item_seed
from attnseg.methods.grounding import (
    Grounded,
    GroundedConfig,
    GroundingConfig,
    GroundingModule,
    binary_masks,
    grounding_loss,
    label_map,
    mask_logits,
)
from attnseg.train.grounding.data import Block, DataConfig, Item, plan_test, plan_training
from attnseg.train.grounding.evaluate import group_scores, kept

# ----------------------------------------------------------------------------- block features


class _Down(nn.Module):
    """A down block as diffusers returns it: (hidden, (layer output, downsampled))."""

    def forward(self, x):
        h = nn.functional.avg_pool2d(x, 2)
        return h, (x, h)


class _Mid(nn.Module):
    def forward(self, x):
        return 10 * x


class _Up(nn.Module):
    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=2.0)


class _FakeUNet(nn.Module):
    """x (B, 1, 4, 4) constant c -> block outputs c at 4 px (down), c at 2 px (downsampled), 10c (mid, 2 px), 10c (up, 4 px)."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([_Down()])
        self.mid_block = _Mid()
        self.up_blocks = nn.ModuleList([_Up()])

    def forward(self, x):
        h, _ = self.down_blocks[0](x)
        return self.up_blocks[0](self.mid_block(h))


def _const(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()


def test_block_features_keep_the_last_call_grouped_by_side_and_remove_their_hooks():
    unet = _FakeUNet()
    with block_features(unet) as f:
        unet(_const(1.0))
        unet(_const(2.0))
    sides = f.by_side()
    assert f.calls == 2 and list(sides) == [2, 4]
    # side 2: the downsampled state (2), then the mid block (20); side 4: the layer output (2), then the up block (20)
    assert torch.equal(sides[2][0, :, 0, 0], torch.tensor([2.0, 20.0]))
    assert torch.equal(sides[4][0, :, 0, 0], torch.tensor([2.0, 20.0]))
    assert not unet._forward_pre_hooks and not any(b._forward_hooks for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks])


def test_block_features_at_a_chosen_step_and_conditional_rows():
    unet = _FakeUNet()
    with block_features(unet, at=0) as first:
        unet(_const(1.0))
        unet(_const(2.0))
    assert torch.equal(first.by_side()[4][0, :, 0, 0], torch.tensor([1.0, 10.0]))
    with block_features(unet, cond_rows="second_half") as cond:
        unet(_const(1.0, 3.0))  # [unconditional, conditional] rows of classifier-free guidance
    assert cond.by_side()[2].shape[0] == 1 and cond.by_side()[2][0, 1, 0, 0] == 30.0
    with block_features(unet, at=5) as late:
        unet(_const(1.0))
    with pytest.raises(ValueError, match="no block output"):
        late.by_side()


def test_block_features_of_the_tiny_unet(tiny_pipe):
    from attnseg.diffusion.loading import backbone_for

    bb = backbone_for(tiny_pipe)
    latents = torch.zeros(1, 4, 16, 16)
    with block_features(bb.denoiser) as f:
        bb.forward(latents, 10, bb.encode_prompts(["a red circle"]))
    # Channels (32, 64, 64), one layer per block: 16 px: down 0 (32) + up 1 (64) + up 2 (32); 8 px: down 0's
    # downsampler (32) + down 1 (64) + up 0 (64); 4 px: down 1's downsampler (64) + down 2 (64) + mid (64).
    assert {s: t.shape[1] for s, t in f.by_side().items()} == {4: 192, 8: 160, 16: 128}


# ----------------------------------------------------------------------------- the module's maths


def test_mask_logits_is_the_dot_product_of_pixel_features_and_mask_embeddings():
    visual = torch.tensor([[[[1.0, 0.0]], [[2.0, -1.0]]]])  # (1, D=2, 1, 2): pixels (1, 2) and (0, -1)
    emb = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])  # two classes
    assert torch.equal(mask_logits(visual, emb), torch.tensor([[[[3.0, -1.0]], [[4.0, -2.0]]]]))


def test_grounding_loss_averages_the_kept_masks_only():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 10.0
    targets = torch.ones(1, 2, 2, 2)
    ln2, tiny = math.log(2), math.log1p(math.exp(-10.0))  # BCE of logit 0 and of logit 10 with target 1
    assert grounding_loss(logits, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(ln2)
    assert grounding_loss(logits, targets, torch.tensor([[1.0, 1.0]])).item() == pytest.approx((ln2 + tiny) / 2)
    assert grounding_loss(logits, targets, torch.zeros(1, 2)).item() == 0.0
    assert torch.equal(binary_masks(torch.tensor([-0.1, 0.0, 0.1])), torch.tensor([False, False, True]))


def test_label_map_takes_the_most_confident_class_above_one_half():
    logits = torch.tensor([[[2.0, -1.0, 0.5]], [[1.0, -3.0, 3.0]]])  # 2 classes over 3 pixels
    assert torch.equal(label_map(logits), torch.tensor([[1, 0, 2]]))


def test_grounded_labels_are_the_label_map_of_the_logits():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -0.2]], [[1.0, -3.0, 3.0, -0.1]]])
    labels = Grounded(GroundedConfig()).labels(torch.sigmoid(logits))
    assert labels.dtype == torch.uint8 and torch.equal(labels, torch.tensor([[1, 0, 2, 0]], dtype=torch.uint8))


SMALL = GroundingConfig(
    sides=(2, 4), in_channels=(3, 5), text_dim=6, image_size=8, base_channels=4, patch=2, width=16, heads=2, ffn=16
)


def test_module_shapes_and_padding_queries_do_not_change_the_others():
    torch.manual_seed(0)
    module = GroundingModule(SMALL).eval()
    feats = {2: torch.randn(1, 3, 2, 2), 4: torch.randn(1, 5, 4, 4)}
    assert module.visual(feats).shape == (1, SMALL.fused_channels, 4, 4) and SMALL.fused_channels == 4 + 8
    q = torch.randn(1, 2, 6)
    alone = module(feats, q[:, :1], torch.tensor([[False]]))
    padded = module(feats, q, torch.tensor([[False, True]]))
    assert padded.shape == (1, 2, 8, 8)
    assert torch.allclose(padded[:, :1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        module({2: feats[2]}, q)


# ----------------------------------------------------------------------------- data


def test_training_prompts_use_the_paper_template_over_seen_classes_only():
    cfg = DataConfig(kind="train", classes=("circle", "square", "star"), count=40, model="m", attributes=("red", "blue", "green"))
    items = plan_training(cfg)
    assert items == plan_training(cfg)  # deterministic by seed
    assert {len(it.labels) for it in items} == {1, 2}
    for it in items:
        assert set(it.labels) <= set(cfg.classes) and len(set(it.labels)) == len(it.labels)
        colours = [it.prompt.split(" ")[it.prompt.split(" ").index(lab) - 1] for lab in it.labels]
        assert len(set(colours)) == len(colours) and set(colours) <= set(cfg.attributes)
        assert it.prompt == PAPER_TEMPLATE.join([f"{c} {lab}" for c, lab in zip(colours, it.labels, strict=True)])[0]
        assert it.seed == item_seed(0, it.index)
    assert items[0].prompt.startswith("a photograph of a ")


def test_test_prompts_cover_every_class_and_pair():
    items = plan_test(DataConfig(kind="test", classes=("a", "b", "c"), count=2, model="m", seed=1))
    assert len(items) == 3 * 2 + 3 * 2
    singles = [it.labels[0] for it in items if len(it.labels) == 1]
    pairs = [frozenset(it.labels) for it in items if len(it.labels) == 2]
    assert sorted(singles) == ["a", "a", "b", "b", "c", "c"]
    assert {p: pairs.count(p) for p in set(pairs)} == {frozenset("ab"): 2, frozenset("ac"): 2, frozenset("bc"): 2}
    assert items[0].prompt == "a photograph of a a"


def test_the_baseline_is_attnseg_generate_ca_on_the_very_same_images(tiny_pipe):
    from attnseg.diffusion.loading import backbone_for
    from attnseg.generator import generate_with_masks
    from attnseg.train.grounding.data import generate_block

    bb = backbone_for(tiny_pipe)
    cfg = DataConfig(kind="train", classes=("circle", "square"), count=3, model="m", attributes=("red", "blue"), steps=2)
    items = plan_training(cfg)
    block = generate_block(bb, items, cfg)
    ref = generate_with_masks(
        bb,
        [it.prompt for it in items],
        [it.labels for it in items],
        method="ca",
        generators=[torch.Generator().manual_seed(it.seed) for it in items],
        steps=2,
        guidance=5.0,
    )
    assert np.array_equal(block.images.numpy(), np.stack([g.image for g in ref]))
    assert np.array_equal(block.baselines["baseline"].numpy(), np.stack([g.mask for g in ref]))
    assert set(block.baselines) == {"baseline", "baseline_decoder"} and list(block.features) == [4, 8, 16]


def test_the_shape_checked_oracle_misses_objects_of_the_wrong_shape():
    from attnseg.shapes.world import COLOURS
    from attnseg.train.grounding.oracles import ShapeCheckedDetector

    image = np.full((64, 64, 3), 128, np.uint8)
    image[20:44, 20:44] = COLOURS["red"]  # a red square of 24 x 24 pixels
    detect = ShapeCheckedDetector()
    assert detect(image, "red square").sum() > 500
    assert not detect(image, "red ring").any() and not detect(image, "blue square").any()


# ----------------------------------------------------------------------------- evaluation


def _block(items, oracle, baseline) -> Block:
    n = len(items)
    return Block(
        items,
        {},
        torch.zeros(n, 2, 2, 3, dtype=torch.uint8),
        {"baseline": torch.tensor(baseline, dtype=torch.uint8)},
        torch.tensor(oracle, dtype=torch.bool),
    )


def test_group_scores_on_hand_made_masks():
    items = [Item(0, "p", ["a"], 0), Item(1, "p", ["a", "z"], 0), Item(2, "p", ["z"], 0)]
    oracle = [
        [[[1, 1], [0, 0]], [[0, 0], [0, 0]]],
        [[[1, 0], [0, 0]], [[0, 0], [0, 1]]],
        [[[0, 0], [0, 0]], [[0, 0], [0, 0]]],  # the detector found nothing: the item is dropped
    ]
    baseline = [[[1, 1], [1, 0]], [[1, 0], [0, 2]], [[0, 0], [0, 0]]]
    data = _block(items, oracle, baseline)
    index = kept(data)
    assert index == [0, 1]
    module = {0: np.array([[[1, 0], [0, 0]]], bool), 1: np.array([[[1, 0], [0, 0]], [[0, 0], [1, 1]]], bool)}
    base = {i: np.stack([data.baselines["baseline"][i].numpy() == k + 1 for k in range(len(items[i].labels))]) for i in index}
    scores, per_class, counts = group_scores(data, index, {"module": module, "baseline": base}, seen=["a"])
    # one seen: a 1/2 (module), 2/3 (baseline); two, seen+unseen: a 1 and z 1/2 (module), both 1 (baseline)
    assert scores["module"] == {"seen": {"one": 50.0}, "seen+unseen": {"two": 75.0}}
    assert scores["baseline"] == {"seen": {"one": 66.67}, "seen+unseen": {"two": 100.0}}
    assert per_class["module"]["seen+unseen"]["two"] == {"a": 100.0, "z": 50.0}
    assert counts == {"seen": {"one": 1}, "seen+unseen": {"two": 1}}


# ----------------------------------------------------------------------------- training, the API and the CLI


def _half_detector(_spec):
    """A detector for random-weight images: the left half for the first object, the right half for the second."""

    def detect(image, phrase):
        m = np.zeros(image.shape[:2], bool)
        half = image.shape[1] // 2
        if phrase.startswith("red"):
            m[:, :half] = True
        else:
            m[:, half:] = True
        return m

    return detect


@pytest.fixture
def half_detector(monkeypatch):
    monkeypatch.setattr("attnseg.train.grounding.data.load_detector", _half_detector)


def test_training_resumes_exactly_and_the_grounder_segments(tiny_pipe, tmp_path, half_detector):
    from attnseg.diffusion.loading import backbone_for
    from attnseg.grounder import Grounder, GroundingError
    from attnseg.train.grounding.train import TrainConfig, train_grounding

    bb = backbone_for(tiny_pipe)
    data = DataConfig(
        kind="train", classes=("circle", "square"), count=4, model=bb.model_name, attributes=("red", "blue"), steps=2, block=2
    )
    cfg = TrainConfig(steps=6, batch=2, ckpt_every=2)
    whole = train_grounding(bb, tmp_path / "whole", data, cfg, data_dir=tmp_path / "data", progress=False)
    part = train_grounding(bb, tmp_path / "part", data, cfg, data_dir=tmp_path / "data", progress=False, stop_after=3)
    assert not part["finished"] and (tmp_path / "part" / "checkpoint.safetensors").exists()
    part = train_grounding(bb, tmp_path / "part", data, cfg, data_dir=tmp_path / "data", progress=False)
    assert whole["finished"] and part["finished"] and not (tmp_path / "part" / "checkpoint.safetensors").exists()
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GroundingError, match="other settings"):
        train_grounding(bb, tmp_path / "whole", data, TrainConfig(steps=7), data_dir=tmp_path / "data", progress=False)

    g = Grounder.from_folder(bb, tmp_path / "whole")
    [item] = g.generate(["a photograph of a red circle"], [["circle"]], steps=2)
    assert item.image.shape == (64, 64, 3) and item.probs.shape == (1, 64, 64) and item.masks.dtype == bool
    real = g.segment(np.zeros((32, 48, 3), np.uint8), ["circle", "ring"])  # ring: a word never seen in training
    assert real.probs.shape == (2, 32, 48) and real.prompt == "a photograph of a circle and a ring"


def test_cli_train_then_eval_writes_the_report(tiny_pipe_dir, tmp_path, half_detector):
    from typer.testing import CliRunner

    from attnseg.train.grounding.command import grounding_app

    model = ["--model", str(tiny_pipe_dir)]
    args = ["train", "--seen", "circle", "--seen", "square", "--out", str(tmp_path / "m"), "--n", "4", "--steps", "2"]
    r = CliRunner().invoke(grounding_app, [*args, "--gen-steps", "2", "--batch", "2", *model])
    assert r.exit_code == 0, r.output
    assert "trained on 4 images" in r.output and (tmp_path / "m" / "model.safetensors").exists()
    ev = ["eval", "--out", str(tmp_path / "r"), "--module", str(tmp_path / "m"), "--n", "1", "--classes", "circle,square,star"]
    r = CliRunner().invoke(grounding_app, [*ev, *model])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # seen circle, square; unseen star: one class (seen, unseen), two (both seen, one of each); no two-unseen pair
    for src in ("module", "baseline", "baseline_decoder"):
        assert set(report[src]) == {"seen", "unseen", "seen+unseen"}
        assert set(report[src]["seen"]) == {"one", "two"} and set(report[src]["seen+unseen"]) == {"two"}
        assert all(0 <= v <= 100 for g in report[src].values() for v in g.values())
    assert report["items"]["generated"] == 6 and report["settings"]["unseen"] == ["star"]
    for masks in ("module", "oracle"):
        gen = ["generate", "--out", str(tmp_path / masks), "--module", str(tmp_path / "m"), "--n", "1", "--masks", masks]
        r = CliRunner().invoke(grounding_app, [*gen, "--classes", "circle,square,star", "--data", str(tmp_path / "p2"), *model])
        assert r.exit_code == 0, r.output
        assert len((tmp_path / masks / "manifest.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "oracle" / "classes.txt").read_text().split() == ["background", "circle", "square", "star"]
    r = CliRunner().invoke(grounding_app, [*ev, "--seed", "0", *model])
    assert r.exit_code == 2 and "training seed" in r.output
    r = CliRunner().invoke(grounding_app, ["eval", "--out", str(tmp_path / "r2"), "--module", str(tmp_path / "none"), *model])
    assert r.exit_code == 2 and "no trained grounding module" in r.output


def test_attnseg_generate_method_grounding_writes_the_modules_masks(tiny_pipe_dir, tmp_path, half_detector):
    from PIL import Image
    from typer.testing import CliRunner

    from attnseg.cli import app
    from attnseg.diffusion.loading import load_backbone
    from attnseg.grounder import Grounder

    model = ["--model", str(tiny_pipe_dir)]
    args = ["grounding", "train", "--seen", "circle,square", "--out", str(tmp_path / "m"), "--n", "2", "--steps", "2"]
    r = CliRunner().invoke(app, [*args, "--gen-steps", "2", "--batch", "2", *model])
    assert r.exit_code == 0, r.output
    gen = ["generate", "--out", str(tmp_path / "g"), "-c", "circle,star", "--per-class", "1", "--steps", "2", *model]
    r = CliRunner().invoke(app, [*gen, "--method", "grounding", "--module", str(tmp_path / "m"), "--cpu-threads", "1"])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "g" / "run.json").read_text())
    assert run["guidance"] == GroundedConfig().guidance and run["extra"]["module"] == str((tmp_path / "m").resolve())
    # the very masks of the Python API on the same seeds: the module's label map of each generated image
    g = Grounder.from_folder(load_backbone(str(tiny_pipe_dir), device="cpu", dtype="float32"), tmp_path / "m")
    torch.set_num_threads(1)
    gens = [torch.Generator().manual_seed(item_seed(0, i)) for i in range(2)]
    items = g.generate(["a photo of a circle", "a photo of a star"], [["circle"], ["star"]], gens, steps=2, guidance=5.0)
    for i, it in enumerate(items):
        mask = np.array(Image.open(tmp_path / "g" / "masks" / f"{i:06d}.png"))
        assert np.array_equal(mask, np.where(it.masks[0], 1 + i, 0))
    r = CliRunner().invoke(app, [*gen[:2], str(tmp_path / "g2"), *gen[3:], "--method", "ca", "--module", str(tmp_path / "m")])
    assert r.exit_code == 2 and "takes none" in r.output
    r = CliRunner().invoke(app, [*gen[:2], str(tmp_path / "g3"), *gen[3:], "--method", "grounding"])  # the shipped module
    assert r.exit_code == 2 and "train a module for this model" in r.output
    assert not (tmp_path / "g3" / "run.json").exists()  # refused before the run started


def test_attnseg_segment_method_grounding_writes_the_modules_label_map(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from attnseg.cli import app
    from attnseg.diffusion.loading import load_backbone
    from attnseg.grounder import Grounder
    from attnseg.io.images import load_image

    scenes = tmp_path / "scenes"
    assert CliRunner().invoke(app, ["shapes", "export", str(scenes), "--n", "2", "--seed", "1"]).exit_code == 0
    args = ["segment", str(scenes / "JPEGImages"), "--labels-file", str(scenes / "labels.json"), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--method", "grounding", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "2 segmented" in r.output
    # The shipped module's label map of each image (probability above one half, the most probable label), as the
    # Python API gives it.
    g = Grounder.from_folder(load_backbone(None, device="cpu", dtype="float32"))
    table = json.loads((scenes / "labels.json").read_text())
    for name, labels in table.items():
        stem = Path(name).stem
        item = g.segment(load_image(scenes / "JPEGImages" / name), labels)
        want = np.where(item.probs.max(0) > 0.5, item.probs.argmax(0) + 1, 0)
        assert want.any()  # the module finds something in every scene
        assert np.array_equal(np.array(Image.open(tmp_path / "out" / f"{stem}.png")), want)
        meta = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert meta["method"] == "grounding" and meta["labels"] == labels and meta["settings"]["module"].endswith("grounding")
    r = CliRunner().invoke(app, [*args, "--method", "grounding", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0 and "0 segmented, 2 already done" in r.output
    r = CliRunner().invoke(app, [*args, "--method", "grounding", "--preset", "voc", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no presets" in r.output
    r = CliRunner().invoke(app, [*args, "--module", str(tmp_path / "m"), "--out", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "--method grounding" in r.output
    r = CliRunner().invoke(app, [*args, "--method", "grounding", "--draws", "2", "--out", str(tmp_path / "o4")])
    assert r.exit_code == 2 and "drop --draws" in r.output and not (tmp_path / "o4").exists()


def test_attnseg_eval_scores_the_grounding_modules_label_maps(tmp_path):
    from typer.testing import CliRunner

    from attnseg.cli import app
    from attnseg.diffusion.loading import load_backbone
    from attnseg.grounder import Grounder
    from attnseg.io.datasets import VOCDataset
    from attnseg.io.images import load_image
    from attnseg.ops.metrics import confusion, summarize

    scenes = tmp_path / "scenes"
    assert CliRunner().invoke(app, ["shapes", "export", str(scenes), "--n", "3", "--seed", "1"]).exit_code == 0
    r = CliRunner().invoke(app, ["eval", str(scenes), "-m", "grounding", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    # The report's mIoU is that of the module's label maps (as `segment --method grounding` writes them) in the
    # dataset's class ids, over the ground truth's labels of each scene.
    g = Grounder.from_folder(load_backbone(None, device="cpu", dtype="float32"))
    ds = VOCDataset(scenes)
    classes = list(ds.classes)
    conf = np.zeros((len(classes),) * 2, np.int64)
    for sid in ds.ids:
        sample = ds.sample(sid)
        labels = [classes[i] for i in sorted(set(np.unique(sample.gt)) - {0, 255})]
        res = g.segment_result(load_image(sample.image_path), labels)
        lut = np.array([0] + [classes.index(x) for x in labels], np.uint8)
        conf += confusion(sample.gt, lut[res.mask], len(classes))
    assert rep["methods"]["grounding"]["miou"] == pytest.approx(summarize(conf, classes)["miou"])
    # The cache records the module's weights: another module's predictions are not mixed into it.
    import shutil

    from safetensors.torch import load_file, save_file

    from attnseg.grounder import SHIPPED

    other = tmp_path / "other-module"
    shutil.copytree(SHIPPED, other)
    weights = load_file(str(other / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(other / "model.safetensors"))
    args = ["eval", str(scenes), "-m", "grounding", "--device", "cpu", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(app, [*args, "--module", str(other)])
    assert r.exit_code == 2 and "other settings" in r.output
    r = CliRunner().invoke(app, ["eval", str(scenes), "-m", "grounding:paper", "--device", "cpu", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "no presets" in r.output
    r = CliRunner().invoke(app, ["eval", str(scenes), "-m", "cross", "--module", str(tmp_path), "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "-m grounding" in r.output
