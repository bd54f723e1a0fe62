"""``attnseg segment --concept``: personalized referring segmentation of images, written in ``segment``'s contract.

Each image gets the four files of ``attnseg segment`` (``<stem>.png``: 0 background, i the segment assigned to the
i-th query; ``<stem>.json``, ``<stem>_overlay.png``, ``<stem>_scores.npz``); the JSON's settings add the class, the
prompts, the (query x segment) attribution table and both assignments (``bf``, ``af``). An image whose JSON records
the same queries, model, settings and concepts (by digest) is done and skipped when the command is run again; the
JSON is written last, so a run killed mid-image redoes that image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from attnseg.io.images import ImageError, list_images, load_image
from attnseg.io.outputs import records, write_outputs
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
) -> tuple[list[str], list[str], list[str]]:
    """Segment every image of ``inputs`` (files or folders) for ``queries``: (written, skipped as done, failed)."""
    out = Path(out)
    cfg = predictor.personal_config(config)
    request = {
        **asdict(cfg),
        "class": class_word or predictor.concept_class(queries),
        "seed": seed,
        "concepts": predictor.concept_record(),
    }
    done, skipped, failed = [], [], []
    seen: dict[str, Path] = {}
    for path in list_images(inputs):
        if path.stem in seen:  # its outputs would overwrite the other's
            failed.append(str(path))
            if on_error:
                on_error(str(path), f"same file name stem as {seen[path.stem]}; outputs would collide, rename one of them")
            continue
        seen[path.stem] = path
        if records(out / f"{path.stem}.json", "personal", queries, predictor.model_name, request, predictor.weights):
            skipped.append(str(path))
            continue
        try:
            image = load_image(path)
        except ImageError as e:
            failed.append(str(path))
            if on_error:
                on_error(str(path), str(e))
            continue
        predictor.set_image(image)
        res = predictor.segment_personal(queries, class_word, cfg, seed)
        write_outputs(out, path.stem, image, res, predictor.model_name, str(path), weights=predictor.weights)
        done.append(str(path))
    return done, skipped, failed
