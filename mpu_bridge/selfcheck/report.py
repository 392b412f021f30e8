"""The self-check's report: the layout, one row per group kind, phase times, problems, verdict.

Pure: no torch, no processes; it reads the ranks' :class:`~mpu_bridge.selfcheck.results.RankResult` s.

Example::

    text, ok = format_report(config, 4, results, {}, 6.2, launcher="spawned locally")
    # ... "PASS: 12 group kinds on 4 ranks, every check passed"
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..render import render_text
from ..text import abbreviate_ranks, table
from .config import SelfCheckConfig, module_configs
from .results import PHASES, GroupCheck, RankResult

__all__ = ["NEVER_JOINED", "format_report", "write"]

#: How a missing rank's reason starts when nothing from it ever reached the run (the verdict
#: names such ranks apart: they are the cause, the ranks left waiting for them the effect).
NEVER_JOINED = "never joined"

#: Label prefixes of the ``--exports`` rows (:func:`~mpu_bridge.selfcheck.config.export_label`).
EXPORTS: Tuple[str, ...] = ("pg_collection.", "device_mesh.", "device_mesh[")

#: Most problem lines the report lists.
_MAX_PROBLEMS = 40
_GROUP_HEADER = ["group kind", "size", "groups", "communicator", "all-reduce", "broadcast", "planner", "result"]


def _consistency_problems(label: str, checks: Mapping[int, GroupCheck]) -> Tuple[int, List[str]]:
    """The number of distinct groups the ranks report, and where they disagree about membership.

    Every rank must be in its own group, and every member of a group must report the
    same group (the groups of a kind are a partition of the world, or of the ranks in
    one: a non-member check, as ``pos_embd`` off the first stage, reports no group).
    """
    groups = set()
    problems = []
    for rank, check in sorted(checks.items()):
        if not check.member:
            continue
        members = tuple(sorted(check.ranks))
        groups.add(members)
        if rank not in members:
            problems.append(f"{label}: rank {rank} reports group {abbreviate_ranks(list(members))} without itself")
        for member in members:
            other = checks.get(member)
            if other is not None and tuple(sorted(other.ranks)) != members:
                problems.append(
                    f"{label}: rank {rank} has group {abbreviate_ranks(list(members))}, but its member "
                    f"{member} has {abbreviate_ranks(sorted(other.ranks)) if other.member else 'none'}"
                )
                break
    return len(groups), problems


def _check_problems(label: str, rank: int, check: GroupCheck, rank_error: Optional[str]) -> List[str]:
    """What went wrong in one rank's check of one kind, one line each."""
    if check.error is not None:
        # a collective that raised is listed once, with the rank's failure
        skipped = check.error.startswith("skipped") or check.error == rank_error
        return [] if skipped else [f"{label}: rank {rank}: {check.error}"]
    problems = []
    if not check.planner_ok and not check.member:
        problems.append(
            f"{label}: rank {rank} is in no group, the planner says {abbreviate_ranks(list(check.planned))}"
        )
    elif not check.planner_ok and not check.planned:
        problems.append(
            f"{label}: rank {rank} got group {abbreviate_ranks(list(check.ranks))}, the planner says none"
        )
    elif not check.planner_ok:
        problems.append(
            f"{label}: rank {rank} got group {abbreviate_ranks(list(check.ranks))}, the planner says "
            f"{abbreviate_ranks(list(check.planned))}"
        )
    if check.allreduce_ok is False:
        problems.append(
            f"{label}: rank {rank}: all-reduce gave {check.allreduce_got}, expected {sum(check.ranks)} "
            f"(the sum of ranks {abbreviate_ranks(list(check.ranks))})"
        )
    if check.broadcast_ok is False:
        problems.append(
            f"{label}: rank {rank}: broadcast from rank {check.ranks[0]} delivered {check.broadcast_got}"
        )
    return problems


def _communicator_text(checks: Sequence[GroupCheck]) -> str:
    """``created`` / ``reused`` / ``borrowed``, with ``= <kind>`` when it is another kind's communicator."""
    checks = [c for c in checks if c.member] or list(checks)
    statuses = sorted({c.status for c in checks})
    if len(statuses) == 1:
        text = statuses[0]
    else:
        text = ", ".join(f"{s} {sum(1 for c in checks if c.status == s)}" for s in statuses)
    twins = {c.same_as for c in checks}
    if len(twins) == 1 and None not in twins:
        text += f" = {twins.pop()}"
    return text


