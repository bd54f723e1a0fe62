"""The backbone interface: every method reads a diffusion model through these few operations.

A backbone wraps one loaded diffusers pipeline and answers, in model-independent terms:

- ``layers``: its attention layers (:class:`~attnseg.diffusion.layers.LayerInfo`: kind ``cross``, ``self``,
  ``joint`` or ``single``; block; level; resolution rank; heads), so a method's layer choice means the same
  place on every model of a family;
- ``encode_images``: RGB images -> latents at a resolution (the VAE posterior mean, scaled); ``encode_posteriors``
  the posterior's mean and standard deviation, for methods that sample it;
- ``encode_prompts``: texts -> :class:`TextStates` (the denoiser's text input and any added conditioning),
  cached per text, so that asking again for the same labels encodes nothing;
- ``token_spans``: the token positions of each label phrase in a prompt;
- ``add_noise``: a latent noised to a timestep;
- ``forward``: one denoiser forward with chosen layers captured -> the maps, as
  :class:`~attnseg.diffusion.capture.AttentionStore` (cross maps ``(B, P, T)`` of image pixels to text tokens,
  self maps ``(B, P, P)``), whatever the model's own token layout;
  with ``concepts`` (transformer families only), ConceptAttention's concept tokens ride along in the text stream
  (``concept_states``: their states) and each captured module's ``<module>:concept`` map is recorded;
- ``denoising_error``: one denoiser forward, nothing captured -> the per-row squared error of its prediction against
  the family's training target (what the diffusion classifier of :mod:`attnseg.tagging` compares across prompts);
- ``generate``: the pipeline's own generation, with chosen layers captured over every step.

The Stable Diffusion 1.x / 2.x UNet is :class:`~attnseg.diffusion.unet.UNetBackbone`. The interface is shaped
for the families that differ: SDXL (two text encoders, ``TextStates.added`` for its pooled embedding and
time ids), SD3 (joint attention, image tokens first: the image-to-text block of a joint map is the cross map,
the image-to-image block the self map) and Flux (joint and single-stream blocks, text tokens first, RoPE, no
classifier-free guidance for the distilled models). Methods never see which one they run on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from attnseg.diffusion.capture import AttentionStore, installed
from attnseg.diffusion.layers import LayerInfo
from attnseg.diffusion.prompts import TokenSpans, resolve_spans
from attnseg.diffusion.vae import encode_posteriors


@dataclass
class TextStates:
    """Encoded prompts: ``hidden`` (B, T, D) text states and ``added`` conditioning tensors with B rows."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, index) -> TextStates:
        """The states of rows ``index`` (a tensor or list of row indices)."""
        return TextStates(self.hidden[index], {k: v[index] for k, v in self.added.items()})

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


class TextCache:
    """Encoded prompts kept per (text, device, dtype), the least recently used dropped beyond ``size``.

    ``get(texts, where, encode)`` returns a tuple of (B, ...) tensors, one row per text; ``encode(missing_texts)``
    computes the tuple for the texts not kept yet, in one batch. Each kept row is a tensor of its own, so that one
    entry does not keep a whole batch alive.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._rows: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()

    def get(self, texts: Sequence[str], where: tuple, encode: Callable[[list[str]], tuple[torch.Tensor, ...]]):
        keys = [(t, *where) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._rows))
        if missing:
            outs = encode([k[0] for k in missing])
            for i, k in enumerate(missing):
                self._rows[k] = tuple(o[i].clone() for o in outs)
        for k in keys:
            self._rows.move_to_end(k)
        rows = [self._rows[k] for k in keys]
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))


class Backbone(Protocol):
    """What a method needs of a diffusion model; see the module docstring."""

    pipe: Any
    model_name: str
    weights: str | None
    """Fingerprint of a local folder's weights, recorded beside ``model_name`` by caches (None for a hub id)."""
    family: str
    layers: list[LayerInfo]
    native_resolution: int
    default_presets: dict[str, str]
    """{method: preset} a call naming no preset takes on this family (a model's attnseg.json may override)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def latent_side(self, resolution: int) -> int: ...

    def encode_images(self, images: Sequence[np.ndarray], resolution: int, max_batch: int = 16) -> torch.Tensor: ...

    def encode_posteriors(
        self, images: Sequence[np.ndarray], resolution: int | tuple[int, int], max_batch: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_prompts(self, texts: Sequence[str]) -> TextStates: ...

    def token_spans(self, text: str, char_spans: Sequence[tuple[int, int]], labels: Sequence[str]) -> TokenSpans: ...

    def word_pieces(self, word: str) -> int: ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor: ...

    def forward(
        self,
        latents: torch.Tensor,
        timestep: int,
        text: TextStates,
        names: Sequence[str] = (),
        per_head: Sequence[str] = (),
        key_scale: torch.Tensor | None = None,
        scale_values: bool = False,
        concepts: torch.Tensor | None = None,
    ) -> AttentionStore: ...

    def concept_states(self, words: Sequence[str], template: str = "{}") -> torch.Tensor:
        """(C, D) float32 text-stream states of words, each encoded in ``template`` (default: alone), its tokens'
        states averaged."""
        ...

    def denoising_error(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, text: TextStates) -> torch.Tensor:
        """(B,) float32 mean squared error, per row, of the denoiser's prediction for ``latents`` (B, C, h, w) noised by
        ``noise`` to ``timestep`` (of T = 1000) and conditioned on ``text`` (B rows), against the target the family is
        trained to predict; one batched forward, no capture."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        steps: int,
        guidance: float,
        generators: Sequence[torch.Generator] | None = None,
        names: Sequence[str] = (),
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[np.ndarray, AttentionStore]: ...


