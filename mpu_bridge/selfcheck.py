"""``mpu-bridge selfcheck``: build every group on a real fabric and prove its membership.

On every rank the self-check builds a :class:`~mpu_bridge.bridge.Bridge` (over
megatron-core's ``parallel_state`` with ``--with-megatron``, standalone otherwise),
asks it for every group it offers, and then, in each group,

* all-reduces the rank's global rank: the result must be the sum of the group's
  member ranks (a member missing, or a foreign rank joined, changes the sum);
* broadcasts from the group's source rank (``GroupInfo.src_rank``): every member
  must receive that rank;
* compares the group's ranks with :func:`mpu_bridge.layout.plan` (the planner).

One report (rank 0, or the launching process) gives the layout, one row per group
kind (size, number of groups, communicator created / reused / borrowed from the
MPU, all-reduce / broadcast / planner results as ``ok ranks / world``), the time of
every phase and a final ``PASS`` / ``FAIL`` line. Exit status: 0 when every check
passed, 1 when any failed or a rank died or timed out, 2 for invalid options.

Two ways to launch (the same checks either way):

* under ``torchrun --nproc-per-node N -m mpu_bridge.selfcheck ...`` (``RANK``,
  ``WORLD_SIZE`` and ``MASTER_ADDR`` set): every process is one rank; rank 0 prints;
* with no launcher: the command starts ``--nproc`` local processes itself (from a
  fork server that imported torch and megatron-core once, or ``spawn``; a
  kernel-chosen free port; a hard ``--timeout``: ranks still running when it
  passes, or some seconds after another rank died, are killed).

Backend: NCCL bound to ``cuda:<local rank>`` when CUDA has a GPU for every local
rank (group creation then uses ``split_group``), gloo otherwise; ``--backend``
overrides.

Example (the README's main job: 8 local processes over megatron-core)::

    mpu-bridge selfcheck --nproc 8 --with-megatron --tp 2 --pp 2 --ep 2 4 --etp 1 --hpz 2 --gpus-per-node 4
    torchrun --nproc-per-node 8 -m mpu_bridge.selfcheck --with-megatron --tp 2 --ep 4

This module imports torch only inside the functions that run ranks, so the
``mpu-bridge`` command can list it without importing torch.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import logging
import os
import pickle
import queue as queue_module
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import BridgeError, LayoutError
from .layout import DEFAULT_ORDER, Layout, expert_order, plan
from .render import abbreviate_ranks, render_text

__all__ = [
    "FAULTS",
    "PHASES",
    "GroupCheck",
    "RankResult",
    "SelfCheckConfig",
    "add_arguments",
    "config_from_args",
    "expected_groups",
    "format_report",
    "main",
    "run",
    "validate",
]

logger = logging.getLogger(__name__)

#: Faults the hidden ``--inject-fault`` simulates on the last rank (to test the failure
#: paths). ``wrong-sum``: it contributes ``rank + world size`` to the all-reduce of the
#: first group kind with more than one rank, so every member of its group sees a wrong
#: sum (as if a foreign rank had joined). ``exit``: it exits with status 3 after creating
#: its groups, before any collective, leaving the others waiting for it.
FAULTS: Tuple[str, ...] = ("wrong-sum", "exit")

_DEFAULT_NPROC = 8
_DEFAULT_TIMEOUT_S = 300.0
_LOCALHOST = "127.0.0.1"
#: After one rank fails or dies, the others get this long to report before they are killed.
_GRACE_AFTER_FAILURE_S = 10.0
_RESULT_KEY = "mpu_bridge/selfcheck/result"
_PHASE_KEY = "mpu_bridge/selfcheck/phase"
_FAULT_EXIT_STATUS = 3
#: Most problem lines the report lists.
_MAX_PROBLEMS = 40

#: The phases timed on every rank, in report order.
PHASES: Tuple[str, ...] = (
    "process start",
    "init_process_group",
    "megatron import",
    "megatron init",
    "attach",
    "group creation",
    "collectives",
    "teardown",
)

_DENSE_QUERIES: Tuple[Tuple[str, str, str], ...] = (
    # (label, Bridge method, layout kind)
    ("tensor_parallel", "tensor_parallel", "tp"),
    ("pipeline_parallel", "pipeline_parallel", "pp"),
    ("data_parallel", "data_parallel", "dp"),
    ("sequence_parallel", "sequence_parallel", "cp"),
    ("sequence_data_parallel", "sequence_data_parallel", "dp-cp"),
    ("model_parallel", "model_parallel", "mp"),
)

# How the communicator of a group came about, per rank.
BORROWED = "borrowed"  # the MPU's own group, answered as is
REUSED = "reused"  # a derived query answered by a communicator that already existed
CREATED = "created"  # a new communicator


# -- configuration ----------------------------------------------------------------------


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
    timeout: float = _DEFAULT_TIMEOUT_S
    inject_fault: Optional[str] = None
    verbose: bool = False

    def dense_layout(self, world_size: int, gpus_per_node: Optional[int] = None) -> Layout:
        """The planner's layout of the dense groups (and of ``ep[0]``)."""
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
        """The planner's layout for expert-parallel size ``ep_size``.

        Like :meth:`Bridge.expert_groups`: the same order, with ``ep`` put just before
        ``dp`` (Megatron's default place) when the order string leaves it out.
        """
        return plan(
            world_size,
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            ep=ep_size,
            etp=self.etp,
            order=expert_order(self.order),
        )


