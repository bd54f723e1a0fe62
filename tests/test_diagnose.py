"""The self-attention coherence measure on hand-made maps."""

from __future__ import annotations

import pytest
import torch

from attnseg.train.embedded.diagnose import object_affinity


def test_object_affinity_of_a_perfect_and_a_uniform_map():
    # 4 cells: background, background, object 1, object 2.
    cells = torch.tensor([0, 0, 1, 2])
    uniform = torch.full((4, 4), 0.25)
    r = object_affinity(uniform, cells)
    assert r["own"] == pytest.approx(0.25) and r["bg"] == pytest.approx(0.5) and r["other"] == pytest.approx(0.25)
    assert r["lift"] == pytest.approx(1.0)  # uniform attention is no better than the object's area
    perfect = torch.eye(4)
    r = object_affinity(perfect, cells)
    assert r == pytest.approx({"own": 1.0, "other": 0.0, "bg": 0.0, "lift": 4.0})


def test_object_affinity_averages_objects_not_cells():
    # Object 1 has two cells that attend half to themselves and half to object 2; object 2 attends to background.
    cells = torch.tensor([0, 1, 1, 2])
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.25, 0.25, 0.5],
            [0.0, 0.25, 0.25, 0.5],
            [1.0, 0.0, 0.0, 0.0],
        ]
    )
    r = object_affinity(a, cells)
    # object 1: own 0.5, other 0.5, bg 0, lift 0.5 / 0.5 = 1; object 2: own 0, other 0, bg 1, lift 0.
    assert r == pytest.approx({"own": 0.25, "other": 0.25, "bg": 0.5, "lift": 0.5})
    assert object_affinity(a, torch.zeros(4, dtype=torch.long)) == {}
