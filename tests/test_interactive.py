"""Interactive segmentation: prompts to initial maps, Ent-Self refinement on hand-made maps, the CLI on held-out scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli import app
from attnseg.diffusion.capture import AttentionStore
from attnseg.methods.base import CapturePlan
from attnseg.methods.interactive import Interactive, InteractiveConfig, VisualPrompt, clip_to_boxes, initial_maps
from attnseg.shapes.world import make_scene


def test_initial_maps_of_a_point_a_box_and_a_scribble():
    # A 40 x 80 image (H x W) on a 4 x 4 grid: cells are 10 rows by 20 columns.
    scribble = np.zeros((40, 80), bool)
    scribble[0:10, 0:10] = True  # half of cell (0, 0)
    prompts = [VisualPrompt(points=((79.0, 39.0),)), VisualPrompt(box=(25.0, 12.0, 45.0, 19.0)), VisualPrompt(scribble=scribble)]
    m = initial_maps(prompts, (40, 80), (4, 4)).reshape(4, 4, 3)
    assert m[..., 0].sum() == 1 and m[3, 3, 0] == 1  # the last pixel is in the last cell
    want_box = torch.zeros((4, 4))
    want_box[1, 1:3] = 1  # rows 12-19 are in row 1; columns 25-45 touch columns 1 and 2
    assert torch.equal(m[..., 1], want_box)
    assert m[0, 0, 2] == 0.5 and m[..., 2].sum() == 0.5


def test_prompts_are_checked_against_the_image():
    with pytest.raises(ValueError, match="outside the 80x40 image"):
        VisualPrompt(points=((80.0, 0.0),)).check((40, 80))
    with pytest.raises(ValueError, match="X0<=X1"):
        VisualPrompt(box=(30.0, 0.0, 10.0, 5.0)).check((40, 80))
    with pytest.raises(ValueError, match="marks no pixel"):
        VisualPrompt(scribble=np.zeros((40, 80), bool)).check((40, 80))
    with pytest.raises(ValueError, match="one of points, a box or a scribble"):
        _ = VisualPrompt(points=((1.0, 1.0),), box=(0.0, 0.0, 1.0, 1.0)).kind
    assert [VisualPrompt(points=((1.0, 1.0),)).label(1), VisualPrompt(box=(0, 0, 1, 1), name="cup").label(2)] == [
        "point 1",
        "cup",
    ]


def test_a_point_in_one_block_of_a_block_diagonal_self_map_selects_that_block():
    # 4 x 4 grid; pixels of the left half attend (uniformly) to the left half only, the right half to the right.
    left = torch.tensor([c < 2 for r in range(4) for c in range(4)])
    a = (left[:, None] == left[None, :]).float()
    a = a / a.sum(dim=1, keepdim=True)
    store = AttentionStore()
    store.add("s", a[None])
    plan = CapturePlan(cross={}, self_names=["s"], grid=(4, 4))
    init = initial_maps([VisualPrompt(points=((0.0, 0.0),)), VisualPrompt(points=((3.0, 3.0),))], (4, 4), (4, 4))
    sc = Interactive(InteractiveConfig(iters=2, bg_threshold=0.5)).scores(store, init[None], plan)[0]  # (P, 3)
    assert torch.allclose(sc[:, 0], torch.full((16,), 0.5))  # the constant background threshold
    assert torch.equal(sc[:, 1] > 0.5, left) and torch.equal(sc[:, 2] > 0.5, ~left)
    assert torch.equal(sc.argmax(dim=1), torch.where(left, 1, 2))


def test_clip_to_boxes_zeroes_a_box_object_outside_its_box_only():
    scores = torch.ones((3, 4, 5))
    out = clip_to_boxes(scores, [VisualPrompt(box=(1.0, 1.0, 2.0, 3.0)), VisualPrompt(points=((0.0, 0.0),))])
    assert out[1].sum() == 2 * 3 and out[1, 1:4, 1:3].eq(1).all()
    assert out[0].eq(1).all() and out[2].eq(1).all()  # background and the point's object untouched


@pytest.mark.parametrize(("scene", "points"), [(0, ["47,21", "45,34"]), (5, ["32,51", "36,43"])])
def test_a_point_inside_each_object_of_a_held_out_scene_gives_its_mask_from_the_cli(tmp_path, scene, points):
    sc = make_scene(1, scene)  # world seed 1: held-out test scenes
    Image.fromarray(sc.image).save(tmp_path / "s.png")
    args = ["segment", str(tmp_path / "s.png"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, *[x for p in points for x in ("--point", p)]])
    assert r.exit_code == 0, r.output
    mask = np.asarray(Image.open(tmp_path / "o" / "s.png"))
    meta = json.loads((tmp_path / "o" / "s.json").read_text())
    assert meta["labels"] == ["point 1", "point 2"] and meta["method"] == "interactive" and meta["preset"] == "embedded"
    for k, p in enumerate(points, start=1):
        x, y = (int(v) for v in p.split(","))
        obj = sc.instance == sc.instance[y, x]
        iou = np.logical_and(mask == k, obj).sum() / np.logical_or(mask == k, obj).sum()
        assert iou > 0.6, (k, iou)


def test_box_and_scribble_from_the_cli_with_names(tmp_path):
    sc = make_scene(1, 0)
    Image.fromarray(sc.image).save(tmp_path / "s.png")
    ys, xs = np.nonzero(sc.instance == 2)
    Image.fromarray(((sc.instance == 1) * 255).astype(np.uint8)).save(tmp_path / "scribble.png")
    box = f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}"
    args = ["segment", str(tmp_path / "s.png"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--box", box, "--scribble", str(tmp_path / "scribble.png"), "--name", "b", "--name", "s"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "s.json").read_text())
    assert meta["labels"] == ["b", "s"]
    mask = np.asarray(Image.open(tmp_path / "o" / "s.png"))
    inside = np.zeros_like(mask, bool)
    inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert (mask[~inside] != 1).all()  # the box's object stays in its box


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--point", "3"], "expected X,Y"),
        (["--point", "99,3"], "outside the 64x64 image"),
        (["--point", "3,3", "--name", "a", "--name", "b"], "2 --name for 1 prompts"),
        (["--point", "3,3", "--method", "t2m"], "prompt the interactive method, not t2m"),
        (["--point", "3,3", "--labels", "circle"], "drop --labels"),
        (["--method", "interactive"], "give at least one"),
        (["--name", "a", "--labels", "circle"], "--name names"),
    ],
)
def test_cli_prompt_errors_are_one_line(tmp_path, extra, expect):
    Image.fromarray(make_scene(1, 0).image).save(tmp_path / "s.png")
    r = CliRunner().invoke(app, ["segment", str(tmp_path / "s.png"), "--out", str(tmp_path / "o"), "--device", "cpu", *extra])
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o" / "s.png").exists()


def test_diffseg_iseg_refinement_moves_a_pixel_to_the_segment_its_self_attention_holds():
    from attnseg.methods.diffseg_iseg import DiffSegISegConfig, refine_segments

    # 4 x 4 grid; self-attention: the left half attends to the left half, the right half to the right half.
    left = torch.tensor([c < 2 for r in range(4) for c in range(4)])
    a = (left[:, None] == left[None, :]).float()
    a = a / a.sum(dim=1, keepdim=True)
    # DiffSeg's proposals put pixel (0, 2) of the right half in the left segment; a third proposal wins nowhere.
    props = torch.zeros((3, 16))
    props[0, left] = 1.0
    props[0, 2] = 1.0
    props[1, ~left] = 0.9
    props[2] = 0.1
    out = refine_segments(props.reshape(3, 4, 4), a, (4, 4), DiffSegISegConfig(refine_iters=1))
    assert out.shape == (2, 4, 4)  # the empty segment is dropped
    # One product: a right-half pixel sees 1/8 of segment 0 and 7/8 of segment 1; min-max makes them 0 and 1.
    assert torch.equal(out.argmax(dim=0).flatten(), torch.where(left, 0, 1))
    assert torch.allclose(out[1].flatten()[~left], torch.ones(8))


def test_diffseg_iseg_segments_from_segment_and_eval(tmp_path):
    from attnseg.predictor import AttnSegPredictor

    img = make_scene(1, 0).image
    Image.fromarray(img).save(tmp_path / "a.png")
    r = CliRunner().invoke(
        app, ["segment", str(tmp_path / "a.png"), "--method", "diffseg-iseg", "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "a.json").read_text())
    assert meta["method"] == "diffseg-iseg" and meta["preset"] == "embedded" and meta["labels"][0] == "segment 1"
    mask = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    segs = AttnSegPredictor.from_pretrained().segment_unsupervised([img], method="diffseg-iseg")[0]
    assert np.array_equal(mask, segs + 1)
