"""Dataset readers: VOC layout (ShapesWorld exports to it) and COCO instances JSON.

Both yield :class:`Sample`: the image, a semantic ground truth in class-index space
(0 = background, 255 = ignore) and the class names of that index space.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.io.images import load_image


class DatasetError(ValueError):
    """A dataset folder or file does not have the expected layout."""


@dataclass
class Sample:
    id: str
    image_path: Path
    gt: np.ndarray  # (H, W) uint8 class ids, 255 = ignore

    def image(self) -> np.ndarray:
        return load_image(self.image_path)


def read_classes(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(names) < 2:
        raise DatasetError(f"{path} must list the background on line 0 and at least one class")
    return names


class VOCDataset:
    """A VOC-layout folder: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt."""

    def __init__(self, root: str | Path, split: str = "val", classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.exists():
            have = sorted(p.stem for p in (self.root / "ImageSets" / "Segmentation").glob("*.txt"))
            raise DatasetError(f"no split {split!r} in {self.root} (expected {split_file}); splits found: {have or 'none'}")
        self.ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        if classes is not None:
            self.classes = list(classes)
        elif (self.root / "classes.txt").exists():
            self.classes = read_classes(self.root / "classes.txt")
        else:
            raise DatasetError(f"no classes.txt in {self.root}: pass --classes background name1 name2 ...")

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: str) -> Path:
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
            p = self.root / "JPEGImages" / f"{i}{ext}"
            if p.exists():
                return p
        raise DatasetError(f"image {i} not found in {self.root / 'JPEGImages'}")

    def __iter__(self) -> Iterator[Sample]:
        for i in self.ids:
            yield self.sample(i)

    def sample(self, i: str) -> Sample:
        gt_path = self.root / "SegmentationClass" / f"{i}.png"
        if not gt_path.exists():
            raise DatasetError(f"ground truth {gt_path} missing")
        with Image.open(gt_path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"{gt_path} is {im.mode}: ground truth must be a palette or index PNG")
            gt = np.asarray(im, dtype=np.uint8).copy()
        return Sample(i, self.image_path(i), gt)


class COCODataset:
    """COCO instances JSON + image folder, turned into semantic masks with pycocotools.

    Class index = position of the category in the JSON's category list + 1; overlaps are resolved
    by drawing larger instances first; crowd regions are ignored (255).
    """

    def __init__(self, annotations: str | Path, images: str | Path | None = None) -> None:
        try:
            from pycocotools.coco import COCO
        except ImportError as e:
            raise ImportError("COCO datasets need pycocotools: pip install 'attnseg[coco]'") from e
        ann = Path(annotations)
        if ann.is_dir():
            cands = sorted(ann.glob("annotations/*.json")) + sorted(ann.glob("*.json"))
            if not cands:
                raise DatasetError(f"no annotations JSON in {ann}")
            images = images or (ann / "images")
            ann = cands[0]
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann))
        self.images_dir = Path(images) if images else ann.parent
        self.cat_ids = [c["id"] for c in self.coco.dataset["categories"]]
        self.classes = ["background", *[c["name"] for c in self.coco.dataset["categories"]]]
        self.ids = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in self.ids:
            yield self.sample(i)

    def sample(self, img_id) -> Sample:
        info = self.coco.loadImgs([img_id])[0]
        h, w = info["height"], info["width"]
        gt = np.zeros((h, w), np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id]))
        for a in sorted(anns, key=lambda a: -a.get("area", 0)):
            m = self.coco.annToMask(a).astype(bool)
            gt[m] = 255 if a.get("iscrowd", 0) else self.cat_ids.index(a["category_id"]) + 1
        return Sample(str(Path(info["file_name"]).stem), self.images_dir / info["file_name"], gt)


def open_dataset(path: str | Path, split: str = "val", classes: Sequence[str] | None = None):
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p} does not exist")
    if (p / "ImageSets").is_dir():
        return VOCDataset(p, split, classes)
    if p.suffix == ".json" or (p.is_dir() and (list(p.glob("annotations/*.json")) or list(p.glob("*.json")))):
        return COCODataset(p)
    raise DatasetError(f"{p} is neither a VOC-layout folder (ImageSets/, JPEGImages/, SegmentationClass/) nor COCO annotations")


def image_labels(gt: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Image-level labels from a ground truth: the names of the non-background classes present."""
    ids = [int(c) for c in np.unique(gt) if 0 < c < len(classes)]
    return [classes[c] for c in ids]
