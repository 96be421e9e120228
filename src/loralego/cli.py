"""The ``loralego`` command. Merge flags are generated from :class:`MergeOptions`, defined once there."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import typing
from collections.abc import Sequence
from typing import Any

from . import __version__
from .adapters import load
from .errors import LoraLegoError
from .methods import METHODS
from .options import MergeOptions, make_options
from .pipeline import merge_to_folder


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser, fields: Sequence[str] | None = None) -> None:
    """One flag per MergeOptions field: ``--no-x`` for switches that default on, ``--x`` for those off."""
    for name, field in MergeOptions.model_fields.items():
        if fields is not None and name not in fields:
            continue
        help_text = field.description or ""
        annotation = field.annotation
        if annotation is bool:
            if field.default:
                parser.add_argument(_flag("no_" + name), dest=name, action="store_false", default=None, help=help_text)
            else:
                parser.add_argument(_flag(name), dest=name, action="store_true", default=None, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": f"{help_text} (default: {field.default})"}
        args = typing.get_args(annotation)
        literal = [a for a in args if typing.get_origin(a) is typing.Literal]  # Optional[Literal[...]]
        if literal:
            annotation, args = literal[0], typing.get_args(literal[0])
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif name == "weights":
            kwargs.update(nargs="+", type=float, metavar="W")
        elif name == "method":
            kwargs["choices"] = sorted(METHODS)
        else:
            inner = [a for a in args if a is not type(None)] or [annotation]
            kwargs["type"] = inner[0]
        parser.add_argument(_flag(name), **kwargs)


def options_from_args(args: argparse.Namespace) -> MergeOptions:
    given = {name: getattr(args, name) for name in MergeOptions.model_fields if getattr(args, name, None) is not None}
    return make_options(None, **given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralego", description="Merge LoRA adapters rank by rank.")
    parser.add_argument("--version", action="version", version=f"loralego {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge adapters into one")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folders")
    merge.add_argument("--out", "-o", required=True, help="output folder (written atomically)")
    merge.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    add_option_flags(merge)

    inspect = commands.add_parser("inspect", help="describe adapters")
    inspect.add_argument("adapters", nargs="+", metavar="ADAPTER")
    inspect.add_argument("--json", action="store_true", help="print JSON")

    commands.add_parser("methods", help="list the merge methods")
    return parser


def _print_inspect(adapters: list[str], as_json: bool) -> None:
    summaries = [load(path).describe() for path in adapters]
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    for summary in summaries:
        print(f"{summary['path']}")
        for key in (
            "format",
            "base_model",
            "task_type",
            "modules",
            "module_kinds",
            "ranks",
            "scales",
            "use_rslora",
            "dtype",
            "parameters",
            "bytes",
        ):
            value = summary[key]
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            print(f"  {key:<13}{value}")


def run_merge(args: argparse.Namespace, argv: Sequence[str]) -> None:
    options = options_from_args(args)
    adapters = [load(path) for path in args.adapters]
    start = time.perf_counter()
    command = shlex.join(["loralego", *argv])
    plan = merge_to_folder(adapters, args.out, options, command=command)
    for warning in plan.warnings:
        print(f"loralego: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        seconds = time.perf_counter() - start
        rank = plan.rank if plan.rank is not None else "exact"
        print(
            f"merged {len(adapters)} adapters with {plan.method.name} (rank {rank}) into {args.out}: "
            f"{len(plan.modules)} modules in {seconds:.2f} s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            run_merge(args, argv)
        elif args.command == "inspect":
            _print_inspect(args.adapters, args.json)
        elif args.command == "methods":
            for name, method in sorted(METHODS.items()):
                print(f"{name:<16}{method.summary}")
        return 0
    except LoraLegoError as error:
        if args.debug:
            raise
        print(f"loralego: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralego: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure is still one line unless --debug
        if args.debug:
            raise
        text = _one_line(" ".join(str(error).split()))
        text = text if len(text) <= 300 else text[:297] + "..."
        print(f"loralego: internal error: {type(error).__name__}: {text} (rerun with --debug)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    """Errors quote names taken from untrusted files: escape newlines and control characters (terminal
    escape sequences included) so the message stays one harmless line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


if __name__ == "__main__":
    sys.exit(main())
