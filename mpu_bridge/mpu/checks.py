"""The consistency checks of an MPU's answers against the world it runs in.

Functions taking a :class:`~mpu_bridge.mpu.reader.MpuReader` (the reader's own
:meth:`~mpu_bridge.mpu.reader.MpuReader.check_against_world` delegates here): the
sizes must multiply to the world, every group the MPU returns must have as many
ranks as it reports and hold this rank at the reported index, its ranks must be
listed in the process group's own order (so the rank the bridge reports is
``dist.get_rank(group)``), and the combined
sizes must match (sequence-data = dp·cp, model = tp·pp, expert-data from the
expert sizes). This module does not import torch at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

from ..errors import MpuError
from .names import ALL_DIMENSIONS, DIMENSION_DESCRIPTIONS

if TYPE_CHECKING:  # the reader calls into this module; only its type is needed here
    from .reader import MpuReader

__all__ = ["check_against_world"]


def check_against_world(reader: MpuReader, world_size: int, rank: int, rank_offset: int = 0) -> None:
    """Raise :class:`MpuError` with the numbers when the MPU contradicts the world.

    Checks tp·pp·dp·cp·gtp = world; every group the MPU returns has as many ranks as it
    reports and contains ``rank`` at the reported index; sequence-data = dp·cp;
    model = tp·gtp·pp; etp·ep·edp·pp·egtp = world when experts are known (gtp and egtp
    are megatron-core 0.19's GTP sizes, 1 elsewhere).

    With ``rank_offset``, ``world_size`` ranks from there are the MPU's (a rank span, e.g.
    one module's collection): its groups must lie inside them.

    Example: an MPU reporting tp=2, pp=2, dp=4 in a world of 8 raises
    ``MpuError("... tp·pp·dp·cp = 2·2·4·1 = 16, but the world has 8 ranks ...")``.
    """
    sizes = reader.sizes()
    tp, pp, cp, dp, gtp = sizes.tp, sizes.pp, sizes.cp, sizes.dp, sizes.gtp
    dense = tp * pp * cp * gtp
    gtp_names, gtp_values = ("·gtp", f"·{gtp}") if gtp > 1 else ("", "")
    if dp is None:
        if world_size % dense:
            raise MpuError(
                f"the MPU's sizes do not fit the world: world size {world_size} is not "
                f"divisible by tp·pp·cp{gtp_names} = {dense} (tp={tp}, pp={pp}, cp={cp}"
                f"{f', gtp={gtp}' if gtp > 1 else ''}; flavour {reader.flavour}); "
                "the MPU was set up for another world"
            )
        dp = world_size // dense
    elif dense * dp != world_size:
        raise MpuError(
            f"the MPU's sizes do not multiply to the world: tp·pp·dp·cp{gtp_names} = "
            f"{tp}·{pp}·{dp}·{cp}{gtp_values} = {dense * dp}, but the world has {world_size} ranks "
            f"(flavour {reader.flavour}); initialise the MPU with sizes whose product is "
            f"{world_size}"
        )
    # model parallel spans megatron-core 0.19's gtp_remat axis (tp-gtp_remat-pp), and
    # the data-distribution groups span it with the replicate data-parallel ranks
    expected = {"sdp": dp * cp, "mp": tp * gtp * pp, "gtp-dp": gtp * dp, "gtp-dp-cp": gtp * dp * cp}
    if sizes.ep is not None:
        etp = tp if sizes.etp is None else sizes.etp
        expert = etp * sizes.ep * pp * sizes.egtp
        if world_size % expert:
            raise MpuError(
                f"the MPU's expert sizes do not fit the world: etp·ep·pp·egtp = "
                f"{etp}·{sizes.ep}·{pp}·{sizes.egtp} = {expert} does not divide {world_size}"
            )
        expected["edp"] = world_size // expert
        expected["egtp-edp"] = sizes.egtp * expected["edp"]
    for dim in ALL_DIMENSIONS:
        _check_dim(reader, dim, world_size, rank, expected.get(dim), rank_offset)


def _check_dim(
    reader: MpuReader, dim: str, world_size: int, rank: int, expected: Optional[int], rank_offset: int = 0
) -> None:
    """Check one dimension's size, rank, group and group ranks against the world and ``rank``."""
    if not reader.has(dim):
        return
    size = reader.world_size(dim)
    size_source = reader.source(dim, "world_size")
    if size > world_size:
        raise MpuError(
            f"the MPU's {dim} size {size} (from {size_source}) exceeds the world size {world_size}"
        )
    if expected is not None and size != expected:
        raise MpuError(
            f"the MPU's {DIMENSION_DESCRIPTIONS[dim]} size is {size} (from {size_source}), "
            f"but its other sizes imply {expected} (world {world_size}, flavour "
            f"{reader.flavour}); the MPU's groups are inconsistent"
        )
    if reader.has(dim, "rank"):
        dim_rank = reader.rank(dim)
        if dim_rank >= size:
            raise MpuError(
                f"the MPU reports rank {dim_rank} in its {dim} group of size {size} "
                f"(from {reader.source(dim, 'rank')})"
            )
    if reader.has(dim, "group"):
        group_size = _torch_group_size(reader.group(dim))
        if group_size is not None and group_size != size:
            raise MpuError(
                f"the MPU's {dim} group ({reader.source(dim, 'group')}) has {group_size} "
                f"ranks, but the MPU reports a {dim} size of {size} (from {size_source})"
            )
    if not reader.has(dim, "ranks"):
        return
    ranks = reader.group_ranks(dim)
    ranks_source = reader.source(dim, "ranks")
    if len(ranks) != size:
        raise MpuError(
            f"the MPU's {dim} group has {len(ranks)} ranks {ranks} (from {ranks_source}), "
            f"but the MPU reports a {dim} size of {size} (from {size_source})"
        )
    if min(ranks) < rank_offset or max(ranks) >= rank_offset + world_size or len(set(ranks)) != len(ranks):
        where = (f"the world of {world_size}" if not rank_offset
                 else f"its rank span {rank_offset}..{rank_offset + world_size - 1}")
        raise MpuError(
            f"the MPU's {dim} group {ranks} (from {ranks_source}) is not a set of distinct ranks of {where}"
        )
    if rank not in ranks:
        raise MpuError(
            f"rank {rank} is not in its own {dim} group {ranks} (from {ranks_source})"
        )
    if reader.has(dim, "rank") and ranks.index(rank) != reader.rank(dim):
        raise MpuError(
            f"the MPU reports rank {reader.rank(dim)} in the {dim} group (from "
            f"{reader.source(dim, 'rank')}), but rank {rank} is at position "
            f"{ranks.index(rank)} of {ranks}"
        )
    if reader.has(dim, "group"):
        _check_group_order(reader, dim, rank, ranks, ranks_source)


def _check_group_order(reader: MpuReader, dim: str, rank: int, ranks: List[int], source: str) -> None:
    """The rank rule: the MPU lists its ``dim`` group in the group's own order, so the rank the
    bridge reports (a place in ``ranks``) is ``dist.get_rank(group)``, the place collectives use.
    (A different rank set is the registry's error when it borrows the group.)"""
    own = _torch_group_ranks(reader.group(dim))
    if own is None or own == list(ranks) or sorted(own) != sorted(ranks):
        return
    raise MpuError(
        f"the MPU lists its {dim} group as {list(ranks)} (from {source}), but its process group "
        f"({reader.source(dim, 'group')}) holds them as {own}: rank {rank} would be {dim} rank "
        f"{list(ranks).index(rank)} by the MPU and {own.index(rank)} in the group, and a layer that "
        f"picks its shard by that rank and gathers over the group would misplace shards; list each "
        f"group in its process group's order (torch orders a group by global rank: {own})"
    )


def _torch_group_ranks(group: Any) -> Optional[List[int]]:
    """The group's global ranks in group order according to torch.distributed, None if it cannot tell."""
    try:
        import torch.distributed as dist  # lazy: only when a group must be inspected

        if not dist.is_initialized():
            return None
        return [int(r) for r in dist.get_process_group_ranks(group)]
    except Exception:
        return None


def _torch_group_size(group: Any) -> Optional[int]:
    """The group's size according to torch.distributed, None if it cannot tell."""
    try:
        import torch.distributed as dist  # lazy: only when a group must be inspected

        if not dist.is_initialized():
            return None
        return int(dist.get_world_size(group=group))
    except Exception:
        return None
