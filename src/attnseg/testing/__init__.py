"""Helpers that build small random-weight pipelines, for tests and for trying the code."""

from __future__ import annotations

from pathlib import Path


def build_tiny_pipeline(seed: int = 0, channels: tuple[int, ...] = (32, 64, 64), heads: int = 2):
    """A random-weight StableDiffusionPipeline of the embedded model's layout, a few MB in size."""
    import torch
    from diffusers import StableDiffusionPipeline

    from attnseg.train.embedded.arch import ToyArch, build_scheduler, build_text_encoder, build_unet, build_vae
    from attnseg.train.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    arch = ToyArch(
        vae_channels=(16, 32, 32), unet_channels=channels, unet_heads=heads, text_hidden=32, text_layers=1, text_heads=2
    )
    tok = build_tokenizer(arch.max_length)
    pipe = StableDiffusionPipeline(
        vae=build_vae(arch),
        text_encoder=build_text_encoder(arch, len(tok), tok.bos_token_id, tok.eos_token_id),
        tokenizer=tok,
        unet=build_unet(arch),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0, dual_attention_layers: tuple[int, ...] = ()):
    """A random-weight StableDiffusion3Pipeline of the embedded transformer model's layout (2 joint blocks, no T5).

    ``dual_attention_layers``: blocks with SD3.5's extra image-only attention.
    """
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from attnseg.train.embedded.arch import ToyArch, build_vae
    from attnseg.train.embedded.sd3 import SD3Arch, build_flow_scheduler, build_text_encoders
    from attnseg.train.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    arch = SD3Arch(layers=2, heads=2, head_dim=16, text_hidden=32, text_heads=2, projection_dim=16)
    tok = build_tokenizer(ToyArch.max_length)
    te1, te2 = build_text_encoders(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    vae = build_vae(ToyArch(vae_channels=(16, 32, 32)))
    vae.register_to_config(shift_factor=0.0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=arch.layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.heads,
        joint_attention_dim=2 * arch.text_hidden,
        caption_projection_dim=arch.width,
        pooled_projection_dim=2 * arch.projection_dim,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=build_flow_scheduler(),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Save a tiny pipeline of ``family`` (``sd`` or ``sd3``) to ``folder``, as ``from_pretrained`` reads it."""
    folder = Path(folder)
    build = {"sd": build_tiny_pipeline, "sd3": build_tiny_sd3_pipeline}[family]
    build(seed).save_pretrained(folder, safe_serialization=True)
    return folder
