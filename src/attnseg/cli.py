"""Command line: ``attnseg segment``, ``attnseg tag``, ``attnseg grounding``, ``attnseg shapes export``, ``attnseg layers``,
``attnseg train-toy``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from attnseg.io.labels import split_labels
from attnseg.train.grounding.command import grounding_app

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[crf]" in them is an extra's name, not markup
    context_settings={"max_content_width": 120},
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Segment images with the attention of text-to-image diffusion models.",
)
shapes_app = typer.Typer(add_completion=False, no_args_is_help=True, help="ShapesWorld: procedural scenes with exact masks.")
app.add_typer(shapes_app, name="shapes")
app.add_typer(grounding_app, name="grounding")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


_VERBOSE = {"on": False}
"""Set by ``attnseg --verbose``: the libraries' own warnings, logs and progress bars are shown."""


@app.callback()
def _global_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the libraries' own warnings, logs and progress bars.")
    ] = False,
) -> None:
    _VERBOSE["on"] = verbose


def _quiet_libraries() -> None:
    """Quiet diffusers, transformers and Python warnings for the whole command, unless ``--verbose``."""
    if _VERBOSE["on"]:
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _out_folder(folder: Path) -> None:
    """Exit 2 with one clear line when an output folder cannot be created or written."""
    from attnseg.io.files import OutputError, writable_folder

    try:
        writable_folder(folder)
    except OutputError as e:
        _err(str(e))
        raise typer.Exit(2) from None


def _check_method(name: str, preset: str | None, images: str, guide: str | None = None) -> None:
    """Exit 2 with the registry's message for an unknown method or preset."""
    from attnseg.methods.registry import MethodError, resolve

    try:
        resolve(name, preset, images, guide)
    except MethodError as e:
        _err(str(e))
        raise typer.Exit(2) from None