def validate(config: SelfCheckConfig, world_size: int) -> Layout:
    """Check ``config`` for a world of ``world_size`` ranks before anything starts.

    Returns the dense layout; raises :class:`~mpu_bridge.errors.LayoutError` naming
    the numbers and the fix (the command then exits with status 2).

    Example: ``validate(SelfCheckConfig(tp=3, with_megatron=True), 4)`` raises
    ``LayoutError("world size 4 is not divisible by tp·pp·cp = 3 ...")``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError(f"the number of processes must be a positive integer, got {world_size!r}")
    if not config.with_megatron:
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
    if not config.ep:
        raise LayoutError("--ep needs at least one expert-parallel size")
    layout = config.dense_layout(world_size)
    for ep_size in config.ep[1:]:
        config.expert_layout(world_size, ep_size)
    if config.hpz is not None:
        if config.hpz < 1:
            raise LayoutError(f"--hpz must be a positive integer, got {config.hpz}")
        span = layout.size("dp-cp")
        block = min(config.hpz, span)
        if span % block:
            raise LayoutError(
                f"hpZ partition size {config.hpz} does not divide the data-parallel size {span} "
                f"(dp={layout.config.dp}, cp={layout.config.cp}); choose a divisor of {span}"
            )
    gpn = config.gpus_per_node
    if gpn is not None:
        if gpn < 1:
            raise LayoutError(f"--gpus-per-node must be a positive integer, got {gpn}")
        if world_size > gpn and world_size % gpn:
            raise LayoutError(
                f"world size {world_size} does not divide into nodes of {gpn} GPUs "
                f"({world_size // gpn} full nodes and {world_size % gpn} ranks left over); "
                "pass the right --gpus-per-node"
            )
    if config.inject_fault is not None and config.inject_fault not in FAULTS:
        raise LayoutError(f"unknown fault {config.inject_fault!r}; choose one of {', '.join(FAULTS)}")
    if config.inject_fault is not None and world_size < 2:
        raise LayoutError("--inject-fault needs at least 2 ranks (it breaks the last one)")
    if config.timeout <= 0:
        raise LayoutError(f"--timeout must be a positive number of seconds, got {config.timeout:g}")
    return layout


def expected_groups(config: SelfCheckConfig, world_size: int, rank: int) -> Dict[str, Tuple[int, ...]]:
    """What the planner says ``rank``'s group of every checked kind holds (ascending).

    Keys are the report's labels, in the order the self-check creates and checks them.

    Example: ``expected_groups(SelfCheckConfig(tp=2, with_megatron=True), 4, 3)["data_parallel"]
    == (1, 3)``.
    """
    dense = config.dense_layout(world_size)
    out: Dict[str, Tuple[int, ...]] = {}
    for label, _, kind in _DENSE_QUERIES:
        out[label] = tuple(sorted(dense.group_of(kind, rank)))
    for ep_size in config.ep:
        experts = config.expert_layout(world_size, ep_size)
        out[_label("expert_parallel", "ep", ep_size)] = tuple(sorted(experts.group_of("ep", rank)))
        out[_label("expert_data_parallel", "ep", ep_size)] = tuple(sorted(experts.group_of("edp", rank)))
    if config.hpz is not None:
        members = dense.group_of("dp-cp", rank)
        block = min(config.hpz, len(members))
        start = members.index(rank) // block * block
        out[_label("zero_param_intra_parallel", "hpz", config.hpz)] = tuple(
            sorted(members[start : start + block])
        )
    if config.gpus_per_node is not None:
        gpn = min(config.gpus_per_node, world_size)
        node, local = divmod(rank, gpn)
        out[_label("all_to_all_local", "gpn", config.gpus_per_node)] = tuple(range(node * gpn, node * gpn + gpn))
        if world_size > gpn:
            out[_label("all_to_all_cross_node", "gpn", config.gpus_per_node)] = tuple(
                range(local, world_size, gpn)
            )
    out["world"] = tuple(range(world_size))
    return out


def _label(name: str, option: str, value: int) -> str:
    return f"{name}[{option}={value}]"


# -- per-rank results -------------------------------------------------------------------


@dataclass
class GroupCheck:
    """One rank's checks of its group of one kind (plain data: pickled between processes)."""

    label: str
    ranks: Tuple[int, ...]
    status: str
    planned: Tuple[int, ...]
    planner_ok: bool
    allreduce_ok: Optional[bool] = None
    allreduce_got: Optional[int] = None
    broadcast_ok: Optional[bool] = None
    broadcast_got: Optional[int] = None
    error: Optional[str] = None
    same_as: Optional[str] = None  # an earlier kind whose communicator this one is, on this rank

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def passed(self) -> bool:
        return bool(self.planner_ok and self.allreduce_ok and self.broadcast_ok and self.error is None)


@dataclass
class RankResult:
    """Everything one rank reports: its checks, phase times, strategy and any error."""

    rank: int
    world_size: int
    backend: str = ""
    strategy: Optional[str] = None
    mpu: str = "standalone (no MPU)"
    stats: Dict[str, int] = field(default_factory=dict)
    phases: Dict[str, float] = field(default_factory=dict)
    checks: List[GroupCheck] = field(default_factory=list)
    error: Optional[str] = None
    error_phase: Optional[str] = None
    error_traceback: Optional[str] = None
    warnings: List[str] = field(default_factory=list)  # what mpu_bridge logged at WARNING, once each

    @property
    def passed(self) -> bool:
        return self.error is None and all(check.passed for check in self.checks)


