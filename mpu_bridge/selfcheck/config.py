"""What the self-check checks: its options, their validation, and the groups every rank expects.

The expected groups come from the group families of :mod:`mpu_bridge.partitions`
(the same functions the bridge calls), over the planner's
:func:`~mpu_bridge.layout.plan`. No torch here.

Example::

    >>> expected_groups(SelfCheckConfig(tp=2, with_megatron=True), 4, 3)["data_parallel"]
    (1, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .. import partitions
from ..errors import LayoutError
from ..kinds import KIND_BY_METHOD
from ..layout import DEFAULT_ORDER, Layout, plan
from ..validate import positive_int

__all__ = [
    "DEFAULT_NPROC",
    "DEFAULT_TIMEOUT_S",
    "DENSE_METHODS",
    "FAULTS",
    "SelfCheckConfig",
    "expected_groups",
    "label",
    "validate",
]

#: Faults the hidden ``--inject-fault`` simulates on the last rank (to test the failure
#: paths). ``wrong-sum``: it contributes ``rank + world size`` to the all-reduce of the
#: first group kind with more than one rank, so every member of its group sees a wrong
#: sum (as if a foreign rank had joined). ``exit``: it exits with status 3 after creating
#: its groups, before any collective, leaving the others waiting for it.
FAULTS: Tuple[str, ...] = ("wrong-sum", "exit")

DEFAULT_NPROC = 8
DEFAULT_TIMEOUT_S = 300.0

#: The dense Bridge methods checked, in report order; each is also the report's label.
DENSE_METHODS: Tuple[str, ...] = (
    "tensor_parallel",
    "pipeline_parallel",
    "data_parallel",
    "sequence_parallel",
    "sequence_data_parallel",
    "model_parallel",
)


def label(name: str, option: str, value: int) -> str:
    """A report label for a family with an option, e.g. ``label("expert_parallel", "ep", 4)``
    -> ``"expert_parallel[ep=4]"``."""
    return f"{name}[{option}={value}]"


@dataclass(frozen=True)
class SelfCheckConfig:
    """What to check: the layout options of the command line.

    ``ep`` holds every expert-parallel size to check (the first one is megatron-core's
    ``expert_model_parallel_size`` with ``with_megatron``). ``nproc`` is the number of
    processes to spawn when no launcher started this one (``None``: 8). ``backend`` is
    ``"auto"``, ``"gloo"`` or ``"nccl"``; ``timeout`` bounds the whole run in seconds.

    Example: ``SelfCheckConfig(nproc=4, with_megatron=True, tp=2, ep=(2,), hpz=2)``.
    """

    nproc: Optional[int] = None
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: Tuple[int, ...] = (1,)
    etp: Optional[int] = None
    order: str = DEFAULT_ORDER
    hpz: Optional[int] = None
    gpus_per_node: Optional[int] = None
    with_megatron: bool = False
    backend: str = "auto"
    timeout: float = DEFAULT_TIMEOUT_S
    inject_fault: Optional[str] = None
    verbose: bool = False

    def dense_layout(self, world_size: int, gpus_per_node: Optional[int] = None) -> Layout:
        """The planner's layout of the dense groups (and of ``ep[0]``).

        Example: ``SelfCheckConfig(tp=2).dense_layout(8).size("dp") == 4``.
        """
        return plan(
            world_size,
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            ep=self.ep[0],
            etp=self.etp,
            order=self.order,
            gpus_per_node=gpus_per_node,
        )

    def expert_layout(self, world_size: int, ep_size: int) -> Layout:
        """The planner's layout for expert-parallel size ``ep_size`` (:func:`partitions.expert_layout`).

        Like :meth:`Bridge.expert_groups`: the same order, with ``ep`` put just before
        ``dp`` (Megatron's default place) when the order string leaves it out.

        Example: ``SelfCheckConfig(tp=2).expert_layout(8, 2).group_of("ep", 0) == [0, 2]``.
        """
        return partitions.expert_layout(self.dense_layout(world_size), ep_size, etp=self.etp)


def _check_standalone(config: SelfCheckConfig) -> None:
    """Standalone (no MPU) means tp = pp = cp = etp = 1."""
    sizes = (("tp", config.tp), ("pp", config.pp), ("cp", config.cp))
    extra = [f"{name}={value}" for name, value in sizes if value != 1]
    if config.etp not in (None, 1):
        extra.append(f"etp={config.etp}")
    if extra:
        raise LayoutError(
            f"{', '.join(extra)} needs --with-megatron: standalone (no MPU) means "
            "tp = pp = cp = etp = 1 (data parallel is the whole world); add --with-megatron to "
            "initialise megatron-core with these sizes, or drop them"
        )


def _check_run_options(config: SelfCheckConfig, world_size: int) -> None:
    """The options that are not sizes: the fault to inject and the timeout."""
    if config.inject_fault is not None and config.inject_fault not in FAULTS:
        raise LayoutError(f"unknown fault {config.inject_fault!r}; choose one of {', '.join(FAULTS)}")
    if config.inject_fault is not None and world_size < 2:
        raise LayoutError("--inject-fault needs at least 2 ranks (it breaks the last one)")
    if not config.timeout > 0:
        raise LayoutError(f"--timeout must be a positive number of seconds, got {config.timeout:g}")


def validate(config: SelfCheckConfig, world_size: int) -> Layout:
    """Check ``config`` for a world of ``world_size`` ranks before anything starts.

    Returns the dense layout; raises :class:`~mpu_bridge.errors.LayoutError` naming
    the numbers and the fix (the command then exits with status 2). Every family is
    built once for rank 0, so what the ranks will ask for is known to fit.

    Example: ``validate(SelfCheckConfig(tp=3, with_megatron=True), 4)`` raises
    ``LayoutError("world size 4 is not divisible by tp·pp·cp = 3 ...")``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError(f"the number of processes must be a positive integer, got {world_size!r}")
    if not config.with_megatron:
        _check_standalone(config)
    if not config.ep:
        raise LayoutError("--ep needs at least one expert-parallel size")
    if config.hpz is not None:
        positive_int("--hpz", config.hpz)
    if config.gpus_per_node is not None:
        positive_int("--gpus-per-node", config.gpus_per_node)
    expected_groups(config, world_size, 0)  # every family's own checks (sizes, blocks, nodes)
    _check_run_options(config, world_size)
    return config.dense_layout(world_size)


def _dense_groups(dense: Layout, rank: int) -> Dict[str, Tuple[int, ...]]:
    return {
        method: tuple(sorted(partitions.dense(dense, KIND_BY_METHOD[method].name, rank).own or ()))
        for method in DENSE_METHODS
    }


def _expert_groups(config: SelfCheckConfig, world_size: int, rank: int) -> Dict[str, Tuple[int, ...]]:
    out: Dict[str, Tuple[int, ...]] = {}
    for ep_size in config.ep:
        experts = config.expert_layout(world_size, ep_size)
        for name, kind in (("expert_parallel", "ep"), ("expert_data_parallel", "edp")):
            own = partitions.dense(experts, kind, rank).own or ()
            out[label(name, "ep", ep_size)] = tuple(sorted(own))
    return out


def _optional_groups(config: SelfCheckConfig, dense: Layout, rank: int) -> Dict[str, Tuple[int, ...]]:
    """hpZ with ``hpz``, the all-to-all groups with ``gpus_per_node``."""
    out: Dict[str, Tuple[int, ...]] = {}
    if config.hpz is not None:
        block = partitions.hpz_block(dense, config.hpz)
        own = partitions.hpz(dense, block, rank).own or ()
        out[label("zero_param_intra_parallel", "hpz", config.hpz)] = tuple(sorted(own))
    if config.gpus_per_node is not None:
        names = ("all_to_all_local", "all_to_all_cross_node")
        parts = partitions.all_to_all(dense.world_size, config.gpus_per_node, rank)  # cross-node: several nodes
        for name, part in zip(names, parts, strict=False):
            out[label(name, "gpn", config.gpus_per_node)] = tuple(sorted(part.own or ()))
    return out


def expected_groups(config: SelfCheckConfig, world_size: int, rank: int) -> Dict[str, Tuple[int, ...]]:
    """What the group families say ``rank``'s group of every checked kind holds (ascending).

    Keys are the report's labels, in the order the self-check creates and checks them.

    Example: ``expected_groups(SelfCheckConfig(tp=2, with_megatron=True), 4, 3)["data_parallel"]
    == (1, 3)``.
    """
    dense = config.dense_layout(world_size)
    out = _dense_groups(dense, rank)
    out.update(_expert_groups(config, world_size, rank))
    out.update(_optional_groups(config, dense, rank))
    out["world"] = tuple(partitions.world(world_size, rank).own or ())
    return out
