"""The layouts the integration suite runs, for any world size: one list, used everywhere.

Two pools, filtered by the planner (:func:`mpu_bridge.layout.plan`, no torch) so
every world size gets exactly the layouts that fit it:

* :data:`MEGATRON_POOL`: sizes for ``rank_checks.py megatron`` / ``standalone`` /
  ``nccl`` (``--layout`` specs such as ``tp=2,pp=2,ep=2``; ``standalone`` builds them
  with ``attach(None, tp=..., ...)``, no megatron-core);
* :data:`SELFCHECK_POOL`: argument lines for ``python -m mpu_bridge.selfcheck``.

The CPU part (``test_torchrun_suite.py``, 4 ranks on gloo) uses
:data:`CPU_MEGATRON_LAYOUTS` and :data:`CPU_SELFCHECK_ARGS` (and, with 4 GPUs,
:data:`STANDALONE_SELFCHECK_ARGS`); the nightly GPU job
(``run_nightly.sh``, 8 or 16 ranks on NCCL) asks this module on the command line::

    python integration_tests/nightly_layouts.py megatron 16
    python integration_tests/nightly_layouts.py selfcheck 16 --gpus-per-node 8

which prints one layout per line (``megatron``: the specs joined by spaces on a
single line, ready for ``--layout``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Dict, List, Optional, Sequence

from mpu_bridge.errors import LayoutError
from mpu_bridge.layout import DEFAULT_ORDER, plan

__all__ = [
    "CPU_EXTRA_EP",
    "CPU_MEGATRON_LAYOUTS",
    "CPU_SELFCHECK_ARGS",
    "EXTRA_EP",
    "STANDALONE_SELFCHECK_ARGS",
    "MEGATRON_POOL",
    "SELFCHECK_POOL",
    "megatron_layouts",
    "parse_spec",
    "selfcheck_layouts",
]

DATA_BEFORE_EXPERT = "tp-cp-dp-ep-pp"

#: megatron-core layouts, most informative first. Keys: tp pp cp ep etp order.
MEGATRON_POOL: Sequence[str] = (
    "tp=2,ep=2",
    "pp=2,ep=2",
    "cp=2",
    "tp=2,ep=2,etp=1",
    f"ep=2,order={DATA_BEFORE_EXPERT}",
    "tp=2,pp=2,ep=2",
    "tp=2,cp=2,ep=2",
    f"tp=2,ep=2,order={DATA_BEFORE_EXPERT}",
    "tp=4,pp=2,ep=2,etp=1",
    "tp=8",
    "tp=8,pp=2,ep=2,etp=1",
    "tp=4,cp=2,ep=4,etp=1",
    "tp=2,pp=4,ep=2",
)

#: Expert-parallel sizes checked on top of megatron-core's own, where the layout allows them.
EXTRA_EP: Sequence[int] = (2, 4, 8)

#: ``python -m mpu_bridge.selfcheck`` argument lines (``--gpus-per-node`` is added per run).
#: Lines with ``--exports`` also prove the ProcessGroupCollection and the DeviceMesh (on
#: cuda with NCCL); lines without ``--with-megatron`` are standalone layouts, whose groups
#: the bridge creates itself (``split_group`` on NCCL).
SELFCHECK_POOL: Sequence[str] = (
    "--ep 2 4 8 --hpz 2",
    "--with-megatron --tp 2 --ep 2 --hpz 2 --exports",
    "--tp 2 --pp 2 --ep 2 --etp 1 --exports",
    "--with-megatron --tp 2 --pp 2 --ep 2 4 --etp 1 --hpz 2 --exports",
    "--tp 2 --cp 2 --ep 4 --etp 1 --order tp-cp-dp-ep-pp --exports",
    "--with-megatron --tp 2 --cp 2 --ep 2",
    f"--with-megatron --tp 4 --ep 2 --order {DATA_BEFORE_EXPERT}",
    "--with-megatron --tp 4 --pp 2 --ep 4 --etp 1 --hpz 2",
    "--with-megatron --tp 8 --pp 2 --ep 2 --etp 1",
)

#: The CPU part: 4 gloo ranks, one launch for all of these (keep it short: CI runs it).
CPU_MEGATRON_LAYOUTS: Sequence[str] = (
    "tp=2,ep=2",
    "pp=2,ep=2",
    "cp=2",
    "tp=2,ep=2,etp=1",
    f"ep=2,order={DATA_BEFORE_EXPERT}",
)
CPU_EXTRA_EP: Sequence[int] = (2, 4)
#: The CPU part's self-check: megatron-core underneath, every derived kind, two "nodes" of 2,
#: and the exports (ProcessGroupCollection fields and DeviceMesh dims) proven on every rank.
CPU_SELFCHECK_ARGS: str = "--with-megatron --tp 2 --ep 2 --hpz 2 --gpus-per-node 2 --exports"
#: With 4 GPUs only (the CPU part proves standalone layouts in ``rank_checks.py standalone``
#: and ``tests/test_selfcheck.py``): a standalone full layout whose groups come from
#: split_group on NCCL, with its exports (the mesh on cuda).
STANDALONE_SELFCHECK_ARGS: str = "--tp 2 --pp 2 --ep 2 --etp 1 --exports"

_SPEC_KEYS = ("tp", "pp", "cp", "ep", "etp", "order")


def parse_spec(spec: str) -> Dict[str, object]:
    """``"tp=2,ep=2,order=tp-cp-dp-ep-pp"`` -> ``{"tp": 2, "ep": 2, "order": "tp-cp-dp-ep-pp"}``.

    Missing sizes default to 1 (``etp`` to None: megatron-core's default, tp), the
    order to megatron-core's default. Raises LayoutError for unknown keys or values.
    """
    out: Dict[str, object] = {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": None, "order": DEFAULT_ORDER}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _SPEC_KEYS:
            raise LayoutError(
                f"layout spec {spec!r}: {item!r} is not key=value with a key among {', '.join(_SPEC_KEYS)}"
            )
        if key == "order":
            out[key] = value.strip()
            continue
        try:
            out[key] = int(value)
        except ValueError:
            raise LayoutError(f"layout spec {spec!r}: {key} must be an integer, got {value!r}") from None
    return out


def _fits(spec: str, world_size: int) -> bool:
    sizes = parse_spec(spec)
    try:
        plan(world_size, **sizes)  # type: ignore[arg-type]
    except LayoutError:
        return False
    return True


def megatron_layouts(world_size: int, pool: Sequence[str] = MEGATRON_POOL) -> List[str]:
    """The specs of ``pool`` that form a megatron-core layout on ``world_size`` ranks."""
    return [spec for spec in pool if _fits(spec, world_size)]


def selfcheck_layouts(
    world_size: int, gpus_per_node: Optional[int] = None, pool: Sequence[str] = SELFCHECK_POOL
) -> List[str]:
    """The argument lines of ``pool`` the self-check accepts on ``world_size`` ranks.

    With ``gpus_per_node``, ``--gpus-per-node N`` is appended to every line (the
    all-to-all groups are checked too). Uses the self-check's own validation.
    """
    import argparse as _argparse

    from mpu_bridge.selfcheck import add_arguments, config_from_args, validate

    out = []
    for line in pool:
        if gpus_per_node is not None:
            line = f"{line} --gpus-per-node {gpus_per_node}"
        parser = _argparse.ArgumentParser()
        add_arguments(parser)
        config = config_from_args(parser.parse_args(shlex.split(line)))
        try:
            validate(config, world_size)
        except LayoutError:
            continue
        out.append(line)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print the integration layouts for a world size.")
    parser.add_argument("kind", choices=("megatron", "selfcheck"))
    parser.add_argument("world_size", type=int)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    args = parser.parse_args(argv)
    if args.kind == "megatron":
        print(" ".join(megatron_layouts(args.world_size)))
    else:
        for line in selfcheck_layouts(args.world_size, args.gpus_per_node):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
