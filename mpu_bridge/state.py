"""What a bridge knows about one reading of the MPU, built whole, then never changed.

:func:`read_state` reads the MPU (or nothing, standalone), checks it against the
world, infers its rank order (:mod:`mpu_bridge.mpu.order`), plans the layout and
registers the MPU's own groups as borrowed in a fresh registry. The result, a
:class:`State`, is swapped into the bridge only when complete; :func:`mpu_changed`
tells when the MPU was re-initialised under it. The answer types a bridge hands
out (:class:`GroupInfo`, :class:`ExpertGroups`, :class:`AllToAllGroups`) live here
too. Reading the MPU is local: no communication.

Example::

    state = read_state(parallel_state, world_size=8, rank=3, order=None, registry_options={})
    state.layout.config.order, state.borrowed["tp"].ranks
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch.distributed as dist

from . import _torch, partitions
from .collection_mpu import CollectionMpu, is_collection
from .errors import BridgeError, LayoutError, MpuError
from .grid_mpu import grid_group_keys, grid_groups, grid_layout, is_grid, kind_of_dims
from .kinds import KIND_BY_DIM, KINDS, kind_named
from .layout import DEFAULT_ORDER, GTP, Layout, plan
from .mpu import MpuReader, check_is_mpu
from .mpu.names import ALL_DIMENSIONS
from .mpu.order import infer_order
from .multi_module import is_multi_collection, module_collection
from .registry import GroupRegistry
from .validate import integer, positive_int

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "GroupInfo",
    "ExpertGroups",
    "AllToAllGroups",
    "State",
    "Broken",
    "read_state",
    "mpu_changed",
    "mpu_embedding_groups",
    "group_ranks",
    "expert_layout_for",
    "expert_layout",
    "puts_data_before_expert",
    "prefer_mpu_group",
    "resolve_gpus_per_node",
]

logger = logging.getLogger(__name__)

_EXPERT_DIMS = frozenset(k.dim for k in KIND_BY_DIM.values() if k.grid == "expert")
_ORDER_DIMS = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")


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


@dataclass(frozen=True)
class State:
    """Everything the bridge knows about one reading of the MPU (or of the world alone).

    Built whole by :func:`read_state` and never changed afterwards, except
    ``answers``: the results of requests already made on it (each made once).
    """

    layout: Layout
    reader: Optional[MpuReader]
    registry: GroupRegistry
    borrowed: Mapping[str, GroupInfo]  # by kind name
    sentinel: Optional[Tuple[str, Any]]  # (MPU dimension, its group) to notice re-initialisation
    answers: Dict[str, Any] = field(default_factory=dict)
    #: Kinds the span's members borrow (a grid's groups) on a rank outside the span: it holds
    #: none, and asks for none either, as the members ask for none (they have theirs).
    outside_kinds: FrozenSet[str] = frozenset()


@dataclass(frozen=True)
class Broken:
    """The MPU changed and could not be read again: every call raises ``reason``."""

    reason: str


def _is_device_mesh(obj: Any) -> "TypeGuard[DeviceMesh]":
    """Whether ``obj`` is a ``torch.distributed.device_mesh.DeviceMesh`` (read as an MPU)."""
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(obj, DeviceMesh)


def read_state(
    mpu: Optional[object],
    world_size: int,
    rank: int,
    order: Optional[str],
    registry_options: Mapping[str, Any],
    sizes: Optional[Mapping[str, Any]] = None,
    module: Optional[str] = None,
) -> State:
    """Read ``mpu`` (None: standalone) into a complete :class:`State`; local, no communication.

    Standalone, ``sizes`` (tp, pp, cp, ep, etp) give a full Megatron layout of the world
    (default: tp = pp = cp = ep = 1, data parallel = the world). Raises MpuError when
    the MPU cannot be read, does not fit the world, or its groups follow no Megatron
    rank order (or not ``order``, when given); LayoutError for standalone sizes that
    form no layout.
    """
    if is_multi_collection(mpu):
        mpu = module_collection(mpu, module)
    elif module is not None:
        raise MpuError(f"module={module!r} picks one module of a MultiModuleProcessGroupCollection, "
                       f"but the MPU is a {type(mpu).__name__}: drop module=")
    if mpu is not None and _is_device_mesh(mpu):
        from .mesh import MeshMpu  # imported only for a mesh

        mpu = MeshMpu(mpu)
    elif is_collection(mpu):
        mpu = CollectionMpu(mpu)
    elif mpu is not None and is_grid(mpu):
        if sizes or order:
            raise MpuError("sizes and order are the HyperCommGrid's own (its shape and dim names): drop them")
        return _grid_state(mpu, world_size, rank, registry_options)
    if mpu is None:
        return _standalone_state(world_size, order, sizes, registry_options)
    if sizes:
        raise MpuError(
            f"sizes ({', '.join(f'{k}={v}' for k, v in sizes.items())}) are for a bridge without an MPU; "
            "with an MPU the sizes are the MPU's own: drop them, or attach(None, ...) for a standalone layout"
        )
    return _mpu_state(mpu, world_size, rank, order, registry_options)


def _mpu_state(
    mpu: object, world_size: int, rank: int, order: Optional[str], registry_options: Mapping[str, Any]
) -> State:
    """The state of ``attach(mpu)``: the MPU read and checked against the world (or, for one
    module's collection, against its rank span), its layout, and its groups borrowed."""
    registry = GroupRegistry(**registry_options)
    try:
        check_is_mpu(mpu)
        reader = MpuReader(mpu)
        with reader.snapshot():  # the MPU does not change while it is read here
            offset, size = _collection_span(reader, world_size, rank, order) if isinstance(mpu, CollectionMpu) \
                else (0, world_size)
            reader.check_against_world(size, rank, offset)
            layout = _layout_from_mpu(reader, size, rank, order, offset)
            if size < world_size:  # one module's collection: only its ranks build this bridge
                registry.narrow(layout.ranks)
            borrowed = _borrow(reader, registry, world_size, rank)
    except MpuError as exc:
        registry.close()
        if isinstance(mpu, CollectionMpu):
            raise _collection_error(exc) from None
        raise
    except BaseException:
        registry.close()
        raise
    sentinel = next(((KINDS[kind].dim, info.group) for kind, info in borrowed.items()), None)
    c = layout.config
    logger.info(
        "mpu-bridge: attached to a %s MPU (tp=%d pp=%d dp=%d cp=%d, order %s)",
        reader.flavour, c.tp, c.pp, c.dp, c.cp, c.order,
    )
    return State(layout, reader, registry, borrowed, sentinel)


def _standalone_state(
    world_size: int, order: Optional[str], sizes: Optional[Mapping[str, Any]], registry_options: Mapping[str, Any]
) -> State:
    """The state of ``attach(None, ...)``: a full layout of the world from ``sizes``, or of
    the rank span ``rank_offset .. rank_offset + local_world_size - 1`` (default: the rest
    of the world from ``rank_offset``)."""
    given = dict(sizes or {})
    offset = integer("rank_offset", given.pop("rank_offset", 0), LayoutError)
    if not 0 <= offset < world_size:
        raise LayoutError(f"rank_offset must be a rank of the world, 0..{world_size - 1}; got {offset}")
    local = given.pop("local_world_size", None)
    local = world_size - offset if local is None else positive_int("local_world_size", local, LayoutError)
    if offset + local > world_size:
        raise LayoutError(
            f"the rank span rank_offset {offset} + local_world_size {local} = {offset + local} goes past "
            f"the world of {world_size} ranks; the span's last rank must be at most {world_size - 1}"
        )
    layout = plan(local, order=order or DEFAULT_ORDER, rank_offset=offset, **given)
    registry = GroupRegistry(**registry_options)
    c = layout.config
    logger.info(
        "mpu-bridge: standalone (no MPU): tp=%d pp=%d cp=%d ep=%d etp=%d dp=%d, order %s",
        c.tp, c.pp, c.cp, c.ep, c.etp, c.dp, c.order,
    )
    return State(layout, None, registry, {}, None)


def _grid_state(grid: Any, world_size: int, rank: int, registry_options: Mapping[str, Any]) -> State:
    """The state of ``attach(grid)`` (see :mod:`mpu_bridge.grid_mpu`): the grid's layout,
    and every group the grid created borrowed, each checked against that layout (a group
    whose ranks are not the layout's group of its kind is an MpuError naming its dims)."""
    layout = grid_layout(grid, world_size)
    registry = GroupRegistry(**registry_options)
    borrowed: Dict[str, GroupInfo] = {}
    if not layout.holds(rank):  # outside the grid's span: what its members borrow, this rank skips
        kinds = {kind_of_dims(dims) for view, dims in grid_group_keys(grid) if not view}
        outside = frozenset(kind.name for kind in kinds if kind is not None)
        return State(layout, None, registry, borrowed, None, outside_kinds=outside)
    try:
        for (view, dims), group in grid_groups(grid).items():
            ranks = tuple(dist.get_process_group_ranks(group))
            kind = None if view else kind_of_dims(dims)  # a view's dims are its own factorization
            if kind is not None:
                want = tuple(layout.group_of(kind.name, rank))
                if ranks != want:
                    raise MpuError(
                        f"rank {rank}: the HyperCommGrid's {'-'.join(dims)!r} group holds ranks {list(ranks)}, "
                        f"but the layout its shape and dims describe ({layout.config.order}) says {list(want)}"
                    )
                if kind.name not in borrowed:
                    borrowed[kind.name] = GroupInfo(kind.method or kind.name, group, ranks, ranks.index(rank), True)
            registry.borrow(ranks, group)
    except BaseException:
        registry.close()
        raise
    c = layout.config
    logger.info("mpu-bridge: attached to a HyperCommGrid (tp=%d pp=%d dp=%d cp=%d, order %s), %d groups borrowed",
                c.tp, c.pp, c.dp, c.cp, c.order, len(borrowed))
    return State(layout, None, registry, borrowed, None)


def _collection_error(exc: MpuError) -> MpuError:
    """``exc`` about a ProcessGroupCollection, with the fields behind the dims it names."""
    text = str(exc)
    named = [k for k in KIND_BY_DIM.values() if k.pg_field and re.search(rf"\b{re.escape(k.dim)}\b", text)]
    legend = ", ".join(f"{k.dim} = field {k.pg_field!r}" for k in named)
    return MpuError(
        f"the ProcessGroupCollection's groups do not form one Megatron layout: {text}"
        + (f" ({legend})" if legend else "")
    )


def _collection_span(reader: MpuReader, world_size: int, rank: int, given: Optional[str]) -> Tuple[int, int]:
    """``(rank_offset, ranks)`` of the layout a collection's groups describe: the world, or
    -- one module of a multi-module trainer -- a rank span inside it, placed by this rank's
    position in each of its groups (every group is then checked against that layout).

    Example: a collection of tp 2 (field ``tp`` = [6, 7]) and dp 2 (``dp`` = [5, 7]) on
    rank 7 of 8 is the span (4, 4): ranks 4..7.
    """
    sizes = reader.sizes()
    if sizes.dp is None:
        return 0, world_size
    size = sizes.tp * sizes.pp * sizes.cp * sizes.gtp * sizes.dp
    if size >= world_size:
        return 0, world_size  # the world (or too many ranks: the checks say so)
    try:
        layout = _layout_from_mpu(reader, size, 0, given, check=False)
    except MpuError as exc:
        raise MpuError(f"its groups cover {size} of the world's {world_size} ranks, a rank span, "
                       f"but they give no rank order: {exc}") from None
    local = 0
    for token, dim in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), (GTP, "gtp")):
        if layout.dense.size_of(token) == 1:
            continue
        if not _answers(reader, dim):
            raise MpuError(f"its groups cover {size} of the world's {world_size} ranks (a rank span), "
                           f"but it holds no {dim} group to place rank {rank} in that span")
        local += sorted(reader.group_ranks(dim)).index(rank) * layout.dense.stride_of(token)
    offset = rank - local
    if offset < 0 or offset + size > world_size:
        raise MpuError(f"its groups place rank {rank} at position {local} of a rank span of {size} ranks, "
                       f"which would start at rank {offset}, outside the world of {world_size}")
    return offset, size


