"""``attnseg segment --concept``: personalized referring segmentation of images, written in ``segment``'s contract.

Each image gets the four files of ``attnseg segment`` (``<stem>.png``: 0 background, i the segment assigned to the
i-th query; ``<stem>.json``, ``<stem>_overlay.png``, ``<stem>_scores.npz``); the JSON's settings add the class, the
prompts, the (query x segment) attribution table and both assignments (``bf``, ``af``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from attnseg.io.images import ImageError, list_images, load_image
from attnseg.io.outputs import write_outputs
from attnseg.methods.personal import PersonalConfig


def segment_personal_paths(
    predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    queries: Sequence[str],
    class_word: str | None = None,
    config: PersonalConfig | None = None,
    seed: int = 0,
    on_error: Callable[[str, str], None] | None = None,
) -> tuple[list[str], list[str]]:
    """Segment every image of ``inputs`` (files or folders) for ``queries``; (written sources, failed sources)."""
    out = Path(out)
    done, failed = [], []
    for path in list_images(inputs):
        try:
            image = load_image(path)
        except ImageError as e:
            failed.append(str(path))
            if on_error:
                on_error(str(path), str(e))
            continue
        predictor.set_image(image)
        res = predictor.segment_personal(queries, class_word, config, seed)
        write_outputs(out, path.stem, image, res, predictor.model_name, str(path))
        done.append(str(path))
    return done, failed
