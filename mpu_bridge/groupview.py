"""Groups of ranks described by their geometry, never listed. Pure; no torch.

Every group of a :class:`~mpu_bridge.layout.Layout` is ``start + Σ i_k·step_k`` over
a few dimensions ``(count_k, step_k)``, first dimension fastest, each step larger
than the span of the dimensions before it (so the members come out ascending). A
:class:`GroupView` keeps only that: its size, any member, membership, the first
members and the nodes it spans cost O(dimensions) whatever the group's size, so
the planner describes a group of 2**40 ranks as cheaply as one of 8.

Example::

    >>> view = GroupView(5, ((4, 1), (3, 8)))   # ranks 5..8, then again 8 and 16 further on
    >>> view.size, view.first(6), view.last, 13 in view, view.stride
    (12, [5, 6, 7, 8, 13, 14], 24, True, None)
    >>> view.nodes(8).first(8), view.nodes(8).count   # nodes of 8 ranks
    ([0, 1, 2, 3], 4)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union, overload

from .errors import LayoutError
from .validate import integer, positive_int

__all__ = ["GroupView", "NodeSet", "partition_fits_nodes"]

Dims = Tuple[Tuple[int, int], ...]

#: Most nodes :class:`NodeSet` walks one by one to count an irregular node set.
NODE_WALK_LIMIT = 4096


def _span(dims: Dims) -> int:
    """The last offset of the lattice ``dims``: ``Σ (count_k - 1)·step_k``."""
    return sum((count - 1) * step for count, step in dims)


def _canonical(dims: Any) -> Dims:
    """``dims`` validated, without dimensions of one member, contiguous ones merged."""
    try:
        items = tuple(tuple(dim) for dim in dims)
    except TypeError:
        raise LayoutError(f"dims must be a sequence of (count, step) pairs, got {dims!r}") from None
    out: List[Tuple[int, int]] = []
    for item in items:
        if len(item) != 2:
            raise LayoutError(f"each dimension must be a (count, step) pair, got {item!r}")
        count = positive_int("a dimension's count", item[0])
        step = positive_int("a dimension's step", item[1])
        if count == 1:
            continue
        below = _span(tuple(out))
        if step <= below:
            raise LayoutError(
                f"dimension (count {count}, step {step}) overlaps the dimensions before it, which "
                f"span {below}; each step must exceed that span (list dimensions fastest first)"
            )
        if out and step == out[-1][0] * out[-1][1]:  # contiguous with the previous one: merge
            out[-1] = (out[-1][0] * count, out[-1][1])
        else:
            out.append((count, step))
    return tuple(out)


@dataclass(frozen=True)
class GroupView(Sequence[int]):
    """One group of ranks, ``start + Σ i_k·step_k`` (``0 <= i_k < count_k``), ascending.

    A read-only sequence like ``range``: :attr:`size`, indexing (negative too), ``in``,
    ``index``, iteration and ``reversed`` work without listing the group; :meth:`first`
    lists the first members. ``len`` answers up to ``sys.maxsize`` members (Python's limit;
    past it, read ``size``). ``dims`` is kept canonical (no one-member dimensions, contiguous
    ones merged), so two views are equal iff they hold the same ranks.

    Example: ``GroupView(1, ((4, 2),))`` holds ranks 1, 3, 5, 7; its ``stride`` is 2.
    """

    start: int
    dims: Dims = ()

    def __post_init__(self) -> None:
        start = integer("start", self.start)
        if start < 0:
            raise LayoutError(f"a group's first rank must be >= 0, got {start}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "dims", _canonical(self.dims))

    # -- size and ends ---------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of members, a Python int of any size: what the library reads, never ``len``."""
        return math.prod(count for count, _ in self.dims)

    def __len__(self) -> int:
        """``len(view)`` for callers' convenience. Python's ``len`` cannot exceed ``sys.maxsize``
        (2**63 - 1), so a larger group raises LayoutError pointing at :attr:`size`; the library
        itself never calls it (``tests/test_planner_bounded.py`` trips on any call)."""
        size = self.size
        if size > sys.maxsize:
            raise LayoutError(
                f"a group of {size} ranks is larger than len() can count (at most sys.maxsize = "
                f"{sys.maxsize}); read view.size instead (and view.first(n) for its first members)"
            )
        return size

    def __bool__(self) -> bool:
        """Always true: a group holds at least its first rank (and truth never asks ``len``)."""
        return True

    def __reversed__(self) -> Iterator[int]:
        """Members from the last down, without ``len`` (``Sequence``'s own asks it)."""
        for position in range(self.size - 1, -1, -1):
            yield self._member(position)

    @property
    def last(self) -> int:
        """The largest member."""
        return self.start + _span(self.dims)

    @property
    def stride(self) -> Optional[int]:
        """The common difference when the members are evenly spaced (one dimension), else None."""
        return self.dims[0][1] if len(self.dims) == 1 else None

    # -- members -----------------------------------------------------------------

    def _member(self, position: int) -> int:
        offset = 0
        for count, step in self.dims:
            position, digit = divmod(position, count)
            offset += digit * step
        return self.start + offset

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> List[int]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[int, List[int]]:
        if isinstance(index, slice):
            return [self._member(i) for i in range(*index.indices(self.size))]
        position = integer("index", index)
        size = self.size
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError(f"index {index} is outside a group of {size} ranks")
        return self._member(position)

    def __iter__(self) -> Iterator[int]:
        for position in range(self.size):
            yield self._member(position)

    def first(self, n: int) -> List[int]:
        """The first ``n`` members (all of them when the group is smaller), ascending.

        Example: ``GroupView(0, ((1024, 8),)).first(3) == [0, 8, 16]``.
        """
        n = integer("n", n)
        if n < 0:
            raise LayoutError(f"first(n) needs n >= 0, got {n}")
        return [self._member(i) for i in range(min(n, self.size))]

    def position(self, rank: Any) -> Optional[int]:
        """Where ``rank`` stands in the group, or None when it is not a member."""
        try:
            rank = integer("rank", rank)
        except LayoutError:
            return None
        offset = rank - self.start
        if offset < 0:
            return None
        position, scale = 0, self.size
        for size, step in reversed(self.dims):  # slowest dimension first
            scale //= size
            digit, offset = divmod(offset, step)
            if digit >= size:
                return None
            position += digit * scale
        return position if offset == 0 else None

    def __contains__(self, rank: object) -> bool:
        return self.position(rank) is not None

    def index(self, rank: Any, start: int = 0, stop: Optional[int] = None) -> int:
        position = self.position(rank)
        if position is None or position < start or (stop is not None and position >= stop):
            raise ValueError(f"{rank!r} is not in the group")
        return position

    def count(self, rank: Any) -> int:
        return 0 if self.position(rank) is None else 1

    def next_at_or_after(self, rank: int) -> Optional[int]:
        """The smallest member ``>= rank``, or None when every member is smaller. O(dimensions).

        Example: ``GroupView(0, ((2, 1), (2, 8))).next_at_or_after(2) == 8``.
        """
        target = integer("rank", rank) - self.start
        if target <= 0:
            return self.start
        offset = _smallest_at_or_after(self.dims, target)
        return None if offset is None else self.start + offset

    # -- parts ---------------------------------------------------------------------

    def chunk(self, index: int, size: int) -> "GroupView":
        """Members ``index·size .. index·size + size - 1``, as a view.

        ``size`` must divide the group and cut it where every chunk has the same shape:
        a product of whole leading dimensions times a divisor of the next one.

        Example: ``GroupView(0, ((4, 2),)).chunk(1, 2) == GroupView(4, ((2, 2),))``.
        """
        size = positive_int("chunk size", size)
        index = integer("chunk index", index)
        total = self.size
        if total % size:
            raise LayoutError(
                f"chunks of {size} ranks do not divide a group of {total}; choose a divisor of {total}"
            )
        if not 0 <= index < total // size:
            raise LayoutError(f"chunk index {index} is outside 0..{total // size - 1}")
        dims = _chunk_dims(self.dims, size)
        if dims is None:
            raise LayoutError(
                f"chunks of {size} ranks of a group shaped {_shape_text(self.dims)} are not all "
                "shaped alike; choose a size that divides, or is a multiple of, the fastest dimension"
            )
        return GroupView(self._member(index * size), dims)

    def nodes(self, gpus_per_node: int) -> "NodeSet":
        """The nodes (``rank // gpus_per_node``) this group's ranks sit on.

        Example: ``GroupView(1, ((4, 2),)).nodes(4).first(8) == [0, 1]``.
        """
        return NodeSet.of(self, gpus_per_node)


