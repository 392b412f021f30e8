"""The self-check's command line: its options, and running it from parsed arguments.

``mpu-bridge selfcheck`` (the :mod:`mpu_bridge.cli` command table declares it with
:func:`add_arguments` and runs :func:`run`) and ``python -m mpu_bridge.selfcheck``
(:func:`main`) are the same command. This module never imports :mod:`mpu_bridge.cli`.
No torch at import.

Example::

    main(["--nproc", "4", "--with-megatron", "--tp", "2", "--ep", "2"])   # -> 0 when every check passed
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from ..errors import BridgeError
from ..layout import DEFAULT_ORDER
from ..optional import quiet_missing_numpy, require
from ..spans import parse_modules
from ..validate import arg_positive_int, arg_seconds
from .config import DEFAULT_NPROC, DEFAULT_TIMEOUT_S, FAULTS, SelfCheckConfig, validate
from .rank import resolve_backend
from .report import format_report, write
from .runs import launched, run_launched, run_spawned

__all__ = ["DESCRIPTION", "PROG", "add_arguments", "config_from_args", "main", "run"]

PROG = "mpu-bridge selfcheck"
#: What ``--help`` says the command does (the same words as ``mpu-bridge --help``).
DESCRIPTION = (
    "create every group on this machine's ranks (spawned, or under torchrun) and prove "
    "each one's membership with an all-reduce and a broadcast"
)


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    launch = parser.add_argument_group("launch")
    launch.add_argument(
        "--nproc",
        type=arg_positive_int,
        default=None,
        metavar="N",
        help=f"local processes to spawn when no launcher (torchrun) started this one (default {DEFAULT_NPROC})",
    )
    launch.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="torch.distributed backend (default auto: nccl when CUDA has a GPU per local rank, else gloo)",
    )
    launch.add_argument(
        "--timeout",
        type=arg_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="hard limit for the whole run in seconds; ranks still running are killed (under a "
        "launcher, rank 0 then reports, naming each rank that did not report) "
        f"(default {DEFAULT_TIMEOUT_S:g})",
    )
    launch.add_argument(
        "--with-megatron",
        action="store_true",
        help="initialise megatron-core's parallel_state with these sizes and bridge over it "
        "(default: standalone, no MPU: attach(None, tp=..., pp=..., ...) with these sizes)",
    )
    launch.add_argument(
        "--exports",
        action="store_true",
        help="also prove the exports on every rank: every non-None field of "
        "bridge.process_group_collection() and every dim of bridge.device_mesh() (and, for "
        "each --ep size above 1, of the expert mesh) with the same all-reduce and broadcast "
        "(needs megatron-core >= 0.15)",
    )
    launch.add_argument(
        "--via-collection",
        action="store_true",
        help="check a trainer without parallel_state: the groups (standalone, or with "
        "--with-megatron megatron-core's) exported as megatron-core's ProcessGroupCollection "
        "by one bridge, and every check run over attach(collection) (needs megatron-core >= 0.15)",
    )
    launch.add_argument("--verbose", "-v", action="store_true", help="log the bridge's decisions on every rank")
    launch.add_argument("--inject-fault", choices=FAULTS, default=None, help=argparse.SUPPRESS)


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_argument_group("layout")
    for name, what in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context")):
        sizes.add_argument(
            f"--{name}", type=arg_positive_int, default=1, metavar="N", help=f"{what}-parallel size (default 1)"
        )
    sizes.add_argument(
        "--ep",
        type=arg_positive_int,
        nargs="+",
        action="extend",
        default=None,
        metavar="N",
        help="expert-parallel sizes to check, e.g. --ep 2 4 (default 1); with --with-megatron "
        "the first is megatron-core's expert_model_parallel_size",
    )
    sizes.add_argument(
        "--etp", type=arg_positive_int, default=None, metavar="N", help="expert tensor-parallel size (default: tp)"
    )
    sizes.add_argument("--order", default=DEFAULT_ORDER, help=f"Megatron order string (default {DEFAULT_ORDER})")
    gtp = (("gtp-remat", "generalized tensor-parallel"), ("expert-gtp-remat", "expert generalized tensor-parallel"))
    for name, what in gtp:
        sizes.add_argument(
            f"--{name}", type=arg_positive_int, default=1, metavar="N",
            help=f"{what} (GTP, megatron-core >= 0.19) size (default 1)",
        )
    sizes.add_argument(
        "--hpz", type=arg_positive_int, default=None, metavar="N", help="also check ZeRO++ hpZ groups of N ranks"
    )
    sizes.add_argument(
        "--module",
        action="append",
        default=None,
        metavar="NAME:SIZES",
        help="check a multi-module layout, one rank span per module in the order given, e.g. "
        "--module encoder:ranks=2 --module llm:tp=2,pp=2 (sizes tp, pp, cp, ep, etp; ranks=N its span's "
        "length, the last module takes the rest); every rank builds every module's bridge, each proves "
        "its own module's groups, and the others check that a module refuses them; with "
        "--via-collection over attach(multi-module collection, module=...) (megatron-core >= 0.17)",
    )
    sizes.add_argument(
        "--gpus-per-node",
        type=arg_positive_int,
        default=None,
        metavar="N",
        help="also check the node-local and cross-node all-to-all groups for N GPUs per node",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``selfcheck`` options on ``parser`` (used by ``mpu-bridge selfcheck``).

    Example: ``add_arguments(p); config_from_args(p.parse_args(["--ep", "2", "4"])).ep == (2, 4)``.
    """
    _add_launch_arguments(parser)
    _add_layout_arguments(parser)


