"""Text, JSON and SVG renderings of a :class:`~mpu_bridge.layout.Layout` (pure; no torch).

Every function here is a pure function of a layout and a few options, returns a
string (or a JSON-ready dict), and does work bounded by what it shows, never by
the world or group size: groups are described by their geometry
(:class:`~mpu_bridge.groupview.GroupView`), never listed in full, so a layout of
2**62 ranks renders as fast as one of 8. What is left out is said: ``…`` and
counts in text, ``"truncated"`` keys in JSON, "showing nodes 0..7 of N" in SVG.

Rows beyond the layout's own kinds (hpZ, all-to-all) come in as ``extra``
:class:`~mpu_bridge.planrows.PlanRow` objects and are shown in their own tables.

Example::

    >>> from mpu_bridge.layout import plan
    >>> layout = plan(16, tp=2, ep=4, gpus_per_node=8)
    >>> abbreviate_ranks(layout.group("dp", 0))
    '[0,2,4,6,8,10,12,14]'
    >>> abbreviate_ranks(list(range(0, 128, 8)))
    '[0,8,…,120] (16)'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .errors import LayoutError
from .groupview import NODE_WALK_LIMIT, GroupView, NodeSet
from .layout import GTP, Layout
from .planrows import PlanRow, kind_row
from .text import ELLIPSIS, abbreviate_ranks, table
from .validate import optional_count as _limit  # None or an integer >= 0
from .validate import positive_int

__all__ = [
    "MAX_LISTED_GROUPS",
    "MAX_LISTED_MEMBERS",
    "MAX_LISTED_RANKS",
    "abbreviate_ranks",
    "budget_lines",
    "default_color_kind",
    "layout_report",
    "render_json",
    "render_svg",
    "render_text",
    "row_width",
]

#: Text: most groups listed per row, whatever ``max_groups`` asks (the row ends in ``…``).
MAX_LISTED_GROUPS = 1024
#: JSON: most members listed per group; longer groups are cut and marked.
MAX_LISTED_MEMBERS = 1024
#: JSON: most ranks listed per kind (one group at least).
MAX_LISTED_RANKS = 32768


# -- shared helpers ------------------------------------------------------------


def _check_layout(layout: Any) -> Layout:
    if not isinstance(layout, Layout):
        raise LayoutError(
            f"expected a Layout (from mpu_bridge.plan(...)), got {layout!r} ({type(layout).__name__})"
        )
    return layout


def _check_extra(extra: Iterable[Any]) -> Tuple[PlanRow, ...]:
    rows = tuple(extra)
    for row in rows:
        if not isinstance(row, PlanRow):
            raise LayoutError(f"extra rows must be PlanRow objects, got {row!r} ({type(row).__name__})")
    return rows


def default_color_kind(layout: Layout) -> str:
    """The kind a picture is coloured by when none is chosen.

    ``ep`` when expert parallelism is on, else the first of ``tp``, ``gtp``, ``cp``,
    ``pp``, ``dp`` whose groups have more than one rank (``tp`` when none has).

    Example: ``default_color_kind(plan(64, tp=2, ep=4)) == "ep"``.
    """
    config = _check_layout(layout).config
    if config.ep > 1:
        return "ep"
    for kind in ("tp", "gtp", "cp", "pp", "dp"):
        if layout.size(kind) > 1:
            return kind
    return "tp"


def row_width(layout: Layout) -> int:
    """Ranks per drawn row: ``gpus_per_node`` when known, else a multiple of tp·cp near 8.

    Without ``gpus_per_node``: the smallest multiple of tp·gtp_remat·cp that is at least 8,
    at most 32 and divides the world; failing that, 8 (or the world when smaller).

    Example: ``row_width(plan(64, tp=2)) == 8``; ``row_width(plan(64, tp=16)) == 16``.
    """
    config = _check_layout(layout).config
    if config.gpus_per_node is not None:
        return config.gpus_per_node
    world = config.world_size
    base = config.tp * config.gtp_remat * config.cp
    width = base
    while width <= 32:
        if width >= min(8, world) and world % width == 0:
            return width
        width += base
    return min(8, world)


def _plural(count: int, noun: str) -> str:
    """``"1 rank"``, ``"2 ranks"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _describe_nodes(nodes: NodeSet) -> str:
    """``node 3``, ``2 nodes [0,1]``, ``262144 nodes [0,1,…,262143]``."""
    if nodes.count == 1:
        return f"node {nodes.first(1)[0]}"
    listed = abbreviate_ranks(nodes, show_count=False)
    if nodes.count is None:
        return f"over {NODE_WALK_LIMIT} nodes {listed}"
    return f"{nodes.count} nodes {listed}"


