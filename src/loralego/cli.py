"""The ``loralego`` command. Merge flags are generated from :class:`MergeOptions` and the methods' declared
parameters, defined once there."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from . import __version__
from .adapters import load
from .diagnostics import check_json_path, format_report, verify, write_json
from .errors import LoraLegoError, one_line
from .fewshot_cli import add_parsers as add_fewshot_parsers
from .fewshot_cli import run_route, run_tune
from .methods import METHODS, get_method
from .options import COMMON_OPTIONS, MergeOptions, make_options
from .pipeline import write_merged
from .plan import MergePlan, plan_merge
from .progress import Progress, peak_rss_mb
from .recipe import RECIPE_FILE, load_recipe
from .safeio import Terminated

_ADAPTER_HELP = (
    "a PEFT adapter folder, a kohya or diffusers .safetensors LoRA file, or a Hugging Face model id already "
    "in the local hub cache (owner/name[@revision]; never downloaded)"
)
_OUT_HELP = (
    "output folder (PEFT) or .safetensors file (kohya, diffusers); written atomically. The format follows "
    "the inputs unless --format says otherwise"
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo, help_text: str) -> None:
    """One flag for one declared field: ``--no-x`` for switches that default on, ``--x`` for those off."""
    help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
    annotation = field.annotation
    if annotation is bool:
        flag, action = (_flag("no_" + name), "store_false") if field.default else (_flag(name), "store_true")
        parser.add_argument(flag, dest=name, action=action, default=None, help=help_text)
        return
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
    args = typing.get_args(annotation)
    literal = [a for a in args if typing.get_origin(a) is typing.Literal]  # Optional[Literal[...]]
    if literal:
        annotation, args = literal[0], typing.get_args(literal[0])
    if typing.get_origin(annotation) is typing.Literal:
        kwargs["choices"] = list(args)
    else:
        inner = [a for a in args if a is not type(None)] or [annotation]
        kwargs["type"] = inner[0]
    parser.add_argument(_flag(name), **kwargs)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per common option and per method parameter (each parameter once, naming its methods)."""
    for name in COMMON_OPTIONS:
        field = MergeOptions.model_fields[name]
        help_text = field.description or ""
        if name == "rank_overrides":  # a mapping, given as repeated PATTERN=K (parsed by MergeOptions)
            parser.add_argument(
                "--rank-override", dest=name, action="append", default=None, metavar="PATTERN=K", help=help_text
            )
        elif name == "weight_overrides":  # per input, given as repeated I:PATTERN=W (parsed by MergeOptions)
            parser.add_argument(
                "--weight-override", dest=name, action="append", default=None, metavar="I:PATTERN=W", help=help_text
            )
        elif name == "weights":
            parser.add_argument(_flag(name), dest=name, nargs="+", type=float, metavar="W", help=help_text)
        elif name == "method":
            parser.add_argument(_flag(name), dest=name, default=None, choices=sorted(METHODS), help=help_text)
        else:
            _add_field_flag(parser, name, field, f"{help_text} (default: {field.default})")
    group = parser.add_argument_group("method parameters", "each taken by the methods named; see `loralego methods M`")
    for name, (field, owners) in method_parameter_fields().items():
        defaults = {str(METHODS[m].params.model_fields[name].default) for m in owners}
        default = defaults.pop() if len(defaults) == 1 else "per method"
        _add_field_flag(group, name, field, f"{field.description} ({', '.join(owners)}; default: {default})")


def method_parameter_fields() -> dict[str, tuple[FieldInfo, list[str]]]:
    """Every declared method parameter, once, with the methods that take it (sorted by parameter name)."""
    fields: dict[str, tuple[FieldInfo, list[str]]] = {}
    for method_name, method in sorted(METHODS.items()):
        for name, field in method.params.model_fields.items():
            fields.setdefault(name, (field, []))[1].append(method_name)
    return dict(sorted(fields.items()))


def options_from_args(args: argparse.Namespace) -> MergeOptions:
    """The options the command line gave: unset flags are left to the defaults (of the chosen method)."""
    names = {*COMMON_OPTIONS, *method_parameter_fields()}
    given = {name: value for name, value in vars(args).items() if value is not None and name in names}
    return make_options(None, **given)


