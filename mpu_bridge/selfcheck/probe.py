"""One rank's probe of the bridge: ask for every group, classify its communicator, prove its members.

:func:`create_groups` asks a :class:`~mpu_bridge.bridge.Bridge` for every group
the configuration names (the same queries in the same order on every rank) and
notes whether each communicator was borrowed from the MPU, reused or created;
with ``--exports``, :func:`create_exports` adds every non-None field of the bridge's
``ProcessGroupCollection`` and every dim of its dense (and expert) ``DeviceMesh``;
:func:`run_collectives` then all-reduces and broadcasts in each, exported groups
included (the same prover for both). torch is imported only inside the functions
that need it.

Example (on every rank, after ``bridge = attach(parallel_state)``)::

    groups = create_groups(bridge, config, expected_groups(config, world_size, rank))
    run_collectives(groups, rank, world_size, torch.device("cpu"), fault=None)
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Set, Tuple

from .config import (
    DENSE_METHODS,
    SelfCheckConfig,
    export_label,
    label,
)
from .results import BORROWED, CREATED, REUSED, GroupCheck

__all__ = ["create_exports", "create_groups", "export_fields", "run_collectives"]

#: One bridge query: the call, and (label, pick this kind's GroupInfo from the answer) per kind.
_Request = Tuple[Callable[[], Any], List[Tuple[str, Callable[[Any], Any]]]]


def _same(answer: Any) -> Any:
    return answer


def _expert_request(bridge: Any, ep_size: int) -> _Request:
    return (
        lambda: bridge.expert_groups(ep_size),
        [
            (label("expert_parallel", "ep", ep_size), lambda a: a.expert_parallel),
            (label("expert_data_parallel", "ep", ep_size), lambda a: a.expert_data_parallel),
        ],
    )


def _all_to_all_request(bridge: Any, gpn: int) -> _Request:
    return (
        lambda: bridge.all_to_all_groups(gpn),
        [
            (label("all_to_all_local", "gpn", gpn), lambda a: a.local),
            (label("all_to_all_cross_node", "gpn", gpn), lambda a: a.cross_node),
        ],
    )


def _requests(bridge: Any, config: SelfCheckConfig) -> List[_Request]:
    """Every query, in the same fixed order on every rank."""
    out: List[_Request] = [(getattr(bridge, method), [(method, _same)]) for method in DENSE_METHODS]
    out.extend(_expert_request(bridge, ep_size) for ep_size in config.ep)
    hpz = config.hpz
    if hpz is not None:
        hpz_label = label("zero_param_intra_parallel", "hpz", hpz)
        out.append((lambda: bridge.zero_param_groups(hpz), [(hpz_label, _same)]))
    if config.gpus_per_node is not None:
        out.append(_all_to_all_request(bridge, config.gpus_per_node))
    out.append((bridge.world, [("world", _same)]))
    return out


def _mpu_queries(config: SelfCheckConfig) -> Set[str]:
    """The labels an MPU can answer with its own group (dense kinds and expert kinds)."""
    labels = set(DENSE_METHODS)
    for ep_size in config.ep:
        labels.add(label("expert_parallel", "ep", ep_size))
        labels.add(label("expert_data_parallel", "ep", ep_size))
    return labels


def _status(info: Any, existed: bool, mpu_query: bool) -> str:
    """``borrowed``: an MPU query answered with the MPU's own group; ``reused``: any other
    query answered with a communicator that existed before it; ``created``: a new one."""
    if info.borrowed and mpu_query:
        return BORROWED
    if info.borrowed or existed:
        return REUSED
    return CREATED


def create_groups(
    bridge: Any, config: SelfCheckConfig, planned: Mapping[str, Tuple[int, ...]]
) -> List[Tuple[Any, GroupCheck]]:
    """Ask the bridge for every group; check each against ``planned`` and classify its communicator.

    Returns ``(GroupInfo, GroupCheck)`` pairs in query order (a cross-node
    all-to-all group on a single node is left out).

    Example: ``[check.label for _, check in create_groups(bridge, config, planned)][0] == "tensor_parallel"``.
    """
    mpu_queries = _mpu_queries(config)
    created: List[Tuple[Any, GroupCheck]] = []
    for call, picks in _requests(bridge, config):
        before = {name: bridge.registry.lookup(planned[name]) for name, _ in picks if name in planned}
        answer = call()
        for name, pick in picks:
            info = pick(answer)
            if info is None:  # no cross-node group on a single node
                continue
            existed = before.get(name) is not None and before[name] is info.group
            expected = planned.get(name, ())
            check = GroupCheck(
                label=name,
                ranks=tuple(info.ranks),
                status=_status(info, existed, name in mpu_queries),
                planned=expected,
                planner_ok=tuple(sorted(info.ranks)) == expected and info.ranks[info.rank] == bridge.rank,
                same_as=next((c.label for i, c in created if i.group is info.group), None),
            )
            created.append((info, check))
    return created


def export_fields() -> Tuple[str, ...]:
    """The ``ProcessGroupCollection`` fields the bridge fills: those of
    :data:`mpu_bridge.pg_collection.FIELDS` the installed megatron-core declares."""
    from ..pg_collection import collection_class, declared_fields

    return declared_fields(collection_class())


def _exported_groups(bridge: Any, config: SelfCheckConfig, device_type: str) -> List[Tuple[str, Any]]:
    """(label, group or None) of every export, in the same order on every rank.

    The collection first, then the dense mesh, then one expert mesh per expert-parallel
    size above 1 (the bridge's own experts when the size is its own ``ep``).
    """
    out: List[Tuple[str, Any]] = []
    collection = bridge.process_group_collection(all_gather=True)
    held = vars(collection)  # megatron-core 0.19's __getattr__ answers None for unset fields
    for field in export_fields():
        out.append((export_label("pg_collection", field), held.get(field)))
    dense_dims, expert_dims = config.mesh_dims(), config.mesh_dims(expert=True)
    mesh = bridge.device_mesh(dense_dims, device_type=device_type)
    out.extend((export_label("device_mesh", dim), mesh.get_group(axis)) for axis, dim in enumerate(dense_dims))
    for ep_size in config.ep:
        if ep_size <= 1:
            continue
        own = ep_size == bridge.layout.config.ep
        experts = bridge.device_mesh(
            expert_dims, expert=True, ep_size=None if own else ep_size, device_type=device_type
        )
        out.extend(
            (export_label("device_mesh", dim, ep_size), experts.get_group(axis))
            for axis, dim in enumerate(expert_dims)
        )
    return out


def _export_status(bridge: Any, group: Any, ranks: Tuple[int, ...], existed: bool) -> str:
    """``borrowed``: the MPU's own object (registered as borrowed, or handed out by the
    MPU's getters without the registry); ``reused``: a communicator the bridge held
    before the exports; ``created``: one the bridge created for them."""
    registry = bridge.registry
    registered = registry.lookup(sorted(ranks)) is group or registry.created_here(group)
    if registry.is_borrowed(group) or (bridge.reader is not None and not registered):
        return BORROWED
    return REUSED if existed else CREATED


def create_exports(
    bridge: Any,
    config: SelfCheckConfig,
    planned: Mapping[str, Tuple[int, ...]],
    earlier: Sequence[Tuple[Any, GroupCheck]],
    device_type: str,
) -> List[Tuple[Any, GroupCheck]]:
    """``--exports``: the bridge's ``ProcessGroupCollection`` and ``DeviceMesh`` groups as checks.

    One check per field / dim that ``planned`` (:func:`~mpu_bridge.selfcheck.config.expected_exports`)
    names: a field the planner expects None everywhere (``hcp``, ``inter_dist_opt``)
    is left out unless this rank got a group for it (then it fails). Where this rank
    is in no group of a field (``pos_embd`` off the first stage) the check is a
    non-member one (no collective). ``same_as`` names the group kind (or earlier
    export) whose communicator it is. Returns ``(GroupInfo or None, GroupCheck)`` pairs.

    Example: ``create_exports(bridge, config, expected_exports(...), groups, "cpu")[0][1].label
    == "pg_collection.tp"``.
    """
    import torch.distributed as dist

    from ..state import GroupInfo

    before = {name: bridge.registry.lookup(ranks) for name, ranks in planned.items() if ranks}
    seen: List[Tuple[Any, GroupCheck]] = list(earlier)
    out: List[Tuple[Any, GroupCheck]] = []
    for name, group in _exported_groups(bridge, config, device_type):
        if name not in planned and group is None:
            continue  # None on every rank in megatron-core too
        expected = planned.get(name, ())
        if group is None:
            check = GroupCheck(name, (), "none", expected, planner_ok=expected == (), member=False)
            out.append((None, check))
            continue
        ranks = tuple(int(r) for r in dist.get_process_group_ranks(group))
        info = GroupInfo(name, group, ranks, ranks.index(bridge.rank) if bridge.rank in ranks else -1)
        same_as = next((c.label for i, c in seen if i is not None and i.group is group), None)
        existed = same_as is not None or (before.get(name) is not None and before[name] is group)
        check = GroupCheck(
            label=name,
            ranks=ranks,
            status=_export_status(bridge, group, ranks, existed),
            planned=expected,
            planner_ok=name in planned and tuple(sorted(ranks)) == expected and bridge.rank in ranks,
            same_as=same_as,
        )
        if name not in planned:
            check.error = "megatron-core leaves this field None, but the collection has a group"
        out.append((info, check))
        seen.append((info, check))
    return out


def _collect_in(info: Any, check: GroupCheck, contribution: int, rank: int, device: Any) -> None:
    """All-reduce ``contribution`` and broadcast from the source rank in ``info``'s group."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([contribution], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=info.group)
    check.allreduce_got = int(value.item())
    check.allreduce_ok = check.allreduce_got == sum(info.ranks)
    value = torch.tensor([rank], dtype=torch.int64, device=device)
    dist.broadcast(value, src=info.src_rank, group=info.group)
    check.broadcast_got = int(value.item())
    check.broadcast_ok = check.broadcast_got == info.src_rank


def run_collectives(
    groups: Sequence[Tuple[Any, GroupCheck]], rank: int, world_size: int, device: Any, fault: Optional[str]
) -> None:
    """All-reduce and broadcast in every group, in the same order on every rank.

    ``groups`` may hold non-member checks (``info`` None): they run no collective.

    ``fault="wrong-sum"`` makes the last rank add ``world_size`` to its contribution
    in the first kind with several ranks. A collective that raises is recorded in its
    check, the rest are marked skipped, and the exception propagates.

    Example: ``run_collectives(groups, rank, world_size, torch.device("cpu"), None)``.
    """
    # wrong-sum breaks the first kind with several ranks (every rank knows the sizes alike).
    target = next((i for i, (info, _) in enumerate(groups) if info is not None and info.world_size > 1), 0)
    for index, (info, check) in enumerate(groups):
        if info is None or not check.member:
            continue  # this rank is in no group of this export: nothing to prove here
        contribution = rank
        if fault == "wrong-sum" and index == target and rank == world_size - 1:
            contribution = rank + world_size
        try:
            _collect_in(info, check, contribution, rank, device)
        except Exception as exc:  # a broken fabric: record it and stop using collectives
            check.error = f"{type(exc).__name__}: {exc}"
            for _, rest in groups[index + 1 :]:
                rest.error = "skipped after an earlier collective failed"
            raise
