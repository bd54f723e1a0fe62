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

    from attnseg.train.embedded.arch import ToyArch, build_vae
    from attnseg.train.embedded.sd3 import SD3Arch, build_text_encoders, build_transformer, sd3_pipeline
    from attnseg.train.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    arch = SD3Arch(layers=2, heads=2, head_dim=16, text_hidden=32, text_heads=2, projection_dim=16)
    tok = build_tokenizer(ToyArch.max_length)
    te1, te2 = build_text_encoders(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    vae = build_vae(ToyArch(vae_channels=(16, 32, 32)))
    return sd3_pipeline(build_transformer(arch, 16, 4, dual_attention_layers), te1, te2, tok, vae)


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline: the shapes of diffusers' own SDXL test config (two levels, two
    transformer layers in the second, text-time added conditioning) on the embedded model's VAE and tokenizer."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from attnseg.train.embedded.arch import ToyArch, build_scheduler, build_vae
    from attnseg.train.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(ToyArch.max_length)
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": ToyArch.max_length,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.eos_token_id,
        "projection_dim": 32,
    }
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    return StableDiffusionXLPipeline(
        vae=build_vae(ToyArch(vae_channels=(16, 32, 32))),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Save a tiny pipeline of ``family`` (``sd``, ``sdxl`` or ``sd3``) to ``folder``, as ``from_pretrained`` reads it."""
    folder = Path(folder)
    build = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline}[family]
    build(seed).save_pretrained(folder, safe_serialization=True)
    return folder
