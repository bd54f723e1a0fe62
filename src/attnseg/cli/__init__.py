"""Command line: ``attnseg segment``, ``tag``, ``layers``, ``eval``, ``bench``, ``personalize``, ``generate``,
``score-generated``, ``shapes ...``, ``grounding ...``, ``train-segmenter`` and ``train-toy``; one module per group of
commands, each registering on the app of :mod:`attnseg.cli.common` when imported (in the order of ``attnseg --help``).
Each command imports its job inside itself, so that ``attnseg --help`` answers without loading torch."""

from __future__ import annotations

import typer

from attnseg.cli.common import app

# The command modules register their commands when imported, in this order, which is that of ``attnseg --help``.
# isort: off
from attnseg.cli import segment, evaluate, personalize, generate, shapes, train  # noqa: F401
# isort: on

__all__ = ["app", "main"]


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