def describe_method(name: str) -> str:
    """``loralego methods NAME``: the method's summary and each of its parameters."""
    method = get_method(name)
    lines = [f"{method.name}: {method.summary}"]
    if method.average_by_default:
        lines.append("  weights: 1/n each unless --weights is given")
    lines.append("parameters:" if method.params.model_fields else "parameters: none")
    for field_name, field in method.params.model_fields.items():
        flag = _flag(field_name)
        if field.annotation is bool and field.default:
            flag = _flag("no_" + field_name)
        lines.append(f"  {flag:<20} {field.description} (default: {field.default})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralego", description="Merge LoRA adapters rank by rank.")
    parser.add_argument("--version", action="version", version=f"loralego {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge adapters into one")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER", help=_ADAPTER_HELP)
    merge.add_argument("--out", "-o", required=True, help=_OUT_HELP)
    merge.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    merge.add_argument("--report", metavar="FILE", help="also write a self-contained HTML report of the merge")
    merge.add_argument(
        "--verify", action="store_true", help="then compare the output with the exact weighted sum (as verify)"
    )
    add_option_flags(merge)

    run = commands.add_parser("run", help="run a merge recipe (YAML: inputs, output, options)")
    run.add_argument("recipe", metavar="RECIPE", help="recipe file (see `loralego.recipe`)")
    run.add_argument("--force", action="store_true", default=None, help="overwrite an existing output")
    run.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")

    report = commands.add_parser("report", help="HTML report of an existing merge against its inputs")
    report.add_argument("merged", metavar="MERGED", help="the merged adapter")
    report.add_argument("adapters", nargs="+", metavar="ADAPTER", help="the input adapters, in merge order")
    report.add_argument("--out", "-o", default="report.html", help="the HTML file (default: report.html)")
    report.add_argument("--force", action="store_true", help="overwrite an existing report")

    inspect = commands.add_parser("inspect", help="describe adapters")
    inspect.add_argument("adapters", nargs="+", metavar="ADAPTER", help=_ADAPTER_HELP)
    inspect.add_argument("--json", action="store_true", help="print JSON")

    methods = commands.add_parser("methods", help="list the merge methods, or describe one", add_help=False)
    methods.add_argument("name", nargs="?", metavar="METHOD", help="a method to describe, with its parameters")
    methods.add_argument("-h", "--help", action="store_true", help="describe METHOD (or list all)")

    verify = commands.add_parser("verify", help="how far a merged adapter is from the exact weighted sum")
    verify.add_argument("merged", metavar="MERGED", help="the merged adapter")
    verify.add_argument("adapters", nargs="+", metavar="ADAPTER", help="the input adapters")
    verify.add_argument(
        "--weights", nargs="+", type=float, metavar="W",
        help="one weight per input (default: the ones the merge recorded for these inputs, else 1)",
    )
    verify.add_argument("--json", metavar="FILE", help="also write every module's figures as JSON")
    verify.add_argument("--force", action="store_true", help="replace an existing JSON file")
    verify.add_argument("--top", type=int, default=10, help="modules shown, worst first; 0: all (default: 10)")
    add_fewshot_parsers(commands, _ADAPTER_HELP, add_option_flags)
    return parser


def _print_inspect(adapters: list[str], as_json: bool) -> None:
    summaries = [load(path).describe() for path in adapters]
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    for summary in summaries:
        # Names come from untrusted files: escape control characters (newlines, terminal escapes) as errors do.
        print(one_line(str(summary["path"])))
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
            print(f"  {key:<13}{one_line(str(value))}")