def _layout_from_mpu(
    reader: MpuReader, world_size: int, rank: int, given: Optional[str], rank_offset: int = 0, check: bool = True
) -> Layout:
    sizes = reader.sizes()
    own = {dim: reader.group_ranks(dim) for dim in _ORDER_DIMS if _answers(reader, dim)}
    order = given or sizes.order or infer_order(world_size, {}, own)
    try:
        layout = plan(world_size, tp=sizes.tp, pp=sizes.pp, cp=sizes.cp, ep=sizes.ep or 1, etp=sizes.etp,
                      order=order, gtp_remat=sizes.gtp, expert_gtp_remat=sizes.egtp, rank_offset=rank_offset)
    except LayoutError as exc:
        raise MpuError(f"the MPU's sizes and order {order!r} do not form a Megatron layout: {exc}") from None
    wrong = _mismatching_dims(reader, layout, rank) if check else []
    if wrong:
        fix = (f"the order given to attach ({given!r}) is not the MPU's" if given
               else "pass attach(mpu, order=...) with its order")
        raise MpuError(
            f"the MPU's own groups on rank {rank} do not follow the rank order {order!r}: "
            + "; ".join(wrong) + f"; {fix}"
        )
    return layout


def _answers(reader: MpuReader, dim: str) -> bool:
    """Whether the MPU gives both the group and its ranks for ``dim`` (expert dims only with ep > 1;
    never the all-gather twins, which no MPU holds)."""
    if dim not in ALL_DIMENSIONS or (dim in _EXPERT_DIMS and not reader.sizes().ep):
        return False
    return reader.has(dim, "group") and reader.has(dim, "ranks")


