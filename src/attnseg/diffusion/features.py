"""UNet block outputs at every resolution, read with PyTorch forward hooks (Grounded Diffusion's visual input).

Grounded Diffusion (section 4.2) feeds its grounding module "the intermediate representation" of the UNet at one
denoising step: the outputs of the blocks of the encoding and the decoding path, concatenated per spatial
resolution. :func:`block_features` registers a forward hook on every down block, the mid block and every up block
of a diffusers ``UNet2DConditionModel`` (and a pre-hook on the UNet, to count its calls, one per denoising step),
and removes them on exit, also on error; nothing of diffusers is patched or replaced.

What a block gives: a down block returns ``(hidden, states)``, where ``states`` holds the output of each of its
layers and of its downsampler (the skip connections; ``hidden`` is the last of them), so each of those is kept
once; the mid block and an up block return one tensor (an up block's after its upsampler, at the next resolution).
With classifier-free guidance the pipelines stack ``[unconditional, conditional]`` rows: ``cond_rows="second_half"``
keeps the conditional half, as the attention capture does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class BlockFeatures:
    """The block outputs of one UNet call, in execution order.

    ``at``: the call kept (0 = the first denoising step); None keeps the last call, which is the paper's choice
    (the last step of generation). ``calls`` counts the UNet's calls so far.
    """

    cond_rows: str = "all"
    at: int | None = None
    calls: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)

    def by_side(self) -> dict[int, torch.Tensor]:
        """{grid side: (B, C, side, side)} the outputs of one resolution concatenated along channels, coarsest first."""
        if not self.outputs:
            raise ValueError(f"no block output was recorded (the UNet ran {self.calls} times; step {self.at} was asked)")
        groups: dict[int, list[torch.Tensor]] = {}
        for t in self.outputs:
            groups.setdefault(int(t.shape[-1]), []).append(t)
        return {s: torch.cat(groups[s], dim=1) for s in sorted(groups)}

    def _recording(self) -> bool:
        step = self.calls - 1
        return step == self.at if self.at is not None else True

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"block features are read on square latents; got a {tuple(t.shape[-2:])} grid")
        if self.cond_rows == "second_half":
            t = t[t.shape[0] // 2 :]
        return t.detach()


def unet_blocks(unet) -> list[torch.nn.Module]:
    """The down blocks, the mid block and the up blocks of a diffusers UNet, in execution order."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        raise ValueError(
            f"block features read a UNet's down, mid and up blocks; {type(unet).__name__} has none "
            "(transformer denoisers such as SD3 and Flux are not supported)"
        )
    mid = [unet.mid_block] if unet.mid_block is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks]


def _tensors(output) -> list[torch.Tensor]:
    """The distinct tensors of a block's output (a tensor, or nested tuples of tensors), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    out: list[torch.Tensor] = []
    for o in output:
        for t in _tensors(o):
            if not any(t is u for u in out):
                out.append(t)
    return out


def _states(output) -> list[torch.Tensor]:
    """A down block's ``(hidden, states)``: its states (``hidden`` is the last of them); anything else: its tensors."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple):
        return _tensors(output[1]) or _tensors(output[0])
    return _tensors(output)


@contextlib.contextmanager
def block_features(unet, cond_rows: str = "all", at: int | None = None) -> Iterator[BlockFeatures]:
    """Record the block outputs of ``unet`` while the block runs; see the module docstring.

    ``at``: which call to keep (None: the last one); ``cond_rows``: ``"all"`` or ``"second_half"``.
    """
    if cond_rows not in ("all", "second_half"):
        raise ValueError(f"cond_rows must be 'all' or 'second_half', not {cond_rows!r}")
    store = BlockFeatures(cond_rows=cond_rows, at=at)

    def count(_module, _args) -> None:
        store.calls += 1
        if store._recording():
            store.outputs = []

    def record(_module, _args, output) -> None:
        if store._recording():
            store.outputs.extend(store._keep(t) for t in _states(output))

    handles = [unet.register_forward_pre_hook(count)]
    try:
        handles += [b.register_forward_hook(record) for b in unet_blocks(unet)]
        yield store
    finally:
        for h in handles:
            h.remove()
