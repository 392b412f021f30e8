"""Text, JSON and SVG renderings of a :class:`~mpu_bridge.layout.Layout` (pure; no torch).

Every function here is a pure function of a layout and a few options, returns a
string (or a JSON-ready dict), and does work bounded by what it shows, never by
the world size: summaries take the first groups with ``iter_groups`` and one
rank's groups with ``group_of``, so a 1,048,576-rank layout renders in
milliseconds.

Example::

    >>> from mpu_bridge.layout import plan
    >>> layout = plan(16, tp=2, ep=4, gpus_per_node=8)
    >>> abbreviate_ranks(layout.group("dp", 0))
    '[0,2,4,6,8,10,12,14]'
    >>> abbreviate_ranks(list(range(0, 128, 8)))
    '[0,8,…,120] (16)'
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .layout import KINDS, Layout

__all__ = [
    "abbreviate_ranks",
    "default_color_kind",
    "layout_report",
    "render_json",
    "render_svg",
    "render_text",
    "row_width",
]

#: Groups at most this long are written out in full by :func:`abbreviate_ranks`.
_SHORT_GROUP = 8

_ELLIPSIS = "…"


# -- shared helpers ------------------------------------------------------------


def abbreviate_ranks(ranks: Sequence[int], *, limit: int = _SHORT_GROUP, show_count: bool = True) -> str:
    """A rank list as text: in full up to ``limit`` members, else its head, ``…``, last rank and length.

    An evenly spaced list shows its first two members (enough to read the stride);
    any other list shows its first four. ``show_count=False`` leaves out the length.

    Example: ``abbreviate_ranks([0, 1])`` is ``'[0,1]'``;
    ``abbreviate_ranks(range(0, 128, 8))`` is ``'[0,8,…,120] (16)'``.
    """
    if not isinstance(ranks, list):
        ranks = list(ranks)
    count = len(ranks)
    if count <= max(limit, 3):
        return "[" + ",".join(map(str, ranks)) + "]"
    step = ranks[1] - ranks[0]
    evenly_spaced = (
        step > 0
        and (ranks[-1] - ranks[0]) == step * (count - 1)  # cheap test first: no list when it fails
        and ranks == list(range(ranks[0], ranks[-1] + 1, step))
    )
    head = ranks[:2] if evenly_spaced else ranks[: min(4, count - 2)]
    text = "[" + ",".join(map(str, head)) + f",{_ELLIPSIS},{ranks[-1]}]"
    return f"{text} ({count})" if show_count else text


def default_color_kind(layout: Layout) -> str:
    """The kind a picture is coloured by when none is chosen.

    ``ep`` when expert parallelism is on, else the first of ``tp``, ``cp``, ``pp``,
    ``dp`` whose groups have more than one rank (``tp`` when none has).

    Example: ``default_color_kind(plan(64, tp=2, ep=4)) == "ep"``.
    """
    config = layout.config
    if config.ep > 1:
        return "ep"
    for kind in ("tp", "cp", "pp", "dp"):
        if layout.size(kind) > 1:
            return kind
    return "tp"


def row_width(layout: Layout) -> int:
    """Ranks per drawn row: ``gpus_per_node`` when known, else a multiple of tp·cp near 8.

    Without ``gpus_per_node``: the smallest multiple of tp·cp that is at least 8,
    at most 32 and divides the world; failing that, 8 (or the world when smaller).

    Example: ``row_width(plan(64, tp=2)) == 8``; ``row_width(plan(64, tp=16)) == 16``.
    """
    config = layout.config
    if config.gpus_per_node is not None:
        return config.gpus_per_node
    world = config.world_size
    base = config.tp * config.cp
    width = base
    while width <= 32:
        if width >= min(8, world) and world % width == 0:
            return width
        width += base
    return min(8, world)


def _plural(count: int, noun: str) -> str:
    """``"1 rank"``, ``"2 ranks"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _nodes_of(ranks: Sequence[int], gpus_per_node: int) -> List[int]:
    return sorted({rank // gpus_per_node for rank in ranks})


def _describe_nodes(nodes: Sequence[int]) -> str:
    if len(nodes) == 1:
        return f"node {nodes[0]}"
    return f"{len(nodes)} nodes {abbreviate_ranks(nodes, show_count=False)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> List[str]:
    """Rows aligned in columns; column indices in ``right`` are right-aligned. No trailing spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _grid_text(layout: Layout, grid: str) -> str:
    """One grid's dimensions in order-string order (first varies fastest), e.g. ``tp 2 × dp 16``."""
    config = layout.config
    if grid == "dense":
        sizes = {
            "tp": ("tp", config.tp),
            "cp": ("cp", config.cp),
            "dp": ("dp", config.dp),
            "pp": ("pp", config.pp),
        }
    else:
        sizes = {
            "tp": ("etp", config.etp),
            "ep": ("ep", config.ep),
            "dp": ("edp", config.edp),
            "pp": ("pp", config.pp),
        }
    order = layout.dense.order  # every token, the ones the order string left out appended
    return " × ".join(f"{sizes[token][0]} {sizes[token][1]}" for token in order if token in sizes)


def _header_lines(layout: Layout) -> List[str]:
    config = layout.config
    world = config.world_size
    gpn = config.gpus_per_node
    if gpn is None:
        placement = f"{_plural(world, 'rank')} (GPUs per node not given)"
    else:
        placement = f"{_plural(world, 'rank')} = {_plural(world // gpn, 'node')} × {_plural(gpn, 'GPU')}"
    return [
        f"mpu-bridge plan: {placement}, order {config.order} (first varies fastest)",
        f"  dense grid   {_grid_text(layout, 'dense')}",
        f"  expert grid  {_grid_text(layout, 'expert')}",
    ]


def _intra_node_text(layout: Layout, kind: str) -> str:
    return "yes" if layout.intra_node(kind) else "no — crosses nodes"


# -- text ----------------------------------------------------------------------


def _first_groups_text(layout: Layout, kind: str, max_groups: Optional[int], fit_width: Optional[int]) -> str:
    count = layout.num_groups(kind)
    shown_limit = count if max_groups is None else min(count, max_groups)
    parts: List[str] = []
    used = 0
    for group in itertools.islice(layout.iter_groups(kind), shown_limit):
        part = abbreviate_ranks(group)
        if parts and fit_width is not None and used + 1 + len(part) > fit_width:
            break
        parts.append(part)
        used += len(part) + (1 if len(parts) > 1 else 0)
    if len(parts) < count:
        parts.append(_ELLIPSIS)
    return " ".join(parts)


def render_text(
    layout: Layout,
    *,
    rank: Optional[int] = None,
    max_groups: Optional[int] = 4,
    fit_width: Optional[int] = 56,
) -> str:
    """The plan as a table: a config header, then one row per group kind.

    Each row gives the kind, its description, group size, number of groups, whether
    every group stays inside one node (when ``gpus_per_node`` is known) and the first
    groups: at most ``max_groups`` (``None``: all), and, when ``fit_width`` is set,
    only as many as fit in that many characters (always at least one). With ``rank``,
    a second table gives that rank's node and its group, group index and position in
    every kind. Raises :class:`~mpu_bridge.errors.LayoutError` for a rank outside the world.

    Example: ``render_text(plan(16, tp=2, gpus_per_node=8), rank=3)``.
    """
    config = layout.config
    gpn = config.gpus_per_node
    rank_rows: List[List[str]] = []
    if rank is not None:  # validate before doing any other work
        for kind in layout.kinds:
            members = layout.group_of(kind, rank)
            row = [
                kind,
                str(layout.group_index(kind, rank)),
                str(layout.rank_in_group(kind, rank)),
                abbreviate_ranks(members, limit=16),
            ]
            if gpn is not None:
                row.append(_describe_nodes(_nodes_of(members, gpn)))
            rank_rows.append(row)

    lines = _header_lines(layout)
    lines.append("")
    header = ["kind", "description", "size", "groups"]
    if gpn is not None:
        header.append("in one node?")
    header.append("first groups")
    rows = []
    for kind in layout.kinds:
        row = [kind, KINDS[kind].description, str(layout.size(kind)), str(layout.num_groups(kind))]
        if gpn is not None:
            row.append(_intra_node_text(layout, kind))
        row.append(_first_groups_text(layout, kind, max_groups, fit_width))
        rows.append(row)
    lines.extend(_table(header, rows, right=(2, 3)))
    if gpn is None:
        lines.append("")
        lines.append("(pass --gpus-per-node to see which groups cross nodes)")

    if rank is not None:
        lines.append("")
        if gpn is None:
            lines.append(f"rank {rank}")
        else:
            node = layout.node_of(rank)
            lines.append(f"rank {rank} on node {node} (ranks {node * gpn}..{node * gpn + gpn - 1})")
        rank_header = ["kind", "group", "position", "members"]
        if gpn is not None:
            rank_header.append("spans")
        lines.extend(_table(rank_header, rank_rows, right=(1, 2)))
    return "\n".join(lines) + "\n"


# -- JSON ----------------------------------------------------------------------


def layout_report(
    layout: Layout, *, rank: Optional[int] = None, max_groups: Optional[int] = 8
) -> Dict[str, Any]:
    """:meth:`Layout.to_dict` plus ``config["nodes"]`` and, with ``rank``, that rank's groups.

    ``report["rank"] = {"rank": r, "node": n or None, "groups": {kind: {"index", "position",
    "ranks", "nodes"?}}}`` with every member listed. ``max_groups`` bounds the groups
    listed per kind (``None``: all).

    Example: ``layout_report(plan(8, tp=2), rank=3)["rank"]["groups"]["tp"]["ranks"] == [2, 3]``.
    """
    gpn = layout.config.gpus_per_node
    rank_part: Optional[Dict[str, Any]] = None
    if rank is not None:
        groups: Dict[str, Any] = {}
        for kind in layout.kinds:
            members = layout.group_of(kind, rank)
            entry: Dict[str, Any] = {
                "index": layout.group_index(kind, rank),
                "position": layout.rank_in_group(kind, rank),
                "ranks": members,
            }
            if gpn is not None:
                entry["nodes"] = _nodes_of(members, gpn)
            groups[kind] = entry
        rank_part = {"rank": rank, "node": None if gpn is None else layout.node_of(rank), "groups": groups}
    report = layout.to_dict(max_groups=max_groups)
    report["config"]["nodes"] = None if gpn is None else layout.world_size // gpn
    if rank_part is not None:
        report["rank"] = rank_part
    return report


def _json_text(value: Any, level: int = 0) -> str:
    """JSON with objects and lists of containers indented, and each list of numbers on one line."""
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(key))}: {_json_text(item, level + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(value, list) and value and all(isinstance(item, (list, dict)) for item in value):
        items = [pad + _json_text(item, level + 1) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(value)


def render_json(layout: Layout, *, rank: Optional[int] = None, max_groups: Optional[int] = 8) -> str:
    """:func:`layout_report` as JSON text: indented, one line per rank list, ending in a newline."""
    return _json_text(layout_report(layout, rank=rank, max_groups=max_groups)) + "\n"


# -- SVG -----------------------------------------------------------------------


def _escape(text: str) -> str:
    """``text`` safe inside an XML element or a double-quoted attribute."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


#: Fill colours, cycled by group index: light, distinct hues that keep black labels readable.
_PALETTE: Tuple[str, ...] = (
    "#8ecae6",  # sky
    "#ffb703",  # amber
    "#90be6d",  # green
    "#f4978e",  # salmon
    "#b8a1e3",  # lavender
    "#f9e27d",  # butter
    "#6cc5b0",  # teal
    "#f7a8d8",  # pink
    "#c9b18f",  # sand
    "#a3b8f5",  # periwinkle
    "#d4e157",  # lime
    "#ffcc99",  # peach
)

#: Overlays that tell groups ``i`` and ``i + len(_PALETTE)`` apart: none, two hatches, cross-hatch.
_PATTERNS: Tuple[Optional[str], ...] = (None, "hatch-a", "hatch-b", "hatch-x")

_PATTERN_DEFS = {
    "hatch-a": '<pattern id="hatch-a" patternUnits="userSpaceOnUse" width="6" height="6" '
    'patternTransform="rotate(45)"><rect width="2" height="6" fill="#000" fill-opacity="0.2"/></pattern>',
    "hatch-b": '<pattern id="hatch-b" patternUnits="userSpaceOnUse" width="6" height="6" '
    'patternTransform="rotate(-45)"><rect width="2" height="6" fill="#000" fill-opacity="0.2"/></pattern>',
    "hatch-x": '<pattern id="hatch-x" patternUnits="userSpaceOnUse" width="6" height="6">'
    '<rect width="1.5" height="6" fill="#000" fill-opacity="0.18"/>'
    '<rect width="6" height="1.5" fill="#000" fill-opacity="0.18"/></pattern>',
}

#: Most rank cells one picture draws; larger worlds show their first nodes only.
_MAX_CELLS = 512
#: Fewest ranks a summarised picture shows, so that the repeating pattern is visible.
_MIN_SHOWN_RANKS = 64
#: Most cells on one drawn line; a node with more GPUs wraps onto several lines.
_MAX_LINE = 32
#: Most groups the legend lists.
_MAX_LEGEND = 16

_FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
_MARGIN = 16
_GAP = 4
_NODE_GAP = 10
_CELL_H = 34
_TEXT_W = 6.8  # rough width of one 12px character, for sizing the canvas


def _fill(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _pattern(index: int) -> Optional[str]:
    return _PATTERNS[(index // len(_PALETTE)) % len(_PATTERNS)]


def _line_width(unit: int) -> int:
    """Cells per drawn line for rows of ``unit`` ranks: all of them, or a divisor of at most 32."""
    if unit <= _MAX_LINE:
        return unit
    for width in range(_MAX_LINE, 7, -1):
        if unit % width == 0:
            return width
    return _MAX_LINE


@dataclass(frozen=True)
class _Extent:
    """Which ranks a picture draws: rows ``0..rows-1`` of ``unit`` ranks each, ``ranks`` in all."""

    unit: int
    total_rows: int
    rows: int
    ranks: int


def _extent(layout: Layout, kind: str, cover_groups: int) -> _Extent:
    """All rows when the world fits; else enough rows to cover the first ``cover_groups`` groups.

    When those groups would need more than ``_MAX_CELLS`` ranks, the picture shows
    just enough rows for ``_MIN_SHOWN_RANKS`` ranks (two rows at least): more rows
    of partial groups would repeat the same stripes.
    """
    world = layout.world_size
    unit = row_width(layout)
    total_rows = -(-world // unit)
    if world <= _MAX_CELLS:
        return _Extent(unit, total_rows, total_rows, world)
    if unit >= _MAX_CELLS:  # one node alone is too big: draw its first ranks
        return _Extent(unit, total_rows, 1, _MAX_CELLS)
    cap = _MAX_CELLS // unit
    fewest = min(cap, max(2, -(-_MIN_SHOWN_RANKS // unit)))  # two rows at least: shows a boundary
    needed = fewest
    for group in itertools.islice(layout.iter_groups(kind), cover_groups):
        needed = max(needed, group[-1] // unit + 1)
        if needed >= cap:
            break
    if needed > cap:  # the first groups do not fit anyway: the smallest picture shows the pattern
        needed = fewest
    rows = min(needed, total_rows)
    return _Extent(unit, total_rows, rows, min(world, rows * unit))


def _text(
    x: float,
    y: float,
    content: str,
    *,
    size: int = 12,
    weight: str = "normal",
    anchor: str = "start",
    fill: str = "#222",
) -> str:
    attrs = f'x="{x:g}" y="{y:g}" font-size="{size}" fill="{fill}"'
    if weight != "normal":
        attrs += f' font-weight="{weight}"'
    if anchor != "start":
        attrs += f' text-anchor="{anchor}"'
    return f"<text {attrs}>{_escape(content)}</text>"


def render_svg(
    layout: Layout,
    *,
    color_by: Optional[str] = None,
    rank: Optional[int] = None,
    max_groups: Optional[int] = 8,
) -> str:
    """A picture of the rank grid: nodes as rows of GPU cells, coloured by group of ``color_by``.

    Each cell shows its rank and (small, ``#i``) the index of its group of ``color_by``
    (default :func:`default_color_kind`); fills cycle through a fixed palette by group
    index, and groups beyond the palette get a hatch on top. A title states the config,
    the kind, its group size and count, and whether its groups cross nodes; a legend
    lists the groups drawn. Worlds over 512 ranks draw only their first nodes (enough
    to cover the first ``max_groups`` groups of the kind, ``None``: as many as fit in
    512 ranks) and say so. With ``rank``, that rank's cell and its group's cells are
    outlined. Output is deterministic and parses as XML. Raises
    :class:`~mpu_bridge.errors.LayoutError` for an unknown kind or a rank outside the world.

    Example: ``render_svg(plan(64, tp=2, pp=2, ep=4, gpus_per_node=8), color_by="ep")``.
    """
    kind = default_color_kind(layout) if color_by is None else color_by
    spec = layout.spec(kind)  # raises LayoutError for an unknown kind
    config = layout.config
    world = layout.world_size
    gpn = config.gpus_per_node
    rank_group: List[int] = []
    if rank is not None:
        rank_group = layout.group_of(kind, rank)  # validates the rank
    highlighted = set(rank_group)

    extent = _extent(layout, kind, layout.num_groups(kind) if max_groups is None else max(1, max_groups))
    line = _line_width(extent.unit)
    row_name = "node" if gpn is not None else "row"

    # -- text above the grid
    count, size = layout.num_groups(kind), layout.size(kind)
    if gpn is not None:
        placement = "every group stays inside one node" if layout.intra_node(kind) else "groups cross nodes"
    else:
        placement = f"node placement unknown (no GPUs per node given; rows of {_plural(extent.unit, 'rank')})"
    nodes = "" if gpn is None else f" = {_plural(world // gpn, 'node')} × {_plural(gpn, 'GPU')}"
    title_lines = [
        (f"mpu-bridge plan: {_plural(world, 'rank')}{nodes}, order {config.order}", 14, "bold"),
        (
            f"dense grid {_grid_text(layout, 'dense')};  expert grid {_grid_text(layout, 'expert')}",
            12,
            "normal",
        ),
        (
            f"coloured by {kind} ({spec.description}): {_plural(count, 'group')} of "
            f"{_plural(size, 'rank')} — {placement}",
            12,
            "bold",
        ),
    ]
    if extent.ranks < world:
        if extent.rows == 1 and extent.ranks < extent.unit:
            shown = f"showing ranks 0..{extent.ranks - 1} of {world} (part of {row_name} 0)"
        elif extent.rows == 1:
            shown = f"showing {row_name} 0 of {extent.total_rows} (ranks 0..{extent.ranks - 1} of {world})"
        else:
            shown = (
                f"showing {row_name}s 0..{extent.rows - 1} of {extent.total_rows} "
                f"(ranks 0..{extent.ranks - 1} of {world})"
            )
        title_lines.append((shown, 12, "normal"))
    if rank is not None:
        where = f" (node {layout.node_of(rank)})" if gpn is not None else ""
        drawn = " (outlined)" if rank < extent.ranks else " (not drawn)"
        title_lines.append(
            (
                f"rank {rank}{where} is in {kind} group #{layout.group_index(kind, rank)} "
                f"{abbreviate_ranks(rank_group)}{drawn}",
                12,
                "normal",
            )
        )

    # -- geometry
    cell_w = max(44, 8 * len(str(max(extent.ranks - 1, 0))) + 14)
    labels = [f"{row_name} {r}" for r in range(extent.rows)]
    label_w = int(max(len(label) for label in labels) * _TEXT_W) + 14
    title_h = _MARGIN + 18 * len(title_lines) + 8
    grid_x = _MARGIN + label_w
    grid_w = line * (cell_w + _GAP) - _GAP

    out: List[str] = []
    defs_used: List[str] = []
    cells: List[str] = []
    group_order: List[int] = []  # groups in order of first appearance
    seen_groups = set()
    y = title_h
    for row in range(extent.rows):
        row_start = row * extent.unit
        row_ranks = range(row_start, min(row_start + extent.unit, extent.ranks))
        lines_here = -(-len(row_ranks) // line)
        height = lines_here * (_CELL_H + _GAP) - _GAP
        cells.append(f'<g class="{row_name}" data-{row_name}="{row}">')
        cells.append(
            f'<rect x="{grid_x - 5}" y="{y - 5}" width="{grid_w + 10}" height="{height + 10}" '
            'rx="6" fill="#f4f4f4" stroke="#b0b0b0"/>'
        )
        cells.append(_text(_MARGIN, y + _CELL_H / 2 + 4, labels[row], size=12, fill="#555"))
        for position, cell_rank in enumerate(row_ranks):
            index = layout.group_index(kind, cell_rank)
            if index not in seen_groups:
                seen_groups.add(index)
                group_order.append(index)
            x = grid_x + (position % line) * (cell_w + _GAP)
            cy = y + (position // line) * (_CELL_H + _GAP)
            if cell_rank == rank:
                stroke = 'stroke="#000" stroke-width="3"'
            elif cell_rank in highlighted:
                stroke = 'stroke="#000" stroke-width="2" stroke-dasharray="4 2"'
            else:
                stroke = 'stroke="#666" stroke-width="0.75"'
            cells.append(f'<g class="cell" data-rank="{cell_rank}" data-group="{index}">')
            cells.append(
                f'<rect x="{x}" y="{cy}" width="{cell_w}" height="{_CELL_H}" rx="3" '
                f'fill="{_fill(index)}" {stroke}/>'
            )
            pattern = _pattern(index)
            if pattern is not None:
                if pattern not in defs_used:
                    defs_used.append(pattern)
                cells.append(
                    f'<rect x="{x}" y="{cy}" width="{cell_w}" height="{_CELL_H}" rx="3" '
                    f'fill="url(#{pattern})"/>'
                )
            middle = x + cell_w / 2
            cells.append(_text(middle, cy + 15, str(cell_rank), weight="bold", anchor="middle", fill="#111"))
            cells.append(_text(middle, cy + 28, f"#{index}", size=9, anchor="middle", fill="#333"))
            cells.append("</g>")
        cells.append("</g>")
        y += height + _NODE_GAP

    # -- legend below the grid
    legend_y = y + 14
    legend: List[str] = []
    listed = sorted(group_order)[:_MAX_LEGEND]
    legend.append(_text(_MARGIN, legend_y, f"{kind} groups drawn (#index: members):", size=12, weight="bold"))
    entries = [f"#{index}: {abbreviate_ranks(layout.group(kind, index))}" for index in listed]
    if len(group_order) > len(listed):
        entries.append(f"… and {len(group_order) - len(listed)} more drawn, {count} in all")
    elif len(group_order) < count:
        entries.append(f"… {count - len(group_order)} more not drawn, {count} in all")
    entry_w = int(max(len(e) for e in entries) * _TEXT_W * 0.95) + 34
    canvas_w = max(
        grid_x + grid_w + _MARGIN + 5,
        max(
            int(len(text) * _TEXT_W * (size / 12) * (1.1 if weight == "bold" else 1.0))
            for text, size, weight in title_lines
        )
        + 2 * _MARGIN,
        entry_w + 2 * _MARGIN,
    )
    columns = max(1, (canvas_w - 2 * _MARGIN) // entry_w)
    for i, entry in enumerate(entries):
        ex = _MARGIN + (i % columns) * entry_w
        ey = legend_y + 12 + (i // columns) * 20
        if i < len(listed):
            index = listed[i]
            legend.append(
                f'<rect x="{ex}" y="{ey}" width="16" height="14" rx="2" fill="{_fill(index)}" '
                'stroke="#666" stroke-width="0.75"/>'
            )
            pattern = _pattern(index)
            if pattern is not None:
                if pattern not in defs_used:
                    defs_used.append(pattern)
                legend.append(
                    f'<rect x="{ex}" y="{ey}" width="16" height="14" rx="2" fill="url(#{pattern})"/>'
                )
            legend.append(_text(ex + 22, ey + 11, entry, size=11))
        else:
            legend.append(_text(ex, ey + 11, entry, size=11, fill="#555"))
    canvas_h = legend_y + 12 + (-(-len(entries) // columns)) * 20 + _MARGIN

    title = title_lines[0][0] + "; " + title_lines[2][0]
    out.append('<?xml version="1.0" encoding="UTF-8"?>')
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{canvas_w}" height="{canvas_h}" '
        f'viewBox="0 0 {canvas_w} {canvas_h}" font-family="{_escape(_FONT)}">'
    )
    out.append(f"<title>{_escape(title)}</title>")
    if defs_used:
        out.append("<defs>" + "".join(_PATTERN_DEFS[p] for p in sorted(defs_used)) + "</defs>")
    out.append(f'<rect width="{canvas_w}" height="{canvas_h}" fill="#fff"/>')
    ty = _MARGIN + 12
    for text, size, weight in title_lines:
        out.append(_text(_MARGIN, ty, text, size=size, weight=weight, fill="#111"))
        ty += 18
    out.extend(cells)
    out.extend(legend)
    out.append("</svg>")
    return "\n".join(out) + "\n"
