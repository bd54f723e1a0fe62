"""ConceptAttention: the concept tokens' mask, the output-space maps, a forward that carries concept tokens computes
the image exactly as without them (SD3 and Flux), and the method end to end; a UNet refuses concept tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnseg.diffusion.capture import AttentionStore, concept_maps, concept_mask, installed
from attnseg.methods.concept_attention import ConceptAttention, ConceptAttentionConfig

pytestmark = pytest.mark.filterwarnings("ignore")


def test_concept_mask_image_first_and_text_first():
    # 2 image, 2 prompt, 1 concept tokens. Image first: [i i p p c]
    m = concept_mask(2, 2, 1, image_first=True)
    want = torch.tensor(
        [
            [1, 1, 1, 1, 0],  # image: everything but the concept
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],  # prompt: likewise
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],  # concept: the image and the concepts, not the prompt
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, want)
    # Text first: [p p c i i], the same relations
    order = [2, 3, 4, 0, 1]  # image-first index of each text-first position
    assert torch.equal(concept_mask(2, 2, 1, image_first=False), want[order][:, order])


def test_concept_maps_are_a_softmax_over_concepts_of_output_dot_products():
    img = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # 2 image tokens, D = 2
    con = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # 3 concepts
    got = concept_maps(img, con)
    e = np.e
    want = torch.tensor([[[e, 1, 1], [1, e**2, 1]]]) / torch.tensor([[[e + 2], [e**2 + 2]]])
    assert torch.allclose(got, want.float()) and torch.allclose(got.sum(-1), torch.ones(1, 2))


def test_scores_take_the_labels_concepts_and_sum_the_background_ones():
    from attnseg.diffusion.prompts import TokenSpans
    from attnseg.methods.base import CapturePlan

    store = AttentionStore()
    # 4 pixels (2 x 2), concepts: label a, label b, background word 1, background word 2
    store.add(
        "m:concept", torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4], [0.2, 0.2, 0.3, 0.3]]])
    )
    plan = CapturePlan(cross={}, self_names=[], grid=(2, 2), concepts={"m:concept": 1.0}, concept_background=("x", "y"))
    spans = TokenSpans(spans=[[1], [2]], labels=["a", "b"], input_ids=[0, 1, 2])
    sc = ConceptAttention(ConceptAttentionConfig(background_words=("x", "y"))).scores(store, spans, plan)
    assert torch.allclose(sc, torch.tensor([[[0.2, 0.7, 0.1], [0.3, 0.1, 0.6], [0.8, 0.1, 0.1], [0.6, 0.2, 0.2]]]))
    assert sc[0].argmax(dim=1).tolist() == [1, 2, 0, 0]


@pytest.fixture(scope="module")
def sd3():
    from attnseg.predictor import AttnSegPredictor
    from attnseg.testing import build_tiny_sd3_pipeline

    return AttnSegPredictor(build_tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux():
    from attnseg.predictor import AttnSegPredictor
    from attnseg.testing import build_tiny_flux_pipeline

    return AttnSegPredictor(build_tiny_flux_pipeline())


def _plain_sd3(bb, z, hidden, pooled):
    return bb.pipe.transformer(
        hidden_states=z, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=torch.full((len(z),), 300.0)
    ).sample


def test_sd3_concept_tokens_leave_the_image_unchanged_and_give_maps(sd3):
    bb = sd3.backbone
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    text = bb.encode_prompts(["a photo of a red circle", "a blue star"])
    concepts = bb.concept_states(["circle", "star", "background"])
    assert concepts.shape == (3, text.hidden.shape[-1])
    names = [f"{lay.module}:concept" for lay in bb.layers if lay.kind == "cross"]
    hidden = torch.cat([text.hidden, concepts.expand(2, -1, -1)], dim=1)
    with torch.no_grad():
        ref = _plain_sd3(bb, z, text.hidden, text.added["pooled_projections"])
        store = AttentionStore()
        with installed(bb.pipe.transformer, bb._processors(store, names, None, concepts=3)):
            out = _plain_sd3(bb, z, hidden, text.added["pooled_projections"])
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    for n in names:
        m = store.mean(n)
        assert m.shape == (2, 256, 3) and torch.allclose(m.sum(-1), torch.ones(2, 256), atol=1e-5)
    # the same through forward(), which also records the cross maps over the prompt's tokens only
    st = bb.forward(bb.add_noise(z, z, 300), 300, text, [*names, bb.layers[0].name], concepts=concepts)
    assert st.mean(bb.layers[0].name).shape == (2, 256, text.hidden.shape[1])
    plain = bb.forward(bb.add_noise(z, z, 300), 300, text, [bb.layers[0].name])
    assert torch.allclose(st.mean(bb.layers[0].name), plain.mean(bb.layers[0].name), atol=1e-5)


def test_flux_concept_tokens_leave_the_image_unchanged_in_double_and_single_blocks(flux):
    bb = flux.backbone
    z = torch.randn((2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    text = bb.encode_prompts(["a photo of a red circle", "a blue star"])
    concepts = bb.concept_states(["circle", "star"])
    names = [f"{lay.module}:concept" for lay in bb.layers if lay.kind == "cross"]
    with torch.no_grad():
        ref = bb._predict(z, 300, text)
        store = bb.forward(z, 300, text, names, concepts=concepts)
        hidden = torch.cat([text.hidden, concepts.expand(2, -1, -1)], dim=1)
        procs = bb._processors(AttentionStore(), [], int(hidden.shape[1]), concepts=2)
        with installed(bb.pipe.transformer, procs):
            out = bb._predict(z, 300, type(text)(hidden, text.added))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert any(n.startswith("single_") for n in names)
    for n in names:
        assert store.mean(n).shape == (2, 64, 2)


def test_the_method_segments_on_sd3_and_flux_and_a_unet_refuses_it(sd3, flux, predictor):
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for p in (sd3, flux):
        p.set_image(img)
        for preset in ("default", "flux") if p is flux else ("default",):
            res = p.segment(["red circle", "blue star"], method="concept-attention", preset=preset, draws=2)
            assert res.mask.shape == (40, 56) and res.scores.shape == (3, 40, 56)
            assert np.allclose(res.scores.sum(axis=0), 1, atol=1e-4)  # a distribution over background and labels
    flux.set_image(img)
    one = flux.segment(["circle"], method="concept-attention", preset="flux")
    assert one.settings["background_words"] == ["background"] and one.scores.shape == (2, 40, 56)
    predictor.set_image(img)
    with pytest.raises(ValueError, match="take no concept tokens"):
        predictor.segment(["circle"], method="concept-attention")


def test_seg4diff_reads_one_joint_block_of_sd3(sd3):
    from attnseg.methods.registry import get_method

    plan = get_method("cross", "seg4diff").plan(sd3.backbone.layers, 16)
    assert list(plan.cross) == ["transformer_blocks.1.attn:cross"]  # block 9 of 24; here clipped to the last of 2
