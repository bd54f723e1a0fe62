"""The methods: each a config dataclass with the paper's defaults, named presets, and its scoring.

Real images: ``cross`` (baseline), ``t2m``, ``iseg`` (labels given) and ``diffseg`` (unsupervised);
generated images: ``ca``, ``ca-sa``, ``seediff``. :mod:`attnseg.methods.registry` holds them all.
"""

from __future__ import annotations

from attnseg.methods.cross import CrossAttentionBaseline, CrossConfig
from attnseg.methods.iseg import ISeg, ISegConfig, entropy_reduced_self
from attnseg.methods.registry import REAL, REGISTRY, MethodError, MethodInfo, get_method, resolve
from attnseg.methods.t2m import T2M, T2MConfig, self_cross

ALL_PRESETS = {n: dict(m.presets) for n, m in REGISTRY.items() if m.images == REAL}
"""The presets of every real-image method, the unsupervised DiffSeg included (what ``attnseg eval`` and a model's
``attnseg.json`` may name)."""

__all__ = [
    "ALL_PRESETS",
    "REGISTRY",
    "T2M",
    "CrossAttentionBaseline",
    "CrossConfig",
    "ISeg",
    "ISegConfig",
    "MethodError",
    "MethodInfo",
    "T2MConfig",
    "entropy_reduced_self",
    "get_method",
    "resolve",
    "self_cross",
]
