"""Run the adapter fuzzer (tests/fuzzing.py) for many cases and print counts by outcome and by mutation.

    python bench/fuzz_report.py --cases 2000 --seed 1

Exits non-zero if any case ends in something other than a correct merge or a one-line LoraLegoError,
listing those cases (each is reproducible alone: ``--only INDEX`` with the same seed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzing import make_seed_adapters, run_case, run_fuzz, summary_line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cli-every", type=int, default=4, help="every N-th case runs through the CLI")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--only", type=int, default=None, help="run this one case and print it")
    parser.add_argument("--examples", action="store_true", help="print one refusal message per mutation kind")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loralego-fuzz-") as tmp:
        seeds = make_seed_adapters(Path(tmp) / "seeds")
        work = Path(tmp) / "work"
        work.mkdir()
        if args.only is not None:
            result = run_case(args.only, args.seed, seeds, work, cli_every=args.cli_every, timeout=args.timeout)
            print(result)
            return 0 if result.outcome in ("merged", "refused") else 1
        start = time.perf_counter()
        report = run_fuzz(args.cases, args.seed, seeds, work, cli_every=args.cli_every, timeout=args.timeout)
        seconds = time.perf_counter() - start

    print(f"seed {args.seed}, {summary_line(report)} in {seconds:.1f} s")
    print(
        f"cases through the CLI: {sum(r.via_cli for r in report.results)}, through the API: "
        f"{sum(not r.via_cli for r in report.results)}"
    )
    print()
    print(report.table())
    print()
    for label, attribute in (("victim", "victim"), ("method", "method")):
        counts = Counter((getattr(r, attribute), r.outcome) for r in report.results)
        names = sorted({name for name, _ in counts})
        print(
            f"by {label}: "
            + ", ".join(f"{name} {counts[name, 'merged']}/{counts[name, 'refused']}" for name in names)
            + "  (merged/refused)"
        )
    if args.examples:
        print()
        seen: set[str] = set()
        for r in report.results:
            if r.outcome == "refused" and r.kind not in seen:
                seen.add(r.kind)
                print(f"{r.kind:<18} {'; '.join(r.mutations)} -> {r.detail}")
    failures = report.failures()
    for r in failures:
        print(
            f"FAIL case {r.index} ({r.kind}: {'; '.join(r.mutations)}; {r.method} rank {r.rank}, "
            f"{'cli' if r.via_cli else 'api'}): {r.outcome}: {r.detail}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
