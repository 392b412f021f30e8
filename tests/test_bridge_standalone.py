"""The bridge with no MPU, in a world of 4 local gloo processes, compared with the layout engine.

One spawned world: every rank makes the same sequence of bridge calls and records
what it observes as plain data (rank lists, all-reduce sums, error messages); the
tests below each read one observation. An all-reduce of the global rank over a
group equals the sum of its members only if the group really holds exactly those
ranks on the wire, so the sums prove membership on the real fabric.

Without an MPU: data parallel is a clone of the world, tensor / pipeline /
sequence parallel have size 1, and every derived group (expert, hpZ, all-to-all)
is still there.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List

import pytest

from _multiproc import run_ranks
from mpu_bridge.errors import BridgeError
from mpu_bridge.layout import plan

WORLD_SIZE = 4
# Seconds the ranks wait for each other before creating groups (a shared, loaded machine
# can skew them by many seconds; a real mismatch is reported without waiting for it).
AGREEMENT_TIMEOUT_S = 120

# ---------------------------------------------------------------------------------------
# Inside the rank processes (module level: run_ranks pickles functions by reference)
# ---------------------------------------------------------------------------------------


def _sum_of_ranks(group: Any) -> int:
    """All-reduce of the global rank over ``group``: the sum of its members' ranks."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _pg_count() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _error(call: Callable[[], Any]) -> Dict[str, str]:
    """``{"type": ..., "message": ...}`` of the BridgeError ``call`` raises ("none" if it returns)."""
    try:
        call()
    except BridgeError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "none", "message": ""}


def _info(info: Any) -> Dict[str, Any]:
    import torch.distributed as dist

    return {
        "ranks": info.ranks,
        "rank": info.rank,
        "world_size": info.world_size,
        "src_rank": info.src_rank,
        "borrowed": info.borrowed,
        "torch_ranks": tuple(dist.get_process_group_ranks(info.group)),
        "sum": _sum_of_ranks(info.group),
    }


def _dense_and_experts(bridge: Any) -> Dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    obs: Dict[str, Any] = {"strategy": bridge.strategy, "mpu": bridge.reader}
    pgs = _pg_count()
    dp = bridge.data_parallel()
    obs["dp"] = _info(dp)
    obs["dp_is_world_object"] = dp.group is dist.group.WORLD or dp.group is c10d._get_default_group()
    obs["dp_created"] = (bridge.stats()["created"], _pg_count() - pgs)
    obs["dense"] = {
        name: _info(getattr(bridge, name)())
        for name in ("tensor_parallel", "pipeline_parallel", "sequence_parallel", "model_parallel")
    }
    obs["sdp_is_dp"] = bridge.sequence_data_parallel() is dp
    obs["world_is_dp_group"] = bridge.world().group is dp.group

    created, pgs = bridge.stats()["created"], _pg_count()
    two = bridge.expert_groups(2)
    four = bridge.expert_groups(4)
    obs["ep2"] = {"ep": _info(two.expert_parallel), "edp": _info(two.expert_data_parallel)}
    obs["ep4"] = {"ep": _info(four.expert_parallel), "edp": _info(four.expert_data_parallel)}
    obs["experts_created"] = (bridge.stats()["created"] - created, _pg_count() - pgs)
    obs["names"] = (two.name, four.name)
    obs["expert_group_names"] = bridge.expert_group_names()
    obs["max_expert_size"] = bridge.max_expert_size()
    obs["max_expert_size_name"] = bridge.max_expert_size_name()
    obs["max_expert_groups_is_four"] = bridge.max_expert_groups() is four
    obs["two_again_same"] = bridge.expert_groups(2) is two and bridge.get_expert_groups("ep_size_2") is two
    obs["ep2_still_works_after_ep4"] = _sum_of_ranks(two.expert_parallel.group)

    obs["errors"] = {
        "ep3": _error(lambda: bridge.expert_groups(3)),
        "ep2_data_before_expert": _error(lambda: bridge.expert_groups(2, data_before_expert=True)),
        "unknown_name": _error(lambda: bridge.get_expert_groups("ep_size_8")),
    }
    return obs


