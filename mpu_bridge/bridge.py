"""The bridge: every process group of MoE / ZeRO / sequence parallelism, derived from one MPU.

``attach(mpu)`` reads the MPU (any flavour :mod:`mpu_bridge.mpu` knows), checks it
against the world, registers the MPU's own groups as *borrowed*, and then derives
expert, sequence-data, hpZ and all-to-all groups on request. Every derived group
is a partition of the world computed by :mod:`mpu_bridge.layout`; creation goes
through one :class:`~mpu_bridge.registry.GroupRegistry`, which reuses any rank set
that already has a communicator (the MPU's or an earlier request's).

Example (every rank)::

    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(2, 2)
    with mpu_bridge.attach(parallel_state) as bridge:
        experts = bridge.expert_groups(4)
        experts.expert_parallel.group        # this rank's EP group
        engine, *_ = deepspeed.initialize(model=m, mpu=bridge.as_legacy_mpu(), ...)
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from .errors import BridgeError, LayoutError, MpuError
from .layout import DEFAULT_ORDER, Layout, expert_order, plan
from .mpu import DIMENSION_KINDS, MpuReader
from .registry import GroupRegistry, Partition

__all__ = ["GroupInfo", "ExpertGroups", "AllToAllGroups", "Bridge", "attach"]

logger = logging.getLogger(__name__)

# Bridge dimension -> the Layout kind holding the same rank sets (the MPU's own
# combined groups, e.g. "tp-dp", are borrowed too, so derived groups can reuse them).
_DIM_TO_KIND = dict(DIMENSION_KINDS)
#: MPU getters of a group that may span the whole world without answering a dimension.
_WORLD_SIZED_GETTERS = ("get_intra_distributed_optimizer_instance_group",)
_EXPERT_DIMS = frozenset(("ep", "edp", "etp", "etp-ep", "etp-ep-pp"))

# Orders tried, in this sequence, when the MPU does not say which it used.
_FALLBACK_ORDERS = (DEFAULT_ORDER, "tp-cp-dp-ep-pp", "tp-pp-dp", "tp-cp-ep-pp-dp")


@dataclass(frozen=True)
class GroupInfo:
    """One rank's view of one process group.

    ``ranks`` are the group's global ranks in group-rank order, so ``src_rank``
    (``ranks[0]``) is right for strided groups too.

    Example: on rank 5 of ``plan(16, tp=2, ep=4)``, the EP group has
    ``ranks == (1, 3, 5, 7)``, ``rank == 2``, ``src_rank == 1``.
    """

    name: str
    group: Any
    ranks: Tuple[int, ...]
    rank: int
    borrowed: bool = False

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def src_rank(self) -> int:
        """Global rank of the group's rank 0."""
        return self.ranks[0]


@dataclass(frozen=True)
class ExpertGroups:
    """The expert-parallel and expert-data-parallel groups of one expert-parallel size.

    Named like DeepSpeed's (``"ep_size_4"``).
    """

    name: str
    ep_size: int
    expert_parallel: GroupInfo
    expert_data_parallel: GroupInfo
    layout: Layout
    data_before_expert: bool
    expert_tensor_parallel: bool


@dataclass(frozen=True)
class AllToAllGroups:
    """Node-local and cross-node groups for hierarchical all-to-all.

    ``local`` holds the GPUs of this rank's node; ``cross_node`` the same local
    rank on every node (``None`` on a single node, like DeepSpeed which creates
    no ``global_*`` group there). :meth:`as_dict` uses DeepSpeed's names.
    """

    gpus_per_node: int
    num_nodes: int
    local: GroupInfo
    cross_node: Optional[GroupInfo]

    def as_dict(self) -> Dict[str, Any]:
        """``{"local_<node>": group, "global_<local rank>": group}`` for this rank."""
        node = self.local.ranks[0] // self.gpus_per_node
        out = {f"local_{node}": self.local.group}
        if self.cross_node is not None:
            out[f"global_{self.cross_node.ranks[0]}"] = self.cross_node.group
        return out


