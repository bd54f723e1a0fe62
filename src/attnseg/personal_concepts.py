"""Personal concepts on a predictor: load a concept learned by ``attnseg personalize`` and segment referring queries
that name it ("a <my-mug> mug with cola"; T2M section 5.3). A mixin of :class:`~attnseg.predictor.AttnSegPredictor`,
as diffusers' loader mixins are of its pipelines: it reads the predictor's model, image and T2M method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from attnseg.diffusion.concepts import Concept, ConceptError, applied, apply_concept, concept_digest
from attnseg.diffusion.concepts import load_concept as read_concept
from attnseg.diffusion.prompts import TokenSpans, find_phrase_spans
from attnseg.methods.base import mean_self
from attnseg.methods.personal import (
    PersonalConfig,
    PersonalMaps,
    assign_af,
    assign_bf,
    attribution_words,
    compared,
    mask_segments,
    region_mask,
    region_segments,
    segment_scores,
    spatial_affinity,
)
from attnseg.results import SegmentationResult, make_result


class PersonalConcepts:
    """Loading personal concepts and segmenting queries that name them. It reads the predictor's ``pipe``,
    ``backbone``, ``vocabulary``, ``default_presets``, ``resolution``, ``device``, ``method`` and the image of
    ``set_image``, and clears its prompt cache when a concept adds a word."""

    def load_concept(self, concept: str | Concept) -> Concept:
        """Put a personal concept (a file of ``attnseg personalize`` or a :class:`Concept`) on the model: its token can
        then be used in labels ("a <my-mug> mug with cola"). Refused (``ConceptError``) when learned on another model."""
        c = read_concept(concept) if not isinstance(concept, Concept) else concept
        apply_concept(self.pipe, c)
        if self.vocabulary is not None:
            self.vocabulary = [*self.vocabulary, c.token]
        self.backbone.clear_text_cache()
        self._prompt_cache.clear()
        return c

    @property
    def concepts(self) -> dict[str, Concept]:
        """{token: concept} of the loaded concepts."""
        return dict(applied(self.pipe))

    def personal_config(self, config: PersonalConfig | None = None) -> PersonalConfig:
        """``config`` (default: the defaults) with its T2M preset resolved: the model's default when it names none,
        so that a result records the preset its maps were made with."""
        cfg = config or PersonalConfig()
        return replace(cfg, t2m_preset=cfg.t2m_preset or self.default_presets.get("t2m"))

    def concept_record(self) -> dict[str, dict[str, str]]:
        """{token: {class, method, digest}} of the loaded concepts, as a personal result's settings record them."""
        return {t: {"class": c.class_word, "method": c.method, "digest": concept_digest(c)} for t, c in self.concepts.items()}

    def concept_class(self, queries: Sequence[str]) -> str:
        """The class word of the concepts named in ``queries`` (all must share one)."""
        loaded = self.concepts
        classes = {loaded[w].class_word for q in queries for w in q.split() if w in loaded}
        if len(classes) != 1:
            what = "no loaded concept" if not classes else f"concepts of several classes ({', '.join(sorted(classes))})"
            raise ConceptError(f"the queries {list(queries)} name {what}: give the class word (class_word=..., --class)")
        return classes.pop()

    @torch.inference_mode()
    def personal_maps(
        self, queries: Sequence[str], class_word: str | None = None, config: PersonalConfig | None = None, seed: int = 0
    ) -> PersonalMaps:
        """Personalized referring segmentation (T2M section 5.3) of the image of ``set_image`` on the attention grid:
        the class region ("a photo including <class>."), the segments of that region or of the whole image
        (``config.class_region``), each query's attribution per segment, and the bf / af assignments
        (:mod:`attnseg.methods.personal`)."""
        if self._latents is None or len(self._images) != 1:
            raise RuntimeError("call set_image(...) with one image before personal_maps(...)")
        cfg = self.personal_config(config)
        queries = [" ".join(str(q).split()) for q in queries]
        if not queries or not all(queries):
            raise ValueError("give at least one non-empty query, e.g. 'a <my-mug> mug with cola'")
        cls = class_word or self.concept_class(queries)
        t2m = self.method("t2m", cfg.t2m_preset)
        if t2m.config.resize != "square":
            raise ValueError(
                f"personal segmentation reads the image at the model's square size; T2M preset {cfg.t2m_preset!r} "
                f"resizes it as {t2m.config.resize!r}: choose another"
            )
        bb = self.backbone
        plan = t2m.plan(bb.layers, tuple(self._latents.shape[-2:]))
        region_text = cfg.region_template.format(cls=cls)
        texts = [region_text, *queries]
        spans = [bb.token_spans(region_text, find_phrase_spans(region_text, [cls]), [cls])]
        for q in queries:
            words = attribution_words(q, cls)
            ts = bb.token_spans(q, find_phrase_spans(q, words), words)
            spans.append(TokenSpans(ts.input_ids, [sorted({p for sp in ts.spans for p in sp})], [q]))
        text = bb.encode_prompts(texts)
        g = torch.Generator().manual_seed(int(seed))
        fg = bg = self_attn = inst = None
        for _ in range(max(1, cfg.draws)):
            noise = torch.randn(self._latents.shape[1:], generator=g).to(self.device, self._latents.dtype)
            z = bb.add_noise(
                self._latents.expand(len(texts), -1, -1, -1), noise[None].expand(len(texts), -1, -1, -1), t2m.config.timestep
            )
            store = bb.forward(z, t2m.config.timestep, text, plan.names)
            reg = t2m.scores(store.rows([0]), spans[0], plan)[0].float()  # (P, 2): background, class
            sa = mean_self(store.rows([0]), plan.self_names)[0].float()
            ins = torch.stack(
                [t2m.foreground(store.rows([i + 1]), spans[i + 1], plan)[0, :, 0].float() for i in range(len(queries))]
            )
            fg, bg = (reg[:, 1], reg[:, 0]) if fg is None else (fg + reg[:, 1], bg + reg[:, 0])
            self_attn, inst = (sa, ins) if self_attn is None else (self_attn + sa, inst + ins)
        n = max(1, cfg.draws)
        fg, bg, self_attn, inst = fg / n, bg / n, self_attn / n, inst / n
        if cfg.class_region:
            region = region_mask(fg.cpu(), bg.cpu(), len(queries), cfg.region_threshold)
        else:
            region = torch.ones(fg.shape, dtype=torch.bool)
        k_min, k_max = (
            (len(queries), max(cfg.max_segments, len(queries)))
            if cfg.segments is None
            else (max(cfg.segments, len(queries)),) * 2
        )
        spatial = spatial_affinity(plan.grid, cfg.spatial_sigma) if cfg.spatial_sigma is not None else None
        segments = region_segments(self_attn.cpu(), region, k_min, k_max, spatial)
        inst = compared(inst.cpu()) if cfg.compare else inst.cpu()
        table = segment_scores(inst, segments)
        return PersonalMaps(
            queries=queries,
            class_word=cls,
            grid=plan.grid,
            fg=fg.cpu(),
            bg=bg.cpu(),
            region=region,
            segments=segments,
            instance=inst,
            scores=table,
            bf=assign_bf(table),
            af=assign_af(table),
            prompts=texts,
        )

    def segment_personal(
        self, queries: Sequence[str], class_word: str | None = None, config: PersonalConfig | None = None, seed: int = 0
    ) -> SegmentationResult:
        """Segment the image of ``set_image`` for referring ``queries`` that may name loaded concepts
        ("a <my-mug> mug with cola"): mask index i is the segment assigned to the i-th query (``config.assignment``:
        "af" Hungarian over all queries, "bf" each alone). Scores: background first, then per query the indicator of
        its segment, on the attention grid, bilinearly resized to the image (the mask is their argmax)."""
        cfg = self.personal_config(config)
        if cfg.assignment not in ("af", "bf"):
            raise ValueError(f"unknown assignment {cfg.assignment!r}: use 'af' or 'bf'")
        pm = self.personal_maps(queries, class_word, cfg, seed)
        img = self._images[0]
        h, w = img.shape[:2]
        gh, gw = pm.grid
        chosen = mask_segments(pm.af if cfg.assignment == "af" else pm.bf, pm.scores)
        grid_scores = torch.zeros((len(pm.queries) + 1, gh * gw))
        for q, j in enumerate(chosen.tolist()):
            if j >= 0:
                grid_scores[q + 1] = (pm.segments == j).float()
        grid_scores[0] = 1 - grid_scores[1:].sum(dim=0)  # the region's unassigned segments are background too
        up = F.interpolate(grid_scores.view(1, -1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)[0]
        settings = {**asdict(cfg), "class": pm.class_word, "seed": seed, "resolution": self.resolution}
        settings.update(
            prompts=pm.prompts,
            segment_scores=[[round(float(x), 4) for x in row] for row in pm.scores],
            bf=pm.bf.tolist(),
            af=pm.af.tolist(),
            masks=chosen.tolist(),
            concepts=self.concept_record(),
        )
        return make_result(img, up, None, labels=list(pm.queries), method="personal", prompt=pm.prompts[0], settings=settings)
