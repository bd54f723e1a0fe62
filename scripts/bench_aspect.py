"""Non-square images: resized to the model's square (the library's default) or read with their aspect kept (T2M's
code, ``long_side``). docs/BENCHMARKS.md.

Held-out ShapesWorld scenes are cropped about their centre to a non-square window (``--crops``, height:width of
the model's side); each crop is segmented with the labels still in it, once squashed to the square and once at
its own aspect with its long side brought to each of ``--long-sides`` (the model's side: as many pixels along the
long side as the square; 1.375 x it: the scale of T2M's code, whose 704 px long side is 1.375 x SD's 512).

    python scripts/bench_aspect.py --n 100 --seed 1 [--model DIR] [-m t2m:embedded] [--long-sides 64,88]
"""

from __future__ import annotations

import argparse

import numpy as np

from attnseg.ops.metrics import confusion, summarize
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import SHAPES, make_scene

MIN_PIXELS = 20
"""A label stays in a crop when this many of its pixels do."""


def crops(n: int, seed: int, side: int, ratio: tuple[int, int]):
    """(image, semantic, labels) of scenes cropped about their centre to ratio[0]:ratio[1] of ``side``."""
    h, w = side * ratio[0] // max(ratio), side * ratio[1] // max(ratio)
    for i in range(n):
        sc = make_scene(seed, i)
        y0, x0 = (sc.image.shape[0] - h) // 2, (sc.image.shape[1] - w) // 2
        sem = sc.semantic[y0 : y0 + h, x0 : x0 + w]
        ids, counts = np.unique(sem, return_counts=True)
        labels = [SHAPES[c - 1] for c, k in zip(ids, counts, strict=True) if c > 0 and k >= MIN_PIXELS]
        if labels:
            yield sc.image[y0 : y0 + h, x0 : x0 + w], sem, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1, help="world seed of the scenes (1: test)")
    ap.add_argument("--model", default=None)
    ap.add_argument("-m", "--method", action="append", default=None, help="method:preset with a long_side setting")
    ap.add_argument("--crops", default="3:4,4:3,1:2", help="height:width ratios, comma-separated")
    ap.add_argument("--long-sides", default=None, help="long sides of the aspect-kept runs (default: the model's side)")
    a = ap.parse_args()
    pred = AttnSegPredictor.from_pretrained(a.model)
    r = pred.resolution
    sides = [int(x) for x in a.long_sides.split(",")] if a.long_sides else [r]
    kept = " | ".join(f"aspect kept, long side {s}" for s in sides)
    print(f"| crop (h:w) | images | method | squashed to {r} x {r} | {kept} |")
    print("|---|---|---|---|" + "---|" * len(sides))
    for spec in a.crops.split(","):
        ratio = tuple(int(x) for x in spec.split(":"))
        jobs = list(crops(a.n, a.seed, r, ratio))
        for m in a.method or ["t2m:embedded"]:
            name, _, preset = m.partition(":")
            out = []
            for long_side in (None, *((s, s) for s in sides)):
                conf = np.zeros((len(SHAPES) + 1,) * 2, dtype=np.int64)
                for b in range(0, len(jobs), 10):
                    chunk = jobs[b : b + 10]
                    res = pred.segment_batch(
                        [j[0] for j in chunk], [j[2] for j in chunk], method=name, preset=preset or None, long_side=long_side
                    )
                    for (_, sem, labels), rr in zip(chunk, res, strict=True):
                        ids = np.array([0, *[SHAPES.index(lab) + 1 for lab in labels]])
                        conf += confusion(sem, ids[rr.mask], len(SHAPES) + 1)
                out.append(100 * summarize(conf, ["background", *SHAPES])["miou"])
            cells = " | ".join(f"{v:.1f} ({v / out[0]:.2f} x)" for v in out[1:])
            print(f"| {spec} | {len(jobs)} | {m} | {out[0]:.1f} | {cells} |")


if __name__ == "__main__":
    main()
