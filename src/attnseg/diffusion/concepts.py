"""Personal concepts: a new word learned from a few photos, loaded on top of the pipeline it was learned on.

A concept is one new token (``<my-mug>``) for an object of a known class (``mug``), learned by textual inversion
(the token's embedding row alone, the model frozen; Gal et al. 2022) or by Custom Diffusion (the token's row and the
key and value projections of every cross-attention layer; Kumari et al. 2023), as T2M's personalized referring
segmentation does (T2M section 5.3). A concept file is a safetensors file:

- ``embedding`` (D,): the token's row of the text encoder's token embedding table;
- ``kv.<module>`` (out, in): for Custom Diffusion, the learned change of each cross-attention ``to_k`` / ``to_v``
  weight (learned minus original), so that several concepts apply as the sum of their changes;
- metadata: ``format``, ``token``, ``class``, ``method``, ``model`` (the pipeline's name) and ``fingerprint``
  (a digest of the pipeline's original text embeddings and first UNet convolution), which must match the pipeline
  the concept is loaded on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "attnseg-concept-1"
METHODS = ("textual-inversion", "custom-diffusion")
TOKEN_PATTERN = re.compile(r"^<[a-z0-9][a-z0-9_-]*>$")
"""A concept's token: lower case in angle brackets (``<my-mug>``), so that it never collides with a word."""


class ConceptError(ValueError):
    """A concept that cannot be learned, read or applied as asked."""


@dataclass
class Concept:
    """A learned token: its embedding row (D,) and, for Custom Diffusion, cross-attention weight changes."""

    token: str
    class_word: str
    method: str
    embedding: torch.Tensor
    kv: dict[str, torch.Tensor] = field(default_factory=dict)
    model: str = ""
    fingerprint: str = ""


def check_token(token: str) -> str:
    """``token`` if it is a valid concept token, else a ``ConceptError`` saying what one looks like."""
    if not TOKEN_PATTERN.match(token):
        raise ConceptError(f"concept token {token!r} must be lower case in angle brackets, e.g. '<my-mug>'")
    return token


def cross_kv_modules(unet) -> dict[str, torch.nn.Linear]:
    """{name: linear} of the ``to_k`` and ``to_v`` projections of every cross-attention (``attn2``) module."""
    out = {}
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            out[f"{name}.to_k"] = mod.to_k
            out[f"{name}.to_v"] = mod.to_v
    return out


def base_vocab_size(pipe) -> int:
    """Rows of the text encoder's token table that belong to the model (added concept tokens come after)."""
    return int(pipe.tokenizer.vocab_size)


def check_pipeline(pipe) -> None:
    """A ``ConceptError`` unless ``pipe`` is a pipeline concepts are implemented for: one text encoder and a UNet
    (Stable Diffusion 1.x / 2.x and the embedded model)."""
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None or hasattr(pipe, "text_encoder_2"):
        raise ConceptError(
            f"personal concepts are implemented for Stable Diffusion 1.x / 2.x pipelines (one text encoder and a UNet), "
            f"not for {type(pipe).__name__}"
        )


def fingerprint(pipe) -> str:
    """What identifies a pipeline and no concept changes, whatever the dtype it was loaded in: four statistics (mean,
    mean absolute value, root mean square, mean against a ramp over the elements) of the text encoder's original token
    rows and of the UNet's first convolution, as text; :func:`same_model` compares two within rounding."""
    check_pipeline(pipe)
    table = pipe.text_encoder.get_input_embeddings().weight[: base_vocab_size(pipe)]
    stats = []
    for t in (table, pipe.unet.conv_in.weight):
        x = t.detach().float().cpu().flatten()
        ramp = torch.linspace(-1, 1, len(x))
        stats += [x.mean(), x.abs().mean(), x.square().mean().sqrt(), (x * ramp).mean()]
    return ",".join(f"{float(v):.6e}" for v in stats)


def same_model(a: str, b: str, rtol: float = 1e-3) -> bool:
    """Whether two :func:`fingerprint` s are of one model: each statistic within ``rtol`` of its tensor's mean
    absolute value, which fp16 / bf16 rounding of the weights stays far below (random rounding errors average out
    over the elements) and another model's weights do not."""
    try:
        x = [float(v) for v in a.split(",")]
        y = [float(v) for v in b.split(",")]
    except ValueError:
        return a == b
    if len(x) != len(y) or len(x) % 4:
        return False
    for i in range(0, len(x), 4):
        scale = max(abs(x[i + 1]), abs(y[i + 1]), 1e-12)
        if any(abs(u - v) > rtol * scale for u, v in zip(x[i : i + 4], y[i : i + 4], strict=True)):
            return False
    return True


