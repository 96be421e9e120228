"""Speed of the core-space methods on 8 rank-8 Llama-2-7B-shaped adapters (224 modules), whole process, beside
the read floor (bench/speed.py's generator, floor and subprocess timing are reused).

Every row is a whole ``loralego merge`` subprocess (interpreter start, imports, reading, merging, writing),
interleaved with the floor (``safe_open`` and read every tensor once) so that load on the shared machine hits
every row alike; the figure to read is each row's ratio to the floor of the same round.

``--dense-module`` also times one module of today's dense TIES (``--space dense``: eight d_out x d_in updates,
TIES, then the exact truncated SVD) in process, beside the core-space TIES of the same module.

Usage (repository root, venv active):
    python bench/core_speed.py --repeat 1
    python bench/core_speed.py --repeat 1 --dense-module [--peft-ties-svd]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import CACHE, PREFIX, ensure_adapters, loralego_command, measure

ROWS: dict[str, list[str]] = {
    "tsv": ["--method", "tsv"],
    "iso_c": ["--method", "iso_c"],
    "iso_cts": ["--method", "iso_cts"],
    "knots_ties": ["--method", "knots_ties"],
    "knots_dare": ["--method", "knots_dare"],
    "ties --space core": ["--method", "ties", "--space", "core"],
    "dare_linear --space core": ["--method", "dare_linear", "--space", "core"],
    "dare_ties --space core": ["--method", "dare_ties", "--space", "core"],
    "magnitude_prune --space core": ["--method", "magnitude_prune", "--space", "core"],
}


def dense_module(folders: list[Path], module: str, rank: int, peft_ties_svd: bool) -> None:
    """One module, in process: dense TIES (today's default) against core-space TIES; seconds and agreement."""
    import torch

    import loralego
    from loralego.corespace import core_space, truncate_core
    from loralego.densesvd import truncate_dense
    from loralego.taskmath import ties

    adapters = [loralego.load(f) for f in folders]
    name = next(m for m in adapters[0].modules if m.endswith(module))
    factors = [a.folded(name) for a in adapters]
    t0 = time.perf_counter()
    dense = ties((b @ a for a, b in factors), 0.2)
    truncate_dense(dense, rank)
    dense_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    space = core_space(factors)
    cut = truncate_core(space, ties(space.cores, 0.2), rank)
    core_seconds = time.perf_counter() - t0
    print(f"module {name} ({tuple(dense.shape)}): dense ties {dense_seconds:.2f} s, core ties {core_seconds:.3f} s "
          f"(ratio {dense_seconds / core_seconds:.0f}x); kept energy core {cut.kept_energy:.3f}; "
          f"threads {torch.get_num_threads()}", flush=True)
    if peft_ties_svd:
        peft_seconds = _peft_ties_svd_seconds(factors, rank)
        print(f"module {name}: PEFT ties_svd (merge_utils.ties at weights 1, density 0.2, then torch.linalg.svd, "
              f"full_matrices=True, as add_weighted_adapter runs it per module) {peft_seconds:.2f} s; "
              f"dense ties / PEFT {dense_seconds / peft_seconds:.2f}, core ties / PEFT "
              f"{core_seconds / peft_seconds:.4f}", flush=True)


def _peft_ties_svd_seconds(factors: list, rank: int) -> float:
    """What PEFT's ``add_weighted_adapter(combination_type="ties_svd")`` computes for one module, called through
    PEFT's own functions: the dense deltas, ``merge_utils.ties``, then a full ``torch.linalg.svd`` cut to rank."""
    import torch
    from peft.utils.merge_utils import ties as peft_ties

    t0 = time.perf_counter()
    deltas = [b @ a for a, b in factors]
    merged = peft_ties(deltas, torch.ones(len(deltas)), 0.2, "total")
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    _ = (u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(ROWS))
    parser.add_argument("--dense-module", action="store_true")
    parser.add_argument("--peft-ties-svd", action="store_true", help="with --dense-module: PEFT's ties_svd too")
    parser.add_argument("--root", type=Path, default=CACHE)
    opts = parser.parse_args()
    folders = ensure_adapters(8, opts.n, opts.root)
    assert PREFIX  # the generator's module names (speed.py)
    out = opts.root / "out" / "core"
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    floors, seconds = [], {name: [] for name in opts.methods}
    me = [sys.executable, str(Path(__file__).resolve().parent / "speed.py")]
    for _ in range(opts.repeat):
        for name in opts.methods:
            floor = measure([*me, "_floor", *map(str, folders)], cold=False)
            floors.append(floor["seconds"])
            command = loralego_command(folders, out, "svd", opts.k, "cpu")
            command = command[: command.index("--method")] + command[command.index("--method") + 2:] + ROWS[name]
            run = measure(command, cold=False)
            seconds[name].append((run["seconds"], floor["seconds"]))
            print(f"{name:30s} {run['seconds']:7.2f} s  floor {floor['seconds']:6.2f} s  "
                  f"ratio {run['seconds'] / floor['seconds']:5.2f}  rss {run['rss_mb']:6.0f} MB  "
                  f"load {run['load']:.1f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print("median ratios to the floor of the same round:")
    for name, pairs in seconds.items():
        print(f"  {name:30s} {statistics.median(s / f for s, f in pairs):5.2f}")
    if opts.dense_module:
        dense_module(folders, "layers.0.self_attn.q_proj", opts.k, opts.peft_ties_svd)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)


if __name__ == "__main__":
    main()