class _WarningCollector(logging.Handler):
    """Keeps the library's warnings for the report (one line there, not one per rank on stderr)."""

    def __init__(self, into: List[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.into:
            self.into.append(message)


class _Phases:
    """Times named phases into a dict; remembers the phase running when an error struck.

    ``announce(name)``, when set, is told each phase as it starts (the rank's progress
    in the store, so a rank killed at the timeout can be reported with where it was).
    """

    def __init__(self, into: Dict[str, float], announce: Optional[Callable[[str], None]] = None) -> None:
        self.into = into
        self.current: Optional[str] = None
        self.announce = announce

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.current = name
        if self.announce is not None:
            self.announce(name)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - start


def _announcer(store: Any, rank: int) -> Callable[[str], None]:
    """Writes the phase a rank enters to ``store`` (best effort: progress is only a diagnostic)."""

    def announce(phase: str) -> None:
        try:
            store.set(f"{_PHASE_KEY}/{rank}", phase)
        except Exception as exc:
            logger.debug("mpu-bridge selfcheck: rank %d could not record phase %s: %s", rank, phase, exc)

    return announce


def _last_phase(store: Any, rank: int) -> Optional[str]:
    """The phase ``rank`` last announced in ``store``, or None."""
    key = f"{_PHASE_KEY}/{rank}"
    try:
        return store.get(key).decode("utf-8", "replace") if store.check([key]) else None
    except Exception:  # the store itself may be gone with the rank that hosted it
        return None


# -- one rank ---------------------------------------------------------------------------


def _quiet_imports() -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _resolve_backend(requested: str, local_world_size: int) -> str:
    """``auto``: nccl when CUDA has a GPU for each local rank, else gloo."""
    import torch

    cuda = torch.cuda.is_available()
    devices = torch.cuda.device_count() if cuda else 0
    if requested == "auto":
        return "nccl" if cuda and devices >= local_world_size else "gloo"
    if requested == "nccl" and devices < local_world_size:
        raise LayoutError(
            f"--backend nccl needs one CUDA device per local rank: {local_world_size} local ranks, "
            f"{devices} device(s) visible; use --backend gloo or fewer processes"
        )
    return requested


def _init_process_group(
    backend: str, rank: int, world_size: int, local_rank: int, timeout: float, store: Optional[Any]
) -> Any:
    """Initialise torch.distributed; returns the device collectives run on."""
    import inspect

    import torch
    import torch.distributed as dist

    kwargs: Dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout)}
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # binds the default group: the registry uses split_group
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world_size)
    dist.init_process_group(backend, **kwargs)
    return device


def _import_parallel_state() -> Any:
    _quiet_imports()
    from megatron.core import parallel_state

    return parallel_state


def _initialize_megatron(parallel_state: Any, config: SelfCheckConfig) -> None:
    import inspect

    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    kwargs: Dict[str, Any] = {
        "tensor_model_parallel_size": config.tp,
        "pipeline_model_parallel_size": config.pp,
        "context_parallel_size": config.cp,
        "expert_model_parallel_size": config.ep[0],
        "order": config.order,
    }
    if config.etp is not None:
        kwargs["expert_tensor_parallel_size"] = config.etp
    if "create_gloo_process_groups" in accepted:
        kwargs["create_gloo_process_groups"] = False
    # An older release without a parameter is fine as long as we would pass its default.
    neutral = {"context_parallel_size": 1, "expert_model_parallel_size": 1, "order": DEFAULT_ORDER}
    for name in [k for k in kwargs if k not in accepted]:
        if neutral.get(name, object()) != kwargs[name]:
            raise BridgeError(
                f"this megatron-core's initialize_model_parallel has no {name} parameter; "
                "drop the matching option (--cp, --ep, --etp or --order) or upgrade megatron-core"
            )
        del kwargs[name]
    parallel_state.initialize_model_parallel(**kwargs)


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # not installed as a distribution: say so rather than fail
        return "unknown version"


#: One bridge query: the call, and (label, pick this kind's GroupInfo from the answer) per kind.
_Request = Tuple[Callable[[], Any], List[Tuple[str, Callable[[Any], Any]]]]


def _requests(bridge: Any, config: SelfCheckConfig) -> List[_Request]:
    """Every query, in the same fixed order on every rank."""

    def same(answer: Any) -> Any:
        return answer

    out: List[_Request] = []
    for label, method, _ in _DENSE_QUERIES:
        out.append((getattr(bridge, method), [(label, same)]))
    for ep_size in config.ep:
        out.append(
            (
                lambda e=ep_size: bridge.expert_groups(e),
                [
                    (_label("expert_parallel", "ep", ep_size), lambda a: a.expert_parallel),
                    (_label("expert_data_parallel", "ep", ep_size), lambda a: a.expert_data_parallel),
                ],
            )
        )
    if config.hpz is not None:
        out.append(
            (
                lambda: bridge.zero_param_groups(config.hpz),
                [(_label("zero_param_intra_parallel", "hpz", config.hpz), same)],
            )
        )
    if config.gpus_per_node is not None:
        gpn = config.gpus_per_node
        out.append(
            (
                lambda: bridge.all_to_all_groups(gpn),
                [
                    (_label("all_to_all_local", "gpn", gpn), lambda a: a.local),
                    (_label("all_to_all_cross_node", "gpn", gpn), lambda a: a.cross_node),
                ],
            )
        )
    out.append((bridge.world, [("world", same)]))
    return out


