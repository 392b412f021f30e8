"""Per-rank check programs of the integration suite: run under ``torchrun``, one process per rank.

Usage (every node of the job runs the same command)::

    torchrun --standalone --nproc-per-node 8 integration_tests/rank_checks.py \\
        megatron standalone nccl deepspeed --layout tp=2,ep=2 --layout pp=2,ep=2 --extra-ep 2 4 8

Each rank reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``
from torchrun and initialises ``torch.distributed`` itself: NCCL bound to
``cuda:<LOCAL_RANK>`` (``device_id``, as DeepSpeed does on GPUs; the bridge then
creates groups with ``split_group``) when CUDA has a device for every local rank,
gloo otherwise (``--backend`` overrides). Then it runs the named programs, in
order, in that one world:

``megatron``
    for every ``--layout``: megatron-core's ``initialize_model_parallel``, then
    ``mpu_bridge.attach(parallel_state)``. Every dense query of the bridge returns
    megatron-core's own group object (same ranks, rank and size as the
    ``parallel_state`` getters), attaching and answering them creates no process
    group, ``expert_groups`` of megatron-core's own ``ep`` reuses its expert groups
    (created stays 0), the legacy MPU answers what ``parallel_state`` answers, and
    the group creation strategy is ``split_group`` on NCCL, ``local_new_group`` on
    gloo. For every other expert-parallel size of ``--extra-ep`` the layout allows,
    the expert and expert-data groups equal megatron-core's own ``RankGenerator``
    for that size. In every group, an all-reduce of the global ranks gives the sum
    of the group's ranks (membership on the real fabric).
``nccl`` (NCCL only)
    megatron-core with high-priority-stream communicators (``ProcessGroupNCCL.Options``)
    for tp/dp/ep: the bridge borrows them as they are (same objects, options kept,
    nothing created); a bridge with ``pg_options=ProcessGroupNCCL.Options(
    is_high_priority_stream=True)`` creates its derived groups with
    ``split_group`` and those options; all-reduces on the GPU give the right sums.
``standalone``
    for every ``--layout``, no megatron-core: ``mpu_bridge.attach(None, tp=..., pp=...,
    cp=..., ep=..., etp=..., order=...)``, a full standalone layout. Every kind of the
    kind table (``bridge.group``) has the planner's ranks and sums right in an
    all-reduce; on NCCL the default group is bound to the GPU and the strategy is
    ``split_group`` (``local_new_group`` on gloo). ``torch.distributed.split_group``
    is counted: exactly one call per partition the bridge creates (none for a rank set
    it already holds), no partition split twice, the same number of calls on every rank,
    no fallback to ``new_group``; none at all on gloo. Then the exports:
    ``bridge.process_group_collection()`` (every non-None field's all-reduce) and
    ``bridge.device_mesh(device_type=<cuda|cpu>)`` (and the expert mesh with ep > 1):
    building them creates no process group, each dim's group is the bridge's own
    object, all-reduces over the mesh's groups and a DTensor shard -> replicate
    round trip along every dim give the right numbers.
``deepspeed``
    megatron-core tp=2; ``deepspeed.initialize(mpu=bridge.as_legacy_mpu())`` trains
    two ZeRO-2 steps of a model with a tensor-parallel weight; the parameters equal a
    float64 plain-torch reference, and DeepSpeed's data-parallel, ZeRO and
    model-parallel groups are the bridge's. The bridge's ``ep_size_2`` expert groups
    equal the ones DeepSpeed builds itself over the same MPU.

Checks never stop a program early (every rank runs the same collectives whatever
the outcome); at the end of each case every rank's failures are gathered, rank 0
prints ``PASS``/``FAIL`` lines, ``--report FILE`` (written by rank 0) gets them as
JSON, and every rank exits 1 if anything failed. An exception on a rank ends that
rank at once (torchrun then stops the others); ``--timeout`` bounds the run on
every rank (a stuck rank dumps its stack and exits).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import importlib
import inspect
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

import mpu_bridge
from mpu_bridge.errors import LayoutError

# Run as a script (torchrun integration_tests/rank_checks.py), this directory is on sys.path.
from nightly_layouts import parse_spec

PROGRAMS: Tuple[str, ...] = ("megatron", "standalone", "nccl", "deepspeed")
EXIT_FAILED = 1
EXIT_USAGE = 2


# -- the world ------------------------------------------------------------------------


@dataclass
class World:
    """This rank's place in the torchrun job and the device its collectives use."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    timeout_s: float

    @property
    def bound(self) -> bool:
        """Whether the default group is bound to a device (NCCL with ``device_id``)."""
        return getattr(c10d._get_default_group(), "bound_device_id", None) is not None

    def expected_strategy(self) -> str:
        """What ``strategy="auto"`` must pick here (see :mod:`mpu_bridge.registry`)."""
        return "split_group" if self.bound else "local_new_group"


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise SystemExit(f"rank_checks.py: {name} is not set; launch with torchrun (see --help)")
        return default
    return int(value)


