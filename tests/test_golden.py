"""Outputs stay byte-identical: segment, eval and generate on the embedded model against files kept in tests/golden.

The files were written by the commands below before the package was reorganised into layers, and every
refactoring since must leave them unchanged. A change that is meant to alter results (new weights, a fixed
method) rewrites them with ``ATTNSEG_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and says so in its commit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnseg.cli import app

GOLDEN = Path(__file__).parent / "golden"
COMMANDS = [
    ["shapes", "export", "scenes", "--n", "3", "--seed", "1"],
    ["segment", "scenes/JPEGImages", "--labels-file", "scenes/labels.json", "--method", "t2m", "--out", "seg-t2m"],
    ["segment", "scenes/JPEGImages", "--labels-file", "scenes/labels.json", "--method", "iseg", "--crf", "--out", "seg-iseg-crf"],
    ["eval", "scenes", "-m", "cross", "-m", "t2m", "-m", "iseg", "-m", "diffseg", "--out", "eval"],
    ["generate", "-c", "circle", "-c", "star", "--per-class", "1", "--method", "seediff", "--steps", "5", "--out", "gen"],
]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    pytest.importorskip("pydensecrf")
    pytest.importorskip("pycocotools")
    work = tmp_path_factory.mktemp("golden")
    cwd = os.getcwd()
    os.chdir(work)  # the outputs record relative paths, as the golden files do
    try:
        for args in COMMANDS:
            r = CliRunner().invoke(app, [*args, "--device", "cpu"] if args[0] in ("segment", "eval", "generate") else args)
            assert r.exit_code == 0, r.output
    finally:
        os.chdir(cwd)
    if os.environ.get("ATTNSEG_UPDATE_GOLDEN"):
        for sub in ("seg-t2m", "seg-iseg-crf", "eval", "gen"):
            shutil.rmtree(GOLDEN / sub, ignore_errors=True)
            shutil.copytree(work / sub, GOLDEN / sub)
    return work


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("sub", ["seg-t2m", "seg-iseg-crf", "eval", "gen"])
def test_outputs_are_byte_identical(outputs, sub):
    want, got = GOLDEN / sub, outputs / sub
    assert _files(got) == _files(want)
    changed = [f for f in _files(want) if (got / f).read_bytes() != (want / f).read_bytes()]
    assert not changed, f"{sub}: {changed} differ from tests/golden"
