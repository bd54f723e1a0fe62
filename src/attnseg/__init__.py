"""attnseg: segmentation from the attention of text-to-image diffusion models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["AttnSegPredictor", "SegmentationResult", "__version__", "capture_attention", "load_pipeline"]


def __getattr__(name: str):
    # Lazy: importing attnseg does not import torch / diffusers until something is used.
    if name in ("AttnSegPredictor", "SegmentationResult"):
        from attnseg import predictor

        return getattr(predictor, name)
    if name == "capture_attention":
        from attnseg.diffusion.capture import capture_attention

        return capture_attention
    if name == "load_pipeline":
        from attnseg.diffusion.loading import load_pipeline

        return load_pipeline
    raise AttributeError(name)
