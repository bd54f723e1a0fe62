"""Prompts of the papers and the token-span resolver.

The prompt is composed here, so the character span of every label phrase is known exactly;
:func:`resolve_spans` maps each span to token positions through the tokenizer's offset mapping.
That handles sub-word pieces, multi-word labels and repeated words (each occurrence has its own
span) without string matching on tokens. A label that the tokenizer's length limit cuts off is
an error that names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# T2M (VOC synonyms from the paper's section 4; "person with clothes" per its appendix).
T2M_SYNONYMS: dict[str, str] = {
    "person": "person with clothes",
    "bird": "bird avian",
    "chair": "chair seat",
    "tvmonitor": "tv monitor screen",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
}
T2M_COCO_SYNONYMS: dict[str, str] = {
    "person": "person with clothes",
    "motorcycle": "motorbike",
    "airplane": "aeroplane",
    "bird": "bird avian",
    "backpack": "backpack, bag",
    "umbrella": "umbrella, parasol",
    "handbag": "handbag, purse",
    "tie": "necktie",
    "snowboard": "sknowboard",
    "baseball glove": "glove",
    "spoon": "dessert spoon",
    "chair": "chair seat",
    "couch": "sofa",
    "tv": "tv monitor screen",
    "remote": "remote control",
    "hair drier": "hairdrier, blowdrier",
}
"""T2M's authors' code on COCO (scripts/SD_seg.py, ``seg_prompts``), keyed by COCO's category names: the names it writes
in their place, its spelling kept ("sknowboard"); every other category is written as COCO names it."""
SYNONYM_SETS: dict[str, dict[str, str]] = {"voc": T2M_SYNONYMS, "coco": T2M_COCO_SYNONYMS}
"""The synonym lists a method's ``synonyms`` setting names (``True`` means ``"voc"``)."""
T2M_BACKGROUND_WORDS: tuple[str, ...] = (
    "tree",
    "river",
    "sea",
    "lake",
    "water",
    "railway",
    "railroad",
    "track",
    "stone",
    "rocks",
)
T2M_VOC_CLASS_BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "boat": ("river", "sea", "lake", "water", "mountain"),
    "cow": ("grass", "stone", "rocks"),
    "train": ("railway", "railroad", "track"),
    "tvmonitor": ("keyboard", "wall"),
}
"""T2M's authors' code on VOC (scripts/SD_seg.py, ``background_prompts``): these classes' own background words; every
other class takes the paper's list (:data:`T2M_BACKGROUND_WORDS`, CLIMS's)."""
# iSeg's authors' code (wsss/iSeg.py, ``prepare_data_name``, VOC): the words it appends after "... and background, ".
# Only the first line of its string is assigned; the two lines under it (river ... sign) are separate statements
# that Python evaluates and discards, so the prompt carries these nine words.
ISEG_VOC_BACKGROUND_WORDS: tuple[str, ...] = (
    "ground",
    "land",
    "grass",
    "tree",
    "building",
    "wall",
    "sky",
    "lake",
    "water",
)


class PromptError(ValueError):
    """A prompt cannot be built or read for the given labels."""


