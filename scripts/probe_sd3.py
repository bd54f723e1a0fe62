"""Where the embedded SD3 model's words go (docs/EMBEDDED-MODEL-TRAINING.md, runs T1 and T2).

- ``text``: velocity error of validation captions (world seed 3, every object named by colour and shape) with the
  right tokens and pooled vectors, with another scene's pooled vector, with another scene's tokens, with both
  another scene's, and with a zero pooled vector, at s = 0.4 and 0.7;
- ``timesteps``: the cross baseline's mIoU on validation scenes read at several noise levels;
- ``blocks``: the cross baseline's mIoU reading one joint block at a time;
- ``pattern``: do the cross maps follow the objects or a fixed pattern? Per label of each validation scene, the AUC
  of its cross score map against its object's pixels, and the correlation of its (standardised) map with the same
  label's mean map over the other scenes (any model: ``embedded`` for the UNet);
- ``profile``: where in and around its object a word's map is high (``--words shape``, the labels, or ``colour``): the
  mean of its min-max cross score map (the model's ``cross`` preset) over the object's interior (more than 4 px from its edge), the 4 px inside the edge, the
  4 px outside it and the rest of the background (any model: filled maps fall from the interior outwards; a map
  that peaks on the edges, inside and out, rings the object);
- ``bound``: the mIoU that perfect maps on the model's attention grid would score on validation scenes (each class's
  mask averaged over the grid's cells, resized to the image bilinearly as the methods resize their maps, argmax);
- ``mass``: per joint block, the share of the image queries' attention (before renormalisation) on the text tokens,
  for object and background pixels, and how it splits over start token, words, end token and padding;
- ``position``: do the maps follow the word or its place in the prompt? For one label of each validation scene, the
  correlation of its map in "a photo of LABEL" with its map six tokens later in the prompt, and with the map of a
  shape absent from the scene written where the label was;
- ``binding``: does each object read its own word? Over the validation scenes whose objects' words (``--words shape``,
  the labels, ``colour``, or ``look`` with ``--looks P``, the objects that wear one) take two or more values, the labels being those words: the share of objects (20+
  visible px) whose own word's score map, through the method (``-m``, default the model's ``cross``), is the highest
  on average over its pixels, by the number of words (chance: one over it; any model);
- ``swap``: does the transformer use the words when it denoises? Velocity error on the object's latent cells (a
  third or more object) of validation scenes captioned "a COLOUR SHAPE and ...", with each shape word replaced by
  another shape, with each colour word replaced by another colour, and with the empty caption, at the noise
  levels of ``--t`` as fractions of 1,000;
- ``linear``: does a model's image stream hold each object's shape and colour? Features of each object of
  validation scenes 0-399 (training) and 400-599 (test), read with the empty caption at the first noise level of
  ``--t``: the mean over the object's cells (half covered or more) of each joint block's image tokens (a transformer)
  or of each cross-attention layer's input, its queries' source (a UNet); objects that half cover a cell of a 4 x 4
  grid (the UNet model's coarsest level), so that every model reads the same objects;
  a logistic regression per layer, standardised features, 300 Adam steps; test accuracy (chance: 1 / 8 for either);
  with ``--looks P`` the scenes' objects wear a look with chance P, and the look is read too, among the objects that
  wear one (chance 1 / 5);
- ``presets``: the mIoU of ``cross``, ``t2m`` and ``iseg`` with the presets of the shipped SD3 model
  (``embedded-sd3``) on validation scenes, to follow a run with the settings the release uses;
- ``heads``: the cross baseline reading single heads: every joint block's heads one at a time, then a greedy choice
  on the validation scenes (the head whose map, averaged with those chosen, raises the mIoU most, until none does;
  the first noise level of ``--t``, background threshold ``--thr``), each step also scored on 200 other validation
  scenes (scenes 100-299, or from ``--n`` on), printed as a ``--blocks`` set (``1h1+4h1+0h0``) for the sweeps;
- ``sweep``: the cross baseline's mIoU on validation scenes for every block set (the last block, the last two, every
  block, or the sets of ``--blocks``) x noise level (``--t``) x background threshold (the paper's rule and 0.6 / 0.7 /
  0.8), to choose a model's preset on scenes the test never uses;
- ``t2m-sweep``: T2M reading the last block's cross maps (or the first set of ``--blocks``), with the self maps of each block (and of all) at the first
  noise level of ``--t`` and background threshold 0.6, then the best of them at every noise level x background
  threshold (the paper's rule, 0.6, 0.7, 0.8), then the best of those with Self to the power 1-4: the same use.
- ``iseg-sweep``: iSeg (``iseg:mmdit``) reading every block's cross maps or the last block's, then with the self map
  of each block, one iteration, at the first noise level of ``--t`` and background threshold 0.6; then the best at
  every noise level x background threshold; then N = 1, 2, 4, 8 iterations, and the best without Cat-Cross.
  The sweeps set every setting they vary on top of the papers' presets (``cross:default``, ``t2m:paper``,
  ``iseg:mmdit``, one noise draw), whatever the model's ``attnseg.json`` says.

    python scripts/probe_sd3.py EXPORT text
    python scripts/probe_sd3.py EXPORT timesteps --n 50 --t 150,400,700 -m cross -m concept-attention
    python scripts/probe_sd3.py EXPORT blocks --n 30 --t 400
    python scripts/probe_sd3.py EXPORT pattern --n 24
    python scripts/probe_sd3.py EXPORT position --n 24
    python scripts/probe_sd3.py EXPORT profile --n 40 [--words colour]
    python scripts/probe_sd3.py EXPORT bound --n 100
    python scripts/probe_sd3.py EXPORT mass --n 16 --t 400
    python scripts/probe_sd3.py EXPORT binding --n 200 [--words colour | --words look --looks 1]
    python scripts/probe_sd3.py EXPORT swap --n 48 --t 300,500,700,900
    python scripts/probe_sd3.py EXPORT linear --t 150 [--looks 1]
    python scripts/probe_sd3.py EXPORT presets --n 40
    python scripts/probe_sd3.py EXPORT heads --n 100 --t 150 --thr 0.6
    python scripts/probe_sd3.py EXPORT sweep --n 40 --t 150,400 [--blocks 1+3 --blocks 3 --blocks 1h1+0h0]
    python scripts/probe_sd3.py EXPORT t2m-sweep --n 40 --t 400,150
    python scripts/probe_sd3.py EXPORT iseg-sweep --n 40 --t 400,150
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.layers import LayerSelect, finest_grid
from attnseg.diffusion.prompts import TEMPLATES, PromptTemplate
from attnseg.methods.cross import CrossAttentionBaseline, CrossConfig
from attnseg.ops.maps import background_score, minmax, token_maps, with_background
from attnseg.ops.metrics import confusion, summarize
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import COLOURS, LOOKS, SHAPES, Scene, ShapesWorldConfig, caption, make_scene


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


def edge_profile(pred: AttnSegPredictor, scenes, words: str = "shape", width: int = 4) -> dict[str, float]:
    """Mean min-max cross map of each object's word (``words``: its shape, the evaluation's labels, or its colour) over
    the object's interior, the ``width`` px inside and outside its edge, and the rest of the background; scenes whose
    objects share a word are skipped."""
    from scipy import ndimage

    acc: dict[str, list[float]] = {"interior": [], "edge inside": [], "edge outside": [], "background": []}
    for s in scenes:
        names = [getattr(o, words) for o in s.objects]
        if len(set(names)) < len(names):
            continue
        r = pred.segment_batch([s.image], [names], method="cross", draws=1)[0]
        for k, name in enumerate(names):
            m = r.scores[r.labels.index(name) + 1]
            m = (m - m.min()) / (m.max() - m.min() + 1e-6)
            obj = s.instance == k + 1
            inner = ndimage.binary_erosion(obj, iterations=width)
            outer = ndimage.binary_dilation(obj, iterations=width)
            for region_name, region in zip(acc, (inner, obj & ~inner, outer & ~obj, ~outer), strict=True):
                if region.any():
                    acc[region_name].append(float(m[region].mean()))
    return {name: float(np.mean(v)) for name, v in acc.items()}


def binding(
    pred: AttnSegPredictor, scenes: list[Scene], words: str = "shape", method: str = "cross"
) -> dict[int, tuple[float, int]]:
    """{number of words in the scene: (share of objects whose own word scores highest over their pixels, objects)}."""
    name, _, preset = method.partition(":")
    hits: dict[int, list[bool]] = {}
    for s in scenes:
        names = [getattr(o, words) for o in s.objects]  # a plain object's look is None: no word, not counted
        labs = sorted({n for n in names if n is not None})
        if len(labs) < 2:
            continue
        r = pred.segment_batch([s.image], [labs], method=name, preset=preset or None, draws=1)[0]
        for k, word in enumerate(names):
            obj = s.instance == k + 1
            if word is not None and obj.sum() >= 20:
                hits.setdefault(len(labs), []).append(labs[int(r.scores[1:, obj].mean(1).argmax())] == word)
    return {k: (float(np.mean(v)), len(v)) for k, v in sorted(hits.items())}


def word_swaps(pred: AttnSegPredictor, scenes: list[Scene], levels: list[float]) -> None:
    """The ``swap`` probe (a transformer model: it calls the pipeline's ``transformer``); prints a table."""
    bb, tr = pred.backbone, pred.backbone.pipe.transformer
    rng = np.random.default_rng(0)

    def cap(s, swap: str | None = None) -> str:
        def word(o, field: str, pool) -> str:
            own = getattr(o, field)
            return str(rng.choice([w for w in pool if w != own])) if swap == field else own

        return " and ".join(f"a {word(o, 'colour', list(COLOURS))} {word(o, 'shape', SHAPES)}" for o in s.objects)

    z0 = bb.encode_images([s.image for s in scenes], pred.resolution).float()
    cells = torch.stack(
        [F.adaptive_avg_pool2d(torch.from_numpy(s.instance > 0).float()[None], z0.shape[-1])[0] >= 1 / 3 for s in scenes]
    )  # (n, h, w): latent cells a third or more object
    cases = {
        "right": [cap(s) for s in scenes],
        "shapes swapped": [cap(s, "shape") for s in scenes],
        "colours swapped": [cap(s, "colour") for s in scenes],
        "empty": [""] * len(scenes),
    }
    prompts = {k: bb.encode_prompts(v) for k, v in cases.items()}
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    print("| s | " + " | ".join(cases) + " |\n|---|" + "---|" * len(cases))
    for lev in levels:
        zt = (1 - lev) * z0 + lev * noise
        errs = []
        for enc in prompts.values():
            with torch.inference_mode():
                out = tr(
                    zt,
                    encoder_hidden_states=enc.hidden,
                    pooled_projections=enc.added["pooled_projections"],
                    timestep=torch.full((len(scenes),), lev * 1000),
                ).sample
            errs.append(float((out - (noise - z0)).pow(2).mean(1)[cells].mean()))
        print(f"| {lev} | " + " | ".join(f"{e:.3f}" for e in errs) + " |")


def _logistic_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor) -> float:
    """Test accuracy of a softmax regression fitted on the rows ``train`` of ``x`` (standardised on them)."""
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (F.cross_entropy(x[train] @ w + b, y[train]) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        return float(((x[~train] @ w + b).argmax(1) == y[~train]).float().mean())


def linear_read(pred: AttnSegPredictor, t: int, look_prob: float = 0.0, n_train: int = 400, n_test: int = 200) -> None:
    """The ``linear`` probe; prints one line per layer. ``look_prob`` > 0: scenes whose objects wear a look with that
    chance, and the look (or none) read too."""
    bb = pred.backbone
    den = bb.denoiser
    feats: dict[str, torch.Tensor] = {}
    if hasattr(den, "transformer_blocks") and not hasattr(den, "up_blocks"):
        for k, blk in enumerate(den.transformer_blocks):
            blk.register_forward_hook(lambda _m, _i, out, k=k: feats.__setitem__(f"after joint block {k}", out[1]))
    else:
        for name, mod in den.named_modules():
            if name.endswith("attn2"):
                mod.register_forward_pre_hook(
                    lambda _m, args, kw, name=name: feats.__setitem__(name, args[0] if args else kw["hidden_states"]),
                    with_kwargs=True,
                )
    empty = bb.encode_prompts([""])
    rows: dict[str, list[torch.Tensor]] = {}
    shapes, colours, looks, train = [], [], [], []
    world = ShapesWorldConfig(look_prob=look_prob)
    for i in range(n_train + n_test):
        s = make_scene(3, i, world)
        z0 = bb.encode_images([s.image], pred.resolution)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(i)).to(z0)
        with torch.no_grad():  # the features feed an autograd fit below: no inference tensors
            bb.forward(bb.add_noise(z0, noise, t), t, empty)
        for j, o in enumerate(s.objects):
            obj = torch.from_numpy(s.instance == j + 1).float()[None, None]
            if not (F.adaptive_avg_pool2d(obj, 4) >= 0.5).any():  # the same objects for every model: 16-px cells
                continue
            row = {}
            for name, h in feats.items():
                side = round(h.shape[1] ** 0.5)
                cells = F.adaptive_avg_pool2d(obj, side)[0, 0].flatten() >= 0.5
                if not cells.any():
                    break
                row[name] = h[0, cells.to(h.device)].float().mean(0).cpu()
            else:
                for name, v in row.items():
                    rows.setdefault(name, []).append(v)
                shapes.append(SHAPES.index(o.shape))
                colours.append(list(COLOURS).index(o.colour))
                looks.append(0 if o.look is None else 1 + LOOKS.index(o.look))
                train.append(i < n_train)
    y_shape, y_colour, is_train = torch.tensor(shapes), torch.tensor(colours), torch.tensor(train)
    y_look = torch.tensor(looks)
    worn = y_look > 0  # the look is read among the objects that wear one: 5 classes, chance 0.2
    print(f"{int(is_train.sum())} training / {int((~is_train).sum())} test objects, t = {t}; chance 0.125")
    if worn.any():
        print(f"  looks read on the {int(worn.sum())} objects that wear one; chance 0.2")
    for name, v in rows.items():
        x = torch.stack(v)
        line = (
            f"  {name}: shape {_logistic_accuracy(x, y_shape, is_train):.2f}, "
            f"colour {_logistic_accuracy(x, y_colour, is_train):.2f}"
        )
        if worn.any():
            line += f", look {_logistic_accuracy(x[worn], y_look[worn] - 1, is_train[worn]):.2f}"
        print(line)


