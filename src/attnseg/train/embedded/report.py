"""Samples, the oracle check and the model card of the embedded model.

python -m attnseg.train.embedded.report MODEL_DIR --grid docs/samples.png --card MODEL_DIR/README.md
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from attnseg.diffusion.loading import load_pipeline
from attnseg.shapes.oracle import ShapesOracle
from attnseg.shapes.world import COLOURS, SHAPES

GRID_PROMPTS = [
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a green star",
    "a purple hexagon",
    "a pink heart",
    "an orange cross",
    "a white ring",
    "a red circle and a blue star",
    "a yellow square and a green ring",
    "a photo of a purple heart next to an orange triangle",
    "a white hexagon and a pink cross",
    "a blue circle and a red circle",
    "a red star, a yellow ring and a blue square",
    "a green triangle, a white circle and a purple cross",
    "a pink star, an orange hexagon and a green heart",
]


def _objects(prompt: str) -> list[tuple[str, str]]:
    words = prompt.replace(",", " ").split()
    return [(a, b) for a, b in itertools.pairwise(words) if a in COLOURS and b in SHAPES]


@torch.inference_mode()
def sample(pipe, prompts, seed: int = 0, steps: int = 50, guidance: float = 5.0, **call) -> list[np.ndarray]:
    """Images of ``prompts`` at the model's native size; ``call``: more keyword arguments of the pipeline call (the
    embedded SD3 model's empty T5 slot needs ``max_sequence_length=0``)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    res = int(denoiser.config.sample_size) * int(pipe.vae_scale_factor)
    out = []
    for i in range(0, len(prompts), 8):
        ims = pipe(
            list(prompts[i : i + 8]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens[i : i + 8],
            height=res,
            width=res,
            output_type="np",
            **call,
        ).images
        out += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in ims]
    return out


def grid(images, captions, cols: int = 4, cell: int = 160) -> Image.Image:
    rows = (len(images) + cols - 1) // cols
    im = Image.new("RGB", (cols * cell, rows * (cell + 28)), "white")
    d = ImageDraw.Draw(im)
    for i, (a, cap) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * cell, (i // cols) * (cell + 28)
        im.paste(Image.fromarray(a).resize((cell, cell), Image.NEAREST), (x, y))
        words, line, lines = cap.split(), "", []
        for w in words:
            if len(line) + len(w) > 26:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        for j, ln in enumerate(lines[:2]):
            d.text((x + 2, y + cell + 2 + 12 * j), ln, fill="black")
    return im


def oracle_rate(pipe, n_per_count: int = 32, seed: int = 7, steps: int = 50, guidance: float = 5.0, **call) -> dict:
    """How often the prompt's objects are present in generated images (1, 2 and 3 objects)."""
    rng = np.random.default_rng(seed)
    oracle = ShapesOracle()
    res = {}
    for n_obj in (1, 2, 3):
        prompts = []
        for _ in range(n_per_count):
            cols = rng.choice(list(COLOURS), n_obj, replace=False)
            shp = rng.choice(SHAPES, n_obj)
            prompts.append("a " + " and a ".join(f"{c} {s}" for c, s in zip(cols, shp, strict=True)))
        ims = sample(pipe, prompts, seed=seed * 1000 + n_obj * 100, steps=steps, guidance=guidance, **call)
        colour_hits = shape_hits = all_hits = total = 0
        for p, im in zip(prompts, ims, strict=True):
            ok_all = True
            for c, s in _objects(p):
                r = oracle.find(im, c, s)
                colour_hits += r.colour_found
                shape_hits += r.present
                ok_all &= r.present
                total += 1
            all_hits += ok_all
        res[str(n_obj)] = {
            "prompts": n_per_count,
            "colour_present": colour_hits / total,
            "object_present": shape_hits / total,
            "all_objects_present": all_hits / n_per_count,
        }
    return res


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--grid", default=None)
    p.add_argument("--oracle", type=int, default=0, help="prompts per object count for the oracle check")
    p.add_argument("--out", default=None, help="JSON file for the oracle numbers")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    a = p.parse_args(argv)
    pipe = load_pipeline(a.model, device="cpu", dtype="float32")
    if a.grid:
        ims = sample(pipe, GRID_PROMPTS, steps=a.steps, guidance=a.guidance)
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        grid(ims, GRID_PROMPTS).save(a.grid)
    if a.oracle:
        r = oracle_rate(pipe, a.oracle, steps=a.steps, guidance=a.guidance)
        print(json.dumps(r, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
