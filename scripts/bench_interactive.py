"""Interactive segmentation on ShapesWorld: one point (a random pixel of each object) or one box (each object's
bounding box) per object, all objects of a scene prompted together; mean object IoU against the instance masks,
and seconds per image (docs/BENCHMARKS.md). ``--timing`` times, scene by scene side by side, every mode of the
predictor on the same images: points, boxes, the true labels (iSeg), the unsupervised diffseg and diffseg-iseg, and
labels tagged from the 8 shapes, then iSeg (open vocabulary).

    python scripts/bench_interactive.py --n 100 --seed 1 [--model DIR] [--preset embedded] [--set iters=2 ...]
    python scripts/bench_interactive.py --n 30 --seed 1 --timing

Seed 1: the held-out test scenes; seed 3: the validation scenes the embedded preset was chosen on.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from attnseg.methods.interactive import VisualPrompt
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import SHAPES, make_scene
from attnseg.tagging import Tagger


def prompts_of(instance: np.ndarray, mode: str, rng: np.random.Generator) -> list[VisualPrompt]:
    """One prompt per visible object of an instance map: a random pixel inside it, or its bounding box."""
    out = []
    for i in range(1, int(instance.max()) + 1):
        ys, xs = np.nonzero(instance == i)
        if len(ys) == 0:
            continue
        if mode == "point":
            j = rng.integers(len(ys))
            out.append(VisualPrompt(points=((float(xs[j]), float(ys[j])),), name=str(i)))
        else:
            out.append(VisualPrompt(box=(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())), name=str(i)))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1, help="world seed of the scenes (1: test, 3: validation)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--mode", action="append", choices=["point", "box"], default=None)
    ap.add_argument("--set", action="append", default=[], help="a setting override, e.g. iters=2")
    ap.add_argument("--timing", action="store_true", help="seconds per image of every mode, side by side")
    a = ap.parse_args()
    overrides = {k: type_of(v) for k, v in (s.split("=", 1) for s in a.set)}
    pred = AttnSegPredictor.from_pretrained(a.model)
    if a.timing:
        timing(pred, a.n, a.seed)
        return
    print("| mode | objects | mean object IoU | s / image |")
    print("|---|---|---|---|")
    for mode in a.mode or ["point", "box"]:
        rng = np.random.default_rng(0)
        ious, seconds = [], 0.0
        for i in range(a.n):
            sc = make_scene(a.seed, i)
            prompts = prompts_of(sc.instance, mode, rng)
            t0 = time.perf_counter()
            pred.set_image(sc.image)
            r = pred.segment_prompts(prompts, preset=a.preset, **overrides)
            seconds += time.perf_counter() - t0
            ious += [iou(r.mask == k, sc.instance == int(p.name)) for k, p in enumerate(prompts, start=1)]
        print(f"| {mode} | {len(ious)} | {100 * np.mean(ious):.1f} | {seconds / a.n:.3f} |")


def timing(pred: AttnSegPredictor, n: int, seed: int) -> None:
    """Seconds per image of each mode, every mode run on each scene in turn (so that load drifts hit all alike),
    after one warm-up scene; each time includes the image's encoding."""
    rng = np.random.default_rng(0)
    tagger = Tagger(pred.backbone, max_batch=pred.max_batch)
    modes = {
        "point": lambda sc: _prompted(pred, sc, prompts_of(sc.instance, "point", rng)),
        "box": lambda sc: _prompted(pred, sc, prompts_of(sc.instance, "box", rng)),
        "labels (iseg)": lambda sc: pred.segment_batch([sc.image], [sorted(set(sc.labels))], method="iseg"),
        "diffseg": lambda sc: pred.segment_batch([sc.image], [[]], method="diffseg"),
        "diffseg-iseg": lambda sc: pred.segment_batch([sc.image], [[]], method="diffseg-iseg"),
        "tag 8 shapes, then iseg": lambda sc: _tagged(pred, tagger, sc),
    }
    seconds = dict.fromkeys(modes, 0.0)
    for i in range(n + 1):
        sc = make_scene(seed, i)
        for name, run in modes.items():
            t0 = time.perf_counter()
            run(sc)
            if i:  # scene 0 warms up
                seconds[name] += time.perf_counter() - t0
    base = seconds["labels (iseg)"]
    print("| mode | s / image | ratio to labels (iseg) |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s / n:.3f} | {s / base:.2f} |")


def _tagged(pred: AttnSegPredictor, tagger: Tagger, sc):
    """Open vocabulary: the scene tagged from the 8 shapes (as ``attnseg segment --vocabulary``), then segmented."""
    [tags] = tagger.tag(pred.encode_images([sc.image]), list(SHAPES))
    return pred.segment_batch([sc.image], [tags.labels], method="iseg")


def _prompted(pred: AttnSegPredictor, sc, prompts: list[VisualPrompt]):
    pred.set_image(sc.image)
    return pred.segment_prompts(prompts)


def type_of(v: str):
    """A command-line value as int, float or string."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


if __name__ == "__main__":
    main()