def _mismatching_dims(reader: MpuReader, layout: Layout, rank: int) -> List[str]:
    wrong = []
    for dim, kind in KIND_BY_DIM.items():
        if not _answers(reader, dim):
            continue
        theirs = sorted(reader.group_ranks(dim))
        ours = layout.group_of(kind.name, rank)
        if theirs != ours:
            what = f"field {kind.pg_field!r} ({dim})" if reader.flavour == "pg-collection" and kind.pg_field else dim
            wrong.append(f"{what} group {theirs} != {ours}")
    return wrong


def _borrow(reader: MpuReader, registry: GroupRegistry, world_size: int, rank: int) -> Dict[str, GroupInfo]:
    borrowed: Dict[str, GroupInfo] = {}
    for dim, kind in KIND_BY_DIM.items():
        if not _answers(reader, dim):
            continue
        ranks = tuple(reader.group_ranks(dim))
        group = registry.borrow(ranks, reader.group(dim))
        if kind.method is not None:
            borrowed[kind.name] = GroupInfo(kind.method, group, ranks, ranks.index(rank), True)
    return borrowed


def mpu_embedding_groups(state: State, rank: int) -> Optional[Tuple[Optional[GroupInfo], Optional[GroupInfo]]]:
    """The MPU's own (embedding, position embedding) groups when it has megatron-core's
    getters (local; None for a group this rank is not in), else None.

    Example: over megatron-core with pp 2 on 4 ranks, rank 1 gets ``((1, 3), (1,))``.
    """
    mpu = state.reader.mpu if state.reader is not None else None
    getters = ("get_embedding_group", "get_position_embedding_group")
    if mpu is None or not all(callable(getattr(mpu, name, None)) for name in getters):
        return None
    out: List[Optional[GroupInfo]] = []
    for name, getter in zip(("embedding", "position_embedding"), getters):
        try:
            group = getattr(mpu, getter)()
        except Exception:  # megatron-core asserts "not initialized" where a rank has none
            group = None
        if group is None or not _torch.is_live(group):
            out.append(None)
            continue
        ranks = tuple(dist.get_process_group_ranks(group))
        out.append(GroupInfo(name, group, ranks, ranks.index(rank), True))
    return out[0], out[1]


