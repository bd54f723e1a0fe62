"""Stable Diffusion UNets behind the backbone interface (:mod:`attnseg.diffusion.backbone`): 1.x / 2.x
(:class:`UNetBackbone`) and SDXL (:class:`SDXLBackbone`: two text encoders, whose pooled embedding and the size
conditioning are the UNet's added conditioning).

Cross-attention modules are the UNet's ``attn2`` (image queries, text keys), self-attention its ``attn1``;
capture installs :class:`~attnseg.diffusion.capture.CaptureProcessor` on the chosen ones through diffusers'
processor API. With classifier-free guidance the pipeline stacks ``[unconditional, conditional]`` rows and
only the conditional half is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnseg.diffusion.backbone import DiffusersBackbone, TextStates
from attnseg.diffusion.capture import AttentionStore, CaptureProcessor, capture_attention
from attnseg.diffusion.layers import layer_inventory

TEXT_CACHE_SIZE = 256
"""Prompts whose encoding is kept (least recently used first out)."""


class UNetBackbone(DiffusersBackbone):
    """A loaded ``StableDiffusionPipeline`` (or any pipeline with its components) as a backbone."""

    family = "sd"

    def __init__(self, pipe, model_name: str | None = None) -> None:
        super().__init__(pipe, pipe.unet, model_name, TEXT_CACHE_SIZE)
        self.layers = layer_inventory(pipe.unet)
        self._cross_names = [lay.name for lay in self.layers if lay.kind == "cross"]

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> TextStates:
        """Text-encoder states (B, 77, D) of ``texts``; a text encoded before (on this device and dtype) is not encoded again."""

        def encode(batch: list[str]) -> tuple[torch.Tensor]:
            tok = self.pipe.tokenizer
            ids = tok(batch, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            return (self.pipe.text_encoder(ids.input_ids.to(self.device))[0].to(self.dtype),)

        (hidden,) = self._text_cache.get(texts, (self.device, self.dtype), encode)
        return TextStates(hidden)

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

    def generation_processors(self, store: AttentionStore, names: Sequence[str]) -> dict:
        return {n: CaptureProcessor(store, n) for n in names}


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