def init_world(backend: str, timeout_s: float) -> World:
    """Initialise torch.distributed from torchrun's environment (NCCL bound to the local GPU)."""
    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        backend = "nccl" if devices >= local_world_size else "gloo"
    kwargs: Dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    device = torch.device("cpu")
    if backend == "nccl":
        if devices < local_world_size:
            raise SystemExit(
                f"rank_checks.py: --backend nccl needs a GPU per local rank: {local_world_size} local "
                f"ranks, {devices} GPUs visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)
    return World(rank, world_size, local_rank, local_world_size, backend, device, timeout_s)


# -- recording checks -------------------------------------------------------------------


@dataclass
class Case:
    """One program × layout on this rank: how many checks ran and which failed."""

    program: str
    layout: str
    rank: int
    checks: int = 0
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(f"rank {self.rank}: {what}")
        return ok

    def equal(self, what: str, got: Any, want: Any) -> bool:
        return self.expect(got == want, f"{what}: got {got!r}, expected {want!r}")

    def close_to(self, what: str, got: Sequence[float], want: Sequence[float], rel: float, abs_: float) -> bool:
        flat_got, flat_want = _flatten(got), _flatten(want)
        worst = max((abs(g - w) - (abs_ + rel * abs(w)) for g, w in zip(flat_got, flat_want)), default=0.0)
        return self.expect(
            len(flat_got) == len(flat_want) and worst <= 0,
            f"{what}: {flat_got[:6]} not within rel {rel:g} / abs {abs_:g} of {flat_want[:6]}",
        )


def _flatten(values: Any) -> List[float]:
    if isinstance(values, (list, tuple)):
        return [x for v in values for x in _flatten(v)]
    return [float(values)]


@dataclass
class Outcome:
    """A case as every rank saw it (rank 0's report)."""

    program: str
    layout: str
    passed: bool
    checks: int
    failures: List[str]
    notes: List[str]


def settle(world: World, case: Case, started: float) -> Outcome:
    """Gather every rank's result of ``case`` (collective) and print it on rank 0."""
    gathered: List[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, (case.checks, case.failures, case.notes))
    failures = [f for _, fs, _ in gathered for f in fs]
    checks = sum(n for n, _, _ in gathered)
    outcome = Outcome(case.program, case.layout, not failures, checks, failures, case.notes)
    if world.rank == 0:
        label = f"{case.program}[{case.layout}]"
        status = "PASS" if outcome.passed else "FAIL"
        print(
            f"{status} {label}: {checks} checks on {world.world_size} ranks "
            f"({world.backend}, {time.monotonic() - started:.1f} s)"
            + (f"; {'; '.join(case.notes)}" if case.notes else ""),
            flush=True,
        )
        for line in failures[:30]:
            print(f"    {line}", flush=True)
        if len(failures) > 30:
            print(f"    ... and {len(failures) - 30} more", flush=True)
    return outcome


# -- helpers on groups --------------------------------------------------------------------


def sum_of_ranks(group: Any, world: World) -> int:
    """All-reduce of this rank's global rank over ``group``: the sum of its members' ranks."""
    value = torch.tensor([world.rank], dtype=torch.int64, device=world.device)
    dist.all_reduce(value, group=group)
    return int(value.item())


def group_ranks(group: Any) -> List[int]:
    return list(dist.get_process_group_ranks(group))


def pg_count() -> int:
    """How many process groups this process holds, by PyTorch's own table."""
    return len(c10d._world.pg_map)


def _quiet() -> None:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def parallel_state() -> Any:
    _quiet()
    from megatron.core import parallel_state as ps

    return ps


def initialize_megatron(ps: Any, sizes: Dict[str, Any], **extra: Any) -> None:
    """megatron-core's ``initialize_model_parallel`` with ``sizes`` (only the keywords it accepts)."""
    accepted = inspect.signature(ps.initialize_model_parallel).parameters
    kwargs: Dict[str, Any] = {
        "tensor_model_parallel_size": sizes["tp"],
        "pipeline_model_parallel_size": sizes["pp"],
        "context_parallel_size": sizes["cp"],
        "expert_model_parallel_size": sizes["ep"],
        "order": sizes["order"],
        "create_gloo_process_groups": False,
        **extra,
    }
    if sizes.get("etp") is not None:
        kwargs["expert_tensor_parallel_size"] = sizes["etp"]
    unknown = sorted(k for k in kwargs if k not in accepted)
    needed = [k for k in unknown if k != "create_gloo_process_groups"]
    if needed:
        raise RuntimeError(f"this megatron-core's initialize_model_parallel has no {', '.join(needed)}")
    ps.initialize_model_parallel(**{k: v for k, v in kwargs.items() if k in accepted})


def megatron_expert_ranks(world_size: int, rank: int, sizes: Dict[str, Any], ep: int) -> Optional[Dict[str, List[int]]]:
    """megatron-core's own expert / expert-data groups of ``rank`` for expert-parallel size ``ep``.

    Computed by megatron-core's ``RankGenerator`` exactly as its
    ``initialize_model_parallel`` builds its expert grid (etp, ep, edp, pp; cp = 1);
    None when the sizes do not fit the world.
    """
    from megatron.core.parallel_state import RankGenerator

    etp = sizes.get("etp") or sizes["tp"]
    pp = sizes["pp"]
    if world_size % (etp * ep * pp):
        return None
    generator = RankGenerator(
        tp=etp, ep=ep, dp=world_size // (etp * ep * pp), pp=pp, cp=1, order=sizes["order"], rank_offset=0
    )
    out = {}
    for kind, token in (("ep", "ep"), ("edp", "dp")):
        mine = [g for g in generator.get_ranks(token) if rank in g]
        out[kind] = sorted(mine[0])
    return out


# -- program: megatron ----------------------------------------------------------------------

# label -> (bridge method, parallel_state group / rank / world size getters)
_DENSE: Dict[str, Tuple[str, Callable[[Any, int], Any], Callable[[Any, int], int], Callable[[Any, int], int]]] = {
    "tensor_parallel": (
        "tensor_parallel",
        lambda ps, cp: ps.get_tensor_model_parallel_group(),
        lambda ps, cp: ps.get_tensor_model_parallel_rank(),
        lambda ps, cp: ps.get_tensor_model_parallel_world_size(),
    ),
    "pipeline_parallel": (
        "pipeline_parallel",
        lambda ps, cp: ps.get_pipeline_model_parallel_group(),
        lambda ps, cp: ps.get_pipeline_model_parallel_rank(),
        lambda ps, cp: ps.get_pipeline_model_parallel_world_size(),
    ),
    "data_parallel": (
        "data_parallel",
        lambda ps, cp: ps.get_data_parallel_group(),
        lambda ps, cp: ps.get_data_parallel_rank(),
        lambda ps, cp: ps.get_data_parallel_world_size(),
    ),
    "sequence_parallel": (
        "sequence_parallel",
        lambda ps, cp: ps.get_context_parallel_group(),
        lambda ps, cp: ps.get_context_parallel_rank(),
        lambda ps, cp: ps.get_context_parallel_world_size(),
    ),
    # data x context parallel when context parallelism is on, else the data-parallel group itself
    "sequence_data_parallel": (
        "sequence_data_parallel",
        lambda ps, cp: ps.get_data_parallel_group(with_context_parallel=cp > 1),
        lambda ps, cp: ps.get_data_parallel_rank(with_context_parallel=cp > 1),
        lambda ps, cp: ps.get_data_parallel_world_size(with_context_parallel=cp > 1),
    ),
    "model_parallel": (
        "model_parallel",
        lambda ps, cp: ps.get_model_parallel_group(),
        lambda ps, cp: dist.get_rank(ps.get_model_parallel_group()),
        lambda ps, cp: dist.get_world_size(ps.get_model_parallel_group()),
    ),
}


def check_megatron_layout(world: World, case: Case, sizes: Dict[str, Any], extra_ep: Sequence[int]) -> None:
    ps = parallel_state()
    initialize_megatron(ps, sizes)
    try:
        groups_before = pg_count()
        megatrons_groups = list(c10d._world.pg_map)  # megatron-core's groups (and the world)
        bridge = mpu_bridge.attach(ps, agreement_timeout=world.timeout_s)
        case.equal("group creation strategy", bridge.strategy, world.expected_strategy())
        case.equal("process groups created by attach", pg_count() - groups_before, 0)

        for label, (method, group_of, rank_of, size_of) in _DENSE.items():
            info = getattr(bridge, method)()
            theirs = group_of(ps, sizes["cp"])
            case.expect(info.group is theirs, f"{label}: not parallel_state's own group object")
            case.equal(f"{label} ranks", list(info.ranks), group_ranks(theirs))
            case.equal(f"{label} rank", info.rank, rank_of(ps, sizes["cp"]))
            case.equal(f"{label} world size", info.world_size, size_of(ps, sizes["cp"]))
            case.expect(info.borrowed, f"{label}: not marked borrowed")
            case.equal(f"{label} all-reduce of ranks", sum_of_ranks(info.group, world), sum(info.ranks))
        case.equal("groups created for the dense queries", bridge.stats()["created"], 0)
        case.equal("process groups created by the dense queries", pg_count() - groups_before, 0)

        own_ep = sizes["ep"]
        experts = bridge.expert_groups(own_ep)
        for label, info, theirs in (
            ("expert_parallel", experts.expert_parallel, ps.get_expert_model_parallel_group()),
            ("expert_data_parallel", experts.expert_data_parallel, ps.get_expert_data_parallel_group()),
        ):
            # Reused: megatron-core's communicator for this rank set (its expert group, or a
            # dense group over the same ranks, e.g. the data-parallel group when ep == dp).
            case.expect(
                any(info.group is g for g in megatrons_groups),
                f"{label}[ep={own_ep}]: not one of megatron-core's communicators",
            )
            case.equal(f"{label}[ep={own_ep}] ranks", list(info.ranks), group_ranks(theirs))
            case.equal(f"{label}[ep={own_ep}] torch ranks", group_ranks(info.group), group_ranks(theirs))
            case.equal(f"{label}[ep={own_ep}] all-reduce of ranks", sum_of_ranks(info.group, world), sum(info.ranks))
        case.equal(f"groups created for megatron-core's own ep={own_ep}", bridge.stats()["created"], 0)

        legacy = bridge.as_legacy_mpu()
        case.equal(
            "legacy get_model_parallel_world_size",
            legacy.get_model_parallel_world_size(),
            sizes["tp"] * sizes["pp"],
        )
        for name, want in (
            ("get_tensor_model_parallel_world_size", ps.get_tensor_model_parallel_world_size()),
            ("get_tensor_model_parallel_rank", ps.get_tensor_model_parallel_rank()),
            ("get_pipeline_model_parallel_world_size", ps.get_pipeline_model_parallel_world_size()),
            ("get_pipeline_model_parallel_rank", ps.get_pipeline_model_parallel_rank()),
            ("get_data_parallel_world_size", ps.get_data_parallel_world_size()),
            ("get_data_parallel_rank", ps.get_data_parallel_rank()),
            ("get_data_parallel_group_ranks", group_ranks(ps.get_data_parallel_group())),
        ):
            case.equal(f"legacy {name}", getattr(legacy, name)(), want)

        checked = []
        for ep in extra_ep:
            if ep == own_ep:
                continue
            oracle = megatron_expert_ranks(world.world_size, world.rank, sizes, ep)
            if oracle is None:
                continue
            created_before = bridge.stats()["created"]
            other = bridge.expert_groups(ep)
            checked.append(ep)
            for label, info, kind in (
                ("expert_parallel", other.expert_parallel, "ep"),
                ("expert_data_parallel", other.expert_data_parallel, "edp"),
            ):
                case.equal(f"{label}[ep={ep}] ranks (megatron-core RankGenerator)", sorted(info.ranks), oracle[kind])
                case.equal(f"{label}[ep={ep}] all-reduce of ranks", sum_of_ranks(info.group, world), sum(info.ranks))
            created = bridge.stats()["created"] - created_before
            case.expect(0 <= created <= 2, f"expert_groups({ep}) created {created} groups on this rank (at most 2)")
            if world.bound and created:
                case.equal(f"expert_groups({ep}) creation", bridge.registry.last_strategy, "split_group")
        if world.rank == 0:
            case.notes.append(f"extra ep sizes checked: {checked or 'none fit'}")
        bridge.close()
    finally:
        ps.destroy_model_parallel()


def run_megatron(world: World, layouts: Sequence[str], extra_ep: Sequence[int]) -> List[Outcome]:
    outcomes = []
    for spec in layouts:
        started = time.monotonic()
        case = Case("megatron", spec, world.rank)
        check_megatron_layout(world, case, parse_spec(spec), extra_ep)
        outcomes.append(settle(world, case, started))
    return outcomes


# -- program: nccl --------------------------------------------------------------------------


def nccl_options(group: Any) -> Any:
    """The ``ProcessGroupNCCL.Options`` a group's CUDA backend was created with."""
    return group._get_backend(torch.device("cuda")).options


def high_priority_options() -> Any:
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return options


# Every communicator name megatron-core 0.16 knows (older releases ignore the ones they lack).
_MEGATRON_COMMUNICATORS = (
    "tp", "pp", "dp", "cp", "mp", "ep", "dp_cp", "tp_cp", "tp_dp", "tp_dp_cp", "ep_tp", "ep_dp",
    "tp_ep_mp", "tp_ep_pp", "embd", "pos_embd", "hcp", "intra_dp_cp", "intra_ep_dp", "inter_ep_dp",
    "intra_dist_opt_instance",
)


def _initialize_megatron_high_priority(ps: Any, sizes: Dict[str, Any], tmp: str) -> None:
    """megatron-core with a high-priority-stream NCCL communicator for every group it builds."""
    accepted = inspect.signature(ps.initialize_model_parallel).parameters
    if "high_priority_stream_groups" in accepted:
        initialize_megatron(ps, sizes, high_priority_stream_groups=list(_MEGATRON_COMMUNICATORS))
        return
    path = os.path.join(tmp, "nccl_communicators.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{name}:\n  is_high_priority_stream: true\n" for name in _MEGATRON_COMMUNICATORS))
    initialize_megatron(ps, sizes, nccl_communicator_config_path=path)


