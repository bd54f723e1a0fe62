"""``attnseg personalize``: learn a concept of the user's own object from a few photos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from attnseg.cli.common import (
    MODEL_HELP,
    _err,
    _load_predictor,
    _progress_bar,
    _quiet_libraries,
    app,
)


@app.command()
def personalize(
    photos: Annotated[Path, typer.Argument(help="A folder of 5-10 photos of your object.")],
    token: Annotated[str, typer.Option(help="The new word, lower case in angle brackets, e.g. '<my-mug>'.")],
    class_word: Annotated[str, typer.Option("--class", help="What the object is, a word the model knows (e.g. mug).")],
    out: Annotated[Path, typer.Option(help="The concept file to write (safetensors); a sample grid goes beside it.")],
    method: Annotated[
        str, typer.Option(help="textual-inversion (the token alone) or custom-diffusion (+ cross-attention k/v).")
    ] = "textual-inversion",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 400,
    contrast: Annotated[
        float,
        typer.Option(
            help="Weight of the contrastive attention loss that keeps the token's map on the object (0: the denoising "
            "loss alone)."
        ),
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of batches, noise, regularisation images and samples.")] = 0,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads of torch (default: torch's).")] = None,
) -> None:
    """Learn a personal concept from PHOTOS (textual inversion or Custom Diffusion, T2M section 5.3); resumable: run
    the same command again after a kill. Use it with `attnseg segment IMAGE --concept OUT --labels 'a <token> ...'`."""
    _quiet_libraries()
    import torch

    from attnseg.diffusion.concepts import ConceptError
    from attnseg.train.personalize import PersonalizeConfig, learn_concept, read_photos

    if threads is not None:
        torch.set_num_threads(threads)
    if steps < 1:
        _err("--steps must be at least 1")
        raise typer.Exit(2)
    if contrast < 0:
        _err("--contrast must be 0 (off) or more")
        raise typer.Exit(2)
    predictor = _load_predictor(model, device, "float32")
    bar, advance = _progress_bar()
    try:
        images = read_photos(photos)
        if len(images) < 5:
            typer.echo(f"warning: {len(images)} photo(s) in {photos}; 5-10 of other poses and backgrounds learn better", err=True)
        with bar:
            concept = learn_concept(
                predictor.pipe,
                images,
                token,
                class_word,
                out,
                PersonalizeConfig(method=method, steps=steps, seed=seed, contrast_weight=contrast),
                progress=lambda s, n, _loss: advance(f"learning {token}", s, n),
            )
    except ConceptError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    if class_word.lower() in predictor.unknown_words([class_word]):
        typer.echo(f"warning: the model does not know the class word {class_word!r}", err=True)
    typer.echo(f"{concept.token} ({concept.method}, {len(images)} photos) -> {out}")
