"""The communicator budget of a layout, before launch: counts by arithmetic. Pure, no torch.

Two ways to hold a full Megatron group set are compared:

* **megatron-core** (``parallel_state.initialize_model_parallel``, 0.16.1): every rank
  calls ``new_group`` for every group of every kind, and holds one process group per
  kind it is a member of -- size-1 groups included, equal rank sets held twice (e.g.
  ``dp`` and ``dp-cp`` when cp = 1), plus a gloo twin of ``dp``, ``dp-cp`` and ``edp``
  (and of the dist-opt partial groups) when ``create_gloo_process_groups`` is on;
* **the bridge**: one group per *distinct rank set* among the rank's groups of every
  ``ProcessGroupCollection`` field (:data:`mpu_bridge.pg_collection.FIELDS`, the
  ``pg_field`` column of :mod:`mpu_bridge.kinds` plus ``embd``, ``pos_embd``,
  ``intra_dp_cp`` = ``dp_cp``, ``intra_expt_dp`` = ``expt_dp``, ``intra_dist_opt`` = the
  default group, which holds the world already; ``hcp`` and ``inter_dist_opt`` None),
  created member-only (one ``new_group`` per needed rank set per rank) or with one
  ``split_group`` per partition.

megatron-core's groups, in the order ``initialize_model_parallel`` creates them
(``create_group`` -> ``torch.distributed.new_group``), are listed in :data:`MEGATRON_KINDS`.
Not modelled: ``hybrid_context_parallel`` and custom embedding-rank functions.

Every number is arithmetic over the layout's sizes and the geometry of one rank's
groups (:class:`~mpu_bridge.groupview.GroupView`, equal iff the same ranks): O(kinds x
dimensions), never O(world). Communicator memory counts NCCL communicators only (gloo
groups live on the CPU), each at ``comm_mb`` MiB, as if every group were used (PyTorch
creates a NCCL communicator lazily, at a group's first collective).

Example::

    >>> from mpu_bridge.layout import plan
    >>> b = budget(plan(16, tp=2, pp=2))
    >>> b["per_rank"]["megatron"]["nccl"], b["per_rank"]["bridge"]["rank_sets"]
    (17, 6)
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeGuard

from .errors import LayoutError
from .groupview import GroupView
from .kinds import KIND_TABLE
from .layout import Layout
from .validate import positive_int

__all__ = [
    "DEFAULT_COMM_MB",
    "MEGATRON_KINDS",
    "bridge_fields",
    "bridge_rank_sets",
    "budget",
    "megatron_rank_groups",
    "megatron_world_calls",
]

#: MiB of GPU memory per NCCL communicator, by default: NCCL issue #2363 (512 MiB for a
#: single-rank communicator on recent releases); NCCL #964 reports ~0.5-0.7 GB on A100.
DEFAULT_COMM_MB = 512

#: megatron-core 0.16.1's groups, in creation order: (name, description).
MEGATRON_KINDS: Tuple[Tuple[str, str], ...] = (
    ("dp-cp", "data x context parallel (+ all-gather twin with create_all_gather_group)"),
    ("intra-dp-cp", "intra partial dp-cp (dist-opt instances > 1)"),
    ("dp", "data parallel"),
    ("cp", "context parallel"),
    ("hcp", "hierarchical context parallel, one per level"),
    ("mp", "model parallel (tp x pp)"),
    ("tp", "tensor parallel"),
    ("pp", "pipeline parallel"),
    ("embd", "embedding (first and last stage)"),
    ("pos-embd", "position embedding (first stage)"),
    ("tp-dp-cp", "tensor x data x context parallel"),
    ("tp-dp", "tensor x data parallel"),
    ("tp-cp", "tensor x context parallel"),
    ("ep", "expert parallel"),
    ("etp", "expert tensor parallel"),
    ("etp-ep", "expert tensor x expert parallel"),
    ("etp-ep-pp", "expert tensor x expert x pipeline parallel"),
    ("edp", "expert data parallel"),
    ("intra-edp", "intra partial expert dp (dist-opt instances > 1)"),
    ("inter-edp", "inter partial expert dp (dist-opt instances > 1)"),
    ("intra-dist-opt", "intra distributed-optimizer instance"),
)

#: megatron kind -> the layout kind whose groups it is (where it is one).
_LAYOUT_KIND = {
    "dp-cp": "dp-cp", "dp": "dp", "cp": "cp", "mp": "mp", "tp": "tp", "pp": "pp",
    "tp-dp-cp": "tp-dp-cp", "tp-dp": "tp-dp", "tp-cp": "tp-cp", "ep": "ep", "etp": "etp",
    "etp-ep": "etp-ep", "etp-ep-pp": "etp-ep-pp", "edp": "edp",
}


def _options(layout: Layout, instances: int, hcp: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
    """Validated ``(dist-opt instances, hierarchical cp sizes)`` for ``layout``."""
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
    return n, sizes


def _stage(layout: Layout, rank: int) -> Tuple[bool, bool]:
    """``(first stage, last stage)`` of ``rank`` in its pipeline group."""
    position = layout.rank_in_group("pp", rank)
    return position == 0, position == layout.config.pp - 1


def megatron_rank_groups(
    layout: Layout,
    rank: int,
    *,
    gloo: bool = True,
    all_gather: bool = False,
    dist_opt_instances: int = 1,
    hierarchical_cp: Sequence[int] = (),
) -> Dict[str, Tuple[int, int]]:
    """megatron kind -> ``(NCCL groups, gloo groups)`` that ``rank`` is a member of.

    Example: ``megatron_rank_groups(plan(8, pp=2), 0)["embd"] == (1, 0)``.
    """
    n, hcp = _options(layout, dist_opt_instances, hierarchical_cp)
    first, last = _stage(layout, rank)
    g = int(bool(gloo))
    split = int(n > 1)
    return {
        "dp-cp": (1 + int(bool(all_gather)), g),
        "intra-dp-cp": (split, g * split),
        "dp": (1, g),
        "cp": (1, 0),
        "hcp": (len(hcp), 0),
        "mp": (1, 0),
        "tp": (1, 0),
        "pp": (1, 0),
        "embd": (int(first or last), 0),
        "pos-embd": (int(first), 0),
        "tp-dp-cp": (1, 0),
        "tp-dp": (1, 0),
        "tp-cp": (1, 0),
        "ep": (1, 0),
        "etp": (1, 0),
        "etp-ep": (1, 0),
        "etp-ep-pp": (1, 0),
        "edp": (1, g),
        "intra-edp": (split, g * split),
        "inter-edp": (split, g * split),
        "intra-dist-opt": (1, 0),
    }


def megatron_world_calls(
    layout: Layout,
    *,
    gloo: bool = True,
    all_gather: bool = False,
    dist_opt_instances: int = 1,
    hierarchical_cp: Sequence[int] = (),
) -> Dict[str, Tuple[int, int]]:
    """megatron kind -> ``(NCCL, gloo)`` groups created (each one ``new_group`` on every rank).

    Multiply by the world size for the ``new_group`` calls over the world.
    Example: ``megatron_world_calls(plan(8, tp=2))["tp"] == (4, 0)``.
    """
    n, hcp = _options(layout, dist_opt_instances, hierarchical_cp)
    g = int(bool(gloo))
    split = int(n > 1)
    groups = {kind: layout.num_groups(lk) for kind, lk in _LAYOUT_KIND.items()}
    edp = layout.config.edp
    out = {kind: (count, 0) for kind, count in groups.items()}
    out["dp-cp"] = (groups["dp-cp"] * (1 + int(bool(all_gather))), g * groups["dp-cp"])
    out["intra-dp-cp"] = (split * groups["dp-cp"] * n, g * split * groups["dp-cp"] * n)
    out["dp"] = (groups["dp"], g * groups["dp"])
    cp = layout.config.cp
    out["hcp"] = (groups["cp"] * sum(cp // s for s in hcp), 0)
    out["embd"] = (groups["pp"], 0)
    out["pos-embd"] = (groups["pp"], 0)
    out["edp"] = (groups["edp"], g * groups["edp"])
    out["intra-edp"] = (split * groups["edp"] * n, g * split * groups["edp"] * n)
    out["inter-edp"] = (split * groups["edp"] * (edp // n), g * split * groups["edp"] * (edp // n))
    out["intra-dist-opt"] = (n, 0)
    return {kind: out[kind] for kind, _ in MEGATRON_KINDS}


def bridge_fields(layout: Layout, rank: int) -> Dict[str, Optional[GroupView]]:
    """``ProcessGroupCollection`` field -> ``rank``'s group there as a view (None: no
    group, or -- ``intra_dist_opt`` -- the default group, which the bridge does not create).

    Example: ``bridge_fields(plan(8, pp=4), 2)["embd"] is None``.
    """
    fields: Dict[str, Optional[GroupView]] = {}
    for kind in KIND_TABLE:
        if kind.pg_field:
            fields[kind.pg_field] = layout.group_view_of(kind.name, rank)
    pp = layout.group_view_of("pp", rank)
    first, last = _stage(layout, rank)
    head, tail = pp[0], pp[len(pp) - 1]
    fields["embd"] = GroupView(head, ((2, tail - head),) if tail > head else ()) if first or last else None
    fields["pos_embd"] = GroupView(head) if first else None
    fields["hcp"] = None
    fields["intra_dp_cp"] = fields["dp_cp"]
    fields["intra_expt_dp"] = fields["expt_dp"]
    fields["inter_dist_opt"] = None
    fields["intra_dist_opt"] = None  # the default group
    return fields


def bridge_rank_sets(layout: Layout, rank: int) -> List[GroupView]:
    """The distinct rank sets among ``rank``'s groups of every field, in field order: the
    groups the bridge creates. The whole world's rank set is not among them: the default
    group holds it (``intra_dist_opt``, and any field as large as the world)."""
    seen: List[GroupView] = []
    for view in bridge_fields(layout, rank).values():
        if _created(view, layout) and view not in seen:
            seen.append(view)
    return seen


def _created(view: Optional[GroupView], layout: Layout) -> TypeGuard[GroupView]:
    """Whether the bridge creates a group for ``view``: one exists, and it is not the
    whole world (the default group holds that)."""
    return view is not None and len(view) < layout.world_size


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


def _partitions(layout: Layout) -> int:
    """Distinct partitions among the fields: covering ones compared at rank 0 (a tiling by
    translates of one pattern is unique), embd / pos_embd by their stage sets."""
    covering: List[GroupView] = []
    for field, view in bridge_fields(layout, 0).items():
        if _created(view, layout) and field not in ("embd", "pos_embd") and view not in covering:
            covering.append(view)
    pp = layout.config.pp
    if pp == 1:  # embd and pos_embd: every rank alone
        one = GroupView(0)
        return len(covering) + (0 if one in covering else 1)
    pp_view = layout.group_view_of("pp", 0)
    count = len(covering)
    held = pp_view in covering or not _created(pp_view, layout)
    count += 0 if pp == 2 and held else 1  # embd == pp when pp == 2
    count += 0 if GroupView(0) in covering else 1  # pos_embd: first stages alone, held if size 1 is
    return count


def budget(
    layout: Layout,
    rank: int = 0,
    *,
    comm_mb: float = DEFAULT_COMM_MB,
    all_gather: bool = False,
    dist_opt_instances: int = 1,
    hierarchical_cp: Sequence[int] = (),
) -> Dict[str, Any]:
    """The communicator budget of ``layout`` as a JSON-ready dict (see the module docstring).

    ``per_rank`` is for ``rank``; ``max_per_rank`` the most over all ranks; ``world``
    the ``new_group`` calls over the world; ``memory_mib`` NCCL communicators x ``comm_mb``.
    The bridge side is its standard field set (one dist-opt instance, no hierarchical cp).
    """
    if isinstance(comm_mb, bool) or not isinstance(comm_mb, (int, float)) or not comm_mb >= 0:
        raise LayoutError(f"comm_mb must be a number >= 0, got {comm_mb!r}")
    opts: Dict[str, Any] = dict(
        all_gather=all_gather, dist_opt_instances=dist_opt_instances, hierarchical_cp=hierarchical_cp
    )
    world = layout.world_size
    mine = megatron_rank_groups(layout, rank, **opts)
    calls = megatron_world_calls(layout, **opts)

    def m_totals(groups: Dict[str, Tuple[int, int]]) -> Tuple[int, int]:
        return sum(a for a, _ in groups.values()), sum(b for _, b in groups.values())

    nccl, _ = m_totals(mine)
    sets = bridge_rank_sets(layout, rank)
    classes = _stage_classes(layout)
    m_max = max(m_totals(megatron_rank_groups(layout, r, **opts))[0] for r, _ in classes)
    b_max = max(len(bridge_rank_sets(layout, r)) for r, _ in classes)
    b_calls = sum(len(bridge_rank_sets(layout, r)) * count for r, count in classes)
    m_nccl_calls, m_gloo_calls = m_totals(calls)
    partitions = _partitions(layout)
    return {
        "rank": rank,
        "comm_mb": comm_mb,
        "per_rank": _per_rank(layout, rank, mine, sets, opts),
        "max_per_rank": {"megatron_nccl": m_max, "bridge": b_max},
        "world": {
            "megatron_new_group": {
                "gloo_on": world * (m_nccl_calls + m_gloo_calls),
                "gloo_off": world * m_nccl_calls,
            },
            "bridge_new_group": b_calls,
            "bridge_partitions": partitions,
            "bridge_split_group": world * partitions,
        },
        "memory_mib": {
            "megatron": nccl * comm_mb,
            "bridge": len(sets) * comm_mb,
            "megatron_max": m_max * comm_mb,
            "bridge_max": b_max * comm_mb,
        },
    }


def _per_rank(
    layout: Layout, rank: int, mine: Dict[str, Tuple[int, int]], sets: Any, opts: Dict[str, Any]
) -> Dict[str, Any]:
    """The ``per_rank`` part of :func:`budget`: megatron-core's groups by kind, the bridge's rank sets."""
    nccl = sum(a for a, _ in mine.values())
    gloo = sum(b for _, b in mine.values())
    return {
        "megatron": {
            "by_kind": {k: {"nccl": a, "gloo": b} for k, (a, b) in mine.items() if a or b},
            "nccl": nccl,
            "gloo": gloo,
            "total": nccl + gloo,
            "size_one": _megatron_size_one(layout, rank, mine, opts),
        },
        "bridge": {
            "rank_sets": len(sets),
            "size_one": sum(1 for v in sets if len(v) == 1),
            "fields": {f: (None if v is None else len(v)) for f, v in bridge_fields(layout, rank).items()},
        },
    }


def _megatron_size_one(layout: Layout, rank: int, mine: Dict[str, Tuple[int, int]], opts: Dict[str, Any]) -> int:
    """How many of ``rank``'s NCCL groups in megatron-core hold one rank."""
    c = layout.config
    n, hcp = _options(layout, opts["dist_opt_instances"], opts["hierarchical_cp"])
    sizes = {kind: layout.size(lk) for kind, lk in _LAYOUT_KIND.items()}
    first, last = _stage(layout, rank)
    sizes.update({
        "intra-dp-cp": c.dp * c.cp // n, "embd": 1 if c.pp == 1 else 2, "pos-embd": 1,
        "intra-edp": c.edp // n, "inter-edp": n, "intra-dist-opt": layout.world_size // n,
    })
    count = sum(mine[k][0] for k, size in sizes.items() if size == 1)
    return count + sum(1 for s in hcp if s == 1)
