"""ShapesWorld: a procedural scene generator with exact ground-truth masks.

Scenes hold 1-3 coloured shapes on a calm background. Every scene is a pure function of
``(seed, index)``, so a split is reproducible and held-out scenes are simply other seeds. An object may wear a
*look* (:data:`LOOKS`, a grey pattern over its body) that scene captions do not name: the personalized segmentation
benchmark's instances are such objects, and a world with ``look_prob`` > 0 shows them to the model in training, where
a caption may name a look by its word (``caption(..., look_word_prob=...)``) so that the model's text pathway has a
direction for each look, as Stable Diffusion has for "striped" or "dotted".

Classes of the semantic mask: 0 = background, ``SHAPES.index(shape) + 1`` for each shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from attnseg.io.images import palette_png

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "heart",
    "cross",
    "ring",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (35, 75, 215),
    "purple": (130, 45, 175),
    "pink": (245, 120, 190),
    "white": (245, 245, 245),
}
CLASS_NAMES: tuple[str, ...] = ("background", *SHAPES)

LOOKS: tuple[str, ...] = ("striped", "dotted", "two-tone", "checkered", "rimmed")
"""Patterns an object may wear, each drawn in :data:`PATTERN_COLOUR` over the body; coarse, so that each spans a few
cells of the 16-px latent grid. No caption word names them."""
PATTERN_COLOUR = np.array((128, 128, 128), np.float32)
"""Mid grey: the embedded VAE reconstructs it within a few levels (``python scripts/vae_looks.py``), where it turns
a near-black pattern green; no body colour is grey."""


def look_pattern(look: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where ``look`` paints the pattern colour, at object coordinates (u, v) of unit radius."""
    if look == "striped":
        return np.abs(u) <= 0.3
    if look == "dotted":
        return u * u + v * v <= 0.4**2
    if look == "two-tone":
        return v < 0
    if look == "checkered":
        return (u < 0) == (v < 0)
    if look == "rimmed":
        return u * u + v * v >= 0.68**2
    raise ValueError(f"unknown look {look!r}; known looks: {', '.join(LOOKS)}")


# Caption templates; ``{objs}`` is the objects joined by the template's own joiner.
CAPTION_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    # (prefix, joiner for 2 items / last item, suffix)
    ("a ", " and a ", ""),
    ("a photo of a ", " and a ", ""),
    ("a picture of a ", " and a ", ""),
    ("an image of a ", " and a ", ""),
    ("a ", " next to a ", ""),
    ("a photo of a ", " next to a ", ""),
    ("a photo including a ", ", and a ", "."),
    ("a photograph of a ", " and a ", " and other objects and background"),
    ("a drawing of a ", " with a ", ""),
)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its colour and shape words, where it is and how it is drawn."""

    colour: str
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    look: str | None = None
    """One of :data:`LOOKS`, or plain; named by a caption only when it asks (``look_word_prob``)."""

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A rendered scene with exact ground truth.

    image: (H, W, 3) uint8 RGB. semantic: (H, W) uint8 class ids (0 = background).
    instance: (H, W) uint8, 0 = background, i = objects[i - 1] (the visible part of it).
    """

    image: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    objects: list[SceneObject]
    index: int = 0
    seed: int = 0
    caption: str = ""

    @property
    def labels(self) -> list[str]:
        """Image-level labels: the distinct shape names present, in class order."""
        present = {SHAPES[c - 1] for c in np.unique(self.semantic) if c > 0}
        return [s for s in SHAPES if s in present]


