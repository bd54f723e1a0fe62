"""Metrics against hand computations."""

from __future__ import annotations

import numpy as np

from attnseg.ops.metrics import confusion, hungarian_confusion, iou_per_class, summarize


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


def test_diffseg_merging_on_hand_made_attention():
    import torch

    from attnseg.methods.diffseg import DiffSegConfig, aggregate_self, assign, diffseg_proposals, symmetric_kl

    # 4x4 grid, two regions (left/right halves); every pixel attends uniformly to its own half.
    side = 4
    left = torch.tensor([(i % side) < 2 for i in range(16)])
    a = (left[:, None] == left[None, :]).float()
    a = (a / a.sum(1, keepdim=True))[None]
    assert torch.allclose(aggregate_self({4: a}), a)
    kl = symmetric_kl(a[0, :2], a[0, :2])
    assert torch.allclose(kl, torch.zeros(2, 2), atol=1e-5)
    props = diffseg_proposals({4: a}, DiffSegConfig(anchors_per_side=4, kl_threshold=1.1, iters=2))[0]
    assert props.shape[0] == 2  # 16 anchors merge into one proposal per half
    seg = assign(props, (4, 4)).flatten()
    assert len(set(seg[left].tolist())) == 1 and len(set(seg[~left].tolist())) == 1 and seg[0] != seg[3]
