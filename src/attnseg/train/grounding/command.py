"""``attnseg grounding train`` and ``attnseg grounding eval``: the grounding module's command line.

Imports of torch and the model are inside the commands, so that ``attnseg --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from attnseg.io.labels import split_labels

grounding_app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Grounded Diffusion: a grounding module trained on generated images of seen classes, scored on unseen ones.",
)


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def _attributes(detector: str, attributes: list[str] | None) -> tuple[str, ...]:
    if attributes is not None:
        return tuple(split_labels(attributes))
    if detector == "shapes":
        from attnseg.shapes.world import COLOURS

        return tuple(COLOURS)  # the colour oracle finds each object by the colour its prompt names
    return ()


def _backbone(model: str | None):
    from attnseg.diffusion.loading import ModelError, load_backbone

    try:
        return load_backbone(model, device="cpu", dtype="float32")
    except ModelError as e:
        _err(str(e))
        raise typer.Exit(2) from None


@grounding_app.command("train")
def train_cmd(
    seen: Annotated[list[str], typer.Option(help="Seen classes: repeat the option or give a comma-separated list.")],
    out: Annotated[Path, typer.Option(help="Module folder (config.json, model.safetensors, log.jsonl).")],
    n: Annotated[int, typer.Option(help="Training images to generate.")] = 400,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2000,
    batch: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Adam's learning rate.")] = 1e-4,
    drop_zero_masks: Annotated[
        bool, typer.Option("--drop-zero-masks/--keep-zero-masks", help="Ignore all-zero oracle masks (paper Tab. 3).")
    ] = True,
    data: Annotated[Path | None, typer.Option(help="Folder caching the generated data (default OUT/data).")] = None,
    model: Annotated[str | None, typer.Option(help="Diffusers folder or hub id (default: the embedded model).")] = None,
    detector: Annotated[str, typer.Option(help="Oracle: 'shapes' (ShapesWorld colours) or package.module:name.")] = "shapes",
    attributes: Annotated[
        list[str] | None, typer.Option(help="Words put before the class words, one per object (default: colours for 'shapes').")
    ] = None,
    gen_steps: Annotated[int, typer.Option(help="Denoising steps of each generation (features of the last).")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance of the generations.")] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed of the prompts, images, initial weights and batches.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads (generation results depend on it).")] = 1,
) -> None:
    """Generate images of seen classes with oracle masks, then train the grounding module on them (resumable)."""
    import sys

    import torch

    from attnseg.grounder import GroundingError
    from attnseg.train.grounding.data import DataConfig, DataError
    from attnseg.train.grounding.train import TrainConfig, train_grounding

    torch.set_num_threads(threads)
    words = split_labels(seen)
    if not words:
        _err("give the seen classes with --seen")
        raise typer.Exit(2)
    bb = _backbone(model)
    data_cfg = DataConfig(
        kind="train",
        classes=tuple(words),
        count=n,
        model=bb.model_name,
        attributes=_attributes(detector, attributes),
        steps=gen_steps,
        guidance=guidance,
        seed=seed,
        threads=threads,
    )
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, drop_zero_masks=drop_zero_masks, seed=seed)
    try:
        rec = train_grounding(bb, out, data_cfg, cfg, detector, data_dir=data, progress=sys.stderr.isatty())
    except (GroundingError, DataError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(
        f"grounding module for {', '.join(words)} trained on {rec['images']} images ({rec['masks']} masks, "
        f"{rec['zero_masks']} all-zero{' and ignored' if drop_zero_masks else ''}): {out}"
    )


@grounding_app.command("eval")
def eval_cmd(
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md and the test data.")],
    n: Annotated[int, typer.Option(help="Test images per class and per pair of classes.")] = 10,
    module: Annotated[Path | None, typer.Option(help="Module folder (default: the one shipped with the embedded model).")] = None,
    classes: Annotated[
        list[str] | None, typer.Option(help="Test classes, seen and unseen (default: the 8 ShapesWorld shapes).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Folder caching the test data (default OUT/data; share it across modules).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Diffusers folder or hub id (default: the embedded model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the test prompts and images (not the training's).")] = 1,
    detector: Annotated[str | None, typer.Option(help="Test oracle (default: the module's training oracle).")] = None,
) -> None:
    """Protocol I: the module against the cross-attention baseline on generated test images, seen and unseen classes."""
    import sys

    import torch

    from attnseg.grounder import Grounder, GroundingError
    from attnseg.train.grounding.data import DataError
    from attnseg.train.grounding.evaluate import evaluate_grounding, markdown

    bb = _backbone(model)
    try:
        grounder = Grounder.from_folder(bb, module)
        torch.set_num_threads(int(grounder.record["data"]["threads"]))
        report = evaluate_grounding(
            bb, grounder, out, n, _classes(classes), seed=seed, data_dir=data, detector=detector, progress=sys.stderr.isatty()
        )
    except (GroundingError, DataError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(markdown(report))
    typer.echo(f"report: {out / 'report.json'}")


@grounding_app.command("generate")
def generate_cmd(
    out: Annotated[Path, typer.Option(help="`attnseg generate`-style folder to write (train-segmenter reads it).")],
    n: Annotated[int, typer.Option(help="Images per class and per pair of classes.")] = 10,
    module: Annotated[Path | None, typer.Option(help="Module folder (default: the one shipped with the embedded model).")] = None,
    classes: Annotated[
        list[str] | None, typer.Option(help="Classes, seen and unseen (default: the 8 ShapesWorld shapes).")
    ] = None,
    masks: Annotated[str, typer.Option(help="Labels: module, baseline, baseline_decoder or oracle (same images).")] = "module",
    data: Annotated[Path | None, typer.Option(help="Folder caching the generated data (default OUT/data).")] = None,
    model: Annotated[str | None, typer.Option(help="Diffusers folder or hub id (default: the embedded model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and images (not the training's).")] = 2,
) -> None:
    """Protocol II's data: generated images of every class labelled by the module (or, to compare, another source)."""
    import sys

    import torch

    from attnseg.grounder import Grounder, GroundingError
    from attnseg.train.grounding.data import DataError
    from attnseg.train.grounding.export import export_dataset

    bb = _backbone(model)
    try:
        grounder = Grounder.from_folder(bb, module)
        torch.set_num_threads(int(grounder.record["data"]["threads"]))
        res = export_dataset(bb, grounder, out, n, _classes(classes), masks, seed, data, sys.stderr.isatty())
    except (GroundingError, DataError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(f"{res['items']} images with {masks} masks: {out}")


def _classes(classes: list[str] | None) -> list[str]:
    if classes is None:
        from attnseg.shapes.world import SHAPES

        return list(SHAPES)
    return split_labels(classes)


if __name__ == "__main__":
    grounding_app()
