"""Export a transformer run as the shipped embedded SD3 model, measure it beside the UNet model and write its card.

    python -m attnseg.train.embedded.release_sd3 --work /work/sd3-train5 \\
        --prior /work/sd3-train /work/sd3-train2 /work/sd3-train3 /work/sd3-train4 \\
        --out src/attnseg/assets/embedded-sd3 --eval-n 100

Steps: export the EMA weights (fp16 safetensors) with the model's profile (``attnseg.json``) -> ``attnseg eval`` of
every method that reads a transformer, and of the UNet model's methods on the same held-out ShapesWorld scenes (world
seed 1, never used in training) -> oracle rate of generated images -> sample grid -> model card (README.md beside the
weights). ``--prior``: the work folders of the runs this one continued from, oldest first (their checkpoints and logs
give the card's history).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

from attnseg.diffusion.layers import LayerInfo, LayerSelect, joint_inventory, read_heads
from attnseg.diffusion.loading import EMBEDDED_MODELS, load_pipeline
from attnseg.io.datasets import VOCDataset
from attnseg.jobs.evaluate import MethodSpec, evaluate
from attnseg.methods.registry import REGISTRY
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import export_voc
from attnseg.train.embedded.release import _and, _params, busy_seconds
from attnseg.train.embedded.report import GRID_PROMPTS, grid, oracle_rate, sample
from attnseg.train.embedded.sd3 import CKPT, SD3_CALL, SD3Arch, _arch_of, stage_export_sd3
from attnseg.train.embedded.train import TrainConfig, first_logged, read_log

PROFILE = {
    "presets": {"cross": "embedded-sd3", "t2m": "embedded-sd3", "iseg": "embedded-sd3", "diffseg": "embedded"},
    "why": (
        "The joint blocks of this model differ in how well their maps find the objects their words name, so each "
        "method's 'embedded-sd3' preset reads the blocks, noise level and background threshold chosen on validation "
        "scenes (python scripts/probe_sd3.py MODEL blocks / sweep / t2m-sweep / iseg-sweep); the model card beside "
        "the weights names them. 't2m:mmdit' and 'iseg:mmdit', every joint block's Cross, are the papers' methods "
        "mapped onto a transformer. DiffSeg merges with the UNet model's KL threshold (0.1). Pass a preset to override."
    ),
}
"""The model's ``attnseg.json``; its words are the UNet model's (the same tokenizer and captions)."""

METHODS = [
    "cross",
    "cross:default",
    "cross:seg4diff",
    "t2m",
    "t2m:mmdit",
    "iseg",
    "iseg:mmdit",
    "diffseg",
    "concept-attention",
    "concept-attention:flux",
]
"""What the release measures on the transformer: the model's presets, the papers' layer choices beside them."""
UNET_METHODS = ["cross", "t2m", "iseg", "diffseg"]
"""What it measures on the UNet model on the same scenes (its own presets)."""

ARCH_CHANGES = {
    "pooled": {False: "pooled conditioning off"},
    "mix_text": {False: "text stream frozen"},
}
"""How a run's change of a boolean architecture setting reads in the card's history."""

CARD = """# attnseg embedded transformer model (ShapesWorld, Stable Diffusion 3 architecture)

A small text-to-image model with Stable Diffusion 3's components (MMDiT: joint attention over text and image
tokens), trained by this project on ShapesWorld so that attnseg's transformer backbone runs and is measured with no
download: `--model embedded-sd3` in every command. It loads with
`StableDiffusion3Pipeline.from_pretrained(this_folder, text_encoder_3=None, tokenizer_3=None)` and is called with
`max_sequence_length=0` (it has no T5 encoder).

On held-out scenes the cross-attention baseline with this model's preset scores {sd3_cross:.1f} mIoU and T2M {sd3_t2m:.1f},
against {unet_cross:.1f} and {unet_t2m:.1f} with the UNet model's (`embedded`; table below). It ships so that every method
runs on a real SD3 pipeline offline and can be compared there; for real images, pass real weights (`--model`).

