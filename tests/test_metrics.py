"""Metrics against hand computations."""

from __future__ import annotations

import numpy as np

from attnseg.metrics import confusion, hungarian_confusion, iou_per_class, summarize


def test_confusion_iou_by_hand():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])
    c = confusion(gt, pred, 3)
    # rows gt, cols pred; the 255 pixel is ignored
    assert c.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou = iou_per_class(c)
    assert np.allclose(iou, [2 / 4, 2 / 3, 1 / 2])
    s = summarize(c, ["bg", "a", "b"])
    assert np.isclose(s["miou"], (0.5 + 2 / 3 + 0.5) / 3)
    assert np.isclose(s["pixel_acc"], 5 / 7)


def test_miou_counts_only_classes_present_in_ground_truth():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted but absent from the ground truth
    s = summarize(confusion(gt, pred, 3), ["bg", "a", "b"])
    assert s["per_class"]["b"] is None
    assert np.isclose(s["miou"], (1 / 2 + 1) / 2)


def test_hungarian_per_image():
    gt = np.array([[0, 0, 1, 1, 2, 2]])
    seg = np.array([[5, 5, 3, 3, 3, 4]])  # segment 3 covers class 1 and half of class 2
    c = hungarian_confusion(gt, seg, 3)
    assert c.shape == (3, 4)
    # matching: 5 -> 0, 3 -> 1, 4 -> 2
    assert c[:, :3].tolist() == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    s = summarize(c, ["bg", "a", "b"])
    assert np.isclose(s["miou"], (1 + 2 / 3 + 1 / 2) / 3)


def test_hungarian_unmatched_segments_are_errors():
    gt = np.array([[0, 0, 1, 1]])
    seg = np.array([[0, 1, 2, 2]])  # three segments, two classes: one segment stays unmatched
    c = hungarian_confusion(gt, seg, 2)
    assert c[:, 2].sum() == 1
    assert np.isclose(iou_per_class(c)[0], 1 / 2)
