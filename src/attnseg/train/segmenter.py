"""Protocol II of the synthetic-data papers: train a small segmenter on generated pairs (scored on real images).

``attnseg train-segmenter DATASET --out MODEL`` trains :class:`~attnseg.segnet.SegNet` (a plain-torch U-Net of three
levels) with cross-entropy on a dataset of image/mask pairs:

- a folder written by ``attnseg generate`` (``manifest.jsonl``, ``classes.txt``, ``images/``, ``masks/``;
  mask value 255 = uncertain is ignored by the loss, as Dataset Diffusion does), or
- a VOC-layout folder (``--split``), e.g. real ShapesWorld scenes for a supervised reference.

The model folder holds ``config.json`` (classes, architecture, training settings, the dataset's digest),
``model.safetensors`` and ``log.jsonl``. Training is seeded and resumable: ``checkpoint.pt`` (weights and
optimizer, written atomically every ``ckpt_every`` steps) is picked up by the same command and removed
when the model is written; a folder trained with other settings is refused.
``attnseg eval DATASET --segmenter MODEL`` scores it (no image labels are given to it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnseg.io.datasets import DatasetError, VOCDataset, read_classes
from attnseg.io.files import atomic_torch_save, atomic_write_bytes, settings_diff
from attnseg.io.generated import MANIFEST, read_manifest
from attnseg.io.images import load_image
from attnseg.ops.metrics import IGNORE
from attnseg.segnet import SegmenterError, SegNet, normalise


@dataclass
class SegmenterConfig:
    """Training settings (part of the model's identity, stored in config.json)."""

    steps: int = 2000
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    """Channels of the first level (then 2x and 4x)."""
    size: int = 64
    """Side images and masks are resized to for training and inference."""
    min_scale: float = 0.6
    """Random crops cover [min_scale, 1] of the side; 1 disables cropping."""
    vflip: bool = True
    """Vertical flips too (right for ShapesWorld; turn off for photographs)."""
    seed: int = 0
    ckpt_every: int = 250


# ----------------------------------------------------------------------------- data


def read_pairs(root: str | Path, split: str = "train") -> tuple[list[tuple[Path, Path]], list[str]]:
    """(image, mask) paths and the class names (background first) of a generated or VOC folder."""
    root = Path(root)
    if not root.is_dir():
        raise SegmenterError(f"dataset folder {root} does not exist")
    if (root / MANIFEST).exists():
        if not (root / "classes.txt").exists():
            raise SegmenterError(f"{root} has a manifest but no classes.txt; is it an `attnseg generate` folder?")
        classes = read_classes(root / "classes.txt")
        done = read_manifest(root / MANIFEST)
        pairs = [(root / done[i]["image"], root / done[i]["mask"]) for i in sorted(done)]
    elif (root / "ImageSets" / "Segmentation").is_dir():
        try:
            ds = VOCDataset(root, split)
        except DatasetError as e:
            raise SegmenterError(str(e)) from None
        classes = ds.classes
        pairs = [(ds.image_path(i), root / "SegmentationClass" / f"{i}.png") for i in ds.ids]
    else:
        raise SegmenterError(
            f"{root} is neither an `attnseg generate` folder (manifest.jsonl) nor a VOC-layout folder (ImageSets/Segmentation/)"
        )
    if not pairs:
        raise SegmenterError(f"{root} holds no image/mask pair")
    return pairs, classes


def load_pairs(pairs: list[tuple[Path, Path]], size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size, 3) uint8 and masks (N, size, size) uint8, resized (masks by nearest)."""
    images = np.zeros((len(pairs), size, size, 3), np.uint8)
    masks = np.zeros((len(pairs), size, size), np.uint8)
    for k, (ip, mp) in enumerate(pairs):
        im = load_image(ip)
        if not mp.exists():
            raise SegmenterError(f"mask {mp} of {ip.name} is missing")
        with Image.open(mp) as m:
            m = m.convert("L") if m.mode not in ("P", "L") else m
            mask = np.asarray(m, dtype=np.uint8)
        if mask.shape != im.shape[:2]:
            raise SegmenterError(f"{mp.name} is {mask.shape[1]}x{mask.shape[0]} but its image is {im.shape[1]}x{im.shape[0]}")
        bad = (mask >= n_classes) & (mask != IGNORE)
        if bad.any():
            raise SegmenterError(f"{mp} holds class ids {sorted(set(np.unique(mask[bad]).tolist()))} beyond classes.txt")
        images[k] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
        masks[k] = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return images, masks


def augment(
    images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, min_scale: float, vflip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop-and-resize and flips, one affine per sample (images bilinear, masks nearest)."""
    b = images.shape[0]
    s = min_scale + (1 - min_scale) * torch.rand(b, generator=gen)
    tx = (1 - s) * (2 * torch.rand(b, generator=gen) - 1)
    ty = (1 - s) * (2 * torch.rand(b, generator=gen) - 1)
    fx = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if vflip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = s * fx, tx
    theta[:, 1, 1], theta[:, 1, 2] = s * fy, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out_i = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out_m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return out_i, out_m[:, 0].round().long()


# ----------------------------------------------------------------------------- training


def _digest(pairs: list[tuple[Path, Path]]) -> str:
    h = hashlib.sha256()
    for ip, mp in pairs:
        h.update(ip.name.encode())
        h.update(hashlib.sha256(mp.read_bytes()).digest())
    return h.hexdigest()[:16]


def train_segmenter(
    dataset: str | Path,
    out: str | Path,
    cfg: SegmenterConfig | None = None,
    split: str = "train",
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train (or resume, or find already trained) a segmenter; return its config record.

    ``stop_after`` ends this call after that many steps with a checkpoint (the same call resumes).
    """
    cfg = cfg or SegmenterConfig()
    if cfg.steps < 1 or cfg.batch < 1 or cfg.size < 8 or not 0 < cfg.min_scale <= 1 or cfg.width < 8 or cfg.width % 8:
        raise SegmenterError("--steps and --batch must be >= 1, --size >= 8, --width a multiple of 8, min_scale in (0, 1]")
    pairs, classes = read_pairs(dataset, split)
    out = Path(out)
    record = {
        "classes": classes,
        "arch": "SegNet",
        "config": asdict(cfg),
        "dataset": str(Path(dataset).resolve()),
        "dataset_digest": _digest(pairs),
        "pairs": len(pairs),
    }
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = settings_diff({k: old.get(k) for k in record}, record)
        if diff:
            raise SegmenterError(f"{out} holds a segmenter trained with other settings ({', '.join(diff)}); use another --out")
        if (out / "model.safetensors").exists():
            return {**old, "finished": True, "step": cfg.steps}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg_path, json.dumps(record, indent=1).encode())

    images, masks = load_pairs(pairs, cfg.size, len(classes))
    torch.manual_seed(cfg.seed)
    net = SegNet(len(classes), cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    ck = out / "checkpoint.pt"
    if ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step = int(state["step"])
    start = step
    ims_t, masks_t = torch.from_numpy(images), torch.from_numpy(masks)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.time()
    net.train()
    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=step)
        running = []
        while step < cfg.steps:
            idx = torch.randint(0, len(pairs), (cfg.batch,), generator=gen)
            x, y = augment(normalise(ims_t[idx]), masks_t[idx], gen, cfg.min_scale, cfg.vflip)
            loss = F.cross_entropy(net(x), y, ignore_index=IGNORE)
            if not torch.isfinite(loss):
                raise RuntimeError(f"segmenter loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running.append(loss.item())
            bar.update(task, completed=step)
            pause = stop_after is not None and step == start + stop_after and step < cfg.steps
            if step % cfg.ckpt_every == 0 or step == cfg.steps or pause:
                rec = {"step": step, "loss": float(np.mean(running)), "elapsed": time.time() - t0}
                running = []
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if step < cfg.steps:
                    atomic_torch_save(
                        {
                            "net": net.state_dict(),
                            "opt": opt.state_dict(),
                            "sched": sched.state_dict(),
                            "gen": gen.get_state(),
                            "step": step,
                        },
                        ck,
                    )
            if pause:
                return {**record, "finished": False, "step": step}
    from safetensors.torch import save

    atomic_write_bytes(out / "model.safetensors", save({k: v.contiguous() for k, v in net.state_dict().items()}))
    if ck.exists():
        ck.unlink()
    return {**record, "finished": True, "step": step}
