"""``attnseg train-segmenter`` and ``attnseg train-toy``: a segmenter trained on generated data, and the embedded models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from attnseg.cli.common import (
    _err,
    app,
)


@app.command("train-segmenter")
def train_segmenter_cmd(
    dataset: Annotated[Path, typer.Argument(help="`attnseg generate` folder, or VOC-layout folder (see --split).")],
    out: Annotated[Path, typer.Option(help="Model folder (config.json, model.safetensors, log.jsonl).")],
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2000,
    batch: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle schedule).")] = 2e-3,
    width: Annotated[int, typer.Option(help="Channels of the first level (16 suits 64-px ShapesWorld; more for photos).")] = 16,
    size: Annotated[int, typer.Option(help="Side images are resized to.")] = 64,
    vflip: Annotated[bool, typer.Option(help="Vertical flips as augmentation (off for photographs).")] = True,
    split: Annotated[str, typer.Option(help="Split of a VOC-layout dataset.")] = "train",
    seed: Annotated[int, typer.Option(help="Training seed (initial weights, batches, augmentation).")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's).")] = None,
) -> None:
    """Train a small segmentation network on image/mask pairs (Protocol II); score it with `attnseg eval --segmenter`."""
    from attnseg.segnet import SegmenterError
    from attnseg.train.segmenter import SegmenterConfig, train_segmenter

    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = SegmenterConfig(steps=steps, batch=batch, lr=lr, width=width, size=size, vflip=vflip, seed=seed)
    try:
        rec = train_segmenter(dataset, out, cfg, split=split, progress=sys.stderr.isatty())
    except (SegmenterError, RuntimeError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(f"segmenter for {len(rec['classes']) - 1} classes trained on {rec['pairs']} pairs: {out}")


@app.command("train-toy", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_toy(ctx: typer.Context) -> None:
    """Train the embedded model (stages data, vae, encode, unet, export, all); see --help of the module."""
    from attnseg.train.embedded.command import main

    main(list(ctx.args))