def _smallest_at_or_after(dims: Dims, target: int) -> Optional[int]:
    """The smallest lattice offset ``>= target`` (``target > 0``), or None."""
    if not dims:
        return None
    count, step = dims[-1]
    inner = dims[:-1]
    digit, rest = divmod(target, step)
    if digit >= count:
        return None
    if rest == 0:
        return digit * step
    if rest <= _span(inner):
        found = _smallest_at_or_after(inner, rest)
        if found is not None:
            return digit * step + found
    return (digit + 1) * step if digit + 1 < count else None


def _chunk_dims(dims: Dims, size: int) -> Optional[Dims]:
    """The dims of a chunk of ``size`` members, or None when chunks differ in shape."""
    out = []
    remaining = size
    for count, step in dims:
        if remaining == 1:
            break
        if remaining % count == 0:
            out.append((count, step))
            remaining //= count
        elif count % remaining == 0:
            out.append((remaining, step))
            remaining = 1
        else:
            return None
    return tuple(out)


def _shape_text(dims: Dims) -> str:
    return " × ".join(f"{count} (step {step})" for count, step in dims) or "1 rank"


def partition_fits_nodes(dims: Any, gpus_per_node: int) -> bool:
    """Whether every group of a partition of the world stays inside one node.

    For partitions whose groups are the translates ``base + lattice(dims)`` over every
    combination of the other dimensions of a rank grid (megatron-core's groups, and
    aligned chunks of them such as hpZ blocks). Then each group lies in an aligned
    block of ``Q = count·step`` ranks of its slowest dimension, and every group fits in
    a node exactly when ``Q`` divides ``gpus_per_node`` (any other node size cuts some
    group). O(1).

    Example: ``partition_fits_nodes(((2, 1),), 8)`` (tp 2 in nodes of 8) is True;
    ``partition_fits_nodes(((4, 2),), 4)`` (dp 4 after tp 2, nodes of 4) is False.
    """
    shape = _canonical(dims)
    gpn = positive_int("gpus_per_node", gpus_per_node)
    if not shape:
        return True
    count, step = shape[-1]
    return gpn % (count * step) == 0