@dataclass
class ShapesWorldConfig:
    """Settings of the generator; the defaults are the world the embedded model is trained on."""

    size: int = 64
    """Image side in pixels."""
    max_objects: int = 3
    """Scenes hold 1..max_objects objects."""
    object_count_probs: tuple[float, ...] = (0.35, 0.4, 0.25)
    """Probability of 1, 2, 3 objects."""
    radius_range: tuple[float, float] = (1 / 8, 1 / 4)
    """Object radius as a fraction of the image side."""
    same_shape_prob: float = 0.2
    """In scenes with 2+ objects, chance that a second object repeats the first one's shape."""
    min_visible: float = 0.5
    """Reject a placement that leaves less than this fraction of an earlier object visible."""
    supersample: int = 4
    """Anti-aliasing factor of the renderer."""
    noise_std: float = 3.0
    """Std of the mild pixel noise (0-255 scale)."""
    colour_jitter: float = 12.0
    """Per-object uniform jitter of the fill colour (0-255 scale)."""
    shapes: tuple[str, ...] = field(default_factory=lambda: SHAPES)
    colours: tuple[str, ...] = field(default_factory=lambda: tuple(COLOURS))
    look_prob: float = 0.0
    """Chance that an object wears one of :data:`LOOKS` (uniformly chosen). 0 draws nothing more from the scene's
    random stream, so the scenes are those of a world without looks."""


# ----------------------------------------------------------------------------- geometry


