"""Execution engines: run a worker over a list of tasks, in this process or on a Ray actor pool.

An engine knows nothing of what it runs. A job gives it tasks (JSON-serialisable values) and a worker
*factory*: a picklable callable that builds, once per process, the callable that turns one task into one
result (JSON-serialisable too). Results stream back to the caller as tasks finish, so the job alone
records progress (a manifest line, an output file written last) and a killed run resumes in the same way
whatever the engine.

- ``local``: the tasks in order, in this process, with a worker the caller may have built already (a
  loaded model is not loaded twice);
- ``ray``: Ray Data maps the tasks through ``workers`` actors, one worker (one loaded model) per actor and
  one GPU per actor when the cluster has GPUs; on CPU each actor gets its share of the cores.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

ENGINES = ("local", "ray")

Worker = Callable[[Any], Any]


class EngineError(RuntimeError):
    """An engine cannot run here (Ray missing or not starting); the message says what to do."""


def run_tasks(
    engine: str,
    tasks: Sequence[Any],
    factory: Callable[[], Worker],
    workers: int = 1,
    local_worker: Worker | None = None,
) -> Iterator[Any]:
    """Results of ``tasks``, as they finish: ``local`` in order, ``ray`` in completion order."""
    if engine == "local":
        work = local_worker or factory()
        return (work(t) for t in tasks)
    if engine == "ray":
        return _run_ray(tasks, factory, workers)
    raise ValueError(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")


class _RayActor:
    """Ray Data actor: builds its worker once, then maps JSON tasks to JSON results."""

    def __init__(self, factory: Callable[[], Worker], threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.work = factory()

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(self.work(json.loads(str(raw)))) for raw in batch["task"]]
        return {"result": np.array(results, dtype=object)}


def _run_ray(tasks: Sequence[Any], factory: Callable[[], Worker], workers: int) -> Iterator[Any]:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EngineError("the ray engine needs Ray Data: pip install 'attnseg[ray]'")
    if not tasks:
        return
    _init_ray(workers)
    import ray

    gpu = _has_gpu()
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=min(len(tasks), 256))
    with warnings.catch_warnings():
        # Ray 2.5x's only switch for actor restarts is an extra keyword it has begun to call deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        res = ds.map_batches(
            _RayActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else 1,
            fn_constructor_kwargs={"factory": factory, "threads": threads},
            # An actor that dies is not restarted behind the job's back: its error reaches the caller, and the job
            # resumes from its files when run again (Ray also warns, at error level, about restartable actors
            # whose arguments live in the object store).
            max_restarts=0,
        )
    try:
        for row in res.iter_rows():
            yield json.loads(row["result"])
    except ray.exceptions.RayError as e:  # a worker's exception, wrapped by Ray with its whole traceback
        cause = getattr(e, "cause", None) or e
        first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise EngineError(f"a Ray worker failed: {first}; run the same command again to resume") from e


def _init_ray(workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job shows its own progress bar
    context.print_on_execution_start = False
    try:
        ray.init(
            num_cpus=max(1, workers) if not _has_gpu() else None,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
            logging_level=logging.ERROR,
        )
    except Exception as e:
        raise EngineError(f"could not start Ray ({e}); check RAY_TMPDIR (a short path) and free memory") from e
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
