"""``attnseg bench personal``: personalized referring segmentation on ShapesWorld, the analog of Mug19 (T2M 5.3).

Builds the benchmark of :mod:`attnseg.shapes.personal` (deterministic by seed), learns one concept per look with each
learning method (:mod:`attnseg.train.personalize`; a concept already in the folder is kept, so a killed run resumes),
then segments every test scene three ways, as T2M's Table 7 does: ``attnseg`` ("a red <striped> circle": the learned
token and the context), ``subject_only`` ("a <striped> circle") and ``context_only`` ("a red circle"), all with the
same region, segments and assignment; and, learning nothing, ``look_words`` ("a red striped circle": the look said in
the words that training captions may use for it, an upper baseline for a model that learned them). Writes
``personal.json`` ``{learning method: {row: {split: {"miou", "bf_acc", "af_acc"}}}, "look_words": {split: {...}},
"settings": {...}}`` (percent) and ``personal.md``.

Layout of ``out``: ``photos/<look>/NN.png`` (the training photos), ``scenes/NNNN.png`` (the test images),
``concepts/<method>/<look>-<settings digest>.safetensors`` (with their sample grids), ``personal.json``, ``personal.md``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.concepts import METHODS
from attnseg.io.files import atomic_write_bytes
from attnseg.methods.personal import PersonalConfig, accuracy, iou, true_segments
from attnseg.shapes.personal import SPLITS, PersonalScene, test_scene, token_of, training_photos
from attnseg.shapes.world import LOOKS
from attnseg.train.personalize import PersonalizeConfig, learn_concept, read_photos, settings_digest

ROWS: tuple[str, ...] = ("attnseg", "subject_only", "context_only")


@dataclass
class PersonalBenchConfig:
    """Settings of the benchmark."""

    shape: str = "circle"
    """The class (Mug19 has one: mug)."""
    looks: tuple[str, ...] = LOOKS
    """The personal instances: one concept each."""
    photos: int = 8
    """Training photos per instance (Mug19: 5-10)."""
    scenes: int = 100
    """Test scenes of 3-5 objects."""
    seed: int = 1
    """Seeds the photos, the scenes, concept learning and the noise (the segmentation settings were chosen on scenes
    of seed 0)."""
    methods: tuple[str, ...] = METHODS
    learn: PersonalizeConfig = field(default_factory=lambda: PersonalizeConfig(samples=4))
    segment: PersonalConfig = field(default_factory=PersonalConfig)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def photos_dir(out: Path, cfg: PersonalBenchConfig, look: str) -> Path:
    """The training photos of ``look``: one folder per seed and photo count, so that another run never reuses them."""
    return out / "photos" / f"seed{cfg.seed}-n{cfg.photos}" / look


def concept_path(out: Path, cfg: PersonalBenchConfig, method: str, look: str) -> Path:
    """The concept file of ``look`` learned by ``method``, named by a digest of the learning settings and the photos'
    folder, so that a run with other settings learns its own instead of reusing another's."""
    key = settings_digest(replace(cfg.learn, method=method), {"photos": str(photos_dir(out, cfg, look).relative_to(out))})
    return out / "concepts" / method / f"{look}-{key}.safetensors"


def build_benchmark(out: Path, cfg: PersonalBenchConfig) -> list[PersonalScene]:
    """Write the training photos and test images under ``out``; the test scenes."""
    for look in cfg.looks:
        for i, im in enumerate(training_photos(look, cfg.shape, cfg.photos, cfg.seed)):
            path = photos_dir(out, cfg, look) / f"{i:02d}.png"
            if not path.is_file():
                atomic_write_bytes(path, _png(im))
    scenes = [test_scene(i, cfg.seed, cfg.shape, cfg.looks) for i in range(cfg.scenes)]
    for i, sc in enumerate(scenes):
        path = out / "scenes" / f"seed{cfg.seed}" / f"{i:04d}.png"
        if not path.is_file():
            atomic_write_bytes(path, _png(sc.image))
    return scenes


def score_scene(predictor, scene: PersonalScene, row: str, cfg: PersonalBenchConfig, seed: int) -> list[dict]:
    """One record per object of ``scene`` queried the ``row`` way: its splits, bf and af correctness and IoU."""
    predictor.set_image(scene.image)
    queries = [o.query(row) for o in scene.objects]
    pm = predictor.personal_maps(queries, cfg.shape, cfg.segment, seed)
    h, w = scene.instance.shape
    seg = F.interpolate(pm.segments.view(1, 1, *pm.grid).float(), size=(h, w), mode="nearest")[0, 0].long().numpy()
    truth = true_segments(scene.instance, len(queries), seg)
    recs = []
    for q in range(len(queries)):
        af = int(pm.af[q])
        recs.append(
            {
                "splits": scene.splits(q),
                "bf": accuracy([int(pm.bf[q])], [int(truth[q])]),
                "af": accuracy([af], [int(truth[q])]),
                "iou": iou(seg == af if af >= 0 else np.zeros_like(seg, bool), scene.instance == q + 1),
            }
        )
    return recs


