"""The Ray engine gives the same files as the local engine (Ray runs locally, 2 CPUs)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("ray")
pytest.importorskip("pycocotools")


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def _cli(args, tmp_path):
    # Ray's socket paths must stay under 107 bytes: a short temporary folder, not pytest's.
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": short, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-m", "attnseg.cli", *args], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    # Ray is quiet: no INFO banners, no deprecation warnings, no error-level lines about actor arguments.
    noise = [ln for ln in p.stderr.splitlines() if "INFO" in ln or "deprecated" in ln or "core_worker" in ln]
    assert not noise, noise[:3]
    return p


def test_generate_local_and_ray_identical(tiny_pipe_dir, tmp_path):
    base = [
        "generate",
        "-c",
        "circle",
        "-c",
        "ring",
        "--per-class",
        "2",
        "--model",
        str(tiny_pipe_dir),
        "--steps",
        "3",
        "--block",
        "1",
        "--device",
        "cpu",
        "--method",
        "ca-sa",
    ]
    _cli([*base, "--out", str(tmp_path / "local")], tmp_path)
    _cli([*base, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"], tmp_path)
    a, b = _digest(tmp_path / "local"), _digest(tmp_path / "ray")
    assert len(a) == 8 and a == b


def test_segment_with_ray_engine(tiny_pipe_dir, tmp_path):
    from attnseg.shapes.world import export_voc

    export_voc(tmp_path / "scenes", n=3, seed=9)
    imgs = tmp_path / "scenes" / "JPEGImages"
    common = [
        "segment",
        str(imgs),
        "--labels-file",
        str(tmp_path / "scenes" / "labels.json"),
        "--model",
        str(tiny_pipe_dir),
        "--method",
        "cross",
        "--device",
        "cpu",
        "--batch-size",
        "1",
    ]
    _cli([*common, "--out", str(tmp_path / "local")], tmp_path)
    _cli([*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    for p in (tmp_path / "local").glob("*.png"):
        if not p.name.endswith("_overlay.png"):
            assert p.read_bytes() == (tmp_path / "ray" / p.name).read_bytes()
