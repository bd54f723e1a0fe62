"""Which attention layers of a model to read, by name, by resolution or by a named preset.

Every attention map a model offers is described by a :class:`LayerInfo` derived from the model's own
config, so presets mean the same thing on Stable Diffusion 1.x/2.x and on a small UNet such as the
embedded model. A UNet's ``attn2`` modules give cross maps and its ``attn1`` modules self maps; a joint
(MMDiT) attention module gives both, as two layers named ``<module>:cross`` (its image-to-text block)
and ``<module>:self`` (its image-to-image block), so that a method's choice of cross and self layers
reads a transformer as it reads a UNet. Flux's single-stream blocks, one attention over the text and image
tokens together, are read the same way.

Presets are written in *resolution ranks* counted from the coarsest attention resolution
(rank 0 = the mid block's grid). On SD 1.x/2.x at 512 px the ranks are 0 -> 8 px, 1 -> 16 px,
2 -> 32 px, 3 -> 64 px; a rank beyond the finest level of a smaller UNet falls back to its finest.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Latent = int | tuple[int, int]
"""A latent's size: its side when square, else (h, w)."""


def as_hw(latent: Latent) -> tuple[int, int]:
    """(h, w) of a latent size given as a side or as (h, w)."""
    if isinstance(latent, int):
        return latent, latent
    h, w = latent
    return int(h), int(w)


