"""Using several CPU cores for a merge: one module per worker thread, each module single-threaded.

Modules are independent, so they parallelise without any fine-grained synchronisation. Splitting each
module's small operations across cores does not pay: on the 2-core development machine, torch's QR of a
15104 x 64 float64 stack (the svd merge of 8 rank-8 adapters) took 17 ms on one thread and 170-450 ms on
two, and a 64 x 15104 Gram product gained nothing (docs/performance.md). So while a merge runs on the CPU,
torch's intra-op threads are set to 1 and ``torch.get_num_threads()`` worker threads (torch's default: one
per core; ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` lower it) each merge a module. The torch calls
release the GIL, so the workers' arithmetic runs in parallel. Each module is computed by one thread alone,
so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def default_workers(device: torch.device) -> int:
    """Modules merged at once: one per intra-op thread torch would use on the CPU; one on a GPU."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the duration, then restore it."""
    previous = torch.get_num_threads()
    if threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``function(item)`` for each item, in order, computed by up to ``workers`` threads.

    At most ``workers`` items are in progress beyond the one the caller holds, so memory stays bounded by a
    few items' working sets. With one worker everything runs in the caller's thread, as a plain loop.
    """
    if workers <= 1:
        for item in items:
            yield function(item)
        return
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loralego") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in iterator:
                pending.append(pool.submit(function, item))
                if len(pending) >= workers:
                    break
            while pending:
                result = pending.popleft().result()  # the future is dropped here: it would keep the result
                for item in iterator:
                    pending.append(pool.submit(function, item))
                    break
                yield result
                del result
        finally:  # an error or an abandoned iteration: do not start the modules still queued
            for future in pending:
                future.cancel()