def _load_predictor(model: str | None, device: str, dtype: str):
    from attnseg.diffusion.loading import ModelError
    from attnseg.predictor import AttnSegPredictor

    try:
        return AttnSegPredictor.from_pretrained(model, device=device, dtype=dtype, quiet=not _VERBOSE["on"])
    except ModelError as e:
        _err(str(e))
        raise typer.Exit(2) from None


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
        str | None, typer.Option(help="Named settings of the method (e.g. t2m: voc, single-pass; iseg: wsss-voc).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
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
    if labels_file is not None and not labels_file.is_file():
        _err(f"labels file {labels_file} does not exist")
        raise typer.Exit(2)
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


def _vocabulary(words: list[str] | None, file: Path | None) -> list[str] | None:
    """The candidate labels of ``--vocabulary`` or ``--vocabulary-file`` (None: neither), or exit 2 saying what is wrong."""
    if words and file is not None:
        _err("give --vocabulary or --vocabulary-file, not both")
        raise typer.Exit(2)
    if file is not None:
        if not file.is_file():
            _err(f"vocabulary file {file} does not exist")
            raise typer.Exit(2)
        try:
            words = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            _err(f"vocabulary file {file} cannot be read as text ({e}); write one label a line")
            raise typer.Exit(2) from None
    elif not words:
        return None
    vocab = list(dict.fromkeys(split_labels(words)))
    if not vocab:
        _err(f"the vocabulary {'file ' + str(file) + ' ' if file else ''}is empty: give at least one candidate label")
        raise typer.Exit(2)
    return vocab


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
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
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
    if labels_file is not None and not labels_file.is_file():
        _err(f"labels file {labels_file} does not exist")
        raise typer.Exit(2)
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


def _check_inputs(inputs: list[Path], labels_given: bool) -> None:
    """Exit 2 before any work when an input does not exist (a second label after ``--labels`` lands here)."""
    missing = [p for p in inputs if not p.exists()]
    if missing:
        hint = "; to give several labels write --labels a,b or repeat --labels" if labels_given else "; check the path"
        _err(f"{missing[0]}: no such file or folder{hint}")
        raise typer.Exit(2)


@app.command()
def layers(
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
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


@app.command("eval")
def eval_cmd(
    dataset: Annotated[Path, typer.Argument(help="VOC-layout folder, or COCO annotations JSON / folder.")],
    out: Annotated[Path, typer.Option(help="Report folder (report.json, report.md, per_class.png, qualitative.png).")],
    method: Annotated[
        list[str] | None,
        typer.Option("--method", "-m", help="Methods to compare: cross, t2m, iseg, t2m:single-pass, iseg+crf ..."),
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
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
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
    predictor = _load_predictor(model, device, dtype) if method else None
    if labels_file is not None and not labels_file.is_file():
        _err(f"labels file {labels_file} does not exist")
        raise typer.Exit(2)
    from attnseg.jobs.evaluate import MethodSpec
    from attnseg.methods.registry import REAL

    for m in method:
        spec = MethodSpec.parse(m)
        _check_method(spec.method, spec.preset, REAL)
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
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median reported).")] = 5,
    batch: Annotated[int, typer.Option(help="Images per batch for the throughput figure.")] = 8,
    real_size: Annotated[bool, typer.Option(help="Also measure an SD 1.5-shaped UNet at 512 px (about 4 GB of RAM).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or auto.")] = "float32",
    scenes: Annotated[int, typer.Option(help="personal: test scenes.")] = 100,
    steps: Annotated[int, typer.Option(help="personal: learning steps per concept.")] = 400,
    seed: Annotated[int, typer.Option(help="personal: seed of photos, scenes, learning and noise.")] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads of torch (default: torch's).")] = None,
) -> None:
    """Seconds per image, throughput, peak memory and the ratio to the bare model cost, per method; with `families`,
    the same for capture on the newer families' denoisers; with `personal`, personalized referring segmentation on
    ShapesWorld (concepts learned, then T2M's Table 7)."""
    _quiet_libraries()
    if suite == "personal":
        _bench_personal(out, model, scenes, steps, seed, threads)
        return
    if suite == "families":
        _bench_families(out)
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


def _bench_families(out: Path | None) -> None:
    """Capture on SDXL-, SD3- and Flux-shaped denoisers at 1024 px: a table, and ``OUT/families.json`` / ``.md``."""
    from attnseg.io.files import atomic_write_bytes
    from attnseg.jobs.bench import bench_families, families_markdown

    if out is not None:
        _out_folder(out)
    res = bench_families()
    table = families_markdown(res)
    if out is not None:
        atomic_write_bytes(out / "families.json", json.dumps(res, indent=1).encode())
        atomic_write_bytes(out / "families.md", table.encode())
    typer.echo(table, nl=False)


def _progress_bar():
    """A rich progress bar on stderr (hidden when stderr is not a terminal): ``(bar, advance(what, i, n))``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    tasks: dict[str, int] = {}

    def advance(what: str, i: int, n: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=n)
        bar.update(tasks[what], completed=i)

    return bar, advance


def _bench_personal(out: Path | None, model: str | None, scenes: int, steps: int, seed: int, threads: int | None) -> None:
    import torch

    from attnseg.diffusion.concepts import ConceptError
    from attnseg.train.personal_bench import PersonalBenchConfig, markdown, run_personal_bench
    from attnseg.train.personalize import PersonalizeConfig

    if out is None:
        _err("bench personal needs --out DIR (photos, scenes, concepts and personal.json go there)")
        raise typer.Exit(2)
    if scenes < 1 or steps < 1:
        _err("--scenes and --steps must be at least 1")
        raise typer.Exit(2)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = PersonalBenchConfig(scenes=scenes, seed=seed, learn=PersonalizeConfig(steps=steps, samples=4))
    bar, advance = _progress_bar()
    try:
        with bar:
            res = run_personal_bench(out, cfg, lambda: _load_predictor(model, "cpu", "float32"), advance)
    except ConceptError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    typer.echo(markdown(res))


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
    seed: Annotated[int, typer.Option(help="Seed of batches, noise, regularisation images and samples.")] = 0,
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
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
                PersonalizeConfig(method=method, steps=steps, seed=seed),
                progress=lambda s, n, _loss: advance(f"learning {token}", s, n),
            )
    except ConceptError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    if class_word.lower() in predictor.unknown_words([class_word]):
        typer.echo(f"warning: the model does not know the class word {class_word!r}", err=True)
    typer.echo(f"{concept.token} ({concept.method}, {len(images)} photos) -> {out}")


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
    model: Annotated[str | None, typer.Option(help="Stable Diffusion folder or hub id (default: the embedded model).")] = None,
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


def _warn_unknown_words(predictor, labels) -> None:
    """One warning naming the words of ``labels`` the model does not know (and what it knows, when it lists it)."""
    unknown = predictor.unknown_words(labels)
    if not unknown:
        return
    words = ", ".join(repr(w) for w in unknown)
    if predictor.vocabulary is not None:
        known = ", ".join(predictor.vocabulary)
        typer.echo(f"warning: the model does not know {words}; it knows: {known}. Their masks will be meaningless", err=True)
    else:
        typer.echo(f"warning: the tokenizer splits {words} into sub-word pieces; the model may not know them", err=True)


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


@app.command("train-toy", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_toy(ctx: typer.Context) -> None:
    """Train the embedded model (stages data, vae, encode, unet, export, all); see --help of the module."""
    from attnseg.train.embedded.command import main

    main(list(ctx.args))


def _plain_metavars(command) -> None:
    """Show option values as NAME (``--seed SEED``), not as Python type tags (``<int>``), in every command's help."""
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None  # the argument's name says it; no "<list[Path]>"
        elif param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = param.name.upper()


def main() -> None:
    command = typer.main.get_command(app)
    _plain_metavars(command)
    command(prog_name="attnseg")


if __name__ == "__main__":
    main()
