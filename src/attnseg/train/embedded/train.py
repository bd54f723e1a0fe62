"""Training of the embedded default model on ShapesWorld (``attnseg train-toy``).

Stages, each resumable and run in order by ``all``:

1. ``data``:   render N training scenes (seed 0) into ``WORK/scenes.npz``.
2. ``vae``:    train the AutoencoderKL (L1 + tiny KL) on those images.
3. ``encode``: encode every scene once to latents (posterior mean x scaling factor).
4. ``unet``:   train the UNet and the text encoder jointly on the cached latents
               (epsilon prediction, min-SNR-5 weights, object-weighted loss, 10% empty captions,
               EMA of the weights), checkpointing to ``WORK/ckpt.pt`` and logging to ``WORK/log.jsonl``.
   ``--lr-decay-steps N`` cosine-decays the learning rate to 10% over N steps from the step where it is first
   asked for (a finishing phase; the schedule is kept in the checkpoint). SIGTERM / Ctrl-C save a checkpoint
   before stopping.
5. ``export``: write the EMA weights as a Stable Diffusion pipeline folder in fp16 safetensors.

``sd3`` and ``export-sd3`` train and export the embedded transformer model on the same latents instead of the UNet
(:mod:`attnseg.train.embedded.sd3`; run ``data``, ``vae --init-from`` the embedded model and ``encode`` first).

The attention is never trained on masks. The masks enter training in one place only: the
per-pixel weight of the denoising loss is ``1 + object_weight`` on object pixels (stated in the
model card).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnseg.diffusion.loading import PROFILE_FILE
from attnseg.io.files import atomic_torch_save
from attnseg.methods.registry import REGISTRY
from attnseg.shapes.world import COLOURS, LOOKS, SHAPES, SceneObject, ShapesWorldConfig, caption, make_scene
from attnseg.train.embedded.arch import ToyArch, build_scheduler, build_text_encoder, build_unet, build_vae
from attnseg.train.embedded.tokenizer import build_tokenizer

TRAIN_SEED = 0
HOLDOUT_SEED = 1_000_003


@dataclass
class TrainConfig:
    work: str = "/work/toy-train"
    n_scenes: int = 60_000
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 200_000
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 300
    min_snr_gamma: float = 5.0
    object_weight: float = 2.0
    empty_caption_prob: float = 0.1
    ema_decay: float = 0.999
    ckpt_every: int = 250
    diag_every: int = 500
    threads: int = 2
    seed: int = 0
    text_layers: int = 3
    """Transformer layers of the text encoder; 0 leaves each token's embedding unmixed (see the training log)."""
    colour_prob: float = 0.8
    """Probability that a caption names an object by "colour shape" rather than by its shape alone."""
    look_prob: float = 0.0
    """Share of the data's objects that wear one of ShapesWorld's unnamed looks (``ShapesWorldConfig.look_prob``): a
    model that has drawn them can learn a personal concept of one."""
    look_word_prob: float = 0.0
    """Probability that a caption names the look of an object that wears one ("red striped circle"; see
    ``attnseg.shapes.world.caption``); 0 never names looks."""
    lr_decay_steps: int = 0
    """If > 0: cosine decay of the learning rate to ``lr_floor`` x lr over this many steps, counted from the step
    at which the decay was first asked for (kept in the checkpoint as ``decay_from``); 0 keeps lr constant."""
    lr_floor: float = 0.1
    """Learning rate at the end of the decay, as a fraction of ``lr``."""
    noise_mean: float = 0.0
    """sd3 stage: location of the logit-normal distribution of the noise level s (logit s ~ N(mean, std)). 0 with
    ``noise_std`` 1 is SD3's lognorm(0, 1) (Esser et al. 2024, section 5.1, which also compares other locations and
    scales). The UNet's uniform DDPM timesteps, mapped to s by their signal-to-noise ratio, fit about lognorm(0.5,
    1.25): a quarter of its steps have s > 0.8, against 8% under lognorm(0, 1)."""
    noise_std: float = 1.0
    """sd3 stage: scale of the logit-normal distribution of s (see ``noise_mean``)."""
    teacher: str = ""
    """sd3 stage: a UNet pipeline folder (the embedded UNet model's, say) whose denoising predictions, read at the same
    signal-to-noise ratio, are the transformer's targets wherever s lies within the UNet's schedule, in place of the
    sample's own e - x_0 (knowledge distillation of the denoiser's outputs; no attention and no mask is involved).
    Empty: the sample's own target, as SD3 trains."""
    unet_channels: tuple[int, ...] = ToyArch.unet_channels
    """UNet width per level (one level per entry; the latent is halved between levels)."""
    unet_cross_every_level: bool = ToyArch.unet_cross_every_level
    """Cross-attention down/up blocks at every level, the lowest included; see ``ToyArch``."""


