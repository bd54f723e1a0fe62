"""Dataset-level jobs behind the CLI: segment many images and write the output contract.

Output contract of ``attnseg segment`` (other tools read it; keep it stable), per input ``<stem>``:
- ``<stem>.png``: palette PNG at the input's size, 0 = background, i = the i-th label as given;
- ``<stem>_overlay.png``: the image with the mask blended in;
- ``<stem>_scores.npz``: ``scores`` (K + 1, H, W) float16 (background first), ``confidence``
  (H, W) float16, ``labels``;
- ``<stem>.json``: ``labels``, ``method``, ``model``, ``prompt``, ``settings``, ``image``, ``size``.
The JSON is written last, each file atomically: an image whose JSON records the same labels,
method, preset, model, seed and CRF setting is done and is skipped when the command is run again
(otherwise it is segmented again); a run killed mid-image leaves no JSON and the image is redone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.diffusion.prompts import PromptError
from attnseg.io.images import ImageError, atomic_write_bytes, encode_png, list_images, load_image, overlay, palette_png


@dataclass
class SegmentJobReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def load_labels_file(path: str | Path) -> dict[str, list[str]]:
    """A JSON object mapping an image's file name (or stem) to its list of labels."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"labels file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"labels file {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"labels file {p} must be a JSON object mapping file names to lists of labels")
    return {str(k): [str(x) for x in v] for k, v in data.items()}


def labels_for(path: Path, labels: Sequence[str] | None, table: dict[str, list[str]] | None) -> list[str]:
    if table is not None:
        for key in (path.name, path.stem, str(path)):
            if key in table:
                return table[key]
        raise PromptError(f"no entry for {path.name} in the labels file; add it or remove the image")
    if not labels:
        raise PromptError("no labels given: pass --labels L1 L2 ... or --labels-file F")
    return list(labels)


def write_outputs(out: Path, stem: str, image: np.ndarray, result, model_name: str, src: str, preset: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{stem}.png", encode_png(palette_png(result.mask)))
    atomic_write_bytes(out / f"{stem}_overlay.png", encode_png(Image.fromarray(overlay(image, result.mask))))
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        scores=result.scores.astype(np.float16),
        confidence=result.confidence.astype(np.float16),
        labels=np.asarray(result.labels),
    )
    atomic_write_bytes(out / f"{stem}_scores.npz", buf.getvalue())
    meta = {
        "labels": result.labels,
        "method": result.method,
        "preset": preset,
        "model": model_name,
        "prompt": result.prompt,
        "image": src,
        "size": list(image.shape[:2]),
        "uncertain_fraction": float(result.uncertain.mean()),
        "settings": result.settings,
    }
    atomic_write_bytes(out / f"{stem}.json", json.dumps(meta, indent=1, default=str).encode())


def segment_paths(
    predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    labels_file: str | Path | None = None,
    method: str = "t2m",
    preset: str | None = None,
    draws: int | None = None,
    seed: int = 0,
    crf: bool = False,
    batch_size: int = 4,
    on_error: Callable[[str, str], None] | None = None,
    progress: bool = True,
    engine: str = "local",
    workers: int = 1,
    model=None,
) -> SegmentJobReport:
    """Segment every image of ``inputs`` (files or folders) into ``out``; skip finished ones."""
    out = Path(out)
    table = load_labels_file(labels_file) if labels_file else None
    report = SegmentJobReport()

    def fail(src: str, msg: str) -> None:
        report.failed[src] = msg
        if on_error:
            on_error(src, msg)

    paths = list_images(inputs)
    preset = preset or predictor.default_presets.get(method)  # the model's recommended preset, recorded as such
    method_obj = _method(method, preset)
    seen: dict[str, Path] = {}
    todo: list[tuple[Path, list[str]]] = []
    for p in paths:
        stem = p.stem
        if stem in seen:
            fail(str(p), f"same file name stem as {seen[stem]}; outputs would collide, rename one of them")
            continue
        seen[stem] = p
        try:
            labs = labels_for(p, labels, table)
            predictor._prompt(labs, method_obj)
        except (PromptError, ValueError) as e:
            fail(str(p), str(e))
            continue
        if _done_with(out / f"{stem}.json", labs, method, preset, predictor.model_name, seed, crf, draws):
            report.skipped.append(str(p))
            continue
        todo.append((p, labs))

    if engine == "ray":
        from attnseg.jobs.engine import run_segment_ray

        options = {"method": method, "preset": preset, "draws": draws, "seed": seed, "crf": crf}
        for src, err in run_segment_ray(model, [(str(p), labs) for p, labs in todo], out, options, workers):
            if err:
                fail(src, err)
            else:
                report.done.append(src)
        return report
    if engine != "local":
        raise ValueError(f"unknown engine {engine!r}: use local or ray")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress, transient=False
    ) as bar:
        task = bar.add_task("segment", total=len(todo))
        for b0 in range(0, len(todo), batch_size):
            batch = []
            for p, labs in todo[b0 : b0 + batch_size]:
                try:
                    batch.append((p, labs, load_image(p)))
                except ImageError as e:
                    fail(str(p), str(e))
                    bar.advance(task)
            if not batch:
                continue
            results = predictor.segment_batch(
                [im for _, _, im in batch],
                [labs for _, labs, _ in batch],
                method=method,
                preset=preset,
                draws=draws,
                seed=seed,
                crf=crf,
            )
            for (p, _, im), res in zip(batch, results, strict=True):
                write_outputs(out, p.stem, im, res, predictor.model_name, str(p), preset)
                report.done.append(str(p))
                bar.advance(task)
    return report


def _done_with(meta_path: Path, labels, method, preset, model, seed, crf, draws) -> bool:
    """True when ``meta_path`` records this very request (else the image is segmented again)."""
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = meta.get("settings", {})
    return (
        meta.get("labels") == list(labels)
        and meta.get("method") == method
        and meta.get("preset") == preset
        and meta.get("model") == model
        and st.get("seed") == seed
        and st.get("crf") == bool(crf)
        and (draws is None or st.get("draws") == draws)
    )


def _method(name: str, preset: str | None):
    from attnseg.methods import get_method

    return get_method(name, preset)
