"""ShapesWorld's personalized referring segmentation benchmark: the analog of T2M's Mug19 (T2M section 4).

A *personal instance* is a shape with a look that no caption word names: a grey pattern drawn over its body
(ShapesWorld's :data:`LOOKS`: striped, dotted, two-tone, checkered, rimmed). Its fill colour is its *context*, as a mug's content
("with cola") is in Mug19: the same instance appears in several colours, and a query names one, "a red <striped>
circle". Each instance has training photos (one object, other colours, sizes, rotations and backgrounds) and every
test scene holds 3-5 objects of the benchmark's class, each a personal instance in a colour, all queried:

- a *semantic distractor* of an object is another object of the same colour (the context words do not tell them
  apart, the learned token must);
- a *visual distractor* is another object of the same look (the token does not tell them apart, the colour must).

Splits (T2M section 4.3): ``all`` the queried objects, ``semantic`` those with a semantic distractor in their scene,
``visual`` those with a visual distractor. Everything is a pure function of (seed, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from attnseg.shapes.world import COLOURS, LOOKS, SceneObject, _background, _rng, paint, render_coverage

SPLITS: tuple[str, ...] = ("all", "semantic", "visual")


def token_of(look: str) -> str:
    """The concept token learned for ``look``: ``<striped>``, ``<two-tone>``, ..."""
    return f"<{look}>"


@dataclass(frozen=True)
class PersonalObject:
    """One object of a benchmark image: the shape, colour and pose of :class:`SceneObject`, and its look."""

    obj: SceneObject
    look: str

    def query(self, kind: str = "attnseg") -> str:
        """Its referring phrase: ``attnseg`` "a red <striped> circle" (context and subject), ``subject_only``
        "a <striped> circle", ``context_only`` "a red circle" (T2M section 5.3's baselines); ``look_words`` "a red
        striped circle" (the look said in words, no learned token: what a model whose captions named the looks can
        do when told)."""
        if kind == "look_words":
            return f"a {self.obj.colour} {self.look} {self.obj.shape}".replace("a orange", "an orange")
        subject = {"attnseg": True, "subject_only": True, "context_only": False}[kind]
        context = kind != "subject_only"
        words = ["a"] + ([self.obj.colour] if context else []) + ([token_of(self.look)] if subject else []) + [self.obj.shape]
        return " ".join(words).replace("a orange", "an orange")


@dataclass
class PersonalScene:
    """An image with its objects; ``instance`` (H, W) uint8: 0 background, i = ``objects[i - 1]`` (visible part)."""

    image: np.ndarray
    instance: np.ndarray
    objects: list[PersonalObject]

    def splits(self, i: int) -> list[str]:
        """The splits object ``i`` (0-based) belongs to."""
        me = self.objects[i]
        others = [o for j, o in enumerate(self.objects) if j != i]
        out = ["all"]
        if any(o.obj.colour == me.obj.colour for o in others):
            out.append("semantic")
        if any(o.look == me.look for o in others):
            out.append("visual")
        return out


def render(objects: list[PersonalObject], rng: np.random.Generator, size: int = 64) -> PersonalScene:
    """Draw ``objects`` in order (later on top) on a ShapesWorld background, with its shading and pixel noise."""
    img = _background(rng, size)
    instance = np.zeros((size, size), np.uint8)
    for i, po in enumerate(objects, start=1):
        obj = replace(po.obj, look=po.look)
        body = render_coverage(obj, size, 4)
        col = np.asarray(COLOURS[po.obj.colour], np.float32) + rng.uniform(-12, 12, 3)
        shade = 1.0 + 0.08 * rng.normal()
        img = paint(img, obj, col * shade, body, 4)
        instance[body >= 0.5] = i
    img += rng.normal(0, 3.0, size=img.shape)
    return PersonalScene(np.clip(np.rint(img), 0, 255).astype(np.uint8), instance, list(objects))


def _place(rng: np.random.Generator, n: int, size: int, radius: tuple[float, float]) -> list[tuple[float, float, float]]:
    """``n`` (cx, cy, r) that do not overlap (rejection sampling; radii shrink if a scene does not fit)."""
    lo, hi = radius
    for attempt in range(200):
        shrink = 0.97 ** (attempt // 20)
        out: list[tuple[float, float, float]] = []
        for _ in range(n):
            r = rng.uniform(lo, hi) * size * shrink
            for _try in range(40):
                cx, cy = rng.uniform(r, size - r, 2)
                if all(math.hypot(cx - x, cy - y) >= r + q + 1 for x, y, q in out):
                    out.append((float(cx), float(cy), float(r)))
                    break
        if len(out) == n:
            return out
    raise RuntimeError(f"could not place {n} objects in a {size}-px image")


def training_photos(look: str, shape: str, n: int, seed: int, size: int = 64, colour: str | None = None) -> list[np.ndarray]:
    """``n`` photos of the personal instance (``shape`` with ``look``): one object each, other sizes, rotations,
    places and backgrounds; in every colour in turn (``colour`` None: colour is its context, as the benchmark reads
    it) or always in ``colour`` (one object of the user's, its colour part of its look)."""
    colours = list(COLOURS)
    if colour is not None and colour not in colours:
        raise ValueError(f"unknown colour {colour!r}; known colours: {', '.join(colours)}")
    photos = []
    for i in range(n):
        rng = _rng(seed, 100_000 + LOOKS.index(look) * 1000 + i)
        ((cx, cy, r),) = _place(rng, 1, size, (0.2, 0.34))
        colour_i = colour or colours[(i + LOOKS.index(look)) % len(colours)]
        obj = SceneObject(colour_i, shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        photos.append(render([PersonalObject(obj, look)], rng, size).image)
    return photos


def test_scene(index: int, seed: int, shape: str, looks: tuple[str, ...] = LOOKS, size: int = 64) -> PersonalScene:
    """Test scene ``index``: 3-5 objects of ``shape``, distinct (look, colour) pairs; even scenes are built around a
    semantic distractor pair (one colour, two looks), odd ones around a visual one (one look, two colours); the other
    objects are drawn at random, so that scenes hold both kinds too."""
    rng = _rng(seed, 200_000 + index)
    n = int(rng.integers(3, 6))
    colours = list(COLOURS)
    pairs: list[tuple[str, str]] = []
    la, lb = (str(x) for x in rng.choice(looks, 2, replace=False))
    ca, cb = (str(x) for x in rng.choice(colours, 2, replace=False))
    pairs += [(la, ca), (lb, ca)] if index % 2 == 0 else [(la, ca), (la, cb)]
    while len(pairs) < n:
        p = (str(rng.choice(looks)), str(rng.choice(colours)))
        if p not in pairs:
            pairs.append(p)
    order = rng.permutation(n)
    places = _place(rng, n, size, (0.11, 0.15))
    objs = [
        PersonalObject(SceneObject(pairs[k][1], shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), pairs[k][0])
        for k, (cx, cy, r) in zip(order, places, strict=True)
    ]
    return render(objs, rng, size)


def export_personal(
    out: Path, look: str, shape: str = "circle", photos: int = 8, scenes: int = 4, seed: int = 7, colour: str | None = None
) -> list[str]:
    """Write a personal instance's training photos (``out/photos/photo_NN.png``) and ``scenes`` test scenes that hold
    exactly one object of it among other looks of ``shape`` (``out/scenes/scene_NN.png``; its pixels in
    ``out/truth/scene_NN.png``: palette PNG, 1 = the instance), for ``attnseg personalize`` and ``segment --concept``.
    With ``colour`` the instance always has that colour. Returns the scenes' colour words of the instance."""
    from PIL import Image

    from attnseg.io.images import palette_png

    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}; known looks: {', '.join(LOOKS)}")
    for sub in ("photos", "scenes", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(training_photos(look, shape, photos, 0, colour=colour)):
        Image.fromarray(im).save(out / "photos" / f"photo_{i:02d}.png")
    colours, index = [], 0
    while len(colours) < scenes:
        sc = test_scene(index, seed, shape)
        index += 1
        mine = [q for q, o in enumerate(sc.objects) if o.look == look and colour in (None, o.obj.colour)]
        if len(mine) != 1:
            continue
        k = len(colours)
        Image.fromarray(sc.image).save(out / "scenes" / f"scene_{k:02d}.png")
        palette_png((sc.instance == mine[0] + 1).astype(np.uint8)).save(out / "truth" / f"scene_{k:02d}.png")
        colours.append(sc.objects[mine[0]].obj.colour)
    return colours
