"""The predictor: encode an image once, then segment it for any list of labels.

    predictor = AttnSegPredictor.from_pretrained()          # the embedded model
    predictor.set_image("scene.png")
    result = predictor.segment(["red circle", "blue star"], method="t2m")
    result.mask, result.scores, result.confidence

Data path: image -> latents (``backbone.encode_images``) -> noised at the method's timestep -> one denoiser
forward per noise draw with the method's layers captured (``backbone.forward``) -> the method's per-label
scores (:mod:`attnseg.methods`) -> upsampled to the input size, averaged over draws -> optional dense CRF ->
argmax and confidence (:mod:`attnseg.ops.refine`). Everything model-specific goes through the backbone
(:mod:`attnseg.diffusion.backbone`); everything method-specific through the registry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.loading import ModelError, backbone_for, load_pipeline, profile_path, read_profile
from attnseg.diffusion.prompts import SYNONYM_SETS, TokenSpans, compose_prompt
from attnseg.io.images import load_image, resize_pad
from attnseg.methods.base import fused_cross
from attnseg.methods.diffseg import DiffSegConfig, assign
from attnseg.methods.interactive import Interactive, VisualPrompt, clip_to_boxes, initial_maps
from attnseg.methods.registry import NOTHING, REAL, check_profile, get_method, names, resolve
from attnseg.methods.t2m import PAD_COLOUR, code_size
from attnseg.ops.maps import columns_to_images
from attnseg.ops.refine import CRFConfig
from attnseg.personal_concepts import PersonalConcepts
from attnseg.results import SegmentationResult, crf_config, make_result

PROMPT_CACHE_SIZE = 256
"""Composed prompts (labels and template -> text and token spans) kept per predictor."""
CAPTURE_BUDGET = 2 << 30
"""Bytes of captured maps one forward may hold: with many large self maps (every joint layer of SD3 at 1024 px is
64 MiB a row) a forward takes fewer rows than ``max_batch``."""


def _prompt_record(p: VisualPrompt) -> dict:
    """A visual prompt as the result's settings record it (a scribble by its pixel count, not its pixels)."""
    if p.kind == "scribble":
        return {"scribble_pixels": int(np.count_nonzero(p.scribble))}
    return {"points": [list(xy) for xy in p.points]} if p.kind == "point" else {"box": list(p.box)}


def _settings(method) -> dict:
    """The method's config as recorded in each result (tuples as lists, as JSON has them)."""
    cfg = method.config
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


