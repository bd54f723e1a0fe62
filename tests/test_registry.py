"""The method registry validates every name in one place; the engine runs any worker; the backbone's text states."""

from __future__ import annotations

import pytest
import torch

from attnseg.diffusion.backbone import TextStates
from attnseg.jobs.engine import run_tasks
from attnseg.methods.registry import (
    GENERATED,
    LABELS,
    NOTHING,
    REAL,
    REGISTRY,
    VISUAL,
    MethodError,
    check_profile,
    get_method,
    names,
    resolve,
)


def test_names_by_kind():
    assert names(REAL, LABELS) == ["cross", "t2m", "iseg", "concept-attention"]
    assert names(REAL, NOTHING) == ["diffseg", "diffseg-iseg"]
    assert names(REAL, VISUAL) == ["interactive"]
    assert names(GENERATED) == ["ca", "ca-sa", "seediff", "grounding"]


def test_resolve_defaults_to_the_papers_preset_and_names_the_choices():
    info, preset, cfg = resolve("t2m")
    assert info.name == "t2m" and info.images == REAL and info.needs_labels
    assert (preset, cfg.timestep, cfg.iters, cfg.draws) == ("voc", 150, 2, 10)
    assert resolve("iseg", "wsss-coco")[2].bg_threshold == 0.45
    with pytest.raises(
        MethodError,
        match="unknown method 'seediff'; choose one of cross, t2m, iseg, concept-attention, diffseg, diffseg-iseg, interactive",
    ):
        resolve("seediff", images=REAL)
    with pytest.raises(MethodError, match="unknown preset 'nope' for ca-sa; choose one of default, seediff-comparison"):
        resolve("ca-sa", "nope", images=GENERATED)


def test_get_method_applies_overrides_and_leaves_presets_alone():
    m = get_method("t2m", "single-pass", iters=3)
    assert (m.name, m.config.iters, m.config.draws) == ("t2m", 3, 1)
    assert REGISTRY["t2m"].presets["single-pass"].iters == 2


def test_check_profile():
    assert check_profile({"t2m": "embedded", "diffseg": "embedded"}) == []
    assert check_profile({"seediff": "default"}) == [
        "method 'seediff', which is not a real-image method of attnseg (cross, t2m, iseg, concept-attention, diffseg, diffseg-iseg, interactive)"
    ]
    assert check_profile({"t2m": "nope", "magic": "default"}) == [
        "preset 'nope' for 't2m', which attnseg does not have",
        "method 'magic', which is not a real-image method of attnseg (cross, t2m, iseg, concept-attention, diffseg, diffseg-iseg, interactive)",
    ]


def _double():
    return lambda task: 2 * task


def test_local_engine_runs_the_given_worker_in_order():
    assert list(run_tasks("local", [1, 2, 3], _double)) == [2, 4, 6]
    built = []
    assert list(run_tasks("local", [5], lambda: built.append(1) or (lambda t: t), local_worker=lambda t: -t)) == [-5]
    assert built == []  # a worker the caller already has is not built again
    with pytest.raises(ValueError, match="unknown engine 'gpu-farm': use local or ray"):
        run_tasks("gpu-farm", [1], _double)


def test_text_states_rows():
    ts = TextStates(torch.arange(12.0).reshape(3, 2, 2), {"pooled": torch.arange(3.0)})
    sub = ts.rows(torch.tensor([2, 0]))
    assert len(sub) == 2
    assert torch.equal(sub.hidden[0], ts.hidden[2]) and torch.equal(sub.added["pooled"], torch.tensor([2.0, 0.0]))


def test_every_method_with_a_code_preset_has_a_paper_preset_of_its_default_settings():
    from attnseg.methods.registry import REGISTRY

    with_code = [info for info in REGISTRY.values() if "code" in info.presets]
    assert {info.name for info in with_code} >= {"t2m", "iseg", "diffseg", "seediff"}
    for info in with_code:
        assert "paper" in info.presets, info.name
        assert info.presets["paper"] == info.presets[info.default_preset], info.name
