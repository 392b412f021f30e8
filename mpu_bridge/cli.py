"""The ``mpu-bridge`` command (also ``python -m mpu_bridge``).

``mpu-bridge plan`` is a dry run of the rank layout at any world size: no
processes, no torch (this module imports only the pure layout modules). Its time
and memory are bounded by what it prints, not by the world: groups are described
by their geometry and long listings are cut (and say so), so it answers in a
fraction of a second at 2**24 or 2**62 ranks::

    mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 --rank 13 --hpz 4
    mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 \\
        --format svg --color-by ep --output plan.svg
    mpu-bridge plan --world-size 16 --tp 2 --gtp-remat 2 --budget --megatron 0.19
    mpu-bridge plan --world-size 64 --module encoder:ranks=8 --module llm:tp=4,pp=2 --budget --rank 9

Invalid sizes print ``mpu-bridge: error: <message>`` on stderr and exit with
status 2, as do usage errors.

Adding a subcommand: write ``_add_<name>_arguments(parser)`` and
``_run_<name>(args) -> int`` and append a :class:`Subcommand` to the tuple
returned by :func:`subcommands`. A subcommand that needs torch must import it
inside its ``run`` function, never at module level here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from . import __version__
from .budget import DEFAULT_COMM_MB, MEGATRON_LINES, budget
from .errors import BridgeError
from .layout import DEFAULT_ORDER, KINDS, Layout, plan
from .module_plan import modules_report, render_modules_text
from .planrows import PlanRow, all_to_all_rows, hpz_row
from .render import (
    MAX_LISTED_GROUPS,
    MAX_LISTED_MEMBERS,
    MAX_LISTED_RANKS,
    default_color_kind,
    render_json,
    render_svg,
    render_text,
)
from .spans import parse_modules
from .validate import arg_positive_int

__all__ = ["Subcommand", "build_parser", "main", "subcommands"]

_PROG = "mpu-bridge"
_ALL = "all"

#: Groups listed per kind when ``--max-groups`` is not given.
_TEXT_MAX_GROUPS = 4
_JSON_MAX_GROUPS = 8
_SVG_COVER_GROUPS = 8

#: The kinds ``--color-by`` offers: every kind but the all-gather twins (their ranks are dp-cp's / edp's).
_COLOR_KINDS = tuple(name for name, kind in KINDS.items() if kind.twin_of is None)


@dataclass(frozen=True)
class Subcommand:
    """One ``mpu-bridge <name>`` subcommand: how to declare its arguments and how to run it.

    ``run`` gets the parsed arguments and returns the exit status; a
    :class:`~mpu_bridge.errors.BridgeError` it raises becomes ``mpu-bridge: error: ...``
    and status 2.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- plan ------------------------------------------------------------------------


def _max_groups(text: str) -> object:
    """``--max-groups``: a positive integer or ``all``."""
    if text.strip().lower() == _ALL:
        return _ALL
    try:
        return arg_positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    _add_size_arguments(parser)
    _add_output_arguments(parser)
    _add_budget_arguments(parser)


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--world-size", type=int, required=True, metavar="N", help="number of ranks (GPUs)")
    sizes.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size (default 1)")
    sizes.add_argument("--pp", type=int, default=1, metavar="N", help="pipeline-parallel size (default 1)")
    sizes.add_argument("--cp", type=int, default=1, metavar="N", help="context-parallel size (default 1)")
    sizes.add_argument("--ep", type=int, default=1, metavar="N", help="expert-parallel size (default 1)")
    sizes.add_argument(
        "--etp", type=int, default=None, metavar="N", help="expert tensor-parallel size (default: tp)"
    )
    sizes.add_argument(
        "--gtp-remat",
        type=int,
        default=1,
        metavar="N",
        help="megatron-core 0.19 generalized tensor-parallel (weight remat) size: a model-parallel axis "
        "right after tp unless --order names gtp_remat; dp becomes the replicate degree (default 1)",
    )
    sizes.add_argument(
        "--expert-gtp-remat",
        type=int,
        default=1,
        metavar="N",
        help="the same for the expert grid, right after ep unless --order names gtp_remat (default 1)",
    )
    sizes.add_argument(
        "--order",
        default=DEFAULT_ORDER,
        help=f"Megatron order string, first token varying fastest (default {DEFAULT_ORDER})",
    )
    sizes.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        metavar="N",
        help="GPUs per node: shows which groups cross nodes, and the all-to-all groups",
    )
    sizes.add_argument(
        "--hpz",
        type=int,
        default=None,
        metavar="N",
        help="also show ZeRO++ hpZ groups: blocks of N ranks of each dp x cp group",
    )
    sizes.add_argument(
        "--module",
        action="append",
        default=None,
        metavar="NAME:SIZES",
        help="plan a multi-module layout instead, one rank span per module (megatron-core's rank_offset / "
        "local_world_size), e.g. --module encoder:ranks=8 --module llm:tp=4,pp=2; sizes tp, pp, cp, ep, etp; "
        "ranks=N the span's length (the last module may take the rest), offset=N its first rank (default: where "
        "the previous ended; equal offsets: colocated modules). Text and json; --budget per module and, with "
        "--rank, summed over that rank's modules",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        "--rank", type=int, default=None, metavar="R", help="also show this rank's group of every kind"
    )
    output.add_argument(
        "--format", choices=("text", "json", "svg"), default="text", help="output format (default text)"
    )
    output.add_argument(
        "--output", "-o", default=None, metavar="FILE", help="write to FILE instead of stdout"
    )
    output.add_argument(
        "--color-by",
        choices=_COLOR_KINDS,
        default=None,
        metavar="KIND",
        help="svg: the group kind that colours the cells (default: ep when ep > 1, else tp when "
        f"tp > 1, else the first of gtp, cp, pp, dp above 1); one of {', '.join(_COLOR_KINDS)}",
    )
    output.add_argument(
        "--max-groups",
        type=_max_groups,
        default=None,
        metavar="N|all",
        help=f"groups listed per kind (text: up to {_TEXT_MAX_GROUPS} that fit the line; "
        f"json: {_JSON_MAX_GROUPS}); svg: draw enough nodes to cover the first N groups of "
        f"--color-by (default {_SVG_COVER_GROUPS}). Output stays bounded: text lists at most "
        f"{MAX_LISTED_GROUPS} groups per kind, json at most {MAX_LISTED_MEMBERS} members per "
        f"group and {MAX_LISTED_RANKS} ranks per kind, svg at most 512 cells; what is cut is marked",
    )


