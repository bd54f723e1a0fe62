"""``attnseg segment --method grounding``: a trained grounding module's masks of real images, in ``segment``'s contract.

Each image gets the four files of ``attnseg segment``; its scores are a constant background of 0.5 and each label's
probability (:meth:`attnseg.grounder.Grounder.segment_result`). An image whose JSON records the same labels, model,
module, seed, CRF setting and timestep is done and skipped when the command is run again; the JSON is written last,
so a run killed mid-image redoes that image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from attnseg.grounder import Grounder
from attnseg.io.images import ImageError, list_images, load_image
from attnseg.io.labels import labels_for, load_labels_file
from attnseg.io.outputs import records, write_outputs


def segment_grounding_paths(
    grounder: Grounder,
    inputs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    labels_file: str | Path | None = None,
    seed: int = 0,
    crf: bool = False,
    timestep: int = 1,
    on_error: Callable[[str, str], None] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Segment every image of ``inputs`` (files or folders) for its labels: (written, skipped as done, failed)."""
    out = Path(out)
    table = load_labels_file(labels_file) if labels_file else None
    model = grounder.backbone.model_name
    request = {"seed": seed, "crf": bool(crf), "timestep": timestep, "module": grounder.record.get("folder")}
    done, skipped, failed = [], [], []
    seen: dict[str, Path] = {}

    def fail(path: Path, msg: str) -> None:
        failed.append(str(path))
        if on_error:
            on_error(str(path), msg)

    for path in list_images(inputs):
        if path.stem in seen:
            fail(path, f"same file name stem as {seen[path.stem]}; outputs would collide, rename one of them")
            continue
        seen[path.stem] = path
        try:
            labs = labels_for(path, labels, table)
            if records(out / f"{path.stem}.json", "grounding", labs, model, request, grounder.backbone.weights):
                skipped.append(str(path))
                continue
            image = load_image(path)
        except (ImageError, ValueError) as e:
            fail(path, str(e))
            continue
        res = grounder.segment_result(image, labs, seed=seed, crf=crf, timestep=timestep)
        write_outputs(out, path.stem, image, res, model, str(path), weights=grounder.backbone.weights)
        done.append(str(path))
    return done, skipped, failed
