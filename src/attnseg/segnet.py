"""Protocol II's segmenter: a small plain-torch U-Net trained on image/mask pairs, and its inference.

``attnseg train-segmenter`` (:mod:`attnseg.train.segmenter`) writes a model folder (``config.json`` with the class
names and settings, ``model.safetensors``); :class:`Segmenter` loads it and predicts label maps, which
``attnseg eval --segmenter`` scores on real images (it sees the image only, not its labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SegmenterError(ValueError):
    """Bad input to segmenter training or loading; the message says what to do."""


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
    )


class SegNet(nn.Module):
    """A small U-Net: three levels (w, 2w, 4w), bilinear up-sampling with skip connections."""

    def __init__(self, n_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(4 * w + 2 * w, 2 * w), _block(2 * w + w, w)
        self.head = nn.Conv2d(w, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        return self.head(d1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Segmenter:
    """A trained :class:`SegNet` with its class names; ``predict`` returns a label map at the image's size."""

    def __init__(self, net: SegNet, classes: list[str], size: int, name: str) -> None:
        self.net, self.classes, self.size, self.name = net.eval(), classes, size, name

    @classmethod
    def load(cls, folder: str | Path) -> Segmenter:
        folder = Path(folder)
        if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
            raise SegmenterError(f"{folder} is not a trained segmenter (config.json and model.safetensors expected)")
        from safetensors.torch import load_file

        rec = json.loads((folder / "config.json").read_text())
        net = SegNet(len(rec["classes"]), rec["config"]["width"])
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(net, rec["classes"], rec["config"]["size"], folder.name)

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids in this segmenter's class space."""
        h, w = image.shape[:2]
        x = normalise(torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))[None])
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        logits = F.interpolate(self.net(x), size=(h, w), mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].numpy().astype(np.uint8)

    def lut_to(self, classes: list[str]) -> np.ndarray:
        """Map this segmenter's class ids to ids of ``classes`` (by name); unknown names are an error."""
        missing = [c for c in self.classes[1:] if c not in classes]
        if missing:
            raise SegmenterError(f"segmenter {self.name} predicts {missing}, which are not classes of the dataset {classes[1:]}")
        return np.array([0] + [classes.index(c) for c in self.classes[1:]], np.uint8)
