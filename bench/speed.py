"""Speed and peak memory of ``loralego merge`` on Llama-2-7B-shaped adapters, against the I/O floor and PEFT.

Adapters shaped like Llama-2-7B LoRAs (32 layers; q, k, v, o 4096 x 4096; gate, up 4096 -> 11008; down
11008 -> 4096: 224 modules; bf16; PEFT folders) are generated under ``.cache/bench/`` (reused when present).
For each n, every measurement is a whole subprocess (interpreter start and imports included), timed by
wall clock, with its peak RSS taken from ``os.wait4``:

- ``floor``: safe_open each input and read every tensor once (the I/O floor);
- ``floor+write``: the same, then write all the tensors' bytes to one file and fsync it (the I/O floor of an
  output as large as the inputs: cat's);
- ``lego`` / ``svd`` / ...: ``loralego merge --method NAME --rank K`` (``MERGE_RUNS``: also lego+,
  task_arithmetic, the core-space methods and ``ties_core``, ties with ``--space core``); ``cat``: ``loralego merge
  --method cat``;
- ``peft``: PEFT's ``add_weighted_adapter`` (svd, cat, linear) on a skeleton holding only a few of the
  modules (a 7B skeleton does not fit in memory); it reports seconds per module of each shape, which are
  extrapolated to the 224 modules (labelled as such) and compared with lora-lego per module.

Usage (from the repository root, venv active):
    python bench/speed.py --n 2 8                     # quick
    python bench/speed.py --n 2 8 48 100 --cache both # the full table (cold runs drop the page cache)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
LAYERS = 32
# module -> (d_in, d_out) of Llama-2-7B
SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 11008),
    "mlp.up_proj": (4096, 11008),
    "mlp.down_proj": (11008, 4096),
}
# A smaller shape for the scaling sweep (n up to 300): 16 layers at 2048 hidden, 5632 intermediate.
SMALL_SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (2048, 2048),
    "self_attn.v_proj": (2048, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (2048, 5632),
    "mlp.up_proj": (2048, 5632),
    "mlp.down_proj": (5632, 2048),
}
SHAPE_SETS = {"llama7b": (32, SHAPES), "small": (16, SMALL_SHAPES)}
MODULES = LAYERS * len(SHAPES)


def use_shape(name: str) -> None:
    """Switch the generated adapters' shape (module globals: every helper reads LAYERS, SHAPES, MODULES)."""
    global LAYERS, SHAPES, MODULES
    LAYERS, SHAPES = SHAPE_SETS[name]
    MODULES = LAYERS * len(SHAPES)


BASE_MODEL = "meta-llama/Llama-2-7b-hf"
PREFIX = "base_model.model.model.layers"
PEFT_COMBINATIONS = ("svd", "cat", "linear")
# Run name -> (loralego method, extra flags); every one but cat gets --rank K.
MERGE_RUNS: dict[str, tuple[str, list[str]]] = {
    "lego": ("lego", []),
    "lego+": ("lego+", []),
    "svd": ("svd", []),
    "cat": ("cat", []),
    "task_arithmetic": ("task_arithmetic", []),
    "tsv": ("tsv", []),
    "iso_c": ("iso_c", []),
    "iso_cts": ("iso_cts", []),
    "knots_ties": ("knots_ties", []),
    "ties_core": ("ties", ["--space", "core"]),
}


# ---------------------------------------------------------------------------------------------- inputs


def adapter_bytes(rank: int) -> int:
    return LAYERS * sum(rank * (d_in + d_out) for d_in, d_out in SHAPES.values()) * 2


def generate_adapter(folder: Path, rank: int, seed: int) -> None:
    """One bf16 PEFT folder with random factors (A ~ N(0, 1/d_in) as at init, B small as after training).

    Written to a temporary folder and renamed, so an interrupted generation is never reused.
    """
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, (d_in, d_out) in SHAPES.items():
            key = f"{PREFIX}.{layer}.{module}"
            a = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in)
            b = torch.randn(d_out, rank, generator=generator) * 0.01
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": BASE_MODEL,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in SHAPES}),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(folder)