def _create_groups(
    bridge: Any, config: SelfCheckConfig, planned: Mapping[str, Tuple[int, ...]]
) -> List[Tuple[Any, GroupCheck]]:
    """Ask the bridge for every group; note for each whether its communicator is new.

    ``borrowed``: an MPU query (dense or expert) answered with the MPU's own group;
    ``reused``: any other query answered with a communicator that existed before it
    (the MPU's, or an earlier query's); ``created``: a new communicator.
    """
    mpu_queries = {label for label, _, _ in _DENSE_QUERIES}
    for ep_size in config.ep:
        mpu_queries.add(_label("expert_parallel", "ep", ep_size))
        mpu_queries.add(_label("expert_data_parallel", "ep", ep_size))
    created: List[Tuple[Any, GroupCheck]] = []
    for call, picks in _requests(bridge, config):
        before = {label: bridge.registry.lookup(planned[label]) for label, _ in picks if label in planned}
        answer = call()
        for label, pick in picks:
            info = pick(answer)
            if info is None:  # no cross-node group on a single node
                continue
            existed = before.get(label) is not None and before[label] is info.group
            if info.borrowed and label in mpu_queries:
                status = BORROWED
            elif info.borrowed or existed:
                status = REUSED
            else:
                status = CREATED
            expected = planned.get(label, ())
            check = GroupCheck(
                label=label,
                ranks=tuple(info.ranks),
                status=status,
                planned=expected,
                planner_ok=tuple(sorted(info.ranks)) == expected and info.ranks[info.rank] == bridge.rank,
                same_as=next((c.label for i, c in created if i.group is info.group), None),
            )
            created.append((info, check))
    return created


def _run_collectives(
    groups: Sequence[Tuple[Any, GroupCheck]], rank: int, world_size: int, device: Any, fault: Optional[str]
) -> None:
    """All-reduce and broadcast in every group, in the same order on every rank."""
    import torch
    import torch.distributed as dist

    # wrong-sum breaks the first kind with several ranks (every rank knows the sizes alike).
    target = next((i for i, (info, _) in enumerate(groups) if info.world_size > 1), 0)
    for index, (info, check) in enumerate(groups):
        try:
            contribution = rank
            if fault == "wrong-sum" and index == target and rank == world_size - 1:
                contribution = rank + world_size
            value = torch.tensor([contribution], dtype=torch.int64, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=info.group)
            check.allreduce_got = int(value.item())
            check.allreduce_ok = check.allreduce_got == sum(info.ranks)
            value = torch.tensor([rank], dtype=torch.int64, device=device)
            dist.broadcast(value, src=info.src_rank, group=info.group)
            check.broadcast_got = int(value.item())
            check.broadcast_ok = check.broadcast_got == info.src_rank
        except Exception as exc:  # a broken fabric: record it and stop using collectives
            check.error = f"{type(exc).__name__}: {exc}"
            for _, rest in groups[index + 1 :]:
                rest.error = "skipped after an earlier collective failed"
            raise


def _check_rank(
    config: SelfCheckConfig,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    store: Optional[Any],
    on_groups_created: Optional[Callable[[], None]] = None,
) -> Tuple[RankResult, Optional[Any]]:
    """Run every phase on this rank; never raises. Returns the result and the default store."""
    result = RankResult(rank=rank, world_size=world_size)
    phases = _Phases(result.phases, None if store is None else _announcer(store, rank))
    library_logger = logging.getLogger(__package__ or "mpu_bridge")
    collector = _WarningCollector(result.warnings)
    library_logger.addHandler(collector)
    bridge = None
    parallel_state = None
    default_store = None
    try:
        backend = phases.run("init_process_group", lambda: _resolve_backend(config.backend, local_world_size))
        result.backend = backend
        device = phases.run(
            "init_process_group",
            lambda: _init_process_group(backend, rank, world_size, local_rank, config.timeout, store),
        )
        from torch.distributed import distributed_c10d

        default_store = distributed_c10d._get_default_store()
        if phases.announce is None:
            phases.announce = _announcer(default_store, rank)
        if config.with_megatron:
            parallel_state = phases.run("megatron import", _import_parallel_state)
            phases.run("megatron init", lambda: _initialize_megatron(parallel_state, config))
            result.mpu = f"megatron-core {_megatron_version()} parallel_state"
        from .bridge import attach

        options: Dict[str, Any] = {"order": config.order, "agreement_timeout": config.timeout}
        if config.gpus_per_node is not None:
            options["gpus_per_node"] = config.gpus_per_node
        bridge = phases.run("attach", lambda: attach(parallel_state, **options))
        result.strategy = bridge.strategy
        planned = expected_groups(config, world_size, rank)
        groups = phases.run("group creation", lambda: _create_groups(bridge, config, planned))
        result.checks = [check for _, check in groups]
        result.stats = dict(bridge.stats())
        if on_groups_created is not None:
            on_groups_created()
        phases.run(
            "collectives",
            lambda: _run_collectives(groups, rank, world_size, device, config.inject_fault),
        )
        phases.current = None
    except (Exception, SystemExit) as exc:  # report every failure; only an interrupt escapes
        result.error = f"{type(exc).__name__}: {exc}"
        result.error_phase = phases.current
        if not isinstance(exc, BridgeError) and phases.current != "collectives":
            # (a failed collective is a fact about the fabric; its message says it all)
            result.error_traceback = traceback.format_exc()
    finally:
        phases.run("teardown", lambda: _teardown(bridge, parallel_state))
        library_logger.removeHandler(collector)
    return result, default_store


