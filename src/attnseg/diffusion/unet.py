"""The Stable Diffusion 1.x / 2.x UNet behind the backbone interface (:mod:`attnseg.diffusion.backbone`).

Cross-attention modules are the UNet's ``attn2`` (image queries, text keys), self-attention its ``attn1``;
capture installs :class:`~attnseg.diffusion.capture.CaptureProcessor` on the chosen ones through diffusers'
processor API. With classifier-free guidance the pipeline stacks ``[unconditional, conditional]`` rows and
only the conditional half is read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.backbone import TextStates
from attnseg.diffusion.capture import AttentionStore, capture_attention
from attnseg.diffusion.layers import layer_inventory
from attnseg.diffusion.prompts import TokenSpans, resolve_spans

TEXT_CACHE_SIZE = 256
"""Prompts whose encoding is kept (least recently used first out)."""


class UNetBackbone:
    """A loaded ``StableDiffusionPipeline`` (or any pipeline with its components) as a backbone."""

    family = "sd"
    default_presets: ClassVar[dict[str, str]] = {}
    """The papers' presets are written for this family."""

    def __init__(self, pipe, model_name: str | None = None) -> None:
        self.pipe = pipe
        self.model_name = model_name or getattr(pipe, "attnseg_model_name", type(pipe).__name__)
        self.layers = layer_inventory(pipe.unet)
        self.native_resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self._cross_names = [lay.name for lay in self.layers if lay.kind == "cross"]
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        # Read from one parameter: diffusers' ``unet.device`` walks every module on each call.
        return next(self.pipe.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipe.unet.parameters()).dtype

    def latent_side(self, resolution: int) -> int:
        return int(resolution) // int(self.pipe.vae_scale_factor)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray], resolution: int, max_batch: int = 16) -> torch.Tensor:
        """VAE posterior means (scaled) of RGB uint8 images resized to ``resolution``: (N, 4, r/8, r/8)."""
        xs = []
        for im in images:
            t = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 127.5 - 1
            if t.shape[-2:] != (resolution, resolution):  # resampling to the same size is the identity
                t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
            xs.append(t)
        vae = self.pipe.vae
        x = torch.cat(xs).to(self.device, next(vae.parameters()).dtype)
        lat = [vae.encode(x[i : i + max_batch]).latent_dist.mean * vae.config.scaling_factor for i in range(0, len(x), max_batch)]
        return torch.cat(lat)

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> TextStates:
        """Text-encoder states (B, 77, D) of ``texts``; a text encoded before (on this device and dtype) is not encoded again."""
        where = (self.device, self.dtype)
        keys = [(t, *where) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        if missing:
            tok = self.pipe.tokenizer
            ids = tok(
                [k[0] for k in missing],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            states = self.pipe.text_encoder(ids.input_ids.to(self.device))[0].to(self.dtype)
            for k, s in zip(missing, states, strict=True):
                self._text_cache[k] = s.clone()  # a row of its own: the batch is not kept alive by one entry
        for k in keys:
            self._text_cache.move_to_end(k)
        hidden = torch.stack([self._text_cache[k] for k in keys])
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
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
            self.pipe.unet(latents, t, encoder_hidden_states=text.hidden)
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
