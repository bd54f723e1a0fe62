"""``attnseg shapes``: ShapesWorld scenes, personal instances and prompts as files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from attnseg.cli.common import (
    _err,
    shapes_app,
)


@shapes_app.command("export")
def shapes_export(
    out: Annotated[Path, typer.Argument(help="Output folder (VOC layout).")],
    n: Annotated[int, typer.Option(help="Number of scenes.")] = 200,
    seed: Annotated[int, typer.Option(help="World seed; the embedded model was trained on seed 0.")] = 1,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    split: Annotated[str, typer.Option(help="Name of the split file.")] = "val",
) -> None:
    """Write N ShapesWorld scenes in the VOC layout, with labels.json for `segment --labels-file`."""
    from attnseg.shapes.world import export_voc

    if n < 1:
        _err("--n must be at least 1")
        raise typer.Exit(2)
    export_voc(out, n=n, seed=seed, size=size, split=split, progress=sys.stderr.isatty())
    typer.echo(f"wrote {n} scenes to {out}")


@shapes_app.command("personal")
def shapes_personal(
    out: Annotated[Path, typer.Argument(help="Output folder: photos/ to learn from, scenes/ to find it in, truth/ its masks.")],
    look: Annotated[str, typer.Option(help="striped, dotted, two-tone, checkered or rimmed.")] = "striped",
    shape: Annotated[str, typer.Option(help="The instance's shape (its class word).")] = "circle",
    colour: Annotated[str | None, typer.Option(help="Always this colour (default: a different colour per photo).")] = None,
    photos: Annotated[int, typer.Option(help="Training photos.")] = 8,
    scenes: Annotated[int, typer.Option(help="Test scenes, each with the instance among other looks.")] = 4,
    seed: Annotated[int, typer.Option(help="World seed of the scenes.")] = 7,
) -> None:
    """Write a personal instance (a shape with a look no word names) for `attnseg personalize` and `segment --concept`."""
    from attnseg.shapes.personal import export_personal
    from attnseg.shapes.world import COLOURS, SHAPES

    if shape not in SHAPES or (colour is not None and colour not in COLOURS) or photos < 1 or scenes < 1:
        _err(f"--shape is one of {', '.join(SHAPES)}, --colour one of {', '.join(COLOURS)}; --photos and --scenes >= 1")
        raise typer.Exit(2)
    try:
        colours = export_personal(out, look, shape, photos, scenes, seed, colour)
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(f"wrote {photos} photos to {out / 'photos'} and {scenes} scenes to {out / 'scenes'}")
    for k, c in enumerate(colours):
        typer.echo(f"  scene_{k:02d}.png: the {look} {shape} is {c}")


@shapes_app.command("prompts")
def shapes_prompts(
    out: Annotated[Path, typer.Argument(help="Prompts file to write (.jsonl: prompt and labels per line).")],
    n: Annotated[int, typer.Option(help="Number of prompts.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the prompt draw.")] = 3,
    max_objects: Annotated[int, typer.Option(help="Objects per prompt: 1 to this, of distinct shapes.")] = 2,
) -> None:
    """Write ShapesWorld prompts ("a red circle and a blue star") for `attnseg generate --prompts`."""
    from attnseg.shapes.world import shapes_prompts as make

    if n < 1 or not 1 <= max_objects <= 3:
        _err("--n must be at least 1 and --max-objects 1 to 3")
        raise typer.Exit(2)
    lines = [json.dumps({"prompt": p, "labels": labs}) for p, labs in make(n, seed, max_objects)]
    from attnseg.io.files import atomic_write_bytes

    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    typer.echo(f"wrote {n} prompts to {out}")
