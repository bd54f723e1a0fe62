"""Export a checkpoint as the shipped embedded model, measure it and write its model card.

    python -m attnseg.train.embedded.release --work /work/toy-train --out src/attnseg/assets/embedded \\
        --docs docs --eval-n 200

Steps: export the EMA weights (fp16 safetensors) -> localisation diagnostics -> ``attnseg eval``
of cross / t2m / iseg on held-out ShapesWorld scenes (seed 1, never used in training) -> oracle
rate of generated images -> sample grid -> model card (README.md beside the weights).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

from attnseg.diffusion.layers import layer_inventory
from attnseg.diffusion.loading import EMBEDDED_DIR, load_pipeline
from attnseg.io.datasets import VOCDataset
from attnseg.jobs.evaluate import evaluate
from attnseg.methods.registry import REGISTRY
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import export_voc
from attnseg.train.embedded.diagnose import localisation_report, self_attention_report
from attnseg.train.embedded.pairs import same_shape_report
from attnseg.train.embedded.report import GRID_PROMPTS, grid, oracle_rate, sample
from attnseg.train.embedded.train import TrainConfig, data_look_prob, first_logged, read_log, stage_export

CARD = """# attnseg embedded model (ShapesWorld, Stable Diffusion architecture)

A small text-to-image latent diffusion model with the components of Stable Diffusion 1.x (layout below),
trained from scratch by this project on ShapesWorld so that attnseg runs and is measured with no
download. It loads with `StableDiffusionPipeline.from_pretrained(this_folder)`.

## Architecture ({total_params:.2f} M parameters, {size_mb:.1f} MB in fp16)
- AutoencoderKL, channels {vae_channels}, 4x down-sampling: 64x64 RGB -> 16x16x4 latents; scaling factor {scaling:.4f}.
- UNet2DConditionModel ({unet_params:.2f} M), channels {unet_channels}, {heads} heads: {unet_layout}.
- CLIPTextModel ({text_params:.2f} M), {text_layers} layers, width {text_hidden}; CLIPTokenizer with the project's own BPE
  vocabulary in CLIP's format ({vocab} tokens, `vocab.json` + `merges.txt`), 77 tokens.
- DDIM scheduler with Stable Diffusion's scaled-linear betas (0.00085-0.012, T = 1000).

## Data
ShapesWorld (`attnseg.shapes.world`), world seed 0, {n_scenes} scenes of 64x64 px: 1-3 objects of 8 shapes
(circle, square, triangle, star, hexagon, heart, cross, ring) in 8 colours on calm backgrounds (gradients,
soft blobs, low-contrast stripes or checks, mild noise), with occlusion and same-shape pairs. Captions are drawn
anew at every step from 9 templates, naming each object by colour and shape ({colour_pct:.0f}%) or by shape alone; 10% of
captions are empty (for classifier-free guidance). Evaluation scenes use world seed 1 and are never seen in training.

## Training (`attnseg train-toy all`)
- VAE: {vae_steps} steps, batch 32, L1 + 0.5 MSE + 1e-5 KL; held-out batch PSNR {vae_psnr:.1f} dB.
- UNet and text encoder jointly, on latents cached once: {unet_steps} steps of batch {batch} ({samples:,} samples),
  AdamW lr {lr}, epsilon prediction, min-SNR-{gamma} weighting, EMA {ema} (the shipped weights are the EMA),
  final training loss {loss:.4f}.
- **Use of the masks**: the denoising loss of a pixel is weighted by 1 + {obj_w} x (object fraction of its latent cell),
  so that the objects, where the words matter, carry the loss. Nothing else uses the masks: the attention is never
  trained on them (no attention loss, no mask-derived targets).
{history}- Machine: {machine}; {hours:.1f} h of compute wall time in total (data, VAE, encoding, UNet).

## Measured ({date})
{measurements}

## What it can and cannot do
- It draws coloured blobs and shapes for prompts of the ShapesWorld vocabulary; it knows nothing else (other words
  tokenise into sub-word pieces it never saw). Samples: `docs/samples.png`.
- Its attention localises colour and shape words to the degree given above; it is a test bed for the methods, not
  a general segmenter. Users with real Stable Diffusion weights pass `--model`.
