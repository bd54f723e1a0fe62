"""Tagging with the diffusion classifier: the rounds, pruning and label count on a fake backbone whose denoising error
is a known function of the caption; the backbones' denoising error against each family's target; ``attnseg tag``,
``segment --vocabulary`` and ``eval --vocabulary``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnseg.cli import app
from attnseg.diffusion.backbone import TextStates
from attnseg.shapes.world import SHAPES, make_scene
from attnseg.tagging import TagConfig, Tagger, relative_gain, survivors

pytestmark = pytest.mark.filterwarnings("ignore")

WORDS = ["circle", "star", "square", "heart"]
SCENES = {
    0: {"circle": 0.3, "star": 0.1},  # two objects: the circle helps most
    1: {"square": 0.2},
    2: {"circle": 0.2, "star": 0.2, "heart": 0.1},
    3: {"heart": 0.2, "star": 0.01},  # the star barely helps
}
PENALTY = 0.05
"""What a word that is not in the image adds to the error."""


class FakeBackbone:
    """Denoising error = f(timestep, noise) x g(caption, image), g = 1 - the help of the caption's words in the image
    + PENALTY per word not in it; the image is ``latents[:, 0, 0, 0]``. Paired candidates see the same f, so every
    score is exact: round 1 score(w) = 1 - g(w), later (g(c) - g(c + w)) / g(c). ``calls`` counts (prompt, timestep,
    noise) evaluations."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.calls: dict[tuple, int] = {}

    def encode_prompts(self, texts):
        for t in texts:
            if t not in self.texts:
                self.texts.append(t)
        return TextStates(torch.tensor([[self.texts.index(t)] for t in texts]))

    def denoising_error(self, latents, noise, timestep, text):
        out = []
        for z, e, idx in zip(latents, noise, text.hidden[:, 0].tolist(), strict=True):
            caption, scene = self.texts[idx], SCENES[int(z[0, 0, 0])]
            named = [w for w in WORDS if w in caption.split()]
            g = 1 - sum(scene.get(w, 0) for w in named) + PENALTY * sum(w not in scene for w in named)
            key = (caption, int(timestep), round(float(e.abs().mean()), 6))
            self.calls[key] = self.calls.get(key, 0) + 1
            out.append((1 + timestep / 1000) * (1 + float(e.abs().mean())) * g)
        return torch.tensor(out)


def _latents(*scenes):
    z = torch.zeros((len(scenes), 4, 2, 2))
    z[:, 0, 0, 0] = torch.tensor(scenes, dtype=torch.float32)
    return z


NO_PRUNING = TagConfig(timesteps=(100, 300), noises=2, prune_after=4, min_gain=0.03, max_labels=3)


def test_relative_gain_averages_the_evaluated_pairs_and_survivors_keep_those_near_the_best():
    base = torch.tensor([[2.0, 4.0]])
    errors = torch.tensor([[[1.0, 3.0], [3.0, math.nan]]])  # candidate 2 saw only the first pair
    assert relative_gain(base, errors).tolist() == [[pytest.approx((0.5 + 0.25) / 2), pytest.approx(-0.5)]]
    scores = torch.tensor([[0.3, 0.2, 0.1, math.nan], [-0.2, -0.4, -0.25, -0.3]])
    assert survivors(scores, 0.15).tolist() == [[True, True, False, False], [True, False, True, True]]


def test_words_are_added_while_they_help_and_scores_are_the_share_of_error_removed():
    res = Tagger(FakeBackbone(), NO_PRUNING).tag(_latents(0, 1), WORDS)
    assert res[0].labels == ["circle", "star"]
    # circle: 1 - 0.7; star added to "circle": (0.7 - 0.6) / 0.7; the others tried on "circle and star": -0.05 / 0.6
    assert res[0].scores == pytest.approx(
        {"circle": 0.3, "star": 0.1 / 0.7, "square": -PENALTY / 0.6, "heart": -PENALTY / 0.6}, abs=1e-5
    )
    assert res[1].labels == ["square"]
    assert res[1].scores == pytest.approx(
        {"circle": -PENALTY / 0.8, "star": -PENALTY / 0.8, "square": 0.2, "heart": -PENALTY / 0.8}, abs=1e-5
    )