def _grid_text(layout: Layout, grid: str) -> str:
    """One grid's dimensions in its order (first varies fastest), e.g. ``tp 2 × dp 16``; the GTP
    axis (``gtp`` / ``egtp``) where megatron-core 0.19 puts it, when its size is above 1."""
    config = layout.config
    sizes: Dict[str, Tuple[str, Optional[int]]]
    if grid == "dense":
        sizes = {
            "tp": ("tp", config.tp),
            GTP: ("gtp", config.gtp_remat),
            "cp": ("cp", config.cp),
            "dp": ("dp", config.dp),
            "pp": ("pp", config.pp),
        }
        order = layout.dense.order  # every token, the ones the order string left out appended
    else:
        sizes = {
            "tp": ("etp", config.etp),
            "ep": ("ep", config.ep),
            GTP: ("egtp", config.expert_gtp_remat),
            "dp": ("edp", config.edp),
            "pp": ("pp", config.pp),
        }
        order = layout.expert.order
    shown = [t for t in order if t in sizes and (t != GTP or (sizes[t][1] or 1) > 1)]
    return " × ".join(f"{sizes[token][0]} {sizes[token][1]}" for token in shown)


def _header_lines(layout: Layout) -> List[str]:
    config = layout.config
    world = config.world_size
    gpn = config.gpus_per_node
    ranks = _plural(world, "rank")
    if config.rank_offset:  # a rank span: megatron-core's rank_offset / local_world_size
        ranks += f" ({config.rank_offset}..{config.rank_offset + world - 1}, rank_offset {config.rank_offset})"
    if gpn is None:
        placement = f"{ranks} (GPUs per node not given)"
    else:
        placement = f"{ranks} = {_plural(world // gpn, 'node')} × {_plural(gpn, 'GPU')}"
    return [
        f"mpu-bridge plan: {placement}, order {config.order} (first varies fastest)",
        f"  dense grid   {_grid_text(layout, 'dense')}",
        f"  expert grid  {_grid_text(layout, 'expert')}",
    ]


# -- text ----------------------------------------------------------------------


def _first_groups_text(row: PlanRow, max_groups: Optional[int], fit_width: Optional[int]) -> Tuple[str, bool]:
    """The row's first groups, abbreviated, and whether :data:`MAX_LISTED_GROUPS` cut the list."""
    wanted = row.count if max_groups is None else min(row.count, max_groups)
    limit = min(wanted, MAX_LISTED_GROUPS)
    parts: List[str] = []
    used = 0
    for index in range(limit):
        part = abbreviate_ranks(row.group(index))
        if parts and fit_width is not None and used + 1 + len(part) > fit_width:
            break
        parts.append(part)
        used += len(part) + (1 if len(parts) > 1 else 0)
    capped = len(parts) == limit < wanted
    if len(parts) < row.count:
        parts.append(ELLIPSIS)
    return " ".join(parts), capped


def _groups_table(
    first: str,
    rows: Sequence[PlanRow],
    gpn: Optional[int],
    max_groups: Optional[int],
    fit_width: Optional[int],
) -> Tuple[List[str], bool]:
    """One line per row: name, description, size, count, in one node?, first groups."""
    header = [first, "description", "size", "groups"] + (["in one node?"] if gpn is not None else [])
    header.append("first groups")
    cells = []
    capped = False
    for row in rows:
        line = [row.name, row.description, str(row.size), str(row.count)]
        if gpn is not None:
            line.append("yes" if row.fits_nodes(gpn) else "no — crosses nodes")
        text, cut = _first_groups_text(row, max_groups, fit_width)
        capped = capped or cut
        cells.append(line + [text])
    return table(header, cells, right=(2, 3)), capped


def _rank_table(first: str, rows: Sequence[PlanRow], rank: int, gpn: Optional[int]) -> List[str]:
    """One line per row: the group index, position and members of ``rank``'s group (and its nodes)."""
    cells = []
    for row in rows:
        index, position, view = row.locate(rank)
        line = [row.name, str(index), str(position), abbreviate_ranks(view, limit=16)]
        if gpn is not None:
            line.append(_describe_nodes(view.nodes(gpn)))
        cells.append(line)
    header = [first, "group", "position", "members"] + (["spans"] if gpn is not None else [])
    return table(header, cells, right=(1, 2))


