"""The communicator budget of a layout, before launch: counts by arithmetic. Pure, no torch.

Two ways to hold a full Megatron group set are compared:

* **megatron-core** (``parallel_state.initialize_model_parallel``): every rank calls
  ``new_group`` for every group of every kind, and holds one process group per kind it
  is a member of -- size-1 groups included, equal rank sets held twice (e.g. ``dp`` and
  ``dp-cp`` when cp = 1), plus a gloo twin of ``dp``, ``dp-cp`` and ``edp`` (and of the
  dist-opt partial groups) when ``create_gloo_process_groups`` is on;
* **the bridge**: one group per *distinct rank set* among the rank's groups of every
  field of that release's ``ProcessGroupCollection`` (:data:`COLLECTION_FIELDS`: the
  ``pg_field`` column of :mod:`mpu_bridge.kinds` plus ``embd``, ``pos_embd``,
  ``intra_dp_cp`` = ``dp_cp``, ``intra_expt_dp`` = ``expt_dp``, ``intra_dist_opt`` = the
  default group, which holds the world already; ``hcp`` and ``inter_dist_opt`` None),
  created member-only (one ``new_group`` per needed rank set per rank) or with one
  ``split_group`` per partition.

The group set differs by release, so the budget models a megatron-core *line*
(:data:`MEGATRON_LINES`, ``budget(..., megatron="0.19")``; by default the installed
megatron-core, read from its metadata without importing it, else the newest line):

* ``"0.16"`` (0.16.x and 0.17.x, whose ``initialize_model_parallel`` creates the same
  groups): ``create_all_gather_group=True`` adds an all-gather twin of every ``dp-cp``
  group inside the init; the collection has 20 fields;
* ``"0.18"``: the twins come from ``create_all_gather_groups(for_expert_parallelism=True)``
  after the init -- ``dp-cp-ag``, and ``edp-ag`` when ep > 1 -- and the collection adds
  their fields ``dp_cp_ag`` / ``expt_dp_ag`` (22 fields);
* ``"0.19"``: Generalized Tensor Parallelism. ``gtp``, ``egtp`` and ``etp-ep-egtp-pp``
  are created even at size 1 (three more groups per rank), ``gtp-dp``, ``gtp-dp-cp`` and
  ``egtp-edp`` only when their GTP size is above 1; gloo twins are off when
  ``gtp_remat`` > 1 (and for ``edp`` also when ``expert_gtp_remat`` > 1); GTP needs one
  distributed-optimizer instance. The collection has 27 fields.

**All-gather twins** (``all_gather=True``) are the one documented exception to "one
communicator per rank set": the bridge counts them as extra communicators over the
same ranks as ``dp-cp`` / ``edp``, the groups megatron-core's line creates. Not
modelled: ``hybrid_context_parallel`` and custom embedding-rank functions.

Every number is arithmetic over the layout's sizes and the geometry of one rank's
groups (:class:`~mpu_bridge.groupview.GroupView`, equal iff the same ranks): O(kinds x
dimensions), never O(world). Communicator memory counts NCCL communicators only (gloo
groups live on the CPU), each at ``comm_mb`` MiB, as if every group were used (PyTorch
creates a NCCL communicator lazily, at a group's first collective).

Example::

    >>> from mpu_bridge.layout import plan
    >>> b = budget(plan(16, tp=2, pp=2), megatron="0.16")
    >>> b["per_rank"]["megatron"]["nccl"], b["per_rank"]["bridge"]["rank_sets"]
    (17, 6)
    >>> budget(plan(16, tp=2, pp=2), megatron="0.19")["per_rank"]["megatron"]["nccl"]
    20
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypeGuard

from .errors import LayoutError
from .groupview import GroupView
from .kinds import KIND_TABLE, KINDS
from .layout import DEFAULT_ORDER, Layout, plan
from .validate import boolean, positive_int

__all__ = [
    "COLLECTION_FIELDS",
    "DEFAULT_COMM_MB",
    "MEGATRON_KINDS",
    "MEGATRON_LINES",
    "all_gather_kinds",
    "bridge_fields",
    "bridge_rank_sets",
    "bridge_twins",
    "budget",
    "megatron_line",
    "megatron_rank_groups",
    "megatron_world_calls",
]

#: MiB of GPU memory per NCCL communicator, by default: NCCL issue #2363 (512 MiB for a
#: single-rank communicator on recent releases); NCCL #964 reports ~0.5-0.7 GB on A100.
DEFAULT_COMM_MB = 512

#: The megatron-core lines the budget models, oldest first (see the module docstring).
MEGATRON_LINES: Tuple[str, ...] = ("0.16", "0.18", "0.19")

_DESCRIPTIONS: Mapping[str, str] = {
    "gtp": "generalized tensor parallel (gtp_remat; singletons at size 1)",
    "dp-cp": "data x context parallel",
    "dp-cp-ag": "all-gather twin of dp-cp (all_gather)",
    "intra-dp-cp": "intra partial dp-cp (dist-opt instances > 1)",
    "dp": "data parallel (replicate)",
    "gtp-dp": "data distribution, gtp x dp (gtp_remat > 1)",
    "gtp-dp-cp": "data distribution, gtp x dp x cp (gtp_remat > 1)",
    "cp": "context parallel",
    "hcp": "hierarchical context parallel, one per level",
    "mp": "model parallel (tp x gtp x pp)",
    "tp": "tensor parallel",
    "pp": "pipeline parallel",
    "embd": "embedding (first and last stage)",
    "pos-embd": "position embedding (first stage)",
    "tp-dp-cp": "tensor x data x context parallel",
    "tp-dp": "tensor x data parallel",
    "tp-cp": "tensor x context parallel",
    "egtp": "expert generalized tensor parallel (singletons at size 1)",
    "ep": "expert parallel",
    "etp": "expert tensor parallel",
    "etp-ep": "expert tensor x expert parallel",
    "etp-ep-pp": "expert tensor x expert x pipeline parallel",
    "etp-ep-egtp-pp": "expert tensor x expert x egtp x pipeline parallel",
    "edp": "expert data parallel (replicate)",
    "intra-edp": "intra partial expert dp (dist-opt instances > 1)",
    "inter-edp": "inter partial expert dp (dist-opt instances > 1)",
    "egtp-edp": "expert data distribution, egtp x edp (expert_gtp_remat > 1)",
    "intra-dist-opt": "intra distributed-optimizer instance",
    "edp-ag": "all-gather twin of edp (all_gather, ep > 1)",
}

_DENSE = ("cp", "hcp", "mp", "tp", "pp", "embd", "pos-embd", "tp-dp-cp", "tp-dp", "tp-cp")
_EXPERT = ("ep", "etp", "etp-ep", "etp-ep-pp")
_EDP = ("edp", "intra-edp", "inter-edp")
_ORDERS: Mapping[str, Tuple[str, ...]] = {
    "0.16": ("dp-cp", "dp-cp-ag", "intra-dp-cp", "dp", *_DENSE, *_EXPERT, *_EDP, "intra-dist-opt"),
    "0.18": ("dp-cp", "intra-dp-cp", "dp", *_DENSE, *_EXPERT, *_EDP, "intra-dist-opt", "dp-cp-ag", "edp-ag"),
    "0.19": (
        "gtp", "dp-cp", "intra-dp-cp", "dp", "gtp-dp", "gtp-dp-cp", *_DENSE, "egtp", *_EXPERT,
        "etp-ep-egtp-pp", *_EDP, "egtp-edp", "intra-dist-opt", "dp-cp-ag", "edp-ag",
    ),
}

#: megatron-core's groups per line, in the order it creates them: (kind, description).
MEGATRON_KINDS: Mapping[str, Tuple[Tuple[str, str], ...]] = {
    line: tuple((kind, _DESCRIPTIONS[kind]) for kind in kinds) for line, kinds in _ORDERS.items()
}

_FIELDS_016 = (
    "tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "hcp", "ep", "expt_tp", "tp_ep", "tp_ep_pp",
    "tp_dp_cp", "dp", "dp_cp", "expt_dp", "intra_dp_cp", "intra_expt_dp", "inter_dist_opt", "intra_dist_opt",
)
_FIELDS_018 = (*_FIELDS_016[:15], "dp_cp_ag", "expt_dp", "expt_dp_ag", *_FIELDS_016[16:])
_FIELDS_019 = (
    *_FIELDS_016[:12], "tp_ep_pp_with_egtp_remat", "tp_dp_cp", "dp", "dp_cp", "dp_cp_gtp_remat", "dp_cp_ag",
    "gtp_remat", "expt_gtp_remat", "expt_dp", "expt_dp_gtp_remat", "expt_dp_ag", *_FIELDS_016[16:],
)

#: The fields of each line's ``ProcessGroupCollection``, in its declaration order.
COLLECTION_FIELDS: Mapping[str, Tuple[str, ...]] = {"0.16": _FIELDS_016, "0.18": _FIELDS_018, "0.19": _FIELDS_019}

#: ``ProcessGroupCollection`` field -> kind, for the fields that are one kind's groups.
_FIELD_KIND: Mapping[str, str] = {k.pg_field: k.name for k in KIND_TABLE if k.pg_field}


# -- which megatron-core line ----------------------------------------------------


def _release(text: str) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a version string, compared with :mod:`packaging` (imported here:
    a planner-only install, ``pip install --no-deps``, may lack it); None if it does not parse."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        raise LayoutError(
            f"reading the megatron-core version {text!r} needs the 'packaging' package, a dependency "
            "of mpu-bridge: pip install packaging"
        ) from None
    try:
        version = Version(text)
    except InvalidVersion:
        return None
    return version.major, version.minor


def _line_of(release: Tuple[int, int]) -> Optional[str]:
    """The newest modelled line at or below ``release`` (None: older than all of them)."""
    lines = [line for line in MEGATRON_LINES if tuple(map(int, line.split("."))) <= release]
    return lines[-1] if lines else None


@functools.lru_cache(maxsize=1)
def _installed() -> Optional[str]:
    """The installed megatron-core's version, from its metadata (megatron is not imported)."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def _resolve_installed() -> Tuple[str, str]:
    """``(line, where it came from)`` for the installed megatron-core, else the newest line."""
    found = _installed()
    if found is None:
        return MEGATRON_LINES[-1], "newest modelled line (megatron-core not installed)"
    release = _release(found)
    if release is None:
        return MEGATRON_LINES[-1], f"newest modelled line (installed version {found!r} unreadable)"
    line = _line_of(release)
    if line is None:
        return MEGATRON_LINES[0], f"oldest modelled line (installed megatron-core {found} is older)"
    return line, f"installed megatron-core {found}"