def test_at_most_max_labels_and_a_word_below_min_gain_is_not_added():
    three = Tagger(FakeBackbone(), NO_PRUNING).tag(_latents(2, 3), WORDS)
    assert sorted(three[0].labels) == ["circle", "heart", "star"]
    assert three[1].labels == ["heart"]  # the star removes 0.01 / 0.8 < min_gain of the error
    two = Tagger(FakeBackbone(), TagConfig(timesteps=(100, 300), noises=2, prune_after=4, max_labels=2)).tag(_latents(2), WORDS)
    assert len(two[0].labels) == 2 and "heart" not in two[0].labels


def test_pruned_candidates_see_only_the_first_pairs_of_their_round_and_return_in_the_next():
    bb = FakeBackbone()
    cfg = TagConfig(timesteps=(100, 300), noises=2, prune_after=1, prune_margin=0.15, min_gain=0.03)
    res = Tagger(bb, cfg).tag(_latents(0), WORDS)
    assert res[0].labels == ["circle", "star"]  # the star, pruned in round 1 (0.1 < 0.3 - 0.15), is found in round 2
    per_prompt = {}
    for (caption, _, _), n in bb.calls.items():
        per_prompt[caption] = per_prompt.get(caption, 0) + n
    assert per_prompt["a photo of a star"] == per_prompt["a photo of a square"] == 1
    assert per_prompt["a photo of a circle"] == per_prompt["a photo of a circle and a star"] == 4
    assert per_prompt["a photo of a circle and a square"] == 1  # round 2: -0.05 / 0.7, pruned
    assert res[0].pruned == []  # round 3 tried square and heart on "circle and star": equal scores, neither pruned
    assert res[0].scores == pytest.approx(Tagger(FakeBackbone(), NO_PRUNING).tag(_latents(0), WORDS)[0].scores)


def test_an_image_is_tagged_alike_alone_and_in_a_batch_and_an_empty_vocabulary_is_refused():
    tagger = Tagger(FakeBackbone(), TagConfig(timesteps=(100, 300), noises=2))
    batch = tagger.tag(_latents(0, 1, 2, 3), WORDS)
    for i, scene in enumerate((0, 1, 2, 3)):
        assert tagger.tag(_latents(scene), WORDS)[0] == batch[i]
    with pytest.raises(ValueError, match="vocabulary is empty"):
        tagger.tag(_latents(0), [" ", ""])


def _x0_noise_text(bb):
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn((2, 4, 16, 16), generator=g), torch.randn((2, 4, 16, 16), generator=g)
    return x0, e, bb.encode_prompts(["a photo of a circle", ""])


def _mse(a, b):
    return (a - b).square().mean(dim=(1, 2, 3))


