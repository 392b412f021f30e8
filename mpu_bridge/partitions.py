"""Group families: which partition of the world each request needs. Pure, no torch.

A :class:`Partition` is every group of one kind, the same on every rank: a key,
the group size and count, this rank's own group and a lazy enumeration in the
agreed order. The *families* below compute one from a :class:`~mpu_bridge.layout.Layout`
and its options, identically on every rank; the bridge, the self-check's expected
groups and the planner all call them, so each family is worked out in one place:

* :func:`dense` -- any kind of a layout (tp, dp, ep, edp, ...);
* :func:`expert_layout` -- a layout with expert parallelism added (E+D, D+E, E+M+D);
* :func:`hpz_block` / :func:`hpz` -- ZeRO++ hpZ secondary partitions;
* :func:`all_to_all_nodes` / :func:`all_to_all` -- node-local and cross-node groups;
* :func:`world` -- the whole world as one group.

Example::

    >>> hpz(plan(8, tp=2), 2, rank=3).own
    (1, 3)
"""

from __future__ import annotations

import array
import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import LayoutError
from .groupview import GroupView
from .kinds import KINDS
from .layout import Layout, expert_order, plan
from .validate import integer, positive_int

__all__ = [
    "Partition",
    "abbrev",
    "dense",
    "data_before_expert",
    "expert_layout",
    "hpz_block",
    "HPZ_BASE",
    "hpz",
    "hpz_view",
    "hpz_index",
    "all_to_all_nodes",
    "all_to_all_layout",
    "all_to_all",
    "world",
    "layout_signature",
]

logger = logging.getLogger(__name__)


def _as_int(name: str, value: Any) -> int:
    """``value`` as an int (numpy integers too), never a bool or float."""
    return integer(name, value, LayoutError)


def abbrev(ranks: Sequence[int], limit: int = 8) -> str:
    """A short form of a rank list: ``[0, 1, 2, ..., 63]`` past ``limit`` members."""
    if len(ranks) <= limit:
        return "[" + ", ".join(map(str, ranks)) + "]"
    head = ", ".join(map(str, ranks[:3]))
    return f"[{head}, ..., {ranks[-1]}]"