- Resolution is fixed at 64x64; other sizes are resized.
{presets}
"""


PRESETS_TEXT = """- `attnseg.json` beside this card makes `cross:embedded`, `t2m:embedded`, `iseg:embedded` and `diffseg:embedded` its
  default presets. The first three take background thresholds chosen on validation scenes (cross {cross_bg}, T2M {t2m_bg} in the
  rule (2 thr - max)^2, whose thr 0.5 is the papers' (1 - max)^2; iSeg a constant {iseg_bg}), as the papers set theirs
  per dataset: ShapesWorld's objects are small, and the papers' VOC rule lets the label maps spread over the
  background (measured above: `cross:default`, `*:embedded-paper-bg`). The baseline averages the decoder's cross
  layers (DAAM averages all; this model's 4-px mid block is inverted), also chosen on validation scenes. The papers'
  self-attention layer maps onto this model's last decoder layer, which attends almost uniformly (table above), so
  the T2M and iSeg presets read object-coherent 16-px layers (T2M the first decoder layer {t2m_layer},
  iSeg the encoder layer {iseg_layer}, with {iseg_iters} iteration instead of {iseg_paper_iters}), and DiffSeg merges with a KL
  threshold of {diffseg_kl} instead of the paper's {diffseg_paper_kl}, which merges every scene of this model into one segment; all chosen on
  validation scenes, docs/EMBEDDED-MODEL-TRAINING.md. Pass a preset to use another."""
"""The card's paragraph on the model's default presets; every number in it is read from the preset configs."""


def presets_text(unet) -> str:
    """:data:`PRESETS_TEXT` filled from the "embedded" presets of the registry and the layers they pick in ``unet``."""
    emb = {m: REGISTRY[m].presets["embedded"] for m in ("cross", "t2m", "iseg", "diffseg")}
    paper = {m: REGISTRY[m].config() for m in ("iseg", "diffseg")}
    return PRESETS_TEXT.format(
        cross_bg=emb["cross"].bg_threshold,
        t2m_bg=emb["t2m"].bg_threshold,
        iseg_bg=emb["iseg"].bg_threshold,
        t2m_layer=_block_name(emb["t2m"].self_layer, unet),
        iseg_layer=_block_name(emb["iseg"].self_layer, unet),
        iseg_iters=emb["iseg"].iters,
        iseg_paper_iters=paper["iseg"].iters,
        diffseg_kl=emb["diffseg"].kl_threshold,
        diffseg_paper_kl=paper["diffseg"].kl_threshold,
    )


def unet_layout_text(down_block_types: list[str], mid_block_type: str | None, latent_side: int) -> str:
    """The UNet's blocks in words, e.g. ``CrossAttnDown (16 px), Down (8 px), cross-attention mid block (8 px)``."""
    sides = [latent_side // 2**i for i in range(len(down_block_types))]
    blocks = [f"{t.removesuffix('Block2D')} ({px} px)" for t, px in zip(down_block_types, sides, strict=True)]
    cross_px = [px for t, px in zip(down_block_types, sides, strict=True) if t.startswith("CrossAttn")]
    mid_cross = mid_block_type is not None and "CrossAttn" in mid_block_type
    if mid_block_type is not None:
        blocks.append(f"{'cross-attention' if mid_cross else 'plain'} mid block ({sides[-1]} px)")
    where = [_and([str(px) for px in cross_px]) + " px"] if cross_px else []
    where += ["in the mid block"] if mid_cross else []
    attention = f"self- and cross-attention at {' and '.join(where)}" if where else "no cross-attention"
    return ", ".join(blocks) + f", mirrored up blocks; {attention}"


def _block_name(select, unet) -> str:
    """The attention block (``up_blocks.2.attentions.0``) of the one layer that ``select`` picks in ``unet``."""
    (layer,) = select.resolve(layer_inventory(unet))
    return layer.name.split(".transformer_blocks")[0]


def lineage_log(logs: list[list[dict]]) -> list[dict]:
    """The training log of one model, from the logs of the work folders it came from (oldest first).

    A folder whose UNet did not continue another folder's checkpoint (no ``init_ckpt`` record) started a lineage,
    from scratch or from a released folder (whose history its own log carries): the UNet and diagnostics records of
    the folders before it are not this model's history and are dropped; their data, VAE and encoding records (reused
    through the folder's links) stay.
    """
    origin = unet_origin(logs)
    return [r for i, recs in enumerate(logs) for r in recs if i >= origin or r.get("stage") not in ("unet", "diag")]


def unet_origin(logs: list[list[dict]]) -> int:
    """Index of the last folder (of the logs, oldest first) whose UNet did not continue another folder's checkpoint
    (no ``init_ckpt`` record): it started from scratch, or warm from a released pipeline folder (``init_from``), whose
    history its log carries (``released_history``). Where this model's UNet lineage begins (0 when none did)."""

    def starts(recs: list[dict]) -> bool:
        unet = [r for r in recs if r.get("stage") == "unet"]
        return bool(unet) and not any("init_ckpt" in r for r in unet)

    return max((i for i, recs in enumerate(logs) if starts(recs)), default=0)


def caption_history(runs: list[tuple[int, float]]) -> str:
    """A card line when the caption mix changed between the runs of a lineage: ``runs`` = (last step, colour_prob)
    of each run, oldest first; empty when it never changed."""
    if len({p for _, p in runs}) <= 1:
        return ""
    return "- Caption mix by phase (share of objects named by colour and shape): " + _phases(runs, 0) + ".\n"


def _phases(runs: list[tuple[int, float]], start: int) -> str:
    """The phases "P% over steps A-B; ..." of runs (last step, share), oldest first, from step ``start``; consecutive
    runs of one share merged."""
    parts = []
    for i, (end, p) in enumerate(runs):
        if i + 1 < len(runs) and runs[i + 1][1] == p:
            continue
        parts.append(f"{100 * p:.0f}% over steps {start:,}-{end:,}")
        start = end
    return "; ".join(parts)


def looks_text(runs: list[dict]) -> str:
    """The card's line on the training data's looks (empty without them). ``runs``: each run of the lineage, oldest
    first, as {"step": its last step, "look_prob": its data's share of objects with a look, "look_word_prob": how often
    its captions named a look}; the looks start with the first run whose data had them."""
    first = next((i for i, r in enumerate(runs) if r["look_prob"] > 0), None)
    if first is None:
        return ""
    start = runs[first - 1]["step"] if first > 0 else 0
    share = f"{100 * runs[-1]['look_prob']:.0f}%"
    when = f"from step {start:,} (a run continued from there on new data), {share}" if start else share
    words = [(r["step"], r["look_word_prob"]) for r in runs[first:]]
    named = (
        "that no caption names"
        if all(p == 0 for _, p in words)
        else 'that captions name ("a red striped circle") for a share of such objects: ' + _phases(words, start)
    )
    return (
        f"- Looks: {when} of the objects wear one of ShapesWorld's five looks (a grey pattern: striped, dotted, "
        f"two-tone, checkered or rimmed)\n  {named}, so that a personal concept of such a look can be "
        "learned (`attnseg personalize`).\n"
    )


def _run_summaries(works: list[str]) -> list[dict]:
    """Step, caption mix, looks (the data's share, how often captions named them) and learning-rate decay of the
    checkpoint of each work folder that has one, oldest first (one memory-mapped read each)."""
    import torch

    runs = []
    for w in works:
        ck = Path(w) / "ckpt.pt"
        if ck.exists():
            state = torch.load(ck, weights_only=True, mmap=True)
            cfg = state["config"]
            runs.append(
                {
                    "step": int(state["step"]),
                    "colour_prob": float(cfg.get("colour_prob", TrainConfig.colour_prob)),
                    "look_prob": data_look_prob(w) or 0.0,
                    "look_word_prob": float(cfg.get("look_word_prob", 0.0)),
                    "decay": (state.get("decay_from"), int(cfg.get("lr_decay_steps", 0))),
                }
            )
    return runs


def lineage_history(released: dict | None, runs: list[dict], log: list[dict]) -> dict:
    """The history of a UNet model, as its card states it and its ``training.json`` keeps it for the runs that
    continue from it: ``released``, the history of the released model the lineage started from (None: it started
    from scratch); ``runs``, the lineage's own runs (:func:`_run_summaries`); ``log``, its records
    (:func:`lineage_log`). The runs follow the released ones; compute hours add up; the step from which the text
    encoder had no transformer layers (the start that dropped them) and the VAE's steps and PSNR (the run that trained
    one) are the lineage's own when it has them, else the released model's."""
    released = released or {}
    dropped = [r for r in log if "init_ckpt" in r and r.get("dropped")]
    vae = [r for r in log if r.get("stage") == "vae" and "psnr" in r]
    return {
        "runs": [*released.get("runs", []), *runs],
        "hours": released.get("hours", 0.0) + busy_seconds(log) / 3600,
        "text_dropped_at": dropped[-1]["step"] if dropped else released.get("text_dropped_at"),
        "vae": {"steps": vae[-1]["step"] + 1, "psnr": vae[-1]["psnr"]} if vae else released.get("vae"),
    }


def busy_seconds(log: list[dict]) -> float:
    """Compute time of a log: the sum over processes of their last ``elapsed`` (idle time between sessions excluded).

    ``elapsed`` counts from the start of each process and stage, so a drop marks a new process.
    """
    busy, last = 0.0, 0.0
    for r in log:
        e = r.get("elapsed")
        if e is None:
            continue
        if e < last:
            busy += last
        last = e
    return busy + last


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _params(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def release(
    work: str, out: str, docs: str, eval_n: int = 200, oracle_n: int = 24, diag_n: int = 64, prior: tuple[str, ...] = ()
) -> dict:

    t0 = time.time()
    out_p, docs_p = Path(out), Path(docs)
    stage_export(TrainConfig(work=work), out_p)
    pipe = load_pipeline(out_p, device="cpu", dtype="float32")
    meas: dict = {"eval_n": eval_n}
    meas["localisation"] = localisation_report(pipe, diag_n)
    meas["self_attention"] = self_attention_report(pipe, min(diag_n, 32))
    scenes = Path(work) / "eval-scenes"
    if not (scenes / "classes.txt").exists():
        export_voc(scenes, n=eval_n, seed=1)
    rep_dir = Path(work) / f"eval-report-{int(t0)}"
    pred = AttnSegPredictor(pipe)
    report = evaluate(
        pred,
        VOCDataset(scenes),
        # "cross"/"t2m"/"iseg" take the model's own presets (its attnseg.json: "embedded"); "cross:default" and the
        # "embedded-paper-bg" presets are the papers' background rule, "t2m:no-bg-words" and "iseg:paper" the papers'
        # layer mappings and "iseg:embedded-n8" the paper's iteration count, kept to show what each choice does;
        # "diffseg" is the model's preset and "diffseg:default" the paper's.
        [
            "cross",
            "cross:default",
            "t2m",
            "t2m+crf",
            "t2m:embedded-paper-bg",
            "t2m:no-bg-words",
            "iseg",
            "iseg+crf",
            "iseg:embedded-paper-bg",
            "iseg:embedded-n8",
            "iseg:embedded-no-cat",
            "iseg:paper",
            "diffseg",
            "diffseg:default",
        ],
        rep_dir,
        progress=False,
    )
    meas["eval"] = {
        k: {"miou": v["miou"], "pixel_acc": v["pixel_acc"], "per_class": v["per_class"]} for k, v in report["methods"].items()
    }

    meas["same_shape"] = same_shape_report(pred, 50)
    meas["oracle"] = oracle_rate(pipe, oracle_n)
    docs_p.mkdir(parents=True, exist_ok=True)
    ims = sample(pipe, GRID_PROMPTS)
    grid(ims, GRID_PROMPTS).save(docs_p / "samples.png")
    (docs_p / "embedded-model-measurements.json").write_text(json.dumps(meas, indent=1))
    for f in ("per_class.png", "qualitative.png", "report.md"):
        (docs_p / f"embedded-eval-{f}").write_bytes((rep_dir / f).read_bytes())
    write_card(work, out_p, meas, prior)
    meas["seconds"] = time.time() - t0
    return meas


def _measurements_md(meas: dict) -> str:
    ev = meas["eval"]
    lines = [
        f"- Pseudo-mask mIoU on {meas.get('eval_n', 200)} held-out scenes (image-level labels from the ground truth, background + 8 shapes; "
        "`attnseg eval`, details in docs/BENCHMARKS.md; DiffSeg is unsupervised, its segments are matched to the classes "
        "per image by the Hungarian algorithm, which the label-driven methods do not get):",
        "",
        "| method | mIoU | pixel acc |",
        "|---|---|---|",
    ]
    for k, v in ev.items():
        lines.append(f"| {k} | {100 * v['miou']:.1f} | {100 * v['pixel_acc']:.1f} |")
    loc = meas["localisation"]
    best = sorted(loc.items(), key=lambda kv: -kv[1]["shape_auc"])[:4]
    lines += [
        "",
        "- Localisation of words by cross-attention layer (pointing accuracy of the shape word's argmax, AUC of object",
        "  pixels for the shape word, the colour word and the article 'a' as a control; 0.5 = chance), best layers:",
        "",
        "| t / layer | shape pointing | shape AUC | colour AUC | 'a' AUC |",
        "|---|---|---|---|---|",
    ]
    for k, v in best:
        lines.append(f"| {k} | {v['shape_point']:.2f} | {v['shape_auc']:.2f} | {v['colour_auc']:.2f} | {v['article_auc']:.2f} |")
    if "self_attention" in meas:
        lines += [
            "",
            "- Self-attention, what T2M, iSeg and DiffSeg propagate with: share of an object cell's attention on its own object,",
            "  on other objects and on the background, and lift = own share / the object's area share (1 = uniform), t = 150:",
            "",
            "| layer | own | other objects | background | lift |",
            "|---|---|---|---|---|",
        ]
        for k, v in meas["self_attention"].items():
            if k.startswith("t150/"):
                lines.append(f"| {k[5:]} | {v['own']:.2f} | {v['other']:.2f} | {v['bg']:.2f} | {v['lift']:.1f} |")
    if "same_shape" in meas:
        lines += [
            "",
            "- Two objects of one shape told apart by colour (50 held-out scenes, labels '<colour> <shape>'; IoU of each",
            "  object with its own phrase's mask vs with the other phrase's; `attnseg.train.embedded.pairs`):",
            "",
            "| method | own IoU | swapped IoU | own higher |",
            "|---|---|---|---|",
        ]
        for k, v in meas["same_shape"].items():
            lines.append(f"| {k} | {100 * v['own_iou']:.1f} | {100 * v['swapped_iou']:.1f} | {100 * v['own_higher']:.0f}% |")
    o = meas["oracle"]
    lines += [
        "",
        "- Generated images checked by the ShapesWorld oracle (colour found / object with the right shape / all objects "
        "of the prompt; the oracle finds 91% of the objects of real held-out scenes):",
        "",
        "| objects in prompt | colour present | object present | all present |",
        "|---|---|---|---|",
    ]
    for k, v in o.items():
        lines.append(f"| {k} | {v['colour_present']:.2f} | {v['object_present']:.2f} | {v['all_objects_present']:.2f} |")
    return "\n".join(lines)


def _lr_text(cfg: dict, decays: Sequence[Sequence[int | None]]) -> str:
    """The learning rate schedule in words, from a training config and the (first step, length) of each cosine
    decay of the lineage, oldest first; a decay of length 0 or with no first step did not happen. Each decay after
    the first began in a new run, with a fresh optimizer that warmed up again."""
    spans = [f"{a:,}-{a + n:,}" for a, n in decays if a is not None and n > 0]
    if not spans:
        return f"{cfg['lr']}"

    floor = cfg["lr"] * cfg.get("lr_floor", TrainConfig.lr_floor)
    text = f"{cfg['lr']}, cosine-decayed to {floor:.2g} over steps {spans[0]}"
    if len(spans) > 1:
        text += f", then re-warmed and decayed again over steps {_and(spans[1:])}"
    return text


def write_card(work: str, out: Path, meas: dict, prior: tuple[str, ...] = ()) -> None:
    from transformers import CLIPTextModel

    pipe = load_pipeline(out, device="cpu", dtype="float32")
    meta = json.loads((out / "training.json").read_text())
    cfg, arch = meta["train_config"], meta["arch"]
    works = [*prior, work]  # the runs this one continued from, oldest first
    logs = [read_log(w) for w in works]
    log = lineage_log(logs)
    hist = lineage_history(first_logged(log, "released_history"), _run_summaries(works[unet_origin(logs) :]), log)
    # The lineage goes into training.json too, so that a run started from this folder carries it on.
    meta["history"] = hist
    (out / "training.json").write_text(json.dumps(meta, indent=1))
    runs = hist["runs"]
    history = ""
    if arch["text_layers"] == 0 and hist["text_dropped_at"] is not None:
        history = (
            f"- History: up to step {hist['text_dropped_at']:,} the text encoder had 3 transformer layers, trained jointly; from then on\n"
            "  it has 0 (its token and position embeddings and final norm kept), so each token's output is its own embedding and\n"
            "  the start and padding outputs are constants (why: docs/EMBEDDED-MODEL-TRAINING.md).\n"
        )
    elif arch["text_layers"] == 0:
        history = (
            "- The text encoder has 0 transformer layers (token and position embeddings and the final norm, trained jointly),\n"
            "  so each token's output is its own embedding (why: docs/EMBEDDED-MODEL-TRAINING.md).\n"
        )
    history += caption_history([(r["step"], r["colour_prob"]) for r in runs])
    history += looks_text(runs)
    unet_log = [r for r in log if r.get("stage") == "unet" and "loss" in r]
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 2**20
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    text = CARD.format(
        total_params=_params(pipe.unet) + _params(pipe.vae) + _params(pipe.text_encoder),
        size_mb=size,
        vae_channels="/".join(map(str, arch["vae_channels"])),
        scaling=pipe.vae.config.scaling_factor,
        unet_params=_params(pipe.unet),
        unet_channels="/".join(map(str, arch["unet_channels"])),
        heads=arch["unet_heads"],
        presets=presets_text(pipe.unet),
        unet_layout=unet_layout_text(
            list(pipe.unet.config.down_block_types), pipe.unet.config.mid_block_type, pipe.unet.config.sample_size
        ),
        text_params=_params(pipe.text_encoder),
        text_layers=arch["text_layers"],
        text_hidden=arch["text_hidden"],
        vocab=len(pipe.tokenizer),
        n_scenes=cfg["n_scenes"],
        vae_steps=hist["vae"]["steps"] if hist["vae"] else cfg["vae_steps"],  # what ran, not a later default
        vae_psnr=hist["vae"]["psnr"] if hist["vae"] else float("nan"),
        unet_steps=meta["step"],
        batch=cfg["batch"],
        samples=meta["step"] * cfg["batch"],
        lr=_lr_text(cfg, [r["decay"] for r in runs]),  # the released folder always has its checkpoint
        gamma=cfg["min_snr_gamma"],
        ema=cfg["ema_decay"],
        loss=unet_log[-1]["loss"] if unet_log else float("nan"),
        obj_w=cfg["object_weight"],
        colour_pct=100 * cfg.get("colour_prob", 0.8),
        machine=f"{platform.machine()}, 2 cores, fp32, CPU only",
        hours=hist["hours"],
        date=time.strftime("%Y-%m-%d"),
        measurements=_measurements_md(meas),
        history=history,
    )
    (out / "README.md").write_text(text)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/work/toy-train")
    p.add_argument("--out", default=str(EMBEDDED_DIR))
    p.add_argument("--docs", default="docs")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--oracle-n", type=int, default=24)
    p.add_argument("--prior", nargs="*", default=[], help="work folders of earlier runs this one continued from (their logs)")
    a = p.parse_args(argv)
    meas = release(a.work, a.out, a.docs, a.eval_n, a.oracle_n, prior=tuple(a.prior))
    print(json.dumps({k: v for k, v in meas.items() if k != "localisation"}, indent=1))


if __name__ == "__main__":
    main()
