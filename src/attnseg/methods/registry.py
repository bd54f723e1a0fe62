"""One registry of every method: name -> config class, presets, what it needs, how it is built.

The command line, ``attnseg eval``, ``attnseg generate``, the predictor and a model's ``attnseg.json`` all
validate a method and preset through :func:`resolve`, so a name is checked in one place with one message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from attnseg.methods.concept_attention import CONCEPT_PRESETS, ConceptAttention, ConceptAttentionConfig
from attnseg.methods.cross import CROSS_PRESETS, CrossAttentionBaseline, CrossConfig
from attnseg.methods.diffseg import DIFFSEG_PRESETS, DiffSeg, DiffSegConfig
from attnseg.methods.diffseg_iseg import DIFFSEG_ISEG_PRESETS, DiffSegISeg, DiffSegISegConfig
from attnseg.methods.generated import (
    CA,
    CA_PRESETS,
    CASA,
    CASA_PRESETS,
    SEEDIFF_PRESETS,
    CAConfig,
    CASAConfig,
    SeeDiff,
    SeeDiffConfig,
)
from attnseg.methods.grounding import GROUNDED_PRESETS, Grounded, GroundedConfig
from attnseg.methods.interactive import INTERACTIVE_PRESETS, Interactive, InteractiveConfig
from attnseg.methods.iseg import ISEG_PRESETS, ISeg, ISegConfig
from attnseg.methods.t2m import T2M, T2M_PRESETS, T2MConfig

REAL = "real"
GENERATED = "generated"
LABELS = "labels"
NOTHING = "nothing"
VISUAL = "visual"


class MethodError(ValueError):
    """An unknown method or preset; the message lists the choices."""


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of attnseg knows of a method.

    images: ``"real"`` (segment an existing image) or ``"generated"`` (masks of images the model generates).
    guide: what says what to segment: ``"labels"`` (class names), ``"nothing"`` (unsupervised: class-agnostic
    segments) or ``"visual"`` (points, boxes or scribbles).
    build: config -> the method object (its ``plan`` / ``scores`` or ``sides`` / ``soft``).
    The first preset is the paper's and the default.
    """

    name: str
    config: type
    presets: Mapping[str, Any]
    images: str
    guide: str
    build: Callable[[Any], Any]
    summary: str

    @property
    def needs_labels(self) -> bool:
        return self.guide == LABELS

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


REGISTRY: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "cross", CrossConfig, CROSS_PRESETS, REAL, LABELS, CrossAttentionBaseline, "DAAM / DiffuMask cross-attention baseline"
        ),
        MethodInfo("t2m", T2MConfig, T2M_PRESETS, REAL, LABELS, T2M, "From Text to Mask: Self^2 . Cross"),
        MethodInfo("iseg", ISegConfig, ISEG_PRESETS, REAL, LABELS, ISeg, "iSeg: Cat-Cross and entropy-reduced Self"),
        MethodInfo(
            "concept-attention",
            ConceptAttentionConfig,
            CONCEPT_PRESETS,
            REAL,
            LABELS,
            ConceptAttention,
            "ConceptAttention: joint attention's output space (SD3, Flux)",
        ),
        MethodInfo("diffseg", DiffSegConfig, DIFFSEG_PRESETS, REAL, NOTHING, DiffSeg, "DiffSeg: KL merging of self-attention"),
        MethodInfo(
            "diffseg-iseg",
            DiffSegISegConfig,
            DIFFSEG_ISEG_PRESETS,
            REAL,
            NOTHING,
            DiffSegISeg,
            "DiffSeg's segments refined by iSeg's entropy-reduced Self",
        ),
        MethodInfo(
            "interactive",
            InteractiveConfig,
            INTERACTIVE_PRESETS,
            REAL,
            VISUAL,
            Interactive,
            "iSeg: a point, box or scribble refined by Ent-Self",
        ),
        MethodInfo("ca", CAConfig, CA_PRESETS, GENERATED, LABELS, CA, "DiffuMask CA: cross maps of every resolution"),
        MethodInfo("ca-sa", CASAConfig, CASA_PRESETS, GENERATED, LABELS, CASA, "Dataset Diffusion: Self^tau . Cross"),
        MethodInfo("seediff", SeeDiffConfig, SEEDIFF_PRESETS, GENERATED, LABELS, SeeDiff, "SeeDiff: seeds, region expansion"),
        MethodInfo(
            "grounding", GroundedConfig, GROUNDED_PRESETS, GENERATED, LABELS, Grounded, "Grounded Diffusion: a trained module"
        ),
    )
}


def names(images: str | None = None, guide: str | None = None) -> list[str]:
    """Method names, optionally only those for ``images`` and guided by ``guide``."""
    return [n for n, m in REGISTRY.items() if (images is None or m.images == images) and (guide is None or m.guide == guide)]


def resolve(name: str, preset: str | None = None, images: str | None = None, guide: str | None = None):
    """(info, preset name, config) of a method; an unknown name or preset is a :class:`MethodError`."""
    choices = names(images, guide)
    if name not in choices:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(choices)}")
    info = REGISTRY[name]
    if preset is not None and preset not in info.presets:
        raise MethodError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(info.presets)}")
    preset = preset or info.default_preset
    return info, preset, info.presets[preset]


def get_method(name: str, preset: str | None = None, **overrides):
    """Build the label-driven real-image method ``name`` from a named preset (default: the paper's) with field overrides."""
    info, _, cfg = resolve(name, preset, REAL, LABELS)
    return info.build(replace(cfg, **overrides))


def check_profile(presets: Mapping[str, str]) -> list[str]:
    """Problems of a model profile's ``{method: preset}`` (real-image methods; empty when every pair exists)."""
    out = []
    for method, preset in presets.items():
        if method not in names(REAL):
            out.append(f"method {method!r}, which is not a real-image method of attnseg ({', '.join(names(REAL))})")
        elif preset not in REGISTRY[method].presets:
            out.append(f"preset {preset!r} for {method!r}, which attnseg does not have")
    return out