def train_arch(config: dict) -> ToyArch:
    """The architecture a checkpoint's TrainConfig (as a dict; older checkpoints lack the UNet fields) describes."""
    return ToyArch(
        text_layers=int(config.get("text_layers", 3)),
        unet_channels=tuple(config.get("unet_channels", ToyArch.unet_channels)),
        unet_cross_every_level=bool(config.get("unet_cross_every_level", ToyArch.unet_cross_every_level)),
    )


def learning_rate(cfg: TrainConfig, step: int, warm_from: int, decay_from: int | None) -> float:
    """Learning rate at ``step``: linear warm-up from ``warm_from``, then constant, or cosine-decayed from ``decay_from``."""
    lr = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
    if cfg.lr_decay_steps > 0 and decay_from is not None:
        frac = min(1.0, max(0.0, (step - decay_from) / cfg.lr_decay_steps))
        lr *= cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr


def _log(work: Path, rec: dict) -> None:
    rec = {"time": time.time(), **rec}
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def read_log(work: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl`` (none without one)."""
    path = Path(work) / "log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def first_logged(log: list[dict], key: str) -> Any:
    """The first value (not None) of ``key`` in a run's log records, e.g. its ``from_step`` (the step of the
    checkpoint it started from) or its ``released_history`` (the history of the released model it started from);
    None without one."""
    return next((rec[key] for rec in log if rec.get(key) is not None), None)


# ----------------------------------------------------------------------------- data


def stage_data(cfg: TrainConfig) -> None:
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "scenes.npz"
    made = data_look_prob(work)
    if made is not None:
        if made != cfg.look_prob:
            raise ValueError(f"{out} was made with --look-prob {made}, not {cfg.look_prob}: use another --work folder")
        with np.load(out) as d:  # data of before the looks were stored: replay the scenes for them
            data = {k: d[k] for k in d.files} if made > 0 and "looks" not in d.files else None
        if data is not None:
            images, *_, looks = _replay(work, cfg, len(data["images"]))
            if not np.array_equal(images, data["images"]):
                raise ValueError(f"{out}: its scenes are not what ShapesWorld draws now, so their looks cannot be recovered")
            data["looks"] = looks
            _save_scenes(work, data)
        return
    images, semantic, instance, objs, looks = _replay(work, cfg, cfg.n_scenes)
    _save_scenes(
        work,
        {
            "images": images,
            "semantic": semantic,
            "instance": instance,
            "objects": objs,
            "looks": looks,
            "look_prob": cfg.look_prob,
        },
    )


def _replay(work: Path, cfg: TrainConfig, n: int) -> tuple[np.ndarray, ...]:
    """Render the ``n`` training scenes: images, semantic and instance masks, objects (colour index, shape index; -1
    pads) and looks (index into ``LOOKS``; -1 plain or pad)."""
    world = ShapesWorldConfig(look_prob=cfg.look_prob)
    images = np.zeros((n, world.size, world.size, 3), np.uint8)
    semantic = np.zeros((n, world.size, world.size), np.uint8)
    instance = np.zeros((n, world.size, world.size), np.uint8)
    objs = np.full((n, world.max_objects, 2), -1, np.int16)
    looks = np.full((n, world.max_objects), -1, np.int8)
    colours = list(COLOURS)
    t0 = time.time()
    for i in range(n):
        sc = make_scene(TRAIN_SEED, i, world)
        images[i], semantic[i], instance[i] = sc.image, sc.semantic, sc.instance
        for j, o in enumerate(sc.objects):
            objs[i, j] = (colours.index(o.colour), SHAPES.index(o.shape))
            looks[i, j] = LOOKS.index(o.look) if o.look is not None else -1
        if i % 5000 == 0:
            _log(work, {"stage": "data", "i": i, "elapsed": time.time() - t0})
    return images, semantic, instance, objs, looks


def _save_scenes(work: Path, data: dict[str, np.ndarray | float]) -> None:
    tmp = work / "scenes.tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, work / "scenes.npz")


def data_look_prob(work: str | Path) -> float | None:
    """The ``look_prob`` that ``WORK/scenes.npz`` was made with (0 for data of before looks), None without data."""
    path = Path(work) / "scenes.npz"
    if not path.exists():
        return None
    with np.load(path) as d:
        return float(d["look_prob"]) if "look_prob" in d.files else 0.0


def _load_scenes(work: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``WORK/scenes.npz`` (only ``keys`` among them, when given: the others, the images and masks, are
    not read)."""
    with np.load(work / "scenes.npz") as d:
        return {k: d[k] for k in d.files if keys is None or k in keys}


