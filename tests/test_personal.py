"""Personalized referring segmentation: spectral clustering, bf / af assignment and metrics on hand-made inputs,
concept files, concept learning (seeded, resumable), the benchmark's scenes, and the CLI end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from attnseg.diffusion.concepts import Concept, ConceptError, apply_concept, fingerprint, load_concept, save_concept
from attnseg.methods.personal import (
    accuracy,
    assign_af,
    assign_bf,
    attribution_words,
    iou,
    region_mask,
    region_segments,
    segment_scores,
    spatial_affinity,
    true_segments,
)
from attnseg.ops.spectral import eigengap_k, kmeans, spectral_clusters


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the learning tests run small convolutions, which threads slow down on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _block_affinity(sizes, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    a = torch.rand((n, n), generator=g) * noise
    start = 0
    for s in sizes:
        a[start : start + s, start : start + s] += 1.0
        start += s
    return a


def _same_partition(labels, truth):
    """Whether two labelings group the items alike (ids may differ)."""
    pairs = set(zip(labels.tolist(), truth, strict=True))
    return len(pairs) == len(set(truth)) == len(set(labels.tolist()))


def test_spectral_clustering_finds_the_blocks_and_their_number():
    a = _block_affinity((3, 4, 5))
    perm = torch.tensor([5, 0, 11, 3, 8, 1, 10, 6, 2, 9, 4, 7])  # interleaved, so that order gives nothing away
    a = a[perm][:, perm]
    truth = [0 if i < 3 else 1 if i < 7 else 2 for i in perm.tolist()]
    labels = spectral_clusters(a, k_min=1, k_max=6)
    assert len(set(labels.tolist())) == 3
    assert _same_partition(labels, truth)


def test_eigengap_respects_its_range():
    vals = torch.tensor([1.0, 0.99, 0.98, 0.2, 0.1, 0.05])
    assert eigengap_k(vals, 1, 5) == 3
    assert eigengap_k(vals, 4, 5) == 4  # the gap after 4 (0.1) beats the one after 5 (0.05)


def test_kmeans_separates_two_groups():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.0, 0.1]])
    labels = kmeans(x, 2)
    assert _same_partition(labels, [0, 0, 1, 1, 0])


def test_af_is_the_hungarian_assignment_and_bf_the_row_argmax():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert assign_bf(scores).tolist() == [0, 0, 2]  # two instances take segment 0
    # af: 0.8 + 0.85 + 0.6 = 2.25 beats the diagonal's 0.9 + 0.2 + 0.6 = 1.7
    assert assign_af(scores).tolist() == [1, 0, 2]


def test_af_leaves_an_instance_without_segment_when_there_are_fewer_segments():
    scores = torch.tensor([[0.9], [0.5]])
    assert assign_af(scores).tolist() == [0, -1]


def test_accuracy_counts_unassigned_and_unmatched_as_wrong():
    assert accuracy([1, 0, 2], [1, 0, 0]) == pytest.approx(2 / 3)
    assert accuracy([-1, 0], [-1, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        accuracy([], [])


def test_segment_scores_average_each_map_over_each_segment():
    maps = torch.tensor([[1.0, 3.0, 5.0, 9.0], [0.0, 2.0, 2.0, 4.0]])
    segments = torch.tensor([0, 0, 1, -1])  # the last pixel is outside the region
    assert segment_scores(maps, segments).tolist() == [[2.0, 5.0], [1.0, 2.0]]


def test_true_segments_pair_instances_and_segments_by_centres():
    instance = np.zeros((4, 6), np.uint8)
    instance[:, :2] = 1  # left
    instance[:, 4:] = 2  # right
    segments = np.full((4, 6), -1)
    segments[:, 3:] = 0  # right, shifted
    segments[:, :3] = 1  # left, shifted
    assert true_segments(instance, 2, segments).tolist() == [1, 0]


def test_iou_by_hand():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 0]], bool)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_region_mask_rules():
    fg = torch.tensor([0.9, 0.05, 0.3, 0.2])
    bg = torch.tensor([0.1, 0.5, 0.5, 0.1])
    assert region_mask(fg, bg).tolist() == [True, False, False, True]
    assert region_mask(fg, bg, threshold=0.25).tolist() == [True, False, True, False]
    # a faint class still gets its best pixels
    assert region_mask(torch.tensor([0.1, 0.2, 0.0]), torch.ones(3), min_pixels=2).tolist() == [True, True, False]


def test_region_segments_split_two_look_alikes_by_space():
    # A 1 x 6 grid: pixels 0-1 and 4-5 are two objects that attend to each other alike (uniform self-attention);
    # the spatial term of normalized cuts separates them.
    self_attn = torch.full((6, 6), 1 / 6)
    region = torch.tensor([True, True, False, False, True, True])
    seg = region_segments(self_attn, region, 2, 2, spatial_affinity((1, 6), 0.2))
    assert seg[2].item() == -1 and seg[3].item() == -1
    assert seg[0] == seg[1] and seg[4] == seg[5] and seg[0] != seg[4]


def test_attribution_words():
    assert attribution_words("a red <striped> circle", "circle") == ["red", "<striped>"]
    assert attribution_words("a <my-mug> mug with cola", "mug") == ["<my-mug>", "cola"]
    assert attribution_words("a photo of a circle", "circle") == ["circle"]


# ---------------------------------------------------------------------------------------------- concepts


@pytest.fixture
def fresh_pipe(tiny_pipe_dir):
    """A pipeline of its own (concepts change the tokenizer and weights; the session's tiny_pipe stays clean)."""
    from attnseg.diffusion.loading import load_pipeline

    return load_pipeline(tiny_pipe_dir, device="cpu", dtype="float32")


def _concept(pipe, kv=True):
    d = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    w = dict(pipe.unet.named_modules())[name].to_k.weight
    return Concept(
        token="<my-x>",
        class_word="circle",
        method="custom-diffusion" if kv else "textual-inversion",
        embedding=torch.arange(d, dtype=torch.float32) / d,
        kv={f"{name}.to_k": torch.full_like(w, 0.5)} if kv else {},
        model="tiny",
        fingerprint=fingerprint(pipe),
    )


def test_concept_file_round_trip_and_apply(fresh_pipe, tmp_path):
    c = _concept(fresh_pipe)
    path = tmp_path / "c.safetensors"
    path.write_bytes(save_concept(c))
    back = load_concept(path)
    assert (back.token, back.class_word, back.method, back.fingerprint) == ("<my-x>", "circle", "custom-diffusion", c.fingerprint)
    assert torch.equal(back.embedding, c.embedding)
    name = next(iter(c.kv))
    before = dict(fresh_pipe.unet.named_modules())[name.rsplit(".", 1)[0]].to_k.weight.detach().clone()
    apply_concept(fresh_pipe, back)
    after = dict(fresh_pipe.unet.named_modules())[name.rsplit(".", 1)[0]].to_k.weight
    assert torch.allclose(after - before, torch.full_like(before, 0.5))
    tid = fresh_pipe.tokenizer.convert_tokens_to_ids("<my-x>")
    assert fresh_pipe.tokenizer("a <my-x> circle").input_ids.count(tid) == 1
    assert torch.equal(fresh_pipe.text_encoder.get_input_embeddings().weight[tid], c.embedding)
    assert fingerprint(fresh_pipe) == c.fingerprint  # the fingerprint ignores what concepts change
    with pytest.raises(ConceptError, match="already loaded"):
        apply_concept(fresh_pipe, back)


def test_concept_of_another_model_is_refused_naming_both(fresh_pipe, tmp_path):
    from attnseg.diffusion.loading import load_pipeline
    from attnseg.testing import save_tiny_pipeline

    other = load_pipeline(save_tiny_pipeline(tmp_path / "other", seed=1), device="cpu", dtype="float32")
    c = _concept(fresh_pipe)
    with pytest.raises(ConceptError, match=r"learned on model 'tiny'.*not on this one, '.*other'"):
        apply_concept(other, c)


def test_the_fingerprint_is_one_models_in_any_dtype_and_a_checkpoint_is_its_models(tiny_pipe_dir, fresh_pipe, tmp_path):
    from attnseg.diffusion.concepts import same_model
    from attnseg.diffusion.loading import load_pipeline
    from attnseg.testing import save_tiny_pipeline
    from attnseg.train.personalize import PersonalizeConfig, config_key

    bf16 = load_pipeline(tiny_pipe_dir, device="cpu", dtype="bfloat16")
    fp32, low = fingerprint(fresh_pipe), fingerprint(bf16)
    assert fp32 != low and same_model(fp32, low)  # rounded weights, one model
    other = load_pipeline(save_tiny_pipeline(tmp_path / "other", seed=1), device="cpu", dtype="float32")
    assert not same_model(fp32, fingerprint(other))
    photos = [np.zeros((8, 8, 3), np.uint8)]
    keys = {config_key(PersonalizeConfig(), "<my-x>", "circle", photos, fp) for fp in (fp32, fingerprint(other))}
    assert len(keys) == 2  # a checkpoint learned on one model is not resumed on another


def test_a_model_that_predicts_v_is_refused():
    from diffusers import DDIMScheduler

    from attnseg.testing import build_tiny_pipeline
    from attnseg.train.personalize import PersonalizeConfig, learn_concept

    pipe = build_tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ConceptError, match="predicts 'v_prediction'"):
        learn_concept(pipe, [np.zeros((64, 64, 3), np.uint8)], "<my-x>", "circle", "c.safetensors", PersonalizeConfig(steps=1))


