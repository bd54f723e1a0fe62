"""Images to latents, as every backbone reads them: resized, scaled to [-1, 1], the VAE posterior mean shifted and
scaled by the VAE's config (Stable Diffusion 3's ``shift_factor``; none in 1.x / 2.x and XL)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.inference_mode()
def encode_posteriors(
    vae, images: Sequence[np.ndarray], resolution: int | tuple[int, int], device, max_batch: int = 16, upcast: bool = False
):
    """The VAE posterior of RGB uint8 images resized to ``resolution`` x ``resolution`` (or to (H, W)), as the
    denoiser reads latents: ((mean - shift) x scale, std x scale), each (N, C, H/f, W/f).

    ``upcast``: encode in fp32 when the VAE is in fp16 (SDXL's overflows there; its config asks for it).
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    xs = []
    for im in images:
        t = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 127.5 - 1
        if t.shape[-2:] != size:  # resampling to the same size is the identity
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        xs.append(t)
    dtype = next(vae.parameters()).dtype
    upcast = upcast and bool(getattr(vae.config, "force_upcast", False)) and dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    try:
        x = torch.cat(xs).to(device, next(vae.parameters()).dtype)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        scale = vae.config.scaling_factor
        dists = [vae.encode(x[i : i + max_batch]).latent_dist for i in range(0, len(x), max_batch)]
        mean = torch.cat([(d.mean - shift) * scale for d in dists])
        std = torch.cat([d.std * scale for d in dists])
    finally:
        if upcast:
            vae.to(dtype)
    return mean, std