def ensure_adapters(rank: int, n: int, root: Path) -> list[Path]:
    """The first n rank-``rank`` adapters, generating the missing ones (after checking the free disk)."""
    shape = next(name for name, (layers, shapes) in SHAPE_SETS.items() if shapes is SHAPES)
    folders = [root / f"{shape}-r{rank}" / f"adapter{i:03d}" for i in range(n)]
    missing = [f for f in folders if not (f / "adapter_config.json").exists()]
    if missing:
        need = len(missing) * adapter_bytes(rank)
        free = shutil.disk_usage(root.parent if not root.exists() else root).free
        if need > free - (8 << 30):
            sys.exit(
                f"speed.py: generating {len(missing)} adapters needs {need / 2**30:.1f} GiB; "
                f"only {free / 2**30:.1f} GiB free"
            )
        print(f"generating {len(missing)} rank-{rank} adapters ({need / 2**30:.1f} GiB) under {root}", flush=True)
        for i, folder in enumerate(folders):
            if folder in missing:
                generate_adapter(folder, rank, seed=1000 * rank + i)
    return folders


# ---------------------------------------------------------------------------------------------- children


def child_floor(folders: list[str]) -> None:
    """The I/O floor: open each input with safetensors and read every tensor once."""
    import torch
    from safetensors import safe_open

    total = 0
    for folder in folders:
        with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    print(json.dumps({"bytes": total, "torch": torch.__version__}))


def child_write_floor(args: list[str]) -> None:
    """The I/O floor of an output as large as the inputs (cat's): read every tensor once, write them all to one
    file, fsync it (as loralego's writers do) and remove it."""
    import torch
    from safetensors import safe_open

    target, folders = Path(args[0]), args[1:]
    total = 0
    with open(target, "wb") as out:
        for folder in folders:
            with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = handle.get_tensor(key)
                    out.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
                    total += tensor.numel() * tensor.element_size()
        out.flush()
        os.fsync(out.fileno())
    target.unlink()
    print(json.dumps({"bytes": total, "torch": torch.__version__}))


