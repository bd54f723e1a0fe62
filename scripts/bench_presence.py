"""Does the presence score tell labels that are in an image from labels that are not? (docs/BENCHMARKS.md)

Each held-out ShapesWorld scene is segmented with its true labels plus one shape it does not hold; the presence
scores of present and absent labels are compared (AUC) and the share of each below ``WEAK_PRESENCE`` is counted.

    python scripts/bench_presence.py --n 150 --seed 3 [--model DIR] [-m cross -m t2m -m iseg]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import mannwhitneyu

from attnseg.predictor import AttnSegPredictor
from attnseg.results import WEAK_PRESENCE
from attnseg.shapes.world import SHAPES, make_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--seed", type=int, default=3, help="world seed of the scenes (3: validation)")
    ap.add_argument("--model", default=None)
    ap.add_argument("-m", "--method", action="append", default=None)
    a = ap.parse_args()
    pred = AttnSegPredictor.from_pretrained(a.model)
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(a.n):
        sc = make_scene(a.seed, i)
        present = sorted(set(sc.labels))
        absent = [s for s in SHAPES if s not in present]
        labels = [*present, absent[rng.integers(len(absent))]]
        jobs.append((sc.image, [labels[j] for j in rng.permutation(len(labels))], present))
    print("| method | AUC present vs absent | absent below | present below |")
    print("|---|---|---|---|")
    for m in a.method or ["cross", "t2m", "iseg"]:
        rows = []
        for b in range(0, len(jobs), 10):
            chunk = jobs[b : b + 10]
            res = pred.segment_batch([j[0] for j in chunk], [j[1] for j in chunk], method=m, draws=1)
            for (_, labels, present), r in zip(chunk, res, strict=True):
                rows += [(lab in present, p) for lab, p in zip(labels, r.presence, strict=True)]
        arr = np.array(rows)
        pos = arr[:, 0].astype(bool)
        auc = mannwhitneyu(arr[pos, 1], arr[~pos, 1]).statistic / (pos.sum() * (~pos).sum())
        print(f"| {m} | {auc:.2f} | {np.mean(arr[~pos, 1] < WEAK_PRESENCE):.0%} | {np.mean(arr[pos, 1] < WEAK_PRESENCE):.0%} |")


if __name__ == "__main__":
    main()
