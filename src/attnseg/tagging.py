"""Tagging: which words of a candidate vocabulary are in an image, asked of the diffusion model itself.

The diffusion classifier (Li et al. 2023, "Your diffusion model is secretly a zero-shot classifier"): a prompt that
describes the image lets the denoiser predict its training target better (``backbone.denoising_error``). Candidates
are compared on the same (timestep, noise) pairs, so that how hard a noise is cancels between them. An image holds
several objects, so the labels are found as a caption, one word per round::

    round 1: score(w) = mean over pairs of [e("") - e("a photo of a w")] / e("")
    round 2: score(w) = mean over pairs of [e(c) - e(c + " and a w")] / e(c), c the caption of the words chosen so far

the share of the caption's denoising error that the word removes. Each round takes its best word; from the second
round on only while that word removes at least ``min_gain`` of the error, at most ``max_labels`` words. Scoring each
word alone against the empty prompt, and keeping those near the best, fails on scenes of several objects: there a
caption naming only one of them mostly denoises worse than the empty prompt (validation scenes: shape F1 at best 70
that way, 81 with the rounds, on the same error measurements; docs/BENCHMARKS.md).

Within a round every candidate sees the first ``prune_after`` pairs; those whose score is more than ``prune_margin``
below the best one's are dropped and only the rest see the remaining pairs (the paper's adaptive evaluation, with a
margin instead of a fixed number kept).

    tagger = Tagger(predictor.backbone)
    results = tagger.tag(predictor.encode_images(images), ["circle", "square", "star"])
    results[0].labels, results[0].scores
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnseg.diffusion.prompts import PromptTemplate, compose_prompt

CAPTION = PromptTemplate("caption", "a photo of a ", " and a ", " and a ", "")
"""Captions as the embedded model was trained on ("a photo of a red circle and a star")."""


@dataclass(frozen=True)
class TagConfig:
    """Settings of the tagger. The paper's role of each is named; the values are ours, chosen on validation scenes
    of the embedded model (ShapesWorld world seed 3, docs/BENCHMARKS.md)."""

    template: PromptTemplate = CAPTION
    """How the words of a caption are joined (the paper: one template per dataset)."""
    timesteps: tuple[int, ...] = (20, 100, 600, 800)
    """Timesteps (of T = 1000) every candidate is evaluated at. The paper spreads them uniformly over [0, T). On the
    embedded model small timesteps tell shapes apart (the best word is right for 90% of scenes at t = 100, 35% at 900)
    and large ones colours (95% at 800, 10-25% at 100 or less); with both, validation F1 was 83 for shapes and 67 for
    colour-shape phrases, against 81 and 28 with (20, 50, 100)."""
    noises: int = 2
    """Pairs per timestep, each with a noise of its own; every (timestep, noise) pair is shared by all candidates and
    images (the paper: the same pairs for every class). More pairs did not tag shapes better on validation scenes."""
    prune_after: int = 2
    """Pairs every candidate of a round sees before pruning; pairs go over the timesteps once per noise, so the first
    ones are the smallest timesteps. ``len(timesteps) * noises`` or more: no pruning."""
    prune_margin: float = 0.15
    """After ``prune_after`` pairs, a candidate whose score is more than this below the best one's is dropped. On
    validation scenes it saved 22% of the forwards for 8 shapes (one true label of 79 lost) and 23% for 64 phrases."""
    min_gain: float = 0.03
    """From the second round on, the round's best word is added only when it removes at least this share of the
    caption's error; the first word is always added (an image is assumed to hold one thing of the vocabulary).
    Validation: F1 of the shape labels within 0.02 of its best for 0.02 to 0.05."""
    max_labels: int = 3
    """At most this many labels an image (ShapesWorld scenes hold 1-3 objects)."""
    seed: int = 0
    """Seed of the noise draws."""

    def __post_init__(self) -> None:
        if not self.timesteps or not all(0 <= int(t) < 1000 for t in self.timesteps):
            raise ValueError(f"tag timesteps {self.timesteps} must be one or more integers in [0, 1000)")
        if self.noises < 1 or self.prune_after < 1 or self.max_labels < 1:
            raise ValueError("noises, prune_after and max_labels must be at least 1")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(timestep, noise index) in evaluation order: the timesteps once per noise, each pair its own noise."""
        return [(int(t), d * len(self.timesteps) + i) for d in range(self.noises) for i, t in enumerate(self.timesteps)]


@dataclass
class TagResult:
    """One image's tags. ``labels``: the chosen words in the order chosen. ``scores``: each word's score in the last
    round it was evaluated in: for a label, the share of the error it removed when it was added; for another word, the
    share it would have removed in the image's last round (over the pairs it saw, if pruned then). ``pruned``: the
    words dropped in that last round."""

    labels: list[str]
    scores: dict[str, float]
    pruned: list[str] = field(default_factory=list)