def _resolve(megatron: Any) -> Tuple[str, str]:
    """``(line, where it came from)`` for ``megatron`` (see :func:`megatron_line`)."""
    if megatron is None:
        return _resolve_installed()
    if not isinstance(megatron, str):
        raise LayoutError(f"megatron must be a version string such as '0.19' or None, got {megatron!r}")
    release = _release(megatron)
    if release is None:
        raise LayoutError(f"megatron must be a version such as '0.19' or '0.16.1', got {megatron!r}")
    line = _line_of(release)
    if line is None:
        raise LayoutError(
            f"megatron-core {megatron} is older than the oldest line the budget models "
            f"({MEGATRON_LINES[0]}); modelled lines: {', '.join(MEGATRON_LINES)}"
        )
    return line, f"megatron={megatron!r}"


def megatron_line(megatron: Optional[str] = None) -> str:
    """The modelled line (:data:`MEGATRON_LINES`) for a megatron-core release or line.

    ``None``: the installed megatron-core (its metadata, never an import), else the newest
    line. A release maps to the newest line at or below it; older ones raise LayoutError.

    Example: ``megatron_line("0.17.1") == "0.16"``; ``megatron_line("0.19.2") == "0.19"``.
    """
    return _resolve(megatron)[0]


# -- options -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """What one counted init looks like: line, gloo twins per grid, all-gather kinds, dist-opt."""

    line: str
    source: str
    gloo_dense: int
    gloo_expert: int
    twins: Tuple[str, ...]
    n: int
    hcp: Tuple[int, ...]