def _derived(bridge: Any) -> Dict[str, Any]:
    """hpZ and data-before-expert groups, on a fresh bridge (nothing registered yet)."""
    obs: Dict[str, Any] = {}
    created, pgs = bridge.stats()["created"], _pg_count()
    zero = bridge.zero_param_groups(2)
    obs["zero2"] = _info(zero)
    obs["zero2_created"] = (bridge.stats()["created"] - created, _pg_count() - pgs)
    created, pgs = bridge.stats()["created"], _pg_count()
    obs["zero2_again_same"] = bridge.zero_param_groups(2) is zero
    obs["zero2_again_created"] = (bridge.stats()["created"] - created, _pg_count() - pgs)
    obs["zero8"] = _info(bridge.zero_param_groups(8))
    obs["zero3"] = _error(lambda: bridge.zero_param_groups(3))

    dbe = bridge.expert_groups(2, data_before_expert=True)
    obs["dbe"] = {
        "ep": _info(dbe.expert_parallel),
        "edp": _info(dbe.expert_data_parallel),
        "order": dbe.layout.config.order,
        "flag": dbe.data_before_expert,
    }
    return obs


def _all_to_all(bridge: Any) -> Dict[str, Any]:
    obs: Dict[str, Any] = {}
    created, pgs = bridge.stats()["created"], _pg_count()
    nodes = bridge.all_to_all_groups(gpus_per_node=2)
    obs["two"] = {
        "local": _info(nodes.local),
        "cross": _info(nodes.cross_node),
        "num_nodes": nodes.num_nodes,
        "gpus_per_node": nodes.gpus_per_node,
        "keys": sorted(nodes.as_dict()),
        "dict_holds_the_groups": set(map(id, nodes.as_dict().values()))
        == {id(nodes.local.group), id(nodes.cross_node.group)},
    }
    obs["two_created"] = (bridge.stats()["created"] - created, _pg_count() - pgs)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    obs["env_gives_same"] = bridge.all_to_all_groups() is nodes
    obs["three"] = _error(lambda: bridge.all_to_all_groups(gpus_per_node=3))
    for gpn in (4, 8):
        single = bridge.all_to_all_groups(gpus_per_node=gpn)
        obs[f"single_{gpn}"] = {
            "local": single.local.ranks,
            "cross": single.cross_node,
            "num_nodes": single.num_nodes,
            "gpus_per_node": single.gpus_per_node,
            "keys": sorted(single.as_dict()),
        }
    return obs


def _closing(bridge: Any) -> Dict[str, Any]:
    from torch.distributed import distributed_c10d as c10d

    held = bridge.data_parallel().group
    pgs = _pg_count()
    created = bridge.stats()["live"]
    bridge.close()
    return {
        "destroyed": pgs - _pg_count(),
        "live_before": created,
        "dp_group_alive": held in c10d._world.pg_map,
        "expert_groups": _error(lambda: bridge.expert_groups(2)),
        "data_parallel": _error(lambda: bridge.data_parallel()),
        "get_expert_groups": _error(lambda: bridge.get_expert_groups("ep_size_2")),
        "close_again": _error(bridge.close),
        "world_sum": _sum_of_ranks(None),
    }


def _mismatch(rank: int) -> Dict[str, Any]:
    from mpu_bridge import attach

    # A mismatch is reported as soon as every rank has arrived; the timeout only bounds a
    # rank that never comes, so a generous one costs nothing.
    bridge = attach(agreement_timeout=AGREEMENT_TIMEOUT_S)
    pgs = _pg_count()
    error = _error(lambda: bridge.expert_groups(2 if rank < 2 else 4))
    out = {"error": error, "created": bridge.stats()["created"], "pg_delta": _pg_count() - pgs}
    # The world is still usable afterwards: the same request on every rank succeeds.
    out["after"] = bridge.expert_groups(2).expert_parallel.ranks
    bridge.close()
    return out


def _standalone_world(rank: int, world_size: int) -> Dict[str, Any]:
    from mpu_bridge import attach

    first = attach(agreement_timeout=AGREEMENT_TIMEOUT_S)
    obs = {"main": _dense_and_experts(first)}
    second = attach(agreement_timeout=AGREEMENT_TIMEOUT_S)
    obs["derived"] = _derived(second)
    second.close()
    third = attach(agreement_timeout=AGREEMENT_TIMEOUT_S)
    obs["all_to_all"] = _all_to_all(third)
    third.close()
    obs["closing"] = _closing(first)
    obs["mismatch"] = _mismatch(rank)
    return obs


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_standalone_world, WORLD_SIZE, timeout=300)


def _each(world: List[Dict[str, Any]], *path: str) -> List[Any]:
    out = []
    for observed in world:
        value = observed
        for key in path:
            value = value[key]
        out.append(value)
    return out


# ---------------------------------------------------------------------------------------
# Dense groups without an MPU
# ---------------------------------------------------------------------------------------