def _check_created_options(
    world: World, case: Case, bridge: Any, ep: int, high_priority: bool
) -> None:
    """``bridge.expert_groups(ep)``: created with split_group, with (or without) high-priority streams."""
    before = bridge.stats()["created"]
    experts = bridge.expert_groups(ep)
    if bridge.stats()["created"] > before:
        case.equal(f"expert_groups({ep}) creation", bridge.registry.last_strategy, "split_group")
    pairs = (("expert_parallel", experts.expert_parallel), ("expert_data_parallel", experts.expert_data_parallel))
    for label, info in pairs:
        case.equal(f"{label}[ep={ep}] all-reduce on cuda", sum_of_ranks(info.group, world), sum(info.ranks))
        if info.borrowed:
            continue
        case.equal(
            f"{label}[ep={ep}] (created {'with' if high_priority else 'without'} pg_options): "
            "high-priority stream",
            bool(nccl_options(info.group).is_high_priority_stream),
            high_priority,
        )


def check_nccl_layout(world: World, case: Case, sizes: Dict[str, Any], extra_ep: Sequence[int]) -> None:
    ps = parallel_state()
    with tempfile.TemporaryDirectory() as tmp:
        _initialize_megatron_high_priority(ps, sizes, tmp)
    try:
        megatrons_groups = list(c10d._world.pg_map)
        bridge = mpu_bridge.attach(ps, agreement_timeout=world.timeout_s)
        case.equal("group creation strategy", bridge.strategy, "split_group")
        own = bridge.expert_groups(sizes["ep"])
        for label, info in (
            ("tensor_parallel", bridge.tensor_parallel()),
            ("data_parallel", bridge.data_parallel()),
            ("sequence_data_parallel", bridge.sequence_data_parallel()),
            ("model_parallel", bridge.model_parallel()),
            (f"expert_parallel[ep={sizes['ep']}]", own.expert_parallel),
            (f"expert_data_parallel[ep={sizes['ep']}]", own.expert_data_parallel),
        ):
            case.expect(
                info.borrowed and any(info.group is g for g in megatrons_groups),
                f"{label}: not megatron-core's communicator",
            )
            case.equal(
                f"{label}: megatron-core's high-priority stream kept",
                bool(nccl_options(info.group).is_high_priority_stream),
                True,
            )
            case.equal(f"{label} all-reduce on cuda", sum_of_ranks(info.group, world), sum(info.ranks))
        case.equal("groups created over megatron-core's NCCL groups", bridge.stats()["created"], 0)

        with_options = mpu_bridge.attach(ps, agreement_timeout=world.timeout_s, pg_options=high_priority_options())
        case.equal("strategy with pg_options", with_options.strategy, "split_group")
        checked = []
        for ep in extra_ep:
            if ep == sizes["ep"] or megatron_expert_ranks(world.world_size, world.rank, sizes, ep) is None:
                continue
            checked.append(ep)
            _check_created_options(world, case, bridge, ep, high_priority=False)
            _check_created_options(world, case, with_options, ep, high_priority=True)
        zero = with_options.zero_param_groups(2)
        case.equal("hpZ group all-reduce on cuda", sum_of_ranks(zero.group, world), sum(zero.ranks))
        if world.rank == 0:
            case.notes.append(f"extra ep sizes created without / with pg_options: {checked or 'none fit'}")
        with_options.close()
        bridge.close()
    finally:
        ps.destroy_model_parallel()