def grid_bound(pred: AttnSegPredictor, scenes) -> float:
    """mIoU of each class's true mask averaged over the cells of the model's attention grid and resized back."""
    latent = tuple(pred.backbone.encode_images([scenes[0].image], pred.resolution).shape[-2:])
    grid = finest_grid([lay for lay in pred.inventory if lay.kind == "cross"], latent)
    conf = np.zeros((len(SHAPES) + 1,) * 2, dtype=np.int64)
    for s in scenes:
        onehot = torch.stack([torch.from_numpy(s.semantic == c).float() for c in range(len(SHAPES) + 1)])[None]
        low = torch.nn.functional.adaptive_avg_pool2d(onehot, grid)
        up = torch.nn.functional.interpolate(low, size=s.semantic.shape, mode="bilinear", align_corners=False)[0]
        conf += confusion(s.semantic, up.argmax(0).numpy(), len(SHAPES) + 1)
    return 100 * summarize(conf, ["background", *SHAPES])["miou"]


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


def attention_mass(pred: AttnSegPredictor, scenes, t: int) -> None:
    """Per joint block, where the image queries' attention goes before any renormalisation: the share on text tokens
    for object and background pixels, and how the text share splits over the start token, the caption's words, the
    end token and the padding."""
    bb, tr = pred.backbone, pred.backbone.pipe.transformer
    tok = bb.pipe.tokenizer
    rng = np.random.default_rng(0)
    caps = [caption(s.objects, rng, colour_prob=1.0) for s in scenes]
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    end = (ids == tok.eos_token_id).int().argmax(1)  # the first end token; the padding after it
    pos = torch.arange(ids.shape[1])[None]
    groups = {"start": pos == 0, "words": (pos > 0) & (pos < end[:, None]), "end": pos == end[:, None]}
    groups["padding"] = pos > end[:, None]
    z0 = bb.encode_images([s.image for s in scenes], pred.resolution).float()
    s_ = t / 1000
    zt = (1 - s_) * z0 + s_ * torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    enc = bb.encode_prompts(caps)
    side = z0.shape[-1]
    obj = torch.from_numpy(np.stack([s.semantic > 0 for s in scenes])).float()[:, None]
    obj = (torch.nn.functional.adaptive_avg_pool2d(obj, side) > 0.5).flatten(1)  # (B, P)
    seen: dict[int, dict] = {}
    hooks = [
        blk.attn.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
        for i, blk in enumerate(tr.transformer_blocks)
    ]
    with torch.inference_mode():
        tr(
            zt,
            encoder_hidden_states=enc.hidden,
            pooled_projections=enc.added["pooled_projections"],
            timestep=torch.full((len(scenes),), float(t)),
        )
    for h in hooks:
        h.remove()
    print("| block | text share, object pixels | background pixels | of the text share: start / words / end / padding |")
    print("|---|---|---|---|")
    for i, kw in sorted(seen.items()):
        attn = tr.transformer_blocks[i].attn
        heads = attn.heads

        def split(x: torch.Tensor, heads: int = heads) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        with torch.inference_mode():
            q, k = split(attn.to_q(kw["hidden_states"])), split(attn.to_k(kw["hidden_states"]))
            kc = split(attn.add_k_proj(kw["encoder_hidden_states"]))
            if attn.norm_q is not None:
                q, k = attn.norm_q(q), attn.norm_k(k)
            if attn.norm_added_k is not None:
                kc = attn.norm_added_k(kc)
            logits = q @ torch.cat([k, kc], dim=2).transpose(-1, -2) * attn.scale
            probs = logits.softmax(-1).mean(1)  # (B, P, P + T), heads averaged
        text = probs[..., side * side :]
        share = text.sum(-1)  # (B, P)
        on_obj, on_bg = float(share[obj].mean()), float(share[~obj].mean())
        parts = [float((text * g[:, None, :]).sum(-1).sum() / text.sum()) for g in groups.values()]
        print(f"| {i} | {on_obj:.3f} | {on_bg:.3f} | " + " / ".join(f"{x:.2f}" for x in parts) + " |")


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