def test_bad_concept_files_and_tokens(tmp_path):
    with pytest.raises(ConceptError, match="does not exist"):
        load_concept(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConceptError, match="not a concept file"):
        load_concept(tmp_path / "junk.safetensors")
    from attnseg.diffusion.concepts import check_token

    with pytest.raises(ConceptError, match="angle brackets"):
        check_token("mymug")


def _photos(n=3):
    from attnseg.shapes.personal import training_photos

    return training_photos("striped", "circle", n, 0)


@pytest.mark.parametrize("method", ["textual-inversion", "custom-diffusion"])
def test_learning_is_seeded_and_resumes_to_the_same_concept(tiny_pipe_dir, tmp_path, method):
    from attnseg.diffusion.loading import load_pipeline
    from attnseg.train.personalize import PersonalizeConfig, learn_concept

    cfg = PersonalizeConfig(method=method, steps=4, batch=2, ckpt_every=2, samples=0, prior_images=1, contrast_images=2)
    whole = learn_concept(
        load_pipeline(tiny_pipe_dir, dtype="float32"), _photos(), "<my-x>", "circle", tmp_path / "a.safetensors", cfg
    )

    class Killed(Exception):
        pass

    def kill_at_3(step, _n, _loss):
        if step == 3:
            raise Killed

    out = tmp_path / "b.safetensors"
    with pytest.raises(Killed):
        learn_concept(load_pipeline(tiny_pipe_dir, dtype="float32"), _photos(), "<my-x>", "circle", out, cfg, kill_at_3)
    assert out.with_name(out.name + ".ckpt").is_file() and not out.exists()
    resumed = learn_concept(load_pipeline(tiny_pipe_dir, dtype="float32"), _photos(), "<my-x>", "circle", out, cfg)
    assert not out.with_name(out.name + ".ckpt").exists()
    assert torch.allclose(whole.embedding, resumed.embedding, atol=1e-6)
    assert whole.kv.keys() == resumed.kv.keys() and all(torch.allclose(whole.kv[k], resumed.kv[k], atol=1e-6) for k in whole.kv)
    assert bool(whole.kv) == (method == "custom-diffusion") and all(v.abs().sum() > 0 for v in whole.kv.values())
    start = load_pipeline(tiny_pipe_dir, dtype="float32")
    from attnseg.diffusion.concepts import word_embedding

    assert not torch.allclose(whole.embedding, word_embedding(start, "circle"))  # it learned something
    # the same computation with a contrastive loss that is always met (zero): the loss moved the token
    met = replace(cfg, contrast_ratio=1e-9)
    plain = learn_concept(start, _photos(), "<my-x>", "circle", tmp_path / "p.safetensors", met)
    assert not torch.allclose(whole.embedding, plain.embedding, atol=1e-6)