@dataclass(frozen=True)
class LayerInfo:
    """One attention map of the model.

    name: the processor key without ``.processor`` (``up_blocks.2.attentions.1.transformer_blocks.0.attn1``), with
    ``:cross`` / ``:self`` for the two parts of a joint attention module (``transformer_blocks.9.attn:cross``).
    kind: ``"self"`` (image to image) or ``"cross"`` (image to text).
    block: ``"down"``, ``"mid"`` or ``"up"`` in a UNet; ``"joint"`` in a transformer, ``"single"`` for Flux's
    single-stream blocks.
    level: down-sampling level (0 = the latent grid, 1 = half of it, ...).
    rank: resolution rank counted from the coarsest attention level (0 = coarsest).
    heads: number of attention heads.
    source: the attention module's own kind: ``"cross"`` or ``"self"`` (a UNet's attn2 / attn1), ``"joint"``
    (text and image tokens in one attention), ``"single"`` (a single-stream block).
    """

    name: str
    kind: str
    block: str
    level: int
    rank: int
    heads: int
    source: str = ""

    @property
    def module(self) -> str:
        """The attention module this map is read from."""
        return self.name.split(":", 1)[0]

    def grid(self, latent: Latent) -> tuple[int, int]:
        """(h, w) of this layer's grid for a latent of side ``latent`` or of (h, w) ``latent``."""
        h, w = as_hw(latent)
        for _ in range(self.level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def side(self, latent: Latent) -> int:
        """The longer side of this layer's grid (its side on a square latent)."""
        return max(self.grid(latent))

    def pixels(self, latent: Latent) -> int:
        """Pixels of this layer's grid (its attention maps' query rows) for ``latent``."""
        h, w = self.grid(latent)
        return h * w


def layer_inventory(unet) -> list[LayerInfo]:
    """List every attention module of ``unet`` (a ``UNet2DConditionModel``) with its resolution."""
    n_levels = len(unet.config.block_out_channels)
    raw = []
    for key in unet.attn_processors:
        name = key[: -len(".processor")] if key.endswith(".processor") else key
        parts = name.split(".")
        if parts[0] == "down_blocks":
            block, level = "down", int(parts[1])
        elif parts[0] == "mid_block":
            block, level = "mid", n_levels - 1
        elif parts[0] == "up_blocks":
            block, level = "up", n_levels - 1 - int(parts[1])
        else:  # pragma: no cover - other UNet families
            continue
        kind = "self" if parts[-1] == "attn1" else "cross" if parts[-1] == "attn2" else parts[-1]
        module = unet.get_submodule(name)
        raw.append((name, kind, block, level, int(module.heads)))
    levels = sorted({lv for _, _, _, lv, _ in raw}, reverse=True)  # coarsest first
    return [LayerInfo(n, k, b, lv, levels.index(lv), h, source=k) for n, k, b, lv, h in raw]


def joint_inventory(transformer) -> list[LayerInfo]:
    """The layers of an MMDiT transformer (``SD3Transformer2DModel``): each joint module's cross and self parts,
    and the image-only ``attn2`` modules of SD3.5's dual-attention blocks (self maps). One grid: the latent
    patched by ``patch_size``, rank 0."""
    level = max(0, int(transformer.config.patch_size).bit_length() - 1)
    out = []
    for key in transformer.attn_processors:
        module = key[: -len(".processor")]
        heads = int(transformer.get_submodule(module).heads)
        if module.endswith(".attn2"):
            out.append(LayerInfo(module, "self", "joint", level, 0, heads, source="self"))
        else:
            out.append(LayerInfo(f"{module}:cross", "cross", "joint", level, 0, heads, source="joint"))
            out.append(LayerInfo(f"{module}:self", "self", "joint", level, 0, heads, source="joint"))
    return out


def flux_inventory(transformer) -> list[LayerInfo]:
    """The layers of a Flux transformer (``FluxTransformer2DModel``): the cross and self parts of each double-stream
    block's joint attention (block and source ``"joint"``), then of each single-stream block's attention over the
    concatenated sequence (``"single"``). One grid: the latent packed in 2 x 2 patches by the pipeline (level 1, so a
    layer's side is half the latent's), rank 0."""
    out = []
    for key in transformer.attn_processors:
        module = key[: -len(".processor")]
        heads = int(transformer.get_submodule(module).heads)
        block = "single" if module.startswith("single_transformer_blocks.") else "joint"
        out.extend(LayerInfo(f"{module}:{kind}", kind, block, 1, 0, heads, source=block) for kind in ("cross", "self"))
    return out


@dataclass(frozen=True)
class LayerSelect:
    """A choice of layers: any of names (glob patterns), grid sides, ranks, blocks; ANDed together.

    ``names`` match the module name (``*up_blocks.2.attentions.1*attn1``); ``sides`` match the grid's
    longer side at the image size in use (for example 16 for SD's 16-px layers at 512 x 512); ``ranks`` match
    resolution ranks (see the module docstring; a rank beyond the finest level means the finest).
    ``take`` = (start, stop) keeps that slice of the matches in UNet order, for the papers' choices
    such as T2M's self-attention of ``up_blocks.2.attentions.1`` (take (1, 2) of the 32-px decoder
    layers); on a smaller UNet the slice is clipped so that at least one layer stays. Negative bounds count from
    the end and None runs from the start or to the end, as in a Python slice: (-1, None) is the last matching layer.
    ``heads`` = the heads read of every matched module, 0-based in its own head order, averaged (empty: every head);
    only the cross layers of the cross baseline and of T2M read chosen heads (:func:`read_heads`), and every other
    use of a selection refuses them rather than read every head.
    """

    kind: str = "cross"
    names: tuple[str, ...] = ()
    sides: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    blocks: tuple[str, ...] = ()
    take: tuple[int, int | None] | None = None
    heads: tuple[int, ...] = ()

    def resolve(self, layers: Sequence[LayerInfo], latent: Latent | None = None, heads: bool = False) -> list[LayerInfo]:
        """The matching layers. ``heads``: whether the caller reads the chosen heads (else a choice of heads is refused)."""
        if self.heads and not heads:
            raise ValueError(
                f"{self} chooses heads {list(self.heads)}: only the cross layers of the cross baseline and of T2M read "
                "chosen heads; leave heads empty here"
            )
        cands = [lay for lay in layers if lay.kind == self.kind]
        if self.blocks:
            cands = [lay for lay in cands if lay.block in self.blocks]
        if self.names:
            cands = [lay for lay in cands if any(fnmatch.fnmatchcase(lay.name, p) for p in self.names)]
        if self.ranks:
            max_rank = max((lay.rank for lay in cands), default=0)
            wanted = {min(r, max_rank) for r in self.ranks}
            cands = [lay for lay in cands if lay.rank in wanted]
        if self.sides:
            if latent is None:
                raise ValueError("selecting layers by grid side needs the latent size")
            cands = [lay for lay in cands if lay.side(latent) in self.sides]
        if self.take is not None and cands:
            n = len(cands)
            start, stop = (d if b is None else n + b if b < 0 else b for b, d in zip(self.take, (0, n), strict=True))
            start = min(max(start, 0), n - 1)
            cands = cands[start : max(stop, start + 1)]
        if not cands:
            raise ValueError(
                f"no {self.kind}-attention layer matches {self}; available: "
                + ", ".join(lay.name for lay in layers if lay.kind == self.kind)
            )
        for lay in cands:
            if self.heads and not all(0 <= h < lay.heads for h in self.heads):
                raise ValueError(f"{self} chooses heads {list(self.heads)} of {lay.name}, which has heads 0-{lay.heads - 1}")
        return cands


def finest_grid(layers: Iterable[LayerInfo], latent: Latent) -> tuple[int, int]:
    """The largest (h, w) grid among ``layers`` for ``latent``."""
    return max((lay.grid(latent) for lay in layers), key=lambda g: g[0] * g[1])


def read_heads(
    selects: LayerSelect | Iterable[LayerSelect], inventory: Sequence[LayerInfo], latent: Latent | None = None
) -> tuple[list[LayerInfo], dict[str, tuple[int, ...]]]:
    """The union of ``selects`` (one or several), in order, and the heads read of each layer whose selection chooses
    them ({name: heads}; a layer not named: every head). A layer chosen twice must be chosen with the same heads."""
    out: list[LayerInfo] = []
    heads: dict[str, tuple[int, ...]] = {}
    for s in (selects,) if isinstance(selects, LayerSelect) else selects:
        for lay in s.resolve(inventory, latent, heads=True):
            if lay in out:
                if heads.get(lay.name, ()) != s.heads:
                    raise ValueError(
                        f"{lay.name} is chosen twice, with heads {list(heads.get(lay.name, ()))} and {list(s.heads)}"
                    )
                continue
            out.append(lay)
            if s.heads:
                heads[lay.name] = s.heads
    return out, heads
