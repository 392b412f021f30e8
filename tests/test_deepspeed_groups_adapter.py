"""``mpu_bridge.deepspeed_groups``: DeepSpeed's ``deepspeed.utils.groups`` names over a default bridge.

One spawned world of 4 gloo processes calls the module's functions exactly as code
written against DeepSpeed would: first standalone (no MPU), then over megatron-core's
real ``parallel_state`` (tp 2). Each rank records what it observes as plain data;
the tests below each read one observation. A few tests need no processes at all
(argument errors, and the function names and parameters checked against the
installed DeepSpeed's source).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from _multiproc import run_ranks
from mpu_bridge import deepspeed_groups
from mpu_bridge.errors import BridgeError
from mpu_bridge.optional import is_available

WORLD_SIZE = 4
HAS_MEGATRON = is_available("megatron.core")

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


def _ranks(group: Any) -> List[int]:
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(group))


def _error(call: Callable[[], Any]) -> Dict[str, str]:
    try:
        call()
    except BridgeError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "none", "message": ""}


def _standalone(groups: Any) -> Dict[str, Any]:
    from torch.distributed import distributed_c10d as c10d

    obs: Dict[str, Any] = {}
    groups.reset()
    obs["zero_initialized_before"] = groups._zero_param_parallel_is_initialized()
    groups._create_expert_and_data_parallel(2)
    obs["ep2"] = {
        "ep_ranks": groups._get_expert_parallel_group_ranks("ep_size_2"),
        "edp_ranks": groups._get_expert_data_parallel_group_ranks("ep_size_2"),
        "ep_world_size": groups._get_expert_parallel_world_size("ep_size_2"),
        "ep_rank": groups._get_expert_parallel_rank("ep_size_2"),
        "ep_src_rank": groups._get_expert_parallel_src_rank("ep_size_2"),
        "edp_world_size": groups._get_expert_data_parallel_world_size("ep_size_2"),
        "edp_rank": groups._get_expert_data_parallel_rank("ep_size_2"),
        "expert_broadcast_src_rank": groups._get_expert_broadcast_src_rank("ep_size_2"),
        "ep_sum": _sum_of_ranks(groups._get_expert_parallel_group("ep_size_2")),
        "edp_sum": _sum_of_ranks(groups._get_expert_data_parallel_group("ep_size_2")),
        "expert_model_parallel_world_size": groups._get_expert_model_parallel_world_size(),
    }
    groups._create_expert_and_data_parallel(4)
    obs["max_size"] = groups._get_max_expert_size()
    obs["max_name"] = groups._get_max_expert_size_name()
    obs["max_group_is_ep4"] = groups._get_max_expert_parallel_group() is groups._get_expert_parallel_group(
        "ep_size_4"
    )
    obs["ep_dict"] = {name: _ranks(g) for name, g in groups._get_expert_parallel_group_dict().items()}
    obs["edp_dict"] = {name: _ranks(g) for name, g in groups._get_expert_data_parallel_group_dict().items()}
    obs["unknown_name"] = _error(lambda: groups._get_expert_parallel_group("ep_size_8"))
    obs["pp_size_mismatch"] = _error(lambda: groups._create_expert_and_data_parallel(2, pp_size=2))
    obs["dense"] = {
        "dp": (groups._get_data_parallel_world_size(), groups._get_data_parallel_rank()),
        "dp_ranks": groups._get_data_parallel_group_ranks(),
        "dp_sum": _sum_of_ranks(groups._get_data_parallel_group()),
        "mp_world_size": groups._get_model_parallel_world_size(),
        "broadcast_src_rank": groups._get_broadcast_src_rank(),
        "sp": (groups._get_sequence_parallel_world_size(), groups._get_sequence_parallel_rank()),
        "sp_ranks": _ranks(groups._get_sequence_parallel_group()),
        "sdp": (groups._get_sequence_data_parallel_world_size(), groups._get_sequence_data_parallel_rank()),
        "sdp_ranks": _ranks(groups._get_sequence_data_parallel_group()),
    }
    clone = groups._clone_world_group()
    obs["clone"] = {
        "ranks": _ranks(clone),
        "is_default_group": clone is c10d._get_default_group(),
        "sum": _sum_of_ranks(clone),
        "again_same": groups._clone_world_group() is clone,
    }

    obs["zero_uninitialized_getter"] = _error(groups._get_zero_param_intra_parallel_group_ranks)
    groups._create_zero_param_parallel_group(2)
    groups._create_zero_param_parallel_group(2)  # DeepSpeed asserts here; a no-op for us
    obs["zero"] = {
        "initialized": groups._zero_param_parallel_is_initialized(),
        "ranks": groups._get_zero_param_intra_parallel_group_ranks(),
        "rank": groups._get_zero_param_intra_parallel_rank_in_mygroup(),
        "world_size": groups._get_zero_param_intra_parallel_group_world_size(),
        "sum": _sum_of_ranks(groups._get_zero_param_intra_parallel_group()),
        "other_size": _error(lambda: groups._create_zero_param_parallel_group(4)),
    }

    os.environ["LOCAL_WORLD_SIZE"] = "2"
    all_to_all = groups._get_local_all_to_all_group()
    obs["all_to_all"] = {name: (_ranks(g), _sum_of_ranks(g)) for name, g in all_to_all.items()}

    before = groups.get_bridge()
    obs["get_bridge_is_stable"] = groups.get_bridge() is before
    held = groups._get_expert_parallel_group("ep_size_2")
    groups.reset()
    obs["after_reset"] = {
        "zero_initialized": groups._zero_param_parallel_is_initialized(),
        "old_groups_destroyed": held not in c10d._world.pg_map,
        "new_bridge": groups.get_bridge() is not before,
        "max_size": groups._get_max_expert_size(),
        "expert_model_parallel_world_size": groups._get_expert_model_parallel_world_size(),
        "ep2": _error(lambda: groups._get_expert_parallel_group_ranks("ep_size_2")),
    }
    return obs


def _over_megatron(groups: Any) -> Dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as ps

    obs: Dict[str, Any] = {}
    ps.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    try:
        # The default bridge from before stands on the world alone (tp 1): not silently reused.
        obs["other_sizes"] = _error(lambda: groups._create_expert_data_and_model_parallel(2, ps))
        groups.reset()
        groups._create_expert_data_and_model_parallel(2, ps)
        bridge = groups.get_bridge()
        obs["ep2"] = {
            "ep_ranks": groups._get_expert_parallel_group_ranks("ep_size_2"),
            "edp_ranks": groups._get_expert_data_parallel_group_ranks("ep_size_2"),
            "ep_src_rank": groups._get_expert_parallel_src_rank("ep_size_2"),
            "expert_broadcast_src_rank": groups._get_expert_broadcast_src_rank("ep_size_2"),
            "ep_sum": _sum_of_ranks(groups._get_expert_parallel_group("ep_size_2")),
            "expert_model_parallel_world_size": groups._get_expert_model_parallel_world_size(),
        }
        obs["dense"] = {
            "dp_ranks": groups._get_data_parallel_group_ranks(),
            "megatron_dp_ranks": _ranks(ps.get_data_parallel_group()),
            "dp_is_megatron": groups._get_data_parallel_group() is ps.get_data_parallel_group(),
            "mp_world_size": groups._get_model_parallel_world_size(),
            "has_mpu": bridge.reader is not None,
        }
        groups._create_expert_data_and_model_parallel(2, bridge.as_legacy_mpu())
        groups.set_mpu(ps)
        obs["same_mpu_keeps_the_bridge"] = groups.get_bridge() is bridge
        obs["other_layout_same_size"] = _error(
            lambda: groups._create_expert_data_and_model_parallel(2, ps, use_data_before_expert_parallel_=True)
        )
    finally:
        groups.reset()
        ps.destroy_model_parallel()
    return obs


def _adapter_world(rank: int, world_size: int) -> Dict[str, Any]:
    from mpu_bridge import deepspeed_groups as groups

    obs = {"standalone": _standalone(groups)}
    if HAS_MEGATRON:
        obs["megatron"] = _over_megatron(groups)
    return obs


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_adapter_world, WORLD_SIZE, timeout=480)


def _each(world: List[Dict[str, Any]], *path: str) -> List[Any]:
    out = []
    for observed in world:
        value = observed
        for key in path:
            value = value[key]
        out.append(value)
    return out


needs_megatron = pytest.mark.skipif(not HAS_MEGATRON, reason="needs megatron-core")

# ---------------------------------------------------------------------------------------
# Standalone (no MPU)
# ---------------------------------------------------------------------------------------


def test_expert_and_data_parallel_groups_without_an_mpu(world):
    ep2 = _each(world, "standalone", "ep2")
    assert [e["ep_ranks"] for e in ep2] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [e["edp_ranks"] for e in ep2] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(e["ep_world_size"], e["ep_rank"]) for e in ep2] == [(2, 0), (2, 1), (2, 0), (2, 1)]
    assert [(e["edp_world_size"], e["edp_rank"]) for e in ep2] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    assert [e["ep_src_rank"] for e in ep2] == [0, 0, 2, 2]
    assert [e["expert_broadcast_src_rank"] for e in ep2] == [0, 1, 0, 1]
    assert [(e["ep_sum"], e["edp_sum"]) for e in ep2] == [(1, 2), (1, 4), (5, 2), (5, 4)]
    assert {e["expert_model_parallel_world_size"] for e in ep2} == {1}


def test_several_expert_sizes_are_kept_by_name(world):
    for observed in _each(world, "standalone"):
        assert observed["max_size"] == 4 and observed["max_name"] == "ep_size_4"
        assert observed["max_group_is_ep4"]
        assert sorted(observed["ep_dict"]) == sorted(observed["edp_dict"]) == ["ep_size_2", "ep_size_4"]
        assert observed["ep_dict"]["ep_size_4"] == [0, 1, 2, 3]


def test_an_unknown_group_name_is_a_bridge_error_naming_the_known_ones(world):
    for error in _each(world, "standalone", "unknown_name"):
        assert error["type"] == "BridgeError"
        assert "ep_size_8" in error["message"] and "ep_size_2, ep_size_4" in error["message"]


def test_a_pipeline_size_that_disagrees_with_the_mpu_is_refused(world):
    for error in _each(world, "standalone", "pp_size_mismatch"):
        assert error["type"] == "BridgeError" and "pp_size=2" in error["message"]


def test_dense_getters_without_an_mpu_are_the_whole_world(world):
    for rank, dense in enumerate(_each(world, "standalone", "dense")):
        assert dense["dp"] == (4, rank) and dense["dp_ranks"] == [0, 1, 2, 3] and dense["dp_sum"] == 6
        assert dense["mp_world_size"] == 1
        assert dense["broadcast_src_rank"] == 0
        assert dense["sp"] == (1, 0) and dense["sp_ranks"] == [rank]
        assert dense["sdp"] == (4, rank) and dense["sdp_ranks"] == [0, 1, 2, 3]


def test_clone_world_group_is_the_default_group_over_every_rank(world):
    # DeepSpeed clones the world only because old PyTorch's get_global_rank refused WORLD
    for clone in _each(world, "standalone", "clone"):
        assert clone["ranks"] == [0, 1, 2, 3] and clone["sum"] == 6
        assert clone["is_default_group"]
        assert clone["again_same"]


def test_zero_param_groups_twice_with_the_same_size_are_fine(world):
    zero = _each(world, "standalone", "zero")
    assert [z["ranks"] for z in zero] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [(z["rank"], z["world_size"], z["sum"]) for z in zero] == [(0, 2, 1), (1, 2, 1), (0, 2, 5), (1, 2, 5)]


def test_zero_param_groups_of_another_size_are_a_bridge_error(world):
    for zero in _each(world, "standalone", "zero"):
        assert zero["other_size"]["type"] == "BridgeError"
        assert "size 2" in zero["other_size"]["message"] and "size 4" in zero["other_size"]["message"]


def test_zero_param_parallel_is_initialized_returns_real_bools(world):
    for value in _each(world, "standalone", "zero_initialized_before"):
        assert value is False
    for value in (z["initialized"] for z in _each(world, "standalone", "zero")):
        assert value is True
    for value in _each(world, "standalone", "after_reset", "zero_initialized"):
        assert value is False


def test_zero_param_getters_before_creation_say_what_to_call(world):
    for error in _each(world, "standalone", "zero_uninitialized_getter"):
        assert error["type"] == "BridgeError" and "_create_zero_param_parallel_group" in error["message"]


def test_local_all_to_all_group_reads_local_world_size(world):
    assert _each(world, "standalone", "all_to_all") == [
        {"local_0": ([0, 1], 1), "global_0": ([0, 2], 2)},
        {"local_0": ([0, 1], 1), "global_1": ([1, 3], 4)},
        {"local_1": ([2, 3], 5), "global_0": ([0, 2], 2)},
        {"local_1": ([2, 3], 5), "global_1": ([1, 3], 4)},
    ]


def test_reset_destroys_the_groups_and_starts_a_new_bridge(world):
    assert _each(world, "standalone", "get_bridge_is_stable") == [True] * 4
    for after in _each(world, "standalone", "after_reset"):
        assert after["old_groups_destroyed"] and after["new_bridge"]
        assert after["max_size"] is None
        assert after["expert_model_parallel_world_size"] == 1
        assert after["ep2"]["type"] == "BridgeError"


# ---------------------------------------------------------------------------------------
# Over megatron-core (tp 2)
# ---------------------------------------------------------------------------------------


@needs_megatron
def test_expert_data_and_model_parallel_with_megatron_core_is_e_m_d(world):
    ep2 = _each(world, "megatron", "ep2")
    assert [e["ep_ranks"] for e in ep2] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [e["edp_ranks"] for e in ep2] == [[0], [1], [2], [3]]
    assert [e["ep_sum"] for e in ep2] == [2, 4, 2, 4]
    assert {e["expert_model_parallel_world_size"] for e in ep2} == {2}


@needs_megatron
def test_expert_parallel_src_rank_is_right_for_strided_groups(world):
    ep2 = _each(world, "megatron", "ep2")
    assert [e["ep_src_rank"] for e in ep2] == [0, 1, 0, 1]
    # DeepSpeed's (rank // size) * size gives [0, 0, 2, 2]: ranks 1 and 3 would name a
    # source outside their own expert group.
    deepspeed_formula = [(rank // 2) * 2 for rank in range(WORLD_SIZE)]
    assert [src in e["ep_ranks"] for src, e in zip(deepspeed_formula, ep2)] == [True, False, True, False]
    assert [e["expert_broadcast_src_rank"] for e in ep2] == [0, 1, 2, 3]


@needs_megatron
def test_dense_getters_answer_megatron_cores_groups(world):
    for dense in _each(world, "megatron", "dense"):
        assert dense["has_mpu"]
        assert dense["dp_ranks"] == dense["megatron_dp_ranks"]
        assert dense["dp_is_megatron"]
        assert dense["mp_world_size"] == 2


@needs_megatron
def test_an_mpu_of_other_sizes_than_the_default_bridge_needs_reset(world):
    for error in _each(world, "megatron", "other_sizes"):
        assert error["type"] == "BridgeError"
        assert "tp=2" in error["message"] and "tp=1" in error["message"] and "reset()" in error["message"]


@needs_megatron
def test_the_same_mpu_or_its_legacy_adapter_keeps_the_bridge(world):
    assert _each(world, "megatron", "same_mpu_keeps_the_bridge") == [True] * 4


@needs_megatron
def test_one_expert_size_with_another_layout_is_a_bridge_error(world):
    for error in _each(world, "megatron", "other_layout_same_size"):
        assert error["type"] == "BridgeError" and "ep_size_2" in error["message"]


# ---------------------------------------------------------------------------------------
# No processes needed
# ---------------------------------------------------------------------------------------


def test_initialize_is_refused_and_says_what_to_call_instead():
    with pytest.raises(BridgeError, match="_create_expert_and_data_parallel"):
        deepspeed_groups.initialize(ep_size=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mp_size=2, mp_mode="tp"), "mp_size=2 with mp_mode='tp'"),
        (dict(mp_mode="pp"), "mp_mode must be 'tp' or 'sp'"),
        (dict(folding_spec=object()), "folding_spec"),
    ],
)
def test_unsupported_deepspeed_paths_are_refused_before_touching_any_group(kwargs, match):
    with pytest.raises(BridgeError, match=match):
        deepspeed_groups._create_expert_and_data_parallel(2, **kwargs)


def _deepspeed_groups_functions() -> Dict[str, List[str]]:
    """Function name -> parameter names, from the installed DeepSpeed's groups.py source."""
    spec = importlib.util.find_spec("deepspeed")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent / "utils" / "groups.py"
    tree = ast.parse(source.read_text())
    return {
        node.name: [a.arg for a in node.args.args]
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
    }


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_every_deepspeed_name_exists_in_deepspeed_with_the_same_parameters():
    theirs = _deepspeed_groups_functions()
    ours_only = {"set_mpu", "reset", "get_bridge"}
    for name in deepspeed_groups.__all__:
        if name in ours_only:
            continue
        assert name in theirs, f"{name} is not a deepspeed.utils.groups function"
        ours = list(inspect.signature(getattr(deepspeed_groups, name)).parameters)
        assert ours[: len(theirs[name])] == theirs[name], name