@dataclass(frozen=True)
class Partition:
    """All groups of one kind that together cover the world.

    Every group is a translate of one offset set (``group = base + offsets``), so
    equal rank sets imply equal partitions. A partition may also leave ranks out
    (``own`` None there); such a batch is created with the all-ranks loop. ``key`` names the partition identically
    on every rank (e.g. ``"expert_parallel[ep=4]"``); ``own`` is this rank's group
    (ascending) or None if the rank is in none; ``groups()`` enumerates all groups
    lazily in the agreed order (only the ``new_group`` strategy walks them all).

    Example::

        Partition.from_layout(plan(8, tp=2), "tp", rank=3)
        # key "tp", group_size 2, num_groups 4, own (2, 3), groups -> [0, 1], [2, 3], ...
    """

    key: str
    group_size: int
    num_groups: int
    own: Optional[Tuple[int, ...]]
    groups: Callable[[], Iterable[Sequence[int]]]
    #: ``""``: the registry's one communicator per rank set. Any other name is a separate
    #: set of communicators for the same ranks (megatron-core's all-gather twins: ``"ag"``).
    channel: str = ""
    #: Set only by the layout engine's constructors (ascending ints, translates of one
    #: pattern, by construction): the O(group size) per-group checks are skipped.
    #: Not an init argument, so ``dataclasses.replace`` yields an untrusted copy.
    trusted: bool = field(default=False, compare=False, init=False)

    @classmethod
    def from_layout(cls, layout: Layout, kind: str, rank: int, key: Optional[str] = None) -> "Partition":
        """The partition of ``kind`` in ``layout``, seen from ``rank`` (same as :func:`dense`)."""
        return dense(layout, kind, rank, key)

    def as_trusted(self) -> "Partition":
        """Mark this partition as built by a family of this module (internal; returns self).

        ``trusted`` is deliberately no init argument (so ``dataclasses.replace`` yields
        an untrusted, re-checked copy); this is the one place that sets it.
        """
        object.__setattr__(self, "trusted", True)
        return self

    def first_group(self) -> Tuple[int, ...]:
        """The first group in enumeration order, ascending (O(group size), computed once)."""
        return self._first

    @functools.cached_property
    def _first(self) -> Tuple[int, ...]:
        try:
            first = next(iter(self.groups()))
        except StopIteration:
            raise LayoutError(f"partition {self.key!r} enumerates no groups") from None
        if self.trusted:
            return tuple(first)
        return tuple(sorted(_as_int(f"a rank of partition {self.key!r}", r) for r in first))

    def covers(self, world_size: int) -> bool:
        """Whether the groups cover the whole world (every rank is in exactly one)."""
        return self.group_size * self.num_groups == world_size

    def fingerprint(self) -> str:
        """What must be identical on every rank: key, sizes and the first group. O(group size)."""
        first = self.first_group()
        digest = hashlib.blake2b(array.array("q", first).tobytes(), digest_size=16).hexdigest()
        channel = f"|channel={self.channel}" if self.channel else ""
        return f"{self.key}|{self.group_size}x{self.num_groups}|{abbrev(first)}|{digest}{channel}"

    def summary(self) -> str:
        """A short human description, e.g. ``ep[ep=2] (2 groups of 2, first [0, 2])``."""
        return (
            f"{self.key} ({self.num_groups} group{'' if self.num_groups == 1 else 's'} of {self.group_size}, "
            f"first {abbrev(self.first_group())})"
        )

    def check(self, world_size: int, rank: int) -> None:
        """Raise LayoutError unless this partition is well formed for ``rank`` of ``world_size``."""
        if not isinstance(self.key, str) or not self.key:
            raise LayoutError(f"a partition needs a non-empty string key, got {self.key!r}")
        size = _as_int(f"group_size of partition {self.key!r}", self.group_size)
        count = _as_int(f"num_groups of partition {self.key!r}", self.num_groups)
        if size < 1 or count < 1:
            raise LayoutError(
                f"partition {self.key!r} has group_size {size} and num_groups {count}; both must be >= 1"
            )
        if size * count > world_size:
            raise LayoutError(
                f"partition {self.key!r} has {count} groups of {size} = {size * count} ranks, "
                f"more than the world of {world_size}"
            )
        if not callable(self.groups):
            raise LayoutError(f"partition {self.key!r}: groups must be a callable returning the groups")
        first = self.first_group()
        if self.trusted:
            if self.own is not None and rank not in self.own:
                raise LayoutError(
                    f"partition {self.key!r}: rank {rank}'s own group {abbrev(self.own)} does not "
                    f"contain rank {rank}"
                )
            return
        _check_ranks(self.key, first, size, world_size)
        if self.own is None:
            if self.covers(world_size):
                raise LayoutError(
                    f"partition {self.key!r} covers all {world_size} ranks but gives rank {rank} "
                    "no group (own is None); pass the group that holds it"
                )
            return
        own = tuple(_as_int(f"a rank of partition {self.key!r}", r) for r in self.own)
        if list(own) != sorted(set(own)):
            raise LayoutError(
                f"partition {self.key!r}: own group {list(own)} must be ascending without repeats"
            )
        _check_ranks(self.key, own, size, world_size)
        if rank not in own:
            raise LayoutError(
                f"partition {self.key!r}: rank {rank}'s own group {list(own)} does not contain rank {rank}"
            )
        own_offsets = [r - own[0] for r in own]
        first_offsets = [r - first[0] for r in first]
        if own_offsets != first_offsets:
            raise LayoutError(
                f"partition {self.key!r} is not made of translates of one rank pattern: rank {rank}'s "
                f"group {abbrev(own)} has offsets {abbrev(own_offsets)}, the first group "
                f"{abbrev(first)} has {abbrev(first_offsets)}"
            )