def run_nccl(world: World, layouts: Sequence[str], extra_ep: Sequence[int]) -> List[Outcome]:
    if world.backend != "nccl" or not world.bound:
        raise SystemExit(
            "rank_checks.py: the nccl program needs NCCL bound to a GPU per rank (it runs on the "
            f"nightly GPU job); this world uses {world.backend}"
        )
    outcomes = []
    for spec in layouts:
        started = time.monotonic()
        case = Case("nccl", spec, world.rank)
        check_nccl_layout(world, case, parse_spec(spec), extra_ep)
        outcomes.append(settle(world, case, started))
    return outcomes


# -- program: standalone ---------------------------------------------------------------------


class SplitCounter:
    """Counts ``torch.distributed.split_group`` calls while installed (a context manager).

    Each call is recorded as (partition key, split ranks) and timed (``seconds``, in
    call order); the key is the ``group_desc`` the bridge passes (the partition's key)
    where PyTorch accepts it. ``functools.wraps`` keeps the signature the bridge inspects.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[str, List[List[int]]]] = []
        self.seconds: List[float] = []
        self._original: Any = None

    def timing_note(self) -> str:
        """``split_group: 9 calls, 1.234 s in all, slowest 0.400 s (tp-dp-cp[...])``."""
        if not self.seconds:
            return "split_group: no calls"
        slowest = max(range(len(self.seconds)), key=self.seconds.__getitem__)
        return (f"split_group: {len(self.seconds)} calls, {sum(self.seconds):.3f} s in all, median "
                f"{sorted(self.seconds)[len(self.seconds) // 2]:.3f} s, slowest {self.seconds[slowest]:.3f} s "
                f"({self.calls[slowest][0] or 'no group_desc'})")

    def __enter__(self) -> "SplitCounter":
        self._original = getattr(dist, "split_group", None)
        if self._original is not None:
            original = self._original

            @functools.wraps(original)
            def counting(parent_pg: Any = None, split_ranks: Any = None, *args: Any, **kwargs: Any) -> Any:
                self.calls.append((str(kwargs.get("group_desc", "")), [list(r) for r in split_ranks or []]))
                started = time.perf_counter()
                try:
                    return original(parent_pg, split_ranks, *args, **kwargs)
                finally:
                    self.seconds.append(time.perf_counter() - started)

            dist.split_group = counting
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            dist.split_group = self._original


def _standalone_sizes(sizes: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: sizes[k] for k in ("tp", "pp", "cp", "ep") if sizes.get(k) is not None}
    if sizes.get("etp") is not None:
        out["etp"] = sizes["etp"]
    return out


def _check_standalone_kinds(world: World, case: Case, bridge: Any, layout: Any, counter: SplitCounter) -> None:
    """Every kind: the planner's ranks, an all-reduce, one split_group call per new partition."""
    from mpu_bridge.kinds import KIND_TABLE

    for kind in KIND_TABLE:
        want = sorted(layout.group_of(kind.name, world.rank))
        channel = "ag" if kind.twin_of else ""  # an all-gather twin: a communicator of its own
        existed = bridge.registry.lookup(want, channel) is not None
        calls, created = len(counter.calls), bridge.stats()["created"]
        info = bridge.group(kind.name)
        case.equal(f"{kind.name} ranks (planner)", sorted(info.ranks), want)
        case.equal(f"{kind.name}: groups created ({'reused' if existed else 'new'} rank set)",
                   bridge.stats()["created"] - created, 0 if existed else 1)
        case.equal(f"{kind.name} all-reduce of ranks", sum_of_ranks(info.group, world), sum(info.ranks))
        new_calls = len(counter.calls) - calls
        if world.bound:
            case.equal(f"{kind.name}: split_group calls ({'reused' if existed else 'created'})",
                       new_calls, 0 if existed else 1)
        else:
            case.equal(f"{kind.name}: split_group calls on an unbound {world.backend} world", new_calls, 0)
        if not existed and world.bound:
            case.equal(f"{kind.name}: creation strategy", bridge.registry.last_strategy, "split_group")
        elif not existed:  # gloo: member-only, or all-ranks where that would be unsafe (stale names)
            case.expect(bridge.registry.last_strategy in ("local_new_group", "new_group"),
                        f"{kind.name}: creation strategy {bridge.registry.last_strategy!r} on gloo")