def _objects_of(row: np.ndarray, looks: np.ndarray | None = None) -> list[SceneObject]:
    colours = list(COLOURS)
    looks = np.full(len(row), -1) if looks is None else looks
    return [
        SceneObject(colour=colours[c], shape=SHAPES[s], cx=0, cy=0, radius=0, angle=0, look=LOOKS[k] if k >= 0 else None)
        for (c, s), k in zip(row, looks, strict=True)
        if c >= 0
    ]


# ----------------------------------------------------------------------------- VAE


def stage_vae(cfg: TrainConfig, init_from: str | None = None) -> None:
    import torch

    work = Path(cfg.work)
    if (work / "vae.pt").exists():
        return
    if init_from:
        # Warm start: the shipped VAE is kept as it is, so the cached latents match the shipped model.
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(init_from) / "vae", torch_dtype=torch.float32)
        atomic_torch_save(vae.state_dict(), work / "vae.pt")
        _log(work, {"stage": "vae", "init_from": str(Path(init_from).resolve())})
        return
    torch.manual_seed(cfg.seed)
    scenes = _load_scenes(work)
    imgs = scenes["images"]
    arch = ToyArch()
    vae = build_vae(arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        idx = rng.integers(0, len(imgs), cfg.vae_batch)
        x = torch.from_numpy(imgs[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = (rec - x).abs().mean() + 0.5 * (rec - x).pow(2).mean() + 1e-5 * kl
        lr = cfg.vae_lr * min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            mse = (rec.detach().clamp(-1, 1) - x).pow(2).mean().item() / 4  # in [0,1] units
            psnr = 10 * math.log10(1 / max(mse, 1e-10))
            _log(work, {"stage": "vae", "step": step, "loss": loss.item(), "psnr": psnr, "elapsed": time.time() - t0})
    atomic_torch_save(vae.state_dict(), work / "vae.pt")


def _load_vae(work: Path):
    import torch

    vae = build_vae(ToyArch())
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True))
    vae.eval()
    return vae


# ----------------------------------------------------------------------------- encode


def _vae_source(work: Path) -> str | None:
    """The pipeline folder the VAE stage took its VAE from (``--init-from``), None for a VAE trained here."""
    return next((r["init_from"] for r in read_log(work) if r.get("stage") == "vae" and "init_from" in r), None)


def _pipeline_scaling(folder: str | Path) -> float:
    return float(json.loads((Path(folder) / "vae" / "config.json").read_text())["scaling_factor"])


def stage_encode(cfg: TrainConfig) -> None:
    import torch

    work = Path(cfg.work)
    out = work / "latents.npz"
    if out.exists():
        return
    scenes = _load_scenes(work)
    imgs = scenes["images"]
    vae = _load_vae(work)
    means = []
    t0 = time.time()
    with torch.inference_mode():
        for i in range(0, len(imgs), 256):
            x = torch.from_numpy(imgs[i : i + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
            means.append(vae.encode(x).latent_dist.mean.numpy().astype(np.float16))
            if i % 10240 == 0:
                _log(work, {"stage": "encode", "i": i, "elapsed": time.time() - t0})
    lat = np.concatenate(means)
    # A VAE taken from a pipeline keeps that pipeline's scaling factor, so that a denoiser continued from it sees its
    # latents at the scale it was trained on (other data, e.g. with looks, would give another); a trained one gets
    # 1 / std of these latents.
    source = _vae_source(work)
    scale = _pipeline_scaling(source) if source else float(1.0 / lat.astype(np.float32).std())
    # Object weight map at latent resolution: fraction of object pixels per latent cell.
    sem = scenes["semantic"]
    f = sem.shape[1] // lat.shape[2]
    obj = (sem > 0).reshape(len(sem), lat.shape[2], f, lat.shape[3], f).mean(axis=(2, 4)).astype(np.float16)
    tmp = work / "latents.tmp.npz"
    np.savez(tmp, latents=lat, object_frac=obj, scaling_factor=np.float32(scale))
    os.replace(tmp, out)
    _log(work, {"stage": "encode", "done": len(lat), "scaling_factor": scale})


# ----------------------------------------------------------------------------- UNet


def _looks_of(scenes: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray | None:
    """The looks of scenes ``idx`` (None for data made without looks)."""
    return scenes["looks"][idx] if "looks" in scenes else None


def _caption_batch(
    objs: np.ndarray,
    rng: np.random.Generator,
    empty_prob: float,
    colour_prob: float,
    looks: np.ndarray | None = None,
    look_word_prob: float = 0.0,
) -> list[str]:
    """Captions of the scenes whose objects are the rows of ``objs`` (and whose looks those of ``looks``, needed when
    ``look_word_prob`` > 0)."""
    if look_word_prob > 0 and looks is None:
        raise ValueError("captions that name looks need the data's looks: run `attnseg train-toy data` on this --work")
    caps = []
    for i, row in enumerate(objs):
        if rng.random() < empty_prob:
            caps.append("")
        else:
            obj = _objects_of(row, None if looks is None else looks[i])
            caps.append(caption(obj, rng, colour_prob=colour_prob, look_word_prob=look_word_prob))
    return caps


def _tokenize(tok, texts: list[str]):
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def stage_unet(
    cfg: TrainConfig, max_minutes: float | None = None, init_from: str | None = None, init_ckpt: str | None = None
) -> None:
    import torch

    work = Path(cfg.work)
    torch.set_num_threads(cfg.threads)
    lat_d = np.load(work / "latents.npz")
    latents, obj_frac = lat_d["latents"], lat_d["object_frac"]
    scale = float(lat_d["scaling_factor"])
    scenes = _load_scenes(work, ("objects", "looks"))
    objs = scenes["objects"]
    arch = train_arch(asdict(cfg))
    tok = build_tokenizer(arch.max_length)
    unet = build_unet(arch)
    te = build_text_encoder(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    sched = build_scheduler()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    step = 0
    warm_from = 0  # step at which a fresh optimizer started (its warm-up counts from there)
    decay_from: int | None = None
    ck = work / "ckpt.pt"
    if ck.exists():
        state = torch.load(ck, weights_only=True)
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        for e, s in zip(ema, state["ema"], strict=True):
            e.copy_(s)
        step = state["step"]
        warm_from = int(state.get("warm_from", 0))
        decay_from = state.get("decay_from")
        _log(
            work,
            {
                "stage": "unet",
                "resumed_at": step,
                "colour_prob": cfg.colour_prob,
                "look_word_prob": cfg.look_word_prob,
                "lr_decay_steps": cfg.lr_decay_steps,
                "decay_from": decay_from,
            },
        )
    elif init_ckpt:
        # Start from another run's checkpoint (online weights); the text encoder may have fewer layers:
        # its embeddings and final norm are kept. Fresh optimizer and EMA, with a new warm-up.
        state = torch.load(init_ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        res = te.load_state_dict(state["text_encoder"], strict=False)
        if res.missing_keys:
            raise RuntimeError(f"{init_ckpt}: text encoder weights missing for {res.missing_keys[:4]}")
        for e, p in zip(ema, params, strict=True):
            e.copy_(p.detach())
        step = warm_from = int(state["step"])
        _log(work, {"stage": "unet", "init_ckpt": str(init_ckpt), "step": step, "dropped": len(res.unexpected_keys)})
    elif init_from:
        # Warm start from a shipped pipeline (fp16 weights; no optimizer state is shipped).
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(
            UNet2DConditionModel.from_pretrained(Path(init_from) / "unet", torch_dtype=torch.float32).state_dict()
        )
        te.load_state_dict(CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder", dtype=torch.float32).state_dict())
        for e, p in zip(ema, params, strict=True):
            e.copy_(p.detach())
        meta = json.loads((Path(init_from) / "training.json").read_text()) if (Path(init_from) / "training.json").exists() else {}
        step = warm_from = int(meta.get("step", 0))  # a fresh optimizer: warm up again
        # The released model's lineage, so that this run's release states the whole history (release.write_card).
        _log(work, {"stage": "unet", "init_from": str(init_from), "step": step, "released_history": meta.get("history")})
    if cfg.lr_decay_steps > 0 and decay_from is None:
        decay_from = step
        _log(work, {"stage": "unet", "lr_decay_from": step, "lr_decay_steps": cfg.lr_decay_steps})
    alphas = sched.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    w_t = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction

    def save() -> None:
        state = {
            "unet": unet.state_dict(),
            "text_encoder": te.state_dict(),
            "opt": opt.state_dict(),
            "ema": ema,
            "step": step,
            "warm_from": warm_from,
            "decay_from": decay_from,
            "config": asdict(cfg),
        }
        atomic_torch_save(state, ck)

    t_start = time.time()
    loss_acc, n_acc = 0.0, 0
    unet.train()
    te.train()
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
            t = torch.randint(0, 1000, (cfg.batch,), generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            ids = _tokenize(tok, caps)
            enc = te(ids)[0]
            pred = unet(zt, t, enc).sample
            pix_w = 1 + cfg.object_weight * of
            per = ((pred - noise) ** 2 * pix_w).mean(dim=(1, 2, 3)) / pix_w.mean(dim=(1, 2, 3))
            loss = (per * w_t[t]).mean()
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
                _log(work, {"stage": "unet", "step": step, "loss": loss_acc / n_acc, "lr": lr, "elapsed": time.time() - t_start})
                loss_acc, n_acc = 0.0, 0
            out_of_time = max_minutes is not None and (time.time() - t_start) > max_minutes * 60
            if step % cfg.ckpt_every == 0 or step == cfg.unet_steps or out_of_time or stop:
                save()
            if stop or out_of_time:
                _log(work, {"stage": "unet", "stopped_at": step, "why": f"signal {stop[0]}" if stop else "--max-minutes"})
                break
            if step % cfg.diag_every == 0:
                _log(work, {"stage": "diag", "step": step, **text_gain(unet, te, tok, _load_vae(work), scale)})
                unet.train()
                te.train()


@contextmanager
def _stop_requests():
    """While inside: SIGTERM and SIGINT are recorded in the yielded list instead of killing the process, so the
    training loop can finish its step, save a checkpoint and return (nothing lost when a job is stopped)."""
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield stop
        return
    old = {sig: signal.signal(sig, lambda n, _f: stop.append(n)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def text_gain(unet, te, tok, vae, scale: float, n: int = 48) -> dict[str, float]:
    """Noise-prediction error on object pixels of held-out scenes with the right caption vs none.

    A model whose text does not change the prediction cannot localise words; this is the first
    number to watch while training.
    """
    import torch

    unet.eval()
    te.eval()
    scenes = [make_scene(HOLDOUT_SEED, i) for i in range(n)]
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rng = np.random.default_rng(0)
    caps = [caption(s.objects, rng) for s in scenes]
    out = {}
    with torch.inference_mode():
        z0 = vae.encode(x).latent_dist.mean * scale
        f = x.shape[-1] // z0.shape[-1]
        obj = torch.from_numpy(np.stack([s.semantic > 0 for s in scenes])).float()
        obj = torch.nn.functional.avg_pool2d(obj[:, None], f) > 0.5
        alphas = build_scheduler().alphas_cumprod
        e_cap = te(_tokenize(tok, caps))[0]
        e_empty = te(_tokenize(tok, [""] * n))[0]
        e_wrong = te(_tokenize(tok, caps[1:] + caps[:1]))[0]
        g = torch.Generator().manual_seed(0)
        for tt in (150, 400, 700):
            noise = torch.randn(z0.shape, generator=g)
            a = alphas[tt]
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            t = torch.full((n,), tt)
            for name, e in (("cap", e_cap), ("empty", e_empty), ("wrong", e_wrong)):
                err = (unet(zt, t, e).sample - noise).pow(2).mean(1, keepdim=True)
                out[f"err{tt}_{name}"] = float(err[obj.expand_as(err)].mean())
    return out


# ----------------------------------------------------------------------------- export


EMBEDDED_PROFILE = {
    "presets": dict.fromkeys(("cross", "t2m", "iseg", "diffseg", "diffseg-iseg", "interactive"), "embedded"),
    "words": [*SHAPES, *COLOURS],
    "why": (
        "The papers' self-attention layer maps onto this model's last decoder layer, which attends almost uniformly; "
        "the 'embedded' presets of T2M and iSeg read object-coherent 16-px layers instead (T2M the first decoder "
        "layer, iSeg the encoder layer; each chosen on validation scenes) "
        "(python -m attnseg.train.embedded.diagnose); the 'embedded' presets of the cross-attention baseline, T2M and iSeg "
        "take background thresholds chosen on validation scenes for ShapesWorld's small objects (the papers' are "
        f"made for VOC); DiffSeg's 'embedded' preset merges with a KL threshold "
        f"({REGISTRY['diffseg'].presets['embedded'].kl_threshold}) chosen on "
        "validation scenes for this model's 16-px maps (docs/EMBEDDED-MODEL-TRAINING.md); the 'embedded' presets of "
        "interactive segmentation and of DiffSeg refined by iSeg read T2M's layer, their iterations (and the former's "
        "background threshold) chosen on validation scenes (docs/BENCHMARKS.md). Pass a preset to override."
    ),
}


def stage_export(cfg: TrainConfig, out_dir: str | Path, use_ema: bool = True) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    work = Path(cfg.work)
    state = torch.load(work / "ckpt.pt", weights_only=True)
    arch = train_arch(state["config"])
    tok = build_tokenizer(arch.max_length)
    unet = build_unet(arch)
    te = build_text_encoder(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    unet.load_state_dict(state["unet"])
    te.load_state_dict(state["text_encoder"])
    if use_ema:
        params = list(unet.parameters()) + list(te.parameters())
        with torch.no_grad():
            for p, e in zip(params, state["ema"], strict=True):
                p.copy_(e)
    vae = _load_vae(work)
    scale = float(np.load(work / "latents.npz")["scaling_factor"])
    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_clip_vocab_files(tok, out_dir / "tokenizer")
    meta = {
        "step": state["step"],
        "ema": use_ema,
        "train_config": state["config"],
        "decay_from": state.get("decay_from"),
        "arch": asdict(arch),
    }
    (out_dir / "training.json").write_text(json.dumps(meta, indent=1))
    (out_dir / PROFILE_FILE).write_text(json.dumps(EMBEDDED_PROFILE, indent=1) + "\n")
    return out_dir


def write_clip_vocab_files(tok, folder: Path) -> None:
    """Also write ``vocab.json`` and ``merges.txt`` in CLIP's own format beside tokenizer.json."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.backend_tokenizer.model.save(d)
        vocab = json.loads(Path(d, "vocab.json").read_text(encoding="utf-8"))
        merges = [m for m in Path(d, "merges.txt").read_text(encoding="utf-8").splitlines() if m and not m.startswith("#")]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _checkpoint_config(work: str, name: str = "ckpt.pt") -> dict | None:
    """The TrainConfig (as a dict) of the checkpoint ``name`` in ``work`` that a run would resume, or None."""
    ck = Path(work) / name
    return _ckpt_config(ck) if ck.exists() else None


def _ckpt_config(ckpt: str | Path) -> dict:
    """The TrainConfig (as a dict) saved in the checkpoint file ``ckpt`` (memory-mapped: the weights are not read), or
    in a released transformer pipeline folder's ``training.json`` (with its ``arch`` as ``sd3_arch``)."""
    import torch

    if Path(ckpt).is_dir():
        meta = released_training(ckpt)
        return {**meta["train_config"], "sd3_arch": meta["arch"]}
    return torch.load(ckpt, weights_only=True, mmap=True)["config"]


def released_training(folder: str | Path) -> dict:
    """The ``training.json`` of a transformer pipeline folder written by ``export-sd3`` (the step, EMA flag, run
    config and architecture of the weights it holds)."""
    folder = Path(folder)
    meta = folder / "training.json"
    if not (folder / "transformer").is_dir() or not meta.exists():
        raise SystemExit(
            f"{folder} is not a transformer pipeline folder written by attnseg (it needs transformer/ and "
            "training.json): start from a run's sd3-ckpt.pt or from the embedded SD3 model's folder"
        )
    return json.loads(meta.read_text())


def _text_layers(cfg: TrainConfig, asked: int | None, init_from: str | None, init_ckpt: str | None = None) -> int:
    """Text encoder depth: what a checkpoint being resumed or a warm-start folder has, else ``asked`` or 3.

    A run started from another run's checkpoint (``init_ckpt``) keeps that run's depth unless fewer layers are
    asked for (the embeddings and final norm are kept, the dropped layers discarded)."""
    resumed = _checkpoint_config(cfg.work)
    have = None
    if resumed is not None:
        have = int(resumed.get("text_layers", 3))
    elif init_from and (Path(init_from) / "text_encoder" / "config.json").exists():
        have = int(json.loads((Path(init_from) / "text_encoder" / "config.json").read_text())["num_hidden_layers"])
    elif init_ckpt:
        source = int(_ckpt_config(init_ckpt).get("text_layers", 3))
        if asked is not None and asked > source:
            raise SystemExit(
                f"--text-layers {asked} but {init_ckpt} has {source} text encoder layers; a run started from it can keep "
                f"or drop layers, not add them: ask for {source} or fewer"
            )
        return source if asked is None else asked
    if have is not None and asked is not None and asked != have:
        raise SystemExit(f"--text-layers {asked} but the model being continued has {have}; use a new --work folder")
    return have if have is not None else (asked if asked is not None else 3)


def _source_layout(init_from: str | None, init_ckpt: str | None) -> dict | None:
    """The UNet layout (as TrainConfig fields) of a warm-start source, or None without one."""
    if init_ckpt:
        return _ckpt_config(init_ckpt)
    if init_from and (Path(init_from) / "unet" / "config.json").exists():
        unet = json.loads((Path(init_from) / "unet" / "config.json").read_text())
        return {
            "unet_channels": tuple(unet["block_out_channels"]),
            "unet_cross_every_level": all(t.startswith("CrossAttn") for t in unet["down_block_types"]),
        }
    return None


def _unet_layout(resumed: dict | None, channels: str | None, every_level: bool | None) -> tuple[tuple[int, ...], bool]:
    """UNet widths and cross-attention layout: what the model being continued (a run resumed, or a warm-start
    source) has, else as asked, else the defaults."""
    asked_ch = None
    if channels is not None:
        try:
            asked_ch = tuple(int(c) for c in channels.split(","))
        except ValueError:
            raise SystemExit(f"--unet-channels takes comma-separated integers such as 64,128, not {channels!r}") from None
        if not 2 <= len(asked_ch) <= 4 or any(c <= 0 or c % 32 for c in asked_ch):
            raise SystemExit(
                f"--unet-channels {channels}: give 2 to 4 levels (the 16-px latent is halved between levels), "
                "each a positive multiple of 32 (group norm)"
            )
    if resumed is not None:
        have = train_arch(resumed)
        if (asked_ch is not None and asked_ch != have.unet_channels) or (
            every_level is not None and every_level != have.unet_cross_every_level
        ):
            raise SystemExit(
                f"the model being continued has UNet channels {have.unet_channels} and cross-attention at every level "
                f"= {have.unet_cross_every_level}; another layout needs a fresh run: a new --work folder, without "
                "--init-ckpt or --init-from"
            )
        return have.unet_channels, have.unet_cross_every_level
    return (
        asked_ch if asked_ch is not None else ToyArch.unet_channels,
        every_level if every_level is not None else ToyArch.unet_cross_every_level,
    )


def _lr_decay_steps(resumed: dict | None, asked: int | None) -> int:
    """Decay length: as asked, else what the run being resumed uses, else 0 (constant lr).

    A run whose decay has begun keeps its length: another value would make the learning rate jump.
    """
    have = int((resumed or {}).get("lr_decay_steps", 0))
    if asked is None:
        return have
    if asked < 0:
        raise SystemExit(f"--lr-decay-steps must be >= 0, not {asked}")
    if have > 0 and asked != have:
        raise SystemExit(
            f"--lr-decay-steps {asked} but the run being continued decays over {have} steps; "
            "pass the same value (or none), or continue in a new --work folder with --init-ckpt"
        )
    return asked
