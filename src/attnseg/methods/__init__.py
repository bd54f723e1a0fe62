"""Real-image methods: each a config dataclass with the paper's defaults and a scoring class."""

from __future__ import annotations

from attnseg.methods.cross import CROSS_PRESETS, CrossAttentionBaseline, CrossConfig
from attnseg.methods.diffseg import DIFFSEG_PRESETS
from attnseg.methods.iseg import ISEG_PRESETS, ISeg, ISegConfig, entropy_reduced_self
from attnseg.methods.t2m import T2M, T2M_PRESETS, T2MConfig, self_cross

METHODS = {"cross": CrossAttentionBaseline, "t2m": T2M, "iseg": ISeg}
PRESETS = {"cross": CROSS_PRESETS, "t2m": T2M_PRESETS, "iseg": ISEG_PRESETS}
ALL_PRESETS = {**PRESETS, "diffseg": DIFFSEG_PRESETS}
"""The presets of every real-image method, the unsupervised DiffSeg included (what ``attnseg eval`` and a model's
``attnseg.json`` may name)."""


def get_method(name: str, preset: str | None = None, **overrides):
    """Build method ``name`` from a named preset (default: the paper's) with field overrides."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    presets = PRESETS[name]
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(presets)}")
    cfg = presets[preset] if preset else next(iter(presets.values()))
    from dataclasses import replace

    return METHODS[name](replace(cfg, **overrides))


__all__ = [
    "ALL_PRESETS",
    "CROSS_PRESETS",
    "DIFFSEG_PRESETS",
    "ISEG_PRESETS",
    "METHODS",
    "PRESETS",
    "T2M",
    "T2M_PRESETS",
    "CrossAttentionBaseline",
    "CrossConfig",
    "ISeg",
    "ISegConfig",
    "T2MConfig",
    "entropy_reduced_self",
    "get_method",
    "self_cross",
]
