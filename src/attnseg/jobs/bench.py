"""``attnseg bench``: speed and memory of every method, side by side with the bare model cost.

The *bare cost* is what any attention reader must pay: the VAE encoding of the image and one
UNet forward with diffusers' default processors. Each method is timed in the same run, so the
ratios are robust to a noisy machine; absolute seconds are not.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from attnseg.diffusion.capture import capture_attention
from attnseg.diffusion.layers import layer_inventory
from attnseg.generator import generate_with_masks
from attnseg.methods.base import CapturePlan
from attnseg.methods.registry import get_method
from attnseg.ops.maps import propagate
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.world import make_scene


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (``VmHWM``, ``VmRSS``) in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    v = _proc_status_mb("VmHWM")
    if v is not None:
        return v
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    v = _proc_status_mb("VmRSS")
    return float("nan") if v is None else v


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


WARMUP = 3
"""Untimed runs of the bare forward and of every method before any timing."""


def bench_methods(predictor, methods: Sequence[str], repeats: int = 5, batch: int = 8, labels=("circle", "star")) -> dict:
    """Per method: seconds per image (one draw), images/s batched, peak RSS, ratio to the bare cost."""
    bb = predictor.backbone
    img = make_scene(12345, 0).image
    images = [make_scene(12345, i).image for i in range(batch)]
    text = bb.encode_prompts(["a photo including circle and star."])
    text_batch = bb.encode_prompts(["a photo including circle and star."] * batch)

    def bare():
        bb.forward(predictor.encode_images([img]), 150, text)

    def bare_batch():
        bb.forward(predictor.encode_images(images), 150, text_batch)

    def one(m: str) -> None:
        predictor.segment_batch([img], [list(labels)], method=m, draws=1)

    def many(m: str) -> None:
        predictor.segment_batch(images, [list(labels)] * len(images), method=m, draws=1)

    # Warm-up of everything that is timed: the first calls pay for thread pools, allocations and caches.
    for _ in range(WARMUP):
        bare()
        for m in methods:
            one(m)
    gc.collect()
    _reset_peak_rss()
    bare_s, _ = timed(bare, repeats, warmup=0)
    bare_rss = peak_rss_mb()
    bare_b, _ = timed(bare_batch, max(1, repeats // 2))
    out = {"bare": {"seconds_per_image": bare_s, "images_per_second_batched": batch / bare_b, "peak_rss_mb": bare_rss}}
    for m in methods:
        preset = predictor.default_presets.get(m)  # what a call naming no preset runs; named in the key
        gc.collect()
        _reset_peak_rss()
        one(m)
        rss = peak_rss_mb()
        # Method and bare cost alternate, so that drift of a noisy machine hits both alike.
        pairs = []
        for _ in range(repeats):
            s_m, _ = timed(lambda m=m: one(m), 1, warmup=0)
            s_b, _ = timed(bare, 1, warmup=0)
            pairs.append((s_m, s_b))
        sb, _ = timed(lambda m=m: many(m), max(1, repeats // 2))
        out[f"{m}:{preset}" if preset else m] = {
            "seconds_per_image": statistics.median(p[0] for p in pairs),
            "images_per_second_batched": batch / sb,
            "peak_rss_mb": rss,
            "bare_seconds_same_window": statistics.median(p[1] for p in pairs),
            "ratio_to_bare": statistics.median(p[0] / p[1] for p in pairs),
        }
    return out


def bench_refinement(p: int = 4096, k: int = 3, iters: Sequence[int] = (1, 2, 4, 8, 16), repeats: int = 7) -> dict:
    """Time of the refinement (repeated matrix-vector products) against the number of iterations."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand((1, p, p), generator=g)
    a = a / a.sum(-1, keepdim=True)
    c = torch.rand((1, p, k), generator=g)
    times = {}
    for n in iters:
        _, runs = timed(lambda n=n: propagate(a, c, n), repeats)
        times[n] = min(runs)  # the least disturbed run of deterministic CPU work
    xs = np.array(list(times), float)
    ys = np.array(list(times.values()))
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (slope * xs + intercept)
    r2 = 1 - (resid**2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-30)
    return {
        "pixels": p,
        "seconds": {str(n): v for n, v in times.items()},
        "linear_fit_r2": float(r2),
        "seconds_per_iter": float(slope),
    }