def execute_merge(
    inputs: Sequence[str],
    out: str | Path,
    options: MergeOptions,
    *,
    command: str,
    report: str | Path | None = None,
    recipe_text: str | None = None,
    quiet: bool = False,
) -> MergePlan:
    """Load, plan, merge, write (and report); print what was done unless ``quiet``. One code path for
    ``loralego merge`` and ``loralego run``: the same inputs and options give the same bytes either way."""
    started = time.perf_counter()
    adapters = [load(path, convert_to_lora=options.convert_to_lora) for path in inputs]
    if not quiet:
        for adapter in adapters:  # LoHa / LoKr modules converted to LoRA: what the truncation kept
            for module, energy in adapter.conversions.items():
                rank = adapter.modules[module].rank
                print(f"{adapter.name}: {module}: converted to LoRA rank {rank}, kept energy {energy:.6f}")
    plan = plan_merge(adapters, options)
    if report is not None:  # the report may not land on an input (or its weights) nor on the output
        from .report import check_report_path

        check_report_path(report, options.force, [a.path for a in plan.adapters if a.path is not None], out)
    collector = None
    if report is not None:
        from .report import ReportCollector

        collector = ReportCollector(plan)
    progress = None if quiet else Progress(len(plan.modules))
    callbacks = [c for c in (collector.on_module if collector is not None else None, progress) if c is not None]
    start = time.perf_counter()
    try:
        write_merged(
            plan,
            out,
            command=command,
            on_module=(lambda *module: [c(*module) for c in callbacks]) if callbacks else None,
            extra_files={RECIPE_FILE: recipe_text} if recipe_text is not None else None,
        )
    finally:  # end the progress line before any error or summary is printed
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - start
    for warning in plan.warnings:
        print(f"loralego: warning: {one_line(warning)}", file=sys.stderr)
    if collector is not None and report is not None:
        from .report import write_merge_report

        write_merge_report(report, collector, command=command, output=out, merge_seconds=seconds)
    if quiet:
        return plan
    rank = plan.rank if plan.rank is not None else "exact"
    print(
        f"merged {len(plan.adapters)} adapters with {plan.method.name} (rank {rank}) into {one_line(str(out))}: "
        f"{len(plan.modules)} modules in {time.perf_counter() - started:.2f} s (reading included), "
        f"peak memory {peak_rss_mb():.0f} MB"
    )
    if report is not None:
        print(f"report: {one_line(str(report))}")
    served = plan.output.served_rank
    if served is not None:
        padded = "" if plan.rank in (None, served) else f" (rank {plan.rank} padded with zero units to {served})"
        print(f"vLLM: serve with --enable-lora --max-lora-rank {served}{padded}")
    return plan


def run_merge(args: argparse.Namespace, argv: Sequence[str]) -> None:
    options = options_from_args(args)
    command = shlex.join(["loralego", *argv])
    plan = execute_merge(args.adapters, args.out, options, command=command, report=args.report, quiet=args.quiet)
    if args.verify:  # re-open what was written: the check covers the file, not the in-memory result
        print(format_report(verify(load(args.out), plan.adapters, plan.weights, plan.options.weight_overrides)))


def run_recipe(args: argparse.Namespace, argv: Sequence[str]) -> None:
    recipe = load_recipe(args.recipe)
    options = make_options(recipe.options, force=True) if args.force else recipe.options
    execute_merge(
        recipe.inputs,
        recipe.output,
        options,
        command=shlex.join(["loralego", *argv]),
        report=recipe.report,
        recipe_text=recipe.text,
        quiet=args.quiet,
    )


def run_report(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from .report import report_existing  # matplotlib and friends only when a report is asked for

    report_existing(args.merged, args.adapters, args.out, command=shlex.join(["loralego", *argv]), force=args.force)
    print(f"report: {one_line(str(args.out))}")


def run_verify(args: argparse.Namespace) -> None:
    merged = load(args.merged)
    adapters = [load(path) for path in args.adapters]
    if args.json:  # refuse before the work: the JSON may not land on the merged adapter or an input
        check_json_path(args.json, [a.path for a in (merged, *adapters) if a.path is not None], args.force)
    report = verify(merged, adapters, args.weights)
    print(format_report(report, args.top))
    if args.json:
        write_json(report, args.json, merged, adapters, force=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            run_merge(args, argv)
        elif args.command == "verify":
            run_verify(args)
        elif args.command == "run":
            run_recipe(args, argv)
        elif args.command == "report":
            run_report(args, argv)
        elif args.command == "tune":
            run_tune(args, argv)
        elif args.command == "route":
            run_route(args)
        elif args.command == "inspect":
            _print_inspect(args.adapters, args.json)
        elif args.command == "methods":
            if args.name:
                print(describe_method(args.name))
            else:
                for name, method in sorted(METHODS.items()):
                    print(f"{name:<16}{method.summary}")
        return 0
    except LoraLegoError as error:
        if args.debug:
            raise
        print(f"loralego: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except Terminated:
        print("loralego: terminated; nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("loralego: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure is still one line unless --debug
        if args.debug:
            raise
        text = one_line(" ".join(str(error).split()))
        text = text if len(text) <= 300 else text[:297] + "..."
        print(f"loralego: internal error: {type(error).__name__}: {text} (rerun with --debug)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
