"""The predictor: encode an image once, then segment it for any list of labels.

    predictor = AttnSegPredictor.from_pretrained()          # the embedded model
    predictor.set_image("scene.png")
    result = predictor.segment(["red circle", "blue star"], method="t2m")
    result.mask, result.scores, result.confidence

Data path: image -> VAE posterior mean -> noised latent at the method's timestep -> one UNet
forward per noise draw with attention captured (``attnseg.capture``) -> the method's per-label
scores (``attnseg.methods``) -> upsampled to the input size, averaged over draws -> optional
dense CRF -> argmax and confidence (``attnseg.postprocess``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.diffusion.capture import capture_attention
from attnseg.diffusion.layers import layer_inventory
from attnseg.diffusion.loading import load_pipeline, model_profile, native_resolution
from attnseg.diffusion.prompts import T2M_SYNONYMS, TokenSpans, compose_prompt, prompt_spans
from attnseg.io.images import load_image
from attnseg.methods import get_method
from attnseg.methods.diffseg import DiffSegConfig
from attnseg.ops.maps import columns_to_images
from attnseg.ops.refine import CRFConfig, confidence_map, dense_crf, scores_to_probs


@dataclass
class SegmentationResult:
    """Masks of one image at its input size.

    mask: (H, W) uint8, 0 = background, i = ``labels[i - 1]``.
    scores: (K + 1, H, W) float32 per-class scores, background first (CRF marginals with ``crf``).
    confidence: (H, W) top-2 margin of the scores; ``uncertain`` marks margins below 0.05.
    """

    labels: list[str]
    mask: np.ndarray
    scores: np.ndarray
    confidence: np.ndarray
    uncertain: np.ndarray
    method: str
    prompt: str
    settings: dict = field(default_factory=dict)


def _settings(method) -> dict:
    cfg = method.config
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


class AttnSegPredictor:
    """Open-vocabulary segmentation of real images from a diffusion model's attention."""

    def __init__(self, pipe, resolution: int | None = None, max_batch: int = 16) -> None:
        self.pipe = pipe
        self.resolution = int(resolution or native_resolution(pipe))
        self.max_batch = max_batch
        self.inventory = layer_inventory(pipe.unet)
        self.model_name = getattr(pipe, "attnseg_model_name", type(pipe).__name__)
        self.default_presets = model_profile(pipe)
        """{method: preset} used when a call names no preset (the model folder's ``attnseg.json``)."""
        self._latents: torch.Tensor | None = None
        self._images: list[np.ndarray] = []
        self.text_cache_size = 256
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_cache: OrderedDict[tuple, tuple[str, TokenSpans]] = OrderedDict()

    @classmethod
    def from_pretrained(cls, model=None, device: str | None = "cpu", dtype="auto", **kw) -> AttnSegPredictor:
        return cls(load_pipeline(model, device=device, dtype=dtype), **kw)

    @property
    def device(self) -> torch.device:
        # Read from one parameter: diffusers' ``unet.device`` walks every module on each call.
        return next(self.pipe.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipe.unet.parameters()).dtype

    # ------------------------------------------------------------------ encoding

    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """VAE posterior means (scaled) of RGB uint8 images, resized to the model's resolution."""
        r = self.resolution
        xs = []
        for im in images:
            t = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 127.5 - 1
            xs.append(F.interpolate(t, size=(r, r), mode="bilinear", align_corners=False, antialias=True))
        x = torch.cat(xs).to(self.device, next(self.pipe.vae.parameters()).dtype)
        vae = self.pipe.vae
        lat = []
        for i in range(0, len(x), self.max_batch):
            lat.append(vae.encode(x[i : i + self.max_batch]).latent_dist.mean * vae.config.scaling_factor)
        return torch.cat(lat)

    def set_image(self, image) -> None:
        """Encode one image (path, PIL image or array) once for later ``segment`` calls."""
        self.set_images([image])

    def set_images(self, images: Sequence) -> None:
        self._images = [load_image(im) for im in images]
        self._latents = self.encode_images(self._images)

    # ------------------------------------------------------------------ segmentation

    def _prompt(self, labels: Sequence[str], method) -> tuple[str, TokenSpans]:
        cfg = method.config
        key = (tuple(labels), cfg.template, bool(getattr(cfg, "synonyms", False)), tuple(getattr(cfg, "background_words", ())))
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        prompt = compose_prompt(
            labels,
            cfg.template,
            synonyms=T2M_SYNONYMS if getattr(cfg, "synonyms", False) else None,
            background_words=getattr(cfg, "background_words", ()),
        )
        out = (prompt.text, prompt_spans(self.pipe.tokenizer, prompt))
        self._prompt_cache[key] = out
        if len(self._prompt_cache) > self.text_cache_size:
            self._prompt_cache.popitem(last=False)
        return out

    @torch.inference_mode()
    def _encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(
            list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.pipe.text_encoder(ids.to(self.device))[0].to(self.dtype)

    @torch.inference_mode()
    def score_maps(
        self,
        latents: torch.Tensor,
        label_lists: Sequence[Sequence[str]],
        method,
        draws: int,
        seed: int = 0,
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Per-image (K_i + 1, h, w) scores on the method's grid, averaged over ``draws``."""
        n = len(latents)
        prompts = [self._prompt(labs, method) for labs in label_lists]
        emb = self._encode_text([p for p, _ in prompts])
        side = int(latents.shape[-1])
        plan = method.plan(self.inventory, side)
        cfg = method.config
        sched = self.pipe.scheduler
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((draws, *latents.shape[1:]), generator=g).to(self.device, latents.dtype)
        t = torch.tensor([int(cfg.timestep)], device=self.device)
        rows = [(i, d) for i in range(n) for d in range(draws)]
        sums: list[torch.Tensor | None] = [None] * n
        key_scale = None
        if plan.key_scale_gamma is not None:
            t_len = emb.shape[1]
            key_scale = torch.ones((n, t_len), dtype=torch.float32)
            for i, (_, sp) in enumerate(prompts):
                for s in sp.spans:
                    key_scale[i, s] = plan.key_scale_gamma
        for c0 in range(0, len(rows), self.max_batch):
            chunk = rows[c0 : c0 + self.max_batch]
            idx = torch.tensor([i for i, _ in chunk])
            z = sched.add_noise(latents[idx], noise[[d for _, d in chunk]], t.expand(len(chunk)))
            ks = key_scale[idx] if key_scale is not None else None
            with capture_attention(self.pipe.unet, plan.names, per_head=plan.per_head, key_scale=ks) as store:
                self.pipe.unet(z, t.expand(len(chunk)), encoder_hidden_states=emb[idx])
            for i in sorted(set(idx.tolist())):
                r = [j for j, (ii, _) in enumerate(chunk) if ii == i]
                sc = method.scores(store.rows(r), prompts[i][1], plan)  # (R, P, K + 1)
                s = sc.float().sum(dim=0)
                sums[i] = s if sums[i] is None else sums[i] + s
        out = [columns_to_images((s / draws)[None], plan.grid)[0].cpu() for s in sums]
        return out, [p for p, _ in prompts]

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
        return self._segment(self._latents, self._images, [list(labels)], method, preset, draws, seed, crf, overrides)[0]

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
        latents = self.encode_images(arrays)
        return self._segment(latents, arrays, [list(x) for x in labels], method, preset, draws, seed, crf, overrides)

    @torch.inference_mode()
    def segment_unsupervised(
        self, images: Sequence, config: DiffSegConfig | str | None = None, seed: int = 0
    ) -> list[np.ndarray]:
        """DiffSeg: class-agnostic segments (H, W) int64 of each image, from self-attention alone.

        ``config``: a ``DiffSegConfig`` or a preset name of ``DIFFSEG_PRESETS``; None takes the model's own
        preset (its ``attnseg.json``) if it names one, else the paper's settings.
        """
        from attnseg.methods.diffseg import DIFFSEG_PRESETS, assign, diffseg_proposals
        from attnseg.ops.maps import grid_side

        if config is None or isinstance(config, str):
            name = config or self.default_presets.get("diffseg", "default")
            if name not in DIFFSEG_PRESETS:
                raise ValueError(f"unknown DiffSeg preset {name!r}; choose one of {sorted(DIFFSEG_PRESETS)}")
            cfg = DIFFSEG_PRESETS[name]
        else:
            cfg = config
        arrays = [load_image(im) for im in images]
        latents = self.encode_images(arrays)
        names = [lay.name for lay in self.inventory if lay.kind == "self"]
        emb = self._encode_text([cfg.prompt] * len(arrays))
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(latents.shape[1:], generator=g).to(self.device, latents.dtype).expand_as(latents)
        t = torch.tensor([int(cfg.timestep)], device=self.device)
        out = []
        step = 2  # every self-attention layer is kept: at 512 px the 64-px layers alone are ~300 MB an image
        for i0 in range(0, len(arrays), step):
            sl = slice(i0, i0 + step)
            z = self.pipe.scheduler.add_noise(latents[sl], noise[sl], t.expand(len(latents[sl])))
            with capture_attention(self.pipe.unet, names) as store:
                self.pipe.unet(z, t.expand(len(z)), encoder_hidden_states=emb[sl])
            by_side: dict[int, list[torch.Tensor]] = {}
            for n in names:
                m = store.mean(n)
                by_side.setdefault(grid_side(m.shape[1]), []).append(m)
            maps = {s: torch.stack(v).mean(0) for s, v in by_side.items()}
            for props, img in zip(diffseg_proposals(maps, cfg), arrays[sl], strict=True):
                out.append(assign(props.float().cpu(), img.shape[:2]).numpy())
        return out

    def _segment(self, latents, images, label_lists, method, preset, draws, seed, crf, overrides):
        if isinstance(method, str):
            preset = preset or self.default_presets.get(method)
            m = get_method(method, preset, **overrides)
        else:
            m = method
        n_draws = int(draws if draws is not None else getattr(m.config, "draws", 1))
        if n_draws < 1:
            raise ValueError("draws must be at least 1")
        maps, texts = self.score_maps(latents, label_lists, m, n_draws, seed)
        results = []
        crf_cfg = crf if isinstance(crf, CRFConfig) else CRFConfig() if crf else None
        for img, labs, sc, text in zip(images, label_lists, maps, texts, strict=True):
            h, w = img.shape[:2]
            up = F.interpolate(sc[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
            if crf_cfg is not None:
                up = torch.from_numpy(dense_crf(img, scores_to_probs(up), crf_cfg))
            conf, unc = confidence_map(up)
            settings = {**_settings(m), "preset": preset, "draws": n_draws, "seed": seed, "crf": crf_cfg is not None}
            settings["resolution"] = self.resolution
            results.append(
                SegmentationResult(
                    labels=list(labs),
                    mask=up.argmax(dim=0).to(torch.uint8).numpy(),
                    scores=up.numpy().astype(np.float32),
                    confidence=conf.numpy().astype(np.float32),
                    uncertain=unc.numpy(),
                    method=m.name,
                    prompt=text,
                    settings=settings,
                )
            )
        return results
