"""``--executor ray``: the same per-module jobs as the local executor, as Ray tasks on a cluster.

The driver plans the merge and writes the output; each task merges one module, reading that module's byte
ranges from the inputs itself, so the inputs must be on storage every worker sees at the same paths (a
shared filesystem), and loralego must be importable on the workers. The plan (the adapters' headers and
the options) goes to the object store once. Each module is computed by one single-threaded task, exactly
the computation of a local worker, so the bytes are those of the local executor (tested); results are
taken back in module order with a bounded number of tasks in flight, so the driver holds a few modules.

Ray is an optional extra (``pip install 'lora-lego[ray]'``). ``--ray-address`` joins an existing cluster;
without it a local Ray instance is started for the merge and stopped after it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import LoraLegoError

if TYPE_CHECKING:
    from .methods import ModuleResult
    from .pipeline import MergePlan

_TASKS_PER_CPU = 2  # in flight per cluster CPU: enough to keep workers busy, few results held by the driver


def _merge_on_worker(plan: MergePlan, module: str) -> ModuleResult:
    import torch

    from .pipeline import merge_module

    torch.set_num_threads(1)  # one task per CPU, as a local worker runs one module on one thread
    return merge_module(plan, module)


@contextlib.contextmanager
def _connected(address: str | None) -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        raise LoraLegoError("--executor ray needs the ray package: pip install 'lora-lego[ray]'") from None
    started = False
    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise LoraLegoError(f"--executor ray: cannot start or reach {where}: {error}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def ray_merged(plan: MergePlan, address: str | None = None) -> Iterator[ModuleResult]:
    """Each module's :class:`ModuleResult`, in ``plan.modules`` order, computed by Ray tasks."""
    with _connected(address) as ray:
        task = ray.remote(num_cpus=1)(_merge_on_worker)
        shared = ray.put(plan)
        window = max(1, int(ray.cluster_resources().get("CPU", 1)) * _TASKS_PER_CPU)
        modules = iter(plan.modules)
        pending: deque[Any] = deque()
        try:
            for module in modules:
                pending.append(task.remote(shared, module))
                if len(pending) >= window:
                    break
            while pending:
                result = _get(ray, pending.popleft())
                for module in modules:
                    pending.append(task.remote(shared, module))
                    break
                yield result
                del result
        finally:
            for ref in pending:  # an error or an abandoned iteration: do not run the rest
                with contextlib.suppress(Exception):
                    ray.cancel(ref)


def _get(ray: Any, ref: Any) -> ModuleResult:
    """``ray.get`` that re-raises a task's LoraLegoError as itself (one line, not a remote traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, LoraLegoError):
            raise LoraLegoError(str(cause)) from None
        raise LoraLegoError(f"--executor ray: a task failed: {cause or error}") from None
