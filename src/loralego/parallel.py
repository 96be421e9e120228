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
import queue
import threading
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


_DONE = object()


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items of ``items``, produced by a background thread up to ``depth`` ahead of the consumer.

    For reading: the next modules' tensors are read (``pread`` and dtype conversion release the GIL) while the
    workers compute, so reading overlaps compute instead of adding to it; ``depth`` bounds the memory held by
    items read but not yet taken. An error in the producer is raised in the consumer at the item it concerns;
    a consumer that stops early stops the producer after the item in hand.
    """
    if depth < 1:
        yield from items
        return
    slots: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_DONE, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            slots.put((_DONE, error))

    thread = threading.Thread(target=produce, name="loralego-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish its item
            with contextlib.suppress(queue.Empty):
                slots.get_nowait()
            thread.join(timeout=0.05)