def _check_standalone_collection(world: World, case: Case, bridge: Any, layout: Any) -> None:
    """Every non-None field of the collection: its ranks and an all-reduce (embedding groups last)."""
    from mpu_bridge import partitions
    from mpu_bridge.pg_collection import FIELD_KINDS, declared_fields

    pgc = bridge.process_group_collection(all_gather=True)  # the all-gather twins too (>= 0.18)
    held = vars(pgc)  # megatron-core 0.19's __getattr__ answers None for unset fields
    embedding = {"embd": partitions.embedding(layout, world.rank).own,
                 "pos_embd": partitions.position_embedding(layout, world.rank).own}
    for name in declared_fields(type(pgc)):
        group = held.get(name)
        if name == "expt_dp_ag" and layout.config.ep == 1:
            case.expect(group is None, "pg_collection.expt_dp_ag is None without experts, as in megatron-core")
        elif name in FIELD_KINDS:
            case.equal(f"pg_collection.{name} ranks", sorted(group_ranks(group)),
                       sorted(layout.group_of(FIELD_KINDS[name], world.rank)))
        elif name in embedding:
            want = embedding[name]
            case.equal(f"pg_collection.{name} ranks", None if group is None else sorted(group_ranks(group)),
                       None if want is None else sorted(want))
        if group is not None:
            case.equal(f"pg_collection.{name} all-reduce of ranks", sum_of_ranks(group, world),
                       sum(group_ranks(group)))


