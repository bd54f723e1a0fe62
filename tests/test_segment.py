"""Predictor API, the output contract of `attnseg segment`, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli import app
from attnseg.shapes.world import make_scene

METHODS = ["cross", "t2m", "iseg"]


@pytest.fixture(scope="module")
def scene():
    return make_scene(7, 0)


@pytest.mark.parametrize("method", METHODS)
def test_predictor_shapes_and_ranges(predictor, scene, method):
    predictor.set_image(scene.image[:40, :52])  # any size
    r = predictor.segment(["red circle", "star"], method=method, draws=2)
    assert r.mask.shape == (40, 52) and r.mask.dtype == np.uint8
    assert r.scores.shape == (3, 40, 52)
    assert set(np.unique(r.mask)) <= {0, 1, 2}
    assert np.array_equal(r.mask, r.scores.argmax(0))
    assert np.allclose(r.confidence, np.sort(r.scores, 0)[-1] - np.sort(r.scores, 0)[-2], atol=1e-6)
    assert r.uncertain.dtype == bool and np.array_equal(r.uncertain, r.confidence < 0.05)
    assert r.method == method and r.labels == ["red circle", "star"]


def test_batch_equals_single(predictor, scene):
    other = make_scene(7, 1).image
    predictor.set_image(scene.image)
    single = predictor.segment(["circle"], method="t2m", draws=2, seed=3)
    batch = predictor.segment_batch([other, scene.image], [["star", "ring"], ["circle"]], method="t2m", draws=2, seed=3)
    assert np.allclose(batch[1].scores, single.scores, atol=2e-3)  # batched matmuls round differently
    assert batch[0].scores.shape[0] == 3


def test_draws_are_seeded(predictor, scene):
    predictor.set_image(scene.image)
    a = predictor.segment(["circle"], method="cross", draws=2, seed=1).scores
    b = predictor.segment(["circle"], method="cross", draws=2, seed=1).scores
    c = predictor.segment(["circle"], method="cross", draws=2, seed=2).scores
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _write_inputs(d):
    d.mkdir()
    sc = make_scene(3, 0)
    Image.fromarray(sc.image).save(d / "rgb.png")
    Image.fromarray(sc.image[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([sc.image, np.full(sc.image.shape[:2], 200, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(sc.image[..., 1].astype(np.uint16) * 257).save(d / "sixteen.png")
    Image.fromarray(np.resize(sc.image, (37, 91, 3))).save(d / "odd.jpg")
    return sc


@pytest.mark.parametrize("method", METHODS)
def test_cli_output_contract(tiny_pipe_dir, tmp_path, method):
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = [
        "segment",
        str(tmp_path / "in"),
        "--labels",
        "red circle",
        "--labels",
        "star",
        "--model",
        str(tiny_pipe_dir),
        "--method",
        method,
        "--out",
        str(out),
        "--draws",
        "1",
        "--device",
        "cpu",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for stem, size in (("rgb", (64, 64)), ("gray", (64, 64)), ("rgba", (64, 64)), ("sixteen", (64, 64)), ("odd", (37, 91))):
        m = Image.open(out / f"{stem}.png")
        assert m.mode == "P" and m.size == (size[1], size[0])
        assert set(np.unique(np.asarray(m))) <= {0, 1, 2}
        meta = json.loads((out / f"{stem}.json").read_text())
        assert meta["labels"] == ["red circle", "star"] and meta["method"] == method
        assert meta["model"] == str(tiny_pipe_dir) and meta["size"] == list(size)
        assert "timestep" in meta["settings"]
        ov = Image.open(out / f"{stem}_overlay.png")
        assert ov.mode == "RGB" and ov.size == m.size
        npz = np.load(out / f"{stem}_scores.npz")
        assert npz["scores"].dtype == np.float16 and npz["scores"].shape == (3, *size)
        assert npz["confidence"].shape == size and list(npz["labels"]) == ["red circle", "star"]
    # A rerun skips what is done, and redoes an image whose JSON is missing.
    (out / "rgb.json").unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "1 segmented, 4 already done" in res.output


def test_cli_labels_file(tiny_pipe_dir, tmp_path):
    _write_inputs(tmp_path / "in")
    table = {"rgb.png": ["circle", "star"], "gray": ["ring"]}
    (tmp_path / "labels.json").write_text(json.dumps(table))
    res = CliRunner().invoke(
        app,
        [
            "segment",
            str(tmp_path / "in" / "rgb.png"),
            str(tmp_path / "in" / "gray.png"),
            str(tmp_path / "in" / "odd.jpg"),
            "--labels-file",
            str(tmp_path / "labels.json"),
            "--model",
            str(tiny_pipe_dir),
            "--out",
            str(tmp_path / "o"),
            "--method",
            "cross",
        ],
    )
    assert res.exit_code == 1  # odd.jpg has no entry
    assert "odd.jpg: no entry for odd.jpg in the labels file" in res.output
    assert json.loads((tmp_path / "o" / "gray.json").read_text())["labels"] == ["ring"]
    assert json.loads((tmp_path / "o" / "rgb.json").read_text())["labels"] == ["circle", "star"]


def test_cli_bad_inputs_each_one_line_and_others_processed(tiny_pipe_dir, tmp_path):
    d = tmp_path / "in"
    _write_inputs(d)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "empty.jpg").write_bytes(b"")
    common = ["--labels", "circle", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o"), "--method", "cross"]
    # An input named on the command line that does not exist is a usage error: nothing runs.
    res = CliRunner().invoke(app, ["segment", str(d), str(tmp_path / "missing.png"), *common])
    assert res.exit_code == 2 and "missing.png: no such file or folder" in res.output
    assert not (tmp_path / "o").exists()
    # Unreadable images in a folder fail one by one; the others are segmented.
    res = CliRunner().invoke(app, ["segment", str(d), *common])
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2, res.output
    assert any("corrupt.png: not a readable image" in e for e in errors)
    assert any("empty.jpg: not a readable image" in e for e in errors)
    assert "Traceback" not in res.output
    assert (tmp_path / "o" / "rgb.json").exists() and (tmp_path / "o" / "odd.json").exists()


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ([], "no labels given"),
        (["--labels", "circle", "--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
        (["--labels", "circle", "--method", "magic"], "unknown method 'magic'"),
        (["--labels", "circle", "--labels-file", "/nonexistent.json"], "labels file /nonexistent.json does not exist"),
    ],
)
def test_cli_usage_errors(tiny_pipe_dir, tmp_path, extra, expect):
    Image.fromarray(make_scene(3, 0).image).save(tmp_path / "a.png")
    args = ["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *extra]
    if "--model" not in extra:
        args += ["--model", str(tiny_pipe_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert expect in res.output and "Traceback" not in res.output


def test_cli_label_too_long(tiny_pipe_dir, tmp_path):
    Image.fromarray(make_scene(3, 0).image).save(tmp_path / "a.png")
    labels = []
    for lab in ["circle", "star"] * 20 + ["zebra"]:
        labels += ["--labels", lab]
    res = CliRunner().invoke(
        app, ["segment", str(tmp_path / "a.png"), "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o"), *labels]
    )
    assert res.exit_code == 1
    assert "'zebra' fall beyond the tokenizer's limit of 77 tokens" in res.output


def test_pickled_weights_refused(tiny_pipe_dir, tmp_path):
    import shutil

    from attnseg.diffusion.loading import ModelError, load_pipeline

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_pipe_dir, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="only pickled weights"):
        load_pipeline(bad)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickled checkpoint"):
        load_pipeline(tmp_path / "model.ckpt")


def test_embedded_model_names_a_folder_of_the_same_name_and_a_path(tiny_pipe_dir, tmp_path, monkeypatch):
    import shutil

    from attnseg.diffusion.loading import ModelError, load_pipeline

    monkeypatch.chdir(tmp_path)
    assert load_pipeline("embedded").attnseg_model_name == "embedded"  # the package's model, by its name
    shutil.copytree(tiny_pipe_dir, tmp_path / "embedded")
    with pytest.raises(ModelError, match=r"names both the package's embedded model and a folder here; pass ./embedded"):
        load_pipeline("embedded")
    # a folder of that name is reached by its path (the tiny pipeline, not the package's model)
    for folder in ("./embedded", Path("embedded")):
        assert Path(load_pipeline(folder).name_or_path).resolve() == tmp_path / "embedded"
    assert Path(load_pipeline(None).name_or_path).resolve() != tmp_path / "embedded"
    with pytest.raises(ModelError, match="no embedded model is named 'embedded-xl'; the package ships embedded"):
        from attnseg.diffusion.loading import embedded_model_path

        embedded_model_path("embedded-xl")


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["generate", "-c", "cat", "--template", "a {x}", "--out", "OUT"], "has no {} for the class name"),
        (["generate", "-c", "cat", "--template", "a {} {x}", "--out", "OUT"], "must hold exactly one {}"),
        (["generate", "-c", "cat", "--block", "0", "--out", "OUT"], "must be at least 1"),
        (["segment", "IMG", "--labels", "cat", "--device", "tpu:7", "--out", "OUT"], "unknown device 'tpu:7'"),
        (["segment", "IMG", "--labels", "cat", "--batch-size", "0", "--out", "OUT"], "must be at least 1"),
        (["eval", "OUT", "-m", "t2m", "--out", "OUT"], "does not exist"),
        (["bench", "-m", "magic"], "unknown method 'magic'"),
        (["bench", "personal", "--out", "OUT", "--preset", "magic"], "unknown preset 'magic' for bench personal"),
        (["bench", "--preset", "voc"], "give the 'personal' suite"),
        (["bench", "--contrast", "0"], "give the 'personal' suite"),
        (["bench", "personal", "--out", "OUT", "--contrast", "-1"], "must be 0"),
        (["personalize", "OUT", "--token", "<my-x>", "--class", "cat", "--out", "OUT", "--contrast", "-1"], "must be 0"),
    ],
)
def test_cli_rejects_bad_options_without_traceback(tmp_path, args, expect):
    Image.fromarray(make_scene(3, 0).image).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png") if a == "IMG" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output


def _reported_layers(select: dict, pred) -> list[str]:
    """The layers that a result's reported LayerSelect settings pick on the predictor's UNet."""
    from attnseg.diffusion.layers import LayerSelect

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in select.items()}
    return [lay.name for lay in LayerSelect(**fields).resolve(pred.inventory)]


def test_model_profile_sets_the_default_preset_and_an_explicit_one_wins(tiny_pipe_dir, tmp_path, scene):
    import shutil

    from attnseg.diffusion.loading import ModelError
    from attnseg.predictor import AttnSegPredictor

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, folder)
    (folder / "attnseg.json").write_text(json.dumps({"presets": {"t2m": "embedded"}}))
    pred = AttnSegPredictor.from_pretrained(folder)
    assert pred.default_presets == {"t2m": "embedded"}
    pred.set_image(scene.image)
    r = pred.segment(scene.labels, method="t2m", draws=1)
    assert r.settings["preset"] == "embedded"
    assert _reported_layers(r.settings["self_layer"], pred) == ["up_blocks.2.attentions.0.transformer_blocks.0.attn1"]
    r = pred.segment(scene.labels, method="t2m", preset="voc", draws=1)
    assert r.settings["preset"] == "voc"
    assert _reported_layers(r.settings["self_layer"], pred) == ["up_blocks.2.attentions.1.transformer_blocks.0.attn1"]
    assert pred.segment(scene.labels, method="iseg", draws=1).settings["preset"] is None  # no entry: paper's
    (folder / "attnseg.json").write_text(json.dumps({"presets": {"t2m": "nonsense"}}))
    with pytest.raises(ModelError, match=r"attnseg\.json names preset 'nonsense'"):
        AttnSegPredictor.from_pretrained(folder)


def test_model_profile_sets_diffseg_preset_in_python_and_eval(tiny_pipe_dir, tmp_path, scene, monkeypatch):
    import shutil

    import attnseg.methods.diffseg as diffseg
    from attnseg.io.datasets import VOCDataset
    from attnseg.jobs.evaluate import evaluate
    from attnseg.methods.diffseg import DIFFSEG_PRESETS
    from attnseg.predictor import AttnSegPredictor
    from attnseg.shapes.world import export_voc

    used = []
    real = diffseg.diffseg_proposals
    monkeypatch.setattr(diffseg, "diffseg_proposals", lambda maps, cfg: used.append(cfg) or real(maps, cfg))
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, folder)
    (folder / "attnseg.json").write_text(json.dumps({"presets": {"diffseg": "small-unet"}}))
    pred = AttnSegPredictor.from_pretrained(folder)
    for config in (None, "small-unet", DIFFSEG_PRESETS["small-unet"], "default"):
        pred.segment_unsupervised([scene.image], config)
    assert used == [DIFFSEG_PRESETS["small-unet"]] * 3 + [DIFFSEG_PRESETS["default"]]
    with pytest.raises(ValueError, match="unknown preset 'nope' for diffseg"):
        pred.segment_unsupervised([scene.image], "nope")
    export_voc(tmp_path / "scenes", n=1, seed=11)
    rep = evaluate(pred, VOCDataset(tmp_path / "scenes"), ["diffseg", "diffseg:default"], tmp_path / "r", progress=False)
    assert list(rep["methods"]) == ["diffseg-small-unet", "diffseg-default"]


@pytest.mark.parametrize(
    "content",
    ['{"presets": {"t2m": ', '{"presets": null}', '{"presets": {"t2m": ["embedded"]}}', "[1, 2]", b"\xff\xfe"],
)
def test_malformed_profile_is_one_clean_error_in_the_cli(tiny_pipe_dir, tmp_path, content):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, folder)
    f = folder / "attnseg.json"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    im = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(im)
    r = CliRunner().invoke(app, ["segment", str(im), "--labels", "cat", "--model", str(folder), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "attnseg.json" in r.output and "Traceback" not in r.output


def test_a_second_segment_of_the_same_labels_encodes_no_text(tiny_pipe_dir, scene):
    from attnseg.predictor import AttnSegPredictor

    pred = AttnSegPredictor.from_pretrained(tiny_pipe_dir, device="cpu", dtype="float32")
    calls = []
    hook = pred.pipe.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        pred.set_image(scene.image)
        first = pred.segment(["circle", "star"], method="cross")
        assert calls == [1]
        again = pred.segment(["circle", "star"], method="cross")
        assert calls == [1]  # neither the prompt nor its states were computed again
        pred.segment_batch([scene.image, scene.image], [["circle", "star"], ["ring"]], method="cross")
        assert calls == [1, 1]  # only the new prompt
    finally:
        hook.remove()
    assert np.array_equal(first.scores, again.scores)


def test_output_folder_that_cannot_be_made_is_a_usage_error(tiny_pipe_dir, tmp_path):
    Image.fromarray(make_scene(3, 0).image).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("not a folder")
    for cmd in (
        ["segment", str(tmp_path / "a.png"), "--labels", "circle", "--model", str(tiny_pipe_dir)],
        ["generate", "-c", "circle", "--model", str(tiny_pipe_dir)],
    ):
        res = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "file" / "out")])
        assert res.exit_code == 2, res.output
        assert f"cannot write to output folder {tmp_path / 'file' / 'out'}" in res.output
        assert "Traceback" not in res.output


def test_diffseg_segments_without_labels(predictor, scene):
    predictor.set_image(scene.image)
    with pytest.raises(ValueError, match="diffseg segments without labels"):
        predictor.segment(["circle"], method="diffseg")
    r = predictor.segment([], method="diffseg")
    assert r.labels[0] == "segment 1" and r.scores.shape[0] == len(r.labels) + 1 and r.mask.min() >= 1


def test_one_bad_image_does_not_fail_the_others_of_its_batch(predictor, tmp_path, scene):
    from attnseg.jobs.segment import SegmentWorker

    Image.fromarray(scene.image).save(tmp_path / "good.png")
    Image.fromarray(scene.image).save(tmp_path / "bad.png")
    worker = SegmentWorker(predictor, tmp_path / "out", {"method": "cross", "draws": 1})
    res = worker(
        [{"path": str(tmp_path / "good.png"), "labels": ["circle"]}, {"path": str(tmp_path / "bad.png"), "labels": ["  "]}]
    )
    assert res[0]["path"] == str(tmp_path / "good.png") and res[0]["error"] is None
    assert res[1]["path"] == str(tmp_path / "bad.png") and "empty label" in res[1]["error"]
    assert (tmp_path / "out" / "good.json").exists() and not (tmp_path / "out" / "bad.json").exists()


def test_t2m_code_preset_applies_the_background_rule_once_to_the_mean_of_the_draws(predictor, scene):
    from attnseg.methods import T2M, T2MConfig

    latents = predictor.encode_images([scene.image])
    maps = {}
    for average in ("scores", "foreground"):
        method = T2M(T2MConfig(synonyms=False, background_words=(), average=average, posterior="mean"))
        (grid,), _, _ = predictor.score_maps(latents, [["circle", "star"]], method, draws=3, seed=1)
        maps[average] = grid
    rule = lambda s: (1 - s[1:].amax(dim=0)).clamp_min(0) ** 2  # noqa: E731 - the paper's background rule
    # Foreground first: the background is exactly the rule of the averaged foreground.
    assert torch.allclose(maps["foreground"][0], rule(maps["foreground"]), atol=1e-6)
    # Per draw, then averaged: the mean of the rule is not the rule of the mean (it is convex).
    assert not torch.allclose(maps["scores"][0], rule(maps["scores"]), atol=1e-4)
    assert torch.allclose(maps["scores"][1:], maps["foreground"][1:])  # the foreground itself is the same mean


def test_diffseg_from_segment_names_its_segments_and_matches_the_unsupervised_api(tiny_pipe_dir, tmp_path):
    from attnseg.predictor import AttnSegPredictor

    img = make_scene(7, 0).image
    Image.fromarray(img).save(tmp_path / "a.png")
    run = CliRunner()
    r = run.invoke(
        app,
        ["segment", str(tmp_path / "a.png"), "--method", "diffseg", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o")],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "a.json").read_text())
    assert meta["method"] == "diffseg" and meta["labels"][0] == "segment 1" and meta["weak_labels"] == []
    mask = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    segments = AttnSegPredictor.from_pretrained(tiny_pipe_dir).segment_unsupervised([img])[0]
    assert np.array_equal(mask, segments + 1)  # the same segments, numbered from 1 (0 would be background)
    assert len(meta["labels"]) >= mask.max()
    r = run.invoke(
        app,
        ["segment", str(tmp_path / "a.png"), "--method", "diffseg", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "o")],
    )
    assert "0 segmented, 1 already done" in r.output
    r = run.invoke(app, ["segment", str(tmp_path / "a.png"), "--method", "diffseg", "-l", "cat", "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "diffseg segments without labels" in r.output


def test_t2m_posterior_sampling_is_seeded_and_a_zero_deviation_gives_the_mean(predictor, scene):
    from attnseg.methods import T2M, T2MConfig

    mean, std = predictor.encode_posteriors([scene.image])
    assert torch.equal(mean, predictor.encode_images([scene.image])) and (std > 0).all()
    sample = T2M(T2MConfig(synonyms=False, background_words=(), draws=1))
    at_mean = T2M(T2MConfig(synonyms=False, background_words=(), draws=1, posterior="mean"))
    run = lambda m, s: predictor.score_maps(mean, [["circle", "star"]], m, draws=2, seed=3, latent_std=s)[0][0]  # noqa: E731
    assert torch.equal(run(sample, std), run(sample, std))  # seeded
    assert torch.allclose(run(sample, torch.zeros_like(std)), run(at_mean, None), atol=1e-6)
    assert not torch.allclose(run(sample, std * 50), run(at_mean, None), atol=1e-3)  # the draws do read the deviation
    with pytest.raises(ValueError, match="standard deviation"):
        predictor.score_maps(mean, [["circle"]], sample, draws=1)


def test_outputs_and_caches_of_replaced_weights_are_redone(tiny_pipe_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from attnseg.cli import app
    from attnseg.diffusion.loading import load_pipeline, weights_fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, model)
    before = weights_fingerprint(model)
    assert before == weights_fingerprint(tiny_pipe_dir)  # a copy is the same weights
    assert load_pipeline(model).attnseg_weights == before
    _write_inputs(tmp_path / "in")
    scenes = tmp_path / "scenes"
    assert CliRunner().invoke(app, ["shapes", "export", str(scenes), "--n", "2", "--seed", "1"]).exit_code == 0
    seg = [
        "segment",
        str(tmp_path / "in"),
        "--labels",
        "star",
        "--model",
        str(model),
        "--method",
        "cross",
        "--out",
        str(tmp_path / "o"),
    ]
    ev = ["eval", str(scenes), "-m", "cross", "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "r")]
    assert CliRunner().invoke(app, seg).exit_code == 0 and CliRunner().invoke(app, ev).exit_code == 0
    assert json.loads((tmp_path / "o" / "rgb.json").read_text())["weights"] == before
    assert "0 segmented, 5 already done" in CliRunner().invoke(app, seg).output
    # The same folder retrained (here: one tensor changed): its fingerprint changes, segment redoes every image and
    # eval refuses to mix the new predictions into the old cache.
    f = next((model / "unet").glob("*.safetensors"))
    w = load_file(str(f))
    first = sorted(w)[0]
    w[first] = w[first] + 0.01
    save_file(w, str(f))
    assert weights_fingerprint(model) != before
    r = CliRunner().invoke(app, seg)
    assert r.exit_code == 0 and "5 segmented, 0 already done" in r.output
    r = CliRunner().invoke(app, ev)
    assert r.exit_code == 2 and "other settings (weights)" in r.output