def bench_generation(backbone, methods: Sequence[str] = ("ca", "ca-sa", "seediff"), steps: int = 20, repeats: int = 3) -> dict:
    """Generation with capture (and the method's masks) against plain generation, same prompts and seeds."""
    prompts, labels = ["a photo of a red circle"], [["circle"]]

    def run(method: str, capture: bool):
        gens = [torch.Generator().manual_seed(0)]
        generate_with_masks(backbone, prompts, labels, method=method, generators=gens, capture=capture, steps=steps)

    out = {}
    for m in methods:
        plain, _ = timed(lambda m=m: run(m, False), repeats)
        cap, _ = timed(lambda m=m: run(m, True), repeats)
        out[m] = {"plain_seconds": plain, "capture_seconds": cap, "ratio": cap / plain, "steps": steps}
    peer = bench_daam(backbone.pipe, prompts[0], labels[0][0], steps, repeats)
    if peer is not None:
        out["daam (peer)"] = peer
    return out


def bench_daam(pipe, prompt: str, word: str, steps: int, repeats: int) -> dict | None:
    """The ``daam`` package's trace + word heat map on the same pipeline, when it is installed.

    daam sizes its maps for 512/768-px models: on another size its factors are 6/12/24, which are
    passed explicitly so that it records every layer.
    """
    try:
        from daam import trace
    except ImportError:
        return None
    res = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def plain():
        pipe(prompt, num_inference_steps=steps, height=res, width=res, generator=torch.Generator().manual_seed(0))

    def traced():
        with trace(pipe) as tc:
            pipe(prompt, num_inference_steps=steps, height=res, width=res, generator=torch.Generator().manual_seed(0))
            factors = None if res in (512, 768, 1024) else {3, 6, 12, 24, 48}
            tc.compute_global_heat_map(factors=factors).compute_word_heat_map(word)

    p, _ = timed(plain, repeats)
    t, _ = timed(traced, repeats)
    return {"plain_seconds": p, "capture_seconds": t, "ratio": t / p, "steps": steps}


SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


@torch.inference_mode()
def bench_real_size(methods: Sequence[str] = ("t2m", "iseg"), dtype: torch.dtype = torch.float32) -> dict:
    """SD 1.5-shaped UNet (random weights) at 512 px: peak memory of capture against a plain forward."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(dtype).eval()
    z = torch.randn((1, 4, 64, 64), dtype=dtype)
    emb = torch.randn((1, 77, 768), dtype=dtype)
    t = torch.tensor([150])

    def forward(plan: CapturePlan | None):
        if plan is None:
            return unet(z, t, encoder_hidden_states=emb)
        ks = _cat_cross(plan, emb.shape[1])
        with capture_attention(unet, plan.names, per_head=plan.per_head, key_scale=ks, scale_values=plan.scale_values) as store:
            unet(z, t, encoder_hidden_states=emb)
        return store

    inv = layer_inventory(unet)
    return _capture_costs(forward, {m: get_method(m).plan(inv, 64) for m in methods})


def _cat_cross(plan: CapturePlan, n_tokens: int) -> torch.Tensor | None:
    """A bench forward's Cat-Cross factors (iSeg): the plan's gamma on one token, the second of the text (the first
    word after CLIP's start token; on Flux's T5 stream, which has none, the second word), as a one-word label has;
    None when the plan scales no keys."""
    if plan.key_scale_gamma is None:
        return None
    ks = torch.ones(n_tokens)
    ks[1] = plan.key_scale_gamma
    return ks


def _capture_costs(forward: Callable, plans: dict) -> dict:
    """One plain forward, then one per plan with its layers captured: seconds, peak memory, captured MB and their
    ratios to the plain forward. ``forward(plan)`` runs the model as the plan says (its layers captured, its Cat-Cross
    applied; None: plain) and returns the store."""
    gc.collect()
    base = rss_mb()
    _reset_peak_rss()
    t0 = time.perf_counter()
    forward(None)
    plain_s, plain_peak = time.perf_counter() - t0, peak_rss_mb()
    out = {"weights_rss_mb": base, "plain": {"peak_rss_mb": plain_peak, "seconds": plain_s}}
    for key, plan in plans.items():
        gc.collect()
        _reset_peak_rss()
        t0 = time.perf_counter()
        store = forward(plan)
        s, peak = time.perf_counter() - t0, peak_rss_mb()
        kept = sum(v.numel() * v.element_size() for v in store.sums.values()) / 2**20
        del store
        out[key] = {
            "layers": len(plan.names),
            "peak_rss_mb": peak,
            "seconds": s,
            "captured_mb": kept,
            "peak_ratio_total": peak / plain_peak,
            "peak_ratio_above_weights": (peak - base) / max(plain_peak - base, 1e-6),
            "time_ratio": s / plain_s,
        }
    return out


SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
"""stabilityai/stable-diffusion-xl-base-1.0's UNet config."""
SD3_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
"""stabilityai/stable-diffusion-3-medium-diffusers' transformer config."""
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""black-forest-labs/FLUX.1-dev's transformer config (12B parameters: benchmarked with fewer blocks, below)."""
FLUX_BLOCKS = (2, 4)
"""Double- and single-stream blocks of the Flux-shaped benchmark model: FLUX.1's width and heads, 6 of its 57 blocks
(all 57 in fp32 need 48 GB); capture's cost is per block, so ratios carry over, absolute seconds do not."""


