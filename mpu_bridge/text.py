"""Plain-text helpers shared by the planner and the reports: rank lists and tables. No torch.

* :func:`abbreviate_ranks` -- an ordered group (a list, a ``range``, or a
  :class:`~mpu_bridge.groupview.GroupView` / :class:`~mpu_bridge.groupview.NodeSet`,
  which are never listed) as ``[0,8,…,120] (16)``;
* :func:`format_ranks` -- any set of ranks as ranges, ``[0-2, 5]`` (for messages
  about which ranks did what);
* :func:`table` -- rows in aligned columns.

Example::

    >>> abbreviate_ranks(range(0, 128, 8))
    '[0,8,…,120] (16)'
    >>> format_ranks([0, 1, 2, 5])
    '[0-2, 5]'
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from .errors import LayoutError
from .groupview import GroupView, NodeSet
from .validate import boolean, positive_int

__all__ = ["ELLIPSIS", "abbreviate_ranks", "format_ranks", "table"]

ELLIPSIS = "…"

#: Groups at most this long are written out in full by :func:`abbreviate_ranks`.
SHORT_GROUP = 8


def abbreviate_ranks(ranks: Any, *, limit: int = SHORT_GROUP, show_count: bool = True) -> str:
    """An ascending rank list as text: in full up to ``limit`` members, else its head, ``…``,
    last rank and length.

    An evenly spaced list shows its first two members (enough to read the stride);
    any other list shows its first four. ``show_count=False`` leaves out the length.
    A ``range``, :class:`~mpu_bridge.groupview.GroupView` or
    :class:`~mpu_bridge.groupview.NodeSet` is described without being listed.

    Example: ``abbreviate_ranks([0, 1])`` is ``'[0,1]'``;
    ``abbreviate_ranks(range(0, 128, 8))`` is ``'[0,8,…,120] (16)'``.
    """
    limit = positive_int("limit", limit, LayoutError)
    show_count = boolean("show_count", show_count, LayoutError)
    if isinstance(ranks, (GroupView, NodeSet)):
        return _abbreviate(ranks.size, ranks.first, ranks.last, ranks.stride, limit, show_count)
    if isinstance(ranks, range):
        if not ranks:
            return "[]"
        stride = ranks.step if ranks.step > 0 else None
        return _abbreviate(len(ranks), lambda n: list(ranks[:n]), ranks[-1], stride, limit, show_count)
    items: List[int] = ranks if isinstance(ranks, list) else list(ranks)
    if len(items) <= max(limit, 3):
        return "[" + ",".join(map(str, items)) + "]"
    return _abbreviate(len(items), lambda n: items[:n], items[-1], _list_stride(items), limit, show_count)


def _list_stride(ranks: List[int]) -> Optional[int]:
    """The common positive difference of ``ranks`` (two or more), else None."""
    step = ranks[1] - ranks[0]
    evenly_spaced = (
        step > 0
        and (ranks[-1] - ranks[0]) == step * (len(ranks) - 1)  # cheap test first: no list when it fails
        and ranks == list(range(ranks[0], ranks[-1] + 1, step))
    )
    return step if evenly_spaced else None


def _abbreviate(
    count: Optional[int],
    first: Callable[[int], List[int]],
    last: int,
    stride: Optional[int],
    limit: int,
    show_count: bool,
) -> str:
    """The text of :func:`abbreviate_ranks` from a description (``count`` None: not known)."""
    if count is not None and count <= max(limit, 3):
        head = first(count)
        return "[" + ",".join(map(str, head)) + "]"
    if stride is not None:
        head = first(2)
    else:
        head = first(4 if count is None else min(4, count - 2))
    text = "[" + ",".join(map(str, head)) + f",{ELLIPSIS},{last}]"
    if not show_count:
        return text
    return f"{text} ({count})" if count is not None else f"{text} (count not worked out)"


def format_ranks(ranks: Sequence[int], limit: int = 24) -> str:
    """Ranks as a short list with ranges, e.g. ``[0, 1, 4-7]``; long lists are cut with a count.

    Example: ``format_ranks([0, 1, 2, 5]) == "[0-2, 5]"``.
    """
    ordered = sorted(set(int(r) for r in ranks))
    parts: List[str] = []
    start = prev = None
    for r in ordered:
        if start is None:
            start = prev = r
        elif r == prev + 1:  # type: ignore[operator]
            prev = r
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = r
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    if len(parts) > limit:
        shown = ", ".join(parts[:limit])
        return f"[{shown}, ... ({len(ordered)} ranks in all)]"
    return "[" + ", ".join(parts) + "]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> List[str]:
    """Rows in aligned columns (indices in ``right`` right-aligned), no trailing spaces.

    Example: ``table(["kind", "size"], [["tp", "8"]], right=(1,)) == ["kind  size", "tp       8"]``.
    """
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in [header, *rows]
    ]
