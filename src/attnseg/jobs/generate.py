"""``attnseg generate``: a labelled synthetic dataset of generated images and masks, resumable.

Layout of ``--out DIR``:
- ``images/<id>.png`` and ``masks/<id>.png`` (palette, 0 = background, class ids of classes.txt,
  255 = uncertain where the method defines it);
- ``manifest.jsonl``: one line per finished item (id, index, prompt, labels, seed, files), the
  record of what is done;
- ``annotations.json``: COCO instances with RLE masks (rebuilt from the manifest at the end);
- ``classes.txt`` (background first) and ``run.json`` (the settings of the run).

Item i's seed is derived from (--seed, i) and items are generated in fixed blocks of
``block`` items, so every item is byte-identical whatever the engine or the worker count.
A run killed at any moment and started again with the same command ends with every item
exactly once: files are written to a temporary name and renamed, the manifest line is appended
(and fsynced) last, a torn last line is dropped, and items without a manifest line are redone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attnseg.io.files import atomic_write_bytes, settings_diff
from attnseg.io.images import encode_png, palette_png


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


def read_manifest(path: Path) -> dict[int, dict]:
    """Finished items by index; a torn last line (killed mid-append) is dropped from the file."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        done[int(rec["index"])] = rec
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def append_manifest(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def prepare_run(out: Path, spec: RunSpec, resume: bool) -> None:
    """Create ``out`` or check that it holds the same run; refuse another run's folder."""
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run.json"
    mine = asdict(spec)
    if run.exists():
        theirs = json.loads(run.read_text())
        diff = settings_diff(mine, theirs)
        if diff:
            raise SynthError(
                f"{out} holds another run (different {', '.join(diff)}); use a new --out folder, "
                "or repeat that run's exact settings to resume it"
            )
        return
    if resume:
        raise SynthError(f"--resume given but {out} holds no run to resume")
    if (out / "manifest.jsonl").exists():
        raise SynthError(f"{out} holds a manifest without run.json; use a new --out folder")
    atomic_write_bytes(run, json.dumps(mine, indent=1).encode())


def write_item(out: Path, item: Item, gen, classes: Sequence[str], seed: int) -> dict:
    """Write one item's image and mask atomically; return its manifest record."""
    from PIL import Image

    lut = np.zeros(256, np.uint8)
    for i, lab in enumerate(item.labels, 1):
        lut[i] = classes.index(lab) + 1
    lut[255] = 255
    mask = lut[gen.mask]
    img_rel, mask_rel = f"images/{item.id}.png", f"masks/{item.id}.png"
    atomic_write_bytes(out / img_rel, encode_png(Image.fromarray(gen.image)))
    atomic_write_bytes(out / mask_rel, encode_png(palette_png(mask)))
    return {
        "id": item.id,
        "index": item.index,
        "prompt": item.prompt,
        "labels": item.labels,
        "seed": seed,
        "image": img_rel,
        "mask": mask_rel,
    }


def run_block(pipe, block: list[Item], spec: RunSpec):
    """Generate one block of items (the unit of work of every engine).

    On CPU the block runs with ``spec.cpu_threads`` intra-op threads whatever the engine, so that
    the same item is byte-identical across engines and worker counts.
    """
    import torch

    gens = [torch.Generator().manual_seed(item_seed(spec.seed, it.index)) for it in block]
    before = torch.get_num_threads()
    if pipe.device.type == "cpu":
        torch.set_num_threads(spec.cpu_threads)
    try:
        return _generate(pipe, block, spec, gens)
    finally:
        torch.set_num_threads(before)


def _generate(pipe, block: list[Item], spec: RunSpec, gens):
    from attnseg.generator import generate_with_masks

    return generate_with_masks(
        pipe,
        [it.prompt for it in block],
        [it.labels for it in block],
        method=spec.method,
        preset=spec.preset,
        generators=gens,
        steps=spec.steps,
        guidance=spec.guidance,
    )


def write_coco(out: Path, classes: Sequence[str]) -> Path:
    """annotations.json (COCO, RLE) from the manifest and the mask files."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise ImportError("COCO annotations need pycocotools: pip install 'attnseg[coco]'") from e
    from PIL import Image

    done = read_manifest(out / "manifest.jsonl")
    images, anns = [], []
    for idx in sorted(done):
        rec = done[idx]
        m = np.asarray(Image.open(out / rec["mask"]), dtype=np.uint8)
        h, w = m.shape
        images.append({"id": idx, "file_name": rec["image"], "height": h, "width": w})
        for c in sorted(int(v) for v in np.unique(m) if 0 < v < 255):
            rle = mask_utils.encode(np.asfortranarray((m == c).astype(np.uint8)))
            area = float(mask_utils.area(rle))
            bbox = [float(x) for x in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": idx,
                    "category_id": c,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in enumerate(classes, 1)],
    }
    atomic_write_bytes(out / "annotations.json", json.dumps(coco).encode())
    return out / "annotations.json"


def generate_dataset(
    pipe,
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
    classes = spec.classes
    atomic_write_bytes(out / "classes.txt", ("\n".join(["background", *classes]) + "\n").encode())
    done = read_manifest(out / "manifest.jsonl")
    blocks = [items[i : i + spec.block] for i in range(0, len(items), spec.block)]
    todo = [b for b in blocks if any(it.index not in done for it in b)]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    n_done_before = len(done)
    if engine == "ray":
        from attnseg.jobs.engine import run_blocks_ray

        run_blocks_ray(model, out, todo, spec, done, workers, progress)
    elif engine == "local":
        with Progress(
            TextColumn("generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task("generate", total=len(items), completed=len(done))
            for block in todo:
                gens = run_block(pipe, block, spec)
                recs = [
                    write_item(out, it, g, classes, item_seed(spec.seed, it.index))
                    for it, g in zip(block, gens, strict=True)
                    if it.index not in done
                ]
                append_manifest(out / "manifest.jsonl", recs)
                for r in recs:
                    done[r["index"]] = r
                bar.update(task, completed=len(done))
    else:
        raise SynthError(f"unknown engine {engine!r}: use local or ray")
    done = read_manifest(out / "manifest.jsonl")
    coco = write_coco(out, classes)
    return {"items": len(items), "generated": len(done) - n_done_before, "done": len(done), "annotations": str(coco)}
