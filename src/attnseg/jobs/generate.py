"""``attnseg generate``: a labelled synthetic dataset of generated images and masks, resumable.

The folder's layout is :mod:`attnseg.io.generated`'s. The unit of work is a block of items, run by an
engine of :mod:`attnseg.jobs.engine` (local or Ray); the driver alone appends manifest lines.

Item i's seed is derived from (--seed, i) and items are generated in fixed blocks of
``block`` items, so every item is byte-identical whatever the engine or the worker count.
A run killed at any moment and started again with the same command ends with every item
exactly once: files are written to a temporary name and renamed, the manifest line is appended
(and fsynced) last, a torn last line is dropped, and items without a manifest line are redone.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attnseg.diffusion.loading import load_backbone
from attnseg.generator import generate_with_masks
from attnseg.io.files import atomic_write_bytes, settings_diff
from attnseg.io.generated import MANIFEST, append_manifest, read_manifest, write_classes, write_coco, write_item
from attnseg.jobs.engine import EngineError, run_tasks


class SynthError(ValueError):
    """Bad input to a generation run; the message says what to do."""


@dataclass
class Item:
    index: int
    id: str
    prompt: str
    labels: list[str]


@dataclass
class RunSpec:
    """Everything that determines the files of a run (stored in run.json)."""

    items: int
    classes: list[str]
    method: str
    preset: str | None
    model: str
    steps: int
    guidance: float
    seed: int
    block: int
    template: str | None = None
    prompts_sha: str | None = None
    cpu_threads: int = 1
    """Intra-op threads per block on CPU; float results depend on it, so it is part of the run."""
    device: str = "cpu"
    """Device type and dtype: results differ across them, so they are part of the run too."""
    dtype: str = "float32"
    weights: str | None = None
    """Fingerprint of the model folder's weights (:func:`~attnseg.diffusion.loading.weights_fingerprint`)."""
    extra: dict = field(default_factory=dict)


def item_seed(seed: int, index: int) -> int:
    """Seed of item ``index``: independent of engine, worker count and order."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def plan_items(
    classes: Sequence[str] | None, per_class: int, template: str = "a photo of a {}", prompts_file: str | Path | None = None
) -> tuple[list[Item], list[str], str | None]:
    """The list of items, the class list and a digest of the prompts file."""
    import hashlib

    if per_class < 1:
        raise SynthError("--per-class must be at least 1")
    items: list[Item] = []
    digest = None
    if prompts_file is not None:
        p = Path(prompts_file)
        if not p.is_file():
            raise SynthError(f"prompts file {p} does not exist")
        raw = p.read_text(encoding="utf-8")
        digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
        entries = []
        for ln_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    d = json.loads(line)
                    entries.append((str(d["prompt"]), [str(x) for x in d["labels"]]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SynthError(f"{p}:{ln_no}: expected a JSON object with 'prompt' and 'labels'") from None
            else:
                if not classes:
                    raise SynthError("a .txt prompts file needs --classes: the labels of a prompt are the classes it names")
                labs = [c for c in classes if _names(line, c)]
                if not labs:
                    raise SynthError(f"{p}:{ln_no}: the prompt {line.strip()!r} names none of the classes {list(classes)}")
                entries.append((line.strip(), labs))
        if not entries:
            raise SynthError(f"prompts file {p} holds no prompt")
        all_labels = list(dict.fromkeys([lab for _, labs in entries for lab in labs]))
        classes = list(classes) if classes else all_labels
        for lab in all_labels:
            if lab not in classes:
                raise SynthError(f"label {lab!r} of the prompts file is not among --classes {list(classes)}")
        for prompt, labs in entries:
            for _ in range(per_class):
                idx = len(items)
                items.append(Item(idx, f"{idx:06d}", prompt, labs))
    else:
        if not classes:
            raise SynthError("give --classes A B ... or --prompts FILE")
        if "{}" not in template:
            raise SynthError(f"template {template!r} has no {{}} for the class name")
        try:
            template.format("x")
        except (KeyError, IndexError, ValueError):
            raise SynthError(f"template {template!r} must hold exactly one {{}} and no other braces") from None
        for c in classes:
            if not c.strip():
                raise SynthError("empty class name in --classes")
        for c in classes:
            for _ in range(per_class):
                idx = len(items)
                items.append(Item(idx, f"{idx:06d}", template.format(c), [c]))
    return items, list(classes), digest


def _names(text: str, word: str) -> bool:
    import re

    return re.search(r"(?<![\w])" + re.escape(word.lower()) + r"(?![\w])", text.lower()) is not None


def prepare_run(out: Path, spec: RunSpec, resume: bool) -> None:
    """Create ``out`` or check that it holds the same run; refuse another run's folder."""
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run.json"
    mine = asdict(spec)
    if run.exists():
        theirs = json.loads(run.read_text())
        theirs.setdefault("weights", mine["weights"])  # a run written before weights fingerprints were recorded
        diff = settings_diff(mine, theirs)
        if diff:
            raise SynthError(
                f"{out} holds another run (different {', '.join(diff)}); use a new --out folder, "
                "or repeat that run's exact settings to resume it"
            )
        return
    if resume:
        raise SynthError(f"--resume given but {out} holds no run to resume")
    if (out / MANIFEST).exists():
        raise SynthError(f"{out} holds a manifest without run.json; use a new --out folder")
    atomic_write_bytes(run, json.dumps(mine, indent=1).encode())


