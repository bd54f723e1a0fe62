"""``attnseg eval`` and ``attnseg bench``: mask quality on a labelled dataset, speed and memory of capture, the personalized benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from attnseg.cli.common import (
    MODEL_HELP,
    _check_labels_file,
    _check_method,
    _err,
    _load_predictor,
    _out_folder,
    _progress_bar,
    _quiet_libraries,
    _vocabulary,
    app,
)


@app.command("eval")
def eval_cmd(
    dataset: Annotated[Path, typer.Argument(help="VOC-layout folder, or COCO annotations JSON / folder.")],
    out: Annotated[Path, typer.Option(help="Report folder (report.json, report.md, per_class.png, qualitative.png).")],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            help="Methods to compare: cross, t2m, iseg, t2m:single-pass, iseg+crf ...; grounding (a trained module, --module).",
        ),
    ] = None,
    module: Annotated[
        Path | None,
        typer.Option(help="With -m grounding: a trained grounding module (default: the one shipped with the embedded model)."),
    ] = None,
    segmenter: Annotated[
        list[Path] | None, typer.Option(help="Folders of `attnseg train-segmenter` models to score too (Protocol II).")
    ] = None,
    split: Annotated[str, typer.Option(help="VOC split name (ImageSets/Segmentation/<split>.txt).")] = "val",
    classes: Annotated[list[str] | None, typer.Option(help="Class names, background first (default: classes.txt).")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="Image-level labels to use instead of the ground truth's.")] = None,
    vocabulary: Annotated[
        list[str] | None,
        typer.Option(help="Class names each image is tagged from (as `attnseg tag`) instead of the ground truth's labels."),
    ] = None,
    vocabulary_file: Annotated[
        Path | None, typer.Option(help="Class names to tag from, one a line (or comma-separated).")
    ] = None,
    crf: Annotated[bool, typer.Option(help="Also evaluate every method after dense CRF.")] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N images only.")] = None,
    draws: Annotated[int | None, typer.Option(help="Noise draws (default: each method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise draws.")] = 0,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or auto.")] = "auto",
) -> None:
    """Pseudo-mask mIoU of methods on a dataset (image-level labels from the ground truth, or tagged from --vocabulary)."""
    _quiet_libraries()
    from attnseg.io.datasets import DatasetError, open_dataset
    from attnseg.jobs.evaluate import evaluate, markdown_table

    method, segmenter = method or [], segmenter or []
    if not method and not segmenter:
        _err("give at least one --method (e.g. -m cross -m t2m) or --segmenter MODEL_DIR")
        raise typer.Exit(2)
    vocab = _vocabulary(vocabulary, vocabulary_file)
    if vocab is not None and labels_file is not None:
        _err("give --labels-file or --vocabulary, not both")
        raise typer.Exit(2)
    if vocab is not None and not method:
        _err("--vocabulary tags labels for the --method(s); segmenters take none")
        raise typer.Exit(2)
    try:
        ds = open_dataset(dataset, split, classes)
    except (DatasetError, ImportError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    _check_labels_file(labels_file)
    from attnseg.jobs.evaluate import GROUNDING, MethodSpec
    from attnseg.methods.registry import REAL

    specs = [MethodSpec.parse(m) for m in method]
    for m, spec in zip(method, specs, strict=True):
        if spec.method == GROUNDING and spec.preset is not None:
            _err(f"{m}: grounding has no presets, its settings are the trained module's (--module)")
            raise typer.Exit(2)
        if spec.method != GROUNDING:
            _check_method(spec.method, spec.preset, REAL)
    if module is not None and not any(spec.method == GROUNDING for spec in specs):
        _err("--module is the grounding module of -m grounding; drop it or add -m grounding")
        raise typer.Exit(2)
    predictor = _load_predictor(model, device, dtype) if method else None
    _out_folder(out)
    try:
        report = evaluate(
            predictor,
            ds,
            method,
            out,
            crf=crf,
            limit=limit,
            labels_file=labels_file,
            draws=draws,
            seed=seed,
            progress=sys.stderr.isatty(),
            segmenters=segmenter,
            vocabulary=vocab,
            module=module,
        )
    except (ValueError, ImportError, RuntimeError, OSError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(markdown_table(report))
    if "tagging" in report:
        tags = report["tagging"]
        typer.echo(f"tagging from {len(vocab)} labels: precision {tags['precision']:.1%}, recall {tags['recall']:.1%}")


@app.command()
def bench(
    suite: Annotated[
        str | None,
        typer.Argument(
            help="Nothing: speed and memory. 'families': capture on SDXL-, SD3- and Flux-shaped denoisers at 1024 px "
            "(random weights; about 12 GB of RAM). 'personal': the personalized referring segmentation benchmark."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for bench.json and bench.md (personal: personal.json, .md).")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Methods (default: cross, t2m, iseg).")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median reported).")] = 5,
    batch: Annotated[int, typer.Option(help="Images per batch for the throughput figure.")] = 8,
    real_size: Annotated[bool, typer.Option(help="Also measure an SD 1.5-shaped UNet at 512 px (about 4 GB of RAM).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or auto.")] = "float32",
    scenes: Annotated[int, typer.Option(help="personal: test scenes.")] = 100,
    steps: Annotated[int, typer.Option(help="personal: learning steps per concept.")] = 400,
    seed: Annotated[int, typer.Option(help="personal: seed of photos, scenes, learning and noise.")] = 1,
    preset: Annotated[
        str | None,
        typer.Option(
            help="personal: segmentation preset (default, bf, class-region, plain; see segment --concept; default: default)."
        ),
    ] = None,
    contrast: Annotated[
        float | None,
        typer.Option(help="personal: weight of the concepts' contrastive attention loss (see personalize; default: 1)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads of torch (default: torch's).")] = None,
    family: Annotated[
        list[str] | None, typer.Option("--family", help="families: the families measured (sdxl, sd3, flux; default: all three).")
    ] = None,
) -> None:
    """Seconds per image, throughput, peak memory and the ratio to the bare model cost, per method; with `families`,
    the same for capture on the newer families' denoisers; with `personal`, personalized referring segmentation on
    ShapesWorld (concepts learned, then T2M's Table 7)."""
    _quiet_libraries()
    if family and suite != "families":
        _err("--family chooses what `bench families` measures: give the 'families' suite")
        raise typer.Exit(2)
    if (preset is not None or contrast is not None) and suite != "personal":
        _err("--preset and --contrast set up `bench personal`: give the 'personal' suite")
        raise typer.Exit(2)
    if suite == "personal":
        _bench_personal(out, model, scenes, steps, seed, threads, preset or "default", 1.0 if contrast is None else contrast)
        return
    if suite == "families":
        _bench_families(out, family or None)
        return
    if suite is not None:
        _err(f"unknown benchmark {suite!r}: give none (speed), 'families' or 'personal'")
        raise typer.Exit(2)
    from attnseg.diffusion.loading import ModelError
    from attnseg.jobs.bench import bench_markdown, run_bench
    from attnseg.methods.registry import LABELS, REAL

    for m in method or []:
        _check_method(m, None, REAL, LABELS)
    if out is not None:
        _out_folder(out)
    try:
        res = run_bench(model, method or ["cross", "t2m", "iseg"], out, repeats, batch, real_size, device, dtype)
    except ModelError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(bench_markdown(res))


def _bench_families(out: Path | None, families: list[str] | None) -> None:
    """Capture on SDXL-, SD3- and Flux-shaped denoisers at 1024 px: a table, and ``OUT/families.json`` / ``.md``."""
    from attnseg.io.files import atomic_write_bytes
    from attnseg.jobs.bench import FAMILY_METHODS, bench_families, families_markdown

    unknown = [f for f in families or () if f not in FAMILY_METHODS]
    if unknown:
        _err(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}: choose from {', '.join(FAMILY_METHODS)}")
        raise typer.Exit(2)
    if out is not None:
        _out_folder(out)
    res = bench_families(*([families] if families else []))
    table = families_markdown(res)
    if out is not None:
        atomic_write_bytes(out / "families.json", json.dumps(res, indent=1).encode())
        atomic_write_bytes(out / "families.md", table.encode())
    typer.echo(table, nl=False)


def _bench_personal(
    out: Path | None, model: str | None, scenes: int, steps: int, seed: int, threads: int | None, preset: str, contrast: float
) -> None:
    import torch

    from attnseg.diffusion.concepts import ConceptError
    from attnseg.methods.personal import PERSONAL_PRESETS
    from attnseg.train.personal_bench import PersonalBenchConfig, markdown, run_personal_bench
    from attnseg.train.personalize import PersonalizeConfig

    if preset not in PERSONAL_PRESETS:
        _err(f"unknown preset {preset!r} for bench personal: use one of {', '.join(PERSONAL_PRESETS)}")
        raise typer.Exit(2)
    if out is None:
        _err("bench personal needs --out DIR (photos, scenes, concepts and personal.json go there)")
        raise typer.Exit(2)
    if scenes < 1 or steps < 1:
        _err("--scenes and --steps must be at least 1")
        raise typer.Exit(2)
    if contrast < 0:
        _err("--contrast must be 0 (off) or more")
        raise typer.Exit(2)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = PersonalBenchConfig(
        scenes=scenes,
        seed=seed,
        learn=PersonalizeConfig(steps=steps, samples=4, contrast_weight=contrast),
        segment=PERSONAL_PRESETS[preset],
    )
    bar, advance = _progress_bar()
    try:
        with bar:
            res = run_personal_bench(out, cfg, lambda: _load_predictor(model, "cpu", "float32"), advance)
    except ConceptError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(markdown(res))