def config_from_args(args: argparse.Namespace) -> SelfCheckConfig:
    """The :class:`SelfCheckConfig` of parsed ``selfcheck`` arguments (repeated ep sizes dropped).

    Example: ``--ep 2 2 4`` gives ``ep == (2, 4)``.
    """
    eps: List[int] = []
    for size in args.ep or [1]:
        if size not in eps:
            eps.append(size)
    return SelfCheckConfig(
        nproc=args.nproc,
        tp=args.tp,
        pp=args.pp,
        cp=args.cp,
        ep=tuple(eps),
        etp=args.etp,
        order=args.order,
        gtp_remat=args.gtp_remat,
        expert_gtp_remat=args.expert_gtp_remat,
        hpz=args.hpz,
        gpus_per_node=args.gpus_per_node,
        with_megatron=args.with_megatron,
        backend=args.backend,
        timeout=args.timeout,
        inject_fault=args.inject_fault,
        verbose=args.verbose,
        exports=args.exports,
        via_collection=args.via_collection,
        modules=parse_modules(args.module or ()),
    )


def run(args: argparse.Namespace) -> int:
    """Run the self-check for parsed arguments; returns the exit status (0 pass, 1 fail).

    Under a launcher this process is one rank (rank 0 prints the report, at ``--timeout``
    at the latest, naming a rank that never joined); otherwise it spawns ``--nproc``
    ranks, waits for them (never past ``--timeout``) and prints the report. Invalid options
    and missing dependencies raise :class:`~mpu_bridge.errors.BridgeError` before any
    rank starts (the command prints it and exits with status 2).

    Example: ``run(parser.parse_args(["--nproc", "2"]))`` -> 0.
    """
    config = config_from_args(args)
    quiet_missing_numpy()  # torch warns where numpy is absent; the self-check never uses numpy
    require("torch", package="torch", needed_for="mpu-bridge selfcheck")  # one line, exit 2: before any rank
    if config.with_megatron:
        require("megatron.core", package="megatron-core", extra="megatron", needed_for="--with-megatron")
    if config.exports or config.via_collection:  # one line, exit 2, before any rank: a ProcessGroupCollection
        require("megatron.core", package="megatron-core", extra="megatron",
                needed_for="--exports" if config.exports else "--via-collection")
        from ..pg_collection import collection_class

        collection_class()
        if config.modules:
            from ..multi_module import multi_collection_class

            multi_collection_class()
    if launched():
        return run_launched(config)
    start = time.monotonic()
    world_size = config.nproc or DEFAULT_NPROC
    validate(config, world_size)  # LayoutError: exit 2 before any process starts
    resolve_backend(config.backend, world_size)
    collected, missing = run_spawned(config, world_size)
    report, passed = format_report(
        config, world_size, collected, missing, time.monotonic() - start, launcher="spawned locally"
    )
    write(report)
    return 0 if passed else 1


def _silence_stdout() -> None:
    """After a broken pipe (``... | head``): send the rest of stdout nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mpu_bridge.selfcheck [options]``: the same as ``mpu-bridge selfcheck [options]``.

    Returns the exit status: 0 pass, 1 fail, 2 for usage errors and invalid options
    (``mpu-bridge: error: ...`` on stderr, no traceback).

    Example: ``main(["--nproc", "4", "--tp", "3", "--with-megatron"])`` -> 2.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        return run(args)
    except BridgeError as error:
        print(f"mpu-bridge: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 1