def _family_backbone(family: str, dtype: torch.dtype):
    """A backbone over a random-weight denoiser of the family's published config, and one forward's inputs at the
    native resolution (latents, text states). The pipeline is a stand-in holding the denoiser alone: the text
    encoders and VAE are not part of what capture costs."""
    from types import SimpleNamespace

    from attnseg.diffusion.backbone import TextStates

    torch.manual_seed(0)
    if family == "sdxl":
        from diffusers import UNet2DConditionModel

        from attnseg.diffusion.unet import SDXLBackbone

        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype).eval()
        bb = SDXLBackbone(SimpleNamespace(unet=unet, vae_scale_factor=8), "sdxl-shaped")
        text = TextStates(torch.randn((1, 77, 2048), dtype=dtype), {"text_embeds": torch.randn((1, 1280), dtype=dtype)})
        return bb, torch.randn((1, 4, 128, 128), dtype=dtype), text
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        from attnseg.diffusion.sd3 import SD3Backbone

        tr = SD3Transformer2DModel(**SD3_TRANSFORMER).to(dtype).eval()
        bb = SD3Backbone(SimpleNamespace(transformer=tr, vae_scale_factor=8, text_encoder_3=object()), "sd3-shaped")
        text = TextStates(
            torch.randn((1, 77 + 256, 4096), dtype=dtype), {"pooled_projections": torch.randn((1, 2048), dtype=dtype)}
        )
        return bb, torch.randn((1, 16, 128, 128), dtype=dtype), text
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel

        from attnseg.diffusion.flux import FluxBackbone

        cfg = {**FLUX_TRANSFORMER, "num_layers": FLUX_BLOCKS[0], "num_single_layers": FLUX_BLOCKS[1]}
        tr = FluxTransformer2DModel(**cfg).to(dtype).eval()
        pipe = SimpleNamespace(
            transformer=tr,
            vae=SimpleNamespace(config=SimpleNamespace(sample_size=1024, latent_channels=16)),
            vae_scale_factor=8,
            default_sample_size=128,
            text_encoder_2=object(),
            tokenizer_2=SimpleNamespace(model_max_length=512),
            _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids,
            _pack_latents=FluxPipeline._pack_latents,
        )
        bb = FluxBackbone(pipe, "flux-shaped")
        text = TextStates(torch.randn((1, 512, 4096), dtype=dtype), {"pooled_projections": torch.randn((1, 768), dtype=dtype)})
        return bb, torch.randn((1, 16, 128, 128), dtype=dtype), text
    raise ValueError(f"unknown family {family!r}: sdxl, sd3 or flux")


FAMILY_METHODS = {
    "sdxl": ("cross", "t2m", "iseg"),
    "sd3": ("cross:default", "t2m:mmdit", "iseg:mmdit"),
    "flux": ("cross:default", "t2m:mmdit", "iseg:mmdit"),
}
"""What each family's row captures: the methods whose layers it has, with their presets for it."""


@torch.inference_mode()
def bench_families(families: Sequence[str] = ("sdxl", "sd3", "flux"), dtype: torch.dtype = torch.float32) -> dict:
    """Capture at each family's native resolution (1024 px) against a plain forward of the same denoiser (random
    weights, published config): seconds and peak memory of one forward, each method's layers captured, after one
    warm-up forward."""
    out = {}
    for family in families:
        bb, z, text = _family_backbone(family, dtype)
        latent_side = int(z.shape[-1])
        bb.forward(z, 150, text)  # warm-up: first-call allocations are not capture's cost
        plans = {}
        for spec in FAMILY_METHODS[family]:
            name, _, preset = spec.partition(":")
            plans[spec] = get_method(name, preset or None).plan(bb.layers, latent_side)
        forward = functools.partial(_forward_at, bb, z, text)
        out[family] = _capture_costs(forward, plans)
        del bb, forward
        gc.collect()
    return out