def segment_rows(
    predictor, scenes: Sequence[PersonalScene], rows: Sequence[str], cfg: PersonalBenchConfig, report: Callable[[int, int], None]
) -> dict:
    """{row: summary} of every scene queried each of the ``rows`` ways; ``report(i, n)`` after each scene."""
    records: dict[str, list[dict]] = {row: [] for row in rows}
    for i, sc in enumerate(scenes):
        for row in rows:
            records[row].extend(score_scene(predictor, sc, row, cfg, cfg.seed + i))
        report(i + 1, len(scenes))
    return {row: summarise(records[row]) for row in rows}


def summarise(records: Sequence[dict]) -> dict:
    """{split: {"miou", "bf_acc", "af_acc", "n"}} in percent over the records of each split."""
    out = {}
    for split in SPLITS:
        rs = [r for r in records if split in r["splits"]]
        if not rs:
            out[split] = {"miou": None, "bf_acc": None, "af_acc": None, "n": 0}
            continue
        out[split] = {
            "miou": round(100 * float(np.mean([r["iou"] for r in rs])), 1),
            "bf_acc": round(100 * float(np.mean([r["bf"] for r in rs])), 1),
            "af_acc": round(100 * float(np.mean([r["af"] for r in rs])), 1),
            "n": len(rs),
        }
    return out


def _table_row(learning: str, query: str, summary: dict) -> str:
    cells = [summary[s][k] for s in SPLITS for k in ("miou", "bf_acc", "af_acc")]
    return f"| {learning} | {query} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |"


def markdown(results: dict) -> str:
    """The table of ``personal.json`` (T2M's Table 7 layout), one block per learning method."""
    lines = [
        "| learning | query | all mIoU | all bf_acc | all af_acc | semantic mIoU | semantic bf_acc | semantic af_acc "
        "| visual mIoU | visual bf_acc | visual af_acc |",
        "|---|---|" + "---|" * 9,
    ]
    for method in METHODS:
        if method not in results:
            continue
        lines += [_table_row(method, row, results[method][row]) for row in ROWS]
    if "look_words" in results:
        lines.append(_table_row("none", "look_words", results["look_words"]))
    n = next(iter(v for k, v in results.items() if k in METHODS))["attnseg"]
    lines.append("")
    lines.append(f"Instances: all {n['all']['n']}, semantic {n['semantic']['n']}, visual {n['visual']['n']}.")
    return "\n".join(lines) + "\n"


def run_personal_bench(
    out: str | Path,
    cfg: PersonalBenchConfig | None = None,
    predictor_factory: Callable[[], object] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Build the benchmark, learn the concepts, segment the scenes; write and return ``personal.json``'s content.

    ``predictor_factory()`` makes a fresh predictor (default: the embedded model on CPU); ``progress(what, i, n)``
    reports learning steps and scenes."""
    from attnseg.predictor import AttnSegPredictor

    cfg = cfg or PersonalBenchConfig()
    cfg = replace(cfg, learn=replace(cfg.learn, seed=cfg.seed))  # the learning method is set per row of the table
    out = Path(out)
    make = predictor_factory or (lambda: AttnSegPredictor.from_pretrained())
    scenes = build_benchmark(out, cfg)
    results: dict = {}
    timing: dict = {}

    def report(what: str) -> Callable[[int, int], None]:
        return (lambda i, n: progress(what, i, n)) if progress else (lambda i, n: None)

    t0 = time.time()
    results["look_words"] = segment_rows(make(), scenes, ("look_words",), cfg, report("segmenting (look words)"))["look_words"]
    timing["look_words"] = {"segment_s": round(time.time() - t0, 1)}
    for method in cfg.methods:
        t0 = time.time()
        files = []
        for look in cfg.looks:
            path = concept_path(out, cfg, method, look)
            if not path.is_file():
                learner = make()
                learn_concept(
                    learner.pipe,
                    read_photos(photos_dir(out, cfg, look)),
                    token_of(look),
                    cfg.shape,
                    path,
                    replace(cfg.learn, method=method),
                    progress=(lambda s, n, _loss, m=method, lk=look: progress(f"learning {m} {lk}", s, n)) if progress else None,
                )
            files.append(path)
        t1 = time.time()
        predictor = make()
        for path in files:
            predictor.load_concept(path)
        results[method] = segment_rows(predictor, scenes, ROWS, cfg, report(f"segmenting ({method})"))
        timing[method] = {"learn_s": round(t1 - t0, 1), "segment_s": round(time.time() - t1, 1)}
    settings = asdict(cfg)
    del settings["learn"]["method"]
    results["settings"] = {**settings, "seconds": timing, "threads": torch.get_num_threads()}
    atomic_write_bytes(out / "personal.json", json.dumps(results, indent=1).encode())
    atomic_write_bytes(out / "personal.md", markdown(results).encode())
    return results