def _teardown(bridge: Any, parallel_state: Any) -> None:
    """Close the bridge, then megatron-core's groups; leaves the default group to the caller."""
    try:
        if bridge is not None:
            bridge.close()
        if parallel_state is not None:
            parallel_state.destroy_model_parallel()
    except Exception as exc:  # teardown must not mask the checks' outcome
        logger.warning("mpu-bridge selfcheck: teardown failed: %s", exc)


def _destroy_default_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:
        logger.warning("mpu-bridge selfcheck: destroying the default group failed: %s", exc)


def _fault_exit() -> None:
    """``--inject-fault exit`` on the last rank: die before any collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_FAULT_EXIT_STATUS)


def _setup_rank_process(verbose: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the machine's cores
    _quiet_imports()
    if verbose:
        logging.basicConfig(level=logging.INFO, format="[rank %(process)d] %(name)s: %(message)s")


# -- spawned mode -----------------------------------------------------------------------


def _spawned_rank(
    config: SelfCheckConfig, rank: int, world_size: int, port: int, results: Any, spawned_at: float
) -> None:
    """Entry point of one spawned rank process: check, report through the queue.

    ``spawned_at`` (``time.time()`` in the parent) times the process start, torch import included.
    """
    os.environ.update(
        {
            "MASTER_ADDR": _LOCALHOST,
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    _setup_rank_process(config.verbose)
    if hasattr(signal, "SIGTERM") and os.name == "posix":
        # When the parent stops a rank (timeout, or after another rank died), the rank
        # prints where it was stuck to stderr before it goes.
        faulthandler.register(signal.SIGTERM, chain=True)
    try:
        import torch.distributed as dist

        started = time.time() - spawned_at
        store = dist.TCPStore(
            _LOCALHOST, port, is_master=False, timeout=datetime.timedelta(seconds=config.timeout)
        )
        hook = _fault_exit if config.inject_fault == "exit" and rank == world_size - 1 else None
        result, _ = _check_rank(config, rank, world_size, rank, world_size, store, hook)
        result.phases["process start"] = started
    except BaseException as exc:  # e.g. the store was unreachable: report it, whatever it is
        result = RankResult(
            rank=rank,
            world_size=world_size,
            error=f"{type(exc).__name__}: {exc}",
            error_phase="start",
            error_traceback=traceback.format_exc(),
        )
    results.put((rank, pickle.dumps(result)))
    _destroy_default_group()


def _stop(processes: Sequence[Any]) -> None:
    """Terminate, then kill, every process still alive."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 3.0
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)


def _rank_context(config: SelfCheckConfig) -> Any:
    """Where local ranks come from: a fork server that imported torch (and megatron-core)
    once, never initialised, so N ranks do not import them N times; ``spawn`` where
    there is no fork server."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    preload = ["torch", "torch.distributed"]
    if config.with_megatron:
        preload.append("megatron.core.parallel_state")
    ctx.set_forkserver_preload(preload)
    return ctx


def _run_spawned(config: SelfCheckConfig, world_size: int) -> Tuple[Dict[int, RankResult], Dict[int, str]]:
    """Start ``world_size`` local ranks; return results by rank, and the missing ranks with why."""
    import torch.distributed as dist

    start = time.monotonic()
    deadline = start + config.timeout
    ctx = _rank_context(config)
    results = ctx.Queue()
    store = dist.TCPStore(  # the rendezvous, on a port the kernel picks: no race for a free one
        _LOCALHOST,
        0,
        world_size=None,
        is_master=True,
        timeout=datetime.timedelta(seconds=config.timeout),
        wait_for_workers=False,
    )
    processes = [
        ctx.Process(
            target=_spawned_rank,
            args=(config, rank, world_size, int(store.port), results, time.time()),
            name=f"selfcheck-rank-{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    collected: Dict[int, RankResult] = {}
    missing: Dict[int, str] = {}
    first_failure: Optional[str] = None
    give_up_at = deadline
    try:
        for proc in processes:
            proc.start()
        while len(collected) + len(missing) < world_size:
            now = time.monotonic()
            if now >= give_up_at:
                break
            try:
                rank, payload = results.get(timeout=min(0.2, give_up_at - now))
            except queue_module.Empty:
                for rank, proc in enumerate(processes):
                    if rank in collected or rank in missing or proc.is_alive():
                        continue
                    try:  # a report may still be in flight from a process that just ended
                        late_rank, payload = results.get(timeout=1.0)
                        collected[late_rank] = pickle.loads(payload)
                        continue
                    except queue_module.Empty:
                        pass
                    missing[rank] = f"died with exit code {proc.exitcode} without reporting"
                    if first_failure is None:
                        first_failure = f"rank {rank} died"
                        give_up_at = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
                continue
            result = pickle.loads(payload)
            collected[rank] = result
            if result.error is not None and first_failure is None:
                first_failure = f"rank {rank} failed"
                give_up_at = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
        for rank in range(world_size):
            if rank not in collected and rank not in missing:
                phase = _last_phase(store, rank)
                where = f" (last phase: {phase})" if phase else " (before its first phase)"
                if first_failure is not None and time.monotonic() < deadline:
                    missing[rank] = f"killed {_GRACE_AFTER_FAILURE_S:g} s after {first_failure}{where}"
                else:
                    missing[rank] = f"did not finish within --timeout {config.timeout:g} s{where}; killed"
        for proc in processes:
            proc.join(max(0.1, min(5.0, deadline - time.monotonic())))
    finally:
        _stop(processes)
        results.close()
        results.join_thread()
        del store
    return collected, missing


# -- launched mode (torchrun) --------------------------------------------------------------


def _launched() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _run_launched(config: SelfCheckConfig) -> int:
    """This process is one rank of a torchrun job: check, gather on rank 0 through the store."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    try:
        if config.nproc is not None and config.nproc != world_size:
            raise LayoutError(
                f"--nproc {config.nproc} was given, but the launcher started WORLD_SIZE={world_size} "
                "ranks; drop --nproc under torchrun (or unset RANK/WORLD_SIZE/MASTER_ADDR to spawn locally)"
            )
        validate(config, world_size)
    except BridgeError as error:
        if rank == 0:
            sys.stderr.write(f"mpu-bridge: error: {error}\n")
        return 2
    _setup_rank_process(config.verbose)
    faulthandler.dump_traceback_later(config.timeout, exit=True)  # never hang past --timeout
    start = time.monotonic()
    import torch.distributed  # noqa: F401  (timed as this rank's "process start")

    imported = time.monotonic() - start
    hook = _fault_exit if config.inject_fault == "exit" and rank == world_size - 1 else None
    result, store = _check_rank(config, rank, world_size, local_rank, local_world_size, None, hook)
    result.phases["process start"] = imported
    status = 0 if result.passed else 1
    try:
        if store is None:
            sys.stderr.write(f"mpu-bridge selfcheck: rank {rank}: {result.error}\n")
            return 1
        store.set(f"{_RESULT_KEY}/{rank}", pickle.dumps(result))
        if rank != 0:
            return status
        collected, missing = _gather_from_store(store, world_size, start + config.timeout)
        report, passed = format_report(
            config, world_size, collected, missing, time.monotonic() - start, launcher="torchrun"
        )
        _write(report)
        return 0 if passed else 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        _destroy_default_group()