def relative_gain(base: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """Scores (N, K) from the current captions' errors ``base`` (N, R) and the candidates' (N, K, R) on R pairs: the
    mean over the pairs a candidate was evaluated on (not NaN) of (base - candidate) / base."""
    return ((base[:, None, :] - errors) / base[:, None, :].clamp_min(1e-12)).nanmean(dim=-1)


def survivors(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """(N, K) bool: candidates whose score is at most ``margin`` below the best of their row (NaN: not a candidate)."""
    best = torch.nan_to_num(scores, nan=-math.inf).amax(dim=-1, keepdim=True)
    return scores >= best - margin


class Tagger:
    """The diffusion classifier on a backbone (:mod:`attnseg.diffusion.backbone`); ``max_batch`` rows per forward."""

    def __init__(self, backbone, config: TagConfig | None = None, max_batch: int = 16) -> None:
        self.backbone = backbone
        self.config = config or TagConfig()
        self.max_batch = max_batch

    def caption(self, words: Sequence[str]) -> str:
        return compose_prompt(words, self.config.template).text if words else ""

    @torch.inference_mode()
    def tag(self, latents: torch.Tensor, vocabulary: Sequence[str]) -> list[TagResult]:
        """Tags of each image of ``latents`` (N, C, h, w), as ``encode_images`` gives them, from ``vocabulary``.

        An image's result does not depend on the others of its batch: the noises are drawn once per call, the same for
        every image and candidate.
        """
        words = list(dict.fromkeys(" ".join(w.split()) for w in vocabulary if w.strip()))
        if not words:
            raise ValueError("the vocabulary is empty: give at least one candidate word")
        cfg = self.config
        n, k = len(latents), len(words)
        g = torch.Generator().manual_seed(int(cfg.seed))
        noise = torch.randn((len(cfg.pairs), *latents.shape[1:]), generator=g).to(latents.device, latents.dtype)
        chosen: list[list[int]] = [[] for _ in range(n)]
        base = torch.stack([self._errors(latents, noise, [(i, "") for i in range(n)], p) for p in cfg.pairs], dim=1)
        scores = torch.full((n, k), math.nan)
        pruned = torch.zeros((n, k), dtype=torch.bool)
        adding = torch.ones(n, dtype=torch.bool)  # images whose caption may still grow
        for rnd in range(min(cfg.max_labels, k)):
            active = adding[:, None].repeat(1, k)
            for i, c in enumerate(chosen):
                active[i, c] = False
            errors, dropped = self._round(latents, noise, words, chosen, base, active)
            pruned[adding] = dropped[adding]
            gain = relative_gain(base, errors)
            scores = torch.where(gain.isnan(), scores, gain)
            best = torch.nan_to_num(torch.where(active & ~dropped, gain, math.nan), nan=-math.inf).argmax(dim=1)
            for i in adding.nonzero().flatten().tolist():
                b = int(best[i])
                if rnd == 0 or float(gain[i, b]) >= cfg.min_gain:
                    chosen[i].append(b)
                    base[i] = errors[i, b]
                else:
                    adding[i] = False
            if not adding.any():
                break
        return [
            TagResult(
                labels=[words[c] for c in chosen[i]],
                scores={w: round(float(s), 5) for w, s in zip(words, scores[i], strict=True)},
                pruned=[w for w, p in zip(words, pruned[i], strict=True) if p],
            )
            for i in range(n)
        ]

    def _round(self, latents, noise, words, chosen, base, active) -> tuple[torch.Tensor, torch.Tensor]:
        """One round over the ``active`` (N, K) candidates, each appended to its image's ``chosen`` words: their errors
        (N, K, R) on the pairs they saw (NaN elsewhere) and the (N, K) mask of those pruned after ``prune_after``."""
        cfg = self.config
        errors = torch.full((*active.shape, len(cfg.pairs)), math.nan)
        dropped = torch.zeros_like(active)
        for j, pair in enumerate(cfg.pairs):
            rows = (active & ~dropped).nonzero().tolist()
            texts = [(i, self.caption([words[c] for c in chosen[i]] + [words[w]])) for i, w in rows]
            if rows:
                errors[[i for i, _ in rows], [w for _, w in rows], j] = self._errors(latents, noise, texts, pair)
            if j + 1 == cfg.prune_after:
                dropped = active & ~survivors(relative_gain(base, errors), cfg.prune_margin)
        return errors, dropped

    def _errors(self, latents: torch.Tensor, noise: torch.Tensor, rows: list[tuple[int, str]], pair) -> torch.Tensor:
        """(len(rows),) denoising errors of (image index, prompt) rows at one (timestep, noise index) pair."""
        t, d = pair
        out = []
        for c0 in range(0, len(rows), self.max_batch):
            chunk = rows[c0 : c0 + self.max_batch]
            z = latents[[i for i, _ in chunk]]
            text = self.backbone.encode_prompts([p for _, p in chunk])
            out.append(self.backbone.denoising_error(z, noise[d].expand_as(z), t, text).float().cpu())
        return torch.cat(out)
