"""``attnseg eval``: pseudo-mask quality of methods on a labelled dataset (WSSS protocol).

For every image the labels given to a method are the classes present in its ground truth
(or a labels file, or the classes the model tags it with from a vocabulary: :mod:`attnseg.tagging`, which
measures tagging and segmentation as one chain). Predictions are cached per image under
``REPORT_DIR/cache/<method>/`` as palette PNGs in the dataset's class-index space (tags under
``cache/tags/``), so a killed evaluation resumes where it stopped.
One confusion matrix per method is accumulated over the split.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.io.datasets import image_labels
from attnseg.io.files import atomic_write_bytes, settings_diff
from attnseg.io.images import encode_png, palette_png
from attnseg.io.labels import load_labels_file
from attnseg.io.reports import bar_chart, markdown_table, qualitative_grid
from attnseg.methods.registry import NOTHING, names
from attnseg.ops.metrics import confusion, hungarian_confusion, summarize
from attnseg.segnet import Segmenter
from attnseg.tagging import TagConfig, Tagger, TagResult

UNSUPERVISED = tuple(names(guide=NOTHING))
"""Methods that segment without labels: scored after Hungarian matching of their segments to classes."""
GROUNDING = "grounding"
"""Grounded Diffusion's trained module (:class:`~attnseg.grounder.Grounder`), read on the real image as ``attnseg
segment --method grounding`` reads it; its settings are the module's, so it takes no preset."""


@dataclass(frozen=True)
class MethodSpec:
    """``method``, ``method:preset`` or either with ``+crf``; ``key`` names its cache folder."""

    method: str
    preset: str | None = None
    crf: bool = False

    @classmethod
    def parse(cls, text: str, crf: bool = False) -> MethodSpec:
        base = text
        if base.endswith("+crf"):
            base, crf = base[: -len("+crf")], True
        method, _, preset = base.partition(":")
        return cls(method, preset or None, crf)

    @property
    def key(self) -> str:
        k = self.method + (f"-{self.preset}" if self.preset else "")
        return k + ("+crf" if self.crf else "")


def _labels_from_table(table: dict, sample) -> list[str]:
    for key in (sample.image_path.name, f"{sample.id}.png", f"{sample.id}.jpg", sample.id, str(sample.image_path)):
        if key in table:
            return table[key]
    raise ValueError(f"no entry for {sample.image_path.name} in the labels file; add it or evaluate without --labels-file")


def _check_cache_settings(folder: Path, settings: dict) -> None:
    """Cached predictions are reused only when made with the same settings; refuse a mixed cache."""
    f = folder / "settings.json"
    if f.exists():
        old = json.loads(f.read_text())
        if "weights" not in old:  # a cache written before weights fingerprints were recorded: taken as these weights'
            old["weights"] = settings.get("weights")
        diff = settings_diff(old, settings)
        if diff:
            raise ValueError(
                f"{folder} holds predictions made with other settings ({', '.join(diff)}); use another --out folder "
                "or delete that cache"
            )
    else:
        atomic_write_bytes(f, json.dumps(settings, indent=1).encode())


def _predict_ids(
    predictor, grounder, image: np.ndarray, labels: list[str], classes: Sequence[str], spec: MethodSpec, draws, seed
) -> np.ndarray:
    if spec.method == GROUNDING:
        res = grounder.segment_result(image, labels, seed=seed, crf=spec.crf)
    else:
        res = predictor.segment_batch(
            [image], [labels], method=spec.method, preset=spec.preset, draws=draws, seed=seed, crf=spec.crf
        )[0]
    unknown = [lab for lab in labels if lab not in classes]
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of the dataset ({', '.join(classes[1:])})")
    lut = np.array([0] + [classes.index(lab) for lab in labels], dtype=np.uint8)
    return lut[res.mask]


