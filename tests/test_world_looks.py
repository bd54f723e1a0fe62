"""ShapesWorld's unnamed looks: a world with ``look_prob`` draws grey patterns over objects and never names them."""

from __future__ import annotations

import numpy as np
import pytest

from attnseg.shapes.world import LOOKS, PATTERN_COLOUR, SceneObject, ShapesWorldConfig, make_scene, render_coverage


def test_a_world_without_looks_draws_the_scenes_it_always_drew():
    for i in range(5):
        plain, zero = make_scene(0, i), make_scene(0, i, ShapesWorldConfig(look_prob=0.0))
        assert np.array_equal(plain.image, zero.image) and plain.caption == zero.caption
        assert all(o.look is None for o in plain.objects)


def test_every_object_wears_a_look_that_the_caption_does_not_name():
    cfg = ShapesWorldConfig(look_prob=1.0, noise_std=0.0, colour_jitter=0.0)
    seen = set()
    for i in range(12):
        sc = make_scene(0, i, cfg)
        assert all(o.look in LOOKS for o in sc.objects)
        assert not any(look in sc.caption for look in LOOKS), sc.caption
        seen |= {o.look for o in sc.objects}
        top = sc.objects[-1]  # drawn last: nothing covers it
        body = render_coverage(top, cfg.size, cfg.supersample)
        pat = render_coverage(top, cfg.size, cfg.supersample, pattern=True)
        inside = (pat == 1) & (body == 1)
        plain = (pat == 0) & (body == 1)
        if inside.any():  # fully patterned pixels are the pattern colour (unshaded; no pixel noise in this world)
            grey = sc.image[inside].astype(float).mean(0)
            assert np.abs(grey - PATTERN_COLOUR).max() < 1.0, grey
        if plain.any():  # the rest is the body colour, which is not grey
            assert np.abs(sc.image[plain].astype(float).mean(0) - PATTERN_COLOUR).max() > 20
    assert len(seen) >= 4


def test_striped_pattern_covers_the_band_it_names():
    obj = SceneObject("red", "square", 32.0, 32.0, 16.0, 0.0, look="striped")
    pat = render_coverage(obj, 64, 4, pattern=True)
    # |u| <= 0.3 of a radius of 16 px: the columns within 4.8 px of the centre, inside the square's body
    cols = np.flatnonzero(pat[32] == 1)
    assert cols.min() == 28 and cols.max() == 35
    assert render_coverage(SceneObject("red", "square", 32.0, 32.0, 16.0, 0.0), 64, 4, pattern=True).sum() == 0


def test_training_data_records_its_look_share_and_refuses_another(tmp_path):
    import pytest

    from attnseg.train.embedded.command import main
    from attnseg.train.embedded.train import TrainConfig, data_look_prob, stage_data

    assert data_look_prob(tmp_path) is None
    main(["data", "--work", str(tmp_path), "--n-scenes", "6", "--look-prob", "0.5", "--threads", "1"])
    assert data_look_prob(tmp_path) == 0.5
    with pytest.raises(ValueError, match="another --work"):
        stage_data(TrainConfig(work=str(tmp_path), n_scenes=6, look_prob=0.0))
    stage_data(TrainConfig(work=str(tmp_path), n_scenes=6, look_prob=0.5))  # the same data: nothing to do


def test_training_data_keeps_each_objects_look_and_older_data_gets_them_replayed(tmp_path):
    from attnseg.train.embedded.train import TRAIN_SEED, TrainConfig, _load_scenes, make_scene, stage_data

    cfg = TrainConfig(work=str(tmp_path), n_scenes=8, look_prob=0.5)
    stage_data(cfg)
    made = _load_scenes(tmp_path)
    world = ShapesWorldConfig(look_prob=0.5)
    want = [[o.look for o in make_scene(TRAIN_SEED, i, world).objects] for i in range(8)]
    got = [
        [LOOKS[k] if k >= 0 else None for k, (c, _) in zip(made["looks"][i], made["objects"][i], strict=True) if c >= 0]
        for i in range(8)
    ]
    assert got == want and any(look is not None for row in want for look in row)
    # Data made before the looks were stored: the data stage adds them, the rest unchanged.
    np.savez(tmp_path / "scenes.npz", **{k: v for k, v in made.items() if k != "looks"})
    stage_data(cfg)
    again = _load_scenes(tmp_path)
    assert np.array_equal(again["looks"], made["looks"]) and np.array_equal(again["images"], made["images"])
    # Scenes that ShapesWorld no longer draws: their looks cannot be replayed.
    np.savez(tmp_path / "scenes.npz", **{k: (v[::-1] if k == "images" else v) for k, v in made.items() if k != "looks"})
    with pytest.raises(ValueError, match="not what ShapesWorld draws"):
        stage_data(cfg)


