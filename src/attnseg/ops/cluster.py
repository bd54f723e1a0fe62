"""Clustering of pixels by their attention distributions (pure tensor maths).

iSeg's released code clusters the pixels of the fused cross-attention maps before refining them: a k-means whose
distance is a symmetric Kullback-Leibler divergence, seeded on a regular grid, after which every pixel takes the mean
map of its cluster. Layout as in :mod:`attnseg.ops.maps`: per-pixel features ``(B, P, C)`` (P pixels of an
``h x w`` grid in row-major order), cluster labels ``(B, P)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_seeds(h: int, w: int, k: int) -> torch.Tensor:
    """Pixel indices (S,) of the initial centres: a regular grid with stride ``floor(side / sqrt(k))`` from pixel 0.

    The stride rule is iSeg's code's; it gives about, not exactly, ``k`` seeds (k = 32 on a 64 x 64 grid: stride 11,
    6 x 6 = 36 seeds; on a 16 x 16 grid: stride 2, 64 seeds).
    """
    if k < 1:
        raise ValueError(f"the number of clusters k must be at least 1, got {k}")
    rows = torch.arange(0, h, max(1, int(h // math.sqrt(k))))
    cols = torch.arange(0, w, max(1, int(w // math.sqrt(k))))
    return (rows[:, None] * w + cols[None, :]).flatten()


def symmetric_kl(a: torch.Tensor, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Symmetric KL divergence between every centre and every pixel: (B, S, C), (B, P, C) -> (B, S, P).

    ``(KL(a || x) + KL(x || a)) / 2 = sum_c (a_c - x_c)(log a_c - log x_c) / 2`` with ``eps`` added to both (the
    vectors need not sum to 1; the sum stays >= 0). Expanded into matrix products so no (B, S, P, C) tensor is built.
    """
    a = a + eps
    x = x + eps
    la, lx = a.log(), x.log()
    self_a = (a * la).sum(dim=2, keepdim=True)  # (B, S, 1)
    self_x = (x * lx).sum(dim=2)[:, None, :]  # (B, 1, P)
    cross = torch.bmm(a, lx.transpose(1, 2)) + torch.bmm(la, x.transpose(1, 2))  # (B, S, P)
    return 0.5 * (self_a + self_x - cross)


def kl_kmeans(
    x: torch.Tensor, seeds: torch.Tensor, iters: int, eps: float = 1e-5, zero: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the pixels ``x`` (B, P, C) under :func:`symmetric_kl`, started from the pixels ``seeds`` (S,).

    Each iteration assigns every pixel to its nearest live centre (ties: the lowest index), drops centres left without
    pixels, and moves each remaining centre to the mean of its pixels. Exact zeros of ``x`` are first replaced by
    ``zero``. Computed in float64; deterministic. Returns labels (B, P), numbered 0..n-1 in the order of the seeds
    that survive, and the number of clusters n (B,).
    """
    if iters < 1:
        raise ValueError(f"kl_kmeans needs at least one iteration, got {iters}")
    if x.dim() != 3:
        raise ValueError(f"kl_kmeans takes (B, P, C) features, got shape {tuple(x.shape)}")
    seeds = seeds.to(x.device)
    if seeds.numel() == 0 or int(seeds.min()) < 0 or int(seeds.max()) >= x.shape[1]:
        raise ValueError(f"seeds must be pixel indices in [0, {x.shape[1]}), got {seeds.tolist()}")
    x = x.to(torch.float64)
    x = torch.where(x == 0, torch.full_like(x, zero), x)
    centres = x[:, seeds]  # (B, S, C)
    alive = torch.ones(centres.shape[:2], dtype=torch.bool, device=x.device)
    for _ in range(iters):
        d = symmetric_kl(centres, x, eps).masked_fill(~alive[:, :, None], math.inf)
        labels = d.argmin(dim=1)  # (B, P)
        members = F.one_hot(labels, centres.shape[1]).to(x.dtype)  # (B, P, S)
        counts = members.sum(dim=1)  # (B, S)
        alive = counts > 0
        centres = torch.bmm(members.transpose(1, 2), x) / counts.clamp_min(1)[:, :, None]
    rank = alive.long().cumsum(dim=1) - 1  # the surviving centres, renumbered in order
    return rank.gather(1, labels), alive.sum(dim=1)


def cluster_mean(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Replace every pixel of ``maps`` (B, P, K) by the mean over its cluster (``labels`` (B, P)): (B, P, K).

    Linear in ``maps`` and keeps each column's sum over pixels.
    """
    n = int(labels.max()) + 1 if labels.numel() else 0
    members = F.one_hot(labels, n).to(maps.dtype)  # (B, P, n)
    sums = torch.bmm(members.transpose(1, 2), maps)  # (B, n, K)
    counts = members.sum(dim=1)[:, :, None].clamp_min(1)  # (B, n, 1)
    return torch.bmm(members, sums / counts)
