"""Hashes of merged outputs for a fixed set of merges, to prove a refactor changes no merged tensor.

  python bench/golden_outputs.py            # print each case's hash and compare with the recorded ones
  python bench/golden_outputs.py --record   # write tests/data/golden_outputs.json

A case's hash covers every written tensor (name, dtype, shape, bytes) and the PEFT config; the safetensors
metadata (the merge's own record of its options) is left out on purpose, since it describes the options.
tests/test_golden_outputs.py runs the same cases against the recorded file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "golden_outputs.json"
EXAMPLES = ROOT / "examples" / "adapters"
MIXED = ("task_a", "task_b", "task_c")  # ranks 4, 8, 16, lora_alpha != r
EQUAL = ("task_b", "task_b")  # equal ranks for the methods that need them

# name -> (inputs, merge options); the options are the flat keyword form of the Python API.
CASES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "cat": (MIXED, {"method": "cat"}),
    "cat_avg": (MIXED, {"method": "cat", "weights": [1 / 3, 1 / 3, 1 / 3]}),
    "task_arithmetic": (MIXED, {"method": "task_arithmetic"}),
    "task_arithmetic_k4": (MIXED, {"method": "task_arithmetic", "rank": 4}),
    "svd_k8": (MIXED, {"method": "svd", "rank": 8}),
    "linear": (EQUAL, {"method": "linear", "weights": [0.7, 0.3]}),
    "ties_k8": (MIXED, {"method": "ties", "rank": 8}),
    "ties_d05_freq": (MIXED, {"method": "ties", "rank": 6, "density": 0.5, "majority_sign": "frequency"}),
    "ties_factors": (EQUAL, {"method": "ties", "space": "factors", "weights": [1.0, -0.5]}),
    "dare_linear_k8": (MIXED, {"method": "dare_linear", "rank": 8, "seed": 3}),
    "dare_ties_k8": (MIXED, {"method": "dare_ties", "rank": 8, "density": 0.5}),
    "dare_ties_factors": (EQUAL, {"method": "dare_ties", "space": "factors", "seed": 1}),
    "magnitude_prune_k8": (MIXED, {"method": "magnitude_prune", "rank": 8}),
    "lego_default": (MIXED, {"method": "lego"}),
    "lego_k4_seed2": (MIXED, {"method": "lego", "rank": 4, "seed": 2}),
    "lego_knobs": (
        MIXED,
        {"method": "lego", "rank": 6, "n_init": 2, "max_iter": 5, "norm": "2", "r_ref": 2.0, "param_reweight": False},
    ),
    "lego_no_output": (MIXED, {"method": "lego", "rank": 8, "output_reweight": False}),
    "lego_energy": (MIXED, {"method": "lego", "rank": 12, "energy": 0.9}),
    "lego_overrides": (MIXED, {"method": "lego", "rank": 4, "rank_overrides": {"v_proj": 8}}),
    "lego_plus": (MIXED, {"method": "lego+", "rank": 8}),
    "lego_plus_weights": (MIXED, {"method": "lego+", "rank": 8, "weights": [1.0, 0.5, 2.0], "n_init": 2}),
    "lego_float16": (MIXED, {"method": "lego", "rank": 8, "dtype": "float16"}),
    "lego_vllm": (MIXED, {"method": "lego", "rank": 6, "target": "vllm"}),
    # Variants of the research sweep that lost (docs/results.md), kept reproducible.
    "x_dir_match_norm": (
        MIXED,
        {"method": "lego", "rank": 8, "gauge": "balanced", "cluster_on": "directions", "output_scale": "match_norm"},
    ),
    "x_rank1": (MIXED, {"method": "lego", "rank": 8, "representative": "rank1"}),
    "x_rank1_mean": (MIXED, {"method": "lego", "rank": 8, "representative": "rank1_mean", "gauge": "balanced"}),
    "x_ties": (MIXED, {"method": "lego", "rank": 8, "representative": "ties", "gauge": "balanced", "density": 0.3}),
    "x_balance": (MIXED, {"method": "lego", "rank": 8, "balance": True}),
    "x_plus_sqrt": (MIXED, {"method": "lego+", "rank": 8, "output_scale": "sqrt_rank"}),
    "svd_diffusers": (MIXED, {"method": "svd", "rank": 4, "format": "diffusers"}),
}


def output_hash(out: Path) -> str:
    """sha256 over the written tensors and the PEFT config (not the safetensors metadata)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    files = sorted(out.glob("*.safetensors")) if out.is_dir() else [out]
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in sorted(handle.keys()):
                tensor = handle.get_tensor(key).contiguous()
                digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    config = out / "adapter_config.json" if out.is_dir() else None
    if config is not None and config.exists():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    return digest.hexdigest()


def run_case(name: str, workdir: Path) -> str:
    import loralego
    from loralego.pipeline import merge_to_folder

    sys.path.insert(0, str(ROOT / "bench" / "quality"))
    from variants import route  # registers the experimental methods of the research sweep

    inputs, options = CASES[name]
    options = route(options)
    adapters = [loralego.load(EXAMPLES / item) for item in inputs]
    out = workdir / name
    if options.get("format") in ("kohya", "diffusers"):
        out = workdir / f"{name}.safetensors"
    merge_to_folder(adapters, out, command="golden", **options)
    return output_hash(out)


def all_hashes() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_case(name, Path(tmp)) for name in CASES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the hashes to tests/data/golden_outputs.json")
    args = parser.parse_args()
    hashes = all_hashes()
    if args.record:
        RECORD.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
        print(f"recorded {len(hashes)} cases in {RECORD.relative_to(ROOT)}")
        return 0
    recorded = json.loads(RECORD.read_text())
    changed = 0
    for name, value in hashes.items():
        same = recorded.get(name) == value
        changed += not same
        print(f"{name:<22} {value[:16]}  {'same' if same else 'CHANGED'}")
    print(f"{len(hashes) - changed} of {len(hashes)} cases unchanged")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
