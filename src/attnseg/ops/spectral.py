"""Spectral clustering of an affinity matrix (pure tensor maths).

T2M splits the region of a class into segments with "a simple version of spectral clustering" of the self-attention
(T2M section 5.3, after Ng, Jordan and Weiss 2001): symmetrise the affinity W, normalise it D^-1/2 W D^-1/2, take the
eigenvectors of its k largest eigenvalues as pixel features, normalise each pixel's row, and group the rows with
k-means. The number of segments k is the one with the largest gap between consecutive eigenvalues within a range
(the eigengap rule; ours, since the paper does not say how k is chosen).
"""

from __future__ import annotations

import torch


def normalised_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """D^-1/2 W D^-1/2 of W = (A + A^T) / 2 for an (N, N) non-negative affinity A."""
    w = (affinity.double() + affinity.double().T) / 2
    d = w.sum(dim=1).clamp_min(1e-12).rsqrt()
    return d[:, None] * w * d[None, :]


def eigengap_k(eigenvalues: torch.Tensor, k_min: int, k_max: int) -> int:
    """The k in [k_min, k_max] with the largest gap lambda_k - lambda_{k+1} of eigenvalues sorted largest first."""
    n = len(eigenvalues)
    k_max = min(k_max, n - 1)
    if k_max < k_min:
        return min(k_min, n)
    gaps = eigenvalues[k_min - 1 : k_max] - eigenvalues[k_min : k_max + 1]
    return k_min + int(torch.argmax(gaps))


def kmeans(x: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """Labels (N,) of k-means on rows of ``x`` (N, D); deterministic farthest-point start from row 0."""
    n = len(x)
    k = min(k, n)
    centres = [0]
    dist = (x - x[0]).square().sum(dim=1)
    for _ in range(1, k):
        centres.append(int(torch.argmax(dist)))
        dist = torch.minimum(dist, (x - x[centres[-1]]).square().sum(dim=1))
    c = x[centres].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for it in range(iters):
        new = torch.cdist(x, c).argmin(dim=1)
        if it > 0 and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(dim=0)
    return labels


def spectral_clusters(affinity: torch.Tensor, k_min: int = 1, k_max: int = 8) -> torch.Tensor:
    """Cluster labels (N,) in 0..k-1 of the N items of an (N, N) affinity, k by the eigengap rule in [k_min, k_max]."""
    n = len(affinity)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    vals, vecs = torch.linalg.eigh(normalised_affinity(affinity))
    vals, vecs = vals.flip(0), vecs.flip(1)  # largest first
    k = eigengap_k(vals, max(1, k_min), max(k_min, k_max))
    feats = vecs[:, :k]
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return kmeans(feats.float(), k)