def mpu_changed(state: State) -> bool:
    """Whether the MPU under ``state`` was re-initialised (its groups are other objects now).

    Raises MpuError when the MPU's groups are gone and not re-created (after
    ``destroy_model_parallel``). Local: reads one getter.
    """
    if state.reader is None or state.sentinel is None:
        return False
    dim, group = state.sentinel
    try:
        current = state.reader.group(dim) if state.reader.has(dim, "group") else None
    except MpuError:
        current = None
    if current is group and _torch.is_live(group):
        return False
    if current is None or not _torch.is_live(current):
        raise MpuError(
            f"the MPU's {KIND_BY_DIM[dim].description} group is gone (was destroy_model_parallel "
            "called?); re-initialise the MPU and the bridge rebuilds on the next call, or close() it"
        )
    return True


# -- what requests read from a state ------------------------------------------------------


def group_ranks(state: State, rank: int, name: str, ep_size: Optional[int] = None) -> Tuple[int, ...]:
    """``rank``'s group of ``name`` (a bridge method, kind or MPU dimension, or ``"world"``)
    as global ranks in group-rank order: the MPU's own group where it has one, else the
    layout's. Expert kinds use the layout for ``ep_size`` (default: the MPU's own).

    Example: ``group_ranks(state, 0, "data_parallel") == (0, 2)`` over tp 2 on 4 ranks.
    """
    if name == "world":
        return tuple(state.layout.ranks)
    try:
        kind = kind_named(name)
    except KeyError as exc:
        raise BridgeError(str(exc.args[0])) from None
    if kind.grid == "expert" and ep_size is not None:
        return tuple(expert_layout_for(state, positive_int("ep_size", ep_size)).group_of(kind.name, rank))
    if kind.name in state.borrowed:
        return state.borrowed[kind.name].ranks
    if kind.grid == "expert" and state.layout.config.ep == 1:
        raise BridgeError(f"{kind.method or kind.name} needs ep_size=N (the expert-parallel size)")
    if kind.name == "dp-cp" and state.layout.config.cp == 1 and "dp" in state.borrowed:
        return state.borrowed["dp"].ranks
    return tuple(state.layout.group_of(kind.name, rank))