def _check_mesh(world: World, case: Case, bridge: Any, label: str, **kwargs: Any) -> None:
    """A mesh on this world's device: nothing created, the bridge's groups, collectives and DTensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    held, created = pg_count(), bridge.stats()["created"]
    mesh = bridge.device_mesh(device_type=world.device.type, **kwargs)
    case.equal(f"{label}: process groups created by building it", pg_count() - held, 0)
    case.equal(f"{label}: groups the bridge created for it", bridge.stats()["created"] - created, 0)
    case.equal(f"{label}: device type", mesh.device_type, world.device.type)
    names = tuple(mesh.mesh_dim_names or ())
    ep_size = kwargs.get("ep_size")
    for name in names:
        group = mesh.get_group(name)
        own = bridge.group(name, ep_size=ep_size) if kwargs.get("expert") else bridge.group(name)
        case.expect(group is own.group, f"{label}[{name!r}]: not the bridge's own group object")
        case.equal(f"{label}[{name!r}] all-reduce on {world.device.type}", sum_of_ranks(group, world),
                   sum(group_ranks(group)))
    values = torch.arange(2 * world.world_size, dtype=torch.float32, device=world.device)
    for axis, name in enumerate(names):
        placements: List[Any] = [Replicate()] * len(names)
        placements[axis] = Shard(0)
        sharded = distribute_tensor(values, mesh, placements)
        full = sharded.redistribute(mesh, [Replicate()] * len(names)).to_local()
        case.equal(f"{label}[{name!r}] DTensor Shard(0) -> Replicate", full.cpu().tolist(), values.cpu().tolist())


def check_standalone_layout(world: World, case: Case, sizes: Dict[str, Any]) -> int:
    """One standalone full layout; returns this rank's split_group calls (their timings
    go into the case's notes: rank 0's calls, and the slowest rank's total)."""
    from mpu_bridge.layout import plan

    layout = plan(world.world_size, order=sizes["order"], **_standalone_sizes(sizes))
    if world.backend == "nccl":
        case.expect(world.bound, "NCCL default group not bound to a device (init_process_group device_id)")
    with SplitCounter() as counter:
        bridge = mpu_bridge.attach(None, order=sizes["order"], agreement_timeout=world.timeout_s,
                                   **_standalone_sizes(sizes))
        try:
            case.equal("group creation strategy", bridge.strategy, world.expected_strategy())
            case.equal("process groups created by attach", len(counter.calls), 0)
            _check_standalone_kinds(world, case, bridge, layout, counter)
            _check_standalone_collection(world, case, bridge, layout)
            keys = [key for key, _ in counter.calls]
            if keys and all(keys):  # group_desc = the partition's key: none split twice
                case.equal("partitions split more than once", sorted({k for k in keys if keys.count(k) > 1}), [])
            counts: List[Any] = [None] * world.world_size
            dist.all_gather_object(counts, len(counter.calls))
            case.equal("split_group calls on every rank (collective: the same number)", counts,
                       [len(counter.calls)] * world.world_size)
            if world.bound:
                case.expect(len(counter.calls) > 0, "no split_group call on a bound NCCL world")
                case.equal("batches that fell back to new_group", bridge.stats()["fallbacks"], 0)
                totals: List[Any] = [None] * world.world_size
                dist.all_gather_object(totals, sum(counter.seconds))
                if world.rank == 0:
                    case.notes.append(f"{counter.timing_note()} on rank 0; slowest rank {max(totals):.3f} s in all")
            _check_mesh(world, case, bridge, "device_mesh")
            if layout.config.ep > 1:
                _check_mesh(world, case, bridge, "expert device_mesh", expert=True)
        finally:
            bridge.close()
    return len(counter.calls)


