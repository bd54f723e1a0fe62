"""Does a model's cross-attention localise words? Threshold-free checks on held-out ShapesWorld scenes.

Per cross-attention layer and timestep, for every object of every scene, with the caption
"a photo of a <colour> <shape> and a <colour> <shape>":
- pointing: is the argmax of the shape word's map inside the object's visible pixels?
- AUC: probability that an object pixel scores higher than a pixel outside it (0.5 = chance,
  below 0.5 = inverted maps);
- the same for the colour word, and for the article "a" as a control that should not localise;
- choice: in scenes with objects of different shapes, is the shape word's mean map higher on its
  own object than on each other object (``choice_chance`` is what guessing would score)?
These move long before mIoU does while a model trains.

``self_attention_report`` asks the same of the self-attention layers that T2M, iSeg and DiffSeg
propagate with: how much of an object cell's attention stays on its own object ("own"), leaks to
the other objects or to the background, and ``lift`` = own / the object's share of the grid
(1 = no better than uniform attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.loading import load_pipeline
from attnseg.diffusion.prompts import find_phrase_spans
from attnseg.ops.maps import grid_side
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import make_scene
from attnseg.train.embedded.train import HOLDOUT_SEED


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _held_out(pipe, n: int, seed: int):
    """``n`` scenes of world ``seed``, their latents and captions "a photo of a <colour> <shape> and a ..."."""
    pred = AttnSegPredictor(pipe)
    scenes = [make_scene(seed, i) for i in range(n)]
    texts = ["a photo of a " + " and a ".join(o.phrase for o in s.objects) for s in scenes]
    return pred, scenes, pred.encode_images([s.image for s in scenes]), texts


@torch.inference_mode()
def localisation_report(pipe, n: int = 64, timesteps=(150, 400), seed: int = HOLDOUT_SEED) -> dict:
    pred, scenes, latents, texts = _held_out(pipe, n, seed)
    spans = []
    for s, text in zip(scenes, texts, strict=True):
        words = []
        for o in s.objects:
            words += [o.colour, o.shape]
        spans.append(pred.backbone.token_spans(text, find_phrase_spans(text, words), words))
    emb = pred.backbone.encode_prompts(texts)
    inv = [lay for lay in pred.inventory if lay.kind == "cross"]
    names = [lay.name for lay in inv]
    out: dict = {}
    g = torch.Generator().manual_seed(0)
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g)
        z = pred.backbone.add_noise(latents, noise, t)
        store = pred.backbone.forward(z, t, emb, names)
        for lay in inv:
            m = store.mean(lay.name)  # (n, P, T)
            side = grid_side(m.shape[1])
            stats = {"shape_point": [], "shape_auc": [], "colour_auc": [], "article_auc": [], "choice": [], "choice_chance": []}
            for i, s in enumerate(scenes):
                inst = torch.from_numpy(s.instance.astype(np.float32))
                for k, _o in enumerate(s.objects):
                    obj = F.adaptive_avg_pool2d((inst == k + 1).float()[None, None], side)[0, 0].numpy().ravel() >= 0.5
                    if not obj.any():
                        continue
                    colour_pos = spans[i].spans[2 * k]
                    shape_pos = spans[i].spans[2 * k + 1]
                    ms = m[i][:, shape_pos].mean(1).numpy()
                    stats["shape_point"].append(float(obj[int(ms.argmax())]))
                    stats["shape_auc"].append(_auc(ms, obj))
                    stats["colour_auc"].append(_auc(m[i][:, colour_pos].mean(1).numpy(), obj))
                    stats["article_auc"].append(_auc(m[i][:, 1].numpy(), obj))
                    # Choice: among the scene's objects, is this shape word's mean map highest on its own object?
                    others = [
                        F.adaptive_avg_pool2d((inst == j + 1).float()[None, None], side)[0, 0].numpy().ravel() >= 0.5
                        for j in range(len(s.objects))
                        if j != k and s.objects[j].shape != s.objects[k].shape
                    ]
                    others = [o2 for o2 in others if o2.any()]
                    if others:
                        own = ms[obj].mean()
                        stats["choice"].append(float(all(own > ms[o2].mean() for o2 in others)))
                        stats["choice_chance"].append(1.0 / (1 + len(others)))
            out[f"t{t}/{lay.name.replace('.transformer_blocks.0.attn2', '')}"] = {
                k: float(np.nanmean(v)) for k, v in stats.items()
            }
    return out


def object_affinity(attn: torch.Tensor, cells: torch.Tensor) -> dict[str, float]:
    """Object coherence of one self-attention map.

    attn: (P, P) rows sum to 1; cells: (P,) int, 0 = background, k > 0 = object k.
    Mean over the objects present of: own (row mass on the object's own cells, averaged over its
    cells), other (mass on other objects), bg (mass on background) and lift = own / area share.
    """
    rows = []
    for k in cells.unique().tolist():
        if k == 0:
            continue
        mine = cells == k
        a = attn[mine]
        own = float(a[:, mine].sum(1).mean())
        bg = float(a[:, cells == 0].sum(1).mean())
        rows.append((own, 1.0 - own - bg, bg, own / float(mine.float().mean())))
    if not rows:
        return {}
    arr = np.array(rows)
    return dict(zip(("own", "other", "bg", "lift"), arr.mean(0).tolist(), strict=True))


@torch.inference_mode()
def self_attention_report(pipe, n: int = 32, timesteps=(100, 150), seed: int = HOLDOUT_SEED) -> dict:
    """Per self-attention layer and timestep: mean ``object_affinity`` over ``n`` held-out scenes."""
    pred, scenes, latents, texts = _held_out(pipe, n, seed)
    emb = pred.backbone.encode_prompts(texts)
    inv = [lay for lay in pred.inventory if lay.kind == "self"]
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    for t in timesteps:
        z = pred.backbone.add_noise(latents, torch.randn(latents.shape, generator=g), t)
        store = pred.backbone.forward(z, t, emb, [lay.name for lay in inv])
        for lay in inv:
            m = store.mean(lay.name)
            side = grid_side(m.shape[1])
            stats: dict[str, list[float]] = {}
            for i, s in enumerate(scenes):
                inst = torch.from_numpy(s.instance.astype(np.int64))
                onehot = F.one_hot(inst, int(inst.max()) + 1).permute(2, 0, 1).float()[None]
                cells = F.interpolate(onehot, size=(side, side), mode="area")[0].argmax(0).ravel()
                for k, v in object_affinity(m[i], cells).items():
                    stats.setdefault(k, []).append(v)
            out[f"t{t}/{lay.name.replace('.transformer_blocks.0.attn1', '')}"] = {k: float(np.mean(v)) for k, v in stats.items()}
    return out


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    pipe = load_pipeline(a.model, device="cpu", dtype="float32")
    rep = {"cross": localisation_report(pipe, a.n), "self": self_attention_report(pipe, a.n)}
    for part in rep.values():
        for k, v in part.items():
            print(f"{k:45s} " + " ".join(f"{kk}={vv:.3f}" for kk, vv in v.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