def expert_layout_for(state: State, ep_size: int) -> Layout:
    """The layout :meth:`Bridge.expert_groups` gave (or would give by default) ``ep_size``."""
    existing = state.answers.get(f"experts:ep_size_{ep_size}")
    if isinstance(existing, ExpertGroups):
        return existing.layout
    return expert_layout(state, ep_size, puts_data_before_expert(state), True)



def puts_data_before_expert(state: State) -> bool:
    """Whether the MPU's order places ``dp`` before ``ep`` (DeepSpeed's D+E)."""
    return partitions.data_before_expert(state.layout)


def expert_layout(state: State, ep_size: int, before: bool, etp_on: bool) -> Layout:
    """The state's layout with expert parallelism ``ep_size`` added; expert-TP is the
    MPU's own expert-TP size when it reports one, else TP (``etp_on=False``: 1)."""
    c = state.layout.config
    if state.reader is not None:
        own_etp = state.reader.sizes().etp
    else:  # a standalone layout's own expert-TP, when it has experts
        own_etp = c.etp if c.ep > 1 else None
    etp = (own_etp or c.tp) if etp_on else 1
    return partitions.expert_layout(state.layout, ep_size, data_before_expert=before, etp=etp)


def prefer_mpu_group(state: State, kind: str, info: GroupInfo) -> GroupInfo:
    """The MPU's own ``kind`` group when it has exactly ``info``'s ranks, else ``info``.

    megatron-core builds a separate expert communicator over the same ranks as,
    e.g., its data-parallel group, and expert code should run on that one. Every
    member decides alike: the condition depends only on the rank set.
    """
    own = state.borrowed.get(kind)
    if own is None or sorted(own.ranks) != sorted(info.ranks):
        return info
    return GroupInfo(info.name, own.group, own.ranks, own.rank, True)


def resolve_gpus_per_node(given: Optional[int], attached: Optional[int]) -> int:
    """GPUs per node: ``given``, then ``attached`` (attach's option), then ``LOCAL_WORLD_SIZE``,
    then the accelerator count; LayoutError when none says.

    Example: ``resolve_gpus_per_node(None, 8) == 8``.
    """
    if given is not None:
        return positive_int("gpus_per_node", given)
    if attached is not None:
        return attached
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None:
        if not local.strip().isdigit() or int(local) < 1:
            raise LayoutError(f"LOCAL_WORLD_SIZE must be a positive integer, got {local!r}")
        return int(local)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 1:
        raise LayoutError(
            "cannot tell how many GPUs a node has: pass gpus_per_node=N, set LOCAL_WORLD_SIZE, "
            "or run where an accelerator is visible"
        )
    return count