def _forward_at(bb, z: torch.Tensor, text, plan: CapturePlan | None):
    """One forward of backbone ``bb`` at t = 150 as ``plan`` says (None: plain)."""
    if plan is None:
        return bb.forward(z, 150, text)
    ks = _cat_cross(plan, text.hidden.shape[1])
    return bb.forward(z, 150, text, plan.names, per_head=plan.per_head, key_scale=ks, scale_values=plan.scale_values)


def families_markdown(res: dict) -> str:
    lines = [
        "| model (1024 px, random weights) | run | layers captured | s | time ratio | peak RSS MB | ratio (process) | "
        "ratio above weights | captured MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, row in res.items():
        p = row["plain"]
        lines.append(f"| {family} | plain | 0 | {p['seconds']:.1f} | 1 | {p['peak_rss_mb']:.0f} | 1 | 1 | 0 |")
        for spec, v in row.items():
            if spec in ("plain", "weights_rss_mb"):
                continue
            lines.append(
                f"| {family} | {spec} | {v['layers']} | {v['seconds']:.1f} | {v['time_ratio']:.2f} | {v['peak_rss_mb']:.0f} | "
                f"{v['peak_ratio_total']:.2f} | {v['peak_ratio_above_weights']:.2f} | {v['captured_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def run_bench(
    model=None,
    methods: Sequence[str] = ("cross", "t2m", "iseg"),
    out: str | Path | None = None,
    repeats: int = 5,
    batch: int = 8,
    real_size: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    predictor = AttnSegPredictor.from_pretrained(model, device=device, dtype=dtype)
    res = {
        "machine": machine(),
        "model": predictor.model_name,
        "resolution": predictor.resolution,
        "methods": bench_methods(predictor, methods, repeats, batch),
        "refinement": bench_refinement(),
        "generation": bench_generation(predictor.backbone),
    }
    if real_size:
        del predictor
        gc.collect()
        res["real_size_sd15_512px"] = bench_real_size()
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(res, indent=1))
        (out / "bench.md").write_text(bench_markdown(res))
    return res


def bench_markdown(res: dict) -> str:
    lines = [
        f"Machine: {res['machine']}. Model: {res['model']} at {res['resolution']} px.",
        "",
        "| method | s / image (1 draw) | bare s, same pairs | ratio to bare (median of pairs) | images / s (batched) | "
        "peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for m, v in res["methods"].items():
        ratio = v.get("ratio_to_bare")
        same = v.get("bare_seconds_same_window")
        lines.append(
            f"| {m} | {v['seconds_per_image']:.4f} | "
            + (f"{same:.4f} | {ratio:.2f}" if ratio is not None else "- | 1 (reference)")
            + f" | {v['images_per_second_batched']:.1f} | {v['peak_rss_mb']:.0f} |"
        )
    r = res["refinement"]
    lines += [
        "",
        f"Refinement on a {r['pixels']}-pixel grid: "
        + ", ".join(f"{k} iters {v * 1000:.1f} ms" for k, v in r["seconds"].items())
        + f"; linear fit R^2 = {r['linear_fit_r2']:.3f}.",
    ]
    if "generation" in res:
        lines += ["", "| generation (1 image, CFG) | plain s | with capture + masks s | ratio |", "|---|---|---|---|"]
        for m, v in res["generation"].items():
            lines.append(
                f"| {m} ({v['steps']} steps) | {v['plain_seconds']:.3f} | {v['capture_seconds']:.3f} | {v['ratio']:.2f} |"
            )
    if "real_size_sd15_512px" in res:
        rs = res["real_size_sd15_512px"]
        lines += [
            "",
            "SD 1.5-shaped UNet (random weights), 512 px, one forward:",
            "",
            "| run | peak RSS MB | ratio to plain (total) | ratio above weights | captured MB | time ratio |",
            "|---|---|---|---|---|---|",
            f"| plain | {rs['plain']['peak_rss_mb']:.0f} | 1 | 1 | 0 | 1 |",
        ]
        for m, v in rs.items():
            if m in ("plain", "weights_rss_mb"):
                continue
            lines.append(
                f"| {m} | {v['peak_rss_mb']:.0f} | {v['peak_ratio_total']:.2f} | {v['peak_ratio_above_weights']:.2f} | "
                f"{v['captured_mb']:.0f} | {v['time_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"