def iseg_sweep(pred: AttnSegPredictor, scenes, ts: list[int], n_blocks: int) -> None:
    """The ``iseg-sweep`` probe: each stage keeps the best setting of the one before."""

    def run(**kw) -> float:
        return miou(pred, scenes, "iseg:mmdit", **{**best, **kw})

    def pick(name: str, options: dict[str, dict]) -> None:
        scores = {k: run(**kw) for k, kw in options.items()}
        for k, v in scores.items():
            print(f"{name}: {k}: {v:.1f}", flush=True)
        best.update(options[max(scores, key=scores.get)])

    best: dict = {"timestep": ts[0], "bg_threshold": 0.6, "iters": 1}
    last = (LayerSelect(kind="cross", ranks=(0,), blocks=("joint",), take=(-1, None)),)
    pick("cross", {"every block": {}, "last block": {"cross_layers": last}})
    selfs = {f"block {b}": {"self_layer": LayerSelect(kind="self", blocks=("joint",), take=(b, b + 1))} for b in range(n_blocks)}
    pick("self", selfs)
    pick("t x bg", {f"t={t} bg {thr}": {"timestep": t, "bg_threshold": thr} for t in ts for thr in (None, 0.5, 0.6, 0.7)})
    pick("iterations", {f"N={k}": {"iters": k} for k in (1, 2, 4, 8)})
    print(f"without Cat-Cross (gamma 1): {run(gamma=1.0):.1f}; chosen: {best}", flush=True)


