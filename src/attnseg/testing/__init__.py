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


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    build_tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
