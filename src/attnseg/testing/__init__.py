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


def build_tiny_t5_tokenizer(max_length: int = 32):
    """A T5 tokenizer (sentencepiece-style unigram) whose vocabulary is the embedded model's words, each one piece
    with its leading ``▁``, and single characters for any other word; ``max_length`` tokens at most."""
    import string

    from transformers import T5Tokenizer

    from attnseg.train.embedded.tokenizer import word_list

    start = "\u2581"  # sentencepiece's mark of a word's first piece
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (start, -2.0)]  # T5's layout: pad 0, eos 1, unk 2
    vocab += [(start + w, -5.0) for w in word_list()]
    vocab += [(c, -10.0) for c in string.ascii_lowercase + string.digits + ",.-'"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, t5_tokens: int = 32):
    """A random-weight FluxPipeline: 2 double-stream and 2 single-stream blocks (2 heads of 16), a one-layer CLIP
    (pooled embedding) and T5 (the text stream, ``t5_tokens`` long), a 16-channel VAE of scale 4 and native size 64
    (16 x 16 latents, an 8 x 8 grid of packed tokens), and FLUX.1's flow scheduler. ``guidance_embeds``: a
    guidance-distilled model (FLUX.1-dev's layout) or not (FLUX.1-schnell's)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from attnseg.train.embedded.arch import ToyArch, clip_text_config
    from attnseg.train.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(ToyArch.max_length)
    t5_tok = build_tiny_t5_tokenizer(t5_tokens)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=0.3611,  # FLUX.1's VAE: latents shifted and scaled
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 16,  # 2 x 2 patches of the 16-channel latent
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to the head dimension
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(clip_text_config(len(tok), tok.bos_token_id, tok.eos_token_id, 32, 1, 2, 32)),
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Save a tiny pipeline of ``family`` (``sd``, ``sdxl``, ``sd3`` or ``flux``) to ``folder``, as ``from_pretrained``
    reads it."""
    folder = Path(folder)
    build = {
        "sd": build_tiny_pipeline,
        "sdxl": build_tiny_sdxl_pipeline,
        "sd3": build_tiny_sd3_pipeline,
        "flux": build_tiny_flux_pipeline,
    }[family]
    build(seed).save_pretrained(folder, safe_serialization=True)
    return folder
