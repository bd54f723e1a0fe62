"""Train the grounding module on generated images of seen classes (Grounded Diffusion section 4.3).

``train_grounding(backbone, out, data_cfg, cfg, detector)`` builds (or resumes) the training data (:mod:`.data`), then trains
:class:`~attnseg.methods.grounding.GroundingModule` with BCE against the oracle masks, optionally ignoring the
all-zero ones ("training without zero masks", paper Tab. 3). The folder ``out`` holds ``settings.json`` from the start and
ends with ``config.json``, ``model.safetensors`` and ``log.jsonl``; training is seeded (batch b of step s depends on (seed, s) only) and
resumable: ``checkpoint.safetensors`` (module, optimizer state and step; safetensors only, no pickle) is written
atomically every ``ckpt_every`` steps, picked up by the same command and removed when the model is written. A
folder trained with other settings is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnseg.grounder import QUERY_TEMPLATE, GroundingError, class_embeddings, pad_queries, save_module
from attnseg.io.files import atomic_write_bytes, settings_diff
from attnseg.methods.grounding import GroundingConfig, GroundingModule, grounding_loss
from attnseg.train.grounding.data import Block, DataConfig, build_data


@dataclass
class TrainConfig:
    """Training settings (part of the module's identity, stored in config.json)."""

    steps: int = 2000
    """Optimiser steps (paper: 5k of batch 8 over ~40k images; ours: 2k over a few hundred, minutes on a CPU)."""
    batch: int = 8
    """Images per step (paper section 5.1)."""
    lr: float = 1e-4
    """Adam's learning rate (paper section 5.1)."""
    weight_decay: float = 1e-4
    """Adam's weight decay (paper section 5.1)."""
    drop_zero_masks: bool = True
    """Ignore the classes whose oracle mask is all zero (paper section 4.3, "training w.o. zero masks", Tab. 3)."""
    seed: int = 0
    """Initial weights and the batches of every step."""
    ckpt_every: int = 250


def _batch(data: Block, idx: torch.Tensor, embeddings: dict[str, torch.Tensor], drop_zero: bool):
    """Features, queries, padding, targets (B, 2, H, W) and the masks the loss keeps (B, 2) of items ``idx``."""
    labels = [data.items[int(i)].labels for i in idx]
    q, pad = pad_queries(embeddings, labels)
    targets = data.oracle[idx][:, : q.shape[1]]
    keep = ~pad
    if drop_zero:
        keep &= targets.flatten(2).any(2)
    return {s: f[idx].float() for s, f in data.features.items()}, q, pad, targets, keep.float()


def _module_config(data: Block, text_dim: int) -> GroundingConfig:
    sides = tuple(data.features)
    return GroundingConfig(
        sides=sides,
        in_channels=tuple(int(data.features[s].shape[1]) for s in sides),
        text_dim=text_dim,
        image_size=int(data.images.shape[1]),
    )


def _save_checkpoint(path: Path, module: GroundingModule, opt: torch.optim.Adam, step: int) -> None:
    """Module and Adam state as tensors of one safetensors file; the step in its metadata."""
    from safetensors.torch import save

    tensors = {f"module.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    atomic_write_bytes(path, save(tensors, metadata={"step": str(step)}))


def _load_checkpoint(path: Path, module: GroundingModule, opt: torch.optim.Adam) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    module.load_state_dict({k[len("module.") :]: v for k, v in t.items() if k.startswith("module.")})
    state = opt.state_dict()
    per_param: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            per_param.setdefault(int(i), {})[name] = v
    state["state"] = per_param
    opt.load_state_dict(state)
    return step


def train_grounding(
    backbone,
    out: str | Path,
    data_cfg: DataConfig,
    cfg: TrainConfig | None = None,
    detector: str = "shapes",
    data_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train (or resume, or find already trained) a module on ``data_cfg``'s items and ``detector``'s masks of them
    (a ``score-generated`` detector spec); return its config record.

    ``data_dir``: where the generated data is cached (default ``out/data``; share it between runs that differ in
    training settings only). ``stop_after`` ends this call after that many steps with a checkpoint.
    """
    cfg = cfg or TrainConfig()
    if cfg.steps < 1 or cfg.batch < 1 or cfg.lr <= 0:
        raise GroundingError("--steps and --batch must be at least 1 and --lr positive")
    if data_cfg.kind != "train":
        raise GroundingError("a module trains on 'train' data")
    out = Path(out)
    record = {
        "seen": list(data_cfg.classes),
        "query_template": QUERY_TEMPLATE,
        "model": backbone.model_name,
        "data": asdict(data_cfg),
        "detector": detector,
        "train": asdict(cfg),
    }
    record = json.loads(json.dumps(record))  # as settings.json holds it: tuples become lists
    settings = out / "settings.json"
    if settings.exists():
        diff = settings_diff(json.loads(settings.read_text()), record)
        if diff:
            raise GroundingError(f"{out} holds a module trained with other settings ({', '.join(diff)}); use another --out")
        if (out / "model.safetensors").exists() and (out / "config.json").exists():
            return {**json.loads((out / "config.json").read_text()), "finished": True}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(settings, json.dumps(record, indent=1).encode())

    data = build_data(backbone, data_dir or out / "data", data_cfg, detector, progress)
    embeddings = dict(zip(data_cfg.classes, class_embeddings(backbone, data_cfg.classes), strict=True))
    torch.manual_seed(cfg.seed)
    module = GroundingModule(_module_config(data, int(next(iter(embeddings.values())).shape[-1])))
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ck = out / "checkpoint.safetensors"
    step = _load_checkpoint(ck, module, opt) if ck.exists() else 0
    start = step
    zero = int((~data.oracle.flatten(2).any(2)).sum()) - sum(2 - len(it.labels) for it in data.items)
    masks = sum(len(it.labels) for it in data.items)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.time()
    module.train()
    running: list[float] = []
    columns = (TextColumn("train grounding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    with Progress(*columns, TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("", total=cfg.steps, completed=step)
        while step < cfg.steps:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
            idx = torch.randint(0, len(data.items), (cfg.batch,), generator=g)
            feats, q, pad, targets, keep = _batch(data, idx, embeddings, cfg.drop_zero_masks)
            loss = grounding_loss(module(feats, q, pad), targets, keep)
            if not torch.isfinite(loss):
                raise RuntimeError(f"grounding loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running.append(loss.item())
            bar.update(task, completed=step, description=f"loss {np.mean(running[-50:]):.4f}")
            pause = stop_after is not None and step == start + stop_after and step < cfg.steps
            if step % cfg.ckpt_every == 0 or step == cfg.steps or pause:
                rec = {"step": step, "loss": float(np.mean(running)), "elapsed": time.time() - t0}
                running = []
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if step < cfg.steps:
                    _save_checkpoint(ck, module, opt, step)
            if pause:
                return {**record, "finished": False, "step": step}
    final = {**record, "images": len(data.items), "masks": masks, "zero_masks": zero}
    save_module(out, module.eval(), final)
    if ck.exists():
        ck.unlink()
    return {**final, "finished": True, "step": step}