def _gather_from_store(store: Any, world_size: int, deadline: float) -> Tuple[Dict[int, RankResult], Dict[int, str]]:
    collected: Dict[int, RankResult] = {}
    pending = list(range(world_size))
    while pending and time.monotonic() < deadline:
        still = []
        for rank in pending:
            key = f"{_RESULT_KEY}/{rank}"
            if store.check([key]):
                collected[rank] = pickle.loads(store.get(key))
            else:
                still.append(rank)
        pending = still
        if pending:
            time.sleep(0.1)
    missing = {}
    for rank in pending:
        phase = _last_phase(store, rank)
        missing[rank] = "did not report before --timeout" + (f" (last phase: {phase})" if phase else "")
    return collected, missing


# -- the report -----------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> List[str]:
    """Rows in aligned columns (those in ``right`` right-aligned), no trailing spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in [header, *rows]
    ]


def _consistency_problems(label: str, checks: Mapping[int, GroupCheck]) -> Tuple[int, List[str]]:
    """The number of distinct groups the ranks report, and where they disagree about membership.

    Every rank must be in its own group, and every member of a group must report the
    same group (the groups of a kind are a partition of the world).
    """
    groups = set()
    problems = []
    for rank, check in sorted(checks.items()):
        members = tuple(sorted(check.ranks))
        groups.add(members)
        if rank not in members:
            problems.append(f"{label}: rank {rank} reports group {abbreviate_ranks(list(members))} without itself")
        for member in members:
            other = checks.get(member)
            if other is not None and tuple(sorted(other.ranks)) != members:
                problems.append(
                    f"{label}: rank {rank} has group {abbreviate_ranks(list(members))}, but its member "
                    f"{member} has {abbreviate_ranks(sorted(other.ranks))}"
                )
                break
    return len(groups), problems


def _check_problems(label: str, rank: int, check: GroupCheck, rank_error: Optional[str]) -> List[str]:
    """What went wrong in one rank's check of one kind, one line each."""
    if check.error is not None:
        # a collective that raised is listed once, with the rank's failure
        skipped = check.error.startswith("skipped") or check.error == rank_error
        return [] if skipped else [f"{label}: rank {rank}: {check.error}"]
    problems = []
    if not check.planner_ok:
        problems.append(
            f"{label}: rank {rank} got group {abbreviate_ranks(list(check.ranks))}, the planner says "
            f"{abbreviate_ranks(list(check.planned))}"
        )
    if check.allreduce_ok is False:
        problems.append(
            f"{label}: rank {rank}: all-reduce gave {check.allreduce_got}, expected {sum(check.ranks)} "
            f"(the sum of ranks {abbreviate_ranks(list(check.ranks))})"
        )
    if check.broadcast_ok is False:
        problems.append(
            f"{label}: rank {rank}: broadcast from rank {check.ranks[0]} delivered {check.broadcast_got}"
        )
    return problems


