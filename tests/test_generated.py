"""Generated-image methods on hand-made maps, and the resumable `attnseg generate`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnseg.methods.generated import (
    CASAConfig,
    SeeDiffConfig,
    cross_self,
    expand_regions,
    finalize,
    otsu_threshold,
    seediff,
)


def test_expand_regions_is_mean_of_seed_rows():
    a = torch.tensor([[[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.3, 0.0], [0.0, 0.1, 0.1, 0.8], [0.0, 0.0, 0.5, 0.5]]])
    seeds = torch.tensor([[[True], [True], [False], [False]]])
    m = expand_regions(a, seeds)
    mean_row = (a[0, 0] + a[0, 1]) / 2  # [0.4, 0.4, 0.2, 0.0]
    assert torch.allclose(m[0, :, 0], mean_row / mean_row.max())
    none = expand_regions(a, torch.zeros_like(seeds))
    assert torch.equal(none, torch.zeros_like(none))


def _block_world(side: int):
    """A 2-region world: pixels in the left half attend to the left half only, same for the right."""
    p = side * side
    left = torch.tensor([(i % side) < side // 2 for i in range(p)])
    same = (left[:, None] == left[None, :]).float()
    return left, (same / same.sum(1, keepdim=True))[None]


def test_seediff_recovers_the_region_of_a_hand_made_world():
    _, s4 = _block_world(4)
    left8, s8 = _block_world(8)
    cross = torch.full((1, 16, 3), 0.1)
    cross[0, 0, 1] = 1.0  # one strong seed pixel at the top-left for token 1
    soft = seediff({4: cross}, {4: s4, 8: s8}, [[1]], SeeDiffConfig(seed_rank=0))
    assert soft.shape == (1, 1, 8, 8)
    m = soft[0, 0].flatten()
    assert (m[left8] > 0.9).all() and (m[~left8] < 0.1).all()


def test_ca_sa_equals_explicit_power():
    g = torch.Generator().manual_seed(0)
    s = torch.rand((1, 16, 16), generator=g)
    s = s / s.sum(2, keepdim=True)
    c = torch.rand((1, 16, 4), generator=g)
    out = cross_self({4: c}, {4: s}, [[2]], CASAConfig(tau=4, cross_rank=0, self_rank=0))
    col = c[0, :, 2] / c[0, :, 2].max()
    ref = torch.linalg.matrix_power(s[0], 4) @ col
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert torch.allclose(out[0, 0].flatten(), ref, atol=2e-3)  # float32 products, stretched by min-max


def test_finalize_beta_and_uncertain_band():
    soft = torch.tensor([[[[0.9, 0.55], [0.2, 0.65]]]])
    _, lab = finalize(soft, None, (2, 2), CASAConfig(pamr=False))  # beta .6, band [.5, .6)
    assert lab[0].tolist() == [[1, 255], [0, 1]]


def test_otsu_splits_two_modes():
    x = torch.cat([torch.full((50,), 0.1), torch.full((50,), 0.8)])[None]
    t = otsu_threshold(x)
    assert 0.1 < t.item() < 0.8


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "attnseg.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_generate_kill_and_resume_gives_every_item_once(tiny_pipe_dir, tmp_path):
    pytest.importorskip("pycocotools")
    args = [
        "generate",
        "-c",
        "circle",
        "-c",
        "star",
        "--per-class",
        "4",
        "--model",
        str(tiny_pipe_dir),
        "--steps",
        "4",
        "--block",
        "1",
        "--method",
        "seediff",
        "--device",
        "cpu",
        "--seed",
        "5",
    ]
    ref = tmp_path / "ref"
    p = _run([*args, "--out", str(ref)])
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    out = tmp_path / "killed"
    proc = _run([*args, "--out", str(out)])
    man = out / "manifest.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300:
        if man.exists() and len(man.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(man.read_text().splitlines())
    assert 3 <= n_before < 8
    with open(man, "a") as f:  # a torn line, as if killed in the middle of an append
        f.write('{"id": "000007", "ind')
    p = _run([*args, "--out", str(out)])
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    recs = [json.loads(x) for x in man.read_text().splitlines()]
    assert sorted(r["index"] for r in recs) == list(range(8))
    assert _digest(out) == _digest(ref)  # byte-identical to the uninterrupted run
    assert not list(out.rglob("*.tmp"))
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["images"]) == 8 and [c["name"] for c in coco["categories"]] == ["circle", "star"]


def test_generate_refuses_another_runs_folder_and_bad_input(tiny_pipe_dir, tmp_path):
    from typer.testing import CliRunner

    from attnseg.cli import app

    base = ["generate", "--model", str(tiny_pipe_dir), "--steps", "2", "--per-class", "1", "--device", "cpu"]
    r = CliRunner().invoke(app, [*base, "-c", "circle", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*base, "-c", "star", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "holds another run (different classes" in r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "give --classes" in r.output
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    r = CliRunner().invoke(app, [*base, "-c", "circle", "--prompts", str(empty), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "holds no prompt" in r.output
    r = CliRunner().invoke(app, [*base, "-c", "circle", "--resume", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "holds no run to resume" in r.output


def test_a_label_without_seed_is_recorded_in_the_manifest_and_reported(tiny_pipe_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnseg.cli import app
    from attnseg.methods.generated import SeeDiff

    # The star never reaches alpha: its mask is empty, which the manifest and the command's last line must say.
    monkeypatch.setattr(SeeDiff, "unseeded", lambda self, c, s, spans: [{1: "its cross map peaks at 0.40 < alpha 0.5"}])
    base = ["generate", "--model", str(tiny_pipe_dir), "--steps", "2", "--per-class", "1", "--device", "cpu"]
    r = CliRunner().invoke(
        app, [*base, "--prompts", str(_prompts(tmp_path)), "-c", "circle", "-c", "star", "--out", str(tmp_path / "g")]
    )
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (tmp_path / "g" / "manifest.jsonl").read_text().splitlines()]
    assert [rec["empty_labels"] for rec in recs] == [["star"]]
    assert "1 items have a label with an empty mask" in r.output


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("a circle and a star\n")
    return p
