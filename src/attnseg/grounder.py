"""A trained grounding module with its diffusion model: masks of class words in the images it generates.

The module's folder holds ``config.json`` (the module's shape, the words it was trained on, the data and training
settings) and ``model.safetensors``. :class:`Grounder` pairs it with a loaded backbone:

- :meth:`Grounder.generate`: generate images for prompts and segment the given class words of each (paper eq. 2:
  the block outputs at the last denoising step, the words' embeddings as queries);
- :meth:`Grounder.segment`: the same on a real image, from one denoiser forward of its noised latent (ours; the
  paper reads real images through DDIM inversion, appendix C.3).

Queries are the class word's text-encoder output in "a photograph of a {word}", averaged over its tokens (the
authors' code, train.py), so any word the text encoder reads can be asked for, seen in training or not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnseg.diffusion.features import block_features
from attnseg.diffusion.loading import EMBEDDED_DIR
from attnseg.diffusion.prompts import PromptTemplate
from attnseg.io.files import atomic_write_bytes
from attnseg.methods.grounding import GroundingConfig, GroundingModule
from attnseg.ops.refine import CRFConfig
from attnseg.results import SegmentationResult, crf_config, make_result

PAPER_TEMPLATE = PromptTemplate("grounded-diffusion", "a photograph of a ", " and a ", " and a ", "")
"""The authors' code (train.py): "a photograph of a " + class, " and a " + second class."""

QUERY_TEMPLATE = "a photograph of a {}"
"""The class word's context for its query embedding (the authors' code: "a photograph of a " + class)."""

SHIPPED = EMBEDDED_DIR / "grounding"
"""The module trained for the embedded model, shipped beside it."""


class GroundingError(ValueError):
    """A module folder cannot be used; the message says what to do."""


def class_embeddings(backbone, words: Sequence[str], template: str = QUERY_TEMPLATE) -> torch.Tensor:
    """(K, D) float32: each word's text-encoder states in ``template``, averaged over the word's tokens."""
    return backbone.concept_states(words, template).cpu()


def pad_queries(embeddings: dict[str, torch.Tensor], labels: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, N, D) of each item's labels, N the largest label count, and padding (B, N): True past an item's labels."""
    n = max(len(labs) for labs in labels)
    d = next(iter(embeddings.values())).shape[-1]
    q = torch.zeros(len(labels), n, d)
    pad = torch.ones(len(labels), n, dtype=torch.bool)
    for b, labs in enumerate(labels):
        for k, lab in enumerate(labs):
            q[b, k] = embeddings[lab]
            pad[b, k] = False
    return q, pad


def save_module(folder: Path, module: GroundingModule, record: dict) -> None:
    """``model.safetensors`` and ``config.json`` (``record`` plus the module's shape)."""
    from dataclasses import asdict

    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(state))
    atomic_write_bytes(folder / "config.json", json.dumps({**record, "module": asdict(module.config)}, indent=1).encode())


def load_module(folder: str | Path | None = None) -> tuple[GroundingModule, dict]:
    """The module of ``folder`` (None: the one shipped with the embedded model), in eval mode, and its config record."""
    folder = Path(folder) if folder is not None else SHIPPED
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise GroundingError(
            f"{folder} holds no trained grounding module (config.json and model.safetensors expected); "
            "train one with `attnseg grounding train --seen WORD ... --out DIR` and pass --module DIR"
        )
    from safetensors.torch import load_file

    record = json.loads((folder / "config.json").read_text())
    m = record["module"]
    cfg = GroundingConfig(**{**m, "sides": tuple(m["sides"]), "in_channels": tuple(m["in_channels"])})
    module = GroundingModule(cfg)
    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return module.eval(), {**record, "folder": str(folder)}


@dataclass
class GroundedItem:
    """One image with its class masks: image (H, W, 3) uint8; probs (K, H, W) float32 sigmoid scores; masks (K, H, W)
    bool, probs > 0.5 (paper section 4.3); class k is ``labels[k]``."""

    prompt: str
    labels: list[str]
    image: np.ndarray
    probs: np.ndarray
    masks: np.ndarray


