"""``bridge.prepare(...)``: the groups a trainer will use, agreed on in one round (issue 17).

Every first-time request is collective and agrees through the store; a trainer that
asks for a dozen kinds one by one pays a dozen rounds. ``prepare`` makes them in one
registry batch, one agreement round; the getters then answer from the cache, locally.
The exports use it: a standalone ``process_group_collection()`` is two rounds (the
covering kinds, then the embedding groups, which leave ranks out), not one per field
(14 before), and ``device_mesh()`` one, not one per dimension.

One spawned world of 4 gloo ranks per scenario; the assertions follow each scenario.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest

from _multiproc import run_ranks
from mpu_bridge.optional import is_available

WORLD = 4
KINDS = ["tp", "dp", "tp-cp", "dp-cp", "tp-dp", "mp"]


def _rounds(bridge: Any) -> int:
    return bridge.stats()["agreements"]


def _prepare_then_ask(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge

    bridge = mpu_bridge.attach(None, tp=2, ep=2)
    before = _rounds(bridge)
    new = bridge.prepare(KINDS, expert_sizes=[1, 2], embedding=True)
    after_prepare = _rounds(bridge)
    ranks = {kind: bridge.group(kind).ranks for kind in KINDS}
    experts = {size: bridge.expert_groups(size).expert_parallel.ranks for size in (1, 2)}
    bridge.embedding_groups()
    again = bridge.prepare(KINDS, expert_sizes=[1, 2], embedding=True)
    obs = {"new": new, "again": again, "prepare_rounds": after_prepare - before,
           "rounds_after": _rounds(bridge) - after_prepare, "ranks": ranks, "experts": experts,
           "layout": {kind: bridge.ranks(kind) for kind in KINDS}}
    bridge.close()
    return obs


def test_prepare_makes_every_request_in_one_round_and_the_getters_answer_locally():
    observed = run_ranks(_prepare_then_ask, WORLD)
    for obs in observed:
        assert obs["prepare_rounds"] == 1
        assert obs["rounds_after"] == 0  # the getters and a second prepare: no round
        assert obs["again"] == 0
        assert obs["ranks"] == obs["layout"]
    # 6 kinds, expert_groups for sizes 1 and 2, the embedding groups
    assert [obs["new"] for obs in observed] == [9] * WORLD
    # tp 2 on 4 ranks: DeepSpeed's E+M+D layout, the expert-parallel peers across tp lanes
    assert [obs["experts"] for obs in observed] == [
        {1: (0,), 2: (0, 2)}, {1: (1,), 2: (1, 3)}, {1: (2,), 2: (0, 2)}, {1: (3,), 2: (1, 3)},
    ]


def _bad_kind_then_good(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.errors import BridgeError

    bridge = mpu_bridge.attach(None, tp=2)
    try:
        bridge.prepare(["tp", "no-such-kind"])
        error = None
    except BridgeError as exc:
        error = type(exc).__name__, str(exc)
    rounds = bridge.prepare(["tp", "dp"])
    obs = {"error": error, "made": rounds, "tp": bridge.tensor_parallel().ranks}
    bridge.close()
    return obs


def test_an_unknown_kind_is_an_error_on_every_rank_and_the_bridge_works_after():
    observed = run_ranks(_bad_kind_then_good, WORLD)
    for obs in observed:
        assert obs["error"][0] == "BridgeError"
        assert "unknown group kind 'no-such-kind'" in obs["error"][1]
        assert obs["made"] == 2
    assert [obs["tp"] for obs in observed] == [(0, 1), (0, 1), (2, 3), (2, 3)]


def _ranks_prepare_differently(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.errors import PlanMismatchError

    bridge = mpu_bridge.attach(None, tp=2, agreement_timeout=60)
    try:
        bridge.prepare(["tp", "dp"] if rank != 3 else ["tp"])
        error = None
    except PlanMismatchError as exc:
        error = str(exc)
    bridge.close()
    return {"error": error}


def test_ranks_that_prepare_different_kinds_all_get_a_mismatch_naming_them():
    observed = run_ranks(_ranks_prepare_differently, WORLD)
    for obs in observed:
        assert obs["error"] is not None
        assert "ranks [0-2] planned" in obs["error"] and "ranks [3] planned" in obs["error"]


def _collection_rounds(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge

    bridge = mpu_bridge.attach(None, tp=2, pp=2)
    before = _rounds(bridge)
    pgc = bridge.process_group_collection()
    obs = {"rounds": _rounds(bridge) - before, "tp": bridge.tensor_parallel().group is pgc.tp}
    bridge.close()
    return obs


@pytest.mark.skipif(not is_available("megatron.core.process_groups_config"),
                    reason="needs megatron-core >= 0.15 (ProcessGroupCollection)")
def test_a_standalone_collection_export_is_two_rounds_not_one_per_field():
    observed = run_ranks(_collection_rounds, WORLD)
    assert [obs["rounds"] for obs in observed] == [2] * WORLD
    assert all(obs["tp"] for obs in observed)


def _mesh_rounds(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge

    bridge = mpu_bridge.attach(None, tp=2, ep=2)
    before = _rounds(bridge)
    mesh = bridge.device_mesh()
    dense = _rounds(bridge) - before
    expert = bridge.device_mesh(expert=True, ep_size=1)
    obs = {"dense": dense, "expert": _rounds(bridge) - before - dense,
           "tp": mesh["tp"].get_group() is bridge.tensor_parallel().group,
           "ep": expert["ep"].get_group() is bridge.expert_groups(1).expert_parallel.group}
    bridge.close()
    return obs


def test_a_device_mesh_is_one_round_not_one_per_dimension():
    observed = run_ranks(_mesh_rounds, WORLD)
    # the expert mesh: expert_groups(1) (ep, edp), then the other expert dims: two rounds
    assert [(obs["dense"], obs["expert"]) for obs in observed] == [(1, 2)] * WORLD
    assert all(obs["tp"] and obs["ep"] for obs in observed)