def _check_ranks(key: str, ranks: Sequence[int], size: int, world_size: int) -> None:
    if len(ranks) != size:
        raise LayoutError(
            f"partition {key!r}: group {abbrev(list(ranks))} has {len(ranks)} ranks, "
            f"but group_size is {size}"
        )
    if len(set(ranks)) != len(ranks):
        raise LayoutError(f"partition {key!r}: group {abbrev(list(ranks))} repeats a rank")
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise LayoutError(
            f"partition {key!r}: ranks {bad[:8]} are outside the world of {world_size} ranks "
            f"(0..{world_size - 1})"
        )




# ---------------------------------------------------------------------------
# The families: layout (+ options) -> partition, identical on every rank.
# ---------------------------------------------------------------------------


def layout_signature(layout: Layout) -> str:
    """The sizes and order of ``layout`` as one short string, for partition keys."""
    c = layout.config
    gtp = f",gtp_remat={c.gtp_remat}" if c.gtp_remat > 1 else ""
    egtp = f",expert_gtp_remat={c.expert_gtp_remat}" if c.expert_gtp_remat > 1 else ""
    span = f",ranks={c.rank_offset}+{c.world_size}" if c.rank_offset else ""
    return f"tp={c.tp},pp={c.pp},cp={c.cp},ep={c.ep},etp={c.etp}{gtp}{egtp},order={c.order}{span}"


def dense(layout: Layout, kind: str, rank: int, key: Optional[str] = None) -> Partition:
    """Every group of ``kind`` in ``layout``, seen from ``rank``.

    An all-gather twin kind (``"dp-cp-ag"``, ``"edp-ag"``) is its own channel: the same
    ranks as its twin, other communicators.

    A rank outside a rank span's layout is in none of its groups (``own`` None).

    Example: ``dense(plan(8, tp=2), "tp", 3).own == (2, 3)``;
    ``dense(plan(4, tp=2, rank_offset=4), "tp", 3).own is None``.
    """
    return Partition(
        key=key or kind,
        group_size=layout.size(kind),
        num_groups=layout.num_groups(kind),
        own=tuple(layout.group_of(kind, rank)) if layout.holds(rank) else None,
        groups=lambda: layout.iter_groups(kind),
        channel="ag" if KINDS[kind].twin_of else "",
    ).as_trusted()


def data_before_expert(layout: Layout) -> bool:
    """Whether ``layout``'s order puts ``dp`` before ``ep`` (DeepSpeed's D+E); a missing
    ``ep`` counts as just before ``dp`` (Megatron's default place: E+D).

    Example: ``data_before_expert(plan(8, order="tp-cp-dp-ep-pp")) is True``.
    """
    tokens = expert_order(layout.config.order).split("-")
    return tokens.index("dp") < tokens.index("ep")


def expert_layout(
    layout: Layout,
    ep_size: int,
    *,
    data_before_expert: Optional[bool] = None,
    etp: Optional[int] = None,
) -> Layout:
    """``layout`` with expert parallelism ``ep_size`` added, for expert-TP ``etp`` (default tp).

    ``ep`` goes just before ``dp`` in the layout's order (E+D) or just after it with
    ``data_before_expert`` (D+E); None keeps the order's own place (see
    :func:`data_before_expert`). With Megatron's default order these are exactly
    DeepSpeed's E+M+D (etp = tp), D+E and E+D (etp = 1) layouts.

    Example: ``expert_layout(plan(8, tp=2), 2).group_of("ep", 0) == [0, 2]``.
    """
    c = layout.config
    ep = positive_int("ep_size", ep_size)
    order = expert_order(c.order, data_before_expert)
    etp = c.tp if etp is None else positive_int("etp", etp)
    return plan(c.world_size, tp=c.tp, pp=c.pp, cp=c.cp, ep=ep, etp=etp, order=order,
                gtp_remat=c.gtp_remat, expert_gtp_remat=c.expert_gtp_remat, rank_offset=c.rank_offset)


