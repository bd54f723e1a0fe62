"""``attnseg generate`` and ``attnseg score-generated``: images with their masks, and how good those masks are."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from attnseg.cli.common import (
    MODEL_HELP,
    _check_method,
    _err,
    _load_predictor,
    _out_folder,
    _quiet_libraries,
    _warn_unknown_words,
    app,
)
from attnseg.io.labels import split_labels


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Output folder (images/, masks/, manifest.jsonl, annotations.json).")],
    classes: Annotated[
        list[str] | None, typer.Option("--classes", "-c", help="Class names: repeat the option or give a,b,c.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help=".txt (one prompt per line, labels = --classes it names) or .jsonl ({prompt, labels}).")
    ] = None,
    per_class: Annotated[int, typer.Option(help="Images per class (or per prompt).")] = 10,
    method: Annotated[str, typer.Option(help="ca | ca-sa | seediff | grounding")] = "seediff",
    preset: Annotated[str | None, typer.Option(help="Named settings of the method.")] = None,
    module: Annotated[
        Path | None,
        typer.Option(
            help="A trained grounding module for --method grounding (default: the one shipped with the embedded model)."
        ),
    ] = None,
    template: Annotated[str, typer.Option(help="Prompt of one class.")] = "a photo of a {}",
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the method's, 50; grounding 20).")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default: the method's, 7.5; grounding 5).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed; item i uses a seed derived from (seed, i).")] = 0,
    block: Annotated[int, typer.Option(help="Items per batched generation (fixed per run: part of its identity).")] = 4,
    engine: Annotated[str, typer.Option(help="local or ray.")] = "local",
    workers: Annotated[int, typer.Option(help="Ray actors (one model each).")] = 1,
    cpu_threads: Annotated[int, typer.Option(help="Threads per block on CPU (part of the run: results depend on it).")] = 1,
    resume: Annotated[bool, typer.Option(help="Require an existing run in --out and continue it.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or auto.")] = "auto",
) -> None:
    """Generate images from prompts together with their masks (a labelled synthetic dataset)."""
    _quiet_libraries()
    from attnseg.jobs.engine import ENGINES
    from attnseg.jobs.generate import RunSpec, SynthError, generate_dataset, module_record, plan_items
    from attnseg.methods.registry import GENERATED, resolve

    _check_method(method, preset, GENERATED)
    defaults = resolve(method, preset, GENERATED)[2]
    steps = steps if steps is not None else defaults.steps
    guidance = guidance if guidance is not None else defaults.guidance
    if engine not in ENGINES:
        _err(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
        raise typer.Exit(2)
    if block < 1 or steps < 1 or workers < 1 or cpu_threads < 1:
        _err("--block, --steps, --workers and --cpu-threads must be at least 1")
        raise typer.Exit(2)
    try:
        items, cls, digest = plan_items(split_labels(classes) or None, per_class, template, prompts)
        extra = module_record(method, module)
    except SynthError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    _out_folder(out)
    predictor = _load_predictor(model, device, dtype)
    _warn_unknown_words(predictor, cls)
    if method == "grounding":
        from attnseg.grounder import Grounder, GroundingError

        try:  # before any file is written: a module from another model is refused here
            Grounder.from_folder(predictor.backbone, module).check()
        except GroundingError as e:
            _err(str(e))
            raise typer.Exit(2) from None
    from attnseg.diffusion.prompts import PromptError
    from attnseg.generator import label_token_spans

    for prompt, labs in dict.fromkeys((it.prompt, tuple(it.labels)) for it in items):
        try:  # every prompt is checked before hours of generation start
            label_token_spans(predictor.backbone, prompt, list(labs))
        except PromptError as e:
            _err(str(e))
            raise typer.Exit(2) from None
    spec = RunSpec(
        items=len(items),
        classes=cls,
        method=method,
        preset=preset,
        model=predictor.model_name,
        weights=predictor.weights,
        steps=steps,
        guidance=guidance,
        seed=seed,
        block=block,
        cpu_threads=cpu_threads,
        device=predictor.device.type,
        dtype=str(predictor.dtype).replace("torch.", ""),
        template=None if prompts else template,
        prompts_sha=digest,
        extra=extra,
    )
    try:
        rep = generate_dataset(
            predictor.backbone,
            out,
            items,
            spec,
            resume=resume,
            progress=sys.stderr.isatty(),
            engine=engine,
            workers=workers,
            model=model,
        )
    except (SynthError, ImportError, RuntimeError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    except OSError as e:
        _err(f"writing to {out} failed ({e.strerror or e}); free space or fix permissions, then run the same command to resume")
        raise typer.Exit(1) from None
    typer.echo(
        f"{rep['done']} of {rep['items']} items in {out} ({rep['generated']} generated now); COCO annotations: {rep['annotations']}"
    )
    if rep["with_empty_labels"]:
        typer.echo(
            f"warning: {rep['with_empty_labels']} items have a label with an empty mask: the method found no seed for it "
            f"(manifest.jsonl's empty_labels names them); try another --preset (seediff: code) or check that the model "
            "knows the word",
            err=True,
        )


@app.command("score-generated")
def score_generated_cmd(
    folders: Annotated[list[Path], typer.Argument(help="`attnseg generate` folders to score.")],
    detector: Annotated[str, typer.Option(help="'shapes' (ShapesWorld colour oracle) or package.module:name.")] = "shapes",
    out: Annotated[Path | None, typer.Option(help="JSON file for the results.")] = None,
    limit: Annotated[int | None, typer.Option(help="Score the first N items only.")] = None,
) -> None:
    """mIoU of generated masks against an oracle detector on the generated images."""
    from attnseg.jobs.score_generated import load_detector, markdown, score_generated

    try:
        det = load_detector(detector)
        results = [score_generated(f, det, limit=limit) for f in folders]
    except (ValueError, OSError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    if out is not None:
        from attnseg.io.files import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(results, indent=1).encode())
    typer.echo(markdown(results))
