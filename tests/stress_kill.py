"""Merges killed at random moments (SIGINT, SIGTERM, SIGKILL): afterwards every output is absent or complete and
loadable, no input changed, and the next run into the same place leaves no temporary behind.

``python tests/stress_kill.py --kills 200 --jobs 4 --seed 0`` (used by tests/test_stress.py; bench runs use larger
counts). One driver process imports loralego and torch without running any tensor operation, then forks one child
per merge (fast: no new interpreter, no re-import) and kills it after a random delay drawn from the measured
duration of an unkilled merge, so kills land everywhere: while reading, merging, streaming, renaming.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
import time
from pathlib import Path

SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")
METHODS = (["--method", "cat"], ["--method", "lego", "--rank", "3"], ["--method", "dare_linear", "--rank", "3"])


def _hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_inputs(root: Path) -> list[Path]:
    """Two small diffusers-style files and two PEFT-layout folders (written without PEFT, in a child process)."""
    pid = os.fork()
    if pid == 0:  # tensors are made in a child so the driver never starts torch's thread pools before forking
        import json

        import torch
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(0)
        for index in range(2):
            folder = root / f"peft{index}"
            folder.mkdir(parents=True)
            tensors = {}
            for layer in range(6):
                name = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
                tensors[f"{name}.lora_A.weight"] = torch.randn(4, 64, generator=generator) * 0.2
                tensors[f"{name}.lora_B.weight"] = torch.randn(64, 4, generator=generator) * 0.2
            save_file(tensors, str(folder / "adapter_model.safetensors"))
            config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
            (folder / "adapter_config.json").write_text(json.dumps(config))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit("making the inputs failed")
    return [root / "peft0", root / "peft1"]


def _child(argv: list[str]) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from loralego.cli import main

    os._exit(main(argv))


def _check_output(out: Path, problems: list[str]) -> str:
    """``absent`` or ``complete``; a partial or unloadable output is a problem."""
    import loralego

    if not os.path.lexists(out):
        return "absent"
    try:
        adapter = loralego.load(out)
        for module in adapter.modules:
            lora_a, lora_b = adapter.stored(module)
            if lora_a.numel() == 0 or lora_b.numel() == 0:
                raise ValueError("empty factor")
        if len(adapter.modules) != 6:
            raise ValueError(f"{len(adapter.modules)} modules, expected 6")
    except Exception as error:
        problems.append(f"{out}: present but not a complete adapter ({error})")
    return "complete"


def run(kills: int, jobs: int, seed: int, root: Path) -> dict[str, int]:
    rng = random.Random(seed)
    import loralego.cli  # noqa: F401 - imported once here (no tensor work), inherited by every forked child

    inputs = _make_inputs(root / "in")
    before = {str(p): _hashes(p) for p in inputs}
    outs = [root / "out" / f"slot{i}" / "merged" for i in range(jobs)]  # one per concurrent merge

    # How long an unkilled merge takes, so delays cover its whole duration.
    probe = root / "probe" / "merged"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(["merge", *map(str, inputs), "--out", str(probe), "-q", *METHODS[1]])
    os.waitpid(pid, 0)
    duration = max(time.monotonic() - start, 0.05)
    print(f"an unkilled merge takes {duration:.2f} s", file=sys.stderr)

    counts = dict.fromkeys(SIGNALS, 0) | {"hangs": 0, "absent": 0, "complete": 0, "finished_before_kill": 0}
    running: dict[int, tuple[float, float, int | None]] = {}  # pid -> (started, kill at, signal or None once sent)
    slots: dict[int, int] = {}  # pid -> index of its output; checked as soon as it exits
    launched = 0
    problems: list[str] = []
    while launched < kills or running:
        while launched < kills and len(running) < jobs:
            slot = min(set(range(jobs)) - set(slots.values()))
            out = outs[slot]
            argv = ["merge", *map(str, inputs), "--out", str(out), "-q", "--force", *rng.choice(METHODS)]
            sig = int(getattr(signal, rng.choice(SIGNALS)))
            delay = rng.uniform(0, duration * 1.2)
            pid = os.fork()
            if pid == 0:
                _child(argv)
            now = time.monotonic()
            running[pid] = (now, now + delay, sig)
            slots[pid] = slot
            launched += 1
        now = time.monotonic()
        for pid, (started, kill_at, sig) in list(running.items()):
            if sig is not None and now >= kill_at:
                try:
                    os.kill(pid, sig)
                    counts[signal.Signals(sig).name] += 1
                except ProcessLookupError:
                    counts["finished_before_kill"] += 1
                running[pid] = (started, kill_at, None)
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                if running[pid][2] is not None:
                    counts["finished_before_kill"] += 1
                del running[pid]
                counts[_check_output(outs[slots.pop(pid)], problems)] += 1
            elif now - started > 60:
                counts["hangs"] += 1
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del running[pid]
                slots.pop(pid)
        time.sleep(0.002)

    # The next run into each place: it must succeed and sweep what SIGKILLed runs left.
    for out in outs:
        pid = os.fork()
        if pid == 0:
            _child(["merge", *map(str, inputs), "--out", str(out), "-q", "--force", *METHODS[0]])
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            problems.append(f"{out}: the next run failed (exit {os.waitstatus_to_exitcode(status)})")
        _check_output(out, problems)
    stray = [p for p in root.rglob(".loralego-tmp-*")]
    counts["stray_temporaries"] = len(stray)
    changed = [str(p) for p in inputs if _hashes(p) != before[str(p)]]
    counts["inputs_changed"] = len(changed)
    for item in stray[:5]:
        problems.append(f"stray temporary {item}")
    problems += [f"input changed: {item}" for item in changed]
    counts["problems"] = len(problems)
    for problem in problems[:10]:
        print("problem:", problem, file=sys.stderr)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    start = time.monotonic()
    counts = run(args.kills, args.jobs, args.seed, args.root)
    summary = ", ".join(f"{key} {value}" for key, value in counts.items())
    print(f"{args.kills} merges killed at random moments in {time.monotonic() - start:.1f} s: {summary}")
    return 1 if counts["problems"] or counts["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