def test_a_standalone_bridge_has_no_mpu_and_creates_member_only_groups_on_gloo(world):
    assert _each(world, "main", "mpu") == [None] * 4
    assert _each(world, "main", "strategy") == ["local_new_group"] * 4


def test_data_parallel_over_the_whole_world_is_the_default_group(world):
    for rank, dp in enumerate(_each(world, "main", "dp")):
        assert dp["ranks"] == dp["torch_ranks"] == (0, 1, 2, 3)
        assert dp["rank"] == rank and dp["src_rank"] == 0
        assert dp["sum"] == 6
        assert not dp["borrowed"]
    # one communicator per rank set: the default group holds the world's already
    assert _each(world, "main", "dp_is_world_object") == [True] * 4
    assert _each(world, "main", "dp_created") == [(0, 0)] * 4


@pytest.mark.parametrize("query", ["tensor_parallel", "pipeline_parallel", "sequence_parallel", "model_parallel"])
def test_model_parallel_dimensions_have_size_1(world, query):
    for rank, dense in enumerate(_each(world, "main", "dense")):
        info = dense[query]
        assert info["ranks"] == info["torch_ranks"] == (rank,)
        assert (info["world_size"], info["rank"], info["sum"]) == (1, 0, rank)


def test_sequence_data_parallel_and_world_are_the_data_parallel_group(world):
    assert _each(world, "main", "sdp_is_dp") == [True] * 4
    assert _each(world, "main", "world_is_dp_group") == [True] * 4


# ---------------------------------------------------------------------------------------
# Expert groups: several sizes coexist, equal to the layout engine
# ---------------------------------------------------------------------------------------


def test_expert_groups_for_ep_2_written_out(world):
    assert [o["ep"]["ranks"] for o in _each(world, "main", "ep2")] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [o["edp"]["ranks"] for o in _each(world, "main", "ep2")] == [(0, 2), (1, 3), (0, 2), (1, 3)]


def test_expert_groups_for_ep_4_written_out(world):
    assert [o["ep"]["ranks"] for o in _each(world, "main", "ep4")] == [(0, 1, 2, 3)] * 4
    assert [o["edp"]["ranks"] for o in _each(world, "main", "ep4")] == [(0,), (1,), (2,), (3,)]


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_groups_equal_the_layout_engine(world, ep):
    layout = plan(WORLD_SIZE, ep=ep)
    for rank, observed in enumerate(_each(world, "main", f"ep{ep}")):
        for kind in ("ep", "edp"):
            info = observed[kind]
            assert list(info["ranks"]) == layout.group_of(kind, rank), (ep, kind, rank)
            assert info["rank"] == layout.rank_in_group(kind, rank), (ep, kind, rank)


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_groups_reduce_over_exactly_their_members(world, ep):
    for observed in _each(world, "main", f"ep{ep}"):
        for kind in ("ep", "edp"):
            info = observed[kind]
            assert info["torch_ranks"] == info["ranks"]
            assert info["sum"] == sum(info["ranks"])


def test_expert_sizes_coexist_under_deepspeeds_names(world):
    for observed in _each(world, "main"):
        assert observed["names"] == ("ep_size_2", "ep_size_4")
        assert observed["expert_group_names"] == ("ep_size_2", "ep_size_4")
        assert observed["max_expert_size"] == 4
        assert observed["max_expert_size_name"] == "ep_size_4"
        assert observed["max_expert_groups_is_four"]
        assert observed["two_again_same"]
    assert [o["ep2_still_works_after_ep4"] for o in _each(world, "main")] == [1, 1, 5, 5]


def test_expert_groups_reuse_the_rank_sets_the_bridge_already_holds(world):
    # ep 2: EP [0,1] and EDP [0,2] are new (2 groups); ep 4: EP = the data-parallel
    # clone, EDP = the size-1 tensor-parallel groups (nothing new).
    assert _each(world, "main", "experts_created") == [(2, 2)] * 4


def test_data_before_expert_swaps_data_and_expert_parallelism(world):
    for rank, dbe in enumerate(_each(world, "derived", "dbe")):
        assert dbe["ep"]["ranks"] == ((0, 2), (1, 3), (0, 2), (1, 3))[rank]
        assert dbe["edp"]["ranks"] == ((0, 1), (0, 1), (2, 3), (2, 3))[rank]
        assert dbe["order"] == "tp-cp-dp-ep-pp" and dbe["flag"]
        layout = plan(WORLD_SIZE, ep=2, order="tp-cp-dp-ep-pp")
        assert list(dbe["ep"]["ranks"]) == layout.group_of("ep", rank)
        assert dbe["ep"]["sum"] == sum(dbe["ep"]["ranks"])
        assert dbe["edp"]["sum"] == sum(dbe["edp"]["ranks"])


