"""A bounded pool of worker processes that maps a function over a lazy stream of tasks and
yields the results in task order, plus how many CPUs this process may use."""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from trainer.errors import UserError

TASKS_PER_CHUNK = 8  # images per round trip to a worker
IN_FLIGHT_PER_WORKER = 3  # chunks queued per worker: hides latency, bounds memory


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a
    container's limit, which os.cpu_count() does not see)."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(task) for task in chunk]


def ordered_results(fn: Callable, tasks: Iterable, workers: int,
                    on_crash: Callable[[object], object] | None = None) -> Iterator:
    """fn(task) for every task, in task order. Tasks travel in chunks of TASKS_PER_CHUNK (one
    image is often cheaper than a round trip to a worker), with at most
    workers * IN_FLIGHT_PER_WORKER chunks submitted and not yet consumed. Workers are spawned,
    not forked: the parent holds TensorFlow and storage clients, which do not survive a fork
    safely.

    on_crash(task) -> result: isolates native crashes. fn then always runs in worker
    processes (one at least); when a worker dies, the tasks of the chunks lost with it run
    again one at a time in fresh workers, and a task whose worker dies again gets
    on_crash(task) as its result. Without it, a dying worker (or workers <= 1, fn running in
    this process) ends the run with a UserError."""
    if workers <= 1 and on_crash is None:
        yield from map(fn, tasks)
        return
    pool = _Pool(max(1, workers))
    task_iter = iter(tasks)
    try:
        pending: deque[tuple[list, concurrent.futures.Future]] = deque()
        while True:
            if len(pending) < pool.workers * IN_FLIGHT_PER_WORKER:
                chunk = list(itertools.islice(task_iter, TASKS_PER_CHUNK))
                if chunk:
                    pending.append((chunk, pool.submit(run_chunk, fn, chunk)))
                    continue
            if not pending:
                break
            chunk, future = pending.popleft()
            try:
                yield from future.result()
            except concurrent.futures.process.BrokenProcessPool as err:
                if on_crash is None:
                    raise UserError(
                        "a worker process died (killed, out of memory, or unable to re-import "
                        "the main script, as with `python -`): use fewer --workers, or "
                        "--workers 1 to encode in this process") from err
                pool.restart()
                yield from (pool.isolated(fn, task, on_crash) for task in chunk)
                pending = deque((c, pool.submit(run_chunk, fn, c)) for c, _ in pending)
    finally:
        pool.shutdown()


class _Pool:
    """A spawned process pool that can be replaced when one of its workers dies."""

    def __init__(self, workers: int):
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._executor = self._new()

    def _new(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=self._context)

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        return self._executor.submit(fn, *args)

    def restart(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = self._new()

    def isolated(self, fn: Callable, task, on_crash: Callable):
        """fn(task) alone in the pool; on_crash(task) when its worker dies."""
        try:
            return self._executor.submit(fn, task).result()
        except concurrent.futures.process.BrokenProcessPool:
            self.restart()
            return on_crash(task)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
