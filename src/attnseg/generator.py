"""Generate images together with their masks: attention captured over every denoising step.

The backbone runs its pipeline's own generation with the method's layers captured (with classifier-free
guidance only the conditional rows are read). Each step's cross map is max-normalised per token before
the running mean (SeeDiff eq. 5), and self maps too for the methods that ask for it; the method then turns
the maps aggregated over the steps into soft masks, and :func:`~attnseg.methods.generated.finalize` into labels.
``method="grounding"`` instead reads the block outputs of the last step with a trained grounding module
(:mod:`attnseg.grounder`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from attnseg.diffusion.prompts import find_phrase_spans
from attnseg.grounder import Grounder
from attnseg.methods.generated import finalize
from attnseg.methods.grounding import Grounded
from attnseg.methods.registry import GENERATED, resolve
from attnseg.ops.maps import grid_side


@dataclass
class GeneratedItem:
    """One generated image with its masks.

    image: (H, W, 3) uint8; soft: (K, H, W) float32 per-label scores; mask: (H, W) uint8 with
    0 = background, i = ``labels[i - 1]``, 255 = uncertain (when the method defines it).
    unseeded: the labels the method found no seed for (SeeDiff: the cross map never reaches alpha), whose masks
    are therefore empty; an :class:`EmptyMaskWarning` names each with what to do.
    """

    prompt: str
    labels: list[str]
    image: np.ndarray
    soft: np.ndarray
    mask: np.ndarray
    unseeded: list[str] = field(default_factory=list)


class EmptyMaskWarning(UserWarning):
    """A label gets an empty mask because the method found no seed for it."""


def report_unseeded(method: str, prompt: str, labels: Sequence[str], why: Mapping[int, str]) -> list[str]:
    """Warn once per label of ``why`` ({label index: reason}) that its mask is empty; return those labels in order."""
    out = []
    for k in sorted(why):
        warnings.warn(
            f"{method}: label {labels[k]!r} of prompt {prompt!r} gets an empty mask: {why[k]}", EmptyMaskWarning, stacklevel=3
        )
        out.append(labels[k])
    return out


def step_max_normalise(m: torch.Tensor, cross: bool) -> torch.Tensor:
    """SeeDiff eq. 5: A / max(A) per layer and step; per token for cross maps (B, P, T), per map for self maps."""
    if cross:
        return m / m.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def label_token_spans(backbone, prompt: str, labels: Sequence[str]):
    """Token spans of ``labels`` (words of the user's ``prompt``, in order)."""
    return backbone.token_spans(prompt, find_phrase_spans(prompt, labels), labels)


@torch.inference_mode()
def generate_with_masks(
    backbone,
    prompts: Sequence[str],
    labels: Sequence[Sequence[str]],
    method: str = "seediff",
    preset: str | None = None,
    generators: Sequence[torch.Generator] | None = None,
    capture: bool = True,
    grounder: Grounder | None = None,
    **overrides,
) -> list[GeneratedItem]:
    """Generate one image per prompt and segment ``labels`` (words of the prompt) in it.

    ``grounder``: the trained module of ``method="grounding"`` (default: the one shipped with the embedded model).
    """
    info, _, cfg = resolve(method, preset, images=GENERATED)
    m = info.build(replace(cfg, **overrides))
    cfg = m.config
    if not capture:
        images, _ = backbone.generate(prompts, cfg.steps, cfg.guidance, generators)
        return [
            GeneratedItem(p, list(lab), _u8(im), np.zeros((0,)), np.zeros((0,)))
            for p, lab, im in zip(prompts, labels, images, strict=True)
        ]
    if info.name == "grounding":
        grounder = grounder if grounder is not None else Grounder.from_folder(backbone)
        return generate_grounded(grounder, m, prompts, labels, generators)
    spans = [label_token_spans(backbone, p, labs) for p, labs in zip(prompts, labels, strict=True)]
    latent = backbone.latent_side(backbone.native_resolution)
    cross_layers = {lay.name for lay in backbone.layers if lay.kind == "cross"}
    cross_sides = sorted({lay.side(latent) for lay in backbone.layers if lay.kind == "cross"})
    self_sides = sorted({lay.side(latent) for lay in backbone.layers if lay.kind == "self"})
    want_c, want_s = m.sides(cross_sides, self_sides)
    names = [
        lay.name
        for lay in backbone.layers
        if (lay.kind == "cross" and lay.side(latent) in want_c) or (lay.kind == "self" and lay.side(latent) in want_s)
    ]

    def transform(name: str, a: torch.Tensor) -> torch.Tensor:
        cross = name in cross_layers
        return step_max_normalise(a, cross) if cross or m.step_normalise == "all" else a

    images, store = backbone.generate(prompts, cfg.steps, cfg.guidance, generators, names, transform)
    cross: dict[int, list[torch.Tensor]] = {}
    selfm: dict[int, list[torch.Tensor]] = {}
    for n in names:
        a = store.mean(n)
        (cross if n in cross_layers else selfm).setdefault(grid_side(a.shape[1]), []).append(a)
    cross_mean = {s: torch.stack(v).mean(0).float().cpu() for s, v in cross.items()}
    self_mean = {s: torch.stack(v).mean(0).float().cpu() for s, v in selfm.items()}
    items = []
    for i, (p, labs, im) in enumerate(zip(prompts, labels, images, strict=True)):
        c_i = {s: v[i : i + 1] for s, v in cross_mean.items()}
        s_i = {s: v[i : i + 1] for s, v in self_mean.items()}
        soft = m.soft(c_i, s_i, spans[i].spans)
        unseeded = report_unseeded(m.name, p, labs, m.unseeded(c_i, s_i, spans[i].spans)[0])
        img_t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
        up, lab = finalize(soft, img_t, im.shape[:2], cfg)
        items.append(GeneratedItem(p, list(labs), _u8(im), up[0].numpy().astype(np.float32), lab[0].numpy(), unseeded))
    return items


def generate_grounded(
    grounder: Grounder,
    method: Grounded,
    prompts: Sequence[str],
    labels: Sequence[Sequence[str]],
    generators: Sequence[torch.Generator] | None = None,
) -> list[GeneratedItem]:
    """Grounded Diffusion's generation: images and the module's masks of ``labels`` (any words: the module reads the
    words' embeddings, not the prompt's tokens); ``soft`` holds its sigmoid scores."""
    cfg = method.config
    items = grounder.generate(prompts, labels, generators, cfg.steps, cfg.guidance)
    return [
        GeneratedItem(it.prompt, it.labels, it.image, it.probs, method.labels(torch.from_numpy(it.probs)).numpy()) for it in items
    ]


def _u8(im: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(im * 255), 0, 255).astype(np.uint8)