# ---------------------------------------------------------------------------------------
# hpZ
# ---------------------------------------------------------------------------------------


def test_zero_param_groups_are_contiguous_blocks_without_model_parallelism(world):
    zero = _each(world, "derived", "zero2")
    assert [z["ranks"] for z in zero] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [z["sum"] for z in zero] == [1, 1, 5, 5]
    assert _each(world, "derived", "zero2_created") == [(1, 1)] * 4


def test_asking_twice_for_zero_param_groups_returns_the_same_group_and_creates_nothing(world):
    assert _each(world, "derived", "zero2_again_same") == [True] * 4
    assert _each(world, "derived", "zero2_again_created") == [(0, 0)] * 4


def test_zero_param_group_size_is_clamped_to_the_data_parallel_size(world):
    for zero in _each(world, "derived", "zero8"):
        assert zero["ranks"] == (0, 1, 2, 3) and zero["sum"] == 6


def test_a_zero_param_size_that_does_not_divide_data_parallelism_is_a_layout_error(world):
    for error in _each(world, "derived", "zero3"):
        assert error["type"] == "LayoutError"
        assert "3" in error["message"] and "4" in error["message"]


# ---------------------------------------------------------------------------------------
# All-to-all
# ---------------------------------------------------------------------------------------


def test_all_to_all_groups_on_two_nodes_of_two(world):
    two = _each(world, "all_to_all", "two")
    assert [t["local"]["ranks"] for t in two] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [t["cross"]["ranks"] for t in two] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    for t in two:
        assert (t["num_nodes"], t["gpus_per_node"]) == (2, 2)
        assert t["local"]["sum"] == sum(t["local"]["ranks"])
        assert t["cross"]["sum"] == sum(t["cross"]["ranks"])
    assert _each(world, "all_to_all", "two_created") == [(2, 2)] * 4


def test_all_to_all_dict_uses_deepspeeds_names(world):
    keys = [t["keys"] for t in _each(world, "all_to_all", "two")]
    assert keys == [
        ["global_0", "local_0"],
        ["global_1", "local_0"],
        ["global_0", "local_1"],
        ["global_1", "local_1"],
    ]
    assert all(t["dict_holds_the_groups"] for t in _each(world, "all_to_all", "two"))


def test_all_to_all_reads_gpus_per_node_from_local_world_size(world):
    assert _each(world, "all_to_all", "env_gives_same") == [True] * 4


def test_a_world_that_does_not_divide_into_nodes_is_a_layout_error(world):
    for error in _each(world, "all_to_all", "three"):
        assert error["type"] == "LayoutError"
        assert "world size 4" in error["message"] and "3" in error["message"]


@pytest.mark.parametrize("gpus_per_node", [4, 8])
def test_a_single_node_has_no_cross_node_group(world, gpus_per_node):
    for single in _each(world, "all_to_all", f"single_{gpus_per_node}"):
        assert single["local"] == (0, 1, 2, 3)
        assert single["cross"] is None
        assert (single["num_nodes"], single["gpus_per_node"]) == (1, 4)
        assert single["keys"] == ["local_0"]


# ---------------------------------------------------------------------------------------
# Errors and closing
# ---------------------------------------------------------------------------------------


def test_an_expert_size_that_does_not_divide_the_world_is_a_layout_error(world):
    for error in _each(world, "main", "errors", "ep3"):
        assert error["type"] == "LayoutError"
        assert "world size 4" in error["message"] and "ep=3" in error["message"]


def test_one_expert_size_cannot_get_a_second_layout(world):
    for error in _each(world, "main", "errors", "ep2_data_before_expert"):
        assert error["type"] == "BridgeError"
        assert "ep_size_2" in error["message"] and "data_before_expert=False" in error["message"]


def test_an_unknown_expert_group_name_lists_the_created_ones(world):
    for error in _each(world, "main", "errors", "unknown_name"):
        assert error["type"] == "BridgeError"
        assert "ep_size_8" in error["message"] and "ep_size_2, ep_size_4" in error["message"]


def test_close_destroys_every_group_the_bridge_created(world):
    for closing in _each(world, "closing"):
        # the size-1 group of tp/pp/cp/mp, EP [0, 1] and EDP [0, 2]; dp is the default group
        assert closing["destroyed"] == closing["live_before"] == 3
        assert closing["dp_group_alive"]
        assert closing["world_sum"] == 6
        assert closing["close_again"]["type"] == "none"