def child_peft(args: list[str]) -> None:
    """PEFT's add_weighted_adapter on a skeleton holding a few of the modules; prints seconds per module."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--modules", nargs="+", required=True)
    parser.add_argument("--combinations", nargs="+", default=list(PEFT_COMBINATIONS))
    parser.add_argument("--svd-rank", type=int, default=16)
    parser.add_argument("--compare", help="a loralego svd output folder to compare the svd result with")
    parser.add_argument("folders", nargs="+")
    opts = parser.parse_args(args)

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    configs = [json.loads((Path(f) / "adapter_config.json").read_text()) for f in opts.folders]
    names = [f"a{i}" for i in range(len(opts.folders))]
    result: dict[str, Any] = {"seconds": {}, "svd_vs_loralego": {}, "threads": torch.get_num_threads()}
    # One skeleton per module, so that each shape gets its own per-module seconds.
    for module in opts.modules:
        parent, child = module.split(".")
        d_in, d_out = SHAPES[module]
        skeleton = torch.nn.Module()
        skeleton.model = torch.nn.Module()
        skeleton.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        setattr(skeleton.model.layers[0], parent, torch.nn.Module())
        # Base weights are never touched by add_weighted_adapter: bf16 and uninitialised.
        linear = torch.nn.utils.skip_init(torch.nn.Linear, d_in, d_out, bias=False, dtype=torch.bfloat16)
        setattr(getattr(skeleton.model.layers[0], parent), child, linear)

        def lora_config(config: dict[str, Any], child: str = child) -> LoraConfig:
            return LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=[child], lora_dropout=0.0)

        model = get_peft_model(skeleton, lora_config(configs[0]), adapter_name=names[0])
        for name, config in zip(names[1:], configs[1:], strict=True):
            model.add_adapter(name, lora_config(config))
        lora = getattr(getattr(model.base_model.model.model.layers[0], parent), child)
        with torch.no_grad():
            for name, folder in zip(names, opts.folders, strict=True):
                with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as handle:
                    lora.lora_A[name].weight.copy_(handle.get_tensor(f"{PREFIX}.0.{module}.lora_A.weight"))
                    lora.lora_B[name].weight.copy_(handle.get_tensor(f"{PREFIX}.0.{module}.lora_B.weight"))
        for combination in opts.combinations:
            if combination == "linear" and len({c["r"] for c in configs}) > 1:
                continue  # PEFT's linear needs equal ranks
            start = time.perf_counter()
            model.add_weighted_adapter(
                names, [1.0] * len(names), f"m_{combination}", combination_type=combination, svd_rank=opts.svd_rank
            )
            result["seconds"].setdefault(combination, {})[module] = time.perf_counter() - start
            if combination == "svd" and opts.compare:
                result["svd_vs_loralego"][module] = _compare_svd(lora, module, opts.compare)
            model.delete_adapter(f"m_{combination}")
        del model, skeleton, lora
    print(json.dumps(result))


def _compare_svd(lora: Any, module: str, folder: str) -> float:
    """Relative Frobenius distance between PEFT's svd update of layer 0's module and lora-lego's."""
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as handle:
        ours_a = handle.get_tensor(f"{PREFIX}.0.{module}.lora_A.weight").double()
        ours_b = handle.get_tensor(f"{PREFIX}.0.{module}.lora_B.weight").double()
    with torch.no_grad():
        peft = lora.lora_B["m_svd"].weight.double() @ lora.lora_A["m_svd"].weight.double()
        peft = peft * lora.scaling["m_svd"]
    return float((ours_b @ ours_a - peft).norm() / peft.norm())


# ---------------------------------------------------------------------------------------------- driver


def drop_caches() -> None:
    """Empty the kernel's page cache (root only) so the next run reads its inputs from disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as error:
        sys.exit(f"speed.py: --cache cold needs to drop the page cache (Linux, root): {error}")


def child_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running child has used so far, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    command: list[str], *, cold: bool, env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run a command as a subprocess: wall and CPU seconds and its own peak RSS (from os.wait4, so it is this
    child's maximum, not the maximum over all children). Past ``timeout`` seconds of CPU (not wall: on a shared
    machine a niced child's wall time is mostly waiting) the child is killed and the result says ``timed_out``."""
    if cold:
        drop_caches()
    child_env = os.environ | (env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, env=child_env)
        timed_out = False
        while True:  # poll with wait4 (not Popen.wait), so that the child's own rusage comes back
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and child_cpu_seconds(process.pid) > timeout:
                process.kill()  # this script's own child
                _, status, usage = os.wait4(process.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 and not timed_out:
        sys.exit(f"speed.py: {' '.join(command)} failed ({process.returncode}):\n{stderr.decode()[-2000:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "stdout": stdout.decode(),
        "load": os.getloadavg()[0],
        "timed_out": timed_out,
    }


def loralego_command(folders: list[Path], out: Path, method: str, rank: int | None, device: str) -> list[str]:
    script = Path(sys.executable).parent / "loralego"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "loralego.cli"]
    command = [*head, "merge", *map(str, folders), "--out", str(out), "--method", method, "--force", "--quiet"]
    command += ["--device", device]
    return command + (["--rank", str(rank)] if rank is not None else [])