@dataclass
class _GroupTable:
    rows: List[List[str]] = field(default_factory=list)
    failed_kinds: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)


def _kind_row(label: str, checks: Mapping[int, GroupCheck], world_size: int, count: int, passed: bool) -> List[str]:
    """One row; the collective columns count the ranks in a group of the kind (all of them,
    except for an export some ranks are in none of), the planner column every rank."""
    values = list(checks.values())
    members = [c for c in values if c.member]
    outside = len(values) - len(members)
    ok = [sum(1 for c in members if getattr(c, name) and c.error is None) for name in ("allreduce_ok", "broadcast_ok")]
    planner = sum(1 for c in values if c.planner_ok and c.error is None)
    return [
        label,
        "/".join(str(size) for size in sorted({c.size for c in members})) or "-",
        str(count),
        _communicator_text(values),
        *(f"{n}/{world_size - outside}" for n in ok),
        f"{planner}/{world_size}",
        "ok" if passed else "FAIL",
    ]


def _group_table(world_size: int, results: Mapping[int, RankResult]) -> _GroupTable:
    """One row per checked kind, in the order the ranks checked them."""
    per_label: Dict[str, Dict[int, GroupCheck]] = {}
    for rank in sorted(results):
        for check in results[rank].checks:
            per_label.setdefault(check.label, {})[rank] = check
    out = _GroupTable()
    for label, checks in per_label.items():
        count, problems = _consistency_problems(label, checks)
        for rank, check in sorted(checks.items()):
            problems.extend(_check_problems(label, rank, check, results[rank].error))
        passed = len(checks) == world_size and all(c.passed for c in checks.values()) and not problems
        if not passed:
            out.failed_kinds.append(label)
        out.problems.extend(problems)
        out.rows.append(_kind_row(label, checks, world_size, count, passed))
    return out


def _phase_lines(results: Mapping[int, RankResult], wall_s: float) -> List[str]:
    rows = []
    for phase in PHASES:
        times = [r.phases[phase] for r in results.values() if phase in r.phases]
        if times:
            rows.append([phase, f"{max(times):.3f}", f"{min(times):.3f}"])
    rows.append(["wall (whole run)", f"{wall_s:.3f}", ""])
    return table(["phase", "max s", "min s"], rows, right=(1, 2))


def _warning_lines(results: Mapping[int, RankResult]) -> List[str]:
    """The library's warnings, each once, with the ranks that logged it."""
    by_message: Dict[str, List[int]] = {}
    for rank in sorted(results):
        for message in results[rank].warnings:
            ranks = by_message.setdefault(message, [])
            if rank not in ranks:
                ranks.append(rank)
    if not by_message:
        return []
    lines = ["", "warnings logged by the ranks:"]
    for message, ranks in by_message.items():
        lines.append(f"  ranks {abbreviate_ranks(ranks)}: {message}")
    return lines


def _header(config: SelfCheckConfig, world_size: int, results: Mapping[int, RankResult], launcher: str) -> List[str]:
    """The first line (ranks, launcher, backend, MPU, strategy) and the planner's layout."""
    first = results[min(results)] if results else None
    strategy = next((r.strategy for r in results.values() if r.strategy), None)
    known = "ProcessGroupCollection" if config.via_collection else "rank spans" if config.modules else "megatron"
    mpu = next((r.mpu for r in results.values() if known in r.mpu), None)
    if mpu is None and config.via_collection:
        mpu = "ProcessGroupCollection"
    mpu = mpu or ("megatron-core parallel_state" if config.with_megatron else "standalone (no MPU)")
    backend = (first.backend if first is not None else "") or config.backend
    gpn = config.gpus_per_node
    if config.modules:
        plans = [f"module {name}:\n" + render_text(cfg.dense_layout(world_size)).rstrip("\n")
                 for name, cfg in module_configs(config, world_size)]
    else:
        plans = [render_text(config.dense_layout(world_size, gpn if gpn is not None and world_size % gpn == 0
                                                 else None)).rstrip("\n")]
    return [
        f"mpu-bridge selfcheck: {world_size} ranks ({launcher}), backend {backend}, MPU {mpu}, "
        f"group creation {strategy or '?'}",
        "",
        "\n\n".join(plans),
        "",
    ]