def all_gather_kinds(layout: Layout, megatron: Optional[str] = None) -> Tuple[str, ...]:
    """The all-gather twins megatron-core's line creates (and the bridge counts) with all-gather on:
    ``dp-cp-ag``, and from 0.18 ``edp-ag`` when ep > 1.

    Example: ``all_gather_kinds(plan(8, ep=2), "0.19") == ("dp-cp-ag", "edp-ag")``.
    """
    line = megatron_line(megatron)
    if line == "0.16" or layout.config.ep == 1:
        return ("dp-cp-ag",)
    return ("dp-cp-ag", "edp-ag")


def _check_gtp(layout: Layout, line: str, source: str, n: int) -> None:
    """GTP sizes above 1 need the 0.19 line and one distributed-optimizer instance."""
    c = layout.config
    gtp = f"gtp_remat = {c.gtp_remat}, expert_gtp_remat = {c.expert_gtp_remat}"
    if (c.gtp_remat > 1 or c.expert_gtp_remat > 1) and line != "0.19":
        raise LayoutError(
            f"{gtp}: Generalized Tensor Parallelism needs megatron-core 0.19 or newer, but the budget "
            f"models the {line} line ({source}); pass megatron='0.19' (--megatron 0.19)"
        )
    if (c.gtp_remat > 1 or c.expert_gtp_remat > 1) and n > 1:
        raise LayoutError(
            f"{gtp} with {n} distributed-optimizer instances: megatron-core 0.19 supports GTP only "
            "with one instance"
        )


