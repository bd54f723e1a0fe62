"""Flux.1 (``FluxPipeline``: dev, schnell) behind the backbone interface (:mod:`attnseg.diffusion.backbone`).

Flux's transformer has two kinds of attention. A double-stream block attends jointly over text and image tokens,
each stream with its own projections, text tokens first; a single-stream block attends over the concatenated
sequence with one set of projections. Every such module is read as SD3's are: its image queries' block over the text
keys is a cross map ``<module>:cross`` (B, P, T), their block over the image keys a self map ``<module>:self``
(B, P, P), each renormalised over its columns (:class:`~attnseg.diffusion.capture.FluxCaptureProcessor`, installed
through diffusers' processor API). Layers of the double-stream blocks have block ``"joint"``, those of the
single-stream blocks ``"single"`` (:func:`~attnseg.diffusion.layers.flux_inventory`).

Latents are the VAE's (B, 16, h, w), as the methods hold them; the pipeline's own packing turns each 2 x 2 patch into
one image token (B, h/2 w/2, 64), so every layer reads one grid of side h / 2 and image token i is patch
(i // (w/2), i % (w/2)), row-major, as the pipeline's image ids place it for RoPE.

The transformer's text stream is T5's states alone (CLIP gives only the pooled embedding), padded to ``t5_tokens``
(FLUX.1-dev's 512, FLUX.1-schnell's limit of 256, at most the tokenizer's length); label positions are T5 tokens.
Flux attends to its padding (no text mask), so the pads are columns of the cross maps like any token.

Noise levels are rectified flow's, as for SD3: the methods' timestep ``t`` of T = 1000 is x_t = (1 - s) x_0 + s e
with s = t / 1000, and the transformer is given s (it scales by 1000 itself). A guidance-distilled model
(``guidance_embeds``, FLUX.1-dev) takes its guidance as an embedding: ``encode_prompts`` puts the pipeline's
default, ``FORWARD_GUIDANCE``, in ``TextStates.added["guidance"]``; FLUX.1-schnell has none. No Flux pipeline stacks
an unconditional half, so every row of a generation is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from diffusers.models.embeddings import apply_rotary_emb

from attnseg.diffusion.backbone import DiffusersBackbone, TextCache, TextStates, with_concepts
from attnseg.diffusion.capture import AttentionStore, FluxCaptureProcessor, installed, joint_parts
from attnseg.diffusion.layers import flux_inventory
from attnseg.diffusion.prompts import PromptError, TokenSpans, resolve_spans

TEXT_CACHE_SIZE = 256
T5_TOKENS_GUIDED = 512
"""T5 tokens of a guidance-distilled model: FluxPipeline's default ``max_sequence_length`` (FLUX.1-dev)."""
T5_TOKENS_SCHNELL = 256
"""T5 tokens of a model without guidance embedding: FLUX.1-schnell's limit."""
FORWARD_GUIDANCE = 3.5
"""Guidance embedded in a guidance-distilled model's forwards when reading attention: FluxPipeline's default."""