class Grounder:
    """A grounding module and the backbone whose features it reads; see the module docstring."""

    def __init__(self, backbone, module: GroundingModule, record: dict | None = None) -> None:
        self.backbone = backbone
        self.module = module.eval()
        self.record = record or {}
        self._queries: dict[str, torch.Tensor] = {}

    @classmethod
    def from_folder(cls, backbone, folder: str | Path | None = None) -> Grounder:
        module, record = load_module(folder)
        return cls(backbone, module, record)

    def queries(self, labels: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded queries and padding of each item's labels (embeddings are computed once per word)."""
        new = sorted({w for labs in labels for w in labs} - set(self._queries))
        if new:
            emb = class_embeddings(self.backbone, new)
            if emb.shape[-1] != self.module.config.text_dim:
                raise GroundingError(
                    f"the grounding module takes {self.module.config.text_dim}-wide word embeddings; "
                    f"{self.backbone.model_name}'s text encoder gives {emb.shape[-1]}: train a module for this model"
                )
            self._queries |= dict(zip(new, emb, strict=True))
        return pad_queries(self._queries, labels)

    @torch.inference_mode()
    def logits(self, features: dict[int, torch.Tensor], labels: Sequence[Sequence[str]]) -> torch.Tensor:
        """Mask logits (B, N, size, size) of each item's labels (padding past an item's own)."""
        self._check(features)
        q, pad = self.queries(labels)
        return self.module({s: f.float() for s, f in features.items()}, q, pad)

    def _check(self, features: dict[int, torch.Tensor]) -> None:
        """A :class:`GroundingError` when the model's features are not those the module was trained on."""
        cfg = self.module.config
        got = {s: int(f.shape[1]) for s, f in features.items()}
        want = dict(zip(cfg.sides, cfg.in_channels, strict=True))
        if any(got.get(s) != c for s, c in want.items()):
            trained = self.record.get("data", {}).get("model", "another model")
            raise GroundingError(
                f"the grounding module {self.record.get('folder', '')} reads block outputs of {want} channels by grid "
                f"side (trained on {trained}); {self.backbone.model_name} gives {got}: train a module for this model "
                "with `attnseg grounding train --model ... --seen WORD ... --out DIR` and pass it with --module DIR"
            )

    def _items(self, prompts, labels, images: np.ndarray, features) -> list[GroundedItem]:
        probs = torch.sigmoid(self.logits(features, labels)).numpy()
        out = []
        for i, (p, labs) in enumerate(zip(prompts, labels, strict=True)):
            pr = _resize(probs[i, : len(labs)], images[i].shape[:2])
            out.append(GroundedItem(p, list(labs), images[i], pr, pr > 0.5))
        return out

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        labels: Sequence[Sequence[str]],
        generators: Sequence[torch.Generator] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[GroundedItem]:
        """Generate one image per prompt and segment its ``labels`` (class words; steps and guidance default to the
        module's training data's, whose last step it was trained on)."""
        data = self.record.get("data", {})
        steps = int(steps if steps is not None else data.get("steps", 20))
        guidance = float(guidance if guidance is not None else data.get("guidance", 5.0))
        with block_features(self.backbone.denoiser, "second_half" if guidance > 1 else "all") as feats:
            images, _ = self.backbone.generate(prompts, steps, guidance, generators)
        images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
        return self._items(prompts, labels, images, feats.by_side())

    @torch.inference_mode()
    def check(self) -> None:
        """A :class:`GroundingError` now, not after a first generation, when this model's features are not those the
        module was trained on (one denoiser forward of a blank image)."""
        blank = np.zeros((self.backbone.native_resolution,) * 2 + (3,), np.uint8)
        latents = self.backbone.encode_images([blank], self.backbone.native_resolution)
        with block_features(self.backbone.denoiser) as feats:
            self.backbone.forward(latents, 1, self.backbone.encode_prompts([""]))
        self._check(feats.by_side())
        self.queries([["object"]])

    @torch.inference_mode()
    def segment(
        self, image: np.ndarray, labels: Sequence[str], timestep: int = 1, prompt: str | None = None, seed: int = 0
    ) -> GroundedItem:
        """Masks of ``labels`` in a real RGB uint8 image: its latent noised to ``timestep`` (default 1, about the last
        generation step's noise) and one denoiser forward with ``prompt`` (default: the paper's template over the
        labels)."""
        text = prompt if prompt is not None else PAPER_TEMPLATE.join(list(labels))[0]
        latents = self.backbone.encode_images([image], self.backbone.native_resolution)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
        with block_features(self.backbone.denoiser) as feats:
            self.backbone.forward(
                self.backbone.add_noise(latents, noise, timestep), timestep, self.backbone.encode_prompts([text])
            )
        return self._items([text], [list(labels)], image[None], feats.by_side())[0]

    def segment_result(
        self, image: np.ndarray, labels: Sequence[str], seed: int = 0, crf: bool | CRFConfig = False, timestep: int = 1
    ) -> SegmentationResult:
        """:meth:`segment` as ``attnseg segment`` writes it: the scores are a constant background of 0.5 followed by
        the labels' probabilities, so that their argmax is the paper's rule (a pixel belongs to a label whose
        probability passes 0.5, to the most probable of several), with a dense CRF over them when asked."""
        item = self.segment(image, labels, timestep=timestep, seed=seed)
        probs = torch.from_numpy(item.probs)
        up = torch.cat([torch.full((1, *probs.shape[1:]), 0.5), probs])
        settings = {"seed": seed, "crf": bool(crf), "timestep": timestep, "module": self.record.get("folder")}
        return make_result(
            image, up, crf_config(crf), labels=list(labels), method="grounding", prompt=item.prompt, settings=settings
        )


def _resize(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) scores to (K, H, W), bilinearly; unchanged when the sizes agree."""
    if probs.shape[1:] == tuple(size):
        return probs.astype(np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(probs)[None].float(), size=size, mode="bilinear", align_corners=False)
    return t[0].numpy()