## Architecture ({total_params:.2f} M parameters, {size_mb:.1f} MB in fp16)
- SD3Transformer2DModel ({transformer_params:.2f} M): {layers} joint blocks, width {width} ({heads} heads of {head_dim}),
  patch {patch}: {tokens} x {tokens} image tokens on the {latent}x{latent}x{latent_channels} latents. These settings differ from SD3's, each
  held by the saved weights, so the folder is a stock pipeline:
  the text encoders' projections are zero (pooled projections 0{pooled_note}), every block but the last has a zero
  context output projection and context feed-forward output (the text tokens that every block reads are the encoders'
  unmixed embeddings{mix_note}); the image tokens' sine-cosine position table is scaled by {pos_scale}{text_pos_note}
  (docs/EMBEDDED-MODEL-TRAINING.md says why).
- Two CLIPTextModelWithProjection ({text_params:.2f} M each), {text_layers} layer, width {text_hidden}, in SD3's CLIP-L / CLIP-G
  slots (the pipeline reads their penultimate hidden states: the token and position embeddings); one CLIPTokenizer
  with the project's vocabulary ({vocab} tokens) in both; no T5.
- The UNet model's AutoencoderKL (64x64 RGB -> 16x16x4 latents; scaling factor {scaling:.4f}, no shift).
- FlowMatchEulerDiscreteScheduler, shift {shift}.

## Data
The UNet model's: ShapesWorld, world seed 0, {n_scenes} scenes of 64x64 px, 1-3 objects of 8 shapes in 8 colours;
captions drawn anew at every step, a share of the objects named by colour and shape (by run, below), the others by
shape alone; 10% empty captions. Evaluation scenes use world seed 1 and are never seen in training.

## Training (`attnseg train-toy sd3`)
- Rectified flow as SD3 trains it: x_s = (1 - s) x_0 + s e, s logit-normal (SD3's mean 0 and std 1 unless a run
  below says otherwise), target e - x_0 (unless a run below names a teacher: then a UNet model's denoising
  predictions at the same signal-to-noise ratio, for s within its schedule); batch {batch}, AdamW lr {lr} with {warmup} warm-up steps, EMA {ema} (the
  shipped weights are the EMA), gradient clipping at 1.
- **Use of the masks**: the denoising loss of a latent cell is weighted by 1 + {obj_w} x its object fraction. Nothing else
  uses them: the attention is never trained on masks.
- Runs, each continuing the one before from its weights (a fresh optimiser and EMA); {total_steps:,} steps of
  {batch} in all ({samples:,} samples), last training loss {loss:.3f}:

{runs}

- Machine: {machine}; {hours:.1f} h of compute wall time for the transformer runs.

## Measured ({date})
{measurements}

## What it can and cannot do
- It draws coloured shapes for prompts of the ShapesWorld vocabulary (samples: `samples.png` beside this card) and
  knows no other word.