class FluxBackbone(DiffusersBackbone):
    """A loaded ``FluxPipeline`` as a backbone."""

    family = "flux"
    default_presets: ClassVar[dict[str, str]] = {"t2m": "mmdit", "iseg": "mmdit"}
    """As SD3: T2M's and iSeg's paper layers name UNet blocks, so their ``mmdit`` presets read every cross map (and
    T2M every self map, iSeg the last one)."""

    def __init__(self, pipe, model_name: str | None = None) -> None:
        # DiffusersBackbone's __init__ reads the denoiser's ``sample_size``, which Flux's transformer has not: the
        # native resolution is the VAE's (1024 for FLUX.1), else the pipeline's default size.
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.model_name = model_name or getattr(pipe, "attnseg_model_name", type(pipe).__name__)
        self.weights = getattr(pipe, "attnseg_weights", None)
        vae_size = getattr(pipe.vae.config, "sample_size", None)
        self.native_resolution = int(vae_size or int(pipe.default_sample_size) * int(pipe.vae_scale_factor))
        self._text_cache = TextCache(TEXT_CACHE_SIZE)
        config = pipe.transformer.config
        if getattr(pipe, "text_encoder_2", None) is None:
            raise ValueError("Flux reads its prompt through T5 (text_encoder_2), which this pipeline has not; load it with T5")
        if int(config.in_channels) != 4 * int(pipe.vae.config.latent_channels):
            raise ValueError(
                f"this Flux transformer reads {config.in_channels} channels, not the packed latent's "
                f"4 x {pipe.vae.config.latent_channels} (an inpainting or control variant); attnseg reads text-to-image Flux"
            )
        self.layers = flux_inventory(pipe.transformer)
        self.guided = bool(config.guidance_embeds)
        limit = int(getattr(pipe.tokenizer_2, "model_max_length", T5_TOKENS_GUIDED) or T5_TOKENS_GUIDED)
        self.t5_tokens = min(T5_TOKENS_GUIDED if self.guided else T5_TOKENS_SCHNELL, limit)

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> TextStates:
        """The pipeline's own prompt encoding: T5 states (B, ``t5_tokens``, D) and CLIP's pooled embedding, and the
        guidance of a guidance-distilled model, (B,) rows of ``FORWARD_GUIDANCE``."""

        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            states, pooled, _ = self.pipe.encode_prompt(
                prompt=batch, prompt_2=None, device=self.device, max_sequence_length=self.t5_tokens
            )
            return states.to(self.dtype), pooled.to(self.dtype)

        hidden, pooled = self._text_cache.get(texts, (self.device, self.dtype), encode)
        added = {"pooled_projections": pooled}
        if self.guided:
            added["guidance"] = torch.full((len(texts),), FORWARD_GUIDANCE, device=self.device)
        return TextStates(hidden, added)

    def token_spans(self, text: str, char_spans: Sequence[tuple[int, int]], labels: Sequence[str]) -> TokenSpans:
        """Positions among T5's tokens (the transformer's text stream), within the ``t5_tokens`` the model reads."""
        spans = resolve_spans(self.pipe.tokenizer_2, text, char_spans, labels)
        cut = [lab for lab, sp in zip(spans.labels, spans.spans, strict=True) if max(sp) >= self.t5_tokens - 1]
        if cut:
            raise PromptError(
                f"label(s) {', '.join(repr(c) for c in cut)} fall beyond the {self.t5_tokens} T5 tokens this Flux model "
                f"reads (the prompt has {len(spans.input_ids)}); use fewer or shorter labels, or split them over runs"
            )
        return spans

    def word_pieces(self, word: str) -> int:
        """How many T5 tokens ``word`` is split into."""
        return len(self.pipe.tokenizer_2.tokenize(word))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        s = float(timestep) / 1000
        return (1 - s) * latents + s * noise

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, h/2 w/2, 4 C) image tokens, the pipeline's packing: token i is the 2 x 2 patch
        (i // (w/2), i % (w/2))."""
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(
                f"Flux packs 2 x 2 latent patches, so the latent side must be even (got {h} x {w}); use an image "
                f"side that is a multiple of {2 * int(self.pipe.vae_scale_factor)}"
            )
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _predict(self, latents: torch.Tensor, timestep: int, text: TextStates) -> torch.Tensor:
        """One transformer call on (B, C, h, w) latents already noised to ``timestep``: its (B, P, 4 C) prediction."""
        b, _, h, w = latents.shape
        packed = self.pack(latents)
        guidance = None
        if self.guided:
            guidance = text.added.get("guidance")
            if guidance is None:  # states encoded elsewhere: the pipeline's default guidance
                guidance = torch.full((b,), FORWARD_GUIDANCE, device=self.device)
        return self.pipe.transformer(
            hidden_states=packed,
            encoder_hidden_states=text.hidden,
            pooled_projections=text.added["pooled_projections"],
            timestep=torch.full((b,), float(timestep) / 1000, device=self.device, dtype=packed.dtype),
            img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, packed.dtype),
            # As the pipeline's encode_prompt: every text token at position 0, which RoPE leaves unrotated.
            txt_ids=torch.zeros((text.hidden.shape[1], 3), device=self.device, dtype=packed.dtype),
            guidance=guidance,
        ).sample

    def _processors(
        self,
        store: AttentionStore,
        names: Sequence[str],
        text_tokens: int,
        key_scale: torch.Tensor | None = None,
        scale_values: bool = False,
        concepts: int = 0,
    ) -> dict:
        """One processor per module that has a captured part (every module with Cat-Cross or concept tokens),
        recording those parts; ``text_tokens`` counts the concept tokens."""
        parts = joint_parts(names)
        if key_scale is not None or concepts:
            for lay in self.layers:
                parts.setdefault(lay.module, {})
        return {
            m: FluxCaptureProcessor(
                store, p, text_tokens, apply_rotary_emb, key_scale=key_scale, scale_values=scale_values, concepts=concepts
            )
            for m, p in parts.items()
        }

    @torch.inference_mode()
    def forward(
        self, latents, timestep, text: TextStates, names=(), per_head=(), key_scale=None, scale_values=False, concepts=None
    ) -> AttentionStore:
        store = AttentionStore(per_head=frozenset(per_head))
        hidden, n_con = with_concepts(text.hidden, concepts, key_scale)
        processors = self._processors(store, names, int(hidden.shape[1]), key_scale, scale_values, n_con)
        with installed(self.pipe.transformer, processors):
            self._predict(latents, timestep, TextStates(hidden, text.added))
        return store

    @torch.inference_mode()
    def denoising_error(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, text: TextStates) -> torch.Tensor:
        """(B,) mean squared error of the transformer's prediction against rectified flow's target, the velocity
        dx_t/ds = e - x_0, packed as the prediction is (the mean does not depend on the order of the elements)."""
        pred = self._predict(self.add_noise(latents, noise, timestep), timestep, text)
        target = self.pack(noise.float() - latents.float())
        return (pred.float() - target).square().flatten(1).mean(dim=1)

    def generation_processors(self, store: AttentionStore, names: Sequence[str]) -> dict:
        return self._processors(store, names, self.t5_tokens)

    @property
    def call_kwargs(self) -> dict:
        return {"max_sequence_length": self.t5_tokens}
