"""``attnseg segment`` over many images: plan, skip what is done, run batches on an engine, write the outputs.

Files follow :mod:`attnseg.io.outputs` (the output contract). An image whose JSON records the same labels,
method, preset, model, seed and CRF setting is done and is skipped when the command is run again
(otherwise it is segmented again); a run killed mid-image leaves no JSON and the image is redone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attnseg.io.images import ImageError, list_images, load_image
from attnseg.io.labels import labels_for, load_labels_file
from attnseg.io.outputs import is_done, write_outputs
from attnseg.jobs.engine import run_tasks
from attnseg.methods.registry import NOTHING, REAL, names
from attnseg.predictor import AttnSegPredictor


@dataclass
class SegmentJobReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    weak: dict[str, list[str]] = field(default_factory=dict)
    """Images segmented now with labels of weak attention (perhaps not in the image): path -> labels."""


class SegmentWorker:
    """Segments one batch (a task: ``[{"path", "labels"}, ...]``) and writes its files.

    Returns ``[{"path", "error", "weak"}]``: error is None for a written image, else why it was not segmented; weak
    lists its labels of weak attention.
    """

    def __init__(self, predictor, out: str | Path, options: dict) -> None:
        self.predictor, self.out, self.options = predictor, Path(out), options

    def __call__(self, task: list[dict]) -> list[dict]:
        results, batch = [], []
        for job in task:
            try:
                batch.append((job, load_image(job["path"])))
            except ImageError as e:
                results.append({"path": job["path"], "error": str(e)})
        if not batch:
            return results
        try:
            segs = self.predictor.segment_batch([im for _, im in batch], [job["labels"] for job, _ in batch], **self.options)
        except ValueError as e:
            if len(batch) == 1:
                return [*results, {"path": batch[0][0]["path"], "error": str(e)}]
            # One image's problem must not fail the others of its batch: each on its own.
            return results + [r for job, _ in batch for r in self([job])]
        for (job, image), res in zip(batch, segs, strict=True):
            stem = Path(job["path"]).stem
            p = self.predictor
            write_outputs(self.out, stem, image, res, p.model_name, job["path"], self.options.get("preset"), p.weights)
            results.append({"path": job["path"], "error": None, "weak": res.weak_labels})
        return results


def _segment_worker(model, out: str, options: dict, device: str = "auto", dtype: str = "auto") -> SegmentWorker:
    """Worker factory of an engine process: loads the model there, on ``device`` with ``dtype``."""
    return SegmentWorker(AttnSegPredictor.from_pretrained(model, device=device, dtype=dtype), out, options)


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
    device: str = "auto",
    dtype: str = "auto",
) -> SegmentJobReport:
    """Segment every image of ``inputs`` (files or folders) into ``out``; skip finished ones."""
    out = Path(out)
    table = load_labels_file(labels_file) if labels_file else None
    report = SegmentJobReport()

    def fail(src: str, msg: str) -> None:
        report.failed[src] = msg
        if on_error:
            on_error(src, msg)

    preset = preset or predictor.default_presets.get(method)  # the model's recommended preset, recorded as such
    unlabelled = method in names(REAL, NOTHING)  # DiffSeg: segments without class names
    if not unlabelled:
        predictor.check_method(method, preset)  # a method this model cannot run fails here, not once per image
    seen: dict[str, Path] = {}
    todo: list[dict] = []
    for p in list_images(inputs):
        stem = p.stem
        if stem in seen:
            fail(str(p), f"same file name stem as {seen[stem]}; outputs would collide, rename one of them")
            continue
        seen[stem] = p
        try:
            labs = [] if unlabelled else labels_for(p, labels, table)
            if not unlabelled:
                predictor.prompt_for(labs, method, preset)  # a label the tokenizer cannot place fails here, not mid-run
        except ValueError as e:
            fail(str(p), str(e))
            continue
        done = is_done(
            out / f"{stem}.json",
            None if unlabelled else labs,
            method,
            preset,
            predictor.model_name,
            seed,
            crf,
            draws,
            predictor.weights,
        )
        if done:
            report.skipped.append(str(p))
            continue
        todo.append({"path": str(p), "labels": labs})

    options = {"method": method, "preset": preset, "draws": draws, "seed": seed, "crf": crf}
    tasks = [todo[b0 : b0 + batch_size] for b0 in range(0, len(todo), batch_size)]
    local = SegmentWorker(predictor, out, options) if engine == "local" else None
    factory = functools.partial(_segment_worker, model, str(out), options, device, dtype)
    results = run_tasks(engine, tasks, factory, workers, local)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress, transient=False
    ) as bar:
        task = bar.add_task("segment", total=len(todo))
        for batch in results:
            for r in batch:
                if r["error"]:
                    fail(r["path"], r["error"])
                else:
                    report.done.append(r["path"])
                    if r["weak"]:
                        report.weak[r["path"]] = r["weak"]
                bar.advance(task)
    return report


def segment_with_prompts(
    predictor, src: str | Path, prompts: Sequence, out: str | Path, preset: str | None = None, seed: int = 0, crf=False
) -> Path:
    """Segment one image for visual prompts (points, boxes, scribbles; one object each) and write its four files.

    Returns the path of the mask. Raises ``ImageError`` for an unreadable image and ``ValueError`` for a prompt that
    does not fit it; nothing is written then.
    """
    image = load_image(src)
    predictor.set_image(image)
    preset = preset or predictor.default_presets.get("interactive")
    res = predictor.segment_prompts(prompts, preset=preset, seed=seed, crf=crf)
    write_outputs(Path(out), Path(src).stem, image, res, predictor.model_name, str(src), preset, predictor.weights)
    return Path(out) / f"{Path(src).stem}.png"
