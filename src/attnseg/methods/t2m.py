"""T2M, "From Text to Mask" (Xiao et al. 2023): SelfCross = Self^iter . Cross.

Paper section 3: one forward of the noised latent (t = 150) with all labels in one sentence;
Cross = mean of the 16-px and 8-px cross-attention layers (SD at 512 px) upsampled to the 32-px
grid; Self = head-mean self-attention of ``up_blocks.2.attentions.1``; SelfCross = Self^2 Cross;
per-label min-max; background (1 - max)^2; several noise draws averaged (10 for VOC, 1 for COCO: appendix A).
Sources of every setting, and where the authors' code differs: docs/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attnseg.diffusion.capture import AttentionStore
from attnseg.diffusion.layers import Latent, LayerInfo, LayerSelect, read_heads
from attnseg.diffusion.prompts import T2M_BACKGROUND_WORDS, T2M_VOC_CLASS_BACKGROUND_WORDS, TokenSpans
from attnseg.methods.base import CapturePlan, fused_cross, mean_self
from attnseg.methods.cross import EMBEDDED_SD3_CROSS
from attnseg.ops.maps import background_score, box_mask, minmax, propagate, with_background

EMBEDDED_SELF_LAYER = LayerSelect(kind="self", ranks=(99,), blocks=("up",), take=(0, 1))
"""The self-attention layer of the "embedded" presets: the first layer of the finest decoder level (the embedded
model's up_blocks.2.attentions.0, 16 px), chosen on validation scenes (docs/EMBEDDED-MODEL-TRAINING.md). Selected by
position, not by block index, so that it names the same place in UNets with another number of levels."""


@dataclass
class T2MConfig:
    """Settings of T2M with the paper's defaults (VOC)."""

    timestep: int = 150
    """Noise level t of T = 1000 (paper: 150)."""
    template: str = "t2m"
    """"a photo including A, B, and C." """
    synonyms: bool | str = True
    """Replace class names by richer ones: True or "voc", VOC's (paper, section 4 and appendix A: person -> person
    with clothes, ...); "coco", the authors' code's COCO names (tv -> tv monitor screen, ...); False: none."""
    background_words: tuple[str, ...] = T2M_BACKGROUND_WORDS
    """Words appended to absorb attention; their maps are not read (paper, appendix A, after CLIMS)."""
    class_background_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per label, its own background words instead of ``background_words``; the prompt carries those of its labels in
    order, without repeats (the authors' code on VOC: :data:`T2M_VOC_CLASS_BACKGROUND_WORDS`). Empty: the paper's."""
    cross: tuple[LayerSelect, ...] = field(
        default_factory=lambda: (
            LayerSelect(kind="cross", ranks=(0, 1), blocks=("down", "mid")),
            LayerSelect(kind="cross", ranks=(1,), blocks=("up",), take=(0, 2)),
        )
    )
    """Cross layers: CompVis layers 4-8 of SD, i.e. the 16-px encoder layers, the 8-px mid block and
    the first two 16-px decoder layers (up_blocks.1.attentions.0/1)."""
    self_layer: LayerSelect = field(default_factory=lambda: LayerSelect(kind="self", ranks=(2,), blocks=("up",), take=(1, 2)))
    """Self layer: CompVis layer 11 of SD, up_blocks.2.attentions.1 (32 px)."""
    iters: int = 2
    """Power of Self in SelfCross (computed as repeated products)."""
    draws: int = 10
    """Noise draws averaged (paper: 10 for VOC; 1 is the single-pass setting)."""
    bg_power: float = 2.0
    bg_threshold: float | None = None
    """None: paper's (1 - max)^2; a value: the code's (2 thr - max)^2 (0.5 for VOC)."""
    caa_threshold: float | None = None
    """None: Self^iters as is (the paper); a value: Self^iters restricted, per label, to the boxes of the regions where
    the label's min-max Cross exceeds this fraction of its maximum (CLIP-ES's class-aware attention affinity, which
    the authors' code applies: 0.2 for VOC, 0.5 for COCO). Computed as Self^iters (box * Cross), the same product."""
    posterior: str = "sample"
    """"sample": each noise draw starts from a sample of the VAE posterior (the paper, section 3.1: the encoder
    "encodes images ... by sampling based on the predicted mean and standard deviation"); "mean": its mean, so that one draw is deterministic
    given the noise (ours; the embedded presets)."""
    resize: str = "square"
    """"square" (ours; the paper: "rescale it to meet the model requirements"): the image is resized to the model's
    square resolution. "code": as the authors' code (scripts/SD_seg.py, ``MySegmentation``): its aspect is kept, its
    long side set by its aspect ratio (:func:`code_size`), the short side padded at the bottom or right to a multiple
    of the model's size multiple with the mean colour, and the padding cropped from the score maps before they are
    resized to the image: non-square attention grids."""
    average: str = "scores"
    """How draws are combined: "scores" (ours; the paper does not say): each draw's scores, background included,
    are averaged; "foreground": the foreground maps are averaged and the (nonlinear) background rule applied once to
    their mean, as the authors' code does."""


T2M_PRESETS: dict[str, T2MConfig] = {
    "voc": T2MConfig(),
    # The paper's words, under the name every method with a `code` preset has: its VOC settings.
    "paper": T2MConfig(),
    "single-pass": T2MConfig(draws=1),
    # COCO (appendix A: "we sample 10, 1, and 1 times" for VOC, COCO and Mug19). The paper adopts CLIP-ES's category
    # synonyms, a list it does not print; the VOC synonyms do not apply, so labels are used as given (pass richer
    # names as labels to use synonyms). Background words as for VOC (the paper names one list, after CLIMS).
    "coco": T2MConfig(synonyms=False, draws=1),
    # COCO as the authors' code runs it: its background rule (2 thr - max)^2 with thr 0.35, Self boxed at 0.5.
    # Both code presets keep the image's aspect, long side 704-1024 px (``resize="code"``); COCO's with the code's
    # COCO names.
    "coco-code": T2MConfig(template="t2m-code", synonyms="coco", draws=1, bg_threshold=0.35, caa_threshold=0.5, resize="code"),
    # VOC as the authors' code runs it: Self boxed to each label's Cross regions at 0.2, the 10 draws combined with
    # the foreground averaged, the background rule applied once, its prompt (labels and background words one list,
    # its per-class background words).
    "code": T2MConfig(
        template="t2m-code",
        class_background_words=T2M_VOC_CLASS_BACKGROUND_WORDS,
        average="foreground",
        caa_threshold=0.2,
        resize="code",
    ),
    "plain": T2MConfig(synonyms=False, background_words=(), draws=1),
    # For datasets whose vocabulary has no use for VOC's background words (e.g. ShapesWorld).
    "no-bg-words": T2MConfig(synonyms=False, background_words=()),
    # The embedded ShapesWorld model (its folder's attnseg.json makes this its default): the paper's
    # layer maps onto the model's last decoder self-attention layer, which attends almost uniformly
    # (object lift 1.1, `python -m attnseg.train.embedded.diagnose`); the first decoder layer at the same resolution
    # (16 px) is object-coherent and was chosen on validation scenes (docs/EMBEDDED-MODEL-TRAINING.md). Its
    # background threshold (the code's (2 thr - max)^2; VOC 0.5) was chosen there too, for ShapesWorld's small objects.
    "embedded": T2MConfig(
        synonyms=False, background_words=(), self_layer=EMBEDDED_SELF_LAYER, bg_threshold=0.65, posterior="mean"
    ),
    # The same with the paper's background rule (1 - max)^2: an ablation on the embedded model.
    "embedded-paper-bg": T2MConfig(synonyms=False, background_words=(), self_layer=EMBEDDED_SELF_LAYER, posterior="mean"),
    # Transformer (MMDiT) backbones have no encoder, decoder or resolution levels to map the paper's layers onto:
    # Cross averages every joint layer's image-to-text block, Self every self map (the joint layers' image-to-image
    # blocks, and SD3.5's image-only layers), all on one grid.
    "mmdit": T2MConfig(cross=(LayerSelect(kind="cross"),), self_layer=LayerSelect(kind="self")),
    # The embedded SD3 model (its attnseg.json makes this its default): Cross from the heads of `cross:embedded-sd3`,
    # Self from its block 6 (`python scripts/probe_sd3.py MODEL t2m-sweep --blocks 0h0+1h1+4h1`), read at t = 400,
    # background threshold 0.6, the paper's Self^2, chosen on validation scenes (docs/EMBEDDED-MODEL-TRAINING.md);
    # the plain prompt of the UNet model's preset.
    "embedded-sd3": T2MConfig(
        timestep=400,
        synonyms=False,
        background_words=(),
        cross=EMBEDDED_SD3_CROSS,
        self_layer=LayerSelect(kind="self", blocks=("joint",), take=(6, 7)),
        bg_threshold=0.6,
        posterior="mean",
    ),
}

# The embedded preset with the code's two choices of the `code` preset (boxed Self, draws averaged before the
# background rule); the embedded model's latents stay the posterior mean and its images square.
T2M_PRESETS["embedded-code"] = replace(T2M_PRESETS["embedded"], average="foreground", caa_threshold=0.2)


CODE_LONG_SIDES: tuple[tuple[float, int], ...] = ((16 / 7, 16), (15 / 8, 15), (14 / 8, 14), (13 / 9, 13), (12 / 10, 12))
"""The authors' code's long side by aspect ratio (scripts/SD_seg.py, ``MySegmentation.__getitem__``): above a
ratio (long / short), that many 64-px units; 11 (704 px) up to 1.2."""
PAD_COLOUR: tuple[int, int, int] = (123, 117, 104)
"""The colour the authors' code pads with (its ``bg_mean``, RGB)."""


def code_size(h: int, w: int, scale: float = 1.0, multiple: int = 64) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h', w'), (H, W)): an ``h`` x ``w`` image resized as T2M's code resizes it, and that size padded at the bottom
    or right to a multiple of ``multiple``.

    The long side is 64 px times 11 to 16 by the aspect ratio (:data:`CODE_LONG_SIDES`), times ``scale`` (1 on SD
    1.x / 2.x at 512 px; the predictor's resolution / 512 elsewhere, ours), the short side in proportion, truncated."""
    units = next((u for ratio, u in CODE_LONG_SIDES if max(h / w, w / h) > ratio), 11)
    long = round(64 * units * scale)
    rh, rw = (int(long * h / w), long) if w > h else (long, int(long * w / h))
    pad = lambda s: -(-s // multiple) * multiple  # noqa: E731
    return (rh, rw), (pad(rh), pad(rw))


def self_cross(self_attn: torch.Tensor, cross: torch.Tensor, iters: int) -> torch.Tensor:
    """SelfCross = Self^iters . Cross for (B, P, P) and (B, P, K), as ``iters`` products."""
    return propagate(self_attn, cross, iters)


class T2M:
    name = "t2m"

    def __init__(self, config: T2MConfig | None = None) -> None:
        self.config = config or T2MConfig()

    def plan(self, inventory: list[LayerInfo], latent: Latent) -> CapturePlan:
        s = self.config.self_layer.resolve(inventory, latent)
        cross, heads = read_heads(self.config.cross, inventory, latent)
        return CapturePlan.averaged_cross(cross, heads, s[0].grid(latent), self_names=[lay.name for lay in s])

    @property
    def averages_foreground(self) -> bool:
        """Whether draws are averaged before the background rule (``average="foreground"``)."""
        if self.config.average not in ("scores", "foreground"):
            raise ValueError(f"unknown T2M average {self.config.average!r}: use 'scores' or 'foreground'")
        return self.config.average == "foreground"

    def foreground(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        """Min-max SelfCross per label: (B, P, K)."""
        cross = fused_cross(store, plan.cross, spans, plan.grid, heads=plan.cross_heads)
        if self.config.caa_threshold is not None:
            cross = cross * box_mask(minmax(cross), plan.grid, self.config.caa_threshold)
        return minmax(self_cross(mean_self(store, plan.self_names), cross, self.config.iters))

    def with_background(self, fg: torch.Tensor) -> torch.Tensor:
        """(B, P, K) foreground -> (B, P, K + 1) scores with the background rule, background first."""
        return with_background(fg, background_score(fg, self.config.bg_power, self.config.bg_threshold))

    def scores(self, store: AttentionStore, spans: TokenSpans, plan: CapturePlan) -> torch.Tensor:
        return self.with_background(self.foreground(store, spans, plan))