class AttnSegPredictor(PersonalConcepts):
    """Open-vocabulary segmentation of real images from a diffusion model's attention.

    ``model`` is a loaded pipeline or a backbone (:mod:`attnseg.diffusion.backbone`).
    """

    def __init__(self, model, resolution: int | None = None, max_batch: int = 16) -> None:
        self.backbone = model if hasattr(model, "encode_prompts") else backbone_for(model)
        self.resolution = int(resolution or self.backbone.native_resolution)
        self.max_batch = max_batch
        self.model_name = self.backbone.model_name
        self.weights = self.backbone.weights
        profile, self.vocabulary = read_profile(self.pipe)
        """``vocabulary``: the words the model was trained on, when its ``attnseg.json`` lists them."""
        problems = check_profile(profile)
        if problems:
            raise ModelError(f"{profile_path(self.pipe)} names {problems[0]}; fix or delete it")
        self.profile_presets = profile
        """{method: preset} the model folder's ``attnseg.json`` recommends."""
        self.default_presets = {**getattr(self.backbone, "default_presets", {}), **profile}
        """{method: preset} used when a call names no preset: the model folder's ``attnseg.json``, else the family's."""
        self._latents: torch.Tensor | None = None
        self._latent_std: torch.Tensor | None = None
        self._images: list[np.ndarray] = []
        self._padded: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """The posteriors of ``_images`` resized and padded as T2M's code does, by padded size (``resize="code"``)."""
        self._prompt_cache: OrderedDict[tuple, tuple[str, TokenSpans]] = OrderedDict()

    @classmethod
    def from_pretrained(cls, model=None, device: str | None = "cpu", dtype="auto", quiet: bool = True, **kw) -> AttnSegPredictor:
        """Load ``model`` (None or "embedded": the embedded UNet model; "embedded-sd3": the embedded SD3 model; a folder;
        a hub id); ``quiet`` hides the libraries' loading noise."""
        return cls(load_pipeline(model, device=device, dtype=dtype, quiet=quiet), **kw)

    @property
    def pipe(self):
        """The diffusers pipeline behind the backbone."""
        return self.backbone.pipe

    @property
    def inventory(self):
        """The model's attention layers (:class:`~attnseg.diffusion.layers.LayerInfo`)."""
        return self.backbone.layers

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    # ------------------------------------------------------------------ encoding

    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Latents of RGB uint8 images, resized to the predictor's resolution."""
        return self.backbone.encode_images(images, self.resolution, self.max_batch)

    def encode_posteriors(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean (the latents of ``encode_images``) and standard deviation of RGB uint8 images."""
        return self.backbone.encode_posteriors(images, self.resolution, self.max_batch)

    def set_image(self, image) -> None:
        """Encode one image (path, PIL image or array) once for later ``segment`` calls."""
        self.set_images([image])

    def set_images(self, images: Sequence) -> None:
        self._images = [load_image(im) for im in images]
        self._latents, self._latent_std = self.encode_posteriors(self._images)
        self._padded = {}

    # ------------------------------------------------------------------ segmentation

    def method(self, name: str, preset: str | None = None, **overrides):
        """The method object for ``name`` with ``preset`` (None: the model's recommended one, else the paper's)."""
        return get_method(name, preset or self.default_presets.get(name), **overrides)

    def unknown_words(self, labels: Sequence[str]) -> list[str]:
        """Words of ``labels`` the model does not know: not in its listed vocabulary, or, for a model that lists
        none, split by its tokenizer into several sub-word pieces (rare words; often unknown)."""
        words = dict.fromkeys(w for lab in labels for w in str(lab).lower().replace(",", " ").split())
        if self.vocabulary is not None:
            known = {w.lower() for w in self.vocabulary}
            return [w for w in words if w not in known]
        return [w for w in words if self.backbone.word_pieces(w) > 1]

    def check_method(self, name: str, preset: str | None = None) -> None:
        """Raise ``ValueError`` naming the model's layers when the method's layers do not exist in this model."""
        m = self.method(name, preset)
        try:
            m.plan(self.inventory, self.backbone.latent_side(self.resolution))
        except ValueError as e:
            used = preset or self.default_presets.get(name) or "the paper's preset"
            raise ValueError(f"{name} ({used}) cannot read this {self.backbone.family} model: {e}") from None

    def prompt_for(self, labels: Sequence[str], method, preset: str | None = None) -> tuple[str, TokenSpans]:
        """The prompt text of ``labels`` for ``method`` (a name or a method object) and its label token spans.

        Raises ``ValueError`` when a label cannot be placed (empty, or beyond the tokenizer's limit).
        """
        cfg = (self.method(method, preset) if isinstance(method, str) else method).config
        synonyms = getattr(cfg, "synonyms", False)
        synonyms = "voc" if synonyms is True else synonyms or None
        if synonyms is not None and synonyms not in SYNONYM_SETS:
            raise ValueError(f"unknown synonyms {synonyms!r}: use {', '.join(SYNONYM_SETS)} or none")
        background = tuple(getattr(cfg, "background_words", ()))
        per_label = getattr(cfg, "class_background_words", None)
        if per_label:  # each label's own words, in label order, without repeats
            background = tuple(dict.fromkeys(w for lab in labels for w in per_label.get(lab, background)))
        key = (tuple(labels), cfg.template, synonyms, background)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        prompt = compose_prompt(labels, cfg.template, synonyms=SYNONYM_SETS.get(synonyms), background_words=background)
        out = (prompt.text, self.backbone.token_spans(prompt.text, prompt.char_spans, prompt.labels))
        self._prompt_cache[key] = out
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return out

    @torch.inference_mode()
    def score_maps(
        self,
        latents: torch.Tensor,
        label_lists: Sequence[Sequence[str]],
        method,
        draws: int,
        seed: int = 0,
        latent_std: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[str], list[list[float]]]:
        """Per-image (K_i + 1, h, w) scores on the method's grid averaged over ``draws``, prompts, label presences.

        ``latents`` are posterior means; a method whose config asks for ``posterior="sample"`` draws each noise
        draw's latent from the posterior, which needs ``latent_std``.
        """
        bb = self.backbone
        n = len(latents)
        prompts = [self.prompt_for(labs, method) for labs in label_lists]
        text = bb.encode_prompts([p for p, _ in prompts])
        plan = method.plan(bb.layers, tuple(latents.shape[-2:]))
        cfg = method.config
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((draws, *latents.shape[1:]), generator=g).to(self.device, latents.dtype)
        posterior = getattr(cfg, "posterior", "mean")
        if posterior not in ("mean", "sample"):
            raise ValueError(f"unknown posterior {posterior!r}: use 'mean' or 'sample'")
        if posterior == "sample":
            if latent_std is None:
                raise ValueError("posterior='sample' needs the latents' standard deviation (encode_posteriors)")
            # one posterior noise per draw, as the diffusion noise: an image's result does not depend on its batch
            eps = torch.randn((draws, *latents.shape[1:]), generator=g).to(self.device, latents.dtype)
        rows = [(i, d) for i in range(n) for d in range(draws)]
        concepts = None
        if plan.concepts:  # ConceptAttention: each image's labels as concept tokens, so a forward holds one image
            concepts = [bb.concept_states([*labs, *plan.concept_background]) for labs in label_lists]
        n_text = int(text.hidden.shape[1]) + max((len(c) for c in concepts or []), default=0)
        chunk_rows = self._rows_per_forward(plan, tuple(latents.shape[-2:]), n_text)
        if concepts:
            chunks = [
                rows[i * draws + d0 : i * draws + min(draws, d0 + chunk_rows)]
                for i in range(n)
                for d0 in range(0, draws, chunk_rows)
            ]
        else:
            chunks = [rows[c0 : c0 + chunk_rows] for c0 in range(0, len(rows), chunk_rows)]
        sums: list[torch.Tensor | None] = [None] * n
        foreground_first = getattr(method, "averages_foreground", False)  # T2M's code: background rule after the mean
        peaks: list[torch.Tensor | None] = [None] * n
        key_scale = None
        if plan.key_scale_gamma is not None:
            key_scale = torch.ones((n, text.hidden.shape[1]), dtype=torch.float32)
            for i, (_, sp) in enumerate(prompts):
                for s in sp.spans:
                    key_scale[i, s] = plan.key_scale_gamma
        for chunk in chunks:
            idx = torch.tensor([i for i, _ in chunk])
            z0 = latents[idx]
            if posterior == "sample":
                z0 = z0 + latent_std[idx] * eps[[d for _, d in chunk]]
            z = bb.add_noise(z0, noise[[d for _, d in chunk]], cfg.timestep)
            ks = key_scale[idx] if key_scale is not None else None
            extra = {"concepts": concepts[chunk[0][0]]} if concepts else {}  # only transformer backbones take them
            store = bb.forward(
                z,
                cfg.timestep,
                text.rows(idx),
                plan.names,
                per_head=plan.per_head,
                key_scale=ks,
                scale_values=plan.scale_values,
                **extra,
            )
            for i in sorted(set(idx.tolist())):
                r = [j for j, (ii, _) in enumerate(chunk) if ii == i]
                rows_i = store.rows(r)
                sc = (method.foreground if foreground_first else method.scores)(rows_i, prompts[i][1], plan)  # (R, P, K[+1])
                s = sc.float().sum(dim=0)
                sums[i] = s if sums[i] is None else sums[i] + s
                if plan.cross:
                    pk = (
                        fused_cross(rows_i, plan.cross, prompts[i][1], plan.grid, heads=plan.cross_heads)
                        .float()
                        .amax(dim=1)
                        .sum(dim=0)
                    )  # (K,)
                    peaks[i] = pk if peaks[i] is None else peaks[i] + pk
        means = [(s / draws)[None] for s in sums]
        if foreground_first:
            means = [method.with_background(m) for m in means]
        out = [columns_to_images(m, plan.grid)[0].cpu() for m in means]
        presence = [(pk / pk.max().clamp_min(1e-12)).tolist() if pk is not None else [] for pk in peaks]
        return out, [p for p, _ in prompts], presence

    def _rows_per_forward(self, plan, latent: tuple[int, int], n_text: int) -> int:
        """Rows of one forward: ``max_batch``, fewer when the plan's captured maps would pass ``CAPTURE_BUDGET``."""
        layers = {lay.name: lay for lay in self.inventory}
        per_row = 0
        for name in plan.names:
            lay = layers.get(name) or layers[name.replace(":concept", ":cross")]  # a concept map: as its module's cross
            p = lay.pixels(latent)
            per_row += 4 * p * (n_text if lay.kind == "cross" else p) * (lay.heads if name in plan.per_head else 1)
        return max(1, min(self.max_batch, CAPTURE_BUDGET // max(per_row, 1)))

    def segment(
        self,
        labels: Sequence[str],
        method: str | object = "t2m",
        preset: str | None = None,
        draws: int | None = None,
        seed: int = 0,
        crf: bool | CRFConfig = False,
        **overrides,
    ) -> SegmentationResult:
        """Segment the image of ``set_image`` for ``labels``."""
        if self._latents is None:
            raise RuntimeError("call set_image(...) before segment(...)")
        if len(self._images) != 1:
            raise RuntimeError("set_images holds several images: use segment_batch")
        posterior = (self._latents, self._latent_std)
        return self._segment(posterior, self._images, [list(labels)], method, preset, draws, seed, crf, overrides)[0]

    def segment_batch(
        self,
        images: Sequence,
        labels: Sequence[Sequence[str]],
        method: str | object = "t2m",
        preset: str | None = None,
        draws: int | None = None,
        seed: int = 0,
        crf: bool | CRFConfig = False,
        **overrides,
    ) -> list[SegmentationResult]:
        """Segment several images (each with its own labels) in batched forwards."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label lists")
        arrays = [load_image(im) for im in images]
        if isinstance(method, str) and method in names(REAL, NOTHING):  # encodes the images itself
            return self._segment_unlabelled(method, arrays, labels, preset, seed, crf)
        posterior = lambda: self.encode_posteriors(arrays)  # noqa: E731 - only where the method reads the square image
        return self._segment(posterior, arrays, [list(x) for x in labels], method, preset, draws, seed, crf, overrides)

    @torch.inference_mode()
    def segment_prompts(
        self,
        prompts: Sequence[VisualPrompt],
        preset: str | None = None,
        seed: int = 0,
        crf: bool | CRFConfig = False,
        **overrides,
    ) -> SegmentationResult:
        """Segment the image of ``set_image`` for visual prompts, one object each (iSeg's interactive mode).

        Mask index i is the i-th prompt, labelled with its ``name`` or "point i", "box i", "scribble i". One
        forward reads the self-attention; the prompts' initial maps are refined by Ent-Self
        (:mod:`attnseg.methods.interactive`).
        """
        if self._latents is None:
            raise RuntimeError("call set_image(...) before segment_prompts(...)")
        if len(self._images) != 1:
            raise RuntimeError("set_images holds several images: prompts are given per image; use set_image")
        if not prompts:
            raise ValueError("give at least one point, box or scribble")
        img = self._images[0]
        hw = img.shape[:2]
        for p in prompts:
            p.check(hw)
        preset = preset or self.default_presets.get("interactive")
        _, _, cfg = resolve("interactive", preset)
        method = Interactive(replace(cfg, **overrides))
        bb = self.backbone
        plan = method.plan(bb.layers, tuple(self._latents.shape[-2:]))
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(self._latents.shape[1:], generator=g)[None].to(self.device, self._latents.dtype)
        z = bb.add_noise(self._latents, noise, method.config.timestep)
        store = bb.forward(
            z, method.config.timestep, bb.encode_prompts([method.config.prompt]), plan.names, per_head=plan.per_head
        )
        sc = method.scores(store, initial_maps(prompts, hw, plan.grid)[None], plan)
        up = F.interpolate(columns_to_images(sc.float().cpu(), plan.grid), size=hw, mode="bilinear", align_corners=False)[0]
        if method.config.clip_to_box:
            up = clip_to_boxes(up, prompts)
        crf_cfg = crf_config(crf)
        settings = {
            **_settings(method),
            "preset": preset,
            "seed": seed,
            "crf": crf_cfg is not None,
            "resolution": self.resolution,
        }
        settings["prompts"] = [_prompt_record(p) for p in prompts]
        return make_result(
            img,
            up,
            crf_cfg,
            labels=[p.label(i) for i, p in enumerate(prompts, start=1)],
            method=method.name,
            prompt=method.config.prompt,
            settings=settings,
        )

    @torch.inference_mode()
    def segment_unsupervised(
        self,
        images: Sequence,
        config: DiffSegConfig | str | None = None,
        seed: int = 0,
        proposals: bool = False,
        method: str = "diffseg",
    ) -> list[np.ndarray]:
        """Class-agnostic segments (H, W) int64 of each image, from self-attention alone: ``method`` "diffseg", or
        "diffseg-iseg" (DiffSeg's segments refined by iSeg).

        ``config``: the method's config or one of its preset names; None takes the model's own preset (its
        ``attnseg.json``) if it names one, else the paper's settings. ``proposals``: return each image's merged
        proposal maps (Q, s, s) on the attention grid instead.
        """
        given = config is not None and not isinstance(config, str)
        info, _, cfg = resolve(method, None if given else config or self.default_presets.get(method), REAL, NOTHING)
        segmenter = info.build(config if given else cfg)
        cfg = segmenter.config
        bb = self.backbone
        arrays = [load_image(im) for im in images]
        latents = self.encode_images(arrays)
        plan = segmenter.plan(bb.layers, tuple(latents.shape[-2:]))
        text = bb.encode_prompts([cfg.prompt] * len(arrays))
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(latents.shape[1:], generator=g).to(self.device, latents.dtype).expand_as(latents)
        out = []
        step = 2  # every self-attention layer is kept: at 512 px the 64-px layers alone are ~300 MB an image
        for i0 in range(0, len(arrays), step):
            sl = slice(i0, i0 + step)
            z = bb.add_noise(latents[sl], noise[sl], cfg.timestep) if cfg.noised else latents[sl]
            store = bb.forward(z, cfg.timestep, text.rows(sl), plan.self_names)
            for props, img in zip(segmenter.proposals(store, plan), arrays[sl], strict=True):
                out.append(props.float().cpu().numpy() if proposals else assign(props.float().cpu(), img.shape[:2]).numpy())
        return out

    def _segment_unlabelled(self, method, images, label_lists, preset, seed, crf) -> list[SegmentationResult]:
        """Unsupervised segments as results: label i is "segment i", scores the upsampled proposals after an all-zero
        background row (no pixel is background), mask their argmax (the segments of ``segment_unsupervised``)."""
        if any(label_lists):
            raise ValueError(f"{method} segments without labels; pass none (labels=[])")
        if crf:
            raise ValueError(f"--crf refines class scores of labelled methods; {method}'s segments have none")
        name = preset or self.default_presets.get(method)
        _, _, cfg = resolve(method, name)
        results = []
        for img, props in zip(images, self.segment_unsupervised(images, name, seed, True, method), strict=True):
            h, w = img.shape[:2]
            up = F.interpolate(torch.from_numpy(props)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            up = torch.cat([torch.zeros((1, h, w)), up])
            results.append(
                make_result(
                    img,
                    up,
                    None,
                    labels=[f"segment {i}" for i in range(1, len(props) + 1)],
                    method=method,
                    prompt=cfg.prompt,
                    settings={**asdict(cfg), "preset": preset, "seed": seed, "crf": False, "resolution": self.resolution},
                )
            )
        return results

    @property
    def size_multiple(self) -> int:
        """Image sides that give whole pixels at every attention level: the VAE's factor x 2^(deepest level)."""
        r = self.resolution
        return r // self.backbone.latent_side(r) * 2 ** max(lay.level for lay in self.inventory)

    def _posterior_groups(self, images, posterior, config) -> list[tuple[list[int], int | list[int], tuple, list]]:
        """[(image indices, size read, (mean, std), valid regions)]: every image in ``posterior`` (square, at the
        predictor's resolution; no padding; a callable is called for it), or, with ``config.resize == "code"``, the
        images resized and padded as T2M's code does (:func:`~attnseg.methods.t2m.code_size`, its sizes scaled by the
        predictor's resolution / 512) and encoded at their padded sizes, one group per size (those of the images of
        ``set_image`` kept for later calls), each image's valid region (h', w') the top-left part of it."""
        resize = getattr(config, "resize", "square")
        if resize not in ("square", "code"):
            raise ValueError(f"unknown resize {resize!r}: use 'square' or 'code'")
        if resize == "square":
            return [
                (
                    list(range(len(images))),
                    self.resolution,
                    posterior() if callable(posterior) else posterior,
                    [None] * len(images),
                )
            ]
        scale = self.resolution / 512
        sizes = [code_size(*im.shape[:2], scale, self.size_multiple) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, padded) in enumerate(sizes):
            groups.setdefault(padded, []).append(i)
        cache = self._padded if images is self._images else {}
        out = []
        for padded, idx in groups.items():
            if padded not in cache:
                arrays = [resize_pad(images[i], sizes[i][0], padded, PAD_COLOUR) for i in idx]
                cache[padded] = self.backbone.encode_posteriors(arrays, padded, self.max_batch)
            out.append((idx, list(padded), cache[padded], [sizes[i][0] for i in idx]))
        return out

    def _segment(self, posterior, images, label_lists, method, preset, draws, seed, crf, overrides):
        """``posterior``: the images' latents (posterior means) and their standard deviations at the predictor's square
        resolution, or a callable that encodes them (called only by a method that reads the square image)."""
        if isinstance(method, str) and method in names(REAL, NOTHING):
            return self._segment_unlabelled(method, images, label_lists, preset, seed, crf)
        if isinstance(method, str):
            preset = preset or self.default_presets.get(method)
            m = self.method(method, preset, **overrides)
        else:
            m = method
        n_draws = int(draws if draws is not None else getattr(m.config, "draws", 1))
        if n_draws < 1:
            raise ValueError("draws must be at least 1")
        n = len(images)
        maps, texts, presences, sizes, valid = [None] * n, [""] * n, [[]] * n, [self.resolution] * n, [None] * n
        for idx, size, (mean, std), regions in self._posterior_groups(images, posterior, m.config):
            group = self.score_maps(mean, [label_lists[i] for i in idx], m, n_draws, seed, latent_std=std)
            for i, sc, text, presence, region in zip(idx, *group, regions, strict=True):
                maps[i], texts[i], presences[i], sizes[i], valid[i] = sc, text, presence, size, region
        results = []
        crf_cfg = crf_config(crf)
        for img, labs, sc, text, presence, size, region in zip(
            images, label_lists, maps, texts, presences, sizes, valid, strict=True
        ):
            h, w = img.shape[:2]
            sc = sc[None].float()
            if region is not None:  # padded: the scores at the padded size, the image's part of them
                sc = F.interpolate(sc, size=tuple(size), mode="bilinear", align_corners=False)[:, :, : region[0], : region[1]]
            up = F.interpolate(sc, size=(h, w), mode="bilinear", align_corners=False)[0]
            settings = {**_settings(m), "preset": preset, "draws": n_draws, "seed": seed, "crf": crf_cfg is not None}
            settings["resolution"] = size
            results.append(
                make_result(
                    img,
                    up,
                    crf_cfg,
                    labels=list(labs),
                    method=m.name,
                    prompt=text,
                    settings=settings,
                    presence=[round(p, 4) for p in presence],
                )
            )
        return results