def test_unet_denoising_error_is_against_the_noise_or_the_velocity_as_the_scheduler_predicts(tiny_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from attnseg.diffusion.unet import UNetBackbone

    pipe = StableDiffusionPipeline(**tiny_pipe.components, requires_safety_checker=False)  # its own scheduler below
    bb = UNetBackbone(pipe)
    x0, e, text = _x0_noise_text(bb)
    t = torch.tensor([300, 300])
    xt = pipe.scheduler.add_noise(x0, e, t)  # diffusers' own forward process
    assert torch.equal(bb.add_noise(x0, e, 300), xt)
    with torch.inference_mode():
        pred = pipe.unet(xt, t, encoder_hidden_states=text.hidden).sample
    assert torch.allclose(bb.denoising_error(x0, e, 300, text), _mse(pred, e), atol=1e-6)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v = pipe.scheduler.get_velocity(x0, e, t)
    assert torch.allclose(bb.denoising_error(x0, e, 300, text), _mse(pred, v), atol=1e-6)


def test_sd3_denoising_error_is_against_the_rectified_flow_velocity():
    from attnseg.diffusion.sd3 import SD3Backbone
    from attnseg.testing import build_tiny_sd3_pipeline

    bb = SD3Backbone(build_tiny_sd3_pipeline())
    x0, e, text = _x0_noise_text(bb)
    with torch.inference_mode():
        pred = bb.pipe.transformer(
            hidden_states=0.7 * x0 + 0.3 * e,
            encoder_hidden_states=text.hidden,
            pooled_projections=text.added["pooled_projections"],
            timestep=torch.full((2,), 300.0),
        ).sample
    assert torch.allclose(bb.denoising_error(x0, e, 300, text), _mse(pred, e - x0), atol=1e-6)


def _scene_png(path, seed=3, index=0):
    Image.fromarray(make_scene(seed, index).image).save(path)
    return path


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["tag", "{img}"], "no candidate labels"),
        (["tag", "{img}", "--vocabulary", " , "], "the vocabulary is empty"),
        (["tag", "{img}", "--vocabulary-file", "/nonexistent.txt"], "vocabulary file /nonexistent.txt does not exist"),
        (["tag", "{img}", "--vocabulary", "circle", "--vocabulary-file", "{img}"], "--vocabulary or --vocabulary-file, not both"),
        (["segment", "{img}", "--labels", "circle", "--vocabulary", "circle,star"], "not both"),
        (["segment", "{img}", "--vocabulary", "circle", "--method", "diffseg"], "drop --labels / --labels-file / --vocabulary"),
        (["segment", "{img}", "--vocabulary", "circle", "--point", "3,4"], "drop --vocabulary"),
    ],
)
def test_cli_bad_vocabulary_is_one_line_and_exit_2(tiny_pipe_dir, tmp_path, args, expect):
    img = _scene_png(tmp_path / "a.png")
    args = [a.replace("{img}", str(img)) for a in args] + ["--model", str(tiny_pipe_dir)]
    if args[0] == "segment":
        args += ["--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output


def test_cli_tag_json_and_segment_with_the_tagged_labels(tiny_pipe_dir, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(2):
        _scene_png(tmp_path / "in" / f"s{i}.png", index=i)
    (tmp_path / "vocab.txt").write_text("circle\nstar, square\n\n")
    common = ["--vocabulary-file", str(tmp_path / "vocab.txt"), "--model", str(tiny_pipe_dir)]
    res = CliRunner().invoke(app, ["tag", str(tmp_path / "in"), "--json", *common])
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [ln["image"] for ln in lines] == [str(tmp_path / "in" / "s0.png"), str(tmp_path / "in" / "s1.png")]
    for ln in lines:
        assert set(ln["scores"]) == {"circle", "star", "square"} and 1 <= len(ln["labels"]) <= 3
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["segment", str(tmp_path / "in"), "--out", str(out), "--draws", "1", *common])
    assert res.exit_code == 0, res.output
    tags = json.loads((out / "tags.json").read_text())
    for ln in lines:  # the same tags as `attnseg tag`, and the masks made for them
        assert tags[ln["image"]] == ln["labels"]
        assert json.loads((out / f"{ln['image'].rsplit('/', 1)[1][:-4]}.json").read_text())["labels"] == ln["labels"]


def test_cli_eval_with_a_vocabulary_reports_tagging_and_resumes(tiny_pipe_dir, voc, tmp_path):
    out = tmp_path / "r"
    args = ["eval", str(voc), "--out", str(out), "-m", "cross", "--draws", "1", "--model", str(tiny_pipe_dir), "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--vocabulary", "cat,dog"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    tags = {p.stem: json.loads(p.read_text())["labels"] for p in (out / "cache" / "tags").glob("*.json") if p.stem != "settings"}
    truth = {"a": {"cat"}, "b": {"dog"}}
    hits = sum(len(truth[k] & set(v)) for k, v in tags.items())
    assert report["tagging"]["precision"] == pytest.approx(hits / sum(len(v) for v in tags.values()), abs=1e-4)
    assert report["tagging"]["recall"] == pytest.approx(hits / 2, abs=1e-4)
    assert "tagged by the model" in report["protocol"] and "tagging from 2 labels" in res.output
    res = CliRunner().invoke(app, [*args, "--vocabulary", "cat"])  # other tags: the cache refuses to mix them
    assert res.exit_code == 2 and "other settings" in res.output
    res = CliRunner().invoke(app, [*args, "--vocabulary", "cat,zebra"])
    assert res.exit_code == 2 and "['zebra'] are not classes of the dataset" in res.output


def test_cli_tag_on_the_embedded_model_names_the_shape_of_a_held_out_scene(tmp_path):
    img = _scene_png(tmp_path / "scene.png", seed=1, index=6)  # one white hexagon
    assert [o.phrase for o in make_scene(1, 6).objects] == ["white hexagon"]
    res = CliRunner().invoke(app, ["tag", str(img), "--vocabulary", ",".join(SHAPES), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"{img}: hexagon (") and res.stdout.count("(") == 1  # one label, with its score
