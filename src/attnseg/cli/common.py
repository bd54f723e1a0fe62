"""What every command shares: the Typer apps, the global options, quiet libraries, clear errors, model loading."""

from __future__ import annotations

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


MODEL_HELP = "Pipeline folder or hub id, or embedded-sd3 (default: embedded, the shipped UNet model)."
"""The help of every command's --model."""


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


def _check_inputs(inputs: list[Path], labels_given: bool) -> None:
    """Exit 2 before any work when an input does not exist (a second label after ``--labels`` lands here)."""
    missing = [p for p in inputs if not p.exists()]
    if missing:
        hint = "; to give several labels write --labels a,b or repeat --labels" if labels_given else "; check the path"
        _err(f"{missing[0]}: no such file or folder{hint}")
        raise typer.Exit(2)


def _check_labels_file(path: Path | None) -> None:
    """Exit 2 when a --labels-file is given but is not a file."""
    if path is not None and not path.is_file():
        _err(f"labels file {path} does not exist")
        raise typer.Exit(2)


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