- `attnseg.json` beside this card makes `cross:embedded-sd3` ({cross_layers}, read at t = {cross_t}, background
  threshold {cross_bg}), `t2m:embedded-sd3` (Cross from {t2m_cross}, Self from {t2m_self}, t = {t2m_t}, background
  threshold {t2m_bg}, Self^{t2m_iters}), `iseg:embedded-sd3` (Cross from {iseg_cross}, Self from {iseg_self}, t = {iseg_t},
  background threshold {iseg_bg}, N = {iseg_iters}; joint blocks counted from 0; all chosen on validation scenes,
  docs/EMBEDDED-MODEL-TRAINING.md) and
  `diffseg:embedded` its default presets; `t2m:mmdit` and `iseg:mmdit` are the papers' methods mapped onto a transformer
  (every joint block's Cross; T2M every block's Self, iSeg the last block's), with the papers' other settings.
- Resolution is fixed at 64x64; other sizes are resized.
"""


def run_history(
    works: list[str], last_step: int | None = None, logs: list[list[dict]] | None = None
) -> tuple[list[dict], list[dict]]:
    """Each run of the lineage (oldest first: its checkpoint's step and settings) and the rows of the card's history.
    A run counts up to the step the next one started from (its log's ``from_step``; the run may have gone on beside
    it). ``last_step``: the step of the exported weights, where the last run's history ends (its checkpoint may be
    later). When the first run started from a released model's folder, the rows begin with that release's history
    (its ``training.json``, copied into the run's log when it started). ``logs``: the runs' log records, when the
    caller has read them (:func:`read_log`)."""
    import torch

    logs = logs if logs is not None else [read_log(w) for w in works]

    runs = []
    for w in works:
        state = torch.load(Path(w) / CKPT, weights_only=True, mmap=True)
        cfg = state["config"]
        runs.append(
            {
                "work": w,
                "steps": int(state["step"]),
                "config": cfg,
                "arch": asdict(_arch_of(cfg)),
                "decay": (state.get("decay_from"), int(cfg.get("lr_decay_steps", 0))),
            }
        )
    for prev, log in zip(runs, logs[1:], strict=False):  # a run ends where the next one branched from it
        branched = first_logged(log, "from_step")
        if branched is not None:
            prev["steps"] = int(branched)
    if last_step is not None:
        runs[-1]["steps"] = last_step
    released = first_logged(logs[0], "released_history")
    rows = list(released["runs"]) if released else []
    start = rows[-1]["to"] if rows else 0
    for i, r in enumerate(runs):
        prev_arch = runs[i - 1]["arch"] if i else (asdict(_arch_of({"sd3_arch": released["arch"]})) if released else None)
        noise, teacher = _noise(r["config"]), _teacher(r["config"])
        if prev_arch is None:
            change = "from scratch (text embeddings from the UNet model's encoder)"
        else:
            changes = [_change(k, prev_arch[k], v) for k, v in r["arch"].items() if prev_arch[k] != v]
            # a released row without the key comes from a run that drew SD3's lognorm(0, 1)
            prev_noise = _noise(runs[i - 1]["config"]) if i else rows[-1].get("noise", [0.0, 1.0])
            if noise != prev_noise:
                changes.append(f"noise levels lognorm({noise[0]}, {noise[1]}) (was lognorm({prev_noise[0]}, {prev_noise[1]}))")
            prev_teacher = _teacher(runs[i - 1]["config"]) if i else rows[-1].get("teacher", "")
            if teacher != prev_teacher:
                changes.append(
                    f"targets from the UNet teacher '{teacher}'"
                    if teacher
                    else f"its own targets (was the teacher '{prev_teacher}')"
                )
            change = _and(changes) if changes else "continued"
            if i == 0:
                change = f"from the released weights of {rows[-1]['run']} (its EMA); {change}"
        (a, n), end = r["decay"], start + r["steps"]
        if a is not None and n > 0 and a < r["steps"]:
            floor = 100 * float(r["config"].get("lr_floor", TrainConfig.lr_floor))
            change += f"; learning rate cosine-decayed to {floor:.0f}% over steps {start + a:,}-{min(start + a + n, end):,}"
        colour = round(100 * float(r["config"].get("colour_prob", 0.8)))
        rows.append(
            {
                "run": f"T{len(rows) + 1}",
                "from": start,
                "to": end,
                "change": change,
                "colour": colour,
                "noise": noise,
                "teacher": teacher,
            }
        )
        start = end
    return runs, rows


def _noise(config: dict) -> list[float]:
    """A run's logit-normal distribution of the noise level, [mean, std] (``TrainConfig.noise_mean`` / ``noise_std``)."""
    return [float(config.get("noise_mean", TrainConfig.noise_mean)), float(config.get("noise_std", TrainConfig.noise_std))]


def _teacher(config: dict) -> str:
    """The folder name of a run's UNet teacher (``TrainConfig.teacher``), '' for none; a name, not a machine's path."""
    return Path(config["teacher"]).name if config.get("teacher") else ""


def history_table(rows: list[dict]) -> str:
    """The card's table of the lineage's runs (rows of :func:`run_history`)."""
    lines = ["| run | steps | what changed | colour captions at its end |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['from']:,}-{r['to']:,} | {r['change']} | {r['colour']}% |" for r in rows]
    return "\n".join(lines)


def _until(log: list[dict], step: int) -> list[dict]:
    """The records of a run's log up to the first that reports a step beyond ``step`` (the exported weights')."""
    end = next((i for i, r in enumerate(log) if r.get("step", 0) > step), len(log))
    return log[:end]


def _change(key: str, old, new) -> str:
    if key in ARCH_CHANGES and new in ARCH_CHANGES[key]:
        return ARCH_CHANGES[key][new]
    if key == "layers":
        return f"grown from {old} to {new} joint blocks (new blocks inserted before the last as identities)"
    if key == "patch":
        return f"re-patched to tokens of {new} x {new} latent pixels (was {old} x {old})"
    if key == "pos_scale":
        return f"position table x {new} (was x {old})"
    if key == "text_pos_scale":
        return f"text position embeddings x {new} (was x {old})" + (", frozen" if new != 1 else ", trained")
    return f"{key} {old} -> {new}"


def release_sd3(work: str, out: str, eval_n: int = 100, oracle_n: int = 16, prior: tuple[str, ...] = ()) -> dict:
    t0 = time.time()
    out_p = Path(out)
    stage_export_sd3(TrainConfig(work=work), out_p)
    words = json.loads((EMBEDDED_MODELS["embedded"] / "attnseg.json").read_text())["words"]
    (out_p / "attnseg.json").write_text(
        json.dumps({"presets": PROFILE["presets"], "words": words, "why": PROFILE["why"]}, indent=1) + "\n"
    )
    pipe = load_pipeline(out_p.resolve(), device="cpu", dtype="float32")  # a path: never a model name
    scenes = Path(work) / "eval-scenes"
    if not (scenes / "classes.txt").exists():
        export_voc(scenes, n=max(eval_n, 200), seed=1)
    meas: dict = {}
    for key, pred, methods in (
        ("eval", AttnSegPredictor(pipe), METHODS),
        ("unet", AttnSegPredictor.from_pretrained("embedded", device="cpu"), UNET_METHODS),
    ):
        report = evaluate(pred, VOCDataset(scenes), methods, Path(work) / f"eval-{key}-{int(t0)}", limit=eval_n, progress=False)
        meas["eval_n"] = report["images"]
        # keyed by the method as asked ("cross"), each with the name it ran as ("cross-embedded-sd3": the preset)
        meas[key] = {}
        for asked in methods:
            spec = MethodSpec.parse(asked)
            ran = MethodSpec(spec.method, spec.preset or pred.default_presets.get(spec.method), spec.crf).key
            v = report["methods"][ran]
            meas[key][asked] = {"as": ran, "miou": v["miou"], "pixel_acc": v["pixel_acc"]}
    meas["oracle"] = oracle_rate(pipe, oracle_n, **SD3_CALL)
    grid(sample(pipe, GRID_PROMPTS, **SD3_CALL), GRID_PROMPTS).save(out_p / "samples.png")
    (out_p / "measurements.json").write_text(json.dumps(meas, indent=1) + "\n")
    write_card(work, out_p, meas, prior, pipe)
    meas["seconds"] = time.time() - t0
    return meas


def blocks_read(select: LayerSelect | tuple[LayerSelect, ...], inventory: list[LayerInfo]) -> str:
    """Which joint blocks (and heads) a preset's layer choice reads on this model, in words ("joint blocks 1 and 3",
    "head 1 of joint blocks 1 and 4 and head 0 of joint block 0")."""
    layers, heads = read_heads(select, inventory)

    def block(lay: LayerInfo) -> int:
        return int(lay.name.split(".")[1])

    def blocks(bs: list[int]) -> str:
        return f"joint block{'s' if len(bs) > 1 else ''} " + _and([str(b) for b in bs])

    if heads:  # each set of heads with the blocks it is read of, in the order the preset names them
        groups: dict[tuple[int, ...], list[int]] = {}
        for lay in layers:
            groups.setdefault(heads.get(lay.name, ()), []).append(block(lay))
        return _and(
            [
                (f"head{'s' if len(hs) > 1 else ''} {_and([str(h) for h in hs])} of " if hs else "every head of ") + blocks(bs)
                for hs, bs in groups.items()
            ]
        )
    every = sorted({block(lay) for lay in inventory})
    read = sorted({block(lay) for lay in layers})
    if read == every:
        return "every joint block"
    if read == every[-1:]:
        return "the last joint block"
    return blocks(read)


def measurements_md(meas: dict) -> str:
    """The card's measurement section: each method on the transformer beside the UNet model, and the oracle rate."""
    lines = [
        f"- Pseudo-mask mIoU on {meas['eval_n']} held-out scenes (`attnseg eval`, image-level labels from the ground truth,",
        "  background + 8 shapes; DiffSeg's segments are matched to the classes per image by the Hungarian algorithm), each",
        "  model with its own default presets (`attnseg.json`) and the papers' layer choices beside them:",
        "",
        "| method | this model: as | mIoU | pixel acc | UNet model (`embedded`): as | mIoU | pixel acc |",
        "|---|---|---|---|---|---|---|",
    ]
    unet = meas["unet"]
    for k in dict.fromkeys([*meas["eval"], *unet]):
        cells = [
            f"{r['as']} | {100 * r['miou']:.1f} | {100 * r['pixel_acc']:.1f}" if r else "- | - | -"
            for r in (meas["eval"].get(k), unet.get(k))
        ]
        lines.append(f"| {k} | {' | '.join(cells)} |")
    lines += [
        "",
        "- Generated images checked by the ShapesWorld oracle (colour found / object with the right shape / all objects",
        "  of the prompt), 50 flow steps at guidance 5:",
        "",
        "| objects in prompt | colour present | object present | all present |",
        "|---|---|---|---|",
    ]
    for k, v in meas["oracle"].items():
        lines.append(f"| {k} | {v['colour_present']:.2f} | {v['object_present']:.2f} | {v['all_objects_present']:.2f} |")
    return "\n".join(lines)


def write_card(work: str, out: Path, meas: dict, prior: tuple[str, ...] = (), pipe=None) -> None:
    """The model card (README.md) of the exported model in ``out``; ``pipe``: that model, when already loaded."""
    pipe = pipe if pipe is not None else load_pipeline(out, device="cpu", dtype="float32")
    meta = json.loads((out / "training.json").read_text())
    cfg = meta["train_config"]
    arch = SD3Arch(**meta["arch"])
    works = [*prior, work]
    logs = [read_log(w) for w in works]
    _, rows = run_history(works, last_step=meta["step"], logs=logs)
    released = first_logged(logs[0], "released_history") or {"hours": 0.0}
    logs[-1] = _until(logs[-1], meta["step"])
    sd3_log = [r for recs in logs for r in recs if r.get("stage") == "sd3"]
    losses = [r["loss"] for r in sd3_log if "loss" in r]
    hours = released["hours"] + sum(busy_seconds([r for r in log if r.get("stage") == "sd3"]) for log in logs) / 3600
    # The lineage goes into training.json too, so that a run started from this folder carries it on.
    meta["history"] = {"runs": rows, "hours": hours, "arch": meta["arch"]}
    (out / "training.json").write_text(json.dumps(meta, indent=1))
    tr = pipe.transformer.config
    cross = REGISTRY["cross"].presets[PROFILE["presets"]["cross"]]
    t2m = REGISTRY["t2m"].presets[PROFILE["presets"]["t2m"]]
    iseg = REGISTRY["iseg"].presets[PROFILE["presets"]["iseg"]]
    total_steps = rows[-1]["to"]
    inventory = joint_inventory(pipe.transformer)
    text = CARD.format(
        sd3_cross=100 * meas["eval"]["cross"]["miou"],
        sd3_t2m=100 * meas["eval"]["t2m"]["miou"],
        unet_cross=100 * meas["unet"]["cross"]["miou"],
        unet_t2m=100 * meas["unet"]["t2m"]["miou"],
        total_params=_params(pipe.transformer) + _params(pipe.vae) + _params(pipe.text_encoder) + _params(pipe.text_encoder_2),
        size_mb=sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 2**20,
        transformer_params=_params(pipe.transformer),
        layers=tr.num_layers,
        width=tr.num_attention_heads * tr.attention_head_dim,
        heads=tr.num_attention_heads,
        head_dim=tr.attention_head_dim,
        patch=tr.patch_size,
        tokens=tr.sample_size // tr.patch_size,
        latent=tr.sample_size,
        latent_channels=tr.in_channels,
        pooled_note="" if not arch.pooled else "; not in this model, whose pooled conditioning is on",
        mix_note="" if not arch.mix_text else "; not in this model, whose text stream is trained",
        pos_scale=arch.pos_scale,
        text_pos_note=""
        if arch.text_pos_scale == 1
        else f"; the text encoders' learned\n  position embeddings are scaled by {arch.text_pos_scale} and frozen",
        text_params=_params(pipe.text_encoder),
        text_layers=arch.text_layers,
        text_hidden=arch.text_hidden,
        vocab=len(pipe.tokenizer),
        scaling=pipe.vae.config.scaling_factor,
        shift=pipe.scheduler.config.shift,
        n_scenes=cfg["n_scenes"],
        batch=cfg["batch"],
        lr=cfg["lr"],
        warmup=cfg["warmup"],
        ema=cfg["ema_decay"],
        obj_w=cfg["object_weight"],
        total_steps=total_steps,
        samples=total_steps * cfg["batch"],
        loss=losses[-1] if losses else float("nan"),
        runs=history_table(rows),
        machine=f"{platform.machine()}, 2 cores, fp32, CPU only",
        hours=hours,
        date=time.strftime("%Y-%m-%d"),
        measurements=measurements_md(meas),
        cross_layers=blocks_read(cross.cross, inventory),
        cross_t=cross.timestep,
        cross_bg=cross.bg_threshold if cross.bg_threshold is not None else "of the paper's rule",
        t2m_cross=blocks_read(t2m.cross, inventory),
        t2m_self=blocks_read(t2m.self_layer, inventory),
        t2m_t=t2m.timestep,
        t2m_bg=t2m.bg_threshold if t2m.bg_threshold is not None else "of the paper's rule",
        t2m_iters=t2m.iters,
        iseg_cross=blocks_read(iseg.cross_layers, inventory),
        iseg_self=blocks_read(iseg.self_layer, inventory),
        iseg_t=iseg.timestep,
        iseg_bg=iseg.bg_threshold if iseg.bg_threshold is not None else "of the paper's rule",
        iseg_iters=iseg.iters,
    )
    (out / "README.md").write_text(text)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", default=str(EMBEDDED_MODELS["embedded-sd3"]))
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--oracle-n", type=int, default=16)
    p.add_argument("--prior", nargs="*", default=[], help="work folders of the runs this one continued from, oldest first")
    p.add_argument("--card-only", action="store_true", help="rewrite the card of OUT from its measurements.json, nothing else")
    a = p.parse_args(argv)
    if a.card_only:
        out = Path(a.out)
        write_card(a.work, out, json.loads((out / "measurements.json").read_text()), tuple(a.prior))
        return
    meas = release_sd3(a.work, a.out, a.eval_n, a.oracle_n, prior=tuple(a.prior))
    print(json.dumps(meas, indent=1))


if __name__ == "__main__":
    main()
