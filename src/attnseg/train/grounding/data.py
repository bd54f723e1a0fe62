"""The grounding module's data, built automatically (Grounded Diffusion section 4.1, appendix B), cached on disk.

An item is a prompt naming one or two classes with the paper's template ("a photograph of a dog and a cat"), the
image the model generates for it from the item's seed, the UNet's block outputs at the last denoising step
(:mod:`attnseg.diffusion.features`), the DAAM-style cross-attention masks of the very same generation (the ``ca``
method of ``attnseg generate``, the baseline of Protocol I, and the same over the decoder's layers only) and the mask an oracle detector finds for each class
(the papers' Mask R-CNN; here any ``score-generated`` detector, :func:`attnseg.jobs.score_generated.load_detector`:
``shapes`` is the ShapesWorld colour oracle).

- **training items** (:func:`plan_training`): one or two distinct seen classes, half of the prompts each (the
  authors' code draws one or two with equal odds; the paper's "mixture", appendix C.1);
- **test items** (:func:`plan_test`): ``count`` prompts per class and per pair of classes, over every class, seen or
  not (appendix B.2: a number per category and per pair).

With ``attributes`` (the ShapesWorld colours) each object of a prompt is named with one, distinct within the prompt
("a photograph of a red circle and a blue star"), so that the colour oracle finds it; the class word stays the
label. Item i's generator seed derives from (seed, i) as in ``attnseg generate``. Items are generated in fixed
blocks of ``block``, each written as one safetensors file (atomic), and each detector's masks of a block as another
(``oracle-<detector>/``), so that one generation serves several oracles: a killed build redoes only its unfinished
block, and a folder holding other generation settings is refused.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnseg.diffusion.features import block_features
from attnseg.generator import label_token_spans, step_max_normalise
from attnseg.grounder import PAPER_TEMPLATE
from attnseg.io.files import atomic_write_bytes, settings_diff
from attnseg.jobs.generate import item_seed
from attnseg.jobs.score_generated import load_detector
from attnseg.methods.generated import CAConfig, cross_aggregation, finalize
from attnseg.shapes.oracle import shapes_phrase

MAX_OBJECTS = 2
"""Classes per prompt: one or two (paper section 5.1: more make Stable Diffusion's images unstable)."""


class DataError(ValueError):
    """Bad data settings or a folder holding other data; the message says what to do."""


@dataclass
class DataConfig:
    """Everything that determines a data folder's files (stored in its data.json)."""

    kind: str
    """Either "train" (random prompts over ``classes``) or "test" (``count`` prompts per class and per pair)."""
    classes: tuple[str, ...]
    count: int
    """train: the number of items; test: items per class and per pair of classes."""
    model: str
    attributes: tuple[str, ...] = ()
    """Words one of which is put before each class word, distinct within a prompt (ShapesWorld: its colours)."""
    steps: int = 20
    """Denoising steps (ours: short generations for the CPU; the features are read at the last one, paper C.2)."""
    guidance: float = 5.0
    """Classifier-free guidance (ours: as ``scripts/bench-generated.sh`` generates the embedded model's images)."""
    two_share: float = 0.5
    """Share of training prompts with two classes (the authors' code: one or two with equal odds)."""
    seed: int = 0
    """Seed of the prompts and of each item's generator (the test's must differ from the training's)."""
    block: int = 8
    """Items generated in one batch and written in one file (ours; results depend on the batch, so it is fixed)."""
    threads: int = 1
    """CPU threads while generating: float results depend on it, so it is part of the data."""

    @classmethod
    def from_record(cls, record: dict) -> DataConfig:
        """The config of a data.json or a module's config.json (which store tuples as lists)."""
        return cls(**{**record, "classes": tuple(record["classes"]), "attributes": tuple(record["attributes"])})


@dataclass
class Item:
    index: int
    prompt: str
    labels: list[str]
    seed: int


def _phrases(labels: Sequence[str], rng: np.random.Generator, attributes: Sequence[str]) -> list[str]:
    if not attributes:
        return list(labels)
    picks = rng.choice(len(attributes), size=len(labels), replace=False)
    return [f"{attributes[int(i)]} {lab}" for i, lab in zip(picks, labels, strict=True)]


def _item(cfg: DataConfig, index: int, labels: Sequence[str], rng: np.random.Generator) -> Item:
    prompt, _ = PAPER_TEMPLATE.join(_phrases(labels, rng, cfg.attributes))
    return Item(index, prompt, list(labels), item_seed(cfg.seed, index))


def _check(cfg: DataConfig) -> None:
    if cfg.kind not in ("train", "test"):
        raise DataError(f"data kind must be 'train' or 'test', not {cfg.kind!r}")
    if len(set(cfg.classes)) != len(cfg.classes) or not cfg.classes:
        raise DataError(f"classes must be distinct and not empty: {list(cfg.classes)}")
    if cfg.count < 1 or cfg.block < 1 or cfg.steps < 1:
        raise DataError("the item count, the block and the steps must be at least 1")
    if cfg.attributes and len(set(cfg.attributes)) < MAX_OBJECTS:
        raise DataError(f"give at least {MAX_OBJECTS} distinct attributes (one per object of a prompt)")


def plan_training(cfg: DataConfig) -> list[Item]:
    """``count`` prompts, each of one class or (with odds ``two_share``) two distinct classes of ``classes``."""
    _check(cfg)
    items = []
    for i in range(cfg.count):
        rng = np.random.default_rng([cfg.seed, i])
        k = 2 if len(cfg.classes) > 1 and rng.random() < cfg.two_share else 1
        labels = [cfg.classes[int(j)] for j in rng.choice(len(cfg.classes), size=k, replace=False)]
        items.append(_item(cfg, i, labels, rng))
    return items


def plan_test(cfg: DataConfig) -> list[Item]:
    """``count`` prompts per class, then ``count`` per unordered pair of classes (their order drawn per prompt)."""
    _check(cfg)
    groups = [[c] for c in cfg.classes] + [list(p) for p in itertools.combinations(cfg.classes, 2)]
    items = []
    for labels in groups:
        for _ in range(cfg.count):
            i = len(items)
            rng = np.random.default_rng([cfg.seed, i])
            order = rng.permutation(len(labels))
            items.append(_item(cfg, i, [labels[int(j)] for j in order], rng))
    return items


def plan(cfg: DataConfig) -> list[Item]:
    return plan_training(cfg) if cfg.kind == "train" else plan_test(cfg)


@dataclass
class Block:
    """Generated items with what the module and the evaluation read (N items, H x W images).

    features: {side: (N, C, side, side) float16}; images (N, H, W, 3) uint8; baselines: {name of :data:`BASELINES`:
    (N, H, W) uint8 label map of its CA masks (0 background, k + 1 = ``labels[k]``)}; oracle (N, 2, H, W) bool, slot
    k the detector's mask of ``labels[k]`` (slot 2 empty for one class), None until a detector has been run.
    """

    items: list[Item]
    features: dict[int, torch.Tensor]
    images: torch.Tensor
    baselines: dict[str, torch.Tensor]
    oracle: torch.Tensor | None = None

    def to_file(self) -> bytes:
        from safetensors.torch import save

        tensors = {f"features.{s}": f for s, f in self.features.items()} | {"images": self.images, **self.baselines}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        return save(tensors, metadata={"items": json.dumps([asdict(it) for it in self.items])})

    @classmethod
    def from_file(cls, path: Path) -> Block:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            items = [Item(**d) for d in json.loads(f.metadata()["items"])]
            t = {k: f.get_tensor(k) for k in f.keys()}
        feats = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("features.")}
        return cls(items, dict(sorted(feats.items())), t["images"], {k: t[k] for k in BASELINES})

    @classmethod
    def concat(cls, blocks: Sequence[Block]) -> Block:
        oracle = None if any(b.oracle is None for b in blocks) else torch.cat([b.oracle for b in blocks])
        return cls(
            [it for b in blocks for it in b.items],
            {s: torch.cat([b.features[s] for b in blocks]) for s in blocks[0].features},
            torch.cat([b.images for b in blocks]),
            {k: torch.cat([b.baselines[k] for b in blocks]) for k in blocks[0].baselines},
            oracle,
        )


