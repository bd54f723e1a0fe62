"""Does a model draw a look when its caption names it? (docs/EMBEDDED-MODEL-TRAINING.md, run 2e)

For each look, samples "a COLOUR LOOK SHAPE" and "a COLOUR SHAPE" with the same seeds, and reports two shares, with
the look named and not, and their differences:

- grey: of neutral pixels near the looks' mid grey (``PATTERN_COLOUR``) within the object's box (the box of the
  pixels of its colour): the pattern a look paints over its object;
- gaps: of the pixels inside the convex hull of the object's colour that are not of its colour: a band, a dot or
  checks drawn across the object in any colour (a model may paint the pattern in the background's colours), which
  leave a plain convex shape whole.

A model that draws the named look raises them; one that ignores the word leaves them where the plain prompt has them.
Writes a grid of the samples beside the numbers.

    python scripts/probe_looks.py MODEL --n 8 --out /tmp/looks.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from attnseg.diffusion.loading import load_pipeline
from attnseg.shapes.world import COLOURS, LOOKS, PATTERN_COLOUR
from attnseg.train.embedded.report import grid, sample

PAIRS = (("red", "circle"), ("blue", "square"), ("yellow", "star"), ("green", "hexagon"))


def grey_share(images: list[np.ndarray], colours: list[str]) -> float:
    """Mean share, within the bounding box of the pixels of the named colour (the object), of neutral pixels near the
    pattern grey (each channel within 24 levels of it, channels within 12 of each other): the pattern a look paints
    over its object; 0 for an image without the colour."""
    grey = np.asarray(PATTERN_COLOUR, np.float32)
    shares = []
    for im, colour in zip(images, colours, strict=True):
        x = im.astype(np.float32)
        obj = np.linalg.norm(x - np.asarray(COLOURS[colour], np.float32), axis=-1) < 70
        if obj.sum() < 10:
            shares.append(0.0)
            continue
        ys, xs = np.nonzero(obj)
        box = x[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        neutral = (np.abs(box - grey).max(-1) <= 24) & (box.max(-1) - box.min(-1) <= 12)
        shares.append(float(neutral.mean()))
    return float(np.mean(shares))


def gap_share(images: list[np.ndarray], colours: list[str]) -> float:
    """Mean share, within the convex hull of the pixels of the named colour (the object), of pixels not of that colour;
    0 for an image with fewer than 10 such pixels."""
    from scipy.spatial import ConvexHull, Delaunay, QhullError

    shares = []
    for im, colour in zip(images, colours, strict=True):
        obj = np.linalg.norm(im.astype(np.float32) - np.asarray(COLOURS[colour], np.float32), axis=-1) < 70
        pts = np.argwhere(obj)
        if len(pts) < 10:
            shares.append(0.0)
            continue
        try:
            hull = Delaunay(pts[ConvexHull(pts).vertices])
        except QhullError:  # the pixels lie on a line: no area
            shares.append(0.0)
            continue
        cells = np.argwhere(np.ones_like(obj))
        inside = (hull.find_simplex(cells) >= 0).reshape(obj.shape)
        shares.append(float((inside & ~obj).sum() / max(inside.sum(), 1)))
    return float(np.mean(shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="pipeline folder, or 'embedded'")
    ap.add_argument("--n", type=int, default=8, help="samples per look and prompt (cycling over colour-shape pairs)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--out", default=None, help="PNG grid of the first sample of each prompt pair")
    a = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(None if a.model == "embedded" else a.model, device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    print("| look | grey, look named | not named | difference | gaps, look named | not named | difference |")
    print("|---|---|---|---|---|---|---|")
    shown, captions = [], []
    for look in LOOKS:
        pairs = [PAIRS[i % len(PAIRS)] for i in range(a.n)]
        named = [f"a {c} {look} {s}" for c, s in pairs]
        plain = [f"a {c} {s}" for c, s in pairs]
        ims_named = sample(pipe, named, seed=0, steps=a.steps, guidance=a.guidance)
        ims_plain = sample(pipe, plain, seed=0, steps=a.steps, guidance=a.guidance)
        cols = [c for c, _ in pairs]
        g_named, g_plain = grey_share(ims_named, cols), grey_share(ims_plain, cols)
        h_named, h_plain = gap_share(ims_named, cols), gap_share(ims_plain, cols)
        print(
            f"| {look} | {100 * g_named:.1f}% | {100 * g_plain:.1f}% | {100 * (g_named - g_plain):+.1f} "
            f"| {100 * h_named:.1f}% | {100 * h_plain:.1f}% | {100 * (h_named - h_plain):+.1f} |"
        )
        shown += [ims_named[0], ims_plain[0], ims_named[1], ims_plain[1]]
        captions += [named[0], plain[0], named[1], plain[1]]
    if a.out:
        grid(shown, captions).save(a.out)


if __name__ == "__main__":
    main()