def _add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("communicator budget")
    group.add_argument(
        "--budget",
        action="store_true",
        help="text/json: also count the process groups megatron-core's initialize_model_parallel "
        "creates on a rank (by kind; size-1, duplicate and gloo groups included) against the distinct "
        "rank sets the bridge needs, the new_group calls over the world, and the communicator memory "
        "per GPU (for --rank, default rank 0)",
    )
    group.add_argument(
        "--megatron",
        default=None,
        metavar="VERSION",
        help=f"the megatron-core release or line --budget models ({', '.join(MEGATRON_LINES)}; default: the "
        f"installed megatron-core, read without importing it, else {MEGATRON_LINES[-1]})",
    )
    group.add_argument(
        "--all-gather",
        action="store_true",
        help="with --budget: count the all-gather twins (megatron-core's create_all_gather_group(s): a "
        "communicator of their own over the dp-cp / edp ranks) on both sides; the one exception to "
        "one communicator per rank set",
    )
    group.add_argument(
        "--comm-mb",
        type=float,
        default=DEFAULT_COMM_MB,
        metavar="MIB",
        help=f"GPU memory per NCCL communicator in MiB for --budget (default {DEFAULT_COMM_MB}: NCCL "
        "issue #2363 reports 512 MiB even for a single-rank communicator on recent releases; NCCL #964 "
        "reports about 0.5-0.7 GB per communicator on A100)",
    )


def _budget(layout: Layout, args: argparse.Namespace) -> Optional[dict]:
    """The ``--budget`` report, or None without the flag."""
    if not args.budget:
        _budget_flags_need_budget(args)
        return None
    if args.format == "svg":
        raise BridgeError("--budget is shown in text and json output, not svg")
    if not 0 <= args.comm_mb < float("inf"):
        raise BridgeError(f"--comm-mb must be a finite number >= 0, got {args.comm_mb:g}")
    rank = 0 if args.rank is None else args.rank
    return budget(layout, rank, comm_mb=args.comm_mb, megatron=args.megatron, all_gather=args.all_gather)


def _extra_rows(layout: Layout, args: argparse.Namespace) -> Tuple[PlanRow, ...]:
    """The rows beyond the layout's kinds: hpZ with ``--hpz``, all-to-all with ``--gpus-per-node``."""
    rows: Tuple[PlanRow, ...] = ()
    if args.hpz is not None:
        rows += (hpz_row(layout, args.hpz),)
    if layout.config.gpus_per_node is not None:
        rows += all_to_all_rows(layout)
    return rows


def _render_plan(layout: Layout, args: argparse.Namespace) -> str:
    limit = args.max_groups
    extra = _extra_rows(layout, args)
    report = _budget(layout, args)
    if args.format == "json":
        max_groups = _JSON_MAX_GROUPS if limit is None else (None if limit == _ALL else limit)
        return render_json(layout, rank=args.rank, max_groups=max_groups, extra=extra, budget=report)
    if args.format == "svg":
        cover = _SVG_COVER_GROUPS if limit is None else (None if limit == _ALL else limit)
        color_by = args.color_by or default_color_kind(layout)
        return render_svg(layout, color_by=color_by, rank=args.rank, max_groups=cover)
    if limit is None:
        return render_text(layout, rank=args.rank, max_groups=_TEXT_MAX_GROUPS, extra=extra, budget=report)
    max_groups = None if limit == _ALL else limit
    return render_text(layout, rank=args.rank, max_groups=max_groups, fit_width=None, extra=extra, budget=report)


