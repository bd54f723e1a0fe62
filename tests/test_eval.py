"""`attnseg eval`: numbers confirmed by hand on a small fixture, VOC and COCO readers, resume."""

from __future__ import annotations

import json
from types import MappingProxyType

import numpy as np
import pytest
from PIL import Image

from attnseg.io.datasets import COCODataset, VOCDataset
from attnseg.io.images import voc_palette
from attnseg.jobs.evaluate import evaluate


class FakeResult:
    def __init__(self, mask):
        self.mask = mask


class FakePredictor:
    """Predicts label 1 (the first label) on the left half of the image, background elsewhere."""

    model_name = "fake"
    weights = None
    default_presets = MappingProxyType({})

    def __init__(self):
        self.calls = 0

    def segment_batch(self, images, labels, **kw):
        self.calls += 1
        out = []
        for im, _ in zip(images, labels, strict=True):
            m = np.zeros(im.shape[:2], np.uint8)
            m[:, : im.shape[1] // 2] = 1
            out.append(FakeResult(m))
        return out


def _png(path, arr, palette=False):
    im = Image.fromarray(arr.astype(np.uint8), mode="P" if palette else None)
    if palette:
        im.putpalette(list(voc_palette()))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def test_eval_by_hand(voc, tmp_path):
    pred = FakePredictor()
    rep = evaluate(pred, VOCDataset(voc), ["t2m"], tmp_path / "rep", progress=False)
    m = rep["methods"]["t2m"]
    # a: pred = cat on the left half -> perfect. b: labels [dog]; pred dog on the left half (4 px, all background),
    # background on the right (1 dog px missed, 1 ignored).
    # confusion rows gt / cols pred: bg: 4 (a) + 1 (b right-top... ) see below
    # a: bg->bg 4, cat->cat 4. b: gt bg at (0,0),(0,1),(1,0),(1,1) predicted dog; gt bg (0,2) predicted bg;
    #    gt dog (0,3),(1,3) predicted bg; (1,2) ignored.
    conf = np.array([[5, 0, 4], [0, 4, 0], [2, 0, 0]])
    tp = np.diag(conf)
    iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    assert np.isclose(m["miou"], iou.mean())
    assert np.isclose(m["per_class"]["background"], 5 / 11)
    assert np.isclose(m["per_class"]["dog"], 0.0)
    assert np.isclose(m["pixel_acc"], 9 / 15)
    for f in ("report.json", "report.md", "per_class.png", "qualitative.png"):
        assert (tmp_path / "rep" / f).exists()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["methods"]["t2m"]["miou"] == m["miou"]
    # Resumable: a second run reads the cached predictions and calls no model.
    again = FakePredictor()
    rep2 = evaluate(again, VOCDataset(voc), ["t2m"], tmp_path / "rep", progress=False)
    assert again.calls == 0 and rep2["methods"]["t2m"] == m


def test_model_profile_names_the_report_key_and_a_repeated_method_counts_once(voc, tmp_path):
    pred = FakePredictor()
    pred.default_presets = {"t2m": "embedded"}
    rep = evaluate(pred, VOCDataset(voc), ["t2m", "t2m:embedded"], tmp_path / "rep", progress=False)
    assert list(rep["methods"]) == ["t2m-embedded"] and pred.calls == 2  # two images, one prediction each
    assert np.isclose(rep["methods"]["t2m-embedded"]["pixel_acc"], 9 / 15)  # as in test_eval_by_hand: counted once


def test_voc_errors(voc):
    from attnseg.io.datasets import DatasetError

    with pytest.raises(DatasetError, match="no split 'train'"):
        VOCDataset(voc, "train")


def test_coco_reader_and_eval(tmp_path):
    pytest.importorskip("pycocotools")
    imgs = tmp_path / "images"
    imgs.mkdir()
    _png(imgs / "1.png", np.full((4, 4, 3), 50))
    ann = {
        "images": [{"id": 1, "file_name": "1.png", "height": 4, "width": 4}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            # a 2x2 box of cat at the top-left (polygon), a crowd region at the bottom-right
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]],
                "area": 4,
                "bbox": [0, 0, 2, 2],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 9,
                "segmentation": [[3, 3, 4, 3, 4, 4, 3, 4]],
                "area": 1,
                "bbox": [3, 3, 1, 1],
                "iscrowd": 1,
            },
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = COCODataset(tmp_path / "ann.json", imgs)
    assert ds.classes == ["background", "cat", "dog"]
    s = ds.sample(1)
    assert (s.gt == 1).sum() == 4 and s.gt[0, 0] == 1 and s.gt[3, 3] == 255
    rep = evaluate(FakePredictor(), ds, ["cross"], tmp_path / "rep", progress=False)
    # pred: cat on the left 2 columns (8 px); gt cat 4 px (top-left), crowd pixel ignored.
    # cat: tp 4, fp 4, fn 0 -> 0.5; background: tp 7, fp 0, fn 4 -> 7/11
    m = rep["methods"]["cross"]
    assert np.isclose(m["per_class"]["cat"], 0.5)
    assert np.isclose(m["per_class"]["background"], 7 / 11)


def test_eval_real_predictor_supervised_and_unsupervised(predictor, tmp_path):
    from attnseg.shapes.world import export_voc

    export_voc(tmp_path / "scenes", n=3, seed=11)
    rep = evaluate(
        predictor, VOCDataset(tmp_path / "scenes"), ["cross", "t2m:plain", "diffseg:small-unet"], tmp_path / "r", progress=False
    )
    assert set(rep["methods"]) == {"cross", "t2m-plain", "diffseg-small-unet"}
    for m in rep["methods"].values():
        assert 0.0 <= m["miou"] <= 1.0 and m["pixels"] == 3 * 64 * 64
    assert (tmp_path / "r" / "cache" / "diffseg-small-unet").is_dir()