class EveryHead(CrossAttentionBaseline):
    """The cross baseline over every head of every joint block that keeps, for the one image of each call, each
    head's label maps: ``maps`` (blocks x heads, P, K) in block order."""

    def plan(self, inventory, latent):
        plan = super().plan(inventory, latent)
        plan.per_head = list(plan.cross)
        return plan

    def scores(self, store, spans, plan):
        self.maps = torch.cat([token_maps(store.mean(n)[0], spans.spans) for n in plan.cross])
        return super().scores(store, spans, plan)


def head_maps(pred: AttnSegPredictor, scenes, t: int) -> list[tuple[torch.Tensor, object, list[str]]]:
    """(every head's label maps, scene, labels) of each scene, one forward each."""
    method = EveryHead(CrossConfig(timestep=t))
    out = []
    for s in scenes:
        labs = sorted(set(s.labels))
        pred.segment_batch([s.image], [labs], method=method, draws=1)
        out.append((method.maps, s, labs))
    return out


def heads_miou(data, chosen: list[int], thr: float) -> float:
    """The cross baseline's mIoU averaging the maps of heads ``chosen`` (rows of :func:`head_maps`' maps), scored as
    the method scores: min-max per label, the background rule at ``thr``, resized to the image, argmax."""
    conf = np.zeros((len(SHAPES) + 1,) * 2, dtype=np.int64)
    for maps, s, labs in data:
        fg = minmax(maps[chosen].mean(dim=0, keepdim=True))
        sc = with_background(fg, background_score(fg, 2.0, thr))[0]
        g = round(sc.shape[0] ** 0.5)  # the transformer's square grid
        img = torch.nn.functional.interpolate(
            sc.T.reshape(1, -1, g, g), size=s.semantic.shape, mode="bilinear", align_corners=False
        )
        ids = np.array([0, *[SHAPES.index(x) + 1 for x in labs]])
        conf += confusion(s.semantic, ids[img[0].argmax(0).numpy()], len(SHAPES) + 1)
    return 100 * summarize(conf, ["background", *SHAPES])["miou"]


