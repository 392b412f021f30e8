"""DeepSpeed's expert-parallel rank layouts, computed by the layout engine.

DeepSpeed (``deepspeed.utils.groups``) builds its expert-parallel (EP) and
expert-data-parallel (EDP) groups in three ways. Each is a case of
:func:`mpu_bridge.layout.plan`; only the order in which DeepSpeed lists the
groups (and, in one case, the ranks inside a group) differs from Megatron's.
This module names the :class:`~mpu_bridge.layout.Layout` behind each path and
reproduces DeepSpeed's lists exactly, from that layout. No torch here.

``path`` values (which DeepSpeed code builds the groups):

``"model_parallel"``
    ``_create_expert_data_and_model_parallel(ep, mpu)``, i.e.
    ``_get_expert_parallel_ranks(world, tp, ep, pp, d_before_e)``: MoE layers
    with an MPU and expert tensor parallelism (the default). Layout: expert-TP =
    TP; order ``tp-cp-ep-dp-pp`` (DeepSpeed's "E + M + D") or, with
    ``data_before_expert``, ``tp-cp-dp-ep-pp`` ("D + E"). Groups are listed
    stage by stage, then tensor lane by tensor lane; ranks inside a group
    ascend. DeepSpeed creates every EP group, then every EDP group.
``"legacy"``
    ``_create_expert_and_data_parallel(ep)`` with ``mp_size`` None or 1: MoE
    layers without an MPU, or with expert tensor parallelism disabled.
    Layout: expert-TP = 1 (the dense ``tp`` does not affect the expert groups),
    same two orders. Here DeepSpeed's order *is* Megatron's. DeepSpeed creates
    every EDP group, then every EP group.
``"tp_strided"``
    ``_create_expert_and_data_parallel(ep, mp_size=tp, pp_size=pp,
    mp_mode="tp")`` with ``tp > 1`` and no folding spec (AutoEP's fallback).
    EP groups are those of ``"model_parallel"`` (expert-TP = TP, E + M + D), in
    the same order. Each EDP group, however, joins the EDP groups of all tensor
    lanes: the expert grid's ``("tp", "dp")`` groups of that layout, which no
    single Layout kind names; DeepSpeed lists its ranks lane by lane, so they do
    *not* ascend (``[0, 8, 1, 9]``). Creation goes stage by stage: the stage's
    EP groups, then its EDP groups. With ``tp == 1`` DeepSpeed takes the
    ``"legacy"`` path, and so do we.

Not covered: ``mp_mode="sp"`` (sequence parallelism, ``mp_size > 1``): its
lists equal ``"legacy"`` E + D (only the creation interleaving differs, as in
``"tp_strided"``) and it rejects D + E; and the AutoEP+AutoTP folding tables.

Example::

    >>> deepspeed_expert_groups(16, ep=4, tp=2, path="model_parallel")[0]
    [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    >>> expert_layout(16, ep=4, tp=2).groups("ep")  # same sets, Megatron's order
    [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

from . import partitions
from .errors import LayoutError
from .layout import Layout, _positive_int, plan

__all__ = [
    "DATA_BEFORE_EXPERT_ORDER",
    "DEEPSPEED_PATHS",
    "expert_layout",
    "deepspeed_expert_groups",
    "deepspeed_expert_groups_of",
    "deepspeed_group_creation_order",
    "_get_expert_parallel_ranks",
]

#: Megatron order string of DeepSpeed's "D + E" layout (``use_data_before_expert_parallel_``).
DATA_BEFORE_EXPERT_ORDER = "tp-cp-dp-ep-pp"

#: The DeepSpeed group-creation paths this module reproduces (see the module docstring).
DEEPSPEED_PATHS: Tuple[str, ...] = ("model_parallel", "legacy", "tp_strided")

Groups = List[List[int]]


def expert_layout(
    world_size: int,
    *,
    ep: int,
    tp: int = 1,
    pp: int = 1,
    data_before_expert: bool = False,
    expert_tensor_parallel: bool = True,
) -> Layout:
    """The :class:`Layout` whose ``"ep"`` and ``"edp"`` groups are DeepSpeed's, as sets
    (the expert family :func:`mpu_bridge.partitions.expert_layout` over the dense layout).

    ``expert_tensor_parallel=True``: DeepSpeed's ``"model_parallel"`` path (expert-TP
    = ``tp``), whose EP groups the ``"tp_strided"`` path shares; ``False``: the
    ``"legacy"`` path (expert-TP = 1). ``data_before_expert`` picks D + E (order
    ``tp-cp-dp-ep-pp``) over E + M + D / E + D (Megatron's default order).

    Example::

        >>> expert_layout(16, ep=2, expert_tensor_parallel=False).groups("edp")
        [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    """
    dense = plan(world_size, tp=tp, pp=pp)  # Megatron's default order; D + E puts dp before ep
    etp = tp if expert_tensor_parallel else 1
    return partitions.expert_layout(dense, ep, data_before_expert=bool(data_before_expert), etp=etp)


def _model_parallel_layout(world: int, ep: int, tp: int, pp: int, data_before_expert: bool) -> Layout:
    """``"model_parallel"``: DeepSpeed's ``_get_expert_parallel_ranks`` checks, then the layout."""
    if world % (tp * pp):
        raise LayoutError(
            f"world size {world} is not divisible by tp·pp = {tp * pp} (tp={tp}, pp={pp}), "
            "as DeepSpeed's _get_expert_parallel_ranks requires; choose sizes whose "
            "product divides the world size"
        )
    dp = world // (tp * pp)
    if dp % ep:
        raise LayoutError(
            f"the data-parallel size world/(tp·pp) = {world}/{tp * pp} = {dp} is not "
            f"divisible by ep = {ep}, as DeepSpeed's _get_expert_parallel_ranks requires; "
            f"choose an ep that divides {dp}"
        )
    return expert_layout(world, ep=ep, tp=tp, pp=pp, data_before_expert=data_before_expert)


def _tp_strided_layout(world: int, ep: int, tp: int, pp: int, data_before_expert: bool) -> Layout:
    """``"tp_strided"`` with ``tp > 1``: DeepSpeed's checks for its TP-strided ordering, then the layout."""
    stage = world // pp
    if data_before_expert:
        raise LayoutError(
            f"DeepSpeed's _create_expert_and_data_parallel does not support D + E "
            f"(use_data_before_expert_parallel_) with mp_size = tp = {tp} > 1; "
            "use data_before_expert=False or path='model_parallel'"
        )
    if stage % tp:
        raise LayoutError(
            f"a pipeline stage of {stage} ranks is not divisible by tp = {tp}: DeepSpeed's "
            "TP-strided ordering would leave ranks out of every group; choose a tp that "
            f"divides {stage}"
        )
    dp = stage // tp
    if dp % ep:
        raise LayoutError(
            f"ep = {ep} does not divide the {dp} ranks of one tensor lane per pipeline stage "
            f"(world {world}, tp={tp}, pp={pp}): DeepSpeed's TP-strided ordering would put "
            "ranks of different tensor lanes into one expert-parallel group, which no rank "
            f"layout describes; choose an ep that divides {dp}"
        )
    return expert_layout(world, ep=ep, tp=tp, pp=pp)


def _checked_layout(
    world_size: Any, ep: Any, tp: Any, pp: Any, data_before_expert: bool, path: Any
) -> Layout:
    """Validate like DeepSpeed (but with LayoutError, never assert) and return the layout."""
    if path not in DEEPSPEED_PATHS:
        raise LayoutError(
            f"unknown DeepSpeed path {path!r}; known paths: {', '.join(DEEPSPEED_PATHS)}"
        )
    world = _positive_int("world_size", world_size)
    ep = _positive_int("ep", ep)
    tp = _positive_int("tp", tp)
    pp = _positive_int("pp", pp)
    if world % pp:
        raise LayoutError(
            f"world size {world} is not divisible by pp = {pp}: the pipeline stages would "
            "not be equal; choose a pp that divides the world size"
        )
    if path == "model_parallel":
        return _model_parallel_layout(world, ep, tp, pp, data_before_expert)
    stage = world // pp
    if stage % ep:
        raise LayoutError(
            f"a pipeline stage of world/pp = {world}/{pp} = {stage} ranks is not divisible "
            f"by ep = {ep}, as DeepSpeed's _create_expert_and_data_parallel requires; "
            f"choose an ep that divides {stage}"
        )
    if path == "legacy" or tp == 1:
        # DeepSpeed's mp_size <= 1 branch; the dense tp only has to fit the world.
        return expert_layout(
            world, ep=ep, tp=tp, pp=pp, data_before_expert=data_before_expert, expert_tensor_parallel=False
        )
    return _tp_strided_layout(world, ep, tp, pp, data_before_expert)


def _coordinates(layout: Layout, *tokens: str) -> Iterator[int]:
    """Base ranks of the expert grid, nested with the first token outermost."""
    grid = layout.expert
    bases = [0]
    for token in tokens:
        size, stride = grid.size_of(token), grid.stride_of(token)
        bases = [base + i * stride for base in bases for i in range(size)]
    return iter(bases)


def _ep_groups(layout: Layout) -> Groups:
    # stage by stage, tensor lane by tensor lane, then along the data dimension
    return [layout.group_of("ep", base) for base in _coordinates(layout, "pp", "tp", "dp")]


def _edp_groups(layout: Layout) -> Groups:
    # stage by stage, tensor lane by tensor lane, then along the expert dimension
    return [layout.group_of("edp", base) for base in _coordinates(layout, "pp", "tp", "ep")]


def _lane_joined_edp(layout: Layout, rank: int) -> List[int]:
    """``rank``'s ``tp_strided`` EDP group: its EDP groups of every tensor lane, lane by lane."""
    grid = layout.expert
    stride = grid.stride_of("tp")
    base = rank - ((rank // stride) % grid.size_of("tp")) * stride
    return [r for t in range(grid.size_of("tp")) for r in layout.group_of("edp", base + t * stride)]


def _tp_strided_stages(layout: Layout) -> Iterator[Tuple[Groups, Groups]]:
    """Per pipeline stage: (EP groups, lane-joined EDP groups) in DeepSpeed's order."""
    grid = layout.expert
    for stage in _coordinates(layout, "pp"):
        ep_groups = [
            layout.group_of("ep", stage + base) for base in _coordinates(layout, "tp", "dp")
        ]
        edp_groups = [
            _lane_joined_edp(layout, stage + e * grid.stride_of("ep"))
            for e in range(grid.size_of("ep"))
        ]
        yield ep_groups, edp_groups


def deepspeed_expert_groups(
    world_size: int,
    *,
    ep: int,
    path: str,
    tp: int = 1,
    pp: int = 1,
    data_before_expert: bool = False,
) -> Tuple[Groups, Groups]:
    """``(ep_groups, edp_groups)`` exactly as DeepSpeed's ``path`` lists them.

    ``path`` is one of :data:`DEEPSPEED_PATHS`; ``tp`` is the MPU's tensor-parallel
    size (``"model_parallel"``, ``"legacy"``) or DeepSpeed's ``mp_size``
    (``"tp_strided"``). Raises :class:`~mpu_bridge.errors.LayoutError` where
    DeepSpeed would fail an assertion.

    Example::

        >>> deepspeed_expert_groups(8, ep=2, pp=2, path="legacy")
        ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2], [1, 3], [4, 6], [5, 7]])
    """
    layout = _checked_layout(world_size, ep, tp, pp, bool(data_before_expert), path)
    if layout.config.etp == 1 or path != "tp_strided":
        return _ep_groups(layout), _edp_groups(layout)
    ep_groups: Groups = []
    edp_groups: Groups = []
    for stage_ep, stage_edp in _tp_strided_stages(layout):
        ep_groups.extend(stage_ep)
        edp_groups.extend(stage_edp)
    return ep_groups, edp_groups


def deepspeed_expert_groups_of(
    rank: int,
    world_size: int,
    *,
    ep: int,
    path: str,
    tp: int = 1,
    pp: int = 1,
    data_before_expert: bool = False,
) -> Tuple[List[int], List[int]]:
    """``rank``'s (EP ranks, EDP ranks) as DeepSpeed records them; O(group size), not O(world).

    These are the lists DeepSpeed keeps in ``_EXPERT_PARALLEL_GROUP_RANKS`` and
    ``_EXPERT_DATA_PARALLEL_GROUP_RANKS`` on that rank (in the same order).

    Example::

        >>> deepspeed_expert_groups_of(1, 16, ep=4, tp=2, path="tp_strided")
        ([1, 3, 5, 7], [0, 8, 1, 9])
    """
    layout = _checked_layout(world_size, ep, tp, pp, bool(data_before_expert), path)
    ep_ranks = layout.group_of("ep", rank)
    if path == "tp_strided" and layout.config.etp > 1:  # type: ignore[operator]
        return ep_ranks, _lane_joined_edp(layout, rank)
    return ep_ranks, layout.group_of("edp", rank)


def deepspeed_group_creation_order(
    world_size: int,
    *,
    ep: int,
    path: str,
    tp: int = 1,
    pp: int = 1,
    data_before_expert: bool = False,
) -> List[Tuple[str, List[int]]]:
    """Every ``new_group`` call DeepSpeed's ``path`` makes, in order, as ``(kind, ranks)``.

    ``kind`` is ``"ep"`` or ``"edp"``. Code that must create groups in DeepSpeed's
    own sequence (so that group names agree with ranks running DeepSpeed) follows
    this list.

    Example::

        >>> deepspeed_group_creation_order(4, ep=2, path="legacy")
        [('edp', [0, 2]), ('edp', [1, 3]), ('ep', [0, 1]), ('ep', [2, 3])]
    """
    layout = _checked_layout(world_size, ep, tp, pp, bool(data_before_expert), path)
    if path == "tp_strided" and layout.config.etp > 1:  # type: ignore[operator]
        calls: List[Tuple[str, List[int]]] = []
        for stage_ep, stage_edp in _tp_strided_stages(layout):
            calls.extend(("ep", ranks) for ranks in stage_ep)
            calls.extend(("edp", ranks) for ranks in stage_edp)
        return calls
    ep_calls = [("ep", ranks) for ranks in _ep_groups(layout)]
    edp_calls = [("edp", ranks) for ranks in _edp_groups(layout)]
    if path == "model_parallel":
        return ep_calls + edp_calls
    return edp_calls + ep_calls


def _get_expert_parallel_ranks(
    world_size: int,
    tensor_parallel_size_: int,
    expert_parallel_size_: int,
    pipeline_parallel_size_: int = 1,
    use_data_before_expert_parallel_: bool = False,
) -> Tuple[Groups, Groups]:
    """Drop-in for ``deepspeed.utils.groups._get_expert_parallel_ranks``: same lists, same order.

    Returns (expert-parallel groups, expert-data-parallel groups); raises
    :class:`~mpu_bridge.errors.LayoutError` where DeepSpeed's would assert.

    Example::

        >>> _get_expert_parallel_ranks(16, 2, 4)[1]
        [[0, 8], [2, 10], [4, 12], [6, 14], [1, 9], [3, 11], [5, 13], [7, 15]]
    """
    return deepspeed_expert_groups(
        world_size,
        ep=expert_parallel_size_,
        tp=tensor_parallel_size_,
        pp=pipeline_parallel_size_,
        data_before_expert=use_data_before_expert_parallel_,
        path="model_parallel",
    )
