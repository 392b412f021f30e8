"""What the planner shows: each partition of the world as one row, its groups as views. No torch.

A :class:`PlanRow` is one way of cutting the world into groups, with its groups
described by :class:`~mpu_bridge.groupview.GroupView` (never listed), so every row
costs the same at 8 ranks or 2**62:

* :func:`kind_row` -- a group kind of a :class:`~mpu_bridge.layout.Layout`;
* :func:`hpz_row` -- ZeRO++ hpZ blocks (sizes checked by :func:`mpu_bridge.partitions.hpz_block`);
* :func:`all_to_all_rows` -- node-local and cross-node all-to-all groups
  (:func:`mpu_bridge.partitions.all_to_all_nodes`).

Groups come in the order the families of :mod:`mpu_bridge.partitions` enumerate them.

Example::

    >>> from mpu_bridge import plan
    >>> row = hpz_row(plan(16, tp=2), 4)
    >>> row.size, row.count, row.group(1).first(8)
    (4, 4, [8, 10, 12, 14])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

from .errors import LayoutError
from .groupview import GroupView, partition_fits_nodes
from .layout import Layout
from .partitions import HPZ_BASE, all_to_all_layout, hpz_block, hpz_index, hpz_view

__all__ = ["PlanRow", "kind_row", "hpz_row", "all_to_all_rows"]


@dataclass(frozen=True)
class PlanRow:
    """One partition of the world: ``count`` groups of ``size`` ranks, each a translate of ``shape``.

    ``group(i)`` is the ``i``-th group in enumeration order; ``locate(rank)`` is
    ``(group index, position in the group, the group)`` for a rank of the world.

    Example: ``kind_row(plan(8, tp=2), "tp").locate(3) == (1, 1, GroupView(2, ((2, 1),)))``.
    """

    name: str
    description: str
    size: int
    count: int
    shape: Tuple[Tuple[int, int], ...]
    group: Callable[[int], GroupView]
    locate: Callable[[int], Tuple[int, int, GroupView]]

    def fits_nodes(self, gpus_per_node: int) -> bool:
        """Whether every group stays inside one node of ``gpus_per_node`` ranks."""
        return partition_fits_nodes(self.shape, gpus_per_node)


def _check_layout(layout: object) -> Layout:
    if not isinstance(layout, Layout):
        raise LayoutError(
            f"expected a Layout (from mpu_bridge.plan(...)), got {layout!r} ({type(layout).__name__})"
        )
    return layout


def kind_row(layout: Layout, kind: str, *, name: str = "", description: str = "") -> PlanRow:
    """The row of a group kind of ``layout`` (``name``/``description``: the kind's own by default).

    Example: ``kind_row(plan(16, tp=2), "dp").group(0).first(3) == [0, 2, 4]``.
    """
    _check_layout(layout)
    spec = layout.spec(kind)

    def locate(rank: int) -> Tuple[int, int, GroupView]:
        view = layout.group_view_of(kind, rank)  # validates the rank
        return layout.group_index(kind, rank), layout.rank_in_group(kind, rank), view

    return PlanRow(
        name=name or kind,
        description=description or spec.description,
        size=layout.size(kind),
        count=layout.num_groups(kind),
        shape=layout.group_view(kind, 0).dims,
        group=lambda index: layout.group_view(kind, index),
        locate=locate,
    )


def hpz_row(layout: Layout, partition_size: int) -> PlanRow:
    """ZeRO++ hpZ groups: consecutive blocks of every dp·cp group, as :func:`mpu_bridge.partitions.hpz`.

    ``partition_size`` is clamped to the dp·cp size and must divide it
    (:func:`~mpu_bridge.partitions.hpz_block`); blocks must all be shaped alike.

    Example: ``hpz_row(plan(16, tp=2), 4).locate(5) == (2, 2, GroupView(1, ((4, 2),)))``.
    """
    _check_layout(layout)
    block = hpz_block(layout, partition_size)
    count = layout.num_groups(HPZ_BASE) * (layout.size(HPZ_BASE) // block)
    hpz_view(layout, block, 0)  # raises LayoutError when blocks differ in shape

    def group(index: int) -> GroupView:
        return hpz_view(layout, block, index)

    def locate(rank: int) -> Tuple[int, int, GroupView]:
        layout.group_view_of(HPZ_BASE, rank)  # validates the rank
        index, position = hpz_index(layout, block, rank)
        return index, position, hpz_view(layout, block, index)

    return PlanRow(
        name="hpz",
        description=f"ZeRO++ hpZ: blocks of {block} of each dp x cp group",
        size=block,
        count=count,
        shape=group(0).dims,
        group=_checked_index("hpz", count, group),
        locate=locate,
    )


def all_to_all_rows(layout: Layout) -> Tuple[PlanRow, ...]:
    """Node-local all-to-all groups and, on more than one node, cross-node groups (same local rank),
    as :func:`mpu_bridge.partitions.all_to_all`. Needs ``gpus_per_node``.

    Example: ``[r.name for r in all_to_all_rows(plan(16, gpus_per_node=4))] == ["a2a-local", "a2a-global"]``.
    """
    _check_layout(layout)
    gpn = layout.config.gpus_per_node
    if gpn is None:
        raise LayoutError("all-to-all groups need gpus_per_node; pass plan(..., gpus_per_node=8)")
    grid, nodes = all_to_all_layout(layout.world_size, gpn)  # "tp": inside a node; "dp": across nodes
    rows = [kind_row(grid, "tp", name="a2a-local", description="all-to-all inside a node")]
    if nodes > 1:
        rows.append(
            kind_row(grid, "dp", name="a2a-global", description="all-to-all across nodes, same local rank")
        )
    return tuple(rows)


def _checked_index(name: str, count: int, group: Callable[[int], GroupView]) -> Callable[[int], GroupView]:
    def checked(index: int) -> GroupView:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise LayoutError(f"group index {index!r} is outside 0..{count - 1} for {name!r}")
        return group(index)

    return checked