def _communicator_text(checks: Sequence[GroupCheck]) -> str:
    """``created`` / ``reused`` / ``borrowed``, with ``= <kind>`` when it is another kind's communicator."""
    statuses = sorted({c.status for c in checks})
    if len(statuses) == 1:
        text = statuses[0]
    else:
        text = ", ".join(f"{s} {sum(1 for c in checks if c.status == s)}" for s in statuses)
    twins = {c.same_as for c in checks}
    if len(twins) == 1 and None not in twins:
        text += f" = {twins.pop()}"
    return text


@dataclass
class _GroupTable:
    rows: List[List[str]]
    failed_kinds: List[str]
    problems: List[str]


def _group_table(world_size: int, results: Mapping[int, RankResult]) -> _GroupTable:
    """One row per checked kind, in the order the ranks checked them."""
    per_label: Dict[str, Dict[int, GroupCheck]] = {}
    for rank in sorted(results):
        for check in results[rank].checks:
            per_label.setdefault(check.label, {})[rank] = check
    table = _GroupTable(rows=[], failed_kinds=[], problems=[])
    for label, checks in per_label.items():
        values = list(checks.values())
        count, problems = _consistency_problems(label, checks)
        for rank, check in sorted(checks.items()):
            problems.extend(_check_problems(label, rank, check, results[rank].error))
        passed = len(values) == world_size and all(c.passed for c in values) and not problems
        if not passed:
            table.failed_kinds.append(label)
        table.problems.extend(problems)
        ok = [sum(1 for c in values if getattr(c, name) and c.error is None)
              for name in ("allreduce_ok", "broadcast_ok", "planner_ok")]
        table.rows.append(
            [
                label,
                "/".join(str(size) for size in sorted({c.size for c in values})),
                str(count),
                _communicator_text(values),
                *(f"{n}/{world_size}" for n in ok),
                "ok" if passed else "FAIL",
            ]
        )
    return table


def _phase_lines(results: Mapping[int, RankResult], wall_s: float) -> List[str]:
    rows = []
    for phase in PHASES:
        times = [r.phases[phase] for r in results.values() if phase in r.phases]
        if times:
            rows.append([phase, f"{max(times):.3f}", f"{min(times):.3f}"])
    rows.append(["wall (whole run)", f"{wall_s:.3f}", ""])
    return _table(["phase", "max s", "min s"], rows, right=(1, 2))


def _warning_lines(results: Mapping[int, RankResult]) -> List[str]:
    """The library's warnings, each once, with the ranks that logged it."""
    by_message: Dict[str, List[int]] = {}
    for rank in sorted(results):
        for message in results[rank].warnings:
            ranks = by_message.setdefault(message, [])
            if rank not in ranks:
                ranks.append(rank)
    if not by_message:
        return []
    lines = ["", "warnings logged by the ranks:"]
    for message, ranks in by_message.items():
        lines.append(f"  ranks {abbreviate_ranks(ranks)}: {message}")
    return lines


def format_report(
    config: SelfCheckConfig,
    world_size: int,
    results: Mapping[int, RankResult],
    missing: Mapping[int, str],
    wall_s: float,
    *,
    launcher: str,
) -> Tuple[str, bool]:
    """The report rank 0 prints, and whether everything passed.

    Everything passes when every rank reported, none raised, and every kind's
    all-reduce, broadcast and planner checks hold on every rank. A rank that did not
    report (``missing``: rank -> why) fails every kind. Pure: no torch.

    Example: ``text, ok = format_report(config, 4, results, {}, 6.2, launcher="spawned locally")``.
    """
    first = results[min(results)] if results else None
    strategy = next((r.strategy for r in results.values() if r.strategy), None)
    mpu = next((r.mpu for r in results.values() if "megatron" in r.mpu), None) if config.with_megatron else None
    mpu = mpu or ("megatron-core parallel_state" if config.with_megatron else "standalone (no MPU)")
    lines = [
        f"mpu-bridge selfcheck: {world_size} ranks ({launcher}), backend "
        f"{(first.backend if first is not None else '') or config.backend}, MPU {mpu}, "
        f"group creation {strategy or '?'}",
        "",
    ]
    gpn = config.gpus_per_node
    layout = config.dense_layout(world_size, gpn if gpn is not None and world_size % gpn == 0 else None)
    lines.append(render_text(layout).rstrip("\n"))
    lines.append("")

    table = _group_table(world_size, results)
    if table.rows:
        header = ["group kind", "size", "groups", "communicator", "all-reduce", "broadcast", "planner", "result"]
        lines.extend(_table(header, table.rows, right=(1, 2, 4, 5, 6)))
    else:
        lines.append("(no rank got as far as creating groups)")
    lines.append("")
    lines.extend(_phase_lines(results, wall_s))
    if first is not None and first.stats:
        stats = first.stats
        lines.append(
            f"rank {first.rank}: {stats.get('created', 0)} groups created, {stats.get('borrowed', 0)} "
            f"borrowed from the MPU, {stats.get('reused', 0)} requests reused, "
            f"{stats.get('fallbacks', 0)} creation batch(es) fell back to new_group"
        )
    lines.extend(_warning_lines(results))

    rank_errors = [
        f"rank {rank} failed in {results[rank].error_phase or '?'}: {results[rank].error}"
        for rank in sorted(results)
        if results[rank].error is not None
    ]
    rank_errors.extend(f"rank {rank} {why}" for rank, why in sorted(missing.items()))
    problems = rank_errors + table.problems
    if problems:
        lines.extend(["", "problems:"])
        lines.extend(f"  {line}" for line in problems[:_MAX_PROBLEMS])
        if len(problems) > _MAX_PROBLEMS:
            lines.append(f"  … and {len(problems) - _MAX_PROBLEMS} more")
        traced = [r for r in results.values() if r.error_traceback]
        if traced:
            earliest = min(traced, key=lambda r: r.rank)
            lines.append(f"traceback of rank {earliest.rank}:")
            lines.extend(f"  {line}" for line in earliest.error_traceback.rstrip().splitlines()[-15:])

    passed = bool(table.rows) and not table.failed_kinds and not rank_errors and len(results) == world_size
    lines.append("")
    if passed:
        lines.append(f"PASS: {len(table.rows)} group kinds on {world_size} ranks, every check passed")
    else:
        reasons = []
        if table.failed_kinds:
            reasons.append("failed kinds: " + ", ".join(table.failed_kinds))
        if missing:
            reasons.append(f"ranks {sorted(missing)} did not report")
        raised = sorted(rank for rank in results if results[rank].error is not None)
        if raised:
            reasons.append(f"ranks {raised} raised")
        lines.append("FAIL: " + ("; ".join(reasons) or "no group was checked"))
    return "\n".join(lines) + "\n", passed


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        sys.stdout.write(text.encode(encoding, "replace").decode(encoding))
    sys.stdout.flush()