def run_standalone(world: World, layouts: Sequence[str]) -> List[Outcome]:
    outcomes = []
    for spec in layouts:
        started = time.monotonic()
        case = Case("standalone", spec, world.rank)
        calls = check_standalone_layout(world, case, parse_spec(spec))
        if world.rank == 0:
            case.notes.append(f"split_group calls per rank: {calls} (strategy {world.expected_strategy()})")
        outcomes.append(settle(world, case, started))
    return outcomes


# -- program: deepspeed ---------------------------------------------------------------------

_DS_TP = 2
_DS_STEPS = 2
_DS_LR = 0.1
_DS_MICRO_BATCH = 2
_DS_IN, _DS_OUT = 3, 4  # the column weight's OUT rows are split over the TP ranks


def _ds_initial() -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(_DS_OUT, _DS_IN, generator=gen), torch.randn(_DS_IN, generator=gen)


def _ds_batch(step: int, dp_rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + 100 * step + dp_rank)
    return (
        torch.randn(_DS_MICRO_BATCH, _DS_IN, generator=gen),
        torch.randn(_DS_MICRO_BATCH, _DS_OUT, generator=gen),
        torch.randn(_DS_MICRO_BATCH, generator=gen),
    )


def _ds_loss(inputs: Any, column: Any, column_target: Any, shared: Any, shared_target: Any) -> Any:
    column_error = ((inputs @ column.T - column_target) ** 2).sum()
    shared_error = ((inputs @ shared - shared_target) ** 2).sum()
    return (column_error + shared_error) / inputs.shape[0]


def _ds_rows(tp_rank: int) -> slice:
    rows = _DS_OUT // _DS_TP
    return slice(tp_rank * rows, (tp_rank + 1) * rows)


def _ds_reference(dp: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float64: SGD on the mean loss over the data-parallel ranks, no clipping."""
    column, shared = (t.double().requires_grad_() for t in _ds_initial())
    for step in range(_DS_STEPS):
        losses = []
        for dp_rank in range(dp):
            inputs, column_target, shared_target = (t.double() for t in _ds_batch(step, dp_rank))
            losses.append(_ds_loss(inputs, column, column_target, shared, shared_target))
        column.grad = shared.grad = None
        (sum(losses) / dp).backward()
        with torch.no_grad():
            column -= _DS_LR * column.grad
            shared -= _DS_LR * shared.grad
    return column.detach(), shared.detach()


def _start_deepspeed(world: World) -> Any:
    """Import DeepSpeed for this world's device and attach it to the existing process group."""
    if world.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if world.device.type == "cpu":
        # No CPU shared-memory op build (30-70 s of compiling): gloo does the collectives.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=world.backend)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def check_deepspeed(world: World, case: Case) -> None:
    deepspeed = _start_deepspeed(world)
    from deepspeed.utils import groups as ds_groups

    ps = parallel_state()
    sizes = parse_spec(f"tp={_DS_TP}")
    initialize_megatron(ps, sizes)
    try:
        bridge = mpu_bridge.attach(ps, agreement_timeout=world.timeout_s)
        legacy = bridge.as_legacy_mpu()
        tp_rank = ps.get_tensor_model_parallel_rank()
        dp_rank = ps.get_data_parallel_rank()
        dp = ps.get_data_parallel_world_size()
        column, shared = _ds_initial()

        class ShardedRegression(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.column = torch.nn.Parameter(column[_ds_rows(tp_rank)].clone())
                self.column.tensor_model_parallel = True
                self.shared = torch.nn.Parameter(shared.clone())

            def forward(self, inputs: Any, column_target: Any, shared_target: Any) -> Any:
                return _ds_loss(inputs, self.column, column_target[:, _ds_rows(tp_rank)], self.shared, shared_target)

        model = ShardedRegression().to(world.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=_DS_LR)
        config = {
            "train_micro_batch_size_per_gpu": _DS_MICRO_BATCH,
            "train_batch_size": _DS_MICRO_BATCH * dp,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 2},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=legacy)
        for step in range(_DS_STEPS):
            loss = engine(*(t.to(world.device) for t in _ds_batch(step, dp_rank)))
            engine.backward(loss)
            engine.step()

        want_column, want_shared = _ds_reference(dp)
        case.close_to(
            "column weight after two ZeRO-2 steps (vs float64 reference)",
            model.column.detach().cpu().double().tolist(),
            want_column[_ds_rows(tp_rank)].tolist(),
            rel=1e-4,
            abs_=1e-5,
        )
        case.close_to(
            "shared weight after two ZeRO-2 steps (vs float64 reference)",
            model.shared.detach().cpu().double().tolist(),
            want_shared.tolist(),
            rel=1e-4,
            abs_=1e-5,
        )
        case.equal("engine data-parallel size", engine.dp_world_size, dp)
        case.equal("engine model-parallel size", engine.mp_world_size, _DS_TP)
        case.equal(
            "engine data-parallel group ranks",
            group_ranks(engine.data_parallel_group),
            list(bridge.data_parallel().ranks),
        )
        case.equal(
            "engine ZeRO group ranks",
            group_ranks(engine.seq_data_parallel_group),
            list(bridge.sequence_data_parallel().ranks),
        )

        # DeepSpeed's own E+M+D expert groups over the same MPU equal the bridge's.
        if world.world_size % (_DS_TP * 2) == 0:
            name = "ep_size_2"
            ds_groups.mpu = legacy
            ds_groups._create_expert_data_and_model_parallel(2, mpu=legacy)
            experts = bridge.expert_groups(2)
            case.equal(
                "DeepSpeed's own ep_size_2 expert-parallel ranks",
                sorted(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name]),
                sorted(experts.expert_parallel.ranks),
            )
            case.equal(
                "DeepSpeed's own ep_size_2 expert-data-parallel ranks",
                sorted(ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name]),
                sorted(experts.expert_data_parallel.ranks),
            )
            case.equal(
                "bridge ep_size_2 all-reduce of ranks",
                sum_of_ranks(experts.expert_parallel.group, world),
                sum(experts.expert_parallel.ranks),
            )
        bridge.close()
    finally:
        ps.destroy_model_parallel()


