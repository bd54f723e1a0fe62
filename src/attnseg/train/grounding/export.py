"""A synthetic segmentation dataset labelled by the grounding module (Grounded Diffusion section 5.2, Protocol II).

Images of every class, seen and unseen (``count`` prompts per class and per pair, as the test items of
:mod:`.data`, from another seed), are generated and labelled, and written as an ``attnseg generate`` folder
(:mod:`attnseg.io.generated`), which ``attnseg train-segmenter`` trains on and ``attnseg eval --segmenter`` scores
on real images. ``masks`` chooses the labels of the very same images: the module's (``module``: per pixel the class
of the highest logit above 0, :func:`~attnseg.methods.grounding.label_map`), the CA baselines' (``baseline``,
``baseline_decoder``) or the oracle detector's (``oracle``), so that the segmenters trained on them differ in their
masks only. Resumable: items already in the manifest are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from attnseg.grounder import Grounder, GroundingError
from attnseg.io.files import atomic_write_bytes
from attnseg.io.generated import MANIFEST, append_manifest, read_manifest, write_classes, write_coco, write_item
from attnseg.methods.grounding import label_map
from attnseg.train.grounding.data import BASELINES, Block, DataConfig, build_data

MASKS = ("module", *BASELINES, "oracle")


def item_masks(grounder: Grounder, data: Block, masks: str, batch: int = 32) -> list[np.ndarray]:
    """(H, W) uint8 label maps (0 background, k + 1 = the item's k-th label) of every item, from ``masks``."""
    if masks in BASELINES:
        return [m.numpy() for m in data.baselines[masks]]
    if masks == "oracle":
        return [
            label_map(torch.where(o, 1.0, -1.0)[: len(it.labels)]).to(torch.uint8).numpy()
            for o, it in zip(data.oracle, data.items, strict=True)
        ]
    if masks != "module":
        raise GroundingError(f"unknown masks {masks!r}; use one of {', '.join(MASKS)}")
    out = []
    for a in range(0, len(data.items), batch):
        items = data.items[a : a + batch]
        logits = grounder.logits({s: f[a : a + batch] for s, f in data.features.items()}, [it.labels for it in items])
        out += [label_map(lg[: len(it.labels)]).to(torch.uint8).numpy() for lg, it in zip(logits, items, strict=True)]
    return out


def export_dataset(
    backbone,
    grounder: Grounder,
    out: str | Path,
    n: int,
    classes: Sequence[str],
    masks: str = "module",
    seed: int = 2,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or reuse) ``n`` images per class and per pair of ``classes`` and write them with ``masks``' labels."""
    rec = grounder.record
    train = DataConfig.from_record(rec["data"])
    if seed == train.seed:
        raise GroundingError(f"the seed {seed} is the module's training seed; pass another --seed")
    cfg = replace(train, kind="test", classes=tuple(classes), count=n, seed=seed, model=backbone.model_name)
    data = build_data(backbone, data_dir or Path(out) / "data", cfg, rec["detector"], progress)
    out = Path(out)
    run = {
        "method": "grounding",
        "preset": masks if masks != "module" else None,
        "module": rec.get("folder"),
        "data": asdict(cfg),
    }
    run_path = out / "run.json"
    if run_path.exists() and json.loads(run_path.read_text()) != json.loads(json.dumps(run)):
        raise GroundingError(f"{out} holds another export (see its run.json); use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_path, json.dumps(run, indent=1).encode())
    write_classes(out, classes)
    done = read_manifest(out / MANIFEST)
    labels = item_masks(grounder, data, masks)
    images = data.images.numpy()
    for i, it in enumerate(data.items):
        if it.index not in done:
            rec_i = write_item(
                out, f"{it.index:06d}", it.index, it.prompt, it.labels, images[i], labels[i], list(classes), it.seed
            )
            append_manifest(out / MANIFEST, [rec_i])
    write_coco(out, list(classes))
    return {"items": len(data.items), "folder": str(out), "masks": masks}
