"""``attnseg segment``, ``attnseg tag`` and ``attnseg layers``: masks, labels and attention layers of images."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from attnseg.cli.common import (
    MODEL_HELP,
    _check_inputs,
    _check_labels_file,
    _check_method,
    _err,
    _load_predictor,
    _out_folder,
    _quiet_libraries,
    _vocabulary,
    _warn_unknown_words,
    app,
)
from attnseg.io.labels import split_labels


@app.command()
def segment(
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders of images.")],
    labels: Annotated[
        list[str] | None,
        typer.Option("--labels", "-l", help="Names of what is in the image(s): repeat the option or give a,b,c."),
    ] = None,
    labels_file: Annotated[Path | None, typer.Option(help="JSON object: image file name -> list of labels.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="cross | t2m | iseg (default t2m), diffseg (unsupervised: no labels), interactive (with --point/--box/"
            "--scribble), grounding (a trained grounding module, see --module)"
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Named settings of the method (e.g. t2m: voc, single-pass; iseg: wsss-voc; with --concept: default, bf, "
            "class-region, plain)."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("attnseg-out"),
    crf: Annotated[bool, typer.Option(help="Refine with a dense CRF (needs the crf extra: pip install 'attnseg[crf]').")] = False,
    draws: Annotated[int | None, typer.Option(help="Noise draws averaged (default: the method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise draws.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batched forward.")] = 4,
    engine: Annotated[str, typer.Option(help="local, or ray (an actor pool over a whole dataset).")] = "local",
    workers: Annotated[int, typer.Option(help="Ray actors (one model each).")] = 1,
    point: Annotated[
        list[str] | None, typer.Option(help="X,Y in image pixels: one object at this point (repeat for more objects).")
    ] = None,
    box: Annotated[
        list[str] | None, typer.Option(help="X0,Y0,X1,Y1 in image pixels: one object in this box (repeatable).")
    ] = None,
    scribble: Annotated[
        list[Path] | None,
        typer.Option(help="A mask image of the input's size; its non-zero pixels mark one object (repeatable)."),
    ] = None,
    name: Annotated[
        list[str] | None, typer.Option(help="Names of the prompted objects, in the order points, boxes, scribbles.")
    ] = None,
    vocabulary: Annotated[
        list[str] | None,
        typer.Option(
            help="Candidate labels instead of --labels: each image is tagged first (as `attnseg tag`); a,b,c or repeat."
        ),
    ] = None,
    vocabulary_file: Annotated[Path | None, typer.Option(help="Candidate labels, one a line (or comma-separated).")] = None,
    concept: Annotated[
        list[Path] | None,
        typer.Option(
            help="A personal concept of `attnseg personalize` (repeatable): labels are then referring queries, "
            "e.g. --labels 'a <my-mug> mug with cola'."
        ),
    ] = None,
    class_word: Annotated[
        str | None, typer.Option("--class", help="With --concept: the class of the queried objects (default: the concepts').")
    ] = None,
    module: Annotated[
        Path | None,
        typer.Option(
            help="With --method grounding: a trained grounding module (default: the one shipped with the embedded model)."
        ),
    ] = None,
) -> None:
    """Segment INPUT images for the given labels (or for the labels tagged from --vocabulary; or one image for
    --point / --box / --scribble prompts; or referring queries naming personal concepts with --concept); write masks,
    overlays, scores and JSON to --out."""
    _quiet_libraries()
    if concept or class_word:
        _segment_personal(inputs, labels, concept or [], class_word, model, out, seed, device, dtype, method, crf, preset)
        return
    if method == "grounding":
        unused = {
            "--vocabulary": vocabulary or vocabulary_file,
            "--point / --box / --scribble / --name": point or box or scribble or name,
            "--draws": draws is not None,
            "--engine ray": engine != "local",
        }
        if any(unused.values()):
            given = ", ".join(k for k, v in unused.items() if v)
            _err(f"--method grounding reads its labels from --labels / --labels-file, one image at a time: drop {given}")
            raise typer.Exit(2)
        _segment_grounding(inputs, labels, labels_file, module, model, out, seed, crf, device, dtype, preset)
        return
    if module is not None:
        _err("--module is the grounding module of --method grounding; drop it or add --method grounding")
        raise typer.Exit(2)
    from attnseg.jobs.engine import ENGINES
    from attnseg.jobs.segment import segment_paths
    from attnseg.methods.registry import REAL, REGISTRY, VISUAL

    vocab = _vocabulary(vocabulary, vocabulary_file)
    if vocab is not None and (labels or labels_file is not None):
        _err("give the labels (--labels / --labels-file) or a vocabulary to tag them from (--vocabulary), not both")
        raise typer.Exit(2)
    if vocab is not None and (point or box or scribble):
        _err("--point, --box and --scribble show the objects themselves: drop --vocabulary (use --name)")
        raise typer.Exit(2)
    if point or box or scribble:
        _segment_prompted(
            inputs, labels, labels_file, method, preset, model, out, crf, seed, device, dtype, point, box, scribble, name
        )
        return
    if name:
        _err("--name names --point / --box / --scribble prompts; none was given")
        raise typer.Exit(2)
    method = method or "t2m"
    if method in REGISTRY and REGISTRY[method].guide == VISUAL:
        _err(f"{method} segments what --point, --box or --scribble show; give at least one")
        raise typer.Exit(2)
    labels = split_labels(labels)
    _check_method(method, preset, REAL)
    _check_inputs(inputs, bool(labels))
    if engine not in ENGINES:
        _err(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
        raise typer.Exit(2)
    unlabelled = not REGISTRY[method].needs_labels
    if unlabelled and (labels or labels_file is not None or vocab is not None):
        _err(f"{method} segments without labels; drop --labels / --labels-file / --vocabulary")
        raise typer.Exit(2)
    if not labels and labels_file is None and vocab is None and not unlabelled:
        _err("no labels given: pass --labels L1,L2 (or repeat --labels), --labels-file F or --vocabulary W1,W2,...")
        raise typer.Exit(2)
    if batch_size < 1 or workers < 1 or (draws is not None and draws < 1):
        _err("--batch-size, --workers and --draws must be at least 1")
        raise typer.Exit(2)
    _check_labels_file(labels_file)
    _out_folder(out)
    predictor = _load_predictor(model, device, dtype)
    from attnseg.io.labels import LabelsError, load_labels_file

    try:
        table = load_labels_file(labels_file) if labels_file is not None else {}
    except LabelsError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    _warn_unknown_words(predictor, vocab or labels or [lab for labs in table.values() for lab in labs])
    failed_tags = 0
    if vocab is not None:
        inputs, labels_file, failed_tags = _tag_to_labels_file(predictor, inputs, vocab, out / "tags.json", batch_size)
    if preset is None and method in predictor.default_presets:
        source = "the model's attnseg.json" if method in predictor.profile_presets else f"the {predictor.backbone.family} family"
        typer.echo(f"preset {predictor.default_presets[method]!r} from {source} (--preset overrides it)", err=True)
    try:
        report = segment_paths(
            predictor,
            inputs,
            out,
            labels=labels,
            labels_file=labels_file,
            method=method,
            preset=preset,
            draws=draws,
            seed=seed,
            crf=crf,
            batch_size=batch_size,
            on_error=lambda src, msg: _err(msg if msg.startswith(src) else f"{src}: {msg}"),
            progress=sys.stderr.isatty(),
            engine=engine,
            workers=workers,
            model=model,
            device=device,
            dtype=dtype,
        )
    except (ValueError, ImportError, RuntimeError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    if report.weak:
        path, labs = next(iter(report.weak.items()))
        typer.echo(
            f"warning: {len(report.weak)} image(s) have labels of weak attention, perhaps not in them (weak_labels in "
            f"their JSON), e.g. {Path(path).name}: {', '.join(labs)}",
            err=True,
        )
    failed = len(report.failed) + failed_tags
    typer.echo(f"{len(report.done)} segmented, {len(report.skipped)} already done, {failed} failed -> {out}")
    if failed:
        raise typer.Exit(1)


def _tag_images(predictor, paths: list[Path], vocab: list[str], batch_size: int, unreadable: list[Path]):
    """Yield (path, TagResult) for each readable image of ``paths``, tagged ``batch_size`` images at a time; the others
    are named in one error line each and appended to ``unreadable``."""
    from attnseg.io.images import ImageError, load_image
    from attnseg.tagging import Tagger

    tagger = Tagger(predictor.backbone, max_batch=predictor.max_batch)
    for b0 in range(0, len(paths), batch_size):
        batch = []
        for p in paths[b0 : b0 + batch_size]:
            try:
                batch.append((p, load_image(p)))
            except ImageError as e:
                unreadable.append(p)
                _err(str(e))
        if batch:
            try:
                results = tagger.tag(predictor.encode_images([im for _, im in batch]), vocab)
            except ValueError as e:  # the model cannot read these images (a latent side it cannot take)
                _err(str(e))
                raise typer.Exit(2) from None
            yield from zip([p for p, _ in batch], results, strict=True)


def _tag_to_labels_file(predictor, inputs: list[Path], vocab: list[str], table: Path, batch_size: int):
    """Tag every image of ``inputs`` and write their labels to ``table`` (a labels file): -> (the readable images, the
    labels file, how many could not be read)."""
    from attnseg.io.files import atomic_write_bytes
    from attnseg.io.images import list_images

    bad: list[Path] = []
    tags = dict(_tag_images(predictor, list_images(inputs), vocab, batch_size, bad))
    atomic_write_bytes(table, json.dumps({str(p): t.labels for p, t in tags.items()}, indent=1).encode())
    typer.echo(f"tagged {len(tags)} image(s) from {len(vocab)} candidate labels -> {table}", err=True)
    return list(tags), table, len(bad)


@app.command()
def tag(
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders of images.")],
    vocabulary: Annotated[list[str] | None, typer.Option(help="Candidate labels: a,b,c or repeat the option.")] = None,
    vocabulary_file: Annotated[Path | None, typer.Option(help="Candidate labels, one a line (or comma-separated).")] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help='One JSON object a line per image: {"image", "labels", "scores": {label: score}}.')
    ] = False,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images tagged together.")] = 4,
) -> None:
    """Which candidate labels are in each image, asked of the diffusion model (the diffusion classifier): prints the
    chosen labels in the order chosen, each with its score, the share of the caption's denoising error it removed when
    added. The first label is the best of the vocabulary even when its score is negative (its caption denoises worse
    than the empty prompt, common in scenes of several objects); later ones are added while they remove >= 3%."""
    _quiet_libraries()
    vocab = _vocabulary(vocabulary, vocabulary_file)
    if vocab is None:
        _err("no candidate labels: pass --vocabulary W1,W2,... or --vocabulary-file F")
        raise typer.Exit(2)
    _check_inputs(inputs, False)
    if batch_size < 1:
        _err("--batch-size must be at least 1")
        raise typer.Exit(2)
    predictor = _load_predictor(model, device, dtype)
    _warn_unknown_words(predictor, vocab)
    from attnseg.io.images import list_images

    failed: list[Path] = []
    for path, res in _tag_images(predictor, list_images(inputs), vocab, batch_size, failed):
        if json_lines:
            typer.echo(json.dumps({"image": str(path), "labels": res.labels, "scores": res.scores}))
        else:
            typer.echo(f"{path}: " + ", ".join(f"{lab} ({res.scores[lab]:.3f})" for lab in res.labels))
    if failed:
        raise typer.Exit(1)


def _numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    """``n`` comma-separated numbers of a ``--point`` / ``--box`` value, or exit 2 saying the expected form."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        _err(f"--{what} {text!r}: expected {'X,Y' if n == 2 else 'X0,Y0,X1,Y1'} (numbers, in image pixels)")
        raise typer.Exit(2)
    return vals


