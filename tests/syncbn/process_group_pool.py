"""A pool of real gloo ranks, spawned once per test module, that runs scenario functions on every rank.

Each rank is a separate spawned process joined to a real gloo process group through a ``file://`` store in a
temporary folder (no fixed ports). Spawning and importing torch costs seconds, so one pool serves many tests;
each call sends a top-level function to every rank and waits for every rank's result with a deadline. A rank
stuck in a collective makes the call fail with a timeout (gloo's own timeout is short too) instead of blocking
CI; a broken pool is torn down and the next call reports it.
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 30


def _rank_main(rank: int, world_size: int, store_path: str, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args = task
            try:
                value = fn(rank, world_size, *args)
                ForkingPickler.dumps(value)  # fail here, visibly, rather than in the queue's feeder thread
                results.put((rank, True, value))
            except BaseException:  # report every failure to the parent, including gloo timeouts
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class ProcessGroupPool:
    """``world_size`` live gloo ranks; :meth:`run` executes ``fn(rank, world_size, *args)`` on all of them."""

    def __init__(self, world_size: int, workdir: Path) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        store = workdir / f"store-{world_size}"
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world_size, str(store), self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._broken: str | None = None

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 90.0) -> list[Any]:
        """Run ``fn`` on every rank; return the results indexed by rank, or raise with the failing ranks' traces."""
        if self._broken:
            raise RuntimeError(f"process group pool is unusable after an earlier failure: {self._broken}")
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(out) + len(errors) < self.world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = self._results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                self._broken = f"{fn.__name__} timed out after {timeout}s (ranks done: {sorted(out)})"
                self.close()
                raise TimeoutError(self._broken) from None
            (out if ok else errors)[rank] = value
        if errors:
            raise AssertionError(
                f"{fn.__name__} failed on ranks {sorted(errors)}:\n" + "\n".join(errors[r] for r in sorted(errors))
            )
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (politely, then by force)."""
        for q, p in zip(self._tasks, self._procs, strict=True):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