def test_captions_name_looks_only_when_asked_and_otherwise_draw_what_they_drew():
    from attnseg.shapes.world import caption
    from attnseg.train.embedded.train import _caption_batch

    objs = [SceneObject("red", "circle", 0, 0, 1, 0, look="striped"), SceneObject("blue", "star", 0, 0, 1, 0)]
    plain = [SceneObject("red", "circle", 0, 0, 1, 0), SceneObject("blue", "star", 0, 0, 1, 0)]
    for seed in range(20):
        assert caption(objs, np.random.default_rng(seed)) == caption(plain, np.random.default_rng(seed))
    named = [caption(objs, np.random.default_rng(seed), colour_prob=1.0, look_word_prob=1.0) for seed in range(5)]
    assert all("red striped circle" in c and "blue star" in c for c in named), named
    half = [caption(objs, np.random.default_rng(seed), colour_prob=0.0, look_word_prob=0.5) for seed in range(40)]
    assert 5 < sum("striped circle" in c for c in half) < 35 and all("star" in c for c in half)
    rows = np.array([[[0, 0], [1, 1], [-1, -1]]], np.int16)
    with pytest.raises(ValueError, match="train-toy data"):
        _caption_batch(rows, np.random.default_rng(0), 0.0, 1.0, None, 0.5)
    looks = np.array([[LOOKS.index("dotted"), -1, -1]], np.int8)
    (cap,) = _caption_batch(rows, np.random.default_rng(0), 0.0, 1.0, looks, 1.0)
    assert "dotted" in cap and cap.count("dotted") == 1


def test_model_card_states_the_looks_and_from_which_step():
    from attnseg.train.embedded.release import looks_text

    def run(step, look, word=0.0):
        return {"step": step, "look_prob": look, "look_word_prob": word}

    assert looks_text([run(18500, 0.0)]) == ""
    line = looks_text([run(18500, 0.0), run(20000, 0.3)])
    assert "from step 18,500" in line and "30% of the objects" in line and "no caption names" in line
    assert "from step" not in looks_text([run(500, 0.3)])  # a run trained on looks from the start
    chain = looks_text([run(18500, 0.0), run(20051, 0.3), run(22051, 0.3, 0.6), run(30051, 0.3, 0.8)])
    assert "from step 18,500" in chain
    assert "0% over steps 18,500-20,051; 60% over steps 20,051-22,051; 80% over steps 22,051-30,051" in chain


def test_shapes_personal_writes_photos_scenes_and_the_instances_pixels(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from attnseg.cli import app

    r = CliRunner().invoke(
        app, ["shapes", "personal", str(tmp_path), "--look", "striped", "--photos", "3", "--scenes", "2", "--colour", "red"]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["photo_00.png", "photo_01.png", "photo_02.png"]
    for k in range(2):
        scene = np.array(Image.open(tmp_path / "scenes" / f"scene_{k:02d}.png")).astype(int)
        truth = np.array(Image.open(tmp_path / "truth" / f"scene_{k:02d}.png")) == 1
        assert truth.sum() > 20
        # the instance is red with grey stripes: both colours among its pixels
        pixels = scene[truth]
        share = [(np.abs(pixels - c).max(-1) < 40).mean() for c in (PATTERN_COLOUR, np.array([220, 30, 35]))]
        assert share[0] > 0.1 and share[1] > 0.2, share
    assert "scene_01.png: the striped circle is red" in r.output
    r = CliRunner().invoke(app, ["shapes", "personal", str(tmp_path / "x"), "--look", "plaid"])
    assert r.exit_code == 2 and "unknown look" in r.output