def _rank_lines(layout: Layout, rank: int, kinds: Sequence[PlanRow], extra: Sequence[PlanRow]) -> List[str]:
    gpn = layout.config.gpus_per_node
    tables = _rank_table("kind", kinds, rank, gpn)  # validates the rank before any other work
    if extra:
        tables += ["", *_rank_table("family", extra, rank, gpn)]
    if gpn is None:
        title = f"rank {rank}"
    else:
        node = layout.node_of(rank)
        title = f"rank {rank} on node {node} (ranks {node * gpn}..{node * gpn + gpn - 1})"
    return ["", title, *tables]


def render_text(
    layout: Layout,
    *,
    rank: Optional[int] = None,
    max_groups: Optional[int] = 4,
    fit_width: Optional[int] = 56,
    extra: Iterable[PlanRow] = (),
    budget: Optional[Dict[str, Any]] = None,
) -> str:
    """The plan as a table: a config header, then one row per group kind.

    Each row gives the kind, its description, group size, number of groups, whether
    every group stays inside one node (when ``gpus_per_node`` is known) and the first
    groups: at most ``max_groups`` (``None``: all, up to :data:`MAX_LISTED_GROUPS`,
    and a note says so when that cuts the list), and, when ``fit_width`` is set,
    only as many as fit in that many characters (always at least one). ``extra``
    rows (hpZ, all-to-all) follow in a table of their own. With ``rank``, a second
    table gives that rank's node and its group, group index and position in every
    kind. Raises :class:`~mpu_bridge.errors.LayoutError` for a rank outside the world.

    Example: ``render_text(plan(16, tp=2, gpus_per_node=8), rank=3)``.
    """
    _check_layout(layout)
    max_groups = _limit("max_groups", max_groups)
    fit_width = None if fit_width is None else positive_int("fit_width", fit_width, LayoutError)
    extra = _check_extra(extra)
    kinds = [kind_row(layout, kind) for kind in layout.kinds]
    rank_lines = [] if rank is None else _rank_lines(layout, rank, kinds, extra)
    gpn = layout.config.gpus_per_node

    lines = _header_lines(layout) + [""]
    main, capped = _groups_table("kind", kinds, gpn, max_groups, fit_width)
    lines.extend(main)
    if extra:
        derived, capped_extra = _groups_table("family", extra, gpn, max_groups, fit_width)
        lines.extend(["", *derived])
        capped = capped or capped_extra
    if gpn is None:
        lines.extend(["", "(pass --gpus-per-node to see which groups cross nodes)"])
    if capped:
        lines.extend(["", f"(at most {MAX_LISTED_GROUPS} groups are listed per kind)"])
    lines.extend(rank_lines)
    if budget is not None:
        lines.extend(["", *budget_lines(budget)])
    return "\n".join(lines) + "\n"


def _gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB"


def _budget_rows(budget: Dict[str, Any]) -> List[List[str]]:
    """The rows of :func:`budget_lines`' table: megatron-core's column against the bridge's."""
    rank, m, b = budget["rank"], budget["per_rank"]["megatron"], budget["per_rank"]["bridge"]
    most, world, mem = budget["max_per_rank"], budget["world"], budget["memory_mib"]
    calls = world["megatron_new_group"]
    rows = [
        [f"groups on rank {rank} (NCCL)", str(m["nccl"]), str(b["communicators"])],
        ["  of which size 1", str(m["size_one"]), str(b["size_one"])],
    ]
    if b["twins"]:
        twins = m["by_kind"].get("dp-cp-ag", {}).get("nccl", 0) + m["by_kind"].get("edp-ag", {}).get("nccl", 0)
        rows.append(["  of which all-gather twins", str(twins), str(b["twins"])])
    return rows + [
        ["  gloo twins (gloo on)", str(m["gloo"]), "0"],
        ["most NCCL groups on a rank", str(most["megatron_nccl"]), str(most["bridge"])],
        ["new_group calls, world", str(calls["gloo_on"]), str(world["bridge_new_group"])],
        ["  with gloo off", str(calls["gloo_off"]), str(world["bridge_new_group"])],
        ["split_group calls, world", "-", f"{world['bridge_split_group']} ({world['bridge_partitions']} partitions)"
         if world["bridge_split_group"] is not None else f"- (member-only: {world['bridge_partitions']} partitions)"],
        [f"comm memory, rank {rank}", _gib(mem["megatron"]), _gib(mem["bridge"])],
        ["comm memory, worst rank", _gib(mem["megatron_max"]), _gib(mem["bridge_max"])],
    ]


