"""The rank rule, for every MPU flavour: what the bridge reports as a rank is the group's own.

For every group the bridge hands out, on every rank, ``info.ranks`` is the group's own order
(``dist.get_process_group_ranks(info.group)``) and ``info.rank`` is ``dist.get_rank(info.group)``;
the legacy MPU's rank getters agree. An MPU whose ranks getter lists a group in another order
than the group holds them (the bridge would report one place and the group use another, and a
layer that picks its shard by rank and all-gathers over the group misplaces shards silently) is
refused, on every rank, with an MpuError naming both orders. The DeviceMesh flavour is covered
over many meshes in ``tests/test_mesh.py``.

One spawned world of 4 gloo ranks: a user MPU, megatron-core's ``parallel_state``, standalone.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from _multiproc import run_ranks
from _rank_rule import assert_rank_rule
from _rank_rule import observe as observe_rank_rule
from mpu_bridge.errors import BridgeError
from mpu_bridge.optional import is_available

WORLD_SIZE = 4
AGREEMENT_TIMEOUT_S = 120
HAS_MEGATRON = is_available("megatron.core")

class _UserMpu:
    """tp 2 over ranks {0, 1} and {2, 3}, data parallel the rest; ``tp_order`` lists each tp
    group (the process groups themselves always hold their ranks ascending)."""

    def __init__(self, rank: int, tp_order: List[List[int]]) -> None:
        import torch.distributed as dist

        self._rank = rank
        tp = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3])]
        dp = [dist.new_group(ranks) for ranks in ([0, 2], [1, 3])]
        self._tp_ranks = next(r for r in tp_order if rank in r)
        self._tp = tp[rank // 2]
        self._dp = dp[rank % 2]

    def get_tensor_model_parallel_world_size(self) -> int:
        return 2

    def get_tensor_model_parallel_rank(self) -> int:
        return self._tp_ranks.index(self._rank)

    def get_tensor_model_parallel_group(self) -> Any:
        return self._tp

    def get_tensor_model_parallel_group_ranks(self) -> List[int]:
        return list(self._tp_ranks)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_world_size(self) -> int:
        return 2

    def get_data_parallel_group(self) -> Any:
        return self._dp


def _attach(mpu: Any, **sizes: Any) -> Dict[str, Any]:
    import mpu_bridge

    try:
        with mpu_bridge.attach(mpu, agreement_timeout=AGREEMENT_TIMEOUT_S, **sizes) as bridge:
            return observe_rank_rule(bridge)
    except BridgeError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}


def _world(rank: int, world_size: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "user_ascending": _attach(_UserMpu(rank, [[0, 1], [2, 3]])),
        "user_backwards": _attach(_UserMpu(rank, [[1, 0], [3, 2]])),
        "standalone": _attach(None, tp=2),
    }
    if HAS_MEGATRON:
        from _megatron import initialize_megatron, megatron_parallel_state

        ps = megatron_parallel_state()
        initialize_megatron(ps, tp=2, ep=2)
        try:
            out["megatron_core"] = _attach(ps)
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=300)


CASES = ["user_ascending", "user_backwards", "standalone"] + (["megatron_core"] if HAS_MEGATRON else [])


@pytest.mark.parametrize("case", CASES)
def test_every_reported_rank_is_the_rank_in_the_group_handed_out(world, case):
    observed = [obs[case] for obs in world]
    assert_rank_rule(observed)


@pytest.mark.parametrize("case", [c for c in CASES if c != "user_backwards"])
def test_mpus_that_list_groups_in_their_own_order_are_read(world, case):
    for obs in world:
        assert "type" not in obs[case], obs[case]


def test_an_mpu_listing_a_group_out_of_its_order_is_refused_naming_both_orders(world):
    for rank, obs in enumerate(world):
        error = obs["user_backwards"]
        assert error.get("type") == "MpuError", (rank, error)
        mine = [1, 0] if rank < 2 else [3, 2]
        assert f"tp group as {mine}" in error["message"], error["message"]
        assert f"holds them as {sorted(mine)}" in error["message"], error["message"]
        assert "get_tensor_model_parallel_group_ranks" in error["message"], error["message"]
