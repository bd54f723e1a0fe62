"""The output contract of ``attnseg segment`` (other tools read it; keep it stable).

Per input ``<stem>``:
- ``<stem>.png``: palette PNG at the input's size, 0 = background, i = the i-th label as given;
- ``<stem>_overlay.png``: the image with the mask blended in;
- ``<stem>_scores.npz``: ``scores`` (K + 1, H, W) float16 (background first), ``confidence``
  (H, W) float16, ``labels``;
- ``<stem>.json``: ``labels``, ``method``, ``model``, ``prompt``, ``settings``, ``image``, ``size`` ([height, width]),
  ``presence`` (per label, its peak attention relative to the strongest label's) and ``weak_labels`` (below 0.3:
  perhaps not in the image).
The JSON is written last, each file atomically: an image whose JSON records the same request is done
(:func:`is_done`); a run killed mid-image leaves no JSON and the image is redone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.io.files import atomic_write_bytes
from attnseg.io.images import encode_png, overlay, palette_png


def write_outputs(
    out: Path,
    stem: str,
    image: np.ndarray,
    result,
    model_name: str,
    src: str,
    preset: str | None = None,
    weights: str | None = None,
) -> None:
    """Write the four files of one segmented image (``result``: an :class:`~attnseg.results.SegmentationResult`);
    ``weights``: the model's weights fingerprint, recorded beside its name."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{stem}.png", encode_png(palette_png(result.mask)))
    atomic_write_bytes(out / f"{stem}_overlay.png", encode_png(Image.fromarray(overlay(image, result.mask))))
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        scores=result.scores.astype(np.float16),
        confidence=result.confidence.astype(np.float16),
        labels=np.asarray(result.labels),
    )
    atomic_write_bytes(out / f"{stem}_scores.npz", buf.getvalue())
    meta = {
        "labels": result.labels,
        "method": result.method,
        "preset": preset,
        "model": model_name,
        "weights": weights,
        "prompt": result.prompt,
        "image": src,
        "size": list(image.shape[:2]),
        "uncertain_fraction": float(result.uncertain.mean()),
        "presence": result.presence,
        "weak_labels": result.weak_labels,
        "settings": result.settings,
    }
    atomic_write_bytes(out / f"{stem}.json", json.dumps(meta, indent=1, default=str).encode())


def read_meta(meta_path: Path) -> dict | None:
    """The JSON of an image's outputs, or None when there is none or it cannot be read (the image is not done)."""
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def records(
    meta_path: Path, method: str, labels: Sequence[str], model: str, settings: Mapping, weights: str | None = None
) -> bool:
    """True when ``meta_path`` records ``method`` run on ``labels`` with ``model`` (and its ``weights``) and every one of
    ``settings``."""
    meta = read_meta(meta_path)
    if meta is None:
        return False
    st = meta.get("settings", {})
    return (
        meta.get("method") == method
        and meta.get("labels") == list(labels)
        and meta.get("model") == model
        and _same_weights(meta, weights)
        and all(st.get(k) == v for k, v in settings.items())
    )


def _same_weights(meta: dict, weights: str | None) -> bool:
    """Whether outputs were made with these weights; outputs written before fingerprints were recorded have none and
    are taken as made with them."""
    return meta.get("weights", weights) == weights


def is_done(
    meta_path: Path,
    labels: Sequence[str] | None,
    method: str,
    preset,
    model: str,
    seed: int,
    crf: bool,
    draws,
    weights: str | None = None,
) -> bool:
    """True when ``meta_path`` records this very request (labels, method, preset, model and its weights, seed, CRF,
    draws).

    ``labels`` None: any (an unsupervised method names its segments itself)."""
    meta = read_meta(meta_path)
    if meta is None:
        return False
    st = meta.get("settings", {})
    return (
        (labels is None or meta.get("labels") == list(labels))
        and meta.get("method") == method
        and meta.get("preset") == preset
        and meta.get("model") == model
        and _same_weights(meta, weights)
        and st.get("seed") == seed
        and st.get("crf") == bool(crf)
        and (draws is None or st.get("draws") == draws)
    )
