"""Capture attention probabilities through diffusers' attention-processor API.

``capture_attention(unet, names)`` installs a :class:`CaptureProcessor` on the chosen modules
(``Attention.set_processor``, diffusers' processor API) and restores the original processors on exit. Modules that are
not captured keep their own (fused SDPA) processor.

A captured module computes, for the conditional rows of the batch only, the attention
probabilities explicitly (head chunk by head chunk, to bound memory), adds their head mean
(or per-head maps when asked) to a running sum, and uses the same probabilities for its output;
the other rows go through ``scaled_dot_product_attention`` as before. With classifier-free
guidance the diffusers pipelines stack ``[unconditional, conditional]``: only the second half
is read and the full CFG batch is never kept.

Joint attention (text and image tokens in one attention) is read by :class:`JointCaptureProcessor` (SD3, image
tokens first) and :class:`FluxCaptureProcessor` (Flux's double- and single-stream blocks, text tokens first, RoPE):
the image queries' block over the text keys is a cross map, their block over the image keys a self map. Both also
carry ConceptAttention's concept tokens (:func:`concept_mask`): extra tokens at the end of the text stream that no
image or prompt token attends to, so the image is computed exactly as without them, and whose attention outputs are
compared with the image tokens' (the ``concept`` part).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnseg.diffusion.layers import layer_inventory

# Largest number of attention-score elements materialised at once by a capture processor.
_SCORE_BUDGET = 1 << 25


@dataclass
class AttentionStore:
    """Running sums of captured attention probabilities, per module name.

    sums[name]: (B, Q, K) float32 head-mean sums, or (B, H, Q, K) for names in ``per_head``.
    counts[name]: number of forwards added (timesteps, when generating).
    cond_rows: ``"all"`` or ``"second_half"`` (classifier-free guidance: read the conditional half).
    """

    per_head: frozenset[str] = frozenset()
    cond_rows: str = "all"
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    """Applied to each forward's map before it is added (e.g. SeeDiff's per-step max-normalisation)."""

    def add(self, name: str, probs_sum: torch.Tensor) -> None:
        if self.transform is not None:
            probs_sum = self.transform(name, probs_sum)
        if name in self.sums:
            self.sums[name] += probs_sum
            self.counts[name] += 1
        else:
            self.sums[name] = probs_sum.clone()
            self.counts[name] = 1

    def mean(self, name: str) -> torch.Tensor:
        """Mean over the captured forwards: (B, Q, K), or (B, H, Q, K) for per-head names."""
        if name not in self.sums:
            raise KeyError(f"attention of {name!r} was not captured; captured: {sorted(self.sums)}")
        return self.sums[name] / self.counts[name]

    def rows(self, index) -> AttentionStore:
        """A store holding only batch rows ``index`` (a slice or index list) of every map."""
        if isinstance(index, list) and self.sums and index == list(range(len(next(iter(self.sums.values()))))):
            return self  # every row, in order
        sub = AttentionStore(per_head=self.per_head, cond_rows=self.cond_rows)
        sub.sums = {k: v[index] for k, v in self.sums.items()}
        sub.counts = dict(self.counts)
        return sub


class CaptureProcessor:
    """Attention processor that records probabilities; numerically the default attention.

    key_scale: optional (T,) or (B_cond, T) factors multiplied into the keys of the conditional rows before the
    softmax (iSeg's Cat-Cross, eq. 8: softmax(Q (W . K)^T / sqrt(d))), and into the values too with ``scale_values``
    (the scaled text embedding of iSeg's Algorithm 1 and code). Only for cross-attention.
    """

    def __init__(
        self,
        store: AttentionStore,
        name: str,
        record: bool = True,
        key_scale: torch.Tensor | None = None,
        scale_values: bool = False,
    ) -> None:
        self.store = store
        self.name = name
        self.record = record
        self.key_scale = key_scale
        self.scale_values = scale_values

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        c0 = batch_size // 2 if self.store.cond_rows == "second_half" else 0
        if self.key_scale is not None and is_cross:
            w = self.key_scale.to(key.device, key.dtype)
            w = w.view(1, 1, -1, 1) if w.dim() == 1 else w.view(w.shape[0], 1, -1, 1)
            key = key * w if c0 == 0 else torch.cat([key[:c0], key[c0:] * w], dim=0)
            if self.scale_values:
                value = value * w if c0 == 0 else torch.cat([value[:c0], value[c0:] * w], dim=0)
        parts = []
        if c0 > 0:
            m = attention_mask[:c0] if attention_mask is not None else None
            parts.append(F.scaled_dot_product_attention(query[:c0], key[:c0], value[:c0], attn_mask=m))
        m = attention_mask[c0:] if attention_mask is not None else None
        out_c = self._attend_and_record(attn, query[c0:], key[c0:], value[c0:], m)
        parts.append(out_c)
        hidden_states = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    @staticmethod
    def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """softmax(q k^T scale + mask) in float32, scaled before the product: fp16 logits can overflow (SD 2.x upcasts too)."""
        scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
        if mask is not None:
            scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)

    def _attend_and_record(self, attn, q, k, v, mask) -> torch.Tensor:
        """Explicit attention for (B, H, Q, d) inputs; records probabilities when asked."""
        if not self.record:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        per_head = self.name in self.store.per_head
        scale = attn.scale if getattr(attn, "scale", None) is not None else 1 / math.sqrt(q.shape[-1])
        chunk = max(1, min(h, _SCORE_BUDGET // max(1, b * nq * nk)))
        if chunk == h:  # every head at once: no accumulator, no copies
            probs = self._probs(q, k, mask, scale)
            out = torch.matmul(probs.to(v.dtype), v)
            self.store.add(self.name, probs if per_head else probs.sum(dim=1) / h)
            return out
        acc = torch.zeros((b, h, nq, nk) if per_head else (b, nq, nk), dtype=torch.float32, device=q.device)
        out = torch.empty_like(q)
        for h0 in range(0, h, chunk):
            hs = slice(h0, h0 + chunk)
            probs = self._probs(q[:, hs], k[:, hs], mask[:, hs] if mask is not None else None, scale)
            out[:, hs] = torch.matmul(probs.to(v.dtype), v[:, hs])
            if per_head:
                acc[:, hs] = probs
            else:
                acc += probs.sum(dim=1)
        if not per_head:
            acc /= h
        self.store.add(self.name, acc)
        return out


def concept_mask(n_img: int, n_prompt: int, n_concepts: int, image_first: bool, device=None) -> torch.Tensor:
    """(N, N) bool, True where a query token may attend to a key token, N = n_img + n_prompt + n_concepts, for a
    joint sequence ``[image, prompt, concepts]`` (``image_first``) or ``[prompt, concepts, image]``.

    ConceptAttention (Helbling et al. 2025, section 3): image and prompt tokens do not attend to the concept tokens
    (the image is generated exactly as without them); concept tokens attend to the image tokens and to each other,
    not to the prompt.
    """
    n_txt = n_prompt + n_concepts
    start = n_img if image_first else 0
    prompt = slice(start, start + n_prompt)
    concepts = slice(start + n_prompt, start + n_txt)
    allowed = torch.ones((n_img + n_txt, n_img + n_txt), dtype=torch.bool, device=device)
    allowed[:, concepts] = False
    allowed[concepts, concepts] = True
    allowed[concepts, prompt] = False
    return allowed


def concept_maps(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's saliency (Helbling et al. 2025, eq. 8-9): the attention outputs of the image tokens
    (B, P, D) against the concept tokens' (B, C, D), heads concatenated, before the output projection; a softmax over
    the concepts -> (B, P, C)."""
    return torch.einsum("bpd,bcd->bpc", image_out.float(), concept_out.float()).softmax(dim=-1)


class JointCaptureProcessor:
    """Processor for joint (MMDiT) attention modules that records the image-to-text and image-to-image blocks.

    Numerically the default ``JointAttnProcessor2_0`` (SD3; ``image_first``) for its outputs, which come from the same
    fused kernel. For the conditional rows, the block of image queries to text keys of the joint softmax, renormalised
    over the text tokens, is recorded as ``cross`` (B, P, T), the block of image queries to image keys renormalised
    over the image tokens as ``self`` (B, P, P): the conditional distributions of an image token's attention over the
    prompt and over the image, each computed as the softmax of that block's logits alone (the same numbers).
    ``parts`` maps ``"cross"`` / ``"self"`` / ``"concept"`` to the store key each is recorded under. ``key_scale``
    (iSeg's Cat-Cross) multiplies the text keys of the conditional rows, or, with ``scale_values``, their text states
    before the projections (the scaled embedding).

    ``concepts``: the last ``concepts`` tokens of the text stream are ConceptAttention's concept tokens, masked as
    :func:`concept_mask` says (every joint module of the model needs the processor then, recording or not); the
    ``cross`` part is over the prompt tokens only and the ``concept`` part is :func:`concept_maps`.
    """

    def __init__(
        self,
        store: AttentionStore,
        parts: dict[str, str],
        key_scale: torch.Tensor | None = None,
        image_first: bool = True,
        scale_values: bool = False,
        concepts: int = 0,
    ) -> None:
        self.store, self.parts, self.key_scale, self.image_first = store, parts, key_scale, image_first
        self.scale_values = scale_values
        self.concepts = concepts

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, *args, **kwargs):
        b = hidden_states.shape[0]
        q, k, v = (self._heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        n_img = q.shape[2]
        n_txt = 0
        if encoder_hidden_states is not None:
            c0 = self._cond_start(b)
            w = None
            if self.key_scale is not None:
                w = self.key_scale.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
            if w is not None and self.scale_values:
                # The scaled text embedding itself (iSeg's Algorithm 1): every projection of it sees the factor.
                ws = w.view(1, -1, 1) if w.dim() == 1 else w.view(w.shape[0], -1, 1)
                e = encoder_hidden_states
                encoder_hidden_states = e * ws if c0 == 0 else torch.cat([e[:c0], e[c0:] * ws], dim=0)
            eq, ek, ev = (
                self._heads(attn, f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            n_txt = eq.shape[2]
            if w is not None and not self.scale_values:  # eq. 8: the keys only
                wk = w.to(ek.dtype).view(1, 1, -1, 1) if w.dim() == 1 else w.to(ek.dtype).view(w.shape[0], 1, -1, 1)
                ek = ek * wk if c0 == 0 else torch.cat([ek[:c0], ek[c0:] * wk], dim=0)
            pairs = ((q, eq), (k, ek), (v, ev)) if self.image_first else ((eq, q), (ek, k), (ev, v))
            q, k, v = (torch.cat(p, dim=2) for p in pairs)
        out = self._attend(attn, q, k, v, n_img, n_txt)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            img, txt = (out[:, :n_img], out[:, n_img:]) if self.image_first else (out[:, n_txt:], out[:, :n_txt])
            if not attn.context_pre_only:
                txt = attn.to_add_out(txt)
            img = attn.to_out[1](attn.to_out[0](img))
            return img, txt
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _heads(attn, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H d) -> (B, H, N, d)."""
        return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def _cond_start(self, batch: int) -> int:
        """First conditional row: with classifier-free guidance the pipelines stack [unconditional, conditional]."""
        return batch // 2 if self.store.cond_rows == "second_half" else 0

    def _attend(self, attn, q, k, v, n_img: int, n_txt: int) -> torch.Tensor:
        """Attention of (B, H, N, d) inputs over their N = n_img + n_txt tokens, recording the parts asked for."""
        n_con = self.concepts if n_txt > 0 else 0
        if n_con and n_con >= n_txt:
            raise ValueError(f"{n_con} concept tokens leave no prompt token in a text stream of {n_txt}")
        mask = concept_mask(n_img, n_txt - n_con, n_con, self.image_first, q.device) if n_con else None
        if n_con and not self.parts:  # a module that records nothing carries the concept tokens' mask only
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if "concept" in self.parts and not n_con:
            raise ValueError("the concept part is read from concept tokens, and none were given")
        # The output as the default processor computes it (the fused kernel). A recorded part, a block of the joint
        # softmax renormalised over its own keys, is the softmax of that block's logits alone (the normaliser over the
        # other keys cancels), so only the image rows' logits against those keys are formed, never the whole
        # (image + text) x (image + text) matrix. No part's block holds a masked entry: the concept mask only keeps
        # the image and prompt tokens from attending to the concept tokens.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        c0 = self._cond_start(q.shape[0])
        qc, kc = q[c0:], k[c0:]
        b, h = qc.shape[:2]
        scale = attn.scale if getattr(attn, "scale", None) is not None else 1 / math.sqrt(qc.shape[-1])
        img = slice(0, n_img) if self.image_first else slice(n_txt, n_txt + n_img)
        t0 = n_img if self.image_first else 0
        txt = slice(t0, t0 + n_txt - n_con)  # the prompt's tokens
        con = slice(t0 + n_txt - n_con, t0 + n_txt)
        wanted = {part: (img if part == "self" else txt) for part in self.parts if part == "self" or (part == "cross" and n_txt)}
        for part, cols in wanted.items():
            per_head = self.parts[part] in self.store.per_head
            n_cols = cols.stop - cols.start
            acc = torch.zeros((b, h, n_img, n_cols) if per_head else (b, n_img, n_cols), dtype=torch.float32, device=qc.device)
            chunk = max(1, min(h, _SCORE_BUDGET // max(1, b * n_img * n_cols)))
            for h0 in range(0, h, chunk):
                hs = slice(h0, h0 + chunk)
                block = CaptureProcessor._probs(qc[:, hs, img], kc[:, hs, cols], None, scale)
                if per_head:
                    acc[:, hs] = block
                else:
                    acc += block.sum(dim=1)
            self.store.add(self.parts[part], acc if per_head else acc / h)
        if "concept" in self.parts:
            heads = out[c0:].transpose(1, 2).reshape(b, q.shape[2], -1)  # (B, N, H d): the output, heads concatenated
            self.store.add(self.parts["concept"], concept_maps(heads[:, img], heads[:, con]))
        return out


class FluxCaptureProcessor(JointCaptureProcessor):
    """Processor for Flux's attention modules (``FluxAttention``), text tokens first, that records the image-to-text
    and image-to-image blocks as :class:`JointCaptureProcessor` does.

    A double-stream module gets the text states as ``encoder_hidden_states`` (projected by its ``add_*_proj``); a
    single-stream module gets one sequence whose first ``text_tokens`` tokens are the text's. Numerically the default
    ``FluxAttnProcessor``: queries and keys RMS-normed per stream, text then image concatenated, rotated by
    ``image_rotary_emb`` (RoPE over the whole sequence), unmasked attention; a double-stream module returns
    ``(image, text)`` outputs, a single-stream one the sequence's (its block projects it). Recorded, all heads at
    once or chunk by chunk: ``cross`` (B, P, T) the image queries' probabilities over the text keys renormalised
    over the text tokens, ``self`` (B, P, P) over the image keys renormalised over the image tokens, rows and
    columns in the sequence's image order. Flux pipelines stack no unconditional half (FLUX.1-dev's guidance is an
    embedding), so every row is read whatever ``store.cond_rows`` says. ``key_scale`` (iSeg's Cat-Cross) scales
    the text keys, or with ``scale_values`` the text states before the projections.

    ``rotate(x, image_rotary_emb, sequence_dim=2)`` is diffusers' ``apply_rotary_emb``, handed in by the backbone:
    this module imports no diffusers, so that the methods, which read :class:`AttentionStore` from it, stay free of it.
    """

    def __init__(
        self,
        store: AttentionStore,
        parts: dict[str, str],
        text_tokens: int,
        rotate: Callable[..., torch.Tensor],
        key_scale: torch.Tensor | None = None,
        scale_values: bool = False,
        concepts: int = 0,
    ) -> None:
        super().__init__(store, parts, key_scale=key_scale, image_first=False, scale_values=scale_values, concepts=concepts)
        self.text_tokens = text_tokens
        self.rotate = rotate

    def _cond_start(self, batch: int) -> int:
        return 0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise ValueError("attnseg reads Flux's attention unmasked, as FluxPipeline runs it; an attention mask was given")
        b = hidden_states.shape[0]
        joint = encoder_hidden_states is not None
        n_txt = encoder_hidden_states.shape[1] if joint else self.text_tokens
        if not joint and not 0 < n_txt < hidden_states.shape[1]:
            raise ValueError(f"a single-stream sequence of {hidden_states.shape[1]} tokens cannot start with {n_txt} text tokens")
        w = None
        if self.key_scale is not None:
            w = self.key_scale.to(hidden_states.device, hidden_states.dtype)
            w = w.view(1, -1, 1) if w.dim() == 1 else w.view(w.shape[0], -1, 1)  # (1 or B, T, 1)
        if w is not None and self.scale_values:
            # The scaled text embedding itself (iSeg's Algorithm 1): every projection of it sees the factor.
            if joint:
                encoder_hidden_states = encoder_hidden_states * w
            else:
                hidden_states = torch.cat([hidden_states[:, :n_txt] * w, hidden_states[:, n_txt:]], dim=1)
        q, k, v = (self._heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            eq, ek, ev = (
                self._heads(attn, f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=2), torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
        if image_rotary_emb is not None:
            q = self.rotate(q, image_rotary_emb, sequence_dim=2)
            k = self.rotate(k, image_rotary_emb, sequence_dim=2)
        if w is not None and not self.scale_values:  # eq. 8: the text keys only
            k = torch.cat([k[:, :, :n_txt] * w.to(k.dtype)[:, None], k[:, :, n_txt:]], dim=2)
        out = self._attend(attn, q, k, v, q.shape[2] - n_txt, n_txt)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if not joint:
            return out
        img = attn.to_out[1](attn.to_out[0](out[:, n_txt:]))
        return img, attn.to_add_out(out[:, :n_txt])


def joint_parts(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Joint-attention layer names grouped by module: ``{module: {"cross" | "self": "<module>:<part>"}}`` (a name
    without a part is the module's self map)."""
    parts: dict[str, dict[str, str]] = {}
    for n in names:
        module, _, part = n.partition(":")
        parts.setdefault(module, {})[part or "self"] = n
    return parts


@contextlib.contextmanager
def capture_attention(
    unet,
    names: Sequence[str],
    per_head: Sequence[str] = (),
    cond_rows: str = "all",
    key_scale: torch.Tensor | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    cross_names: Sequence[str] | None = None,
    scale_values: bool = False,
) -> Iterator[AttentionStore]:
    """Capture the attention of modules ``names`` of ``unet`` for the duration of the block.

    key_scale (iSeg Cat-Cross) is applied to every cross-attention module, captured or not (``cross_names``: those
    modules, when the caller knows them already; else they are read from the UNet).
    transform(name, map) is applied to each forward's map before the running sum.
    The UNet's original processors are restored on exit, also on error.
    """
    if cond_rows not in ("all", "second_half"):
        raise ValueError("cond_rows must be 'all' or 'second_half'")
    store = AttentionStore(per_head=frozenset(per_head), cond_rows=cond_rows, transform=transform)
    targets = {n: CaptureProcessor(store, n, record=True, key_scale=key_scale, scale_values=scale_values) for n in names}
    if key_scale is not None:
        for n in cross_names if cross_names is not None else _cross_attention_names(unet):
            targets.setdefault(n, CaptureProcessor(store, n, record=False, key_scale=key_scale, scale_values=scale_values))
    with installed(unet, targets):
        yield store


@contextlib.contextmanager
def installed(model, processors: dict[str, Callable]) -> Iterator[None]:
    """Install ``processors`` ({module name: processor}) on ``model``'s attention modules for the block.

    ``Attention.set_processor`` on the chosen modules only (diffusers' processor API, without walking the whole
    model: ``set_attn_processor`` costs ~10 ms per call on a small UNet); the original processors are restored on
    exit, also on error.
    """
    modules = {}
    for n in processors:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            m = None
        if m is None or not hasattr(m, "set_processor"):
            raise ValueError(f"{n!r} is not an attention module of this model; see `attnseg layers`")
        modules[n] = m
    original = {n: m.processor for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.set_processor(processors[n])
        yield
    finally:
        for n, m in modules.items():
            m.set_processor(original[n])


def _cross_attention_names(unet) -> list[str]:
    return [lay.name for lay in layer_inventory(unet) if lay.kind == "cross"]
