"""The rank rule, observed inside a rank: what the bridge reports as a rank is its group's own.

For every group the bridge hands out, ``observe(bridge)`` records the reported ranks and
rank beside ``dist.get_process_group_ranks(group)`` and ``dist.get_rank(group)``, and the
legacy MPU's rank getters beside the group's rank; the tests compare the pairs.

Example (inside a rank)::

    got = observe(bridge)
    ranks, rank, group_ranks, group_rank = got["tensor_parallel"]
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

#: Methods that hand out one group (name -> call), for the rank rule.
_GROUP_CALLS: Dict[str, Callable[[Any], Any]] = {
    "tensor_parallel": lambda b: b.tensor_parallel(),
    "pipeline_parallel": lambda b: b.pipeline_parallel(),
    "model_parallel": lambda b: b.model_parallel(),
    "data_parallel": lambda b: b.data_parallel(),
    "sequence_parallel": lambda b: b.sequence_parallel(),
    "sequence_data_parallel": lambda b: b.sequence_data_parallel(),
    "expert_parallel": lambda b: b.expert_groups(2).expert_parallel,
    "expert_data_parallel": lambda b: b.expert_groups(2).expert_data_parallel,
}
#: legacy getter prefix -> the method whose group it answers.
_LEGACY = {
    "get_tensor_model_parallel": "tensor_parallel",
    "get_pipeline_model_parallel": "pipeline_parallel",
    "get_data_parallel": "data_parallel",
}


def observe(bridge: Any) -> Dict[str, Any]:
    """Per group the bridge hands out: (reported ranks, reported rank, the group's own ranks,
    ``dist.get_rank(group)``), and the legacy MPU's rank getters next to the group's rank."""
    import torch.distributed as dist

    out: Dict[str, Any] = {}
    for name, call in _GROUP_CALLS.items():
        info = call(bridge)
        out[name] = (tuple(info.ranks), info.rank, tuple(dist.get_process_group_ranks(info.group)),
                     dist.get_rank(info.group))
    legacy = bridge.as_legacy_mpu()
    for prefix, name in _LEGACY.items():
        out[f"legacy {prefix}_rank"] = (getattr(legacy, f"{prefix}_rank")(), out[name][3])
    return out


def assert_rank_rule(observed: List[Dict[str, Any]]) -> None:
    """``observe`` on every rank (a list by rank): either every rank refused (an MpuError on
    each, recorded as ``{"type": ...}``), or every reported rank list and rank is the group's own."""
    if any("type" in obs for obs in observed):  # refused: then on every rank, as an MpuError
        assert all(obs.get("type") == "MpuError" for obs in observed), observed
        return
    for rank, obs in enumerate(observed):
        for method in _GROUP_CALLS:
            ranks, reported, group_ranks, group_rank = obs[method]
            assert ranks == group_ranks, (rank, method, ranks, group_ranks)
            assert reported == group_rank == ranks.index(rank), (rank, method, reported, group_rank)
        for key in [k for k in obs if k.startswith("legacy")]:
            legacy, group_rank = obs[key]
            assert legacy == group_rank, (rank, key)
