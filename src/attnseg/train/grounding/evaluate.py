"""Protocol I of Grounded Diffusion (section 5.1): the module against the cross-attention baseline on generated images.

Test items (:func:`attnseg.train.grounding.data.plan_test`) are generated from seeds the training never used: ``n``
prompts per class and per pair of classes, over the seen and the unseen classes. As the paper keeps only test
images whose oracle mask is good (appendix B.2, checked by hand), an item is kept when the detector finds every class
of its prompt (no all-zero mask); the report counts the items dropped.

Scores, all against the oracle's masks of the same images: the module's masks (sigmoid > 0.5), the baseline's, the
DAAM-style cross-attention masks of the very same generation (``attnseg generate --method ca``), and
``baseline_decoder``'s, the same over the decoder's cross layers only (:data:`~attnseg.train.grounding.data.BASELINES`). Groups as the
paper's Tab. 1: one class, seen or unseen; two classes, both seen ("seen"), one of each ("seen+unseen"), both unseen
("unseen"). Within a group, a class's IoU is its intersection over union summed over the group's masks of that class;
the group's mIoU (percent) is the mean over its classes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from attnseg.grounder import Grounder, GroundingError
from attnseg.io.files import atomic_write_bytes
from attnseg.methods.grounding import binary_masks
from attnseg.ops.metrics import confusion, iou_per_class
from attnseg.train.grounding.data import BASELINES, Block, DataConfig, build_data

SOURCES = ("module", *BASELINES)
COUNTS = {1: "one", 2: "two"}


def group_of(labels: Sequence[str], seen: Sequence[str]) -> str:
    """The group of an item: "seen", "unseen" or (two classes, one of each) "seen+unseen"."""
    known = [lab in seen for lab in labels]
    return "seen" if all(known) else "unseen" if not any(known) else "seen+unseen"


def kept(data: Block) -> list[int]:
    """Items whose every class has a non-empty oracle mask (the detector found it)."""
    return [i for i, it in enumerate(data.items) if bool(data.oracle[i, : len(it.labels)].flatten(1).any(1).all())]


def predict_masks(grounder: Grounder, data: Block, index: Sequence[int], batch: int = 32) -> dict[int, np.ndarray]:
    """{item: (K, H, W) bool} the module's masks of each item's classes."""
    out = {}
    for a in range(0, len(index), batch):
        idx = list(index[a : a + batch])
        logits = grounder.logits({s: f[idx] for s, f in data.features.items()}, [data.items[i].labels for i in idx])
        masks = binary_masks(logits).numpy()
        for j, i in enumerate(idx):
            out[i] = masks[j, : len(data.items[i].labels)]
    return out


def group_scores(
    data: Block, index: Sequence[int], masks: dict[str, dict[int, np.ndarray]], seen: Sequence[str]
) -> tuple[dict, dict, dict]:
    """Per source: {group: {"one"/"two": mIoU %}}, per-class IoU % by group, and the items per group."""
    conf: dict[tuple, np.ndarray] = {}
    counts: dict[str, dict[str, int]] = {}
    for i in index:
        it = data.items[i]
        group, n = group_of(it.labels, seen), COUNTS[len(it.labels)]
        counts.setdefault(group, {}).setdefault(n, 0)
        counts[group][n] += 1
        for k, lab in enumerate(it.labels):
            gt = data.oracle[i, k].numpy()
            for src in masks:
                key = (src, group, n, lab)
                conf[key] = conf.get(key, 0) + confusion(gt.astype(np.uint8), masks[src][i][k].astype(np.uint8), 2)
    iou: dict = {src: {} for src in masks}
    for (src, group, n, lab), c in sorted(conf.items()):
        iou[src].setdefault(group, {}).setdefault(n, {})[lab] = 100 * float(iou_per_class(c)[1])
    scores = {
        src: {g: {n: round(float(np.mean(list(v.values()))), 2) for n, v in sorted(by_n.items())} for g, by_n in groups.items()}
        for src, groups in iou.items()
    }
    per_class = {
        src: {g: {n: {lab: round(x, 2) for lab, x in v.items()} for n, v in by_n.items()} for g, by_n in groups.items()}
        for src, groups in iou.items()
    }
    return scores, per_class, counts


def evaluate_grounding(
    backbone,
    grounder: Grounder,
    out: str | Path,
    n: int,
    classes: Sequence[str],
    seed: int = 1,
    data_dir: str | Path | None = None,
    detector: str | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or reuse) the test items, score module and baseline, write ``out/report.json`` and ``report.md``.

    ``detector``: the test oracle (default: the one the module was trained with).
    """
    rec = grounder.record
    train = DataConfig.from_record(rec["data"])
    seen = list(rec["seen"])
    if rec["model"] != backbone.model_name:
        raise GroundingError(
            f"the module reads {rec['model']!r}'s features, not {backbone.model_name!r}'s; pass --model {rec['model']}"
        )
    if seed == train.seed:
        raise GroundingError(f"the test seed {seed} is the module's training seed; pass another --seed")
    unknown = [c for c in seen if c not in classes]
    if unknown:
        raise GroundingError(f"the module's seen classes {unknown} are not among the test classes {list(classes)}")
    # Same generation and oracle as the training data (the module reads the features of its last step).
    cfg = replace(train, kind="test", classes=tuple(classes), count=n, seed=seed, model=backbone.model_name)
    out = Path(out)
    detector = detector or rec["detector"]
    data = build_data(backbone, data_dir or out / "data", cfg, detector, progress)
    index = kept(data)
    masks = {"module": predict_masks(grounder, data, index)}
    for name, maps in data.baselines.items():
        masks[name] = {i: np.stack([maps[i].numpy() == k + 1 for k in range(len(data.items[i].labels))]) for i in index}
    scores, per_class, counts = group_scores(data, index, masks, seen)
    report = {
        **scores,
        "per_class": per_class,
        "items": {"generated": len(data.items), "kept": len(index), "by_group": counts},
        "settings": {
            "seen": seen,
            "unseen": [c for c in classes if c not in seen],
            "module": rec.get("folder"),
            "test_data": asdict(cfg),
            "detector": detector,
            "metric": "mIoU % against the oracle detector's masks; module: sigmoid > 0.5; baseline: CA (attnseg generate "
            "--method ca); baseline_decoder: CA over the decoder's cross layers",
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    return report


def markdown(report: dict) -> str:
    """The paper's Tab. 1 layout: one class (seen, unseen), two classes (seen, seen+unseen, unseen)."""
    cols = [("one", "seen"), ("one", "unseen"), ("two", "seen"), ("two", "seen+unseen"), ("two", "unseen")]
    lines = [
        "| masks | one: seen | one: unseen | two: seen | two: seen+unseen | two: unseen |",
        "|---|---|---|---|---|---|",
    ]
    for src in SOURCES:
        cells = []
        for n, g in cols:
            v = report[src].get(g, {}).get(n)
            cells.append("-" if v is None else f"{v:.1f}")
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    by = report["items"]["by_group"]
    cells = [str(by.get(g, {}).get(n, 0)) for n, g in cols]
    lines.append("| items | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