def _polygon(n: int, r: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    a = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xint)
    return inside


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Membership of points (x, y) in the unit-radius ``shape`` centred at the origin."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "ring":
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "square":
        s = 0.8
        return (np.abs(x) <= s) & (np.abs(y) <= s)
    if shape == "triangle":
        return _inside_polygon(x, y - 0.15, _polygon(3, 1.1))
    if shape == "hexagon":
        return _inside_polygon(x, y, _polygon(6, 1.0, phase=0.0))
    if shape == "star":
        return _inside_polygon(x, y, _star(5, 1.1, 0.47))
    if shape == "cross":
        w = 0.33
        return ((np.abs(x) <= w) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= w) & (np.abs(x) <= 0.95))
    if shape == "heart":
        # Implicit heart curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled to unit radius.
        u = x * 1.15
        v = -(y * 1.15) + 0.15
        return (u * u + v * v - 1.0) ** 3 - u * u * v**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render_coverage(obj: SceneObject, size: int, supersample: int, pattern: bool = False) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of ``obj`` (anti-aliased by supersampling); with ``pattern``, of the
    part of it its look paints (zero for a plain object)."""
    cov = np.zeros((size, size), dtype=np.float32)
    ext = obj.radius * 1.2 + 1
    x0, x1 = max(0, int(obj.cx - ext)), min(size, math.ceil(obj.cx + ext) + 1)
    y0, y1 = max(0, int(obj.cy - ext)), min(size, math.ceil(obj.cy + ext) + 1)
    if x1 <= x0 or y1 <= y0 or (pattern and obj.look is None):
        return cov
    s = supersample
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s
    gx, gy = np.meshgrid(xs - obj.cx, ys - obj.cy)
    c, si = math.cos(obj.angle), math.sin(obj.angle)
    u = (c * gx + si * gy) / obj.radius
    v = (-si * gx + c * gy) / obj.radius
    m = shape_mask(obj.shape, u, v)
    if pattern:
        m = m & look_pattern(obj.look, u, v)
    cov[y0:y1, x0:x1] = m.astype(np.float32).reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return cov


def paint(img: np.ndarray, obj: SceneObject, colour: np.ndarray, body: np.ndarray, supersample: int) -> np.ndarray:
    """``img`` with ``obj`` (its coverage ``body``) drawn over it in ``colour``, its look's pattern in
    :data:`PATTERN_COLOUR`."""
    fill = colour[None, None, :]
    if obj.look is not None:
        pat = render_coverage(obj, len(body), supersample, pattern=True)[..., None]
        fill = fill * (1 - pat) + PATTERN_COLOUR * pat
    return img * (1 - body[..., None]) + fill * body[..., None]


# ----------------------------------------------------------------------------- backgrounds


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A calm background: desaturated base colour plus one low-contrast pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(70, 170)
    tint = rng.normal(0, 10, size=3)
    img = np.broadcast_to(base + tint, (size, size, 3)).astype(np.float32).copy()
    kind = rng.integers(0, 5)
    amp = rng.uniform(10, 28)
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * math.pi)
        g = (np.cos(a) * xx + np.sin(a) * yy) - 0.5
        img += (amp * 1.5 * g)[..., None] * (1 + 0.2 * rng.normal(size=3))
    elif kind == 1:  # soft blobs
        for _ in range(rng.integers(2, 5)):
            cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.35)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
            img += blob[..., None] * rng.normal(0, amp, size=3)
    elif kind == 2:  # low-contrast stripes
        a = rng.uniform(0, math.pi)
        f = rng.uniform(3, 8)
        g = np.sin(2 * math.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
        img += (0.5 * amp * g)[..., None]
    elif kind == 3:  # low-contrast checks
        f = rng.integers(3, 8)
        g = ((np.floor(xx * f) + np.floor(yy * f)) % 2) * 2 - 1
        img += (0.35 * amp * g)[..., None]
    # kind 4: flat
    return img


# ----------------------------------------------------------------------------- scenes


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def sample_objects(rng: np.random.Generator, cfg: ShapesWorldConfig) -> list[SceneObject]:
    """Draw the object list (before occlusion checks) of one scene."""
    probs = np.asarray(cfg.object_count_probs[: cfg.max_objects], dtype=np.float64)
    n = int(rng.choice(len(probs), p=probs / probs.sum())) + 1
    shapes = list(rng.choice(cfg.shapes, size=n, replace=n > len(cfg.shapes)))
    if n >= 2 and rng.random() < cfg.same_shape_prob:
        shapes[1] = shapes[0]
    colours = list(rng.choice(cfg.colours, size=n, replace=False))
    objs = []
    for shape, colour in zip(shapes, colours, strict=True):
        r = rng.uniform(*cfg.radius_range) * cfg.size
        objs.append(
            SceneObject(
                colour=str(colour),
                shape=str(shape),
                cx=float(rng.uniform(r * 0.8, cfg.size - r * 0.8)),
                cy=float(rng.uniform(r * 0.8, cfg.size - r * 0.8)),
                radius=float(r),
                angle=float(rng.uniform(0, 2 * math.pi)),
            )
        )
    return objs


def make_scene(seed: int, index: int, cfg: ShapesWorldConfig | None = None) -> Scene:
    """Render scene ``index`` of the world with ``seed``; deterministic in (seed, index, cfg)."""
    cfg = cfg or ShapesWorldConfig()
    rng = _rng(seed, index)
    size = cfg.size
    for _attempt in range(50):
        objs = sample_objects(rng, cfg)
        covs = [render_coverage(o, size, cfg.supersample) for o in objs]
        # Later objects are drawn on top; check how much of each one stays visible.
        visible = []
        for i, cov in enumerate(covs):
            over = np.zeros_like(cov)
            for later in covs[i + 1 :]:
                over = np.maximum(over, later)
            visible.append(cov * (1 - over))
        ok = all(v.sum() >= cfg.min_visible * max(c.sum(), 1e-6) and c.sum() > 4 for v, c in zip(visible, covs, strict=True))
        if ok:
            break
    else:  # pragma: no cover - 50 rejections in a row do not happen with the default config
        objs, covs = objs[:1], covs[:1]
    if cfg.look_prob > 0:
        objs = [replace(o, look=str(rng.choice(LOOKS))) if rng.random() < cfg.look_prob else o for o in objs]
    img = _background(rng, size)
    semantic = np.zeros((size, size), dtype=np.uint8)
    instance = np.zeros((size, size), dtype=np.uint8)
    for i, (o, cov) in enumerate(zip(objs, covs, strict=True)):
        col = np.asarray(COLOURS[o.colour], np.float32) + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3)
        # Mild shading so that objects are not flat stickers.
        shade = 1.0 + 0.08 * rng.normal()
        img = paint(img, o, col * shade, cov, cfg.supersample)
        m = cov >= 0.5
        semantic[m] = cfg.shapes.index(o.shape) + 1 if o.shape in cfg.shapes else 0
        instance[m] = i + 1
    img += rng.normal(0, cfg.noise_std, size=img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    scene = Scene(image=image, semantic=semantic, instance=instance, objects=objs, index=index, seed=seed)
    scene.caption = caption(objs, rng)
    return scene


def caption(
    objects: list[SceneObject],
    rng: np.random.Generator,
    colour_prob: float = 0.8,
    templates: tuple[tuple[str, str, str], ...] = CAPTION_TEMPLATES,
    look_word_prob: float = 0.0,
) -> str:
    """A caption naming every object, in random order, from a random template.

    Each object is named "colour shape" with probability ``colour_prob``, else by its shape alone. An object that wears
    a look has its look's name put before its shape ("red striped circle") with probability ``look_word_prob``; at 0
    (the default) nothing more is drawn from ``rng``, so captions are those of a world without look words.
    """
    order = rng.permutation(len(objects))
    phrases = []
    for i in order:
        o = objects[i]
        words = [o.colour] if rng.random() < colour_prob else []
        if o.look is not None and look_word_prob > 0 and rng.random() < look_word_prob:
            words.append(o.look)
        phrases.append(" ".join([*words, o.shape]))
    prefix, joiner, suffix = templates[int(rng.integers(len(templates)))]
    if len(phrases) <= 2:
        body = joiner.join(phrases)
    else:
        sep = ", a " if joiner.startswith(" and") or joiner.startswith(",") else joiner
        body = sep.join(phrases[:-1]) + joiner + phrases[-1]
    text = prefix + body + suffix
    return text.replace(" a orange", " an orange").replace("a orange", "an orange")


def shapes_prompts(n: int, seed: int = 3, max_objects: int = 2) -> list[tuple[str, list[str]]]:
    """``n`` (prompt, labels) pairs: 1..max_objects objects of distinct shapes and colours, every
    object named "colour shape" (so an oracle can find it by its colour), in the training templates."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        shapes = [str(x) for x in rng.choice(SHAPES, size=k, replace=False)]
        colours = [str(x) for x in rng.choice(list(COLOURS), size=k, replace=False)]
        objs = [SceneObject(c, s, 0.0, 0.0, 1.0, 0.0) for c, s in zip(colours, shapes, strict=True)]
        text = caption(objs, rng, colour_prob=1.0)
        words = text.replace(",", " ").replace(".", " ").split()
        out.append((text, sorted(shapes, key=words.index)))
    return out