def _layout_partition(key: str, layout: Layout, kind: str, rank: int) -> Partition:
    return Partition.from_layout(layout, kind, rank, key=key)


def _block_partition(key: str, layout: Layout, kind: str, block: int, rank: int) -> Partition:
    """Consecutive blocks of ``block`` members of every group of ``kind``.

    Raises LayoutError unless the blocks of each group are translates of the first
    block (true for single-dimension kinds, and whenever blocks align with dims).
    """
    first = layout.group(kind, 0)
    size = len(first)
    if size % block:
        raise LayoutError(
            f"partition size {block} does not divide the {kind} group size {size}; "
            f"choose a divisor of {size}"
        )
    offsets = [r - first[0] for r in first]
    pattern = offsets[:block]
    for start in range(0, size, block):
        chunk = [o - offsets[start] for o in offsets[start : start + block]]
        if chunk != pattern:
            raise LayoutError(
                f"blocks of {block} ranks of the {kind} group {first} are not all shaped alike; "
                f"choose a block size that divides or is a multiple of the innermost dimension"
            )

    def groups() -> Iterator[List[int]]:
        for members in layout.iter_groups(kind):
            for start in range(0, size, block):
                yield members[start : start + block]

    mine = layout.group_of(kind, rank)
    pos = mine.index(rank) // block * block
    return Partition(
        key=key,
        group_size=block,
        num_groups=layout.num_groups(kind) * (size // block),
        own=tuple(mine[pos : pos + block]),
        groups=groups,
    ).as_trusted()  # blocks of layout groups, checked above to be translates


class Bridge:
    """Process groups derived from one MPU (or from the world alone, with no MPU).

    Create with :func:`attach`. All ranks must make the same calls in the same order
    (group creation is collective); the bridge checks that before creating anything
    and raises :class:`~mpu_bridge.errors.PlanMismatchError` on every rank otherwise.
    """

    def __init__(
        self,
        mpu: Optional[object] = None,
        *,
        backend: Optional[str] = None,
        timeout: datetime.timedelta = datetime.timedelta(minutes=10),
        pg_options: Optional[object] = None,
        strategy: str = "auto",
        agreement_timeout: float = 60.0,
        verify_plan: Optional[bool] = None,
        order: Optional[str] = None,
        gpus_per_node: Optional[int] = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise BridgeError(
                "torch.distributed is not initialised; call torch.distributed.init_process_group "
                "(or the trainer's initialisation) before mpu_bridge.attach"
            )
        self._lock = threading.RLock()
        self.world_size: int = dist.get_world_size()
        self.rank: int = dist.get_rank()
        self._gpus_per_node = gpus_per_node
        self._registry_options = dict(
            backend=backend,
            timeout=timeout,
            pg_options=pg_options,
            strategy=strategy,
            agreement_timeout=agreement_timeout,
            verify_plan=verify_plan,
        )
        self._order = order
        self._mpu_object = mpu
        self._default_group = c10d._get_default_group()
        self._closed = False
        self._setup()

    def _setup(self) -> None:
        """Read the MPU (if any), borrow its groups and start an empty registry."""
        self.registry = GroupRegistry(**self._registry_options)
        self.reader: Optional[MpuReader] = None
        self._borrowed: Dict[str, GroupInfo] = {}
        self._derived: Dict[str, GroupInfo] = {}
        self._experts: Dict[str, ExpertGroups] = {}
        self._zero: Dict[int, GroupInfo] = {}
        self._all_to_all: Dict[int, AllToAllGroups] = {}
        if self._mpu_object is None:
            self.layout = plan(self.world_size, order=self._order or DEFAULT_ORDER)
            logger.info("mpu-bridge: standalone (no MPU), data parallel = world of %d", self.world_size)
            return
        self.reader = MpuReader(self._mpu_object)
        with self.reader.snapshot():  # the MPU does not change while it is read here
            self.reader.check_against_world(self.world_size, self.rank)
            self.layout = self._layout_from_mpu(self._order)
            self._borrow_mpu_groups()
        logger.info(
            "mpu-bridge: attached to a %s MPU (tp=%d pp=%d dp=%d cp=%d, order %s)",
            self.reader.flavour,
            self.layout.config.tp,
            self.layout.config.pp,
            self.layout.config.dp,
            self.layout.config.cp,
            self.layout.config.order,
        )

    # -- staying current -------------------------------------------------------

    def _check_live(self) -> None:
        """Refuse to serve stale groups; rebuild when the MPU was re-initialised.

        * the bridge was closed -> BridgeError;
        * the default process group was destroyed or replaced
          (``destroy_process_group``) -> BridgeError: every group is gone, attach again;
        * the MPU's groups were destroyed (``destroy_model_parallel``) and not yet
          re-created -> MpuError;
        * the MPU answers with other group objects than the ones borrowed (it was
          re-initialised, perhaps with other sizes) -> the bridge destroys what it
          created, reads the MPU again and serves the new groups.
        """
        if self._closed:
            raise BridgeError("this bridge is closed; attach again to get groups")
        if not dist.is_initialized() or c10d._get_default_group() is not self._default_group:
            self._closed = True
            self.registry.close()
            raise BridgeError(
                "the default process group this bridge was attached in has been destroyed "
                "(torch.distributed.destroy_process_group), and every group with it; "
                "re-initialise torch.distributed and the MPU, then call mpu_bridge.attach again"
            )
        if self.reader is None or not self._borrowed:
            return
        dim, info = next(iter(self._borrowed.items()))
        try:
            current = self.reader.group(dim) if self.reader.has(dim, "group") else None
        except MpuError:
            current = None
        if current is info.group and info.group in c10d._world.pg_map:
            return
        if current is None or current not in c10d._world.pg_map:
            raise MpuError(
                f"the MPU's {_DIM_NAMES[dim]} group is gone (was destroy_model_parallel called?); "
                "re-initialise the MPU and the bridge rebuilds on the next call, or close() it"
            )
        logger.warning("mpu-bridge: rank %d: the MPU was re-initialised; rebuilding the bridge", self.rank)
        self.registry.close()
        self._setup()

    # -- reading the MPU -------    # -- reading the MPU -------------------------------------------------------

    def _mpu(self) -> MpuReader:
        if self.reader is None:
            raise BridgeError("this bridge is standalone: it has no MPU")
        return self.reader

    def _layout_from_mpu(self, order: Optional[str]) -> Layout:
        sizes = self._mpu().sizes()
        candidates = [o for o in (order, sizes.order) if o] or list(_FALLBACK_ORDERS)
        last_error: Optional[Exception] = None
        mismatches: List[str] = []
        for candidate in candidates:
            try:
                layout = plan(
                    self.world_size,
                    tp=sizes.tp,
                    pp=sizes.pp,
                    cp=sizes.cp,
                    ep=sizes.ep or 1,
                    etp=sizes.etp,
                    order=candidate,
                )
            except LayoutError as exc:
                last_error = exc
                continue
            wrong = self._mismatching_dims(layout)
            if not wrong:
                return layout
            mismatches.append(f"order {candidate!r}: {'; '.join(wrong)}")
        if not mismatches and last_error is not None:
            raise MpuError(f"the MPU's sizes do not form a Megatron layout: {last_error}")
        raise MpuError(
            "the MPU's own groups match no Megatron rank order on rank "
            f"{self.rank}: " + " | ".join(mismatches) + "; pass attach(mpu, order=...) with its order"
        )

    def _mpu_answers(self, dim: str) -> bool:
        """Whether the MPU gives both the group and its ranks for ``dim`` (expert dims only with ep > 1)."""
        reader = self._mpu()
        if dim in _EXPERT_DIMS and not reader.sizes().ep:
            return False
        return reader.has(dim, "group") and reader.has(dim, "ranks")

    def _mismatching_dims(self, layout: Layout) -> List[str]:
        reader = self._mpu()
        wrong = []
        for dim, kind in _DIM_TO_KIND.items():
            if not self._mpu_answers(dim):
                continue
            theirs = sorted(reader.group_ranks(dim))
            ours = layout.group_of(kind, self.rank)
            if theirs != ours:
                wrong.append(f"{dim} group {theirs} != {ours}")
        return wrong

    def _borrow_mpu_groups(self) -> None:
        reader = self._mpu()
        self._borrow_world_sized_mpu_group(reader)
        for dim in _DIM_TO_KIND:
            if not self._mpu_answers(dim):
                continue
            ranks = tuple(reader.group_ranks(dim))
            group = self.registry.borrow(ranks, reader.group(dim))
            if dim not in _DIM_NAMES:
                continue
            self._borrowed[dim] = GroupInfo(
                name=_DIM_NAMES[dim], group=group, ranks=ranks, rank=ranks.index(self.rank), borrowed=True
            )

    def _borrow_world_sized_mpu_group(self, reader: MpuReader) -> None:
        """Register an MPU group over the whole world (for :meth:`world`), if it has one.

        megatron-core >= 0.11 holds ``_INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP``, the
        whole world when there is one optimizer instance (the default). It answers no
        dimension, so it is read here, and only kept when its ranks are the world.
        """
        for name in _WORLD_SIZED_GETTERS:
            getter = getattr(reader.mpu, name, None)
            if not callable(getter):
                continue
            try:
                group = getter()
                ranks = tuple(dist.get_process_group_ranks(group))
            except Exception:  # not initialised, None, or not a group: nothing to borrow
                continue
            if len(ranks) == self.world_size and sorted(ranks) == list(range(self.world_size)):
                self.registry.borrow(ranks, group)

    # -- creation helper ---------------------------------------------------------

    def _ensure(self, names_and_partitions: Sequence[Tuple[str, Partition]]) -> List[GroupInfo]:
        partitions = [p for _, p in names_and_partitions]
        groups = self.registry.ensure(partitions)
        infos = []
        for (name, part), group in zip(names_and_partitions, groups):
            if part.own is None or group is None:
                raise BridgeError(f"rank {self.rank} is in no group of {part.key}")
            borrowed = self.registry.is_borrowed(group)
            infos.append(
                GroupInfo(name=name, group=group, ranks=part.own, rank=part.own.index(self.rank), borrowed=borrowed)
            )
        return infos

    def _dense(self, dim: str) -> GroupInfo:
        """The MPU's own group for ``dim``, or one derived from the layout."""
        with self._lock:
            self._check_live()
            if dim in self._borrowed:
                return self._borrowed[dim]
            if dim in self._derived:
                return self._derived[dim]
            if self.reader is not None and dim in ("tp", "pp", "mp"):
                # The MPU does not expose it; check it is not silently missing data.
                logger.info("mpu-bridge: the %s MPU has no %s group; creating it", self.reader.flavour, dim)
            kind = _DIM_TO_KIND[dim]
            key = f"{_DIM_NAMES[dim]}[{self._layout_signature(self.layout)}]"
            (info,) = self._ensure([(_DIM_NAMES[dim], _layout_partition(key, self.layout, kind, self.rank))])
            self._derived[dim] = info
            return info

    @staticmethod
    def _layout_signature(layout: Layout) -> str:
        c = layout.config
        return f"tp={c.tp},pp={c.pp},cp={c.cp},ep={c.ep},etp={c.etp},order={c.order}"

    # -- dense queries -----------------------------------------------------------

    def tensor_parallel(self) -> GroupInfo:
        """Tensor-parallel group (size 1 without an MPU)."""
        return self._dense("tp")

    def pipeline_parallel(self) -> GroupInfo:
        """Pipeline-parallel group (size 1 without an MPU)."""
        return self._dense("pp")

    def model_parallel(self) -> GroupInfo:
        """Model-parallel group: tensor × pipeline (Megatron ≥ 2.0, DeepSpeed's grid)."""
        return self._dense("mp")

    def data_parallel(self) -> GroupInfo:
        """Data-parallel group; without an MPU, a clone of the world group."""
        return self._dense("dp")

    def sequence_parallel(self) -> GroupInfo:
        """Sequence (context) parallel group: the MPU's, or size 1."""
        return self._dense("cp")

    def sequence_data_parallel(self) -> GroupInfo:
        """The group ZeRO shards over and gradients are reduced in.

        The MPU's own sequence-data group if it has one; else data × context parallel
        when context parallelism is on; else the data-parallel group.
        """
        with self._lock:
            self._check_live()
            if "sdp" in self._borrowed:
                return self._borrowed["sdp"]
            if self.layout.config.cp == 1:
                return self.data_parallel()
            return self._dense("sdp")

    def world(self) -> GroupInfo:
        """A clone of the world group (DeepSpeed's ``_clone_world_group``); reused if one exists."""
        with self._lock:
            self._check_live()
            if "world" not in self._derived:
                layout = plan(self.world_size)  # its "dp" kind is the whole world
                part = _layout_partition(f"world[{self.world_size}]", layout, "dp", self.rank)
                (self._derived["world"],) = self._ensure([("world", part)])
            return self._derived["world"]

    # -- expert groups -------------------------------------------------------------

    def expert_groups(
        self,
        ep_size: int,
        *,
        data_before_expert: Optional[bool] = None,
        expert_tensor_parallel: bool = True,
    ) -> ExpertGroups:
        """Expert-parallel and expert-data-parallel groups for ``ep_size`` (``"ep_size_<n>"``).

        With an MPU of tp > 1 and ``expert_tensor_parallel``, DeepSpeed's E+M+D
        layout; otherwise E+D, or D+E with ``data_before_expert=True``; pipeline-aware.
        ``data_before_expert=None`` follows the MPU's order (E+D when it has none).
        Groups equal to the MPU's own expert groups are the MPU's group objects:
        nothing is created. Asking again for the same size returns the same object.

        Example: over megatron-core initialised with tp 2, ep 2 on 4 ranks,
        ``bridge.expert_groups(2).expert_parallel.ranks`` is ``(0, 2)`` on rank 0.
        """
        name = f"ep_size_{ep_size}"
        with self._lock:
            self._check_live()
            existing = self._experts.get(name)
            if data_before_expert is None:
                data_before_expert = (
                    existing.data_before_expert if existing is not None else self._mpu_puts_data_before_expert()
                )
            data_before_expert = bool(data_before_expert)
            if existing is not None:
                if (existing.data_before_expert, existing.expert_tensor_parallel) != (
                    data_before_expert,
                    expert_tensor_parallel,
                ):
                    raise BridgeError(
                        f"{name} already exists with data_before_expert={existing.data_before_expert}, "
                        f"expert_tensor_parallel={existing.expert_tensor_parallel}; one expert size has "
                        "one layout (DeepSpeed names groups by size alone)"
                    )
                return existing
            layout = self._expert_plan(ep_size, data_before_expert, expert_tensor_parallel)
            sig = self._layout_signature(layout)
            ep_info, edp_info = self._ensure(
                [
                    ("expert_parallel", _layout_partition(f"expert_parallel[{sig}]", layout, "ep", self.rank)),
                    (
                        "expert_data_parallel",
                        _layout_partition(f"expert_data_parallel[{sig}]", layout, "edp", self.rank),
                    ),
                ]
            )
            ep_info = self._prefer_mpu_group("ep", ep_info)
            edp_info = self._prefer_mpu_group("edp", edp_info)
            groups = ExpertGroups(
                name=name,
                ep_size=ep_size,
                expert_parallel=ep_info,
                expert_data_parallel=edp_info,
                layout=layout,
                data_before_expert=data_before_expert,
                expert_tensor_parallel=expert_tensor_parallel,
            )
            self._experts[name] = groups
            return groups

    def _mpu_puts_data_before_expert(self) -> bool:
        """Whether the MPU's order places ``dp`` before ``ep`` (DeepSpeed's D+E)."""
        tokens = expert_order(self.layout.config.order).split("-")
        return tokens.index("dp") < tokens.index("ep")

    def _prefer_mpu_group(self, dim: str, info: GroupInfo) -> GroupInfo:
        """The MPU's own ``dim`` group when it has exactly ``info``'s ranks, else ``info``.

        The registry keeps one group per rank set, the first borrowed (e.g. the data-
        parallel group); megatron-core builds a separate expert communicator over the
        same ranks, and expert code should run on that one. Every member decides alike:
        the condition depends only on the rank set.
        """
        own = self._borrowed.get(dim)
        if own is None or sorted(own.ranks) != sorted(info.ranks):
            return info
        return GroupInfo(name=info.name, group=own.group, ranks=own.ranks, rank=own.rank, borrowed=True)

    def _expert_plan(self, ep_size: int, data_before_expert: bool, expert_tensor_parallel: bool) -> Layout:
        """The MPU's layout with expert parallelism ``ep_size`` added.

        Expert-TP is the MPU's own expert-TP size when it reports one, else TP
        (``expert_tensor_parallel=False``: 1). ``ep`` comes just before ``dp`` in the
        MPU's order (E+D), or just after it with ``data_before_expert`` (D+E): with
        Megatron's default order these are exactly DeepSpeed's E+M+D / D+E / E+D
        layouts (see :func:`mpu_bridge.deepspeed_layouts.expert_layout`).
        """
        c = self.layout.config
        order = expert_order(c.order, data_before_expert)
        mpu_etp = self.reader.sizes().etp if self.reader is not None else None
        etp = (mpu_etp or c.tp) if expert_tensor_parallel else 1
        return plan(self.world_size, tp=c.tp, pp=c.pp, cp=c.cp, ep=ep_size, etp=etp, order=order)

    def expert_group_names(self) -> Tuple[str, ...]:
        with self._lock:
            self._check_live()
            return tuple(self._experts)

    def get_expert_groups(self, name: str) -> ExpertGroups:
        """The expert groups created under ``name`` (``"ep_size_4"``)."""
        with self._lock:
            self._check_live()
            try:
                return self._experts[name]
            except KeyError:
                known = ", ".join(self._experts) or "none yet"
                raise BridgeError(
                    f"no expert groups named {name!r} (created: {known}); call expert_groups(ep_size) first"
                ) from None

    def max_expert_size(self) -> int:
        """The largest expert-parallel size created so far."""
        with self._lock:
            self._check_live()
            if not self._experts:
                raise BridgeError("no expert groups yet; call expert_groups(ep_size) first")
            return max(g.ep_size for g in self._experts.values())

    def max_expert_size_name(self) -> str:
        return f"ep_size_{self.max_expert_size()}"

    def max_expert_groups(self) -> ExpertGroups:
        return self.get_expert_groups(self.max_expert_size_name())

    # -- ZeRO++ hpZ ------------------------------------------------------------------

    def zero_param_groups(self, partition_size: int) -> GroupInfo:
        """ZeRO++ hpZ secondary-partition group of ``partition_size`` ranks.

        Without model parallelism: contiguous blocks over the world (DeepSpeed's
        behaviour). With TP or PP > 1: consecutive blocks of this rank's
        sequence-data-parallel group, so a block never mixes model-parallel ranks.
        A size larger than that group is clamped to it, as DeepSpeed does. Asking
        twice for a size returns the same group; several sizes may coexist.
        """
        c = self.layout.config
        if isinstance(partition_size, bool) or not isinstance(partition_size, int) or partition_size < 1:
            raise LayoutError(f"partition_size must be a positive integer, got {partition_size!r}")
        with self._lock:
            self._check_live()
            if partition_size in self._zero:
                return self._zero[partition_size]
            kind = "dp-cp"
            span = self.layout.size(kind)
            block = min(partition_size, span)
            if span % block:
                raise LayoutError(
                    f"hpZ partition size {partition_size} does not divide the data-parallel size "
                    f"{span} (dp={c.dp}, cp={c.cp}); choose a divisor of {span}"
                )
            key = f"zero_param_intra[{block},{self._layout_signature(self.layout)}]"
            part = _block_partition(key, self.layout, kind, block, self.rank)
            (info,) = self._ensure([("zero_param_intra_parallel", part)])
            self._zero[partition_size] = info
            return info

    # -- all-to-all --------------------------------------------------------------------

    def all_to_all_groups(self, gpus_per_node: Optional[int] = None) -> AllToAllGroups:
        """Node-local and cross-node groups, as DeepSpeed's ``_get_local_all_to_all_group``.

        GPUs per node come from the argument, then ``attach(gpus_per_node=...)``,
        then ``LOCAL_WORLD_SIZE``, then the accelerator count.
        """
        gpn = self._resolve_gpus_per_node(gpus_per_node)
        with self._lock:
            self._check_live()
            if gpn in self._all_to_all:
                return self._all_to_all[gpn]
            world = self.world_size
            if world <= gpn:
                gpn_eff = world
            elif world % gpn:
                raise LayoutError(
                    f"world size {world} does not divide into nodes of {gpn} GPUs "
                    f"({world // gpn} full nodes and {world % gpn} ranks left over); "
                    "pass the right gpus_per_node"
                )
            else:
                gpn_eff = gpn
            nodes = world // gpn_eff
            layout = plan(world, tp=gpn_eff)  # "tp" = node-local, "dp" = across nodes
            parts = [("local", _layout_partition(f"all_to_all_local[{gpn_eff}]", layout, "tp", self.rank))]
            if nodes > 1:
                parts.append(
                    ("cross_node", _layout_partition(f"all_to_all_global[{gpn_eff}]", layout, "dp", self.rank))
                )
            infos = self._ensure(parts)
            result = AllToAllGroups(
                gpus_per_node=gpn_eff,
                num_nodes=nodes,
                local=infos[0],
                cross_node=infos[1] if nodes > 1 else None,
            )
            self._all_to_all[gpn] = result
            return result

    def _resolve_gpus_per_node(self, gpus_per_node: Optional[int]) -> int:
        for source, value in (
            ("gpus_per_node", gpus_per_node),
            ("attach(gpus_per_node=...)", self._gpus_per_node),
            ("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE")),
        ):
            if value is None:
                continue
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise LayoutError(f"{source} must be a positive integer, got {value!r}") from None
            if number < 1:
                raise LayoutError(f"{source} must be a positive integer, got {number}")
            return number
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 1:
            raise LayoutError(
                "cannot tell how many GPUs a node has: pass gpus_per_node=N, set LOCAL_WORLD_SIZE, "
                "or run where an accelerator is visible"
            )
        return count

    # -- adapters & lifecycle ------------------------------------------------------------

    def as_legacy_mpu(self) -> Any:
        """An object with the whole ``mpu`` surface DeepSpeed calls (see :mod:`mpu_bridge.legacy_mpu`)."""
        from .legacy_mpu import LegacyMpu

        return LegacyMpu(self)

    @property
    def strategy(self) -> str:
        """How groups are created: ``split_group``, ``local_new_group`` or ``new_group``."""
        return self.registry.strategy

    def stats(self) -> Dict[str, int]:
        """Counters of this rank's groups: created, borrowed, reused."""
        return self.registry.stats()

    def close(self) -> None:
        """Destroy the groups this bridge created (never the MPU's). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.registry.close()
            self._derived.clear()
            self._experts.clear()
            self._zero.clear()
            self._all_to_all.clear()

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DIM_NAMES = {
    "tp": "tensor_parallel",
    "pp": "pipeline_parallel",
    "dp": "data_parallel",
    "cp": "sequence_parallel",
    "sdp": "sequence_data_parallel",
    "mp": "model_parallel",
    "ep": "expert_parallel",
    "edp": "expert_data_parallel",
    "etp": "expert_tensor_parallel",
}


def attach(mpu: Optional[object] = None, **options: Any) -> Bridge:
    """Build a :class:`Bridge` over ``mpu`` (a module or object), or standalone when ``None``.

    Options: ``backend``, ``timeout``, ``pg_options``, ``strategy`` ("auto",
    "split_group", "local_new_group", "new_group"), ``agreement_timeout`` (s),
    ``verify_plan``, ``order`` (the MPU's rank order if it cannot be read or
    inferred), ``gpus_per_node``.

    Example::

        bridge = mpu_bridge.attach(parallel_state)
        bridge.expert_groups(4).expert_parallel.ranks
    """
    return Bridge(mpu, **options)