def _options(
    layout: Layout, megatron: Any, gloo: Any, all_gather: Any, instances: Any, hcp: Sequence[Any]
) -> _Options:
    """Validated options for ``layout`` (every count goes through here)."""
    line, source = _resolve(megatron)
    n = positive_int("dist_opt_instances", instances, LayoutError)
    sizes = tuple(positive_int("a hierarchical cp size", s, LayoutError) for s in hcp)
    c = layout.config
    if (c.dp * c.cp) % n or c.edp % n:
        raise LayoutError(
            f"{n} distributed-optimizer instances must divide dp x cp = {c.dp * c.cp} and edp = {c.edp}"
        )
    product = 1
    for s in sizes:
        product *= s
    if sizes and product != c.cp:
        raise LayoutError(f"hierarchical cp sizes {list(sizes)} must multiply to cp = {c.cp}")
    _check_gtp(layout, line, source, n)
    dense = int(boolean("gloo", gloo, LayoutError) and c.gtp_remat == 1)
    twins = all_gather_kinds(layout, line) if boolean("all_gather", all_gather, LayoutError) else ()
    return _Options(line, source, dense, dense * int(c.expert_gtp_remat == 1), twins, n, sizes)


def _stage(layout: Layout, rank: int) -> Tuple[bool, bool]:
    """``(first stage, last stage)`` of ``rank`` in its pipeline group."""
    position = layout.rank_in_group("pp", rank)
    return position == 0, position == layout.config.pp - 1


# -- megatron-core -----------------------------------------------------------------


