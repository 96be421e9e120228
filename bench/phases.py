"""Where a merge's time goes: one in-process ``loralego merge`` with timers around its phases.

The merge runs as the CLI runs it (``merge_to_folder``), on one worker thread with one intra-op thread (and the
read-ahead thread); every phase's figure is the CPU time of the thread that ran it, so on a loaded machine the
waiting is not counted, and the phases' shares are of the merge's CPU time. Timers wrap (by
monkeypatching, only in this process) the pipeline's and the methods' own functions:

- ``imports``: ``import torch`` and loralego (what every process pays before any work);
- ``plan``: ``plan_merge`` (opening the inputs, their sha256, the module plan);
- ``read``: reading and folding one module's factors from every input (``pipeline.read_module``);
- ``merge``: the method on one module, and inside it, where the method has them: ``kmeans.gram`` (the
  factor Gram matrices, ``lego.feature_gram``), ``kmeans.coords`` (Cholesky), ``kmeans.seed`` (k-means++),
  ``kmeans.lloyd``, ``svd`` (``lowrank.thin_svd``) with ``svd.split`` (Gram matrices and ``eigh``, or QR),
  ``core_space`` (the core-space bases and cores);
- ``store``: the cast to the output dtype and the finite checks (``pipeline._stored``);
- ``write``: the streaming writer's ``add`` and ``close``.

    python bench/phases.py --shape llama7b --n 8 --method lego --rank 16
    python bench/phases.py --shape small --n 100 --method svd --rank 16 --json phases.json
"""

from __future__ import annotations

import time

_START = time.process_time()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import loralego  # noqa: E402
from loralego import cluster, corespace, lowrank, pipeline  # noqa: E402
from loralego.adapters import formats  # noqa: E402
from loralego.adapters.safetensors_stream import SafetensorsStreamWriter  # noqa: E402
from loralego.methods import elementwise, lego, spectral  # noqa: E402
from loralego.methods import knots as knots_method  # noqa: E402

_IMPORTED = time.process_time()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner: Any, attribute: str, label: str) -> None:
    """Replace ``owner.attribute`` by a wrapper adding the CPU seconds of the calling thread (each call runs on one
    thread: one intra-op thread) to ``SECONDS[label]``; CPU, not wall, so that a loaded machine's waiting is not
    counted."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            SECONDS[label] += time.thread_time() - start
            CALLS[label] += 1

    setattr(owner, attribute, wrapper)


def instrument() -> None:
    timed(pipeline, "plan_merge", "plan")
    timed(pipeline, "read_module", "read")
    timed(pipeline, "merge_module", "merge")
    timed(pipeline, "_stored", "store")
    timed(SafetensorsStreamWriter, "add", "write")
    timed(SafetensorsStreamWriter, "close", "write")
    timed(lego, "feature_gram", "merge/kmeans.gram")
    timed(cluster, "gram_coordinates", "merge/kmeans.coords")
    timed(cluster, "kmeans_plus_plus", "merge/kmeans.seed")
    timed(cluster, "kmeans_plus_plus_restarts", "merge/kmeans.seed")
    timed(cluster.KMeans, "_lloyd_restarts", "merge/kmeans.lloyd")
    timed(lowrank, "thin_svd", "merge/svd")
    timed(lowrank, "_core_split", "merge/svd.split")
    timed(lowrank, "_qr_split", "merge/svd.split.qr")
    for module in (corespace, spectral, knots_method, elementwise):
        if hasattr(module, "core_space"):
            timed(module, "core_space", "merge/core_space")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(speed.SHAPE_SETS), default="llama7b")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--input-rank", type=int, default=8)
    parser.add_argument("--method", default="lego")
    parser.add_argument("--rank", type=int, help="output rank (none for cat)")
    parser.add_argument("--option", nargs="*", default=[], help="extra method options as NAME=VALUE (json values)")
    parser.add_argument("--root", type=Path, default=speed.CACHE)
    parser.add_argument("--json", type=Path, help="append the figures here as one json line")
    opts = parser.parse_args()
    speed.use_shape(opts.shape)
    folders = speed.ensure_adapters(opts.input_rank, opts.n, opts.root)
    torch.set_num_threads(1)
    instrument()
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in opts.option)}
    if opts.rank is not None:
        extra["rank"] = opts.rank
    out = Path(tempfile.mkdtemp(prefix="phases-", dir=opts.root)) / "out"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    cpu = time.process_time()
    try:
        adapters = [formats.open_adapter(str(folder)) for folder in folders]
        SECONDS["open"] = time.process_time() - cpu
        loralego.merge_to_folder(adapters, out, method=opts.method, **extra)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu
    figures = {
        "shape": opts.shape,
        "n": opts.n,
        "input_rank": opts.input_rank,
        "method": opts.method,
        "options": extra,
        "modules": speed.MODULES,
        "imports": _IMPORTED - _START,
        "total": total,
        "cpu": cpu,
        "load": load,
        "seconds": dict(SECONDS),
        "calls": dict(CALLS),
    }
    print(
        f"{opts.shape} n={opts.n} (rank-{opts.input_rank} inputs) {opts.method} {extra}: merge {total:.2f} s wall, "
        f"{cpu:.2f} s cpu, one thread; imports {figures['imports']:.2f} s cpu; load {load:.1f}"
    )
    for label, seconds in sorted(SECONDS.items()):
        per = seconds / max(CALLS.get(label, 1), 1)
        share = 100 * seconds / cpu
        print(f"  {label:<22} {seconds:8.3f} s  {share:5.1f}%  ({CALLS.get(label, 1)} calls, {per * 1e3:.2f} ms each)")
    if opts.json:
        with opts.json.open("a") as handle:
            handle.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