def test_custom_diffusion_learns_kv_and_leaves_the_pipeline_as_it_was(fresh_pipe, tmp_path):
    from attnseg.train.personalize import PersonalizeConfig, learn_concept

    before = {n: p.detach().clone() for n, p in fresh_pipe.unet.named_parameters()}
    rows = fresh_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = PersonalizeConfig(method="custom-diffusion", steps=2, batch=2, samples=2, prior_images=2, contrast_images=2)
    c = learn_concept(fresh_pipe, _photos(), "<my-x>", "circle", tmp_path / "c.safetensors", cfg)
    assert c.kv and all(name.endswith(("to_k", "to_v")) for name in c.kv)
    assert any(float(d.abs().max()) > 0 for d in c.kv.values())
    assert all(torch.equal(p, before[n]) for n, p in fresh_pipe.unet.named_parameters())
    assert torch.equal(fresh_pipe.text_encoder.get_input_embeddings().weight[: len(rows)], rows)
    assert (tmp_path / "c-samples.png").is_file()


# ---------------------------------------------------------------------------------------------- benchmark


def test_benchmark_scenes_hold_their_distractors():
    from attnseg.shapes.personal import test_scene

    a, b = test_scene(0, 5, "circle"), test_scene(1, 5, "circle")
    assert np.array_equal(a.image, test_scene(0, 5, "circle").image)  # a pure function of (seed, index)
    assert 3 <= len(a.objects) <= 5
    assert any("semantic" in a.splits(i) for i in range(len(a.objects)))  # even scenes: one colour, two looks
    assert any("visual" in b.splits(i) for i in range(len(b.objects)))  # odd scenes: one look, two colours
    pairs = [(o.look, o.obj.colour) for o in a.objects]
    assert len(set(pairs)) == len(pairs)
    assert set(np.unique(a.instance)) == set(range(len(a.objects) + 1))
    o = a.objects[0]
    assert o.query("context_only").count("<") == 0 and o.query("subject_only").count(o.obj.colour) == 0
    assert o.query("look_words").split()[-3:] == [o.obj.colour, o.look, o.obj.shape] and "<" not in o.query("look_words")


