"""Stable Diffusion UNets behind the backbone interface (:mod:`attnseg.diffusion.backbone`): 1.x / 2.x
(:class:`UNetBackbone`) and SDXL (:class:`SDXLBackbone`: two text encoders, whose pooled embedding and the size
conditioning are the UNet's added conditioning).

Cross-attention modules are the UNet's ``attn2`` (image queries, text keys), self-attention its ``attn1``;
capture installs :class:`~attnseg.diffusion.capture.CaptureProcessor` on the chosen ones through diffusers'
processor API. With classifier-free guidance the pipeline stacks ``[unconditional, conditional]`` rows and
only the conditional half is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch

from attnseg.diffusion.backbone import TextCache, TextStates
from attnseg.diffusion.capture import AttentionStore, capture_attention
from attnseg.diffusion.layers import layer_inventory
from attnseg.diffusion.prompts import TokenSpans, resolve_spans
from attnseg.diffusion.vae import encode_images

TEXT_CACHE_SIZE = 256
"""Prompts whose encoding is kept (least recently used first out)."""


class UNetBackbone:
    """A loaded ``StableDiffusionPipeline`` (or any pipeline with its components) as a backbone."""

    family = "sd"
    default_presets: ClassVar[dict[str, str]] = {}
    """The papers' presets are written for this family."""
    upcast_vae = False
    """Encode with the VAE in fp32 when the model runs in fp16 (SDXL's VAE overflows in fp16)."""

    def __init__(self, pipe, model_name: str | None = None) -> None:
        self.pipe = pipe
        self.model_name = model_name or getattr(pipe, "attnseg_model_name", type(pipe).__name__)
        self.layers = layer_inventory(pipe.unet)
        self.native_resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self._cross_names = [lay.name for lay in self.layers if lay.kind == "cross"]
        self._text_cache = TextCache(TEXT_CACHE_SIZE)

    @property
    def device(self) -> torch.device:
        # Read from one parameter: diffusers' ``unet.device`` walks every module on each call.
        return next(self.pipe.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipe.unet.parameters()).dtype

    def latent_side(self, resolution: int) -> int:
        return int(resolution) // int(self.pipe.vae_scale_factor)

    def encode_images(self, images: Sequence[np.ndarray], resolution: int, max_batch: int = 16) -> torch.Tensor:
        """VAE posterior means (scaled) of RGB uint8 images resized to ``resolution``: (N, 4, r/8, r/8)."""
        return encode_images(self.pipe.vae, images, resolution, self.device, max_batch, self.upcast_vae).to(self.dtype)

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> TextStates:
        """Text-encoder states (B, 77, D) of ``texts``; a text encoded before (on this device and dtype) is not encoded again."""

        def encode(batch: list[str]) -> tuple[torch.Tensor]:
            tok = self.pipe.tokenizer
            ids = tok(batch, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            return (self.pipe.text_encoder(ids.input_ids.to(self.device))[0].to(self.dtype),)

        (hidden,) = self._text_cache.get(texts, (self.device, self.dtype), encode)
        return TextStates(hidden)

    def token_spans(self, text, char_spans, labels) -> TokenSpans:
        return resolve_spans(self.pipe.tokenizer, text, char_spans, labels)

    def word_pieces(self, word: str) -> int:
        """How many tokens the tokenizer splits ``word`` into."""
        return len(self.pipe.tokenizer.tokenize(word))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        t = torch.tensor([int(timestep)], device=self.device)
        return self.pipe.scheduler.add_noise(latents, noise, t.expand(len(latents)))

    @torch.inference_mode()
    def forward(
        self, latents, timestep, text: TextStates, names=(), per_head=(), key_scale=None, scale_values=False
    ) -> AttentionStore:
        t = torch.tensor([int(timestep)], device=self.device).expand(len(latents))
        with capture_attention(
            self.pipe.unet,
            names,
            per_head=per_head,
            key_scale=key_scale,
            cross_names=self._cross_names,
            scale_values=scale_values,
        ) as store:
            self.pipe.unet(latents, t, encoder_hidden_states=text.hidden, added_cond_kwargs=text.added or None)
        return store

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
        """Images (N, H, W, 3) in [0, 1] at the native resolution, and the maps of ``names`` summed over the steps."""
        res = self.native_resolution
        kw = dict(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=list(generators) if generators is not None else None,
            height=res,
            width=res,
            output_type="np",
        )
        rows = "second_half" if guidance > 1 else "all"  # the pipeline's CFG batch: [unconditional, conditional]
        with capture_attention(self.pipe.unet, names, cond_rows=rows, transform=transform) as store:
            images = self.pipe(**kw).images
        return images, store


class SDXLBackbone(UNetBackbone):
    """A loaded ``StableDiffusionXLPipeline``: the pipeline's own prompt encoding (both encoders' states
    concatenated; the second's pooled embedding) and size conditioning (original = target = the model's
    resolution, no crop) as the UNet's added conditioning. Token positions are those of the first tokenizer
    (both tokenizers split the same text at the same places)."""

    family = "sdxl"
    upcast_vae = True

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> TextStates:
        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            states, _, pooled, _ = self.pipe.encode_prompt(prompt=batch, device=self.device, do_classifier_free_guidance=False)
            return states.to(self.dtype), pooled.to(self.dtype)

        hidden, pooled = self._text_cache.get(texts, (self.device, self.dtype), encode)
        return TextStates(hidden, {"text_embeds": pooled, "time_ids": self.time_ids(len(texts), self.native_resolution)})

    def time_ids(self, n: int, resolution: int) -> torch.Tensor:
        """SDXL's size conditioning: original = target = ``resolution``, no crop; (n, 6)."""
        r = int(resolution)
        return torch.tensor([[r, r, 0, 0, r, r]], device=self.device, dtype=self.dtype).expand(n, -1)

    def forward(self, latents, timestep, text: TextStates, names=(), per_head=(), key_scale=None, scale_values=False):
        # The size the latents were encoded at, which a predictor may choose below the native one.
        size = int(latents.shape[-1]) * int(self.pipe.vae_scale_factor)
        text = TextStates(text.hidden, {**text.added, "time_ids": self.time_ids(len(latents), size)})
        return super().forward(latents, timestep, text, names, per_head, key_scale, scale_values)
