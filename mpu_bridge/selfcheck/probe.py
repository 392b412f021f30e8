"""One rank's probe of the bridge: ask for every group, classify its communicator, prove its members.

:func:`create_groups` asks a :class:`~mpu_bridge.bridge.Bridge` for every group
the configuration names (the same queries in the same order on every rank) and
notes whether each communicator was borrowed from the MPU, reused or created;
:func:`run_collectives` then all-reduces and broadcasts in each. torch is imported
only inside :func:`run_collectives`.

Example (on every rank, after ``bridge = attach(parallel_state)``)::

    groups = create_groups(bridge, config, expected_groups(config, world_size, rank))
    run_collectives(groups, rank, world_size, torch.device("cpu"), fault=None)
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Set, Tuple

from .config import DENSE_METHODS, SelfCheckConfig, label
from .results import BORROWED, CREATED, REUSED, GroupCheck

__all__ = ["create_groups", "run_collectives"]

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

    ``fault="wrong-sum"`` makes the last rank add ``world_size`` to its contribution
    in the first kind with several ranks. A collective that raises is recorded in its
    check, the rest are marked skipped, and the exception propagates.

    Example: ``run_collectives(groups, rank, world_size, torch.device("cpu"), None)``.
    """
    # wrong-sum breaks the first kind with several ranks (every rank knows the sizes alike).
    target = next((i for i, (info, _) in enumerate(groups) if info.world_size > 1), 0)
    for index, (info, check) in enumerate(groups):
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