def hpz_block(layout: Layout, partition_size: int) -> int:
    """The hpZ block size for ``partition_size``: clamped to the data-parallel span
    (dp·cp), as DeepSpeed does, and checked to divide it.

    Example: ``hpz_block(plan(8, tp=2, pp=2), 8) == 2`` (dp = 2: clamped).
    """
    size = positive_int("partition_size", partition_size)
    span = layout.size("dp-cp")
    block = min(size, span)
    if span % block:
        c = layout.config
        raise LayoutError(
            f"hpZ partition size {size} does not divide the data-parallel size {span} "
            f"(dp={c.dp}, cp={c.cp}); choose a divisor of {span}"
        )
    return block


#: The kind whose groups hpZ cuts into blocks.
HPZ_BASE = "dp-cp"


def hpz_view(layout: Layout, block: int, index: int) -> GroupView:
    """The ``index``-th hpZ group (enumeration order) as a view: O(dimensions), never listed.

    Blocks of one dp·cp group come in member order, dp·cp groups in layout order;
    LayoutError when blocks of ``block`` ranks are not all shaped alike.
    Example: ``list(hpz_view(plan(8, tp=2), 2, 1)) == [4, 6]``.
    """
    per = layout.size(HPZ_BASE) // block
    outer, inner = divmod(index, per)
    return layout.group_view(HPZ_BASE, outer).chunk(inner, block)


def hpz_index(layout: Layout, block: int, rank: int) -> Tuple[int, int]:
    """``(index of rank's hpZ group, rank's position in it)``; O(dimensions).

    Example: ``hpz_index(plan(8, tp=2), 2, 3) == (2, 1)``.
    """
    per = layout.size(HPZ_BASE) // block
    chunk, position = divmod(layout.rank_in_group(HPZ_BASE, rank), block)
    return layout.group_index(HPZ_BASE, rank) * per + chunk, position


def hpz(layout: Layout, block: int, rank: int) -> Partition:
    """ZeRO++ hpZ groups: consecutive blocks of ``block`` members of every dp·cp group.

    Without model parallelism the dp·cp groups are the world, so the blocks are
    DeepSpeed's contiguous blocks; with TP or PP > 1 a block never mixes
    model-parallel ranks. ``block`` must divide the dp·cp size (see :func:`hpz_block`).

    Example: ``hpz(plan(8, tp=2), 2, rank=3).own == (1, 3)``.
    """
    block = positive_int("block", block)
    per = layout.size(HPZ_BASE) // block
    hpz_view(layout, block, 0)  # LayoutError unless every block has the same shape
    own = tuple(hpz_view(layout, block, hpz_index(layout, block, rank)[0])) if layout.holds(rank) else None

    def groups() -> Iterator[List[int]]:
        for members in layout.iter_groups(HPZ_BASE):
            for start in range(0, len(members), block):
                yield members[start : start + block]

    return Partition(
        key=f"zero_param_intra[{block},{layout_signature(layout)}]",
        group_size=block,
        num_groups=layout.num_groups(HPZ_BASE) * per,
        own=own,
        groups=groups,
    ).as_trusted()  # blocks of layout groups, all shaped alike (checked above)


def all_to_all_nodes(world_size: int, gpus_per_node: int) -> Tuple[int, int]:
    """``(gpus per node, nodes)`` for hierarchical all-to-all: one node when the world
    fits in one; else the world must divide into whole nodes.

    Example: ``all_to_all_nodes(16, 4) == (4, 4)``; ``all_to_all_nodes(4, 8) == (4, 1)``.
    """
    world = positive_int("world_size", world_size)
    gpn = positive_int("gpus_per_node", gpus_per_node)
    if world <= gpn:
        return world, 1
    if world % gpn:
        raise LayoutError(
            f"world size {world} does not divide into nodes of {gpn} GPUs "
            f"({world // gpn} full nodes and {world % gpn} ranks left over); pass the right gpus_per_node"
        )
    return gpn, world // gpn


def all_to_all_layout(world_size: int, gpus_per_node: int, rank_offset: int = 0) -> Tuple[Layout, int]:
    """``(layout, nodes)`` whose ``"tp"`` groups are the node-local all-to-all groups and,
    on more than one node, whose ``"dp"`` groups are the cross-node ones (same local rank).

    Example: ``all_to_all_layout(8, 4)[0].group_of("dp", 5) == [1, 5]``.
    """
    gpn, nodes = all_to_all_nodes(world_size, gpus_per_node)
    return plan(world_size, tp=gpn, rank_offset=rank_offset), nodes