def budget_lines(budget: Dict[str, Any]) -> List[str]:
    """A :func:`mpu_bridge.budget.budget` report as text: megatron-core's init against the bridge.

    Example: ``budget_lines(budget(plan(16, tp=2, pp=2)))[0]`` starts ``communicator budget``.
    """
    rank, m = budget["rank"], budget["per_rank"]["megatron"]
    line, source = budget["megatron"]["line"], budget["megatron"]["source"]
    kinds = ", ".join(
        f"{kind} {c['nccl']}" + (f"+{c['gloo']}g" if c["gloo"] else "") for kind, c in m["by_kind"].items()
    )
    return [
        f"communicator budget (rank {rank}; {budget['comm_mb']:g} MiB per NCCL communicator, --comm-mb)",
        f"megatron-core {line} line ({source}; --megatron)",
        *table(["", "megatron-core", "mpu-bridge"], _budget_rows(budget), right=(1, 2)),
        f"megatron-core groups on rank {rank}, by kind (NCCL+gloo): {kinds}",
        *(f"note: {note}" for note in budget["notes"]),
    ]


# -- JSON ----------------------------------------------------------------------


def _rank_entry(row: PlanRow, rank: int, gpn: Optional[int], max_members: Optional[int]) -> Dict[str, Any]:
    """``{"index", "position", "ranks", "nodes"?}``; a long group is cut and says so."""
    index, position, view = row.locate(rank)
    limit = view.size if max_members is None else min(view.size, max_members)
    entry: Dict[str, Any] = {"index": index, "position": position, "ranks": view.first(limit)}
    if limit < view.size:
        entry.update(ranks_truncated=True, size=view.size, shape=[list(dim) for dim in view.dims])
    if gpn is not None:
        nodes = view.nodes(gpn)
        node_limit = nodes.count if max_members is None and nodes.count is not None else limit
        entry["nodes"] = nodes.first(node_limit)
        if nodes.count is None or nodes.count > len(entry["nodes"]):
            entry.update(nodes_truncated=True, node_count=nodes.count)
    return entry


