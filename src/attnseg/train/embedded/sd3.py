"""The embedded transformer model: a small Stable Diffusion 3 pipeline trained on ShapesWorld (``attnseg train-toy sd3``).

It shares the embedded UNet model's data, VAE and tokenizer, so that the two backbones are compared on the same
latents and words:

- ``SD3Transformer2DModel`` (MMDiT: joint attention over image and text tokens, image tokens first), patch 1 on
  the 16x16x4 latents, so that its attention maps are 16x16 like the UNet's finest ones; its blocks read the
  text tokens but do not update them (``SD3Arch.mix_text``);
- two ``CLIPTextModelWithProjection`` encoders (SD3's CLIP-L and CLIP-G slots) with one transformer layer each:
  the pipeline feeds the transformer their penultimate hidden states, here the token and position embeddings
  (no mixing of tokens before the transformer, which the UNet's training showed helps words localise), and
  their projected end-of-text states as the pooled conditioning. Their embeddings start from the embedded UNet
  model's trained text encoder;
- no T5 encoder: the pipeline's T5 slot is empty and is called with ``max_sequence_length=0`` (``SD3_CALL``), so
  the transformer sees the 77 CLIP tokens only;
- rectified flow as in SD3: x_t = (1 - s) x_0 + s e, the transformer predicts e - x_0 (or, with
  ``TrainConfig.teacher``, a UNet model's prediction of it), s drawn logit-normal (SD3's mean 0, std 1 unless
  ``TrainConfig.noise_mean`` / ``noise_std`` say otherwise), sampled with ``FlowMatchEulerDiscreteScheduler`` (shift
  1: the images are 64 px).

Training is the UNet's otherwise: cached latents, captions drawn anew at every step (10% empty), the loss of a
pixel weighted by 1 + ``object_weight`` x its latent cell's object fraction (the only use of the masks; the
attention is never trained), AdamW with warm-up and optional cosine decay, EMA weights exported, checkpoints to
``WORK/sd3-ckpt.pt`` (resumable; SIGTERM / Ctrl-C and ``--max-minutes`` save one before stopping).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from attnseg.io.files import atomic_torch_save
from attnseg.shapes.world import caption, make_scene
from attnseg.train.embedded.arch import ToyArch, clip_text_config
from attnseg.train.embedded.tokenizer import build_tokenizer
from attnseg.train.embedded.train import (
    HOLDOUT_SEED,
    TrainConfig,
    _caption_batch,
    _ckpt_config,
    _load_scenes,
    _load_vae,
    _log,
    _looks_of,
    _stop_requests,
    _tokenize,
    learning_rate,
    released_training,
    write_clip_vocab_files,
)

CKPT = "sd3-ckpt.pt"
SD3_CALL = {"max_sequence_length": 0}
"""Keyword arguments every call of the exported pipeline needs: the T5 slot is empty (see the module docstring)."""


@dataclass
class SD3Arch:
    """Sizes of the embedded transformer model."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch: int = 1
    text_hidden: int = 128
    text_layers: int = 1
    """One layer: the pipeline reads the penultimate hidden states, which are then the unmixed embeddings."""
    text_heads: int = 4
    projection_dim: int = 64
    pooled: bool = False
    """Whether the text encoders' pooled (end-of-text) projection conditions the transformer. False (ours): their
    ``text_projection`` is zero and frozen, so the pipeline's pooled projections are 0 and words reach the image only
    through the joint attention, as in the UNet. With it (run T1), ShapesWorld's captions, one or two objects at no
    stated place, can be drawn from the pooled vector alone: at 6,700 steps swapping the tokens of 48 held-out
    captions while keeping their pooled vectors left the velocity error unchanged at s = 0.4 (0.186 both), and its
    cross maps did not localise (cross baseline 10.4 mIoU)."""
    mix_text: bool = False
    """Whether the joint blocks update the text tokens. False (ours): every block's context output projection
    (``attn.to_add_out``) and context feed-forward output (``ff_context.net[2]``) are zero and frozen, so each block
    reads the encoders' unmixed embeddings as its text keys and values (through its own norm and projections), as
    the UNet's cross-attention reads its text; the pipeline runs unchanged. With it (runs T1, T2) a text token can
    gather the whole caption from the others, a padding slot became the place every pixel read the caption from, and
    the cross maps did not localise (T2 at 2,000 steps: cross baseline 8.2 mIoU); the UNet model's maps localised only
    once its padding tokens carried nothing (docs/EMBEDDED-MODEL-TRAINING.md)."""

    pos_scale: float = 1.0
    """Factor on the image tokens' sine-cosine position embedding (a saved buffer of the transformer, so the exported
    pipeline runs unchanged). 1 is SD3's. With patch 1 a token's content is one latent pixel, 4 numbers, whose
    projection is smaller than the position embedding (norms about 6 and 8 at T3's step 500), and the label maps of
    runs T2 and T3 were the same pattern in every image (docs/EMBEDDED-MODEL-TRAINING.md)."""
    text_pos_scale: float = 1.0
    """Factor on the text encoders' learned position embeddings, relative to where the lineage started (1: as
    learned). Other than 1 the scaled table is frozen, as the image side's is a fixed buffer, so that training does
    not grow it back; a run from ``--init-ckpt`` with another value multiplies the source's table by the ratio. The
    exported encoders hold it, so the pipeline runs unchanged. The transformer's label maps follow a word's place in
    the prompt more than the word (docs/EMBEDDED-MODEL-TRAINING.md, the ``position`` probe): with the text stream
    frozen, every block's text keys are the token plus position embedding, and at run T6's step 500 the position
    embeddings' mean norm was 0.50 against 0.22 for the token embeddings."""

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def build_transformer(arch: SD3Arch, latent_size: int, latent_channels: int, dual_attention_layers: tuple[int, ...] = ()):
    """``dual_attention_layers``: blocks with SD3.5's extra image-only attention (none in the embedded model)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=arch.patch,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=arch.layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.heads,
        joint_attention_dim=2 * arch.text_hidden,  # the two CLIP encoders' states, concatenated
        caption_projection_dim=arch.width,
        pooled_projection_dim=2 * arch.projection_dim,
        pos_embed_max_size=latent_size // arch.patch,
        dual_attention_layers=dual_attention_layers,
    )


def build_text_encoders(arch: SD3Arch, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextModelWithProjection

    cfg = clip_text_config(vocab_size, bos_id, eos_id, arch.text_hidden, arch.text_layers, arch.text_heads, arch.projection_dim)
    encoders = CLIPTextModelWithProjection(cfg), CLIPTextModelWithProjection(cfg)
    if not arch.pooled:
        for te in encoders:
            disable_pooled(te)
    if arch.text_pos_scale != 1:
        for te in encoders:
            te.text_model.embeddings.position_embedding.weight.requires_grad_(False)
    return encoders


def scale_text_positions(encoders, factor: float) -> None:
    """Multiply the encoders' position embeddings by ``factor`` (see :attr:`SD3Arch.text_pos_scale`)."""
    with torch.no_grad():
        for te in encoders:
            te.text_model.embeddings.position_embedding.weight.mul_(factor)