@dataclass(frozen=True)
class PromptTemplate:
    """How labels are joined into one sentence.

    prefix + phrase_1 + sep + ... + last_sep + phrase_K + suffix; ``background`` words, when used,
    are appended after ``background_sep``.
    """

    name: str
    prefix: str
    sep: str
    last_sep: str
    suffix: str
    pair_sep: str | None = None
    background_sep: str = ", "
    background_last_sep: str | None = None
    """Before the last of two or more background words, instead of ``background_sep``."""

    def join(self, phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        text = self.prefix
        spans = []
        for i, p in enumerate(phrases):
            if i > 0:
                if len(phrases) == 2 and self.pair_sep is not None:
                    text += self.pair_sep
                else:
                    text += self.last_sep if i == len(phrases) - 1 else self.sep
            spans.append((len(text), len(text) + len(p)))
            text += p
        return text, spans


TEMPLATES: dict[str, PromptTemplate] = {
    # T2M: "a photo including bottle, chair, and sofa."
    "t2m": PromptTemplate("t2m", "a photo including ", ", ", ", and ", ".", pair_sep=" and "),
    # iSeg: "a photograph of A and B and other objects and background"
    # T2M's authors' code: labels and background words one list, "a photo including cat, dog, tree, and sea." (its
    # VOC and COCO prompts always carry two or more background words; with fewer, no "and" is written)
    "t2m-code": PromptTemplate("t2m-code", "a photo including ", ", ", ", ", ".", background_last_sep=", and "),
    "iseg": PromptTemplate("iseg", "a photograph of ", " and ", " and ", " and other objects and background"),
    # DAAM / DiffuMask style: "a photo of a dog and a cat"
    "photo": PromptTemplate("photo", "a photo of ", " and ", " and ", ""),
}


@dataclass
class ComposedPrompt:
    """A prompt with the character span of each label phrase (and of background words)."""

    text: str
    labels: list[str]
    phrases: list[str]
    char_spans: list[tuple[int, int]]
    background_spans: list[tuple[int, int]] = field(default_factory=list)


def compose_prompt(
    labels: Sequence[str],
    template: str | PromptTemplate = "t2m",
    synonyms: Mapping[str, str] | None = None,
    background_words: Sequence[str] = (),
) -> ComposedPrompt:
    """Build the papers' one-sentence prompt for ``labels``.

    synonyms replace a label by a richer phrase (T2M); background words are appended at the end
    and only absorb attention (their maps are not read).
    """
    if not labels:
        raise PromptError("no labels given: pass at least one label (for example --labels cat dog)")
    tpl = TEMPLATES[template] if isinstance(template, str) else template
    phrases = []
    for lab in labels:
        lab_clean = " ".join(str(lab).split())
        if not lab_clean:
            raise PromptError(f"empty label in {list(labels)!r}")
        phrases.append((synonyms or {}).get(lab_clean, lab_clean))
    text, spans = tpl.join(phrases)
    suffix = tpl.suffix
    bg_spans = []
    if background_words:
        # Background words go before the closing punctuation of the template.
        punct = suffix if suffix in (".", "") else ""
        rest = "" if punct == suffix else suffix
        text += rest
        for k, w in enumerate(background_words):
            last = k == len(background_words) - 1 and k > 0 and tpl.background_last_sep is not None
            text += tpl.background_last_sep if last else tpl.background_sep
            bg_spans.append((len(text), len(text) + len(w)))
            text += w
        text += punct
    else:
        text += suffix
    return ComposedPrompt(text, list(labels), phrases, spans, bg_spans)


def find_phrase_spans(text: str, phrases: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of ``phrases`` in a user's prompt, in order of appearance.

    Each phrase takes its first whole-word occurrence after the previous phrase's; a repeated word
    ("a red square and a blue square") is thus told apart by giving it twice.
    """
    spans, pos = [], 0
    low = text.lower()
    for p in phrases:
        pattern = re.compile(r"(?<![\w])" + re.escape(p.lower()) + r"(?![\w])")
        m = pattern.search(low, pos)
        if m is None:
            # Labels may be given out of order; any occurrence not taken by an earlier label.
            m = next((x for x in pattern.finditer(low) if (x.start(), x.end()) not in spans), None)
        if m is None:
            raise PromptError(f"label {p!r} does not occur in the prompt {text!r} (or not as often as it is given)")
        spans.append((m.start(), m.end()))
        pos = m.end()
    return spans


@dataclass
class TokenSpans:
    """Token positions of each label phrase in the tokenised prompt (BOS is position 0)."""

    input_ids: list[int]
    spans: list[list[int]]
    labels: list[str]


def resolve_spans(
    tokenizer,
    text: str,
    char_spans: Sequence[tuple[int, int]],
    labels: Sequence[str],
) -> TokenSpans:
    """Map character spans of ``text`` to token positions, checking the length limit."""
    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    limit = max_len - 1  # the last kept position is the EOS token

    def positions(span: tuple[int, int]) -> list[int]:
        a, b = span
        return [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]

    spans = []
    cut = []
    for lab, sp in zip(labels, char_spans, strict=True):
        pos = positions(sp)
        if not pos:
            raise PromptError(f"label {lab!r} produced no tokens in {text!r}")
        if max(pos) >= limit:
            cut.append(lab)
        spans.append(pos)
    if cut:
        raise PromptError(
            f"label(s) {', '.join(repr(c) for c in cut)} fall beyond the tokenizer's limit of {max_len} tokens "
            f"(the prompt has {len(ids)}); use fewer or shorter labels, fewer background words, "
            "or split the labels over several runs"
        )
    return TokenSpans(input_ids=ids[: max_len - 1] + ids[-1:] if len(ids) > max_len else ids, spans=spans, labels=list(labels))


def prompt_spans(tokenizer, prompt: ComposedPrompt) -> TokenSpans:
    return resolve_spans(tokenizer, prompt.text, prompt.char_spans, prompt.labels)
