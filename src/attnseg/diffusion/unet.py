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
        a, s = self._signal_noise(timestep, latents.dtype)
        return a * latents + s * noise

    def _signal_noise(self, timestep: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) of the training forward process, x_t = a x_0 + s e.

        Read from ``alphas_cumprod``, which every Stable Diffusion scheduler holds, and computed as DDIM's and DDPM's
        ``add_noise`` do (bitwise the same); the sampling scheduler's own ``add_noise`` is not used, because Euler's
        (SDXL's default) returns x_0 + sigma e, the input before its ``scale_model_input``, not the UNet's input.
        """
        ab = self.pipe.scheduler.alphas_cumprod.to(self.device, dtype)[int(timestep)]
        return ab**0.5, (1 - ab) ** 0.5

    def _added(self, text: TextStates, latents: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The UNet's added conditioning for ``latents``: none for SD 1.x / 2.x."""
        return text.added or None

    @torch.inference_mode()
    def forward(
        self, latents, timestep, text: TextStates, names=(), per_head=(), key_scale=None, scale_values=False, concepts=None
    ) -> AttentionStore:
        if concepts is not None:
            raise ValueError(
                f"concept tokens (ConceptAttention) ride in the text stream of a transformer's joint attention; this "
                f"{self.family} UNet reads its prompt through cross-attention only: use --method cross or t2m here"
            )
        t = torch.tensor([int(timestep)], device=self.device).expand(len(latents))
        with capture_attention(
            self.pipe.unet,
            names,
            per_head=per_head,
            key_scale=key_scale,
            cross_names=self._cross_names,
            scale_values=scale_values,
        ) as store:
            self.pipe.unet(latents, t, encoder_hidden_states=text.hidden, added_cond_kwargs=self._added(text, latents))
        return store

    @torch.inference_mode()
    def denoising_error(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, text: TextStates) -> torch.Tensor:
        """(B,) mean squared error of the UNet's prediction against its training target, which the scheduler's
        ``prediction_type`` names: the noise e (``epsilon``), the velocity a e - s x_0 (``v_prediction``) or x_0
        (``sample``)."""
        a, s = self._signal_noise(timestep, latents.dtype)
        targets = {"epsilon": noise, "v_prediction": a * noise - s * latents, "sample": latents}
        kind = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind not in targets:
            raise ValueError(f"prediction_type {kind!r} of the scheduler is not one of {', '.join(targets)}")
        t = torch.tensor([int(timestep)], device=self.device).expand(len(latents))
        pred = self.pipe.unet(
            a * latents + s * noise, t, encoder_hidden_states=text.hidden, added_cond_kwargs=self._added(text, latents)
        ).sample
        return (pred.float() - targets[kind].float()).square().flatten(1).mean(dim=1)

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
        r = self.native_resolution
        return TextStates(hidden, {"text_embeds": pooled, "time_ids": self.time_ids(len(texts), (r, r))})

    def time_ids(self, n: int, size: tuple[int, int]) -> torch.Tensor:
        """SDXL's size conditioning: original = target = ``size`` (H, W), no crop; (n, 6)."""
        h, w = (int(s) for s in size)
        return torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(n, -1)

    def _added(self, text: TextStates, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        # The size the latents were encoded at, which a predictor may choose below the native one or not square.
        f = int(self.pipe.vae_scale_factor)
        return {**text.added, "time_ids": self.time_ids(len(latents), (latents.shape[-2] * f, latents.shape[-1] * f))}