def _segment_prompted(
    inputs, labels, labels_file, method, preset, model, out, crf, seed, device, dtype, point, box, scribble, name
):
    """``segment IMAGE --point/--box/--scribble``: one image, each prompt one object."""
    import numpy as np
    from PIL import Image

    from attnseg.io.images import ImageError
    from attnseg.jobs.segment import segment_with_prompts
    from attnseg.methods.interactive import VisualPrompt
    from attnseg.methods.registry import REAL, REGISTRY, VISUAL

    method = method or "interactive"
    _check_method(method, preset, REAL)
    if REGISTRY[method].guide != VISUAL:
        _err(f"--point, --box and --scribble prompt the interactive method, not {method}; drop --method")
        raise typer.Exit(2)
    if labels or labels_file is not None:
        _err("--point, --box and --scribble show the objects themselves: drop --labels / --labels-file (use --name)")
        raise typer.Exit(2)
    if len(inputs) != 1 or not inputs[0].is_file():
        _err("prompts are in one image's pixels: give exactly one image file")
        raise typer.Exit(2)
    prompts = [VisualPrompt(points=(_numbers(p, 2, "point"),)) for p in point or []]
    prompts += [VisualPrompt(box=_numbers(b, 4, "box")) for b in box or []]
    for path in scribble or []:
        try:
            prompts.append(VisualPrompt(scribble=np.asarray(Image.open(path).convert("L")) > 0))
        except OSError as e:
            _err(f"--scribble {path}: not a readable image ({e.strerror or e})")
            raise typer.Exit(2) from None
    if name:
        if len(name) != len(prompts):
            _err(f"{len(name)} --name for {len(prompts)} prompts: give one name per prompt (points, then boxes, then scribbles)")
            raise typer.Exit(2)
        prompts = [VisualPrompt(p.points, p.box, p.scribble, n) for p, n in zip(prompts, name, strict=True)]
    _out_folder(out)
    predictor = _load_predictor(model, device, dtype)
    try:
        mask = segment_with_prompts(predictor, inputs[0], prompts, out, preset=preset, seed=seed, crf=crf)
    except (ImageError, ValueError, ImportError) as e:
        _err(f"{inputs[0]}: {e}")
        raise typer.Exit(2) from None
    typer.echo(f"{len(prompts)} object(s) segmented -> {mask}")


