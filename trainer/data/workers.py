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


def ordered_results(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """fn(task) for every task, in task order. Tasks travel in chunks of TASKS_PER_CHUNK (one
    image is often cheaper than a round trip to a worker), with at most
    workers * IN_FLIGHT_PER_WORKER chunks submitted and not yet consumed. Workers are spawned,
    not forked: the parent holds TensorFlow and storage clients, which do not survive a fork
    safely."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
    task_iter = iter(tasks)
    try:
        pending: deque[concurrent.futures.Future] = deque()
        while chunk := list(itertools.islice(task_iter, TASKS_PER_CHUNK)):
            pending.append(pool.submit(run_chunk, fn, chunk))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool as err:
        raise UserError(
            "a worker process died (killed, out of memory, or unable to re-import the main "
            "script, as with `python -`): use fewer --workers, or --workers 1 to encode in "
            "this process"
        ) from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