def freeze_text_stream(model) -> None:
    """Zero and freeze what each joint block adds to the text tokens (see :attr:`SD3Arch.mix_text`)."""
    for block in model.transformer_blocks:
        for layer in (block.attn.to_add_out, block.ff_context.net[2] if block.ff_context is not None else None):
            if layer is None:  # the last block computes no text output (``context_pre_only``)
                continue
            with torch.no_grad():
                layer.weight.zero_()
                layer.bias.zero_()
            layer.weight.requires_grad_(False)
            layer.bias.requires_grad_(False)


def grow_blocks(model, source: dict[str, torch.Tensor], source_layers: int) -> None:
    """Load a transformer of ``source_layers`` blocks (its state dict ``source``) into ``model``, which has more: the
    source's last block stays the last (it alone computes no text output), the others keep their places, and the
    blocks in between are new and start as identities for the image tokens (AdaLN-zero: their attention and
    feed-forward gates, rows 3 and 6 of ``norm1.linear``, are zero, as DiT initialises every block). The text tokens
    pass through them unchanged once :func:`freeze_text_stream` has run."""
    layers = len(model.transformer_blocks)
    if source_layers >= layers:
        raise ValueError(f"cannot grow {source_layers} blocks into {layers}: ask for more layers than the source has")
    moved = {}
    for key, value in source.items():
        if key.startswith(f"transformer_blocks.{source_layers - 1}."):
            key = key.replace(f"transformer_blocks.{source_layers - 1}.", f"transformer_blocks.{layers - 1}.", 1)
        moved[key] = value
    new_blocks = [f"transformer_blocks.{i}." for i in range(source_layers - 1, layers - 1)]
    missing = [k for k in model.state_dict() if k not in moved]
    if any(not k.startswith(tuple(new_blocks)) for k in missing):
        raise ValueError(f"the source transformer differs in more than its depth (missing: {missing[:3]})")
    model.load_state_dict(moved, strict=False)
    width = model.transformer_blocks[0].norm1.linear.out_features // 6
    with torch.no_grad():
        for i in range(source_layers - 1, layers - 1):
            linear = model.transformer_blocks[i].norm1.linear
            for row in (2, 5):  # gate_msa, gate_mlp in AdaLayerNormZero's order
                linear.weight[row * width : (row + 1) * width] = 0
                linear.bias[row * width : (row + 1) * width] = 0