def run_n(n: int, folders: list[Path], opts: argparse.Namespace, cold: bool) -> dict[str, Any]:
    """All measurements of one n under one cache state; the median of ``--repeat`` runs of each."""
    rows: dict[str, Any] = {}
    out_root = opts.root / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    commands = {
        "floor": [*me, "_floor", *map(str, folders)],
        "floor+write": [*me, "_write_floor", str(out_root / "write_floor.bin"), *map(str, folders)],
    }
    for name in opts.methods:
        if name in MERGE_RUNS:
            method, extra = MERGE_RUNS[name]
            rank = None if method == "cat" else opts.k
            commands[name] = loralego_command(folders, out_root / name, method, rank, opts.device) + extra
    commands = {name: command for name, command in commands.items() if name in opts.methods}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for _ in range(opts.repeat):  # interleaved, so a burst of load on the shared machine hits every row alike
        for name, command in commands.items():
            run = measure(command, cold=cold, env=opts.env, timeout=opts.timeout)
            runs[name].append(run)
            print(
                f"  n={n:<3} {'cold' if cold else 'warm'} {name:<6} {run['seconds']:8.2f} s wall "
                f"{run['cpu_seconds']:8.2f} s cpu {run['rss_mb']:8.0f} MB peak RSS  (load {run['load']:.1f})"
                + ("  TIMED OUT, killed" if run["timed_out"] else ""),
                flush=True,
            )
            if name != "svd":  # svd's output is kept for the comparison with PEFT's
                shutil.rmtree(out_root / name, ignore_errors=True)
    for name, measured in runs.items():
        rows[name] = {
            "seconds": statistics.median(r["seconds"] for r in measured),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in measured),
            "rss_mb": max(r["rss_mb"] for r in measured),
            "runs": [round(r["seconds"], 2) for r in measured],
            "load": [round(r["load"], 1) for r in measured],
            "timed_out": any(r["timed_out"] for r in measured),
        }
    if "peft" in opts.methods and not cold:
        combinations = [c for c in PEFT_COMBINATIONS if c != "svd" or n in opts.peft_svd_n]
        command = [*me, "_peft", "--modules", *opts.peft_modules, "--svd-rank", str(opts.k)]
        command += ["--combinations", *combinations]
        if (out_root / "svd").exists():
            command += ["--compare", str(out_root / "svd")]
        run = measure([*command, "--", *map(str, folders)], cold=False, env=opts.env)
        rows["peft"] = json.loads(run["stdout"].strip().splitlines()[-1]) | {
            "process_seconds": run["seconds"],
            "rss_mb": run["rss_mb"],
        }
        print(
            f"  n={n:<3} peft   seconds {rows['peft']['seconds']}  "
            f"svd distance to loralego {rows['peft'].get('svd_vs_loralego')}",
            flush=True,
        )
    shutil.rmtree(out_root / "svd", ignore_errors=True)
    return rows


def peft_full_model(per_module: dict[str, float], modules: list[str]) -> float:
    """Extrapolate PEFT's per-module seconds to all 224 modules, by shape (a missing shape uses its transpose)."""
    by_shape: dict[tuple[int, int], float] = {}
    for module in modules:
        by_shape[SHAPES[module]] = per_module[module]
    total = 0.0
    for shape in SHAPES.values():
        seconds = by_shape.get(shape, by_shape.get(shape[::-1]))
        if seconds is None:
            return math.nan
        total += LAYERS * seconds
    return total


