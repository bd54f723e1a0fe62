"""Generate images together with their masks: attention captured over every denoising step.

With classifier-free guidance on, the pipeline's batch is ``[unconditional, conditional]``; only
the conditional half is read (``cond_rows="second_half"``). Each step's map is max-normalised
(per token for cross maps, per map for self maps: SeeDiff eq. 5) before the running mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnseg.diffusion.capture import capture_attention
from attnseg.diffusion.layers import layer_inventory
from attnseg.diffusion.prompts import find_phrase_spans, resolve_spans
from attnseg.methods.generated import finalize, generated_method, needed_sides
from attnseg.ops.maps import grid_side


@dataclass
class GeneratedItem:
    """One generated image with its masks.

    image: (H, W, 3) uint8; soft: (K, H, W) float32 per-label scores; mask: (H, W) uint8 with
    0 = background, i = ``labels[i - 1]``, 255 = uncertain (when the method defines it).
    """

    prompt: str
    labels: list[str]
    image: np.ndarray
    soft: np.ndarray
    mask: np.ndarray


def step_max_normalise(name: str, m: torch.Tensor) -> torch.Tensor:
    """SeeDiff eq. 5: A / max(A) per layer and step; per token for cross maps."""
    if name.endswith("attn2"):
        return m / m.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def cross_max_normalise(name: str, m: torch.Tensor) -> torch.Tensor:
    """Eq. 5 for cross maps only: self maps stay row-stochastic (Dataset Diffusion's Self^tau)."""
    return step_max_normalise(name, m) if name.endswith("attn2") else m


def label_token_spans(tokenizer, prompt: str, labels: Sequence[str]):
    return resolve_spans(tokenizer, prompt, find_phrase_spans(prompt, labels), labels)


@torch.inference_mode()
def generate_with_masks(
    pipe,
    prompts: Sequence[str],
    labels: Sequence[Sequence[str]],
    method: str = "seediff",
    preset: str | None = None,
    generators: Sequence[torch.Generator] | None = None,
    capture: bool = True,
    **overrides,
) -> list[GeneratedItem]:
    """Generate one image per prompt and segment ``labels`` (words of the prompt) in it."""
    cfg, fn = generated_method(method, preset, **overrides)
    spans = [label_token_spans(pipe.tokenizer, p, labs) for p, labs in zip(prompts, labels, strict=True)]
    res = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    latent = int(pipe.unet.config.sample_size)
    inv = layer_inventory(pipe.unet)
    cross_sides = sorted({lay.side(latent) for lay in inv if lay.kind == "cross"})
    self_sides = sorted({lay.side(latent) for lay in inv if lay.kind == "self"})
    want_c, want_s = needed_sides(method, cfg, cross_sides, self_sides)
    names = [
        lay.name
        for lay in inv
        if (lay.kind == "cross" and lay.side(latent) in want_c) or (lay.kind == "self" and lay.side(latent) in want_s)
    ]
    kw = dict(
        prompt=list(prompts),
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        generator=list(generators) if generators is not None else None,
        height=res,
        width=res,
        output_type="np",
    )
    if not capture:
        images = pipe(**kw).images
        return [
            GeneratedItem(p, list(lab), _u8(im), np.zeros((0,)), np.zeros((0,)))
            for p, lab, im in zip(prompts, labels, images, strict=True)
        ]
    rows = "second_half" if cfg.guidance > 1 else "all"
    transform = step_max_normalise if method == "seediff" else cross_max_normalise
    with capture_attention(pipe.unet, names, cond_rows=rows, transform=transform) as store:
        images = pipe(**kw).images
    cross: dict[int, list[torch.Tensor]] = {}
    selfm: dict[int, list[torch.Tensor]] = {}
    for n in names:
        m = store.mean(n)
        (cross if n.endswith("attn2") else selfm).setdefault(grid_side(m.shape[1]), []).append(m)
    cross_mean = {s: torch.stack(v).mean(0).float().cpu() for s, v in cross.items()}
    self_mean = {s: torch.stack(v).mean(0).float().cpu() for s, v in selfm.items()}
    items = []
    for i, (p, labs, im) in enumerate(zip(prompts, labels, images, strict=True)):
        c_i = {s: v[i : i + 1] for s, v in cross_mean.items()}
        s_i = {s: v[i : i + 1] for s, v in self_mean.items()}
        soft = fn(c_i, s_i, spans[i].spans, cfg)
        img_t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
        up, lab = finalize(soft, img_t, im.shape[:2], cfg)
        items.append(GeneratedItem(p, list(labs), _u8(im), up[0].numpy().astype(np.float32), lab[0].numpy()))
    return items


def _u8(im: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(im * 255), 0, 255).astype(np.uint8)