def _stats_lines(results: Mapping[int, RankResult]) -> List[str]:
    """The first rank's registry counters, one line."""
    first = results[min(results)] if results else None
    if first is None or not first.stats:
        return []
    stats = first.stats
    return [
        f"rank {first.rank}: {stats.get('created', 0)} groups created, {stats.get('borrowed', 0)} "
        f"borrowed from the MPU, {stats.get('reused', 0)} requests reused, "
        f"{stats.get('fallbacks', 0)} creation batch(es) fell back to new_group"
    ]


def _rank_errors(results: Mapping[int, RankResult], missing: Mapping[int, str]) -> List[str]:
    errors = [
        f"rank {rank} failed in {results[rank].error_phase or '?'}: {results[rank].error}"
        for rank in sorted(results)
        if results[rank].error is not None
    ]
    errors.extend(f"rank {rank} {why}" for rank, why in sorted(missing.items()))
    return errors


def _problem_lines(problems: List[str], results: Mapping[int, RankResult]) -> List[str]:
    """Up to 40 problems, then the traceback of the lowest rank that has one."""
    if not problems:
        return []
    lines = ["", "problems:"]
    lines.extend(f"  {line}" for line in problems[:_MAX_PROBLEMS])
    if len(problems) > _MAX_PROBLEMS:
        lines.append(f"  … and {len(problems) - _MAX_PROBLEMS} more")
    traced = [r for r in results.values() if r.error_traceback]
    if traced:
        earliest = min(traced, key=lambda r: r.rank)
        lines.append(f"traceback of rank {earliest.rank}:")
        lines.extend(f"  {line}" for line in (earliest.error_traceback or "").rstrip().splitlines()[-15:])
    return lines


def _counted(groups: _GroupTable) -> str:
    """``12 group kinds``, and with ``--exports`` ``and 24 exported fields/dims``."""
    exported = sum(1 for row in groups.rows if row[0].startswith(EXPORTS))
    kinds = len(groups.rows) - exported
    return f"{kinds} group kinds" + (f" and {exported} exported fields/dims" if exported else "")


def _verdict(
    world_size: int, results: Mapping[int, RankResult], missing: Mapping[int, str], groups: _GroupTable, passed: bool
) -> str:
    if passed:
        return f"PASS: {_counted(groups)} on {world_size} ranks, every check passed"
    reasons = []
    if groups.failed_kinds:
        reasons.append("failed kinds: " + ", ".join(groups.failed_kinds))
    absent = sorted(rank for rank, why in missing.items() if why.startswith(NEVER_JOINED))
    if absent:
        reasons.insert(0, f"ranks {absent} never joined")
    if len(absent) < len(missing):
        reasons.append(f"ranks {sorted(set(missing) - set(absent))} did not report")
    raised = sorted(rank for rank in results if results[rank].error is not None)
    if raised:
        reasons.append(f"ranks {raised} raised")
    return "FAIL: " + ("; ".join(reasons) or "no group was checked")


def format_report(
    config: SelfCheckConfig,
    world_size: int,
    results: Mapping[int, RankResult],
    missing: Mapping[int, str],
    wall_s: float,
    *,
    launcher: str,
) -> Tuple[str, bool]:
    """The report rank 0 prints, and whether everything passed.

    Everything passes when every rank reported, none raised, and every kind's
    all-reduce, broadcast and planner checks hold on every rank. A rank that did not
    report (``missing``: rank -> why) fails every kind. Pure: no torch.

    Example: ``text, ok = format_report(config, 4, results, {}, 6.2, launcher="spawned locally")``.
    """
    lines = _header(config, world_size, results, launcher)
    groups = _group_table(world_size, results)
    if groups.rows:
        lines.extend(table(_GROUP_HEADER, groups.rows, right=(1, 2, 4, 5, 6)))
    else:
        lines.append("(no rank got as far as creating groups)")
    lines.append("")
    lines.extend(_phase_lines(results, wall_s))
    lines.extend(_stats_lines(results))
    lines.extend(_warning_lines(results))
    rank_errors = _rank_errors(results, missing)
    lines.extend(_problem_lines(rank_errors + groups.problems, results))
    passed = bool(groups.rows) and not groups.failed_kinds and not rank_errors and len(results) == world_size
    lines.extend(["", _verdict(world_size, results, missing, groups, passed)])
    return "\n".join(lines) + "\n", passed


def write(text: str) -> None:
    """Write ``text`` to stdout, replacing what its encoding cannot show (``…``, ``×``)."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        sys.stdout.write(text.encode(encoding, "replace").decode(encoding))
    sys.stdout.flush()