@pytest.mark.parametrize("call", ["expert_groups", "data_parallel", "get_expert_groups"])
def test_a_closed_bridge_refuses_every_request(world, call):
    for closing in _each(world, "closing"):
        assert closing[call]["type"] == "BridgeError"
        assert "closed" in closing[call]["message"]


def test_ranks_asking_for_different_expert_sizes_fail_on_every_rank(world):
    for mismatch in _each(world, "mismatch"):
        assert mismatch["error"]["type"] == "PlanMismatchError"
        assert "ranks [0-1]" in mismatch["error"]["message"] and "ranks [2-3]" in mismatch["error"]["message"]
        assert (mismatch["created"], mismatch["pg_delta"]) == (0, 0)


def test_the_world_recovers_after_a_plan_mismatch(world):
    assert _each(world, "mismatch", "after") == [(0, 1), (0, 1), (2, 3), (2, 3)]


def test_attach_before_init_process_group_is_a_bridge_error():
    import torch.distributed as dist

    from mpu_bridge import attach

    assert not dist.is_initialized(), "another test left a default process group behind"
    with pytest.raises(BridgeError, match="init_process_group"):
        attach()


# -- hpZ larger than data parallel: clamped, as DeepSpeed does, and said once (issue 10.7) ----


def test_an_hpz_size_larger_than_data_parallel_is_clamped_with_one_warning(caplog):
    import logging

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import mpu_bridge

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        bridge = mpu_bridge.attach()
        with caplog.at_level(logging.WARNING, logger="mpu_bridge"):
            first = bridge.zero_param_groups(8)
            bridge.zero_param_groups(8)
        bridge.close()
    finally:
        dist.destroy_process_group()
    assert first.ranks == (0, 1)  # dp = 2: blocks of 2, not 8
    warnings = [r.getMessage() for r in caplog.records if "hpZ" in r.getMessage()]
    assert warnings == [
        "mpu-bridge: hpZ partition size 8 is larger than the data-parallel group (dp=2, cp=1: 2 ranks); "
        "using blocks of 2, as DeepSpeed does"
    ]


# -- a full standalone layout: attach(None, tp=..., ep=...) (issue 11, section 1) ----------


def _full_layout_world(rank: int, world_size: int) -> Dict[str, Any]:
    import mpu_bridge

    bridge = mpu_bridge.attach(None, tp=2, ep=2, etp=1)
    infos = {
        "tp": bridge.tensor_parallel(),
        "dp": bridge.data_parallel(),
        "mp": bridge.model_parallel(),
        "ep": bridge.expert_groups(2).expert_parallel,
        "edp": bridge.expert_groups(2).expert_data_parallel,
        "tp-dp": bridge.group("tp-dp"),
    }
    obs = {name: (info.ranks, _sum_of_ranks(info.group)) for name, info in infos.items()}
    obs["same_object_for_equal_rank_sets"] = (
        infos["ep"].group is infos["tp"].group and infos["mp"].group is infos["tp"].group
    )
    obs["created"] = bridge.stats()["created"]
    bridge.close()
    return obs


@pytest.fixture(scope="module")
def full_layout() -> List[Dict[str, Any]]:
    return run_ranks(_full_layout_world, WORLD_SIZE, timeout=300)


def test_a_full_standalone_layout_has_megatrons_groups(full_layout):
    # 4 ranks, tp 2, ep 2 with expert-TP 1, default order tp-cp-ep-dp-pp.
    assert [o["tp"][0] for o in full_layout] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [o["dp"][0] for o in full_layout] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [o["ep"][0] for o in full_layout] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [o["edp"][0] for o in full_layout] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [o["tp-dp"][0] for o in full_layout] == [(0, 1, 2, 3)] * 4


def test_a_full_standalone_layouts_groups_reduce_over_their_members(full_layout):
    assert [o["dp"][1] for o in full_layout] == [2, 4, 2, 4]
    assert [o["tp-dp"][1] for o in full_layout] == [6] * 4


def test_a_full_standalone_layout_creates_one_communicator_per_rank_set(full_layout):
    # rank sets: {tp = mp = ep}, {dp = edp}: two communicators on every rank; the world's
    # (tp-dp) is the default group.
    assert all(o["same_object_for_equal_rank_sets"] for o in full_layout)
    assert [o["created"] for o in full_layout] == [2, 2, 2, 2]
