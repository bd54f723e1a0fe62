"""How well does the diffusion classifier tag held-out ShapesWorld scenes, and what does tagging cost the masks?
(docs/BENCHMARKS.md)

Each scene is tagged from a vocabulary (:mod:`attnseg.tagging`, default settings) and compared with its true labels:
``shapes`` (8 shape names; truth ``scene.labels``) or ``phrases`` (64 "colour shape" phrases; truth the phrases of
``scene.objects``; the shape part is scored too). Precision and recall are micro-averaged over scenes. With
``--segment METHOD`` the scenes are also segmented with the shape tags and with the true labels, and the mIoU of
both is printed (background + 8 shapes, one confusion matrix over the scenes, as ``attnseg eval``).

    python scripts/bench_tag.py --vocabulary shapes --n 100 --seed 1 --segment t2m
    python scripts/bench_tag.py --vocabulary phrases --n 50 --start 0 --seed 1   # then --start 50: counts add up

World seed 1 is the test split, 3 the validation split (where the tagger's settings were chosen).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from attnseg.ops.metrics import confusion, summarize
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import CLASS_NAMES, COLOURS, SHAPES, make_scene
from attnseg.tagging import TagConfig, Tagger


class CountingBackbone:
    """The predictor's backbone, counting the rows of ``denoising_error`` (one row = one image and prompt at one pair)."""

    def __init__(self, backbone) -> None:
        self.backbone, self.rows = backbone, 0

    def encode_prompts(self, texts):
        return self.backbone.encode_prompts(texts)

    def denoising_error(self, latents, noise, timestep, text):
        self.rows += len(latents)
        return self.backbone.denoising_error(latents, noise, timestep, text)


def counts(pred: list[set[str]], truth: list[set[str]]) -> list[int]:
    """[true positives, predicted, true] summed over scenes."""
    return [sum(len(p & t) for p, t in zip(pred, truth, strict=True)), sum(map(len, pred)), sum(map(len, truth))]


def prf(c: list[int]) -> str:
    p, r = c[0] / max(c[1], 1), c[0] / max(c[2], 1)
    return f"{p:.1%} | {r:.1%} | {2 * p * r / max(p + r, 1e-12):.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabulary", choices=("shapes", "phrases"), default="shapes")
    ap.add_argument("--n", type=int, default=100, help="scenes")
    ap.add_argument("--start", type=int, default=0, help="index of the first scene")
    ap.add_argument("--seed", type=int, default=1, help="world seed of the scenes (1: test, 3: validation)")
    ap.add_argument("--batch", type=int, default=8, help="scenes tagged together")
    ap.add_argument("--segment", default=None, help="also segment with the tags and with the true labels (a method)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-pruning", action="store_true", help="every candidate sees every pair (to measure what pruning saves)")
    ap.add_argument("--timesteps", default=None, help="t1,t2,... instead of the default TagConfig's (to choose them)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pred = AttnSegPredictor.from_pretrained(a.model)
    counting = CountingBackbone(pred.backbone)
    config = TagConfig()
    if a.timesteps:
        config = replace(config, timesteps=tuple(int(t) for t in a.timesteps.split(",")))
    if a.no_pruning:
        config = replace(config, prune_after=len(config.pairs))
    tagger = Tagger(counting, config, max_batch=pred.max_batch)
    phrases = a.vocabulary == "phrases"
    vocab = [f"{c} {s}" for c in COLOURS for s in SHAPES] if phrases else list(SHAPES)
    scenes = [make_scene(a.seed, i) for i in range(a.start, a.start + a.n)]
    tags: list[list[str]] = []
    seconds = 0.0
    for b0 in range(0, len(scenes), a.batch):
        batch = scenes[b0 : b0 + a.batch]
        t0 = time.perf_counter()
        tags += [r.labels for r in tagger.tag(pred.encode_images([s.image for s in batch]), vocab)]
        seconds += time.perf_counter() - t0
    shape_truth = [set(s.labels) for s in scenes]
    rows = {"seconds_per_image": seconds / len(scenes), "rows_per_image": counting.rows / len(scenes)}
    if phrases:
        rows["phrases"] = counts([set(t) for t in tags], [{o.phrase for o in s.objects} for s in scenes])
        rows["shapes_from_phrases"] = counts([{t.split()[-1] for t in ts} for ts in tags], shape_truth)
    else:
        rows["shapes"] = counts([set(t) for t in tags], shape_truth)
    print(json.dumps({"seed": a.seed, "start": a.start, "n": a.n, "timesteps": config.timesteps, **rows}))
    print(f"\n{len(scenes)} scenes of world seed {a.seed} (from {a.start}), vocabulary {a.vocabulary} ({len(vocab)} labels)\n")
    print("| scored as | precision | recall | F1 |\n|---|---|---|---|")
    for key in ("shapes", "phrases", "shapes_from_phrases"):
        if key in rows:
            print(f"| {key.replace('_', ' ')} | {prf(rows[key])} |")
    print(f"\n{rows['seconds_per_image']:.2f} s and {rows['rows_per_image']:.0f} denoiser rows per image (tagging only)")
    if a.segment:
        shape_tags = [list(dict.fromkeys(t.split()[-1] for t in ts)) for ts in tags]
        print(f"\n| labels given to {a.segment} | mIoU |\n|---|---|")
        for name, label_lists in (("true labels", [s.labels for s in scenes]), ("tagged", shape_tags)):
            conf = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), np.int64)
            for b0 in range(0, len(scenes), a.batch):
                batch = scenes[b0 : b0 + a.batch]
                res = pred.segment_batch([s.image for s in batch], label_lists[b0 : b0 + a.batch], method=a.segment)
                for s, r in zip(batch, res, strict=True):
                    lut = np.array([0] + [CLASS_NAMES.index(lab) for lab in r.labels], dtype=np.uint8)
                    conf += confusion(s.semantic, lut[r.mask], len(CLASS_NAMES))
            print(f"| {name} | {summarize(conf, list(CLASS_NAMES))['miou'] * 100:.1f} |")


if __name__ == "__main__":
    main()
