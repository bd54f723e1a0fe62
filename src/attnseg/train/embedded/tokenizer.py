"""The embedded model's own BPE vocabulary, in CLIP's format.

The vocabulary is learnt with the ``tokenizers`` BPE trainer over a word list (ShapesWorld's
words, the papers' prompt words, common dataset class names), laid out as CLIP's is: the 256
byte-level symbols, the same with ``</w>``, then one token per merge, then the two special
tokens. Words outside the list fall back to sub-word pieces, exactly as in CLIP.
"""

from __future__ import annotations

from pathlib import Path

from attnseg.shapes.world import COLOURS, SHAPES

# Words of the captions and of the methods' prompt templates.
PROMPT_WORDS = (
    "a an the of and with next to photo photograph picture image drawing including other objects "
    "object background shape shapes scene small large big"
).split()
# T2M's background words and synonym words, and the class names of VOC and COCO, so that
# prompts written for Stable Diffusion tokenise into whole words here too.
EXTRA_WORDS = (
    "tree river sea lake water railway railroad track stone rocks person clothes bird avian chair "
    "seat tv monitor screen aeroplane airplane bicycle boat bottle bus car cat cow dining table dog "
    "horse motorbike motorcycle potted plant sheep sofa train tvmonitor truck traffic light fire "
    "hydrant stop sign parking meter bench elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis "
    "racket wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot "
    "pizza donut cake couch bed toilet laptop mouse remote keyboard cell phone microwave oven toaster "
    "sink refrigerator book clock vase scissors teddy hair drier toothbrush mug cola sky grass road "
    "wall floor building"
).split()

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def word_list() -> list[str]:
    words = list(dict.fromkeys([*COLOURS, *SHAPES, *PROMPT_WORDS, *EXTRA_WORDS]))
    return words


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def train_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges so that every word of ``words`` is one token; return (vocab, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = words or word_list()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    byte_syms = list(_bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        end_of_word_suffix="</w>",
        initial_alphabet=byte_syms,
        special_tokens=[],
    )
    # Repeat each word so that whole-word merges win over cross-word fragments.
    corpus = [" ".join(words)] * 4 + [w for w in words for _ in range(3)]
    tok.train_from_iterator(corpus, trainer=trainer)
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        merges_raw = Path(d, "merges.txt").read_text(encoding="utf-8").splitlines()
        json.loads(Path(d, "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in merges_raw if line and not line.startswith("#version")]
    vocab: dict[str, int] = {}
    for s in byte_syms:
        vocab[s] = len(vocab)
    for s in byte_syms:
        vocab[s + "</w>"] = len(vocab)
    for a, b in merges:
        merged = a + b
        if merged not in vocab:
            vocab[merged] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, [(a, b) for a, b in merges]


VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
"""The project's vocabulary, pinned: ``vocab.json`` and ``merges.txt`` in CLIP's format.

:func:`train_vocab` made them once. It is not used at run time because the BPE trainer breaks ties
between equally frequent merges in hash order, so two processes can number ~20 tokens differently
("and" was seen as 772 in one process and 773 in another). Token ids index the text
encoder's embedding rows, so every process must read the same files.
"""


def build_tokenizer(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` over the project's pinned vocabulary (:data:`VOCAB_DIR`)."""
    from transformers import CLIPTokenizer

    # transformers 5 ignores the vocab_file=/merges_file= keywords: pass the paths positionally.
    return CLIPTokenizer(str(VOCAB_DIR / "vocab.json"), str(VOCAB_DIR / "merges.txt"), model_max_length=model_max_length)
