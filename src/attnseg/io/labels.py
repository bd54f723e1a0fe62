"""Image-level labels given by the user: a labels file, or one list for every image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class LabelsError(ValueError):
    """Labels cannot be read or found for an image; the message says what to do."""


def split_labels(values: Sequence[str] | None) -> list[str]:
    """Labels given by repeating an option (``-l cat -l dog``) or as one comma-separated list (``-l cat,dog``)."""
    return [x.strip() for value in values or [] for x in value.split(",") if x.strip()]


def load_labels_file(path: str | Path) -> dict[str, list[str]]:
    """A JSON object mapping an image's file name (or stem) to its list of labels."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelsError(f"labels file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise LabelsError(f"labels file {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise LabelsError(f"labels file {p} must be a JSON object mapping file names to lists of labels")
    return {str(k): [str(x) for x in v] for k, v in data.items()}


def labels_for(path: Path, labels: Sequence[str] | None, table: dict[str, list[str]] | None) -> list[str]:
    """The labels of image ``path``: its entry in ``table`` (by file name, stem or path), else ``labels``."""
    if table is not None:
        for key in (path.name, path.stem, str(path)):
            if key in table:
                return table[key]
        raise LabelsError(f"no entry for {path.name} in the labels file; add it or remove the image")
    if not labels:
        raise LabelsError("no labels given: pass --labels L1 L2 ... or --labels-file F")
    return list(labels)