def token_id(pipe, token: str) -> int | None:
    """The id of ``token`` when the tokenizer holds it as one added token, else None."""
    if token not in pipe.tokenizer.get_vocab():
        return None
    return int(pipe.tokenizer.convert_tokens_to_ids(token))


def add_token(pipe, token: str, init: torch.Tensor) -> int:
    """Add ``token`` to the tokenizer and a row ``init`` (D,) to the text encoder's table; its id.

    A token already added keeps its id and gets the new row."""
    tid = token_id(pipe, check_token(token))
    if tid is None:
        pipe.tokenizer.add_tokens([token])
        tid = int(pipe.tokenizer.convert_tokens_to_ids(token))
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = pipe.text_encoder.get_input_embeddings().weight
        emb[tid] = init.to(emb.device, emb.dtype)
    return tid


def word_embedding(pipe, word: str) -> torch.Tensor:
    """Mean token-table row (D,) of ``word``'s pieces: the starting point of a new token (textual inversion's
    initialisation from a coarse descriptor, here the class word)."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ConceptError(f"the class word {word!r} has no tokens")
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach().float().mean(dim=0)


def applied(pipe) -> dict[str, Concept]:
    """{token: concept} of the concepts applied to ``pipe``."""
    if not hasattr(pipe, "attnseg_concepts"):
        pipe.attnseg_concepts = {}
    return pipe.attnseg_concepts


def apply_concept(pipe, concept: Concept) -> None:
    """Put ``concept`` on ``pipe``: its token and row, and its weight changes added to the cross-attention projections.

    Raises ``ConceptError`` when the concept was learned on another pipeline, or when its token is already applied.
    """
    own = fingerprint(pipe)
    model = getattr(pipe, "attnseg_model_name", type(pipe).__name__)
    if not same_model(concept.fingerprint, own):
        raise ConceptError(
            f"concept {concept.token} was learned on model {concept.model!r} (fingerprint {concept.fingerprint}), "
            f"not on this one, {model!r} (fingerprint {own}); learn it again on this model with `attnseg personalize`"
        )
    if concept.token in applied(pipe):
        raise ConceptError(f"concept {concept.token} is already loaded on this model")
    mods = cross_kv_modules(pipe.unet)
    missing = [k for k in concept.kv if k not in mods]
    if missing:
        raise ConceptError(f"concept {concept.token} changes layers this model has not: {', '.join(missing[:3])}")
    add_token(pipe, concept.token, concept.embedding)
    with torch.no_grad():
        for name, delta in concept.kv.items():
            w = mods[name].weight
            w += delta.to(w.device, w.dtype)
    applied(pipe)[concept.token] = concept


def concept_digest(concept: Concept) -> str:
    """A digest of what a concept adds to the model (its embedding row and weight changes): two files with the same
    digest segment alike."""
    h = hashlib.sha256(concept.embedding.detach().float().cpu().numpy().tobytes())
    for name in sorted(concept.kv):
        h.update(name.encode())
        h.update(concept.kv[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_concept(concept: Concept) -> bytes:
    """The safetensors bytes of ``concept`` (write them with ``attnseg.io.files.atomic_write_bytes``)."""
    from safetensors.torch import save

    tensors = {"embedding": concept.embedding.detach().float().cpu().contiguous()}
    tensors.update({f"kv.{k}": v.detach().float().cpu().contiguous() for k, v in concept.kv.items()})
    meta = {
        "format": FORMAT,
        "token": concept.token,
        "class": concept.class_word,
        "method": concept.method,
        "model": concept.model,
        "fingerprint": concept.fingerprint,
    }
    return save(tensors, metadata=meta)


def load_concept(path: str | Path) -> Concept:
    """Read a concept file written by :func:`save_concept`; a ``ConceptError`` names what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"concept file {path} does not exist; learn one with `attnseg personalize`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ConceptError(f"{path} is not a concept file (safetensors): {e}") from None
    if meta.get("format") != FORMAT or "embedding" not in tensors:
        raise ConceptError(f"{path} is not an attnseg concept file (format {meta.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in ("token", "class", "method") if k not in meta]
    if missing:
        raise ConceptError(f"{path} lacks {', '.join(missing)} in its metadata: learn it again with `attnseg personalize`")
    return Concept(
        token=check_token(meta["token"]),
        class_word=meta["class"],
        method=meta["method"],
        embedding=tensors["embedding"],
        kv={k[3:]: v for k, v in tensors.items() if k.startswith("kv.")},
        model=meta.get("model", ""),
        fingerprint=meta.get("fingerprint", ""),
    )