def module_record(method: str, module: str | Path | None) -> dict:
    """What of the grounding module a run records in ``extra`` (its folder and a digest of its weights, part of the
    run's identity); empty for the other methods, which take no module."""
    import hashlib

    from attnseg.grounder import SHIPPED, load_module

    if method != "grounding":
        if module is not None:
            raise SynthError(f"--module is the trained module of --method grounding; {method} takes none")
        return {}
    folder = Path(module) if module is not None else SHIPPED
    try:
        load_module(folder)
    except (ValueError, OSError, RuntimeError) as e:
        raise SynthError(str(e)) from None
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]
    # The shipped module is recorded as None, not by its path, which changes with every install.
    return {"module": str(folder.resolve()) if module is not None else None, "module_sha": digest}


def run_block(backbone, block: list[Item], spec: RunSpec, grounder=None):
    """Generate one block of items (the unit of work of every engine).

    On CPU the block runs with ``spec.cpu_threads`` intra-op threads whatever the engine, so that
    the same item is byte-identical across engines and worker counts.
    """
    import torch

    gens = [torch.Generator().manual_seed(item_seed(spec.seed, it.index)) for it in block]
    before = torch.get_num_threads()
    if backbone.device.type == "cpu":
        torch.set_num_threads(spec.cpu_threads)
    try:
        return generate_with_masks(
            backbone,
            [it.prompt for it in block],
            [it.labels for it in block],
            method=spec.method,
            preset=spec.preset,
            generators=gens,
            grounder=grounder,
            steps=spec.steps,
            guidance=spec.guidance,
        )
    finally:
        torch.set_num_threads(before)


class BlockWorker:
    """Generates one block (a task: its items and the indices already done) and writes its files.

    Returns the manifest records of the items it wrote; the caller appends them.
    """

    def __init__(self, backbone, out: str | Path, spec: RunSpec) -> None:
        self.backbone, self.out, self.spec = backbone, Path(out), spec
        self.grounder = None
        if spec.method == "grounding":
            from attnseg.grounder import Grounder

            self.grounder = Grounder.from_folder(backbone, spec.extra["module"])

    def __call__(self, task: dict) -> list[dict]:
        block = [Item(**d) for d in task["items"]]
        skip = set(task["skip"])
        gens = run_block(self.backbone, block, self.spec, self.grounder)
        return [
            write_item(
                self.out,
                it.id,
                it.index,
                it.prompt,
                it.labels,
                g.image,
                g.mask,
                self.spec.classes,
                item_seed(self.spec.seed, it.index),
                g.unseeded,
            )
            for it, g in zip(block, gens, strict=True)
            if it.index not in skip
        ]


def _block_worker(model, out: str, spec: dict) -> BlockWorker:
    """Worker factory of an engine process: loads the model there on the run's device type and dtype, which are
    part of the run (results differ across them); a ``cuda`` run takes the process's GPU."""
    run = RunSpec(**spec)
    return BlockWorker(load_backbone(model, device="auto" if run.device == "cuda" else run.device, dtype=run.dtype), out, run)


def generate_dataset(
    backbone,
    out: str | Path,
    items: list[Item],
    spec: RunSpec,
    resume: bool = False,
    progress: bool = True,
    engine: str = "local",
    workers: int = 1,
    model=None,
) -> dict:
    """Generate every item not yet in the manifest, then rebuild annotations.json."""
    out = Path(out)
    prepare_run(out, spec, resume)
    write_classes(out, spec.classes)
    done = read_manifest(out / MANIFEST)
    blocks = [items[i : i + spec.block] for i in range(0, len(items), spec.block)]
    tasks = [
        {"items": [asdict(it) for it in b], "skip": [it.index for it in b if it.index in done]}
        for b in blocks
        if any(it.index not in done for it in b)
    ]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    n_done_before = len(done)
    factory = functools.partial(_block_worker, model, str(out), asdict(spec))
    try:
        results = run_tasks(
            engine, tasks, factory, workers, local_worker=BlockWorker(backbone, out, spec) if engine == "local" else None
        )
        with Progress(
            TextColumn(f"generate ({engine})" if engine != "local" else "generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task("generate", total=len(items), completed=len(done))
            for recs in results:
                recs = [r for r in recs if r["index"] not in done]
                append_manifest(out / MANIFEST, recs)
                for r in recs:
                    done[r["index"]] = r
                bar.update(task, completed=len(done))
    except EngineError as e:
        raise SynthError(str(e)) from None
    done = read_manifest(out / MANIFEST)
    coco = write_coco(out, spec.classes)
    empty = sum(1 for r in done.values() if r.get("empty_labels"))
    return {
        "items": len(items),
        "generated": len(done) - n_done_before,
        "done": len(done),
        "annotations": str(coco),
        "with_empty_labels": empty,
    }