def with_concepts(
    hidden: torch.Tensor, concepts: torch.Tensor | None, key_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """The text stream ``hidden`` (B, T, D) with ConceptAttention's concept tokens (C, D) or (B, C, D) appended, and C
    (0: none)."""
    if concepts is None:
        return hidden, 0
    if key_scale is not None:
        raise ValueError("concept tokens and Cat-Cross key scaling cannot be combined in one forward")
    c = concepts.to(hidden.device, hidden.dtype)
    c = c.expand(len(hidden), -1, -1) if c.dim() == 2 else c
    if c.shape[0] != hidden.shape[0] or c.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"concept states {tuple(concepts.shape)} do not fit the text states {tuple(hidden.shape)}")
    return torch.cat([hidden, c], dim=1), int(c.shape[1])


class DiffusersBackbone:
    """What the backbones of diffusers pipelines share: the pipeline, its denoiser (a UNet or a transformer), the
    VAE's image-to-latent path, the first tokenizer's spans, and a text cache. A family sets ``layers`` and
    ``native_resolution`` and implements the rest of :class:`Backbone`."""

    family = ""
    default_presets: ClassVar[dict[str, str]] = {}
    upcast_vae = False
    """Encode with the VAE in fp32 when the model runs in fp16 (SDXL's VAE overflows in fp16)."""

    def __init__(self, pipe, denoiser, model_name: str | None = None, text_cache_size: int = 256) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.model_name = model_name or getattr(pipe, "attnseg_model_name", type(pipe).__name__)
        self.weights = getattr(pipe, "attnseg_weights", None)
        """Fingerprint of the weights of a local model folder (:func:`~attnseg.diffusion.loading.weights_fingerprint`)."""
        self.native_resolution = int(denoiser.config.sample_size) * int(pipe.vae_scale_factor)
        self._text_cache = TextCache(text_cache_size)

    @property
    def device(self) -> torch.device:
        # Read from one parameter: diffusers' ``.device`` walks every module on each call.
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def latent_side(self, resolution: int) -> int:
        return int(resolution) // int(self.pipe.vae_scale_factor)

    def encode_images(self, images: Sequence[np.ndarray], resolution: int, max_batch: int = 16) -> torch.Tensor:
        """(posterior mean - shift) x scale of RGB uint8 images resized to ``resolution``, as the denoiser reads them."""
        return self.encode_posteriors(images, resolution, max_batch)[0]

    def encode_posteriors(
        self, images: Sequence[np.ndarray], resolution: int | tuple[int, int], max_batch: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean (as ``encode_images``) and standard deviation, both in the denoiser's latent scale; the
        images resized to a square ``resolution`` or to (H, W)."""
        mean, std = encode_posteriors(self.pipe.vae, images, resolution, self.device, max_batch, self.upcast_vae)
        return mean.to(self.dtype), std.to(self.dtype)

    def token_spans(self, text: str, char_spans: Sequence[tuple[int, int]], labels: Sequence[str]) -> TokenSpans:
        """Positions among the first tokenizer's tokens (the only one, or the first of several that split alike)."""
        return resolve_spans(self.pipe.tokenizer, text, char_spans, labels)

    def word_pieces(self, word: str) -> int:
        """How many tokens the tokenizer splits ``word`` into."""
        return len(self.pipe.tokenizer.tokenize(word))

    def clear_text_cache(self) -> None:
        """Forget the encoded prompts: after the tokenizer learned a new token (a personal concept), a text holding
        it encodes differently."""
        self._text_cache = TextCache(self._text_cache.size)

    call_kwargs: ClassVar[dict[str, Any]] = {}
    """Keywords of the family's pipeline call beyond the common ones."""

    def concept_states(self, words: Sequence[str], template: str = "{}") -> torch.Tensor:
        texts = [template.format(w) for w in words]
        states = self.encode_prompts(texts).hidden.float()
        start = template.index("{}")
        out = []
        for i, (text, w) in enumerate(zip(texts, words, strict=True)):
            span = self.token_spans(text, [(start, start + len(w))], [w]).spans[0]
            out.append(states[i, list(span)].mean(dim=0))
        return torch.stack(out)

    def generation_processors(self, store: AttentionStore, names: Sequence[str]) -> dict:
        """{module: processor} recording ``names`` into ``store`` while the pipeline generates."""
        raise NotImplementedError

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        steps: int,
        guidance: float,
        generators: Sequence[torch.Generator] | None = None,
        names: Sequence[str] = (),
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[np.ndarray, AttentionStore]:
        """Images (N, H, W, 3) in [0, 1] at the native resolution, and the maps of ``names`` summed over the steps.

        With guidance the pipelines stack ``[unconditional, conditional]`` rows: only the conditional half is read.
        """
        res = self.native_resolution
        store = AttentionStore(cond_rows="second_half" if guidance > 1 else "all", transform=transform)
        with installed(self.denoiser, self.generation_processors(store, names)):
            images = self.pipe(
                prompt=list(prompts),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=list(generators) if generators is not None else None,
                height=res,
                width=res,
                output_type="np",
                **self.call_kwargs,
            ).images
        return images, store