@dataclass(frozen=True)
class NodeSet:
    """The nodes a group's ranks sit on, worked out from its geometry, ascending.

    The group's slowest dimensions whose steps are whole nodes (``outer``) repeat the
    node pattern of the rest (``inner``) at fixed node offsets; the inner pattern is
    found in closed form or walked node by node (at most :data:`NODE_WALK_LIMIT`
    nodes). ``count`` is exact, or None when that walk would be longer; ``first``,
    ``last`` and ``stride`` always answer.

    Example: ``GroupView(0, ((2 ** 20, 8),)).nodes(8).count == 2 ** 20``.
    """

    gpus_per_node: int
    inner: GroupView
    outer: GroupView  # node offsets, start 0
    inner_nodes: Optional[Tuple[int, ...]] = field(default=None, repr=False)
    inner_count: Optional[int] = None
    inner_stride: Optional[int] = None  # common difference of the inner nodes when known even

    @classmethod
    def of(cls, view: GroupView, gpus_per_node: int) -> "NodeSet":
        """The node set of ``view`` for nodes of ``gpus_per_node`` ranks."""
        if not isinstance(view, GroupView):
            raise LayoutError(f"NodeSet.of needs a GroupView, got {view!r} ({type(view).__name__})")
        g = positive_int("gpus_per_node", gpus_per_node)
        dims = list(view.dims)
        outer: List[Tuple[int, int]] = []
        while dims:
            size, step = dims[-1]
            # whole-node steps that keep the inner pattern inside one step's window
            if step % g or view.start % step + _span(tuple(dims[:-1])) >= step:
                break
            outer.insert(0, (size, step // g))
            dims.pop()
        inner = GroupView(view.start, tuple(dims))
        nodes, count, stride = _inner_nodes(inner, g)
        return cls(g, inner, GroupView(0, tuple(outer)), nodes, count, stride)

    @property
    def count(self) -> Optional[int]:
        """Number of distinct nodes, or None when not worked out (see the class docstring)."""
        return None if self.inner_count is None else self.inner_count * self.outer.size

    @property
    def size(self) -> Optional[int]:
        """Same as :attr:`count` (so that formatters treat it like a group)."""
        return self.count

    @property
    def last(self) -> int:
        return self.inner.last // self.gpus_per_node + self.outer.last

    def as_view(self) -> Optional[GroupView]:
        """The nodes as a :class:`GroupView` when they form a lattice (inner nodes evenly spaced)."""
        if self.inner_count is None or (self.inner_count > 1 and self.inner_stride is None):
            return None
        first = self.inner.start // self.gpus_per_node
        inner = ((self.inner_count, self.inner_stride or 1),)
        return GroupView(first, inner + self.outer.dims)

    @property
    def stride(self) -> Optional[int]:
        """The common difference when the nodes are evenly spaced and that is known, else None."""
        view = self.as_view()
        return None if view is None else view.stride

    def first(self, n: int) -> List[int]:
        """The first ``n`` nodes, ascending. O(n · dimensions)."""
        n = integer("n", n)
        out: List[int] = []
        for shift in self.outer:
            for node in self._inner_iter():
                if len(out) >= n:
                    return out
                out.append(node + shift)
        return out

    def _inner_iter(self) -> Iterator[int]:
        if self.inner_nodes is not None:
            yield from self.inner_nodes
            return
        g = self.gpus_per_node
        rank: Optional[int] = self.inner.start
        while rank is not None:
            node = rank // g
            yield node
            rank = self.inner.next_at_or_after((node + 1) * g)


def _inner_nodes(inner: GroupView, g: int) -> Tuple[Optional[Tuple[int, ...]], Optional[int], Optional[int]]:
    """``(nodes or None, count or None, stride or None)`` of a group's inner pattern."""
    first, last = inner.start // g, inner.last // g
    if len(inner.dims) == 1 and inner.dims[0][1] < g:  # steps under a node: every node in between
        return None, last - first + 1, 1
    if len(inner.dims) == 1 and inner.size > NODE_WALK_LIMIT:  # steps of a node or more: one each
        return None, inner.size, None
    nodes: List[int] = []
    rank: Optional[int] = inner.start
    while rank is not None:
        if len(nodes) >= NODE_WALK_LIMIT:
            return None, None, None
        node = rank // g
        nodes.append(node)
        rank = inner.next_at_or_after((node + 1) * g)
    gaps = {b - a for a, b in zip(nodes, nodes[1:])}
    return tuple(nodes), len(nodes), (gaps.pop() if len(gaps) == 1 else None)