def test_the_table_shows_the_look_words_row_once():
    from attnseg.train.personal_bench import ROWS, markdown

    split = {s: {"miou": 10.0, "bf_acc": 20.0, "af_acc": 30.0, "n": 4} for s in ("all", "semantic", "visual")}
    table = markdown({"textual-inversion": {row: split for row in ROWS}, "look_words": split})
    assert table.count("| none | look_words | 10.0 | 20.0 | 30.0 |") == 1 and table.count("| textual-inversion |") == 3


def test_summarise_by_hand():
    from attnseg.train.personal_bench import summarise

    recs = [
        {"splits": ["all", "semantic"], "bf": 1.0, "af": 1.0, "iou": 0.5},
        {"splits": ["all"], "bf": 0.0, "af": 1.0, "iou": 0.25},
    ]
    s = summarise(recs)
    assert s["all"] == {"miou": 37.5, "bf_acc": 50.0, "af_acc": 100.0, "n": 2}
    assert s["semantic"]["n"] == 1 and s["visual"]["n"] == 0 and s["visual"]["miou"] is None


# ---------------------------------------------------------------------------------------------- command line


def test_cli_personalize_then_segment_a_new_scene(tiny_pipe_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from attnseg.cli import app
    from attnseg.shapes.personal import test_scene

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(_photos(5)):
        Image.fromarray(im).save(photos / f"{i}.png")
    runner = CliRunner()
    concept = tmp_path / "my-x.safetensors"
    args = ["personalize", str(photos), "--token", "<my-x>", "--class", "circle", "--out", str(concept)]
    r = runner.invoke(app, [*args, "--model", str(tiny_pipe_dir), "--steps", "3", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert concept.is_file() and (tmp_path / "my-x-samples.png").is_file()
    scene = test_scene(0, 2, "circle")
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    queries = [o.query().replace(f"<{o.look}>", "<my-x>") for o in scene.objects[:2]]
    seg = ["segment", str(tmp_path / "scene.png"), "--concept", str(concept), "--model", str(tiny_pipe_dir)]
    r = runner.invoke(app, [*seg, "--labels", queries[0], "--labels", queries[1], "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "o" / "scene.json").read_text())
    assert meta["labels"] == queries and meta["method"] == "personal"
    assert meta["settings"]["class"] == "circle" and len(meta["settings"]["af"]) == 2
    mask = np.asarray(Image.open(tmp_path / "o" / "scene.png"))
    assert mask.shape == scene.image.shape[:2] and set(np.unique(mask)) <= {0, 1, 2}
    scores = np.load(tmp_path / "o" / "scene_scores.npz")["scores"]
    assert scores.shape == (3, *scene.image.shape[:2])
    assert set(meta["settings"]["concepts"]["<my-x>"]) == {"class", "method", "digest"}
    # run again: the image is done; with other queries it is segmented again
    r = runner.invoke(app, [*seg, "--labels", queries[0], "--labels", queries[1], "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and "0 segmented, 1 already done" in r.output, r.output
    r = runner.invoke(app, [*seg, "--labels", queries[0], "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and "1 segmented, 0 already done" in r.output, r.output
    for d in ("a", "b"):  # two inputs of one file name: the second is refused, not skipped as done
        (tmp_path / d).mkdir()
        Image.fromarray(scene.image).save(tmp_path / d / "scene.png")
    two = [seg[0], str(tmp_path / "a"), str(tmp_path / "b"), *seg[2:], "--labels", queries[0], "--out", str(tmp_path / "o3")]
    r = runner.invoke(app, two)
    assert r.exit_code == 1 and "1 segmented, 0 already done, 1 failed" in r.output and "same file name stem" in r.output
    # the concept belongs to this model: another one refuses it, naming both
    from attnseg.testing import save_tiny_pipeline

    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    r = runner.invoke(app, [*seg[:-1], str(other), "--labels", queries[0], "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "learned on model" in r.output and "other" in r.output


def test_concepts_refuse_pipelines_of_other_families():
    from attnseg.diffusion.concepts import check_pipeline

    class TwoEncoders:  # SDXL's layout
        unet = object()
        text_encoder = object()
        text_encoder_2 = object()

    class Transformer:  # SD3 / Flux: no UNet
        text_encoder = object()

    for pipe in (TwoEncoders(), Transformer()):
        with pytest.raises(ConceptError, match=r"Stable Diffusion 1\.x / 2\.x"):
            check_pipeline(pipe)


def test_a_segment_chosen_by_several_queries_goes_to_the_one_scoring_it_highest():
    from attnseg.methods.personal import mask_segments

    scores = torch.tensor([[0.2, 0.9, 0.1], [0.1, 0.8, 0.3], [0.5, 0.95, 0.0]])
    bf = torch.tensor([1, 1, 1])  # every query alone takes segment 1
    assert mask_segments(bf, scores).tolist() == [-1, -1, 1]
    assert mask_segments(torch.tensor([1, 2, 0]), scores).tolist() == [1, 2, 0]  # af: distinct already
    assert mask_segments(torch.tensor([-1, 2, 2]), scores).tolist() == [-1, 2, -1]


def test_the_t2m_preset_of_the_maps_is_resolved_and_recorded(predictor, monkeypatch):
    from attnseg.methods.personal import PersonalConfig

    monkeypatch.setattr(predictor, "default_presets", {"t2m": "single-pass"})
    assert predictor.personal_config().t2m_preset == "single-pass"  # the model's default, named
    assert predictor.personal_config(PersonalConfig(t2m_preset="voc")).t2m_preset == "voc"  # an explicit one wins


def test_training_photos_of_one_colour_show_that_colour_in_every_photo():
    from attnseg.shapes.personal import training_photos
    from attnseg.shapes.world import COLOURS

    def has(photo, colour):  # pixels within 40 of the colour's RGB (shading and noise move the fill's pixels)
        return int((np.abs(photo.astype(int) - np.array(COLOURS[colour])).max(-1) <= 40).sum())

    red = training_photos("striped", "circle", 4, 0, colour="red")
    assert all(has(p, "red") > 200 for p in red)
    cycled = training_photos("striped", "circle", 4, 0)
    assert sum(has(p, "red") > 200 for p in cycled) == 1  # every colour in turn: red once
    with pytest.raises(ValueError, match="unknown colour"):
        training_photos("striped", "circle", 1, 0, colour="mauve")


def test_personal_maps_refuse_a_t2m_preset_that_does_not_read_the_square_image(predictor):
    from attnseg.methods.personal import PersonalConfig
    from attnseg.shapes.world import make_scene

    predictor.set_image(make_scene(7, 0).image)
    with pytest.raises(ValueError, match=r"square size.*'code'"):
        predictor.personal_maps(["a red circle"], "circle", PersonalConfig(t2m_preset="code"))


def test_the_default_splits_the_whole_image_into_its_fixed_number_of_segments(predictor):
    from attnseg.methods.personal import PERSONAL_PRESETS, PersonalConfig
    from attnseg.shapes.world import make_scene

    predictor.set_image(make_scene(7, 0).image)
    pm = predictor.personal_maps(["a red circle", "a blue square"], "circle")
    assert bool(pm.region.all())
    assert int(pm.segments.max()) + 1 == PersonalConfig().segments
    three = predictor.personal_maps(["a red circle", "a blue square", "a green circle"], "circle", PersonalConfig(segments=2))
    assert int(three.segments.max()) + 1 == 3  # never fewer segments than queries
    cls = predictor.personal_maps(["a red circle"], "circle", PERSONAL_PRESETS["class-region"])
    assert bool((cls.segments >= 0).eq(cls.region).all()) and not bool(cls.region.all())  # only the class region is split


def test_personal_maps_weigh_the_queries_maps_by_their_shares(predictor):
    from attnseg.methods.personal import PersonalConfig, compared, segment_scores
    from attnseg.shapes.world import make_scene

    predictor.set_image(make_scene(7, 0).image)
    queries = ["a red circle", "a blue square"]
    raw = predictor.personal_maps(queries, "circle", PersonalConfig(compare=False))
    weighed = predictor.personal_maps(queries, "circle")
    assert torch.allclose(weighed.instance, compared(raw.instance))
    assert torch.allclose(weighed.scores, segment_scores(compared(raw.instance), weighed.segments))
    assert not torch.allclose(weighed.instance, raw.instance)


def test_region_segments_number_their_segments_without_gaps(monkeypatch):
    import attnseg.methods.personal as personal

    # k-means left clusters 1 and 3 empty
    monkeypatch.setattr(personal, "spectral_clusters", lambda *a: torch.tensor([0, 0, 2, 2, 4, 4]))
    seg = region_segments(torch.ones((7, 7)), torch.tensor([True] * 6 + [False]), 5, 5)
    assert seg.tolist() == [0, 0, 1, 1, 2, 2, -1]


def test_compared_weights_each_map_by_its_share_at_each_pixel():
    from attnseg.methods.personal import compared

    maps = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # pixel 0: both queries, each keeps half; pixel 1: the first alone keeps all; pixel 2: nothing, no division by zero
    assert compared(maps).tolist() == [[0.5, 1.0, 0.0], [0.5, 0.0, 0.0]]
    one = torch.tensor([[0.2, 0.7, 0.0]])
    assert torch.allclose(compared(one), one)  # one query: unchanged


def test_token_peaks_and_the_contrast_loss_by_hand():
    from attnseg.train.personalize import contrast_loss, token_peaks

    fine = torch.full((2, 16, 3), 0.9)  # two captions, a 4 x 4 grid, three tokens; the other tokens' columns are high
    fine[0, :, 1], fine[1, :, 2] = 0.0, 0.0
    fine[0, :4, 1] = 1.0  # caption 0's token (index 1) on the top row
    fine[1, 0, 2] = 0.5  # caption 1's token (index 2) on one pixel
    coarse = torch.full((2, 1, 3), 0.9)  # a 1 x 1 layer: resized, it covers every pixel
    coarse[0, 0, 1], coarse[1, 0, 2] = 0.2, 0.0
    peaks = token_peaks([fine, coarse], torch.tensor([1, 2]), share=0.25)  # the 4 highest of 16 pixels
    # layers averaged: caption 0's top row (1.0 + 0.2) / 2; caption 1's pixel 0.25, three more at 0
    assert torch.allclose(peaks, torch.tensor([0.6, 0.0625]))
    own, others = torch.tensor([0.4, 0.4], requires_grad=True), torch.tensor([0.05, 0.2], requires_grad=True)
    loss = contrast_loss(own, others, 4.0)
    assert float(loss.detach()) == pytest.approx(0.5 * math.log(2.0))  # only the second pair is short of 4 times
    loss.backward()
    assert own.grad[1] < 0 < others.grad[1] and own.grad[0] == others.grad[0] == 0  # up on the photo, down elsewhere
    assert float(contrast_loss(own, others, 1.5).detach()) == 0.0


def test_learning_refuses_bad_contrast_settings_and_keeps_keys_without_it():
    from attnseg.diffusion.concepts import ConceptError
    from attnseg.train.personalize import PersonalizeConfig, config_key, learn_concept

    photos = [np.zeros((64, 64, 3), np.uint8)]
    bad_settings = (
        PersonalizeConfig(contrast_ratio=0),
        PersonalizeConfig(contrast_share=0),
        PersonalizeConfig(contrast_weight=-1),
        PersonalizeConfig(contrast_images=0),
    )
    for bad in bad_settings:
        with pytest.raises(ConceptError, match="contrastive loss"):
            learn_concept(None, photos, "<my-x>", "circle", "c.safetensors", bad)
    off = PersonalizeConfig(contrast_weight=0)
    assert config_key(off, "<my-x>", "circle", photos) == config_key(replace(off, contrast_ratio=9), "<my-x>", "circle", photos)
    on = PersonalizeConfig()
    assert config_key(on, "<my-x>", "circle", photos) != config_key(replace(on, contrast_ratio=9), "<my-x>", "circle", photos)