# ----------------------------------------------------------------------------- export


def export_voc(
    out: str | Path,
    n: int,
    seed: int,
    size: int = 64,
    split: str = "val",
    progress: bool = False,
) -> Path:
    """Write ``n`` scenes of ``seed`` in the VOC layout under ``out``.

    Layout: JPEGImages/<id>.png (lossless PNG: JPEG would blur the exact edges),
    SegmentationClass/<id>.png (palette), SegmentationObject/<id>.png, ImageSets/Segmentation/<split>.txt,
    classes.txt, labels.json ({id: [labels]}), captions.json and objects.json.
    """
    from PIL import Image

    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cfg = ShapesWorldConfig(size=size)
    ids, labels, captions, objects = [], {}, {}, {}
    it = range(n)
    if progress:
        from rich.progress import track

        it = track(it, description=f"exporting {n} scenes")
    for i in it:
        sc = make_scene(seed, i, cfg)
        sid = f"shapes_{seed}_{i:06d}"
        ids.append(sid)
        Image.fromarray(sc.image).save(out / "JPEGImages" / f"{sid}.png")
        for arr, sub in ((sc.semantic, "SegmentationClass"), (sc.instance, "SegmentationObject")):
            palette_png(arr).save(out / sub / f"{sid}.png")
        labels[f"{sid}.png"] = sc.labels
        captions[f"{sid}.png"] = sc.caption
        objects[f"{sid}.png"] = [o.__dict__ for o in sc.objects]
    (out / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "objects.json").write_text(json.dumps(objects, indent=1))
    return out
