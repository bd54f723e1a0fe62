"""Architecture of the embedded model: Stable Diffusion's components, scaled down.

64x64 RGB images, a VAE with 4x down-sampling (16x16x4 latents), a UNet2DConditionModel with
the layout of SD 1.x (cross-attention down blocks, a plain lowest down block, a cross-attention
mid block, mirrored up blocks; or, with ``unet_cross_every_level``, cross-attention at every level),
a small CLIPTextModel and the project's own CLIP tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ToyArch:
    """Sizes of the embedded model."""

    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_cross_every_level: bool = False
    """False: SD 1.x's layout, cross-attention down/up blocks at every level but the lowest (plain ResNet blocks
    there). True: cross-attention blocks at every level, the lowest included. The mid block, always at the lowest
    level's resolution, has cross-attention either way (True with two levels, 16 and 8 px, reads no
    attention at 4 px: docs/EMBEDDED-MODEL-TRAINING.md)."""
    unet_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 77

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(arch: ToyArch):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=16,
        sample_size=arch.image_size,
    )


def build_unet(arch: ToyArch):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    cross = [True] * n if arch.unet_cross_every_level else [True] * (n - 1) + [False]
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=32,
    )


def clip_text_config(vocab_size: int, bos_id: int, eos_id: int, hidden: int, layers: int, heads: int, projection_dim: int):
    """A CLIP text encoder's config for the project's tokenizer (its padding is the end-of-text token, as CLIP's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=ToyArch.max_length,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=projection_dim,
    )


def build_text_encoder(arch: ToyArch, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextModel

    return CLIPTextModel(
        clip_text_config(vocab_size, bos_id, eos_id, arch.text_hidden, arch.text_layers, arch.text_heads, arch.text_hidden)
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's noise schedule.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