def heads_probe(pred: AttnSegPredictor, n: int, t: int, thr: float, heads: int) -> None:
    """The ``heads`` probe."""
    sel = head_maps(pred, [make_scene(3, i) for i in range(n)], t)
    start = max(n, 100)
    check = head_maps(pred, [make_scene(3, i) for i in range(start, start + 200)], t)
    name = [f"{i // heads}h{i % heads}" for i in range(len(sel[0][0]))]
    every = list(range(len(name)))
    print(
        f"t={t} bg {thr}: every head {heads_miou(sel, every, thr):.1f} (scenes {start}-{start + 199}: {heads_miou(check, every, thr):.1f})"
    )
    print("one head: " + ", ".join(f"{name[i]} {heads_miou(sel, [i], thr):.1f}" for i in every), flush=True)
    chosen: list[int] = []
    best = -1.0
    while len(chosen) < len(every):
        v, c = max((heads_miou(sel, [*chosen, c], thr), c) for c in every if c not in chosen)
        if v <= best:
            break
        chosen.append(c)
        best = v
        spec = "+".join(name[i] for i in chosen)
        print(f"{spec}: {v:.1f} (scenes {start}-{start + 199}: {heads_miou(check, chosen, thr):.1f})", flush=True)


def block_set(modules: list[str], spec: str) -> tuple[LayerSelect, ...]:
    """The cross maps of the joint blocks named by ``spec``, '+'-separated indices from 0 ("1+3"), every head of
    each, or single heads written ``BhH`` ("1h1+4h1+0h0": head 1 of blocks 1 and 4, head 0 of block 0)."""
    heads: dict[int, list[int]] = {}
    whole: set[int] = set()
    for part in spec.split("+"):
        block, _, head = part.partition("h")
        heads.setdefault(int(block), []).extend([int(head)] if head else [])
        if not head:
            whole.add(int(block))
    if both := sorted(b for b in whole if heads[b]):
        raise SystemExit(f"--blocks {spec}: block {both[0]} is named both whole and by a head; name one or the other")
    if any(not 0 <= b < len(modules) for b in heads):
        raise SystemExit(f"--blocks {spec}: this model has joint blocks 0-{len(modules) - 1}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, hs in heads.items():
        groups.setdefault(tuple(sorted(hs)), []).append(b)
    return tuple(
        LayerSelect(kind="cross", names=tuple(f"{modules[b]}:cross" for b in blocks), heads=hs) for hs, blocks in groups.items()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument(
        "probe",
        choices=[
            "text",
            "timesteps",
            "blocks",
            "pattern",
            "profile",
            "bound",
            "position",
            "mass",
            "binding",
            "swap",
            "linear",
            "presets",
            "sweep",
            "t2m-sweep",
            "iseg-sweep",
            "heads",
        ],
    )
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--t", default=None, help="noise levels, comma-separated (default: 150,400,700; mass: 400)")
    ap.add_argument("-m", "--method", action="append", default=None)
    ap.add_argument(
        "--blocks",
        action="append",
        default=None,
        help="sweep, t2m-sweep: a set of joint blocks read for the Cross, '+'-separated from 0 (e.g. 1+3), or of single "
        "heads, block h head (e.g. 0h0+1h1); repeatable",
    )
    ap.add_argument(
        "--words",
        choices=["shape", "colour", "look"],
        default="shape",
        help="profile, binding: the objects' words read (look: binding only, with --looks)",
    )
    ap.add_argument("--thr", type=float, default=0.6, help="heads: the background threshold")
    ap.add_argument(
        "--looks",
        type=float,
        default=0.0,
        help="share of the validation scenes' objects that wear a look (linear: whose look is read too; binding: "
        "--words look reads them)",
    )
    a = ap.parse_args()
    if a.words == "look" and (a.probe != "binding" or a.looks <= 0):
        ap.error("--words look reads the looks of the binding probe's scenes: use it with binding and --looks P > 0")
    torch.set_num_threads(1)
    pred = AttnSegPredictor.from_pretrained(a.model)
    if a.probe == "text":
        text_paths(pred, a.n)
        return
    if a.probe == "linear":
        linear_read(pred, int((a.t or "150").split(",")[0]), a.looks)
        return
    world = ShapesWorldConfig(look_prob=a.looks)
    scenes = [make_scene(3, i, world) for i in range(a.n)]
    ts = [int(t) for t in (a.t or ("400" if a.probe == "mass" else "150,400,700")).split(",")]
    if a.probe == "pattern":
        auc, corr = fixed_pattern(pred, scenes)
        print(f"{a.model}: label AUC {auc:.3f}, correlation with the label's map in other scenes {corr:.3f}")
        return
    if a.probe == "bound":
        print(f"{a.model}: perfect maps on its attention grid would score {grid_bound(pred, scenes):.1f} mIoU")
        return
    if a.probe == "profile":
        prof = edge_profile(pred, scenes, a.words)
        print(f"{a.model}, {a.words} words: mean cross map over " + ", ".join(f"{k} {v:.3f}" for k, v in prof.items()))
        return
    if a.probe == "mass":
        attention_mass(pred, scenes, ts[0])
        return
    if a.probe == "binding":
        method = (a.method or ["cross"])[0]
        res = binding(pred, scenes, a.words, method)
        print(
            f"{a.model}, {method}, {a.words} words: objects whose own word scores highest, by words in the scene: "
            + ", ".join(f"{k}: {v:.2f} of {n} (chance {1 / k:.2f})" for k, (v, n) in res.items())
        )
        return
    if a.probe == "swap":
        word_swaps(pred, scenes, [t / 1000 for t in ts])
        return
    if a.probe == "position":
        word, place = word_or_place(pred, scenes)
        print(
            f"{a.model}: correlation of a label's map with itself six tokens later {word:.3f}, with an absent shape's map at its place {place:.3f}"
        )
        return
    if a.probe == "presets":
        methods = ("cross:embedded-sd3", "t2m:embedded-sd3", "iseg:embedded-sd3")
        print(f"{a.model}: " + ", ".join(f"{m} {miou(pred, scenes, m):.1f}" for m in methods))
        return
    if a.probe == "timesteps":
        for m in a.method or ["cross"]:
            print(m, " ".join(f"t={t}: {miou(pred, scenes, m, timestep=t):.1f}" for t in ts))
        return
    modules = sorted({lay.module for lay in pred.inventory if lay.kind == "cross"}, key=lambda s: int(s.split(".")[1]))
    chosen = {b: block_set(modules, b) for b in a.blocks or ()}
    if a.probe == "t2m-sweep":
        last = next(iter(chosen.values()), (LayerSelect(kind="cross", blocks=("joint",), take=(-1, None)),))
        plain = {"synonyms": False, "background_words": (), "posterior": "mean", "cross": last}
        selfs = {f"self of block {b}": LayerSelect(kind="self", blocks=("joint",), take=(b, b + 1)) for b in range(len(modules))}
        selfs["self of every block"] = LayerSelect(kind="self")
        best, best_v = "", -1.0
        for name, sel in selfs.items():
            v = miou(pred, scenes, "t2m:paper", timestep=ts[0], self_layer=sel, bg_threshold=0.6, **plain)
            print(f"t={ts[0]} bg 0.6 {name}: {v:.1f}", flush=True)
            best, best_v = (name, v) if v > best_v else (best, best_v)
        top, top_v = (ts[0], 0.6), best_v
        for t in ts:
            row = []
            for thr in (None, 0.6, 0.7, 0.8):
                v = miou(pred, scenes, "t2m:paper", timestep=t, self_layer=selfs[best], bg_threshold=thr, **plain)
                row.append(f"{v:.1f}")
                top, top_v = ((t, thr), v) if v > top_v else (top, top_v)
            print(f"t={t} {best}: bg paper / 0.6 / 0.7 / 0.8: {' / '.join(row)}", flush=True)
        t, thr = top
        row = [
            f"{miou(pred, scenes, 't2m:paper', timestep=t, self_layer=selfs[best], bg_threshold=thr, iters=k, **plain):.1f}"
            for k in (1, 2, 3, 4)
        ]
        print(f"t={t} bg {thr} {best}: Self^1 / ^2 / ^3 / ^4: {' / '.join(row)}", flush=True)
        return
    if a.probe == "iseg-sweep":
        iseg_sweep(pred, scenes, ts, len(modules))
        return
    if a.probe == "heads":
        heads_probe(pred, a.n, ts[0], a.thr, next(lay.heads for lay in pred.inventory if lay.kind == "cross"))
        return
    if a.probe == "sweep":
        sets = chosen or {
            "last": LayerSelect(kind="cross", blocks=("joint",), take=(-1, None)),
            "last two": LayerSelect(kind="cross", blocks=("joint",), take=(-2, None)),
            "all": LayerSelect(kind="cross"),
        }
        for t in ts:
            for name, sel in sets.items():
                row = [
                    f"{miou(pred, scenes, 'cross:default', timestep=t, cross=sel, bg_threshold=thr):.1f}"
                    for thr in (None, 0.6, 0.7, 0.8)
                ]
                print(f"t={t} {name}: bg paper / 0.6 / 0.7 / 0.8: {' / '.join(row)}", flush=True)
        return
    for mod in modules:
        sel = LayerSelect(kind="cross", names=(f"{mod}:cross",))
        print(mod, f"{miou(pred, scenes, 'cross:default', timestep=ts[0], cross=sel):.1f}")


if __name__ == "__main__":
    main()
