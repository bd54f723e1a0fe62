"""Stable Diffusion 3 / 3.5 (MMDiT) behind the backbone interface (:mod:`attnseg.diffusion.backbone`).

Each transformer block attends jointly over image and text tokens, image tokens first. Its image-to-text block
is read as a cross map and its image-to-image block as a self map (:class:`~attnseg.diffusion.capture.
JointCaptureProcessor`, installed through diffusers' processor API); SD3.5's image-only ``attn2`` modules are
self maps. All layers share one grid, the latent patched by ``patch_size``.

Noise levels are rectified flow's: the methods' timestep ``t`` of T = 1000 is read as x_t = (1 - s) x_0 + s e
with s = t / 1000, and the transformer is given the timestep 1000 s, as the pipeline's scheduler does with no
shift. A pipeline without its T5 encoder (``text_encoder_3`` None, as ``attnseg train-toy export-sd3`` writes one) is
run with no T5 tokens (``max_sequence_length=0``): diffusers would otherwise append 256 all-zero tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from attnseg.diffusion.backbone import DiffusersBackbone, TextStates, with_concepts
from attnseg.diffusion.capture import AttentionStore, JointCaptureProcessor, installed, joint_parts
from attnseg.diffusion.layers import joint_inventory

TEXT_CACHE_SIZE = 256
T5_TOKENS = 256
"""diffusers' default number of T5 tokens, used when the pipeline has its T5 encoder."""


class SD3Backbone(DiffusersBackbone):
    """A loaded ``StableDiffusion3Pipeline`` as a backbone."""

    family = "sd3"
    default_presets: ClassVar[dict[str, str]] = {"t2m": "mmdit", "iseg": "mmdit"}
    """Presets a call naming none takes on this family: T2M's and iSeg's paper layers name UNet blocks, so their
    ``mmdit`` presets map them onto the joint blocks."""

    def __init__(self, pipe, model_name: str | None = None) -> None:
        super().__init__(pipe, pipe.transformer, model_name, TEXT_CACHE_SIZE)
        self.layers = joint_inventory(pipe.transformer)
        self.t5_tokens = T5_TOKENS if getattr(pipe, "text_encoder_3", None) is not None else 0

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> TextStates:
        """The pipeline's own prompt encoding (CLIP-L and CLIP-G states, then T5's): states and pooled projections."""

        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            states, _, pooled, _ = self.pipe.encode_prompt(
                prompt=batch,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.t5_tokens,
            )
            return states.to(self.dtype), pooled.to(self.dtype)

        hidden, pooled = self._text_cache.get(texts, (self.device, self.dtype), encode)
        return TextStates(hidden, {"pooled_projections": pooled})

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        s = float(timestep) / 1000
        return (1 - s) * latents + s * noise

    def _processors(
        self,
        store: AttentionStore,
        names: Sequence[str],
        key_scale: torch.Tensor | None,
        scale_values: bool = False,
        concepts: int = 0,
    ) -> dict:
        """One joint processor per module that has a captured part (every joint module with Cat-Cross or concept
        tokens), recording those parts."""
        parts = joint_parts(names)
        if key_scale is not None or concepts:
            for lay in self.layers:
                if lay.kind == "cross":
                    parts.setdefault(lay.module, {})
        return {
            m: JointCaptureProcessor(
                store,
                p,
                key_scale=key_scale if m.endswith(".attn") else None,
                scale_values=scale_values,
                concepts=concepts if m.endswith(".attn") else 0,
            )
            for m, p in parts.items()
        }

    @torch.inference_mode()
    def forward(
        self, latents, timestep, text: TextStates, names=(), per_head=(), key_scale=None, scale_values=False, concepts=None
    ) -> AttentionStore:
        self.check_size(latents)
        t = torch.full((len(latents),), float(timestep), device=self.device)
        store = AttentionStore(per_head=frozenset(per_head))
        hidden, n_con = with_concepts(text.hidden, concepts, key_scale)
        with installed(self.pipe.transformer, self._processors(store, names, key_scale, scale_values, n_con)):
            self.pipe.transformer(
                hidden_states=latents,
                encoder_hidden_states=hidden,
                pooled_projections=text.added["pooled_projections"],
                timestep=t,
            )
        return store

    def check_size(self, latents: torch.Tensor) -> None:
        """Refuse latents larger than the transformer's table of position embeddings (``pos_embed_max_size`` patches a
        side), which diffusers reports deep inside the forward."""
        cfg = self.pipe.transformer.config
        most = getattr(cfg, "pos_embed_max_size", None)
        h, w = (int(x) // int(cfg.patch_size) for x in latents.shape[-2:])
        if most is not None and max(h, w) > most:
            f = int(self.pipe.vae_scale_factor) * int(cfg.patch_size)
            raise ValueError(
                f"this SD3 transformer reads at most {most} x {most} patches ({most * f} px a side); the image was read "
                f"at {h * f} x {w * f} px: use a smaller resolution or a preset that reads the square image"
            )

    @torch.inference_mode()
    def denoising_error(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int, text: TextStates) -> torch.Tensor:
        """(B,) mean squared error of the transformer's prediction against rectified flow's target, the velocity
        dx_t/ds = e - x_0."""
        t = torch.full((len(latents),), float(timestep), device=self.device)
        pred = self.pipe.transformer(
            hidden_states=self.add_noise(latents, noise, timestep),
            encoder_hidden_states=text.hidden,
            pooled_projections=text.added["pooled_projections"],
            timestep=t,
        ).sample
        return (pred.float() - (noise.float() - latents.float())).square().flatten(1).mean(dim=1)

    def generation_processors(self, store: AttentionStore, names: Sequence[str]) -> dict:
        return self._processors(store, names, None)

    @property
    def call_kwargs(self) -> dict:
        return {"max_sequence_length": self.t5_tokens}