def _module_plan(args: argparse.Namespace) -> str:
    """``plan --module ...``: every module's plan (and budget), and the rank's sum."""
    plain = [flag for flag, value, default in (
        ("--tp", args.tp, 1), ("--pp", args.pp, 1), ("--cp", args.cp, 1), ("--ep", args.ep, 1),
        ("--etp", args.etp, None), ("--gtp-remat", args.gtp_remat, 1), ("--expert-gtp-remat", args.expert_gtp_remat, 1),
        ("--hpz", args.hpz, None), ("--color-by", args.color_by, None),
    ) if value != default]
    if plain:
        raise BridgeError(f"with --module, {', '.join(plain)} cannot be given: each module's sizes go in its spec "
                          "(e.g. --module llm:tp=4,pp=2)")
    if args.format == "svg":
        raise BridgeError("--module plans are shown in text and json output, not svg")
    modules = parse_modules(args.module)
    options = None
    if args.budget:
        if not 0 <= args.comm_mb < float("inf"):
            raise BridgeError(f"--comm-mb must be a finite number >= 0, got {args.comm_mb:g}")
        options = dict(comm_mb=args.comm_mb, megatron=args.megatron, all_gather=args.all_gather)
    else:
        _budget_flags_need_budget(args)
    limit = args.max_groups
    if args.format == "json":
        max_groups = _JSON_MAX_GROUPS if limit is None else (None if limit == _ALL else limit)
        report = modules_report(modules, args.world_size, rank=args.rank, order=args.order,
                                gpus_per_node=args.gpus_per_node, max_groups=max_groups, budget_options=options)
        return json.dumps(report, indent=1) + "\n"
    max_groups = _TEXT_MAX_GROUPS if limit is None else (None if limit == _ALL else limit)
    return render_modules_text(modules, args.world_size, rank=args.rank, order=args.order,
                               gpus_per_node=args.gpus_per_node, max_groups=max_groups,
                               fit_width=56 if limit is None else None, budget_options=options)


def _budget_flags_need_budget(args: argparse.Namespace) -> None:
    for flag, given in (("--all-gather", args.all_gather), ("--megatron", args.megatron is not None)):
        if given:
            raise BridgeError(f"{flag} applies to the communicator budget; add --budget")


def _run_plan(args: argparse.Namespace) -> int:
    if args.module:
        return _emit(_module_plan(args), args)
    layout = plan(
        args.world_size,
        tp=args.tp,
        pp=args.pp,
        cp=args.cp,
        ep=args.ep,
        etp=args.etp,
        order=args.order,
        gpus_per_node=args.gpus_per_node,
        gtp_remat=args.gtp_remat,
        expert_gtp_remat=args.expert_gtp_remat,
    )
    try:
        text = _render_plan(layout, args)  # all validation happens before anything is written
    except MemoryError:  # a safety net: rendering is bounded by its output, so this is a bug
        raise BridgeError(
            f"out of memory while rendering the plan of {layout.world_size} ranks; this is a bug "
            "(the planner's memory should not grow with the world): please report the command"
        ) from None
    return _emit(text, args)


def _emit(text: str, args: argparse.Namespace) -> int:
    """Write ``text`` to ``--output`` or stdout; 1 when the file cannot be written."""
    if args.output is None:
        _write_stdout(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
    except OSError as error:
        print(f"{_PROG}: error: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


# -- selfcheck -------------------------------------------------------------------


def _add_selfcheck_arguments(parser: argparse.ArgumentParser) -> None:
    from .selfcheck import add_arguments  # torch-free; torch is imported only when it runs

    add_arguments(parser)


def _run_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run

    return run(args)


# -- the registry and the entry point -------------------------------------------


def subcommands() -> Tuple[Subcommand, ...]:
    """Every subcommand, in the order ``--help`` lists them. Append new ones here."""
    return (
        Subcommand(
            "plan",
            "dry-run the process-group layout for given sizes (text table, JSON or SVG)",
            _add_plan_arguments,
            _run_plan,
        ),
        Subcommand(
            "selfcheck",
            "create every group on this machine's ranks (spawned, or under torchrun) and prove "
            "each one's membership with an all-reduce and a broadcast",
            _add_selfcheck_arguments,
            _run_selfcheck,
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``mpu-bridge`` argument parser, one subparser per :func:`subcommands` entry."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Process groups of Megatron-style training, derived from any MPU.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in subcommands():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _write_stdout(text: str) -> None:
    stream = sys.stdout
    try:
        stream.write(text)
    except UnicodeEncodeError:  # a terminal that cannot show '…' or '×'
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "replace").decode(encoding))
    stream.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``mpu-bridge`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    0 on success; 2 for usage errors and for sizes that cannot form a layout (the
    message goes to stderr as ``mpu-bridge: error: ...``, without a traceback).

    Example: ``main(["plan", "--world-size", "8", "--tp", "2"])`` prints the table, returns 0.
    """
    parser = build_parser()
    if argv is not None and (isinstance(argv, (str, bytes)) or not all(isinstance(a, str) for a in argv)):
        print(
            f"{_PROG}: error: arguments must be a list of strings such as ['plan', '--world-size', '8'], "
            f"got {argv!r}",
            file=sys.stderr,
        )
        return 2
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as stop:  # argparse: --help / --version (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        return args.run(args)
    except BridgeError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mpu-bridge plan ... | head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