def _row_entry(
    row: PlanRow, gpn: Optional[int], max_groups: Optional[int], max_members: Optional[int], max_ranks: Optional[int]
) -> Dict[str, Any]:
    """A derived row in the shape of :meth:`Layout.to_dict`'s kind entries."""
    listed = row.size if max_members is None else min(row.size, max_members)
    shown = row.count if max_groups is None else min(row.count, max_groups)
    if max_ranks is not None and shown:
        shown = min(shown, max(1, max_ranks // listed))
    entry: Dict[str, Any] = {
        "description": row.description,
        "size": row.size,
        "num_groups": row.count,
        "groups": [row.group(index).first(listed) for index in range(shown)],
        "truncated": shown < row.count,
    }
    if listed < row.size:
        entry.update(members_truncated=True, shape=[list(dim) for dim in row.shape])
    if gpn is not None:
        entry["intra_node"] = row.fits_nodes(gpn)
    return entry


def layout_report(
    layout: Layout,
    *,
    rank: Optional[int] = None,
    max_groups: Optional[int] = 8,
    max_members: Optional[int] = MAX_LISTED_MEMBERS,
    max_ranks: Optional[int] = MAX_LISTED_RANKS,
    extra: Iterable[PlanRow] = (),
) -> Dict[str, Any]:
    """:meth:`Layout.to_dict` plus ``config["nodes"]``, ``extra`` rows and, with ``rank``, its groups.

    ``report["rank"] = {"rank": r, "node": n or None, "groups": {kind: {"index", "position",
    "ranks", "nodes"?}}}``. ``max_groups`` bounds the groups listed per kind (``None``:
    all); ``max_members`` the members listed per group (then ``"members_truncated"``,
    or for the rank's groups ``"ranks_truncated"`` / ``"nodes_truncated"``, say so);
    ``max_ranks`` the ranks listed per kind. ``extra`` rows go to ``report["derived"]``
    (and ``report["rank"]["derived"]``) in the same shape.

    Example: ``layout_report(plan(8, tp=2), rank=3)["rank"]["groups"]["tp"]["ranks"] == [2, 3]``.
    """
    _check_layout(layout)
    max_groups = _limit("max_groups", max_groups)
    max_ranks = _limit("max_ranks", max_ranks)
    max_members = None if max_members is None else positive_int("max_members", max_members, LayoutError)
    extra = _check_extra(extra)
    gpn = layout.config.gpus_per_node
    rank_part: Optional[Dict[str, Any]] = None
    if rank is not None:  # validate before doing any other work
        kinds = [kind_row(layout, kind) for kind in layout.kinds]
        groups = {row.name: _rank_entry(row, rank, gpn, max_members) for row in kinds}
        node = None if gpn is None else layout.node_of(rank)
        rank_part = {"rank": rank, "node": node, "groups": groups}
        if extra:
            rank_part["derived"] = {row.name: _rank_entry(row, rank, gpn, max_members) for row in extra}
    report = layout.to_dict(max_groups=max_groups, max_members=max_members, max_ranks=max_ranks)
    report["config"]["nodes"] = None if gpn is None else layout.world_size // gpn
    if extra:
        report["derived"] = {
            row.name: _row_entry(row, gpn, max_groups, max_members, max_ranks) for row in extra
        }
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


def render_json(
    layout: Layout,
    *,
    rank: Optional[int] = None,
    max_groups: Optional[int] = 8,
    max_members: Optional[int] = MAX_LISTED_MEMBERS,
    max_ranks: Optional[int] = MAX_LISTED_RANKS,
    extra: Iterable[PlanRow] = (),
    budget: Optional[Dict[str, Any]] = None,
) -> str:
    """:func:`layout_report` as JSON text: indented, one line per rank list, ending in a newline.

    Example: ``json.loads(render_json(plan(8, tp=2)))["kinds"]["tp"]["groups"][0] == [0, 1]``.
    """
    report = layout_report(
        layout, rank=rank, max_groups=max_groups, max_members=max_members, max_ranks=max_ranks, extra=extra
    )
    if budget is not None:
        report["budget"] = budget
    return _json_text(report) + "\n"


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

#: A title line: text, font size, weight.
_Title = Tuple[str, int, str]


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
    for index in range(min(cover_groups, layout.num_groups(kind))):
        needed = max(needed, layout.group_view(kind, index).last // unit + 1)
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


def _shown_text(extent: _Extent, world: int, row_name: str) -> str:
    """The title line saying which part of a large world is drawn."""
    last = extent.ranks - 1
    if extent.rows == 1 and extent.ranks < extent.unit:
        return f"showing ranks 0..{last} of {world} (part of {row_name} 0)"
    if extent.rows == 1:
        return f"showing {row_name} 0 of {extent.total_rows} (ranks 0..{last} of {world})"
    return f"showing {row_name}s 0..{extent.rows - 1} of {extent.total_rows} (ranks 0..{last} of {world})"


def _svg_titles(
    layout: Layout, kind: str, extent: _Extent, rank: Optional[int], rank_view: Optional[GroupView]
) -> List[_Title]:
    """The lines above the grid: config, grids, the kind and its placement, what is drawn, the rank."""
    config = layout.config
    world, gpn = layout.world_size, config.gpus_per_node
    count, size = layout.num_groups(kind), layout.size(kind)
    if gpn is not None:
        placement = "every group stays inside one node" if layout.intra_node(kind) else "groups cross nodes"
    else:
        placement = f"node placement unknown (no GPUs per node given; rows of {_plural(extent.unit, 'rank')})"
    nodes = "" if gpn is None else f" = {_plural(world // gpn, 'node')} × {_plural(gpn, 'GPU')}"
    grids = f"dense grid {_grid_text(layout, 'dense')};  expert grid {_grid_text(layout, 'expert')}"
    titles: List[_Title] = [
        (f"mpu-bridge plan: {_plural(world, 'rank')}{nodes}, order {config.order}", 14, "bold"),
        (grids, 12, "normal"),
        (
            f"coloured by {kind} ({layout.spec(kind).description}): {_plural(count, 'group')} of "
            f"{_plural(size, 'rank')} — {placement}",
            12,
            "bold",
        ),
    ]
    if extent.ranks < world:
        titles.append((_shown_text(extent, world, "node" if gpn is not None else "row"), 12, "normal"))
    if rank is not None and rank_view is not None:
        where = f" (node {layout.node_of(rank)})" if gpn is not None else ""
        drawn = " (outlined)" if rank < extent.ranks else " (not drawn)"
        index = layout.group_index(kind, rank)
        titles.append(
            (f"rank {rank}{where} is in {kind} group #{index} {abbreviate_ranks(rank_view)}{drawn}", 12, "normal")
        )
    return titles


@dataclass(frozen=True)
class _Grid:
    """Where the cells go: ``line`` cells per drawn line, each ``cell_w`` wide, from ``x``."""

    extent: _Extent
    row_name: str
    line: int
    cell_w: int
    x: int
    width: int
    top: int

    @classmethod
    def build(cls, extent: _Extent, row_name: str, title_count: int) -> "_Grid":
        line = _line_width(extent.unit)
        cell_w = max(44, 8 * len(str(max(extent.ranks - 1, 0))) + 14)
        longest_label = len(f"{row_name} {max(extent.rows - 1, 0)}")
        x = _MARGIN + int(longest_label * _TEXT_W) + 14
        top = _MARGIN + 18 * title_count + 8
        return cls(extent, row_name, line, cell_w, x, line * (cell_w + _GAP) - _GAP, top)


def _svg_cell(x: int, y: int, width: int, cell_rank: int, index: int, stroke: str) -> List[str]:
    """One rank's cell: its group's fill (and hatch), the rank, and ``#group``."""
    out = [
        f'<g class="cell" data-rank="{cell_rank}" data-group="{index}">',
        f'<rect x="{x}" y="{y}" width="{width}" height="{_CELL_H}" rx="3" fill="{_fill(index)}" {stroke}/>',
    ]
    pattern = _pattern(index)
    if pattern is not None:
        out.append(f'<rect x="{x}" y="{y}" width="{width}" height="{_CELL_H}" rx="3" fill="url(#{pattern})"/>')
    middle = x + width / 2
    out.append(_text(middle, y + 15, str(cell_rank), weight="bold", anchor="middle", fill="#111"))
    out.append(_text(middle, y + 28, f"#{index}", size=9, anchor="middle", fill="#333"))
    out.append("</g>")
    return out


def _stroke(cell_rank: int, rank: Optional[int], rank_view: Optional[GroupView]) -> str:
    if cell_rank == rank:
        return 'stroke="#000" stroke-width="3"'
    if rank_view is not None and cell_rank in rank_view:
        return 'stroke="#000" stroke-width="2" stroke-dasharray="4 2"'
    return 'stroke="#666" stroke-width="0.75"'


def _svg_rows(
    layout: Layout, kind: str, grid: _Grid, rank: Optional[int], rank_view: Optional[GroupView]
) -> Tuple[List[str], List[int], int]:
    """Every drawn row (node) with its cells; the groups drawn, in order of first appearance; the y below."""
    extent, name = grid.extent, grid.row_name
    out: List[str] = []
    drawn: Dict[int, None] = {}  # group indices in order of first appearance
    y = grid.top
    for row in range(extent.rows):
        row_start = row * extent.unit
        row_ranks = range(row_start, min(row_start + extent.unit, extent.ranks))
        height = -(-len(row_ranks) // grid.line) * (_CELL_H + _GAP) - _GAP
        out.append(f'<g class="{name}" data-{name}="{row}">')
        out.append(
            f'<rect x="{grid.x - 5}" y="{y - 5}" width="{grid.width + 10}" height="{height + 10}" '
            'rx="6" fill="#f4f4f4" stroke="#b0b0b0"/>'
        )
        out.append(_text(_MARGIN, y + _CELL_H / 2 + 4, f"{name} {row}", size=12, fill="#555"))
        for position, cell_rank in enumerate(row_ranks):
            index = layout.group_index(kind, cell_rank)
            drawn.setdefault(index)
            x = grid.x + (position % grid.line) * (grid.cell_w + _GAP)
            cy = y + (position // grid.line) * (_CELL_H + _GAP)
            out.extend(_svg_cell(x, cy, grid.cell_w, cell_rank, index, _stroke(cell_rank, rank, rank_view)))
        out.append("</g>")
        y += height + _NODE_GAP
    return out, list(drawn), y


def _legend_entries(layout: Layout, kind: str, drawn: Sequence[int]) -> Tuple[List[int], List[str]]:
    """The groups the legend lists (at most ``_MAX_LEGEND``) and one text per entry, plus a tail."""
    count = layout.num_groups(kind)
    listed = sorted(drawn)[:_MAX_LEGEND]
    entries = [f"#{index}: {abbreviate_ranks(layout.group_view(kind, index))}" for index in listed]
    if len(drawn) > len(listed):
        entries.append(f"… and {len(drawn) - len(listed)} more drawn, {count} in all")
    elif len(drawn) < count:
        entries.append(f"… {count - len(drawn)} more not drawn, {count} in all")
    return listed, entries


def _canvas_width(grid: _Grid, titles: Sequence[_Title], entry_w: int) -> int:
    title_w = max(
        int(len(text) * _TEXT_W * (size / 12) * (1.1 if weight == "bold" else 1.0)) for text, size, weight in titles
    )
    return max(grid.x + grid.width + _MARGIN + 5, title_w + 2 * _MARGIN, entry_w + 2 * _MARGIN)


def _svg_legend(
    kind: str, listed: Sequence[int], entries: Sequence[str], top: int, canvas_w: int, entry_w: int
) -> Tuple[List[str], int]:
    """The legend below the grid (swatch and members per group) and the canvas height it needs."""
    out = [_text(_MARGIN, top, f"{kind} groups drawn (#index: members):", size=12, weight="bold")]
    columns = max(1, (canvas_w - 2 * _MARGIN) // entry_w)
    for i, entry in enumerate(entries):
        ex = _MARGIN + (i % columns) * entry_w
        ey = top + 12 + (i // columns) * 20
        if i >= len(listed):
            out.append(_text(ex, ey + 11, entry, size=11, fill="#555"))
            continue
        index = listed[i]
        out.append(
            f'<rect x="{ex}" y="{ey}" width="16" height="14" rx="2" fill="{_fill(index)}" '
            'stroke="#666" stroke-width="0.75"/>'
        )
        pattern = _pattern(index)
        if pattern is not None:
            out.append(f'<rect x="{ex}" y="{ey}" width="16" height="14" rx="2" fill="url(#{pattern})"/>')
        out.append(_text(ex + 22, ey + 11, entry, size=11))
    height = top + 12 + (-(-len(entries) // columns)) * 20 + _MARGIN
    return out, height


def _svg_document(width: int, height: int, titles: Sequence[_Title], patterns: Set[str], body: List[str]) -> str:
    """The SVG file: header, title, pattern definitions, background, title lines, then ``body``."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{_escape(_FONT)}">',
        f"<title>{_escape(titles[0][0] + '; ' + titles[2][0])}</title>",
    ]
    if patterns:
        out.append("<defs>" + "".join(_PATTERN_DEFS[p] for p in sorted(patterns)) + "</defs>")
    out.append(f'<rect width="{width}" height="{height}" fill="#fff"/>')
    y = _MARGIN + 12
    for text, size, weight in titles:
        out.append(_text(_MARGIN, y, text, size=size, weight=weight, fill="#111"))
        y += 18
    out.extend(body)
    out.append("</svg>")
    return "\n".join(out) + "\n"


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
    _check_layout(layout)
    kind = default_color_kind(layout) if color_by is None else color_by
    layout.spec(kind)  # raises LayoutError for an unknown kind
    limit = _limit("max_groups", max_groups)
    rank_view = None if rank is None else layout.group_view_of(kind, rank)  # validates the rank
    extent = _extent(layout, kind, layout.num_groups(kind) if limit is None else max(1, limit))
    titles = _svg_titles(layout, kind, extent, rank, rank_view)
    grid = _Grid.build(extent, "node" if layout.config.gpus_per_node is not None else "row", len(titles))
    cells, drawn, bottom = _svg_rows(layout, kind, grid, rank, rank_view)
    listed, entries = _legend_entries(layout, kind, drawn)
    entry_w = int(max(len(e) for e in entries) * _TEXT_W * 0.95) + 34
    canvas_w = _canvas_width(grid, titles, entry_w)
    legend, canvas_h = _svg_legend(kind, listed, entries, bottom + 14, canvas_w, entry_w)
    patterns = {p for p in map(_pattern, drawn) if p is not None}
    return _svg_document(canvas_w, canvas_h, titles, patterns, cells + legend)
