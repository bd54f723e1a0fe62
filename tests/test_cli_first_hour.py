"""What a new user meets first: label lists, one clear message per error, readable help, quiet loading, warnings
for words the model does not know, readable reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli import app
from attnseg.shapes.world import make_scene


@pytest.fixture
def image(tmp_path):
    Image.fromarray(make_scene(3, 0).image).save(tmp_path / "a.png")
    return tmp_path / "a.png"


def test_labels_as_a_comma_list_or_repeated(tiny_pipe_dir, tmp_path, image):
    r = CliRunner().invoke(
        app,
        [
            "segment",
            str(image),
            "-l",
            "red circle, star",
            "-l",
            "ring",
            "--model",
            str(tiny_pipe_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "a.json").read_text())["labels"] == ["red circle", "star", "ring"]


def test_a_second_word_after_labels_is_a_usage_error_that_writes_nothing(tiny_pipe_dir, tmp_path, image):
    r = CliRunner().invoke(
        app, ["segment", str(image), "--labels", "hexagon", "ring", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2
    assert "ring: no such file or folder; to give several labels write --labels a,b or repeat --labels" in r.output
    assert not (tmp_path / "o").exists() and "Traceback" not in r.output


def test_an_unreadable_image_is_named_once(tiny_pipe_dir, tmp_path, image):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = CliRunner().invoke(
        app,
        [
            "segment",
            str(tmp_path / "bad.png"),
            str(image),
            "-l",
            "circle",
            "--model",
            str(tiny_pipe_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 1
    line = next(x for x in r.output.splitlines() if "bad.png" in x)
    assert line.count("bad.png") == 1 and "not a readable image" in line


def _help(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "attnseg.cli", *args, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return " ".join(p.stdout.split())  # help is wrapped to the terminal width


def test_help_is_plain_and_complete():
    seg = _help("segment")
    assert "pip install 'attnseg[crf]'" in seg and "<int>" not in seg and "<list[" not in seg
    assert "--seed SEED" in seg and "Usage: attnseg segment" in seg
    ev = _help("eval")
    assert "Seed of the noise draws" in ev and "cpu, cuda, cuda:1 or auto" in ev
    toy = _help("train-toy")
    assert "usage: attnseg train-toy" in toy and "--work" in toy


def test_python_api_loads_quietly(tiny_pipe_dir):
    code = f"from attnseg import AttnSegPredictor; AttnSegPredictor.from_pretrained({str(tiny_pipe_dir)!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr.strip() == "" and p.stdout.strip() == ""


def test_words_the_embedded_model_does_not_know_are_named(tmp_path, image):
    r = CliRunner().invoke(app, ["segment", str(image), "-l", "zebra,circle", "--out", str(tmp_path / "o"), "--method", "cross"])
    assert r.exit_code == 0, r.output
    assert "warning: the model does not know 'zebra'; it knows: circle, square" in r.output
    assert "'circle'" not in r.output.split("it knows")[0]


def test_tokenizer_split_words_are_named_for_a_model_without_a_vocabulary(predictor):
    assert predictor.vocabulary is None
    pieces = {w: predictor.backbone.word_pieces(w) for w in ("circle", "zzyzxqv")}
    assert predictor.unknown_words(["circle", "zzyzxqv thing"]) == [
        w for w in ("circle", "zzyzxqv", "thing") if (pieces.get(w) or predictor.backbone.word_pieces(w)) > 1
    ]
    assert "zzyzxqv" in predictor.unknown_words(["zzyzxqv"])


def test_bench_table_shows_the_bare_time_each_ratio_comes_from():
    from attnseg.jobs.bench import bench_markdown

    res = {
        "machine": {},
        "model": "m",
        "resolution": 64,
        "methods": {
            "bare": {"seconds_per_image": 0.02, "images_per_second_batched": 50.0, "peak_rss_mb": 500},
            "t2m": {
                "seconds_per_image": 0.022,
                "images_per_second_batched": 45.0,
                "peak_rss_mb": 510,
                "bare_seconds_same_window": 0.020,
                "ratio_to_bare": 1.1,
            },
        },
        "refinement": {"pixels": 4, "seconds": {"1": 0.001}, "linear_fit_r2": 1.0},
    }
    md = bench_markdown(res)
    assert "| t2m | 0.0220 | 0.0200 | 1.10 | 45.0 | 510 |" in md and "| bare | 0.0200 | - | 1 (reference) |" in md


def test_bench_families_writes_the_table_of_bench_families(tmp_path, monkeypatch):
    row = {"layers": 24, "seconds": 3.0, "time_ratio": 2.0, "peak_rss_mb": 1100, "peak_ratio_total": 1.1}
    res = {"sd3": {"plain": {"seconds": 1.5, "peak_rss_mb": 1000}, "weights_rss_mb": 900}}
    res["sd3"]["cross:default"] = {**row, "peak_ratio_above_weights": 2.0, "captured_mb": 12}
    asked = []
    monkeypatch.setattr("attnseg.jobs.bench.bench_families", lambda *families: asked.append(families) or res)
    r = CliRunner().invoke(app, ["bench", "families", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert asked == [()]  # every family, bench_families' default
    line = "| sd3 | cross:default | 24 | 3.0 | 2.00 | 1100 | 1.10 | 2.00 | 12 |"
    assert line in r.output and line in (tmp_path / "b" / "families.md").read_text()
    assert json.loads((tmp_path / "b" / "families.json").read_text()) == res
    r = CliRunner().invoke(app, ["bench", "families", "--family", "sd3", "--family", "flux"])
    assert r.exit_code == 0 and asked[-1] == (["sd3", "flux"],)
    r = CliRunner().invoke(app, ["bench", "families", "--family", "sd4", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "unknown family sd4: choose from sdxl, sd3, flux" in r.output
    assert not (tmp_path / "c").exists() and len(asked) == 2  # refused before any folder or model
    r = CliRunner().invoke(app, ["bench", "--family", "sd3"])
    assert r.exit_code == 2 and "give the 'families' suite" in r.output
    r = CliRunner().invoke(app, ["bench", "nope"])
    assert r.exit_code == 2 and "give none (speed), 'families' or 'personal'" in r.output


def test_per_class_chart_fits_long_class_names():
    from attnseg.io.reports import bar_chart

    report = {
        "classes": ["background", "pottedplant"],
        "methods": {"m": {"miou": 0.5, "per_class": {"background": 0.9, "pottedplant": 0.1}}},
    }
    assert bar_chart(report).width >= 60 + 2 * (6 * len("pottedplant") + 10)


def test_presence_is_relative_peak_attention_and_names_weak_labels(tiny_pipe_dir, tmp_path, image):
    import numpy as np

    from attnseg.results import WEAK_PRESENCE, SegmentationResult

    r = CliRunner().invoke(
        app, ["segment", str(image), "-l", "circle,star,ring", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "a.json").read_text())
    assert len(meta["presence"]) == 3 and max(meta["presence"]) == 1.0 and min(meta["presence"]) > 0
    assert meta["weak_labels"] == [lab for lab, p in zip(meta["labels"], meta["presence"], strict=True) if p < WEAK_PRESENCE]
    z = np.zeros((1, 1))
    res = SegmentationResult(["cat", "dog", "cat"], z, z, z, z, "t2m", "", presence=[0.2, 1.0, 0.35])
    assert res.weak_labels == ["cat"]