def run_deepspeed(world: World) -> List[Outcome]:
    if world.world_size % _DS_TP:
        raise SystemExit(f"rank_checks.py: the deepspeed program needs an even world size, got {world.world_size}")
    started = time.monotonic()
    case = Case("deepspeed", f"tp={_DS_TP},zero=2", world.rank)
    check_deepspeed(world, case)
    return [settle(world, case, started)]


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rank_checks.py",
        description="Integration checks of mpu-bridge, one process per rank (launch with torchrun).",
        epilog="Example: torchrun --standalone --nproc-per-node 8 integration_tests/rank_checks.py "
        "megatron nccl --layout tp=2,ep=2 --layout pp=2,ep=2 --extra-ep 2 4 8",
    )
    parser.add_argument("programs", nargs="+", choices=PROGRAMS, help="programs to run, in order")
    parser.add_argument(
        "--layout",
        action="append",
        default=None,
        metavar="SPEC",
        help="sizes for the megatron, standalone and nccl programs, e.g. tp=2,pp=2,ep=2,etp=1,"
        "order=tp-cp-ep-dp-pp; repeat for several (default: tp=2,ep=2)",
    )
    parser.add_argument(
        "--extra-ep",
        type=int,
        nargs="+",
        default=[2, 4],
        metavar="N",
        help="expert-parallel sizes checked besides megatron-core's own, where they fit (default 2 4)",
    )
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck rank gives up")
    parser.add_argument("--report", default=None, help="rank 0 writes every case's outcome here as JSON")
    args = parser.parse_args(argv)
    layouts = []
    for chunk in args.layout or ["tp=2,ep=2"]:
        layouts.extend(chunk.split())  # "--layout 'a b c'" from the nightly script
    try:
        for spec in layouts:
            parse_spec(spec)
    except LayoutError as exc:
        parser.error(str(exc))
    args.layout = layouts
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    _quiet()
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # never hang past --timeout
    world = init_world(args.backend, args.timeout)
    outcomes: List[Outcome] = []
    try:
        for program in args.programs:
            if program == "megatron":
                outcomes += run_megatron(world, args.layout, args.extra_ep)
            elif program == "standalone":
                outcomes += run_standalone(world, args.layout)
            elif program == "nccl":
                outcomes += run_nccl(world, args.layout, args.extra_ep)
            else:
                outcomes += run_deepspeed(world)
    except Exception:
        sys.stderr.write(f"rank {world.rank}: {traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(EXIT_FAILED)  # the others may wait in a collective: torchrun stops them
    finally:
        faulthandler.cancel_dump_traceback_later()
    passed = all(o.passed for o in outcomes)
    if world.rank == 0:
        if args.report:
            with open(args.report, "w", encoding="utf-8") as handle:
                json.dump({"world_size": world.world_size, "backend": world.backend,
                           "strategy": world.expected_strategy(),
                           "cases": [o.__dict__ for o in outcomes]}, handle, indent=1)
        print(f"{'PASS' if passed else 'FAIL'}: {len(outcomes)} cases on {world.world_size} ranks", flush=True)
    dist.destroy_process_group()
    return 0 if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