def oracle_masks(
    image: np.ndarray, prompt: str, labels: Sequence[str], detector, phrase_of: Callable[[str, str], str] = shapes_phrase
) -> np.ndarray:
    """(2, H, W) bool: the detector's mask of each label's phrase in the prompt (slot 2 empty for one label)."""
    out = np.zeros((MAX_OBJECTS, *image.shape[:2]), bool)
    for k, lab in enumerate(labels):
        m = np.asarray(detector(image, phrase_of(prompt, lab)), dtype=bool)
        if m.shape != image.shape[:2]:
            raise DataError(f"the detector returned a {m.shape} mask for a {image.shape[:2]} image")
        out[k] = m
    return out


BASELINES = {"baseline": ("down", "mid", "up"), "baseline_decoder": ("up",)}
"""The CA baselines by the UNet blocks whose cross layers they average: all of them (DiffuMask's CA and DAAM, as
``attnseg generate --method ca`` computes it) and the decoder's alone (the layers the ``cross:embedded`` preset
reads, because this model's mid block is inverted; docs/EMBEDDED-MODEL-TRAINING.md)."""


def ca_label_maps(backbone, store, layers, prompts, labels, images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 CA label maps from the maps of ``layers`` summed over the steps in ``store``.

    The steps of ``attnseg generate --method ca`` (:func:`attnseg.generator.generate_with_masks`): per-step
    max-normalised cross maps averaged per grid side, :func:`cross_aggregation`, then :func:`finalize` (beta, PAMR on
    the image); ``images`` (N, H, W, 3) in [0, 1] as the pipeline returns them.
    """
    latent = backbone.latent_side(backbone.native_resolution)
    by_side: dict[int, list[torch.Tensor]] = {}
    for lay in layers:
        by_side.setdefault(lay.side(latent), []).append(store.mean(lay.name))
    maps = {s: torch.stack(v).mean(0).float().cpu() for s, v in by_side.items()}
    cfg = CAConfig()
    out = []
    for i, (prompt, labs, im) in enumerate(zip(prompts, labels, images, strict=True)):
        soft = cross_aggregation({s: m[i : i + 1] for s, m in maps.items()}, label_token_spans(backbone, prompt, labs).spans, cfg)
        image = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
        out.append(finalize(soft, image, im.shape[:2], cfg)[1][0].numpy())
    return np.stack(out)


def generate_block(backbone, items: Sequence[Item], cfg: DataConfig) -> Block:
    """Generate ``items`` in one batch: images, last-step block outputs and the CA baselines' masks."""
    prompts, labels = [it.prompt for it in items], [it.labels for it in items]
    cross = [lay for lay in backbone.layers if lay.kind == "cross"]
    gens = [torch.Generator().manual_seed(it.seed) for it in items]
    with block_features(backbone.denoiser, "second_half" if cfg.guidance > 1 else "all") as feats:
        images, store = backbone.generate(
            prompts, cfg.steps, cfg.guidance, gens, [lay.name for lay in cross], lambda _name, a: step_max_normalise(a, True)
        )
    baselines = {
        name: torch.from_numpy(
            ca_label_maps(backbone, store, [lay for lay in cross if lay.block in blocks], prompts, labels, images)
        )
        for name, blocks in BASELINES.items()
    }
    return Block(
        list(items),
        {s: f.to(torch.float16).cpu() for s, f in feats.by_side().items()},
        torch.from_numpy(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)),
        baselines,
    )


