"""Segmentation metrics: one confusion matrix over a whole split, IoU, mIoU, Hungarian matching.

Protocol of the WSSS papers (T2M, iSeg): class 0 is background, label 255 is ignored,
IoU_c = TP / (TP + FP + FN), mIoU is the mean over the classes present in the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = 255


def confusion(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(n, n) int64 confusion matrix, rows = ground truth, columns = prediction."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    g = gt.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    keep = (g != ignore) & (g >= 0) & (g < n_classes)
    g, p = g[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= n_classes):
        raise ValueError(f"prediction holds ids outside 0..{n_classes - 1}")
    return np.bincount(g * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for classes absent from both ground truth and prediction.

    ``conf`` is (n, n), or (n, n + 1) where the last column counts pixels given no class.
    """
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    denom = conf[:, :n].sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def summarize(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """mIoU over classes present in the ground truth, per-class IoU and pixel accuracy."""
    iou = iou_per_class(conf)
    present = conf.sum(1) > 0
    miou = float(np.nanmean(np.where(present, iou, np.nan))) if present.any() else float("nan")
    total = conf.sum()
    return {
        "miou": miou,
        "pixel_acc": float(np.diag(conf[:, : conf.shape[0]]).sum() / total) if total else float("nan"),
        "per_class": {name: (None if not present[i] else float(iou[i])) for i, name in enumerate(class_names)},
        "pixels": int(total),
    }


def hungarian_match(conf: np.ndarray) -> np.ndarray:
    """Best one-to-one map of predicted segment ids (columns) to classes (rows), by total overlap.

    Returns ``mapping`` with ``mapping[pred_id] = class_id`` (-1 for unmatched predicted ids).
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-conf)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def hungarian_confusion(gt: np.ndarray, segments: np.ndarray, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(n, n + 1) confusion of a class-agnostic segmentation after per-image Hungarian matching.

    ``segments`` holds segment ids 0..S-1; each is matched to at most one class so that the total
    overlap is largest. Pixels of unmatched segments fall in the last column: wrong for every class.
    """
    n_seg = int(segments.max()) + 1
    c = np.zeros((n_classes, n_seg), dtype=np.int64)
    g = gt.astype(np.int64).ravel()
    s = segments.astype(np.int64).ravel()
    keep = (g != ignore) & (g < n_classes)
    np.add.at(c, (g[keep], s[keep]), 1)
    mapping = hungarian_match(c)  # segment -> class or -1
    mapped = mapping[s[keep]]
    mapped = np.where(mapped >= 0, mapped, n_classes)
    out = np.bincount(g[keep] * (n_classes + 1) + mapped, minlength=n_classes * (n_classes + 1))
    return out.reshape(n_classes, n_classes + 1)