# -- command line ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``selfcheck`` options on ``parser`` (used by ``mpu-bridge selfcheck``)."""
    launch = parser.add_argument_group("launch")
    launch.add_argument(
        "--nproc",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"local processes to spawn when no launcher (torchrun) started this one (default {_DEFAULT_NPROC})",
    )
    launch.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="torch.distributed backend (default auto: nccl when CUDA has a GPU per local rank, else gloo)",
    )
    launch.add_argument(
        "--timeout",
        type=_positive_float,
        default=_DEFAULT_TIMEOUT_S,
        metavar="S",
        help="hard limit for the whole run in seconds; ranks still running are killed "
        f"(default {_DEFAULT_TIMEOUT_S:g})",
    )
    launch.add_argument(
        "--with-megatron",
        action="store_true",
        help="initialise megatron-core's parallel_state with these sizes and bridge over it "
        "(default: standalone, no MPU: tp = pp = cp = 1)",
    )
    launch.add_argument("--verbose", "-v", action="store_true", help="log the bridge's decisions on every rank")
    launch.add_argument("--inject-fault", choices=FAULTS, default=None, help=argparse.SUPPRESS)
    sizes = parser.add_argument_group("layout")
    for name, what in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context")):
        sizes.add_argument(
            f"--{name}", type=_positive_int, default=1, metavar="N", help=f"{what}-parallel size (default 1)"
        )
    sizes.add_argument(
        "--ep",
        type=_positive_int,
        nargs="+",
        action="extend",
        default=None,
        metavar="N",
        help="expert-parallel sizes to check, e.g. --ep 2 4 (default 1); with --with-megatron "
        "the first is megatron-core's expert_model_parallel_size",
    )
    sizes.add_argument(
        "--etp", type=_positive_int, default=None, metavar="N", help="expert tensor-parallel size (default: tp)"
    )
    sizes.add_argument(
        "--order", default=DEFAULT_ORDER, help=f"Megatron order string (default {DEFAULT_ORDER})"
    )
    sizes.add_argument(
        "--hpz", type=_positive_int, default=None, metavar="N", help="also check ZeRO++ hpZ groups of N ranks"
    )
    sizes.add_argument(
        "--gpus-per-node",
        type=_positive_int,
        default=None,
        metavar="N",
        help="also check the node-local and cross-node all-to-all groups for N GPUs per node",
    )


def config_from_args(args: argparse.Namespace) -> SelfCheckConfig:
    """The :class:`SelfCheckConfig` of parsed ``selfcheck`` arguments (repeated ep sizes dropped)."""
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
        hpz=args.hpz,
        gpus_per_node=args.gpus_per_node,
        with_megatron=args.with_megatron,
        backend=args.backend,
        timeout=args.timeout,
        inject_fault=args.inject_fault,
        verbose=args.verbose,
    )


def run(args: argparse.Namespace) -> int:
    """Run the self-check for parsed arguments; returns the exit status (0 pass, 1 fail, 2 bad input).

    Under a launcher this process is one rank; otherwise it spawns ``--nproc`` ranks,
    waits for them (never past ``--timeout``) and prints the report.
    """
    config = config_from_args(args)
    if _launched():
        return _run_launched(config)
    start = time.monotonic()
    world_size = config.nproc or _DEFAULT_NPROC
    validate(config, world_size)  # LayoutError: exit 2 before any process starts
    _resolve_backend(config.backend, world_size)
    collected, missing = _run_spawned(config, world_size)
    report, passed = format_report(
        config, world_size, collected, missing, time.monotonic() - start, launcher="spawned locally"
    )
    _write(report)
    return 0 if passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mpu_bridge.selfcheck [options]``: the same as ``mpu-bridge selfcheck [options]``."""
    from .cli import main as cli_main

    return cli_main(["selfcheck", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    # Run through the package's module (not this __main__ copy), so spawned ranks
    # unpickle the same classes the parent uses.
    from mpu_bridge.selfcheck import main as _main

    raise SystemExit(_main())
