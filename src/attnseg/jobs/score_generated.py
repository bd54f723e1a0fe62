"""Score the masks of a generated dataset against a detector (the papers' oracle protocol).

The synthetic-data papers run an off-the-shelf detector (Mask R-CNN) on their generated images and
report the mIoU of their masks against its masks. Here any :class:`attnseg.shapes.oracle.Detector`
(``(image, phrase) -> bool mask``) plays that part; on the embedded model's world it is
:class:`~attnseg.shapes.oracle.ColourDetector`, which finds each prompted object by the colour the prompt
names. For each item the oracle label map paints, label by label in prompt order, the detector's
mask of that label's phrase; a method's uncertain pixels (255) are left out of its confusion matrix
and counted as ``uncertain``. Two naive references are scored on the same oracle maps: every pixel
background, and every pixel the item's first label.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.io.datasets import read_classes
from attnseg.io.generated import MANIFEST, read_manifest
from attnseg.io.images import load_image
from attnseg.ops.metrics import confusion, summarize
from attnseg.shapes.oracle import ColourDetector, shapes_phrase


def load_detector(spec: str):
    """``shapes`` (the ShapesWorld colour oracle) or ``package.module:name`` (a callable, or a class made with no args)."""
    if spec == "shapes":
        return ColourDetector()
    mod, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"detector {spec!r}: use 'shapes' or 'package.module:name'")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load detector {spec!r}: {e}") from None
    return obj() if isinstance(obj, type) else obj


def oracle_map(image: np.ndarray, prompt: str, labels: Sequence[str], classes: Sequence[str], detector, phrase_of) -> np.ndarray:
    out = np.zeros(image.shape[:2], np.uint8)
    for lab in labels:
        m = np.asarray(detector(image, phrase_of(prompt, lab)), dtype=bool)
        if m.shape != out.shape:
            raise ValueError(f"detector returned a {m.shape} mask for a {out.shape} image")
        out[m] = classes.index(lab)
    return out


def score_generated(
    folder: str | Path,
    detector: Callable[[np.ndarray, str], np.ndarray],
    phrase_of: Callable[[str, str], str] | None = None,
    limit: int | None = None,
) -> dict:
    """mIoU of a generated folder's masks against the detector's, with the two naive references."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() or not (folder / "classes.txt").exists():
        raise ValueError(f"{folder} is not an `attnseg generate` folder (manifest.jsonl and classes.txt expected)")
    phrase_of = phrase_of or shapes_phrase
    classes = read_classes(folder / "classes.txt")
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    done = read_manifest(folder / MANIFEST)
    n = len(classes)
    conf = {k: np.zeros((n, n), np.int64) for k in ("method", "all-background", "first-label")}
    uncertain = total = 0
    items = sorted(done)[: limit or None]
    if not items:
        raise ValueError(f"{folder} holds no finished item")
    for idx in items:
        rec = done[idx]
        image = load_image(folder / rec["image"])
        mask = np.asarray(Image.open(folder / rec["mask"]), dtype=np.uint8)
        gt = oracle_map(image, rec["prompt"], rec["labels"], classes, detector, phrase_of)
        unsure = mask == 255
        uncertain += int(unsure.sum())
        total += mask.size
        conf["method"] += confusion(np.where(unsure, 255, gt), np.where(unsure, 0, mask), n)
        conf["all-background"] += confusion(gt, np.zeros_like(gt), n)
        conf["first-label"] += confusion(gt, np.full_like(gt, classes.index(rec["labels"][0])), n)
    return {
        "folder": str(folder),
        "method": run.get("method"),
        "preset": run.get("preset"),
        "items": len(items),
        "uncertain": uncertain / max(total, 1),
        "classes": classes,
        "scores": {k: summarize(c, classes) for k, c in conf.items()},
    }


def markdown(results: Sequence[dict]) -> str:
    classes = results[0]["classes"]
    lines = [
        "| masks | items | mIoU vs oracle | uncertain px | " + " | ".join(classes) + " |",
        "|---|---|---|---|" + "---|" * len(classes),
    ]
    for r in results:
        name = (r["method"] or Path(r["folder"]).name) + (f":{r['preset']}" if r["preset"] else "")
        rows = [(name, r["scores"]["method"], f"{100 * r['uncertain']:.1f}%")]
        rows += [(f"({k}, same images)", r["scores"][k], "-") for k in ("all-background", "first-label")]
        for label, s, unc in rows:
            cells = ["-" if s["per_class"].get(c) is None else f"{100 * s['per_class'][c]:.1f}" for c in classes]
            lines.append(f"| {label} | {r['items']} | {100 * s['miou']:.1f} | {unc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