def _held(layout: Layout, rank: int, o: _Options) -> Dict[str, Tuple[int, int]]:
    """megatron kind -> ``(NCCL, gloo)`` groups ``rank`` is a member of, for options ``o``."""
    c = layout.config
    first, last = _stage(layout, rank)
    split = int(o.n > 1)
    special = {
        "dp-cp": (1, o.gloo_dense),
        "dp-cp-ag": (int("dp-cp-ag" in o.twins), 0),
        "intra-dp-cp": (split, o.gloo_dense * split),
        "dp": (1, o.gloo_dense),
        "gtp-dp": (int(c.gtp_remat > 1), 0),
        "gtp-dp-cp": (int(c.gtp_remat > 1), 0),
        "hcp": (len(o.hcp), 0),
        "embd": (int(first or last), 0),
        "pos-embd": (int(first), 0),
        "edp": (1, o.gloo_expert),
        "intra-edp": (split, o.gloo_expert * split),
        "inter-edp": (split, o.gloo_expert * split),
        "egtp-edp": (int(c.expert_gtp_remat > 1), 0),
        "edp-ag": (int("edp-ag" in o.twins), 0),
    }
    return {kind: special.get(kind, (1, 0)) for kind in _ORDERS[o.line]}


def _created(layout: Layout, o: _Options) -> Dict[str, Tuple[int, int]]:
    """megatron kind -> ``(NCCL, gloo)`` groups created over the world, for options ``o``."""
    c = layout.config
    n, split = o.n, int(o.n > 1)
    dpcp, dp, edp = layout.num_groups("dp-cp"), layout.num_groups("dp"), layout.num_groups("edp")
    gtp, egtp = int(c.gtp_remat > 1), int(c.expert_gtp_remat > 1)
    special = {
        "dp-cp": (dpcp, o.gloo_dense * dpcp),
        "dp-cp-ag": (dpcp * int("dp-cp-ag" in o.twins), 0),
        "intra-dp-cp": (split * dpcp * n, o.gloo_dense * split * dpcp * n),
        "dp": (dp, o.gloo_dense * dp),
        "gtp-dp": (gtp * layout.num_groups("gtp-dp"), 0),
        "gtp-dp-cp": (gtp * layout.num_groups("gtp-dp-cp"), 0),
        "hcp": (layout.num_groups("cp") * sum(c.cp // s for s in o.hcp), 0),
        "embd": (layout.num_groups("pp"), 0),
        "pos-embd": (layout.num_groups("pp"), 0),
        "edp": (edp, o.gloo_expert * edp),
        "intra-edp": (split * edp * n, o.gloo_expert * split * edp * n),
        "inter-edp": (split * edp * (c.edp // n), o.gloo_expert * split * edp * (c.edp // n)),
        "egtp-edp": (egtp * layout.num_groups("egtp-edp"), 0),
        "intra-dist-opt": (n, 0),
        "edp-ag": (edp * int("edp-ag" in o.twins), 0),
    }
    return {kind: special[kind] if kind in special else (layout.num_groups(kind), 0) for kind in _ORDERS[o.line]}


def megatron_rank_groups(
    layout: Layout,
    rank: int,
    *,
    megatron: Optional[str] = None,
    gloo: bool = True,
    all_gather: bool = False,
    dist_opt_instances: int = 1,
    hierarchical_cp: Sequence[int] = (),
) -> Dict[str, Tuple[int, int]]:
    """megatron kind -> ``(NCCL groups, gloo groups)`` that ``rank`` is a member of, in the
    order the line creates them (``megatron``: see :func:`megatron_line`).

    Example: ``megatron_rank_groups(plan(8, pp=2), 0, megatron="0.16")["embd"] == (1, 0)``.
    """
    o = _options(layout, megatron, gloo, all_gather, dist_opt_instances, hierarchical_cp)
    return _held(layout, rank, o)


def megatron_world_calls(
    layout: Layout,
    *,
    megatron: Optional[str] = None,
    gloo: bool = True,
    all_gather: bool = False,
    dist_opt_instances: int = 1,
    hierarchical_cp: Sequence[int] = (),
) -> Dict[str, Tuple[int, int]]:
    """megatron kind -> ``(NCCL, gloo)`` groups created (each one ``new_group`` on every rank).

    Multiply by the world size for the ``new_group`` calls over the world.
    Example: ``megatron_world_calls(plan(8, tp=2))["tp"] == (4, 0)``.
    """
    o = _options(layout, megatron, gloo, all_gather, dist_opt_instances, hierarchical_cp)
    return _created(layout, o)


def _megatron_size_one(layout: Layout, mine: Dict[str, Tuple[int, int]], o: _Options) -> int:
    """How many of a rank's NCCL groups (``mine``) in megatron-core hold one rank."""
    c = layout.config
    sizes = {kind: layout.size(kind) for kind in mine if kind in KINDS}
    sizes.update({
        "intra-dp-cp": c.dp * c.cp // o.n, "embd": 1 if c.pp == 1 else 2, "pos-embd": 1,
        "intra-edp": c.edp // o.n, "inter-edp": o.n, "intra-dist-opt": layout.world_size // o.n,
    })
    count = sum(mine[k][0] for k, size in sizes.items() if size == 1)
    return count + sum(1 for s in o.hcp if s == 1)


# -- the bridge --------------------------------------------------------------------


def bridge_fields(
    layout: Layout, rank: int, *, megatron: Optional[str] = None, all_gather: bool = False
) -> Dict[str, Optional[GroupView]]:
    """The line's ``ProcessGroupCollection`` field -> ``rank``'s group there as a view (None: no
    group, or -- ``intra_dist_opt`` -- the default group, which the bridge does not create).
    The all-gather fields hold their twin only with ``all_gather`` (see :func:`all_gather_kinds`).

    Example: ``bridge_fields(plan(8, pp=4), 2, megatron="0.19")["embd"] is None``.
    """
    line = megatron_line(megatron)
    twins = all_gather_kinds(layout, line) if boolean("all_gather", all_gather, LayoutError) else ()
    pp = layout.group_view_of("pp", rank)
    first, last = _stage(layout, rank)
    head, tail = pp[0], pp[pp.size - 1]
    views: Dict[str, Optional[GroupView]] = {
        "embd": GroupView(head, ((2, tail - head),) if tail > head else ()) if first or last else None,
        "pos_embd": GroupView(head) if first else None,
    }
    for field in COLLECTION_FIELDS[line]:
        kind = KINDS.get(_FIELD_KIND.get(field, ""))
        if kind is not None and (kind.twin_of is None or kind.name in twins):
            views[field] = layout.group_view_of(kind.name, rank)
    views["intra_dp_cp"] = views["dp_cp"]
    views["intra_expt_dp"] = views["expt_dp"]
    return {field: views.get(field) for field in COLLECTION_FIELDS[line]}  # hcp, inter/intra_dist_opt: None


def _is_twin(field: str) -> bool:
    kind = KINDS.get(_FIELD_KIND.get(field, ""))
    return kind is not None and kind.twin_of is not None


def bridge_rank_sets(layout: Layout, rank: int, *, megatron: Optional[str] = None) -> List[GroupView]:
    """The distinct rank sets among ``rank``'s groups of every field but the all-gather twins, in
    field order: the groups the bridge creates, one communicator each. The whole world's rank set
    is not among them: the default group holds it (``intra_dist_opt``, and any field that large)."""
    seen: List[GroupView] = []
    for field, view in bridge_fields(layout, rank, megatron=megatron).items():
        if not _is_twin(field) and _needs_group(view, layout) and view not in seen:
            seen.append(view)
    return seen


def bridge_twins(layout: Layout, rank: int, *, megatron: Optional[str] = None) -> List[GroupView]:
    """``rank``'s all-gather twins when all-gather groups are asked for: communicators of
    their own over the same ranks as ``dp-cp`` / ``edp`` (whole world and size 1 too), never
    shared with those; the two twins share one where their ranks are equal (the registry's
    all-gather channel holds one communicator per rank set).

    Example: ``len(bridge_twins(plan(8, ep=2), 0, megatron="0.19")) == 2``.
    """
    views: List[GroupView] = []
    for kind in all_gather_kinds(layout, megatron):
        view = layout.group_view_of(kind, rank)
        if view not in views:
            views.append(view)
    return views


def _needs_group(view: Optional[GroupView], layout: Layout) -> TypeGuard[GroupView]:
    """Whether the bridge creates a group for ``view``: one exists, and it is not the
    whole world (the default group holds that)."""
    return view is not None and view.size < layout.world_size


def _stage_classes(layout: Layout) -> List[Tuple[int, int]]:
    """``(representative rank, ranks like it)`` for first / last / middle pipeline stages."""
    pp, world = layout.config.pp, layout.world_size
    group = layout.group_view_of("pp", 0)
    if pp == 1:
        return [(0, world)]
    classes = [(group[0], world // pp), (group[pp - 1], world // pp)]
    if pp > 2:
        classes.append((group[1], world - 2 * (world // pp)))
    return classes


def _partitions(layout: Layout, line: str) -> int:
    """Distinct partitions among the fields but the twins: covering ones compared at rank 0 (a
    tiling by translates of one pattern is unique), embd / pos_embd by their stage sets."""
    covering: List[GroupView] = []
    for field, view in bridge_fields(layout, 0, megatron=line).items():
        if _is_twin(field) or field in ("embd", "pos_embd"):
            continue
        if _needs_group(view, layout) and view not in covering:
            covering.append(view)
    pp = layout.config.pp
    if pp == 1:  # embd and pos_embd: every rank alone
        return len(covering) + (0 if GroupView(0) in covering else 1)
    pp_view = layout.group_view_of("pp", 0)
    count = len(covering)
    held = pp_view in covering or not _needs_group(pp_view, layout)
    count += 0 if pp == 2 and held else 1  # embd == pp when pp == 2
    count += 0 if GroupView(0) in covering else 1  # pos_embd: first stages alone, held if size 1 is
    return count


# -- the budget --------------------------------------------------------------------


def _notes(layout: Layout, o: _Options) -> List[str]:
    """What the numbers rest on, in words: the all-gather exception and megatron-core's quirks."""
    if not o.twins:
        return []
    c = layout.config
    notes = [
        f"all-gather twins ({', '.join(o.twins)}): {len(o.twins)} extra communicator(s) per rank over the "
        "same ranks as dp-cp / edp -- the one exception to one communicator per rank set"
    ]
    if o.line == "0.16":
        return notes
    if c.gtp_remat > 1 or (c.expert_gtp_remat > 1 and c.ep > 1):
        notes.append(
            f"megatron-core 0.19.2's create_all_gather_groups() raises with gtp_remat = {c.gtp_remat}, "
            f"expert_gtp_remat = {c.expert_gtp_remat} (it sizes its grid with the GTP-inclusive "
            "data-parallel size); its twins are counted as intended, one per dp-cp / edp group"
        )
    if c.order != DEFAULT_ORDER and _twins_moved(layout, o.twins):
        notes.append(
            f"megatron-core's create_all_gather_groups() builds its twins in the default order "
            f"{DEFAULT_ORDER}, not {c.order}: they hold other ranks than the groups they twin (counted the same)"
        )
    return notes


def _twins_moved(layout: Layout, twins: Sequence[str]) -> bool:
    """Whether megatron-core's all-gather groups (built in the default order) hold other ranks
    than the kinds they twin in ``layout``'s order."""
    c = layout.config
    default = plan(
        c.world_size, tp=c.tp, pp=c.pp, cp=c.cp, ep=c.ep, etp=c.etp,
        gtp_remat=c.gtp_remat, expert_gtp_remat=c.expert_gtp_remat,
    )
    return any(default.group_view_of(kind, 0) != layout.group_view_of(kind, 0) for kind in twins)


def budget(
    layout: Layout,
    rank: int = 0,
    *,
    comm_mb: float = DEFAULT_COMM_MB,
    megatron: Optional[str] = None,
    all_gather: bool = False,
    dist_opt_instances: int = 1,
    hierarchical_cp: Sequence[int] = (),
) -> Dict[str, Any]:
    """The communicator budget of ``layout`` as a JSON-ready dict (see the module docstring).

    ``megatron`` is the megatron-core line modelled (:func:`megatron_line`; ``"megatron"``
    says which and why); ``per_rank`` is for ``rank``; ``max_per_rank`` the most over all
    ranks; ``world`` the ``new_group`` calls over the world; ``memory_mib`` NCCL
    communicators x ``comm_mb``; ``notes`` what the numbers rest on. The bridge side is its
    standard field set (one dist-opt instance, no hierarchical cp), plus, with
    ``all_gather``, the all-gather twins as extra communicators.
    """
    if isinstance(comm_mb, bool) or not isinstance(comm_mb, (int, float)) or not comm_mb >= 0:
        raise LayoutError(f"comm_mb must be a number >= 0, got {comm_mb!r}")
    o = _options(layout, megatron, True, all_gather, dist_opt_instances, hierarchical_cp)
    line = o.line
    mine = _held(layout, rank, o)
    classes = _stage_classes(layout)
    twins = len(o.twins)
    m_max = max(_totals(_held(layout, r, o))[0] for r, _ in classes)
    b_counts = [(len(bridge_rank_sets(layout, r, megatron=line)) + twins, count) for r, count in classes]
    m_calls = _totals(_created(layout, o))
    partitions = _partitions(layout, line) + twins
    per_rank = _per_rank(layout, rank, mine, o)
    communicators = per_rank["bridge"]["communicators"]
    world = layout.world_size
    return {
        "rank": rank,
        "comm_mb": comm_mb,
        "megatron": {"line": line, "source": o.source},
        "all_gather": bool(twins),
        "per_rank": per_rank,
        "max_per_rank": {"megatron_nccl": m_max, "bridge": max(b for b, _ in b_counts)},
        "world": {
            "megatron_new_group": {"gloo_on": world * sum(m_calls), "gloo_off": world * m_calls[0]},
            "bridge_new_group": sum(b * count for b, count in b_counts),
            "bridge_partitions": partitions,
            "bridge_split_group": world * partitions,
        },
        "memory_mib": {
            "megatron": per_rank["megatron"]["nccl"] * comm_mb,
            "bridge": communicators * comm_mb,
            "megatron_max": m_max * comm_mb,
            "bridge_max": max(b for b, _ in b_counts) * comm_mb,
        },
        "notes": _notes(layout, o),
    }


def _totals(groups: Dict[str, Tuple[int, int]]) -> Tuple[int, int]:
    """``(NCCL, gloo)`` summed over kinds."""
    return sum(a for a, _ in groups.values()), sum(b for _, b in groups.values())


def _per_rank(layout: Layout, rank: int, mine: Dict[str, Tuple[int, int]], o: _Options) -> Dict[str, Any]:
    """The ``per_rank`` part of :func:`budget`: megatron-core's groups by kind, the bridge's rank sets."""
    nccl, gloo = _totals(mine)
    sets = bridge_rank_sets(layout, rank, megatron=o.line)
    twins = bridge_twins(layout, rank, megatron=o.line) if o.twins else []
    fields = bridge_fields(layout, rank, megatron=o.line, all_gather=bool(o.twins))
    return {
        "megatron": {
            "by_kind": {k: {"nccl": a, "gloo": b} for k, (a, b) in mine.items() if a or b},
            "nccl": nccl,
            "gloo": gloo,
            "total": nccl + gloo,
            "size_one": _megatron_size_one(layout, mine, o),
        },
        "bridge": {
            "rank_sets": len(sets),
            "twins": len(twins),
            "communicators": len(sets) + len(twins),
            "size_one": sum(1 for v in sets + twins if v.size == 1),
            "fields": {f: (None if v is None else v.size) for f, v in fields.items()},
        },
    }
