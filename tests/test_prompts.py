"""Prompt templates and the token-span resolver."""

from __future__ import annotations

import pytest

from attnseg.diffusion.prompts import PromptError, compose_prompt, find_phrase_spans, prompt_spans, resolve_spans
from attnseg.train.embedded.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _pieces(tok, ids, pos):
    return [tok.convert_ids_to_tokens(ids[i]) for i in pos]


def test_papers_templates():
    assert compose_prompt(["bottle", "chair", "sofa"]).text == "a photo including bottle, chair, and sofa."
    assert compose_prompt(["cat", "dog"], "iseg").text == "a photograph of cat and dog and other objects and background"
    p = compose_prompt(["person"], synonyms={"person": "person with clothes"}, background_words=("tree", "sea"))
    assert p.text == "a photo including person with clothes, tree, sea."
    assert p.text[slice(*p.char_spans[0])] == "person with clothes"
    assert [p.text[slice(*s)] for s in p.background_spans] == ["tree", "sea"]


def test_single_token_words(tok):
    p = compose_prompt(["circle", "star"])
    ts = prompt_spans(tok, p)
    assert [_pieces(tok, ts.input_ids, s) for s in ts.spans] == [["circle</w>"], ["star</w>"]]
    assert ts.input_ids[0] == tok.bos_token_id and ts.input_ids[-1] == tok.eos_token_id


def test_multi_token_and_multi_word_labels(tok):
    p = compose_prompt(["zzyzx", "red circle"])
    ts = prompt_spans(tok, p)
    word = "".join(_pieces(tok, ts.input_ids, ts.spans[0])).replace("</w>", "")
    assert word == "zzyzx" and len(ts.spans[0]) > 1  # sub-word pieces of an unknown word
    assert _pieces(tok, ts.input_ids, ts.spans[1]) == ["red</w>", "circle</w>"]
    assert ts.spans[0][-1] < ts.spans[1][0]


def test_repeated_words_get_their_own_positions(tok):
    p = compose_prompt(["red square", "blue square"])
    ts = prompt_spans(tok, p)
    a, b = ts.spans
    assert len(a) == 2 and len(b) == 2 and set(a).isdisjoint(b)
    assert _pieces(tok, ts.input_ids, [a[1]]) == _pieces(tok, ts.input_ids, [b[1]]) == ["square</w>"]


def test_user_prompt_phrase_spans_repeated(tok):
    text = "a red square and a blue square"
    spans = find_phrase_spans(text, ["square", "square"])
    assert spans == [(6, 12), (24, 30)]
    ts = resolve_spans(tok, text, spans, ["square", "square"])
    assert ts.spans[0] != ts.spans[1]
    with pytest.raises(PromptError, match="does not occur"):
        find_phrase_spans(text, ["circle"])


def test_label_beyond_token_limit_is_an_error_naming_it(tok):
    labels = ["circle", "star"] * 20 + ["zebra"]
    with pytest.raises(PromptError, match="'zebra' fall beyond the tokenizer's limit of 77"):
        prompt_spans(tok, compose_prompt(labels))


def test_empty_labels_refused():
    with pytest.raises(PromptError, match="no labels"):
        compose_prompt([])
    with pytest.raises(PromptError, match="empty label"):
        compose_prompt(["cat", "  "])


def test_vocabulary_is_the_same_in_every_process_and_matches_the_shipped_model():
    import json
    import os
    import subprocess
    import sys

    from attnseg.diffusion.loading import EMBEDDED_DIR
    from attnseg.train.embedded.tokenizer import VOCAB_DIR

    code = "from attnseg.train.embedded.tokenizer import build_tokenizer; print(build_tokenizer()('a red circle and a blue star').input_ids)"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": s}
        ).stdout
        for s in ("1", "2", "3")
    }
    assert len(outs) == 1 and outs.pop().strip()
    shipped = json.loads((EMBEDDED_DIR / "tokenizer" / "vocab.json").read_text())
    assert shipped == json.loads((VOCAB_DIR / "vocab.json").read_text())