def _segment_personal(inputs, labels, concepts, class_word, model, out, seed, device, dtype, method, crf, preset) -> None:
    """``segment --concept``: personalized referring segmentation (T2M section 5.3) of each input; ``preset`` names
    one of ``attnseg.methods.personal.PERSONAL_PRESETS``."""
    from attnseg.diffusion.concepts import ConceptError
    from attnseg.jobs.personal import segment_personal_paths
    from attnseg.methods.personal import FUNCTION_WORDS, PERSONAL_PRESETS

    if method is not None or crf:
        _err("--concept segments referring queries its own way (T2M section 5.3): drop --method and --crf")
        raise typer.Exit(2)
    if (preset or "default") not in PERSONAL_PRESETS:
        _err(f"unknown preset {preset!r} for --concept: use one of {', '.join(PERSONAL_PRESETS)}")
        raise typer.Exit(2)
    config = PERSONAL_PRESETS[preset or "default"]
    queries = split_labels(labels)
    if not queries:
        _err("no queries given: pass --labels 'a <my-mug> mug with cola' (one query per object, repeat --labels)")
        raise typer.Exit(2)
    _check_inputs(inputs, True)
    _out_folder(out)
    predictor = _load_predictor(model, device, dtype)
    try:
        for c in concepts:
            predictor.load_concept(c)
        _warn_unknown_words(predictor, [w for q in queries for w in q.split() if w.lower() not in FUNCTION_WORDS])
        done, skipped, failed = segment_personal_paths(
            predictor, inputs, out, queries, class_word, config, seed, on_error=lambda src, msg: _err(f"{src}: {msg}")
        )
    except (ConceptError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(f"{len(done)} segmented, {len(skipped)} already done, {len(failed)} failed -> {out}")
    if failed:
        raise typer.Exit(1)


def _segment_grounding(inputs, labels, labels_file, module, model, out, seed, crf, device, dtype, preset) -> None:
    """``segment --method grounding``: a trained grounding module's masks of each input (its real image noised to
    the last generation step's noise level and read in one denoiser forward)."""
    from attnseg.grounder import Grounder, GroundingError
    from attnseg.jobs.grounding import segment_grounding_paths

    if preset is not None:
        _err("--method grounding has no presets: its settings are the trained module's (--module)")
        raise typer.Exit(2)
    labels = split_labels(labels)
    if not labels and labels_file is None:
        _err("no labels given: pass --labels L1,L2 (or repeat --labels) or --labels-file F")
        raise typer.Exit(2)
    _check_labels_file(labels_file)
    _check_inputs(inputs, bool(labels))
    _out_folder(out)
    predictor = _load_predictor(model, device, dtype)
    try:
        grounder = Grounder.from_folder(predictor.backbone, module)
        grounder.check()  # a module of another model is refused before any image
        done, skipped, failed = segment_grounding_paths(
            grounder, inputs, out, labels, labels_file, seed, crf, on_error=lambda src, msg: _err(f"{src}: {msg}")
        )
    except (GroundingError, ValueError, ImportError) as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(f"{len(done)} segmented, {len(skipped)} already done, {len(failed)} failed -> {out}")
    if failed:
        raise typer.Exit(1)


@app.command()
def layers(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    size: Annotated[int | None, typer.Option(help="Image side (default: the model's native size).")] = None,
) -> None:
    """List the attention layers of a model with their grid side and resolution rank."""
    _quiet_libraries()
    bb = _load_predictor(model, "cpu", "float32").backbone
    side = bb.latent_side(size or bb.native_resolution)
    for lay in bb.layers:
        typer.echo(
            f"{lay.name:70s} {lay.kind:5s} {lay.source:6s} {lay.block:5s} side={lay.side(side):3d} rank={lay.rank} heads={lay.heads}"
        )