def repatched(source: dict[str, torch.Tensor], model, source_patch: int) -> dict[str, torch.Tensor]:
    """A transformer's state dict ``source``, trained with patches of ``source_patch`` latent pixels, for ``model``,
    whose patch side is a multiple of it: every block is the same; the patch embedding of a larger patch averages
    the latent over each source patch and projects it as the source did, and the output projection writes each of
    them what the source wrote for the source patch it lies in; the position table is the model's own (its grid).
    A starting point for training, not the source's function: the average loses each latent pixel's own noise, which
    the velocity target holds."""
    patch = model.config.patch_size
    if patch % source_patch:
        raise ValueError(f"cannot re-patch a transformer of patch {source_patch} to patch {patch}: not a multiple")
    f = patch // source_patch
    out = dict(source)
    w = source["pos_embed.proj.weight"]  # (D, C, sp, sp)
    out["pos_embed.proj.weight"] = w.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3) / (f * f)
    out["pos_embed.pos_embed"] = model.state_dict()["pos_embed.pos_embed"]
    c = model.config.out_channels
    for key in ("proj_out.weight", "proj_out.bias"):  # rows ordered (row in patch, column in patch, channel)
        v = source[key]
        v = v.view(source_patch, source_patch, c, *v.shape[1:])
        out[key] = v.repeat_interleave(f, dim=0).repeat_interleave(f, dim=1).reshape(patch * patch * c, *v.shape[3:])
    return out