def _grounder(predictor, module: str | Path | None):
    """The grounding module of ``module`` on the predictor's model (refused when trained on another model's features)
    and the digest of its weights that the caches record."""
    from attnseg.grounder import Grounder

    grounder = Grounder.from_folder(predictor.backbone, module)
    grounder.check()
    weights = Path(grounder.record["folder"]) / "model.safetensors"
    return grounder, hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def evaluate(
    predictor,
    dataset,
    methods: Sequence[str],
    out: str | Path,
    crf: bool = False,
    limit: int | None = None,
    labels_file: str | Path | None = None,
    draws: int | None = None,
    seed: int = 0,
    progress: bool = True,
    grid_rows: int = 6,
    segmenters: Sequence[str | Path] = (),
    vocabulary: Sequence[str] | None = None,
    module: str | Path | None = None,
) -> dict:
    """Evaluate ``methods`` on ``dataset``; write report.json, report.md and PNG charts to ``out``.

    ``segmenters`` are folders of :mod:`attnseg.segnet` models (trained by ``attnseg train-segmenter``) (Protocol II): they see the image only,
    not its labels; ``predictor`` may be None when only segmenters are evaluated.
    ``vocabulary``: class names the model tags each image from (:class:`~attnseg.tagging.Tagger`); the methods get the
    tags instead of the ground truth's labels, and the report's ``tagging`` holds their precision and recall.
    ``module``: the grounding module that the method ``grounding`` reads (None: the one shipped with the embedded model).
    """
    out = Path(out)
    classes = list(dataset.classes)
    segs = {}
    for folder in segmenters:
        sg = Segmenter.load(folder)
        key = f"segmenter-{sg.name}"
        if key in segs:
            raise ValueError(f"two segmenters are named {sg.name}; give them folders with different names")
        segs[key] = (sg, sg.lut_to(classes), hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()[:16])
    if methods and predictor is None:
        raise ValueError("methods need a predictor")
    specs: list[MethodSpec] = []
    for m in methods:
        s = MethodSpec.parse(m)
        if s.method == GROUNDING and s.preset is not None:
            raise ValueError(f"{m}: grounding has no presets, its settings are the trained module's (--module)")
        if s.preset is None and s.method != GROUNDING:
            # The model's recommended preset (its attnseg.json), named in the report's keys.
            s = MethodSpec(s.method, predictor.default_presets.get(s.method), s.crf)
        for spec in (s, MethodSpec(s.method, s.preset, True)) if crf and not s.crf else (s,):
            if spec not in specs:  # "t2m" and "t2m:embedded" can name the same thing
                specs.append(spec)
    table = load_labels_file(labels_file) if labels_file else None
    tagger, tags_digest = _tagger(predictor, vocabulary, classes, labels_file)
    settings = {
        "draws": draws,
        "seed": seed,
        "model": predictor.model_name if predictor is not None else None,
        "weights": predictor.weights if predictor is not None else None,
        "labels_file": hashlib.sha256(Path(labels_file).read_bytes()).hexdigest()[:16] if labels_file else None,
    }
    if tagger is not None:  # recorded only then: caches of runs without a vocabulary stay as they were
        settings["vocabulary"] = tags_digest
        _check_cache_settings(out / "cache" / "tags", {"model": settings["model"], "vocabulary": tags_digest})
    grounder, module_digest = _grounder(predictor, module) if any(s.method == GROUNDING for s in specs) else (None, None)
    for s in specs:
        # the grounding module takes no noise draws: its cache records its weights instead
        which = {"draws": None, "module": module_digest} if s.method == GROUNDING else {}
        _check_cache_settings(out / "cache" / s.key, {**settings, "method": s.method, "preset": s.preset, "crf": s.crf, **which})
    for key, (_, _, digest) in segs.items():
        _check_cache_settings(out / "cache" / key, {"segmenter": key, "weights": digest})
    confs = {s.key: np.zeros((len(classes), len(classes) + (1 if s.method in UNSUPERVISED else 0)), np.int64) for s in specs}
    confs.update({key: np.zeros((len(classes), len(classes)), np.int64) for key in segs})
    samples = []
    tag_counts = np.zeros(3, np.int64)  # true positives, tags, ground-truth labels
    ids = list(dataset.ids)[: limit or None]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("eval", total=len(ids) * (len(specs) + len(segs)))
        for sid in ids:
            sample = dataset.sample(sid)
            labels = _labels_from_table(table, sample) if table is not None else image_labels(sample.gt, classes)
            unknown = [lab for lab in labels if lab not in classes]
            if unknown:
                raise ValueError(f"{sample.id}: labels {unknown} are not classes of the dataset ({', '.join(classes[1:])})")
            image = functools.cache(sample.image)  # read once, and only if a prediction is not cached
            if tagger is not None:
                truth = set(labels)
                tag = functools.partial(_tag, tagger, predictor, image, vocabulary)
                labels = _cached_tags(out / "cache" / "tags" / f"{sample.id}.json", tag)
                tag_counts += [len(truth & set(labels)), len(labels), len(truth)]
            preds = {}
            for spec in specs:
                make = functools.partial(
                    _method_prediction, predictor, grounder, image, labels, classes, spec, draws, seed, sample.gt.shape
                )
                pred = _cached(out / "cache" / spec.key / f"{sample.id}.png", make)
                score = hungarian_confusion if spec.method in UNSUPERVISED else confusion
                confs[spec.key] += score(sample.gt, pred, len(classes))
                preds[spec.key] = pred  # diffseg: raw segment ids (palette colours) in the qualitative grid
                bar.advance(task)
            for key, (sg, lut, _) in segs.items():
                make = functools.partial(_segmenter_prediction, sg, lut, image)
                pred = _cached(out / "cache" / key / f"{sample.id}.png", make)
                confs[key] += confusion(sample.gt, pred, len(classes))
                preds[key] = pred
                bar.advance(task)
            if len(samples) < grid_rows:
                samples.append((sample, preds))
    source = "tagged by the model from a vocabulary (attnseg.tagging)" if tagger is not None else "from the ground truth"
    report = {
        "dataset": str(getattr(dataset, "root", "")),
        "classes": classes,
        "images": len(ids),
        "protocol": f"image-level labels {source}; one confusion matrix per method over the split; 255 ignored; "
        "mIoU over classes present in the ground truth; unsupervised methods (diffseg) matched to classes by the Hungarian "
        "algorithm per image, unmatched segments counted as errors; segmenters (Protocol II) see the image only",
        "model": predictor.model_name if predictor is not None else None,
        "methods": {key: summarize(c, classes) for key, c in confs.items()},
    }
    if tagger is not None:
        tp, tagged, true = (int(x) for x in tag_counts)
        report["tagging"] = {
            "vocabulary": list(vocabulary),
            "precision": round(tp / max(tagged, 1), 4),
            "recall": round(tp / max(true, 1), 4),
            "config": asdict(tagger.config),
        }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "report.md", markdown_table(report).encode())
    atomic_write_bytes(out / "per_class.png", encode_png(bar_chart(report)))
    atomic_write_bytes(out / "qualitative.png", encode_png(qualitative_grid(samples, list(confs))))
    return report


