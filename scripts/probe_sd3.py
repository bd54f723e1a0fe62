"""Where the embedded SD3 model's words go (docs/EMBEDDED-MODEL-TRAINING.md, runs T1 and T2).

- ``text``: velocity error of validation captions (world seed 3, every object named by colour and shape) with the
  right tokens and pooled vectors, with another scene's pooled vector, with another scene's tokens, with both
  another scene's, and with a zero pooled vector, at s = 0.4 and 0.7;
- ``timesteps``: the cross baseline's mIoU on validation scenes read at several noise levels;
- ``blocks``: the cross baseline's mIoU reading one joint block at a time;
- ``pattern``: do the cross maps follow the objects or a fixed pattern? Per label of each validation scene, the AUC
  of its cross score map against its object's pixels, and the correlation of its (standardised) map with the same
  label's mean map over the other scenes (any model: ``embedded`` for the UNet);
- ``position``: do the maps follow the word or its place in the prompt? For one label of each validation scene, the
  correlation of its map in "a photo of LABEL" with its map six tokens later in the prompt, and with the map of a
  shape absent from the scene written where the label was.

    python scripts/probe_sd3.py EXPORT text
    python scripts/probe_sd3.py EXPORT timesteps --n 50 --t 150,400,700 -m cross -m concept-attention
    python scripts/probe_sd3.py EXPORT blocks --n 30 --t 400
    python scripts/probe_sd3.py EXPORT pattern --n 24
    python scripts/probe_sd3.py EXPORT position --n 24
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from attnseg.diffusion.layers import LayerSelect
from attnseg.diffusion.prompts import TEMPLATES, PromptTemplate
from attnseg.ops.metrics import confusion, summarize
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import SHAPES, caption, make_scene


def miou(pred: AttnSegPredictor, scenes, method: str, **overrides) -> float:
    name, _, preset = method.partition(":")
    conf = np.zeros((len(SHAPES) + 1,) * 2, dtype=np.int64)
    for b in range(0, len(scenes), 10):
        chunk = scenes[b : b + 10]
        labels = [sorted(set(s.labels)) for s in chunk]
        res = pred.segment_batch([s.image for s in chunk], labels, method=name, preset=preset or None, draws=1, **overrides)
        for s, labs, r in zip(chunk, labels, res, strict=True):
            ids = np.array([0, *[SHAPES.index(x) + 1 for x in labs]])
            conf += confusion(s.semantic, ids[r.mask], len(SHAPES) + 1)
    return 100 * summarize(conf, ["background", *SHAPES])["miou"]


def fixed_pattern(pred: AttnSegPredictor, scenes) -> tuple[float, float]:
    """(mean AUC of each label's cross map against its object, mean correlation of a label's map with its mean map
    over the other scenes that hold it)."""
    maps: dict[str, list[np.ndarray]] = {}
    aucs = []
    for s in scenes:
        labs = sorted(set(s.labels))
        r = pred.segment_batch([s.image], [labs], method="cross", draws=1)[0]
        for k, lab in enumerate(labs):
            m = r.scores[k + 1]
            gt = s.semantic == SHAPES.index(lab) + 1
            pos, neg = m[gt], m[~gt][::7]  # every 7th background pixel: the AUC's pairs stay few
            aucs.append(float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()))
            maps.setdefault(lab, []).append((m - m.mean()) / (m.std() + 1e-6))
    corr = [
        float(np.corrcoef(m.ravel(), np.mean([x for j, x in enumerate(ms) if j != i], 0).ravel())[0, 1])
        for ms in maps.values()
        if len(ms) > 1
        for i, m in enumerate(ms)
    ]
    return float(np.mean(aucs)), float(np.mean(corr))


def word_or_place(pred: AttnSegPredictor, scenes) -> tuple[float, float]:
    """(mean correlation of a label's map with its map six tokens later, mean correlation with the map of an absent
    shape at the label's place)."""
    TEMPLATES["shifted"] = PromptTemplate("shifted", "a photo of a photo of a photo of ", " and ", " and ", "")
    same_word, same_place = [], []
    for s in scenes:
        lab = sorted(set(s.labels))[0]
        absent = next(x for x in SHAPES if x not in s.labels)

        def cross_map(label: str, template: str, image: np.ndarray = s.image) -> np.ndarray:
            m = pred.segment_batch([image], [[label]], method="cross", draws=1, template=template)[0].scores[1]
            return ((m - m.mean()) / (m.std() + 1e-6)).ravel()

        here = cross_map(lab, "photo")
        same_word.append(float(np.corrcoef(here, cross_map(lab, "shifted"))[0, 1]))
        same_place.append(float(np.corrcoef(here, cross_map(absent, "photo"))[0, 1]))
    return float(np.mean(same_word)), float(np.mean(same_place))


def text_paths(pred: AttnSegPredictor, n: int) -> None:
    bb, tr = pred.backbone, pred.backbone.pipe.transformer
    rng = np.random.default_rng(0)
    scenes = [make_scene(3, i) for i in range(n)]
    z0 = bb.encode_images([s.image for s in scenes], pred.resolution).float()
    caps = [caption(s.objects, rng, colour_prob=1.0) for s in scenes]
    right, wrong = bb.encode_prompts(caps), bb.encode_prompts(caps[1:] + caps[:1])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    pooled = lambda t: t.added["pooled_projections"]  # noqa: E731
    cases = {
        "right": (right.hidden, pooled(right)),
        "right tokens, other pooled": (right.hidden, pooled(wrong)),
        "other tokens, right pooled": (wrong.hidden, pooled(right)),
        "both other": (wrong.hidden, pooled(wrong)),
        "right tokens, zero pooled": (right.hidden, torch.zeros_like(pooled(right))),
    }
    print("| s | " + " | ".join(cases) + " |\n|---|" + "---|" * len(cases))
    for s in (0.4, 0.7):
        zt = (1 - s) * z0 + s * noise
        errs = []
        for states, pool in cases.values():
            with torch.inference_mode():
                out = tr(zt, encoder_hidden_states=states, pooled_projections=pool, timestep=torch.full((n,), s * 1000)).sample
            errs.append(float((out - (noise - z0)).pow(2).mean()))
        print(f"| {s} | " + " | ".join(f"{e:.3f}" for e in errs) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("probe", choices=["text", "timesteps", "blocks", "pattern", "position"])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--t", default="150,400,700")
    ap.add_argument("-m", "--method", action="append", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pred = AttnSegPredictor.from_pretrained(None if a.model == "embedded" else a.model)
    if a.probe == "text":
        text_paths(pred, a.n)
        return
    scenes = [make_scene(3, i) for i in range(a.n)]
    ts = [int(t) for t in a.t.split(",")]
    if a.probe == "pattern":
        auc, corr = fixed_pattern(pred, scenes)
        print(f"{a.model}: label AUC {auc:.3f}, correlation with the label's map in other scenes {corr:.3f}")
        return
    if a.probe == "position":
        word, place = word_or_place(pred, scenes)
        print(
            f"{a.model}: correlation of a label's map with itself six tokens later {word:.3f}, with an absent shape's map at its place {place:.3f}"
        )
        return
    if a.probe == "timesteps":
        for m in a.method or ["cross"]:
            print(m, " ".join(f"t={t}: {miou(pred, scenes, m, timestep=t):.1f}" for t in ts))
        return
    modules = sorted({lay.module for lay in pred.inventory if lay.kind == "cross"}, key=lambda s: int(s.split(".")[1]))
    for mod in modules:
        sel = LayerSelect(kind="cross", names=(f"{mod}:cross",))
        print(mod, f"{miou(pred, scenes, 'cross', timestep=ts[0], cross=sel):.1f}")


if __name__ == "__main__":
    main()
