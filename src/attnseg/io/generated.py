"""The folder of a generated dataset (``attnseg generate --out DIR``), written and read here.

- ``images/<id>.png`` and ``masks/<id>.png`` (palette, 0 = background, class ids of classes.txt,
  255 = uncertain where the method defines it);
- ``manifest.jsonl``: one line per finished item (id, index, prompt, labels, seed, files), the
  record of what is done, appended (and fsynced) after the item's files;
- ``annotations.json``: COCO instances with RLE masks (rebuilt from the manifest);
- ``classes.txt`` (background first) and ``run.json`` (the settings of the run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.io.files import atomic_write_bytes
from attnseg.io.images import encode_png, palette_png

MANIFEST = "manifest.jsonl"


def read_manifest(path: Path) -> dict[int, dict]:
    """Finished items by index; a torn last line (killed mid-append) is dropped from the file."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        done[int(rec["index"])] = rec
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def append_manifest(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_classes(out: Path, classes: Sequence[str]) -> None:
    """``classes.txt``: the background, then the classes (line i = class id i)."""
    atomic_write_bytes(out / "classes.txt", ("\n".join(["background", *classes]) + "\n").encode())


def write_item(
    out: Path,
    item_id: str,
    index: int,
    prompt: str,
    labels: Sequence[str],
    image: np.ndarray,
    mask: np.ndarray,
    classes: Sequence[str],
    seed: int,
    empty_labels: Sequence[str] = (),
) -> dict:
    """Write one item's image and mask atomically; return its manifest record.

    ``mask`` holds 0 = background, i = ``labels[i - 1]``, 255 = uncertain; it is written in the class ids of ``classes``.
    ``empty_labels``: labels whose masks are empty because the method found no seed for them (recorded, so that a
    dataset's silent holes can be found and regenerated).
    """
    lut = np.zeros(256, np.uint8)
    for i, lab in enumerate(labels, 1):
        lut[i] = classes.index(lab) + 1
    lut[255] = 255
    img_rel, mask_rel = f"images/{item_id}.png", f"masks/{item_id}.png"
    atomic_write_bytes(out / img_rel, encode_png(Image.fromarray(image)))
    atomic_write_bytes(out / mask_rel, encode_png(palette_png(lut[mask])))
    return {
        "id": item_id,
        "index": index,
        "prompt": prompt,
        "labels": list(labels),
        "seed": seed,
        "image": img_rel,
        "mask": mask_rel,
        "empty_labels": list(empty_labels),
    }


def write_coco(out: Path, classes: Sequence[str]) -> Path:
    """``annotations.json`` (COCO instances, RLE masks) from the manifest and the mask files."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise ImportError("COCO annotations need pycocotools: pip install 'attnseg[coco]'") from e
    done = read_manifest(out / MANIFEST)
    images, anns = [], []
    for idx in sorted(done):
        rec = done[idx]
        m = np.asarray(Image.open(out / rec["mask"]), dtype=np.uint8)
        h, w = m.shape
        images.append({"id": idx, "file_name": rec["image"], "height": h, "width": w})
        for c in sorted(int(v) for v in np.unique(m) if 0 < v < 255):
            rle = mask_utils.encode(np.asfortranarray((m == c).astype(np.uint8)))
            area = float(mask_utils.area(rle))
            bbox = [float(x) for x in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": idx,
                    "category_id": c,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in enumerate(classes, 1)],
    }
    atomic_write_bytes(out / "annotations.json", json.dumps(coco).encode())
    return out / "annotations.json"