def detect_block(block: Block, detector) -> bytes:
    """The safetensors file of a block's oracle masks."""
    from safetensors.torch import save

    masks = [oracle_masks(im, it.prompt, it.labels, detector) for im, it in zip(block.images.numpy(), block.items, strict=True)]
    return save({"oracle": torch.from_numpy(np.stack(masks))})


def detector_folder(detector: str) -> str:
    """A folder name for a detector spec ("shapes", "package.module:name")."""
    return "oracle-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", detector)


DATA_JSON = "data.json"


def _prepare(folder: Path, cfg: DataConfig, items: Sequence[Item]) -> None:
    record = {"config": json.loads(json.dumps(asdict(cfg))), "items": len(items)}  # as data.json holds it: lists
    path = folder / DATA_JSON
    if path.exists():
        old = json.loads(path.read_text())
        diff = settings_diff(old["config"], record["config"])
        if diff:
            raise DataError(
                f"{folder} holds data built with other settings ({', '.join(diff)}); use another folder, "
                "or repeat that build's exact settings to resume it"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())


def build_data(backbone, folder: str | Path, cfg: DataConfig, detector: str, progress: bool = True) -> Block:
    """Generate every block of ``cfg`` not yet in ``folder`` (``blocks/NNNNN.safetensors``), run ``detector`` (a
    ``score-generated`` spec) on every block it has not seen (``oracle-<detector>/NNNNN.safetensors``), read it all."""
    folder = Path(folder)
    items = plan(cfg)
    _prepare(folder, cfg, items)
    blocks = [items[i : i + cfg.block] for i in range(0, len(items), cfg.block)]
    paths = [folder / "blocks" / f"{b:05d}.safetensors" for b in range(len(blocks))]
    masks = [folder / detector_folder(detector) / p.name for p in paths]
    todo = [b for b in range(len(blocks)) if not paths[b].exists() or not masks[b].exists()]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with Progress(
            TextColumn(f"generate {cfg.kind} data"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not progress or not todo,
        ) as bar:
            task = bar.add_task("data", total=len(items), completed=len(items) - sum(len(blocks[b]) for b in todo))
            det = load_detector(detector) if todo else None
            for b in todo:
                if not paths[b].exists():
                    atomic_write_bytes(paths[b], generate_block(backbone, blocks[b], cfg).to_file())
                atomic_write_bytes(masks[b], detect_block(Block.from_file(paths[b]), det))
                bar.advance(task, len(blocks[b]))
    finally:
        torch.set_num_threads(before)
    from safetensors.torch import load_file

    out = []
    for p, m in zip(paths, masks, strict=True):
        block = Block.from_file(p)
        block.oracle = load_file(str(m))["oracle"]
        out.append(block)
    return Block.concat(out)