def table(results: dict[str, Any], opts: argparse.Namespace) -> str:
    """Markdown table: wall seconds, peak RSS, ratio to the floor, and PEFT per module (extrapolated to 224)."""
    lines = [
        "| n | cache | run | wall s | cpu s | peak RSS MB | /floor | s per module | PEFT s per module* | PEFT / this |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in results.items():
        n, cache = key.split("/")
        floor = rows.get("floor", {}).get("seconds")
        peft = rows.get("peft", {}).get("mean_per_module", {})
        for name in ("floor", "floor+write", *MERGE_RUNS):
            if name not in rows:
                continue
            row = rows[name]
            per_module = row["seconds"] / MODULES
            cells = [
                n,
                cache,
                name,
                (">" if row.get("timed_out") else "") + f"{row['seconds']:.2f}",
                f"{row['cpu_seconds']:.2f}",
                f"{row['rss_mb']:.0f}",
                f"{row['seconds'] / floor:.2f}" if floor else "",
                "" if name == "floor" else f"{per_module:.4f}",
            ]
            if name in peft:  # lego has no PEFT counterpart
                cells += [f"{peft[name]:.4g}", f"{peft[name] / per_module:.0f}x"]
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        if "peft" in rows:
            seconds = rows["peft"]["seconds"]
            measured = "; ".join(
                f"{c}: " + ", ".join(f"{m.split('.')[1]} {t:.3g} s" for m, t in seconds[c].items()) for c in seconds
            )
            rss = rows["peft"]["rss_mb"]
            lines.append(f"| {n} | warm | PEFT measured per module | | | {rss:.0f} | | | {measured} | |")
    lines.append("")
    lines.append(
        "*PEFT s per module: add_weighted_adapter timed on one module of each shape "
        f"({', '.join(opts.peft_modules)}), extrapolated to the 224 modules by shape (a missing shape "
        "takes its transpose's time) and divided by 224; it excludes loading the adapters into PEFT."
    )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        return child_floor(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_write_floor":
        return child_write_floor(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_peft":
        return child_peft(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 8, 48, 100], help="numbers of adapters merged")
    parser.add_argument("--input-rank", type=int, default=8, help="rank of the generated adapters (8 or 16)")
    parser.add_argument("--k", type=int, default=16, help="output rank of lego and svd")
    parser.add_argument("--methods", nargs="+", default=["floor", "lego", "svd", "cat", "peft"])
    parser.add_argument("--cache", choices=["warm", "cold", "both"], default="warm")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (the median is reported)")
    parser.add_argument("--device", default="auto", help="loralego --device")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every child (default: unset, torch's default)")
    parser.add_argument("--peft-modules", nargs="+", default=["self_attn.q_proj", "mlp.gate_proj"])
    parser.add_argument(
        "--peft-svd-n",
        type=int,
        nargs="*",
        default=None,
        help="n values at which PEFT's svd runs (2-4 minutes per module here, hardly depending on n); default all",
    )
    parser.add_argument("--root", type=Path, default=CACHE)
    parser.add_argument("--shape", choices=sorted(SHAPE_SETS), default="llama7b", help="adapters' shape")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--timeout", type=float, help="kill a run past this many CPU seconds (reported as timed out)")
    opts = parser.parse_args()
    use_shape(opts.shape)
    opts.env = {"OMP_NUM_THREADS": str(opts.threads)} if opts.threads else {}
    if opts.peft_svd_n is None:
        opts.peft_svd_n = opts.n
    opts.root.mkdir(parents=True, exist_ok=True)
    folders = ensure_adapters(opts.input_rank, max(opts.n), opts.root)
    caches = ["warm", "cold"] if opts.cache == "both" else [opts.cache]
    print(
        f"machine: {os.cpu_count()} CPUs, {os.uname().machine}; python {sys.version.split()[0]}; "
        f"shape {opts.shape} ({MODULES} modules); inputs rank {opts.input_rank}, "
        f"{adapter_bytes(opts.input_rank) / 2**20:.0f} MiB each (bf16); load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, Any] = {}
    for n in sorted(opts.n):
        for cache in caches:
            if cache == "warm":  # bring this n's inputs into the page cache first (not measured)
                measure([sys.executable, str(Path(__file__).resolve()), "_floor", *map(str, folders[:n])], cold=False)
            rows = run_n(n, folders[:n], opts, cold=cache == "cold")
            if "peft" in rows:
                rows["peft"]["mean_per_module"] = {
                    c: peft_full_model(t, opts.peft_modules) / MODULES for c, t in rows["peft"]["seconds"].items()
                }
            results[f"{n}/{cache}"] = rows
    print()
    print(table(results, opts))
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
