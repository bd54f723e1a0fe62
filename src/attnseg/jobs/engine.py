"""The Ray engine: the same blocks of work as the local engine, spread over an actor pool.

Ray Data maps blocks through ``BlockGenerator`` actors (one loaded model per actor, one GPU per
actor when the cluster has GPUs). Actors write the image and mask files (atomically); the driver
alone appends manifest lines, as results stream back, so a killed run resumes exactly like a
local one. Blocks are the local engine's blocks with the same per-item seeds: the files are
byte-identical whatever the engine or the number of workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np


class RayStartError(RuntimeError):
    """Ray could not be started on this machine."""


def _init_ray(workers: int) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import logging

        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            ray.init(
                num_cpus=max(1, workers) if not _has_gpu() else None,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        except Exception as e:
            raise RayStartError(f"could not start Ray ({e}); check RAY_TMPDIR (a short path) and free memory") from e


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _actor_pool_map(rows: list[dict], actor_cls, kwargs: dict, workers: int):
    """Ray Data ``map_batches`` of one row at a time over ``workers`` actors (a GPU each if any)."""
    import ray

    gpu = _has_gpu()
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 256))
    return ds.map_batches(
        actor_cls,
        batch_size=1,
        concurrency=workers,
        num_gpus=1 if gpu else 0,
        num_cpus=0 if gpu else 1,
        fn_constructor_kwargs={**kwargs, "threads": threads},
    )


class BlockGenerator:
    """Ray Data actor: loads the model once, generates blocks and writes their files."""

    def __init__(self, model, out: str, spec: dict, threads: int = 1) -> None:
        import torch

        from attnseg.diffusion.loading import load_pipeline
        from attnseg.jobs.generate import RunSpec

        torch.set_num_threads(threads)
        self.pipe = load_pipeline(model, device="auto", dtype="auto")
        self.out = Path(out)
        self.spec = RunSpec(**spec)

    def __call__(self, batch: dict) -> dict:
        from attnseg.jobs.generate import Item, item_seed, run_block, write_item

        records = []
        for raw in batch["block"]:
            block = [Item(**d) for d in json.loads(str(raw))]
            gens = run_block(self.pipe, block, self.spec)
            recs = [
                write_item(self.out, it, g, self.spec.classes, item_seed(self.spec.seed, it.index))
                for it, g in zip(block, gens, strict=True)
            ]
            records.append(json.dumps(recs))
        return {"records": np.array(records, dtype=object)}


def run_blocks_ray(model, out: Path, blocks, spec, done: dict, workers: int, progress: bool) -> None:
    """Generate ``blocks`` on ``workers`` Ray actors; append manifest lines as blocks finish."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError("the ray engine needs Ray Data: pip install 'attnseg[ray]'")
    from attnseg.jobs.generate import append_manifest

    _init_ray(workers)
    rows = [{"block": json.dumps([asdict(it) for it in b])} for b in blocks]
    if not rows:
        return
    res = _actor_pool_map(rows, BlockGenerator, {"model": model, "out": str(out), "spec": asdict(spec)}, workers)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(len(b) for b in blocks) + len(done)
    with Progress(
        TextColumn("generate (ray)"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress
    ) as bar:
        task = bar.add_task("generate", total=total, completed=len(done))
        for row in res.iter_rows():
            recs = [r for r in json.loads(row["records"]) if r["index"] not in done]
            append_manifest(out / "manifest.jsonl", recs)
            for r in recs:
                done[r["index"]] = r
            bar.update(task, completed=len(done))


class SegmentWorker:
    """Ray Data actor for ``attnseg segment --engine ray``: one predictor per actor."""

    def __init__(self, model, out: str, options: dict, threads: int = 1) -> None:
        import torch

        from attnseg.predictor import AttnSegPredictor

        torch.set_num_threads(threads)
        self.predictor = AttnSegPredictor.from_pretrained(model, device="auto", dtype=options.pop("dtype", "auto"))
        self.out = Path(out)
        self.options = options

    def __call__(self, batch: dict) -> dict:
        from attnseg.io.images import ImageError, load_image
        from attnseg.jobs.segment import write_outputs

        results = []
        for raw in batch["job"]:
            job = json.loads(str(raw))
            try:
                image = load_image(job["path"])
                res = self.predictor.segment_batch([image], [job["labels"]], **self.options)[0]
                write_outputs(
                    self.out,
                    Path(job["path"]).stem,
                    image,
                    res,
                    self.predictor.model_name,
                    job["path"],
                    self.options.get("preset"),
                )
                results.append(json.dumps({"path": job["path"], "error": None}))
            except (ImageError, ValueError) as e:
                results.append(json.dumps({"path": job["path"], "error": str(e)}))
        return {"result": np.array(results, dtype=object)}


def run_segment_ray(model, jobs: list[tuple[str, list[str]]], out: Path, options: dict, workers: int):
    """Segment ``jobs`` (path, labels) on ``workers`` actors; yield (path, error or None) as they finish."""

    _init_ray(workers)
    if not jobs:
        return
    rows = [{"job": json.dumps({"path": p, "labels": labs})} for p, labs in jobs]
    res = _actor_pool_map(rows, SegmentWorker, {"model": model, "out": str(out), "options": dict(options)}, workers)
    for row in res.iter_rows():
        r = json.loads(row["result"])
        yield r["path"], r["error"]
