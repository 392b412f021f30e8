"""``mpu-bridge plan --module ...``: the plan of a multi-module layout, module by module. Pure, no torch.

Each module (:mod:`mpu_bridge.spans`) is a layout over its rank span, planned as one
(:func:`~mpu_bridge.render.render_text`), with its communicator budget
(:func:`module_budget`) for a rank of its span; then, for the rank asked about, its
modules and what it holds over all of them.

A module's budget is :func:`mpu_bridge.budget.budget` of the same sizes at offset 0, for
the rank's place in the span (per-rank counts are the same for every translate), with
what a span changes:

* the bridge needs a communicator for the span's own rank set (``intra_dist_opt``, and
  any field as large): only the whole world's is the default group. Each member creates
  it once;
* megatron-core's ``initialize_model_parallel(rank_offset=, local_world_size=)`` makes
  every rank of the *world* call ``new_group`` for every group of the module;
* a split over the default group needs every rank of the world, so a span's groups are
  created member-only (no ``split_group`` count).

Example::

    >>> from mpu_bridge.spans import parse_modules
    >>> report = modules_report(parse_modules(["encoder:ranks=8", "llm:tp=4,pp=2"]), 64, rank=9)
    >>> [m["name"] for m in report["rank"]["modules"]]
    ['llm']
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

from .budget import budget
from .errors import LayoutError
from .layout import DEFAULT_ORDER, Layout, plan
from .render import budget_lines, layout_report, render_text
from .spans import ModuleSpec, module_layouts
from .text import abbreviate_ranks
from .validate import integer

__all__ = ["module_budget", "modules_report", "render_modules_text"]


def module_budget(layout: Layout, rank: int, world_size: int, **options: Any) -> Dict[str, Any]:
    """The communicator budget of ``layout`` (one module's span) for global ``rank`` in a world
    of ``world_size`` ranks (see the module docstring); ``options`` go to :func:`budget`.

    Example: ``module_budget(plan(8, tp=2, rank_offset=8), 9, 16)["per_rank"]["bridge"]["communicators"]``
    is one more than for ``plan(8, tp=2)`` at rank 1 of a world of 8 (the span's own group).
    """
    c = layout.config
    local = plan(c.world_size, tp=c.tp, pp=c.pp, cp=c.cp, ep=c.ep, etp=c.etp, order=c.order,
                 gtp_remat=c.gtp_remat, expert_gtp_remat=c.expert_gtp_remat)
    if not layout.holds(rank):
        raise LayoutError(f"rank {rank} is outside the module's ranks {c.rank_offset}..{layout.ranks[-1]}")
    out = copy.deepcopy(budget(local, rank - c.rank_offset, **options))
    out["rank"] = rank
    if c.world_size == world_size:
        return out
    comm_mb = out["comm_mb"]
    bridge = out["per_rank"]["bridge"]
    bridge["rank_sets"] += 1
    bridge["communicators"] += 1
    out["max_per_rank"]["bridge"] += 1
    calls = out["world"]
    for key in ("gloo_on", "gloo_off"):
        calls["megatron_new_group"][key] = calls["megatron_new_group"][key] // c.world_size * world_size
    calls["bridge_new_group"] += c.world_size
    calls["bridge_partitions"] += 1
    calls["bridge_split_group"] = None
    memory = out["memory_mib"]
    memory["bridge"] += comm_mb
    memory["bridge_max"] += comm_mb
    out["notes"] = [*out["notes"],
                    f"a rank span ({c.rank_offset}..{c.rank_offset + c.world_size - 1} of {world_size}): the bridge "
                    "creates the span's own group member-only (the default group holds only the whole world), and "
                    "megatron-core's rank_offset init has every rank of the world enter every new_group"]
    return out


def _reference_rank(layout: Layout, rank: Optional[int]) -> int:
    """``rank`` when the span holds it, else the span's first rank."""
    return rank if rank is not None and layout.holds(rank) else layout.rank_offset


def modules_report(
    modules: Sequence[ModuleSpec],
    world_size: int,
    *,
    rank: Optional[int] = None,
    order: str = DEFAULT_ORDER,
    gpus_per_node: Optional[int] = None,
    max_groups: Optional[int] = 8,
    budget_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The plan of every module as a JSON-ready dict: per module its span, layout report and
    (with ``budget_options``, the :func:`budget` keywords) budget for ``rank`` or the span's
    first rank; ``rank``'s modules and their sum; the ranks that run no module.

    Example: ``modules_report(parse_modules(["a:ranks=2", "b"]), 4)["modules"][1]["rank_offset"] == 2``.
    """
    if rank is not None:
        rank = integer("rank", rank, LayoutError)
        if not 0 <= rank < world_size:
            raise LayoutError(f"rank {rank} is outside the world of {world_size} ranks (0..{world_size - 1})")
    layouts = module_layouts(modules, world_size, order=order, gpus_per_node=gpus_per_node)
    entries: List[Dict[str, Any]] = []
    for name, layout in layouts:
        entry: Dict[str, Any] = {"name": name, "rank_offset": layout.rank_offset, "ranks": layout.world_size}
        entry.update(layout_report(layout, rank=rank if rank is not None and layout.holds(rank) else None,
                                   max_groups=max_groups))
        if budget_options is not None:
            entry["budget"] = module_budget(layout, _reference_rank(layout, rank), world_size, **budget_options)
        entries.append(entry)
    out: Dict[str, Any] = {"world_size": world_size, "modules": entries,
                           "idle_ranks": _idle(layouts, world_size)}
    if rank is not None:
        out["rank"] = _rank_summary(entries, layouts, rank)
    return out


def _idle(layouts: Sequence[Any], world_size: int) -> List[List[int]]:
    """The ranks no module holds, as ``[first, last]`` runs (spans are ranges: O(modules))."""
    bounds = sorted((layout.rank_offset, layout.rank_offset + layout.world_size) for _, layout in layouts)
    runs, at = [], 0
    for start, stop in bounds:
        if start > at:
            runs.append([at, start - 1])
        at = max(at, stop)
    if at < world_size:
        runs.append([at, world_size - 1])
    return runs


def _rank_summary(entries: List[Dict[str, Any]], layouts: Sequence[Any], rank: int) -> Dict[str, Any]:
    """``rank``'s modules and, where budgets were asked for, its communicators summed over them."""
    mine = [(entry, layout) for entry, (_, layout) in zip(entries, layouts) if layout.holds(rank)]
    summary: Dict[str, Any] = {"rank": rank, "modules": [{"name": e["name"]} for e, _ in mine]}
    if mine and all("budget" in e for e, _ in mine):
        per = [e["budget"]["per_rank"] for e, _ in mine]
        summary["megatron_nccl"] = sum(p["megatron"]["nccl"] for p in per)
        summary["bridge_communicators"] = sum(p["bridge"]["communicators"] for p in per)
        summary["memory_mib"] = {
            "megatron": sum(e["budget"]["memory_mib"]["megatron"] for e, _ in mine),
            "bridge": sum(e["budget"]["memory_mib"]["bridge"] for e, _ in mine),
        }
    return summary


def render_modules_text(
    modules: Sequence[ModuleSpec],
    world_size: int,
    *,
    rank: Optional[int] = None,
    order: str = DEFAULT_ORDER,
    gpus_per_node: Optional[int] = None,
    max_groups: Optional[int] = 4,
    fit_width: Optional[int] = 56,
    budget_options: Optional[Dict[str, Any]] = None,
) -> str:
    """The plan of every module as text: the spans, then each module's plan (and budget), then
    ``rank``'s modules and its communicators over all of them.

    Example: ``render_modules_text(parse_modules(["encoder:ranks=8", "llm:tp=4,pp=2"]), 64)``.
    """
    report = modules_report(modules, world_size, rank=rank, order=order, gpus_per_node=gpus_per_node,
                            max_groups=max_groups, budget_options=budget_options)
    layouts = dict(module_layouts(modules, world_size, order=order, gpus_per_node=gpus_per_node))
    lines = [f"mpu-bridge plan: {world_size} ranks, {len(report['modules'])} module(s)"]
    for entry in report["modules"]:
        c = layouts[entry["name"]].config
        span = f"{entry['rank_offset']}..{entry['rank_offset'] + entry['ranks'] - 1}"
        lines.append(f"  {entry['name']}: ranks {span} ({entry['ranks']}), tp {c.tp} pp {c.pp} cp {c.cp} "
                     f"ep {c.ep} etp {c.etp} dp {c.dp}")
    if report["idle_ranks"]:
        idle = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in report["idle_ranks"])
        lines.append(f"  no module: ranks {idle}")
    for entry in report["modules"]:
        layout = layouts[entry["name"]]
        shown = rank if rank is not None and layout.holds(rank) else None
        lines += ["", f"module {entry['name']} (ranks {abbreviate_ranks(list(layout.ranks))})",
                  render_text(layout, rank=shown, max_groups=max_groups, fit_width=fit_width).rstrip("\n")]
        if "budget" in entry:
            lines += ["", *budget_lines(entry["budget"])]
    if rank is not None:
        lines += ["", *_rank_lines(report["rank"])]
    return "\n".join(lines) + "\n"


def _rank_lines(summary: Dict[str, Any]) -> List[str]:
    names = [m["name"] for m in summary["modules"]]
    if not names:
        return [f"rank {summary['rank']} runs no module"]
    lines = [f"rank {summary['rank']} runs {', '.join(names)}"]
    if "bridge_communicators" in summary:
        mib = summary["memory_mib"]
        lines.append(
            f"  communicators on rank {summary['rank']}, all its modules: megatron-core {summary['megatron_nccl']} "
            f"NCCL ({mib['megatron'] / 1024:.1f} GiB), mpu-bridge {summary['bridge_communicators']} "
            f"({mib['bridge'] / 1024:.1f} GiB)"
        )
    return lines