def all_to_all(world_size: int, gpus_per_node: int, rank: int, rank_offset: int = 0) -> List[Partition]:
    """Node-local groups and, on more than one node, cross-node groups (same local rank).

    DeepSpeed's ``_get_local_all_to_all_group``: ``local_<node>`` and ``global_<local rank>``.
    Example: ``[p.own for p in all_to_all(8, 4, 5)] == [(4, 5, 6, 7), (1, 5)]``.
    """
    layout, nodes = all_to_all_layout(world_size, gpus_per_node, rank_offset)
    gpn = layout.config.tp
    parts = [dense(layout, "tp", rank, key=f"all_to_all_local[{gpn}]")]
    if nodes > 1:
        parts.append(dense(layout, "dp", rank, key=f"all_to_all_global[{gpn}]"))
    return parts


def world(world_size: int, rank: int, rank_offset: int = 0) -> Partition:
    """The whole world as one group (DeepSpeed's ``_clone_world_group``; the registry
    answers it with the default group), or with ``rank_offset`` the rank span
    ``rank_offset .. rank_offset + world_size - 1`` as one group.

    Example: ``world(4, 2).own == (0, 1, 2, 3)``; ``world(2, 5, rank_offset=4).own == (4, 5)``.
    """
    key = f"world[{world_size}]" if not rank_offset else f"world[{rank_offset}+{world_size}]"
    return dense(plan(world_size, rank_offset=rank_offset), "dp", rank, key=key)


def _pipeline_stage_groups(
    layout: Layout, rank: int, stages: Callable[[Sequence[int]], List[int]], size: int, key: str
) -> Partition:
    """For each pipeline group (layout order), the members ``stages(group)`` picks; ranks
    picked by none get ``own`` None (the partition then leaves them out)."""
    picked = stages(layout.group_of("pp", rank)) if layout.holds(rank) else []
    return Partition(
        key=key,
        group_size=size,
        num_groups=layout.num_groups("pp"),
        own=tuple(picked) if rank in picked else None,
        groups=lambda: (stages(g) for g in layout.iter_groups("pp")),
    ).as_trusted()  # the same stages of translates of one pipeline group


def _first_and_last_stage(pp_group: Sequence[int]) -> List[int]:
    return [pp_group[0]] if len(pp_group) == 1 else [pp_group[0], pp_group[-1]]


def _first_stage(pp_group: Sequence[int]) -> List[int]:
    return [pp_group[0]]


def embedding(layout: Layout, rank: int, key: Optional[str] = None) -> Partition:
    """Word-embedding groups: the first and last stage of every pipeline group.

    megatron-core's ``default_embedding_ranks`` (one rank per group when pp = 1).
    Ranks of the middle stages are in no group: ``own`` is None there, as
    megatron-core's ``get_embedding_group()`` is None there.

    Example: ``embedding(plan(8, pp=4), 2).own is None``; ``embedding(plan(8, pp=4), 6).own == (0, 6)``.
    """
    size = 1 if layout.config.pp == 1 else 2
    return _pipeline_stage_groups(
        layout, rank, _first_and_last_stage, size, key or f"embedding[{layout_signature(layout)}]"
    )


def position_embedding(layout: Layout, rank: int, key: Optional[str] = None) -> Partition:
    """Position-embedding groups: the first stage of every pipeline group, one rank each.

    megatron-core's ``default_position_embedding_ranks``; other stages: ``own`` None.

    Example: ``position_embedding(plan(8, pp=2), 1).own == (1,)``;
    ``position_embedding(plan(8, pp=2), 5).own is None``.
    """
    return _pipeline_stage_groups(
        layout, rank, _first_stage, 1, key or f"position_embedding[{layout_signature(layout)}]"
    )


__all__ += ["embedding", "position_embedding"]