def _tagger(predictor, vocabulary, classes: Sequence[str], labels_file) -> tuple[Tagger | None, str | None]:
    """The tagger of ``vocabulary`` and the digest of its words and settings that the caches record (None, None:
    labels from the ground truth or a labels file)."""
    if vocabulary is None:
        return None, None
    if labels_file:
        raise ValueError("labels come from a labels file or are tagged from a vocabulary, not both")
    if predictor is None:
        raise ValueError("tagging from a vocabulary needs a model: give at least one --method")
    if not vocabulary:
        raise ValueError("the vocabulary is empty: give at least one class name")
    unknown = [w for w in vocabulary if w not in classes[1:]]
    if unknown:
        raise ValueError(f"vocabulary words {unknown} are not classes of the dataset ({', '.join(classes[1:])})")
    tagger = Tagger(predictor.backbone, TagConfig(), max_batch=predictor.max_batch)
    record = json.dumps({"words": sorted(vocabulary), "config": asdict(tagger.config)}, sort_keys=True)
    return tagger, hashlib.sha256(record.encode()).hexdigest()[:16]


def _tag(tagger: Tagger, predictor, image: Callable[[], np.ndarray], vocabulary) -> TagResult:
    return tagger.tag(predictor.encode_images([image()]), vocabulary)[0]


def _cached_tags(cache: Path, compute: Callable[[], TagResult]) -> list[str]:
    """One image's tags from the cache, or computed now and cached with their scores."""
    if cache.exists():
        return json.loads(cache.read_text())["labels"]
    res = compute()
    atomic_write_bytes(cache, json.dumps({"labels": res.labels, "scores": res.scores}).encode())
    return res.labels


def _cached(cache: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """One image's prediction from the cache, or computed now and cached (atomically, so a kill loses nothing)."""
    if cache.exists():
        return np.asarray(Image.open(cache), dtype=np.uint8)
    pred = compute()
    atomic_write_bytes(cache, encode_png(palette_png(pred)))
    return pred


def _method_prediction(
    predictor, grounder, image: Callable[[], np.ndarray], labels, classes, spec: MethodSpec, draws, seed: int, shape
) -> np.ndarray:
    """A method's label map in the dataset's class ids (segment ids for unsupervised methods)."""
    if spec.method in UNSUPERVISED:
        return _unsupervised(predictor, image(), spec, seed)
    if not labels:
        return np.zeros(shape, np.uint8)
    return _predict_ids(predictor, grounder, image(), list(labels), classes, spec, draws, seed)


def _segmenter_prediction(segmenter, lut: np.ndarray, image: Callable[[], np.ndarray]) -> np.ndarray:
    return lut[segmenter.predict(image())]


def _unsupervised(predictor, image, spec: MethodSpec, seed: int) -> np.ndarray:
    seg = predictor.segment_unsupervised([image], spec.preset, seed=seed, method=spec.method)[0]
    if seg.max() > 254:
        raise ValueError("more than 255 segments cannot be cached as a palette PNG")
    return seg.astype(np.uint8)
