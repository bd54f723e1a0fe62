"""``attnseg train-toy STAGE``: the command line of the embedded models' training (stages in :mod:`.train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attnseg.train.embedded import train
from attnseg.train.embedded.sd3 import CKPT, SD3Arch, _arch_of, stage_export_sd3, stage_sd3
from attnseg.train.embedded.train import (
    TrainConfig,
    _checkpoint_config,
    _ckpt_config,
    _lr_decay_steps,
    _source_layout,
    _text_layers,
    _unet_layout,
    stage_data,
    stage_encode,
    stage_export,
    stage_unet,
    stage_vae,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="attnseg train-toy", description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stage", choices=["data", "vae", "encode", "unet", "export", "all", "sd3", "export-sd3"])
    p.add_argument("--work", default=TrainConfig.work)
    p.add_argument("--steps", type=int, default=TrainConfig.unet_steps)
    p.add_argument("--n-scenes", type=int, default=TrainConfig.n_scenes)
    p.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--out", default=None, help="export: pipeline folder to write")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", default=None, help="warm start from a pipeline folder (e.g. the shipped embedded model)")
    p.add_argument(
        "--init-ckpt",
        default=None,
        help="unet / sd3 stage: start from another work folder's ckpt.pt / sd3-ckpt.pt; sd3 stage: or from a "
        "transformer pipeline folder that export-sd3 wrote, such as the embedded SD3 model's",
    )
    p.add_argument(
        "--text-layers",
        type=int,
        default=None,
        help="text encoder layers (default: as resumed / warm-started / in the --init-ckpt run, else 3; --init-ckpt allows fewer)",
    )
    p.add_argument(
        "--colour-prob",
        type=float,
        default=None,
        help="share of objects named 'colour shape' rather than 'shape' in captions (default: as resumed, else 0.8)",
    )
    p.add_argument(
        "--lr-decay-steps",
        type=int,
        default=None,
        help="cosine-decay the learning rate to 10%% over this many steps, counted from the step where the decay is "
        "first asked for (default: as resumed, else 0 = constant; a decay once begun keeps its length)",
    )
    p.add_argument(
        "--look-prob",
        type=float,
        default=None,
        help="data stage: share of objects that wear an unnamed look (striped, dotted, ...; default 0; the later "
        "stages read it from the data)",
    )
    p.add_argument(
        "--look-word-prob",
        type=float,
        default=None,
        help="unet / sd3 stages: probability that a caption names the look of an object that wears one ('red striped "
        "circle'; default: as resumed, else as in the --init-ckpt run, else 0)",
    )
    p.add_argument(
        "--pos-scale",
        type=float,
        default=None,
        help="sd3 stage, new runs (also from --init-ckpt): factor on the image tokens' position embedding (default: "
        "the --init-ckpt run's, else 1, SD3's)",
    )
    p.add_argument(
        "--text-pos-scale",
        type=float,
        default=None,
        help="sd3 stage, new runs (also from --init-ckpt): factor on the text encoders' position embeddings, frozen "
        "when not 1 (default: the --init-ckpt run's, else 1)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="sd3 stage with --init-ckpt: grow the source's transformer to this many blocks, the new ones inserted "
        "before its last block as identities (default: the source's depth)",
    )
    p.add_argument(
        "--patch",
        type=int,
        default=None,
        help="sd3 stage with --init-ckpt: the transformer's patch side, a multiple of the source's (a coarser token "
        "grid; default: the source's)",
    )
    p.add_argument(
        "--noise-mean",
        type=float,
        default=None,
        help="sd3 stage: location of the logit-normal distribution of the noise level s (default: as resumed, else as "
        "in the --init-ckpt run, else 0, SD3's; 0.5 with --noise-std 1.25 is about the UNet's own distribution)",
    )
    p.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help="sd3 stage: scale of that distribution, above 0 (default: as resumed, else as in the --init-ckpt run, "
        "else 1, SD3's)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="sd3 stage: a UNet pipeline folder (e.g. src/attnseg/assets/embedded) whose denoising predictions, at the "
        "same signal-to-noise ratio, are the transformer's targets (default: as resumed, else as in the --init-ckpt "
        "run, else none: the samples' own targets); '' turns it off",
    )
    p.add_argument("--unet-channels", default=None, help="new runs: UNet width per level, e.g. 64,128 (default 64,128,128)")
    p.add_argument(
        "--cross-every-level",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="new runs: cross-attention down/up blocks at every level, the lowest included (the mid block, always at "
        "the lowest level's resolution, has cross-attention either way)",
    )
    a = p.parse_args(argv)
    for flag, v in (("--pos-scale", a.pos_scale), ("--text-pos-scale", a.text_pos_scale)):
        if v is not None and not v > 0:
            p.error(f"{flag} must be a factor above 0, got {v}")
    if a.noise_std is not None and not a.noise_std > 0:
        p.error(f"--noise-std must be a scale above 0, got {a.noise_std}")
    if a.patch is not None and a.patch < 1:
        p.error(f"--patch must be a side of at least 1 latent pixel, got {a.patch}")
    if a.init_ckpt and Path(a.init_ckpt).is_dir() and a.stage != "sd3":
        p.error(
            f"--init-ckpt {a.init_ckpt} is a folder: only the sd3 stage starts from a pipeline folder; the unet stage "
            "starts from a run's ckpt.pt, or warm-starts from a pipeline folder with --init-from"
        )
    cfg = TrainConfig(work=a.work, unet_steps=a.steps, n_scenes=a.n_scenes, vae_steps=a.vae_steps, threads=a.threads)
    made = train.data_look_prob(cfg.work)
    cfg.look_prob = a.look_prob if a.look_prob is not None else (made or 0.0)
    cfg.text_layers = _text_layers(cfg, a.text_layers, a.init_from, a.init_ckpt)
    # The run being continued: the transformer's checkpoint for its stages, the UNet's otherwise.
    resumed = _checkpoint_config(cfg.work, CKPT if a.stage in ("sd3", "export-sd3") else "ckpt.pt")
    # A caption setting: as asked, else what the run being resumed used (logged on resume), else what the run a new
    # one starts from (--init-ckpt) used, else the default.
    source = _ckpt_config(a.init_ckpt) if resumed is None and a.init_ckpt else None
    cfg.colour_prob = (
        a.colour_prob if a.colour_prob is not None else (resumed or source or {}).get("colour_prob", cfg.colour_prob)
    )
    cfg.look_word_prob = (
        a.look_word_prob if a.look_word_prob is not None else (resumed or source or {}).get("look_word_prob", 0.0)
    )
    teacher = str(Path(a.teacher).resolve()) if a.teacher else a.teacher  # a run may resume from another folder
    for field, asked in (("noise_mean", a.noise_mean), ("noise_std", a.noise_std), ("teacher", teacher)):
        setattr(cfg, field, asked if asked is not None else (resumed or source or {}).get(field, getattr(cfg, field)))
    cfg.lr_decay_steps = _lr_decay_steps(resumed, a.lr_decay_steps)
    continued = resumed if resumed is not None else _source_layout(a.init_from, a.init_ckpt)
    cfg.unet_channels, cfg.unet_cross_every_level = _unet_layout(continued, a.unet_channels, a.cross_every_level)
    torch.set_num_threads(cfg.threads)
    if a.stage in ("data", "all"):
        stage_data(cfg)
    if a.stage in ("vae", "all"):
        stage_vae(cfg, a.init_from)
    if a.stage in ("encode", "all"):
        stage_encode(cfg)
    if a.stage in ("unet", "all"):
        stage_unet(cfg, a.max_minutes, a.init_from, a.init_ckpt)
    if a.stage == "export":
        stage_export(cfg, a.out or Path(cfg.work) / "pipeline")
    if a.stage == "sd3":
        if resumed is not None:  # a run's architecture is fixed when it starts
            kept = _arch_of(resumed)
            for flag, asked, has in (
                ("--pos-scale", a.pos_scale, kept.pos_scale),
                ("--text-pos-scale", a.text_pos_scale, kept.text_pos_scale),
            ):
                if asked is not None and asked != has:
                    p.error(
                        f"{flag} {asked}: the run in {cfg.work} was started with {has} and resumes with it; start a "
                        f"new run from its checkpoint (--init-ckpt) to change it"
                    )
        src_arch = _arch_of(source or {})
        pos_scale = a.pos_scale if a.pos_scale is not None else src_arch.pos_scale
        text_pos_scale = a.text_pos_scale if a.text_pos_scale is not None else src_arch.text_pos_scale
        arch = SD3Arch(pos_scale=pos_scale, text_pos_scale=text_pos_scale)
        stage_sd3(cfg, arch, a.max_minutes, a.init_from, a.init_ckpt, grow_to=a.layers, patch=a.patch)
    if a.stage == "export-sd3":
        stage_export_sd3(cfg, a.out or Path(cfg.work) / "pipeline-sd3")


if __name__ == "__main__":
    main()
