"""The report of ``attnseg eval`` as a Markdown table and two pictures (PIL only, no plotting dependency)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from attnseg.io.images import palette_png


def markdown_table(report: dict) -> str:
    classes = report["classes"]
    methods = report["methods"]
    lines = [
        f"Images: {report['images']}. Model: {report['model'] or 'none (segmenters only)'}. {report['protocol']}.",
        "",
        "| method | mIoU | pixel acc | " + " | ".join(classes) + " |",
        "|---|---|---|" + "---|" * len(classes),
    ]
    for key, m in methods.items():
        cells = ["-" if m["per_class"][c] is None else f"{100 * m['per_class'][c]:.1f}" for c in classes]
        lines.append(f"| {key} | {100 * m['miou']:.1f} | {100 * m['pixel_acc']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def bar_chart(report: dict, width_per_class: int = 60, height: int = 260) -> Image.Image:
    """Per-class IoU bars, one colour per method (PIL only, no plotting dependency).

    Columns widen to fit the longest class name (PIL's default font is about 6 px a character).
    """
    classes = report["classes"]
    methods = list(report["methods"])
    width_per_class = max(width_per_class, 6 * max(len(c) for c in classes) + 10)
    w = 60 + width_per_class * len(classes)
    im = Image.new("RGB", (w, height + 60 + 14 * len(methods)), "white")
    d = ImageDraw.Draw(im)
    top, base = 10, height
    d.line([(50, top), (50, base)], fill="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        y = base - v * (base - top)
        d.line([(46, y), (w - 5, y)], fill=(220, 220, 220))
        d.text((5, y - 6), f"{v:.2f}", fill="black")
    bw = max(2, (width_per_class - 10) // max(1, len(methods)))
    for ci, c in enumerate(classes):
        x0 = 55 + ci * width_per_class
        for mi, m in enumerate(methods):
            v = report["methods"][m]["per_class"][c]
            if v is None:
                continue
            x = x0 + mi * bw
            d.rectangle([x, base - v * (base - top), x + bw - 1, base], fill=_COLOURS[mi % len(_COLOURS)])
        d.text((x0, base + 4), c, fill="black")
    for mi, m in enumerate(methods):
        y = base + 24 + 14 * mi
        d.rectangle([55, y, 65, y + 10], fill=_COLOURS[mi % len(_COLOURS)])
        d.text((70, y - 1), f"{m}  mIoU {100 * report['methods'][m]['miou']:.1f}", fill="black")
    return im


def qualitative_grid(samples, keys: list[str], cell: int = 96) -> Image.Image:
    """Rows of image | ground truth | each method's prediction, in the VOC palette."""
    cols = 2 + len(keys)
    im = Image.new("RGB", (cols * cell, 14 + max(1, len(samples)) * cell), "white")
    d = ImageDraw.Draw(im)
    for j, name in enumerate(["image", "ground truth", *keys]):
        d.text((j * cell + 2, 1), name[:16], fill="black")
    for i, (sample, preds) in enumerate(samples):
        tiles = [Image.fromarray(sample.image()), palette_png(sample.gt).convert("RGB")]
        tiles += [palette_png(preds[k]).convert("RGB") for k in keys]
        for j, t in enumerate(tiles):
            im.paste(t.resize((cell, cell), Image.NEAREST), (j * cell, 14 + i * cell))
    return im