def disable_pooled(te) -> None:
    """Zero and freeze ``te``'s pooled projection (see :attr:`SD3Arch.pooled`)."""
    with torch.no_grad():
        te.text_projection.weight.zero_()
    te.text_projection.weight.requires_grad_(False)


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def encode_text(te1, te2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes with an empty T5 slot: states (B, 77, 2 D), pooled (B, 2 P)."""
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), torch.cat([o1[0], o2[0]], dim=-1)


def load_source(path: str | Path) -> dict:
    """What a run starts from with ``--init-ckpt``: another run's ``sd3-ckpt.pt``, or a transformer pipeline folder
    that ``export-sd3`` wrote (the embedded SD3 model among them), read into the checkpoint's shape: its weights in
    fp32, the step they were exported at, and its run config and architecture."""
    if not Path(path).is_dir():
        return torch.load(path, weights_only=True)
    from safetensors.torch import load_file

    folder = Path(path)
    meta = released_training(folder)

    def weights(sub: str, name: str) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in load_file(folder / sub / name).items()}

    return {
        "transformer": weights("transformer", "diffusion_pytorch_model.safetensors"),
        "text_encoder": weights("text_encoder", "model.safetensors"),
        "text_encoder_2": weights("text_encoder_2", "model.safetensors"),
        "step": int(meta["step"]),
        "config": _ckpt_config(folder),
        "history": meta.get("history"),  # the lineage's runs (the release's card), carried into the new run's log
    }


def _arch_of(config: dict) -> SD3Arch:
    # Checkpoints written before ``pooled`` / ``mix_text`` existed were trained with both on.
    return SD3Arch(**{"pooled": True, "mix_text": True, **config.get("sd3_arch", {})})


def stage_sd3(
    cfg: TrainConfig,
    arch: SD3Arch,
    max_minutes: float | None = None,
    init_from: str | None = None,
    init_ckpt: str | None = None,
    grow_to: int | None = None,
    patch: int | None = None,
) -> None:
    """Train (or resume) the transformer and its text encoders on ``WORK/latents.npz``; a new run starts from the
    embedded UNet model's text embeddings (``init_from``, a pipeline folder) or from another run's weights
    (``init_ckpt``, its ``sd3-ckpt.pt``: its trained weights, not their EMA, and sizes from it, ``arch.pooled``,
    ``arch.mix_text`` and ``arch.pos_scale`` from ``arch``; optimiser, EMA and step anew). ``grow_to``: with
    ``init_ckpt``, that many blocks, the new ones inserted before the last as identities (:func:`grow_blocks`);
    ``arch.text_pos_scale`` too comes from ``arch``. ``patch``: with ``init_ckpt``, that patch side, a multiple of the
    source's (:func:`repatched`)."""
    if grow_to is not None and not init_ckpt:
        raise ValueError("growing the transformer (--layers) needs a run that starts from another one's --init-ckpt")
    if patch is not None and not init_ckpt:
        raise ValueError("re-patching the transformer (--patch) needs a run that starts from another one's --init-ckpt")
    work = Path(cfg.work)
    torch.set_num_threads(cfg.threads)
    lat_d = np.load(work / "latents.npz")
    latents, obj_frac = lat_d["latents"], lat_d["object_frac"]
    scale = float(lat_d["scaling_factor"])
    scenes = _load_scenes(work, ("objects", "looks"))
    objs = scenes["objects"]
    tok = build_tokenizer(ToyArch.max_length)
    ck = work / CKPT
    resuming = ck.exists()
    text_pos_from = 1.0  # the text position factor the starting weights hold (a new lineage's: 1)
    if resuming:
        state = torch.load(ck, weights_only=True)
        arch = _arch_of(state["config"])
    elif init_ckpt:
        source = load_source(init_ckpt)
        source_arch = _arch_of(source["config"])
        text_pos_from = source_arch.text_pos_scale
        arch = replace(
            source_arch,
            pooled=arch.pooled,
            mix_text=arch.mix_text,
            pos_scale=arch.pos_scale,
            text_pos_scale=arch.text_pos_scale,
        )
        source_layers, source_patch = arch.layers, arch.patch
        if grow_to is not None:
            arch = replace(arch, layers=grow_to)
        if patch is not None:
            arch = replace(arch, patch=patch)
    teacher = load_teacher(cfg.teacher) if cfg.teacher else None
    model = build_transformer(arch, latents.shape[-1], latents.shape[1])
    positions = model.pos_embed.pos_embed.clone()  # SD3's sine-cosine table
    model.pos_embed.pos_embed.mul_(arch.pos_scale)  # a run's own checkpoint, loaded below, holds the same
    if not arch.mix_text:
        freeze_text_stream(model)
    te1, te2 = build_text_encoders(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    params = [*model.parameters(), *te1.parameters(), *te2.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    step, warm_from, decay_from = 0, 0, None
    if resuming:
        model.load_state_dict(state["transformer"])
        te1.load_state_dict(state["text_encoder"])
        te2.load_state_dict(state["text_encoder_2"])
        opt.load_state_dict(state["opt"])
        for e, s in zip(ema, state["ema"], strict=True):
            e.copy_(s)
        step, warm_from, decay_from = int(state["step"]), int(state["warm_from"]), state["decay_from"]
        _log(
            work,
            {
                "stage": "sd3",
                "resumed_at": step,
                "colour_prob": cfg.colour_prob,
                "look_word_prob": cfg.look_word_prob,
                "lr_decay_steps": cfg.lr_decay_steps,
                "noise_mean": cfg.noise_mean,
                "noise_std": cfg.noise_std,
                "teacher": cfg.teacher,
            },
        )
        if init_ckpt or init_from:  # a run resumes from its own checkpoint; say so rather than start anew
            ignored = {"init_ckpt": init_ckpt, "init_from": init_from, "grow_to": grow_to, "patch": patch}
            _log(work, {"stage": "sd3", "ignored": ignored, "why": "resuming"})
    elif init_ckpt:
        weights = source["transformer"]
        if arch.patch != source_patch:
            weights = repatched(weights, model, source_patch)
        if arch.layers > source_layers:
            grow_blocks(model, weights, source_layers)
        else:
            model.load_state_dict(weights)
        te1.load_state_dict(source["text_encoder"])
        te2.load_state_dict(source["text_encoder_2"])
        if not arch.pooled:
            disable_pooled(te1)
            disable_pooled(te2)
        if not arch.mix_text:
            freeze_text_stream(model)
        model.pos_embed.pos_embed.copy_(positions * arch.pos_scale)
        _log(
            work,
            {
                "stage": "sd3",
                "init_ckpt": str(Path(init_ckpt).resolve()),
                "from_step": int(source["step"]),
                "released_history": source.get("history"),
                "arch": asdict(arch),
                "source_layers": source_layers,
                "source_patch": source_patch,
            },
        )
    elif init_from:
        # The embedded UNet model's trained token and position embeddings (its encoder has no layers to copy).
        from transformers import CLIPTextModel

        src = CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder", dtype=torch.float32)
        src = getattr(src, "text_model", src)  # transformers 5 flattened CLIPTextModel's modules
        for te in (te1, te2):
            te.text_model.embeddings.load_state_dict(src.embeddings.state_dict())
            te.text_model.final_layer_norm.load_state_dict(src.final_layer_norm.state_dict())
        _log(work, {"stage": "sd3", "init_from": str(init_from), "arch": asdict(arch)})
    if not resuming:  # a new run, whatever its starting weights: its text table scaled, its EMA starting there
        scale_text_positions((te1, te2), arch.text_pos_scale / text_pos_from)
        for e, p in zip(ema, params, strict=True):
            e.copy_(p.detach())
    if cfg.lr_decay_steps > 0 and decay_from is None:
        decay_from = step
        _log(work, {"stage": "sd3", "lr_decay_from": step, "lr_decay_steps": cfg.lr_decay_steps})

    def save() -> None:
        state = {
            "transformer": model.state_dict(),
            "text_encoder": te1.state_dict(),
            "text_encoder_2": te2.state_dict(),
            "opt": opt.state_dict(),
            "ema": ema,
            "step": step,
            "warm_from": warm_from,
            "decay_from": decay_from,
            "config": {**asdict(cfg), "sd3_arch": asdict(arch)},
        }
        atomic_torch_save(state, ck)

    t_start = time.time()
    loss_acc, n_acc = 0.0, 0
    for m in (model, te1, te2):
        m.train()
    with _stop_requests() as stop:
        while step < cfg.unet_steps:
            rng = np.random.default_rng([cfg.seed, step])
            idx = rng.integers(0, len(latents), cfg.batch)
            z0 = torch.from_numpy(latents[idx].astype(np.float32)) * scale
            of = torch.from_numpy(obj_frac[idx].astype(np.float32))[:, None]
            caps = _caption_batch(
                objs[idx], rng, cfg.empty_caption_prob, cfg.colour_prob, _looks_of(scenes, idx), cfg.look_word_prob
            )
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            noise = torch.randn(z0.shape, generator=g)
            s = noise_levels(cfg.batch, cfg.noise_mean, cfg.noise_std, g)
            zt = (1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * noise
            states, pooled = encode_text(te1, te2, _tokenize(tok, caps))
            pred = model(zt, encoder_hidden_states=states, pooled_projections=pooled, timestep=s * 1000).sample
            target = noise - z0
            if teacher is not None:
                predict_noise, abar = teacher
                with torch.no_grad():
                    v, inside = teacher_velocity(partial(predict_noise, caps=caps), zt, s, abar)
                target = torch.where(inside.view(-1, 1, 1, 1), v, target)
            pix_w = 1 + cfg.object_weight * of
            loss = (((pred - target) ** 2 * pix_w).mean(dim=(1, 2, 3)) / pix_w.mean(dim=(1, 2, 3))).mean()
            lr = learning_rate(cfg, step, warm_from, decay_from)
            for gr in opt.param_groups:
                gr["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema, params, strict=True):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
            step += 1
            loss_acc += loss.item()
            n_acc += 1
            if step % 50 == 0:
                _log(work, {"stage": "sd3", "step": step, "loss": loss_acc / n_acc, "lr": lr, "elapsed": time.time() - t_start})
                loss_acc, n_acc = 0.0, 0
            out_of_time = max_minutes is not None and (time.time() - t_start) > max_minutes * 60
            if step % cfg.ckpt_every == 0 or step == cfg.unet_steps or out_of_time or stop:
                save()
            if stop or out_of_time:
                _log(work, {"stage": "sd3", "stopped_at": step, "why": f"signal {stop[0]}" if stop else "--max-minutes"})
                break
            if step % cfg.diag_every == 0:
                _log(work, {"stage": "sd3-diag", "step": step, **flow_text_gain(model, te1, te2, tok, _load_vae(work), scale)})
                for m in (model, te1, te2):
                    m.train()


def noise_levels(n: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` noise levels s in (0, 1), logit-normal: logit s ~ N(``mean``, ``std``) (SD3's lognorm(mean, std))."""
    return torch.sigmoid(mean + std * torch.randn((n,), generator=generator))


def teacher_velocity(
    eps_fn, zt: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A DDPM noise predictor's flow velocity at the flow samples ``zt`` = (1 - s) x_0 + s e: each sample is rescaled
    to the DDPM sample of the same signal-to-noise ratio, sqrt(a) x_0 + sqrt(1 - a) e with sqrt(a / (1 - a)) =
    (1 - s) / s, read at the (fractional) timestep whose ``alphas_cumprod`` is a (interpolated in log a), and its
    predicted noise turned into e - x_0. ``eps_fn(x, t)`` predicts the noise. Returns the velocities and whether
    each s lies within the schedule (outside it the timestep is clamped to the schedule's ends)."""
    r2 = ((1 - s) / s) ** 2
    a = r2 / (1 + r2)
    log_a = torch.log(alphas_cumprod.double())  # decreasing in t
    la = torch.log(a.double())
    inside = (la <= log_a[0]) & (la >= log_a[-1])
    la = la.clamp(log_a[-1], log_a[0])
    hi = torch.searchsorted(-log_a, -la).clamp(1, len(log_a) - 1)  # first t whose log a is at or below la
    frac = (log_a[hi - 1] - la) / (log_a[hi - 1] - log_a[hi])
    t = (hi - 1 + frac).float()
    x = zt * (a.sqrt() / (1 - s)).view(-1, 1, 1, 1)
    eps = eps_fn(x, t)
    x0 = (zt - s.view(-1, 1, 1, 1) * eps) / (1 - s).view(-1, 1, 1, 1)
    return eps - x0, inside


def load_teacher(folder: str | Path) -> tuple:
    """A DDPM pipeline folder's (:attr:`TrainConfig.teacher`) noise prediction ``predict_noise(x, t, caps)`` (its UNet
    and text encoder in fp32 and eval mode, reading the captions through its tokenizer) and its ``alphas_cumprod``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise SystemExit(f"--teacher {folder}: not a UNet pipeline folder (it has no unet/); give the embedded UNet model's")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    if sched.config.prediction_type != "epsilon":
        raise SystemExit(f"--teacher {folder}: its scheduler predicts {sched.config.prediction_type}, not the noise")

    def predict_noise(x: torch.Tensor, t: torch.Tensor, caps: list[str]) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=te(_tokenize(tok, caps))[0]).sample

    return predict_noise, sched.alphas_cumprod


def flow_text_gain(model, te1, te2, tok, vae, scale: float, n: int = 48) -> dict[str, float]:
    """Velocity error on object pixels of held-out scenes with the right caption, none, and another scene's."""
    for m in (model, te1, te2):
        m.eval()
    scenes = [make_scene(HOLDOUT_SEED, i) for i in range(n)]
    x = torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rng = np.random.default_rng(0)
    caps = [caption(sc.objects, rng) for sc in scenes]
    out = {}
    with torch.inference_mode():
        z0 = vae.encode(x).latent_dist.mean * scale
        f = x.shape[-1] // z0.shape[-1]
        obj = torch.from_numpy(np.stack([sc.semantic > 0 for sc in scenes])).float()
        obj = torch.nn.functional.avg_pool2d(obj[:, None], f) > 0.5
        texts = {
            name: encode_text(te1, te2, _tokenize(tok, c))
            for name, c in (("cap", caps), ("empty", [""] * n), ("wrong", caps[1:] + caps[:1]))
        }
        g = torch.Generator().manual_seed(0)
        for s in (0.15, 0.4, 0.7):
            noise = torch.randn(z0.shape, generator=g)
            zt = (1 - s) * z0 + s * noise
            t = torch.full((n,), s * 1000)
            for name, (states, pooled) in texts.items():
                err = (model(zt, encoder_hidden_states=states, pooled_projections=pooled, timestep=t).sample - (noise - z0)).pow(
                    2
                )
                err = err.mean(1, keepdim=True)
                out[f"err{int(s * 1000)}_{name}"] = float(err[obj.expand_as(err)].mean())
    return out


def sd3_pipeline(transformer, te1, te2, tok, vae):
    """The ``StableDiffusion3Pipeline`` of these components: one tokenizer in both CLIP slots, no T5, flow scheduler;
    the VAE's latents are read without a shift (its ``shift_factor`` set to 0)."""
    from diffusers import StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=0.0)
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


def stage_export_sd3(cfg: TrainConfig, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Write the EMA weights as a ``StableDiffusion3Pipeline`` folder in fp16 safetensors."""
    work = Path(cfg.work)
    state = torch.load(work / CKPT, weights_only=True)
    arch = _arch_of(state["config"])
    lat = np.load(work / "latents.npz")
    scale = float(lat["scaling_factor"])
    tok = build_tokenizer(ToyArch.max_length)
    model = build_transformer(arch, lat["latents"].shape[-1], lat["latents"].shape[1])
    te1, te2 = build_text_encoders(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    model.load_state_dict(state["transformer"])
    te1.load_state_dict(state["text_encoder"])
    te2.load_state_dict(state["text_encoder_2"])
    if use_ema:
        with torch.no_grad():
            for p, e in zip([*model.parameters(), *te1.parameters(), *te2.parameters()], state["ema"], strict=True):
                p.copy_(e)
    vae = _load_vae(work)
    vae.register_to_config(scaling_factor=scale)
    pipe = sd3_pipeline(model, te1, te2, tok, vae)
    pipe.to(torch.float16)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_clip_vocab_files(tok, out_dir / sub)
    meta = {"step": state["step"], "ema": use_ema, "train_config": state["config"], "arch": asdict(arch), "call": SD3_CALL}
    (out_dir / "training.json").write_text(json.dumps(meta, indent=1))
    return out_dir
