"""Non-square images: resized to the model's square (the library's default) or read as T2M's authors' code reads
them (``resize="code"``: aspect kept, long side by aspect ratio, padded). docs/BENCHMARKS.md.

Held-out ShapesWorld scenes are cropped about their centre to a non-square window (``--crops``, height:width of
the model's side); each crop is segmented with the labels still in it, once squashed to the square and once as the
code resizes it (on a 64-px model, its sizes scaled by 64 / 512: a long side of 88-128 px).

    python scripts/bench_aspect.py --n 100 --seed 1 [--model DIR] [-m t2m:embedded -m t2m:embedded-code]
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
    ap.add_argument("-m", "--method", action="append", default=None, help="method:preset with a resize setting")
    ap.add_argument("--crops", default="3:4,4:3,1:2", help="height:width ratios, comma-separated")
    a = ap.parse_args()
    pred = AttnSegPredictor.from_pretrained(a.model)
    r = pred.resolution
    print(f"| crop (h:w) | images | method | squashed to {r} x {r} | as T2M's code | code / squashed |")
    print("|---|---|---|---|---|---|")
    for spec in a.crops.split(","):
        ratio = tuple(int(x) for x in spec.split(":"))
        jobs = list(crops(a.n, a.seed, r, ratio))
        for m in a.method or ["t2m:embedded"]:
            name, _, preset = m.partition(":")
            out = []
            for resize in ("square", "code"):
                conf = np.zeros((len(SHAPES) + 1,) * 2, dtype=np.int64)
                for b in range(0, len(jobs), 10):
                    chunk = jobs[b : b + 10]
                    res = pred.segment_batch(
                        [j[0] for j in chunk], [j[2] for j in chunk], method=name, preset=preset or None, resize=resize
                    )
                    for (_, sem, labels), rr in zip(chunk, res, strict=True):
                        ids = np.array([0, *[SHAPES.index(lab) + 1 for lab in labels]])
                        conf += confusion(sem, ids[rr.mask], len(SHAPES) + 1)
                out.append(100 * summarize(conf, ["background", *SHAPES])["miou"])
            print(f"| {spec} | {len(jobs)} | {m} | {out[0]:.1f} | {out[1]:.1f} | {out[1] / out[0]:.2f} |")


if __name__ == "__main__":
    main()
