"""The bridge over the REAL megatron-core ``parallel_state``, in worlds of local gloo processes.

Two spawned worlds (4 and 8 ranks; importing torch and megatron-core is most of
their cost). In each, every rank runs megatron-core's own
``initialize_model_parallel`` for several layouts in sequence, attaches a bridge,
records what it observes as plain data, closes the bridge and calls
``destroy_model_parallel``. The tests below each read one observation.

What is specified here:

* every dense query returns megatron-core's own group object, with its ranks,
  marked ``borrowed``, and attaching creates no process group at all: counted by
  ``bridge.stats()`` and by PyTorch's own group table (``_world.pg_map``);
* ``expert_groups(ep)`` with megatron-core's own ``ep`` reuses its groups (created
  stays 0); a different size creates one group per partition (2) only where no
  group of megatron-core has the rank set;
* expert and hpZ rank lists, written out for small worlds; source ranks of strided
  groups; ``close()`` / ``with``; the legacy MPU surface over megatron-core.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest

from _megatron import initialize_megatron, megatron_parallel_state
from _multiproc import run_ranks
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
# Seconds the ranks wait for each other before creating groups (a shared, loaded machine
# can skew them by many seconds).
AGREEMENT_TIMEOUT_S = 120
DATA_BEFORE_EXPERT = "tp-cp-dp-ep-pp"
DENSE_QUERIES = (
    "tensor_parallel",
    "pipeline_parallel",
    "data_parallel",
    "sequence_parallel",
    "sequence_data_parallel",
    "model_parallel",
)

# name -> megatron-core sizes, plus "other": a second expert request (ep, keyword
# arguments) of a size or layout megatron-core did not build.
LAYOUTS_4: Dict[str, Dict[str, Any]] = {
    "tp2": dict(tp=2, other=(2, {})),
    "pp2": dict(pp=2, other=(2, {})),
    "cp2": dict(cp=2, other=(4, {})),
    "tp2_ep2": dict(tp=2, ep=2),
    "ep4": dict(ep=4, other=(2, {})),
    "tp2_ep2_etp1": dict(tp=2, ep=2, etp=1, other=(4, {})),
    "ep2_dp_before_ep": dict(ep=2, order=DATA_BEFORE_EXPERT),
}
LAYOUTS_8: Dict[str, Dict[str, Any]] = {
    "tp2_pp2_ep2": dict(tp=2, pp=2, ep=2),
    "tp2_cp2_ep2": dict(tp=2, cp=2, ep=2, other=(4, {"expert_tensor_parallel": False})),
    "tp2_ep2_dp_before_ep": dict(tp=2, ep=2, order=DATA_BEFORE_EXPERT),
    "tp2": dict(tp=2, other=(4, {"expert_tensor_parallel": False})),
}
WITH_EP = [name for name, spec in LAYOUTS_4.items() if spec.get("ep", 1) > 1]
WITH_EP_8 = [name for name, spec in LAYOUTS_8.items() if spec.get("ep", 1) > 1]

# ---------------------------------------------------------------------------------------
# Inside the rank processes (module level: run_ranks pickles functions by reference)
# ---------------------------------------------------------------------------------------






def _pg_count() -> int:
    """How many process groups this process holds, by PyTorch's own table."""
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _sum_of_ranks(group: Any) -> int:
    """All-reduce of the global rank over ``group``: the sum of its members' ranks."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _ranks(group: Any) -> Tuple[int, ...]:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group))


def _megatron_dense_groups(ps: Any, cp: int) -> Dict[str, Any]:
    """megatron-core's own group for each dense query of the bridge."""
    return {
        "tensor_parallel": ps.get_tensor_model_parallel_group(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_group(),
        "data_parallel": ps.get_data_parallel_group(),
        "sequence_parallel": ps.get_context_parallel_group(),
        # DP x CP when context parallelism is on, else the data-parallel group itself.
        "sequence_data_parallel": (
            ps.get_data_parallel_group(with_context_parallel=True) if cp > 1 else ps.get_data_parallel_group()
        ),
        "model_parallel": ps.get_model_parallel_group(),
    }


def _expert_observation(
    bridge: Any, ps: Any, existing: List[Any], ep: int, kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    created_before, pgs_before = bridge.stats()["created"], _pg_count()
    groups = bridge.expert_groups(ep, **kwargs)
    ep_info, edp_info = groups.expert_parallel, groups.expert_data_parallel
    return {
        "ep_ranks": ep_info.ranks,
        "edp_ranks": edp_info.ranks,
        "ep_torch_ranks": _ranks(ep_info.group),
        "edp_torch_ranks": _ranks(edp_info.group),
        "ep_src_rank": ep_info.src_rank,
        "ep_rank": ep_info.rank,
        "ep_borrowed": ep_info.borrowed,
        "edp_borrowed": edp_info.borrowed,
        "ep_is_megatron_ep": ep_info.group is ps.get_expert_model_parallel_group(),
        "edp_is_megatron_edp": edp_info.group is ps.get_expert_data_parallel_group(),
        "ep_is_megatron_group": any(ep_info.group is g for g in existing),
        "edp_is_megatron_group": any(edp_info.group is g for g in existing),
        "created": bridge.stats()["created"] - created_before,
        "pg_delta": _pg_count() - pgs_before,
        "ep_sum": _sum_of_ranks(ep_info.group),
        "edp_sum": _sum_of_ranks(edp_info.group),
        "same_object_again": bridge.expert_groups(ep, **kwargs) is groups,
        "megatron_ep_ranks": _ranks(ps.get_expert_model_parallel_group()),
        "megatron_edp_ranks": _ranks(ps.get_expert_data_parallel_group()),
    }


def _legacy_observation(bridge: Any, ps: Any) -> Dict[str, Any]:
    legacy = bridge.as_legacy_mpu()
    unknown = {}
    for name in ("get_no_such_thing", "get_data_parallel_world_sizes"):
        try:
            getattr(legacy, name)
            unknown[name] = "no error"
        except AttributeError as exc:
            unknown[name] = str(exc)
    obs: Dict[str, Any] = {
        "model_parallel_world_size": legacy.get_model_parallel_world_size(),
        "model_parallel_group_ranks": legacy.get_model_parallel_group_ranks(),
        "model_parallel_group_is_megatron": legacy.get_model_parallel_group() is ps.get_model_parallel_group(),
        "data_parallel_group_ranks": legacy.get_data_parallel_group_ranks(),
        "data_parallel_world_size": legacy.get_data_parallel_world_size(),
        "data_parallel_rank": legacy.get_data_parallel_rank(),
        "data_parallel_group_is_megatron": legacy.get_data_parallel_group() is ps.get_data_parallel_group(),
        "pipe_parallel_world_size": legacy.get_pipe_parallel_world_size(),
        "pipe_parallel_rank": legacy.get_pipe_parallel_rank(),
        "pipe_parallel_group_is_megatron": legacy.get_pipe_parallel_group()
        is ps.get_pipeline_model_parallel_group(),
        "slice_parallel_world_size": legacy.get_slice_parallel_world_size(),
        "slice_parallel_rank": legacy.get_slice_parallel_rank(),
        "slice_parallel_group_is_megatron": legacy.get_slice_parallel_group()
        is ps.get_tensor_model_parallel_group(),
        "tensor_model_parallel_world_size": legacy.get_tensor_model_parallel_world_size(),
        "megatron": {
            "tp": (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
            "pp": (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()),
            "dp": (
                ps.get_data_parallel_world_size(),
                ps.get_data_parallel_rank(),
                list(_ranks(ps.get_data_parallel_group())),
            ),
            "mp": list(_ranks(ps.get_model_parallel_group())),
        },
        "unknown": unknown,
        "has_initialize_sequence_parallel": hasattr(legacy, "initialize_sequence_parallel"),
        "has_sequence_parallel": hasattr(legacy, "get_sequence_parallel_world_size"),
    }
    if obs["has_sequence_parallel"]:
        obs["sequence_parallel_world_size"] = legacy.get_sequence_parallel_world_size()
        obs["sequence_parallel_group_ranks"] = legacy.get_sequence_parallel_group_ranks()
        obs["sequence_data_parallel_world_size"] = legacy.get_sequence_data_parallel_world_size()
        obs["sequence_data_parallel_group_is_megatron"] = (
            legacy.get_sequence_data_parallel_group() is ps.get_data_parallel_group(with_context_parallel=True)
        )
    return obs


def _zero_observation(bridge: Any) -> Dict[str, Any]:
    created_before, pgs_before = bridge.stats()["created"], _pg_count()
    two = bridge.zero_param_groups(2)
    clamped = bridge.zero_param_groups(8)
    return {
        "two": two.ranks,
        "two_sum": _sum_of_ranks(two.group),
        "two_again_same": bridge.zero_param_groups(2) is two,
        "clamped": clamped.ranks,
        "created": bridge.stats()["created"] - created_before,
        "pg_delta": _pg_count() - pgs_before,
    }


def _close_observation(bridge: Any, ps: Any, attach: Any) -> Dict[str, Any]:
    """Close a bridge that created groups; check megatron-core's still work; then ``with``."""
    from torch.distributed import distributed_c10d as c10d

    from mpu_bridge.errors import BridgeError

    created_groups = [bridge.get_expert_groups(name) for name in bridge.expert_group_names()]
    created = [
        info.group
        for groups in created_groups
        for info in (groups.expert_parallel, groups.expert_data_parallel)
        if not info.borrowed
    ]
    pgs_before = _pg_count()
    bridge.close()
    obs: Dict[str, Any] = {
        "created_alive_after_close": [g in c10d._world.pg_map for g in created],
        "pg_delta_close": _pg_count() - pgs_before,
        "live_after_close": bridge.stats()["live"],
        "megatron_sums_after_close": {
            "tp": _sum_of_ranks(ps.get_tensor_model_parallel_group()),
            "dp": _sum_of_ranks(ps.get_data_parallel_group()),
            "ep": _sum_of_ranks(ps.get_expert_model_parallel_group()),
            "edp": _sum_of_ranks(ps.get_expert_data_parallel_group()),
        },
        "world_sum_after_close": _sum_of_ranks(None),
    }
    for name, call in (
        ("expert_groups", lambda: bridge.expert_groups(2)),
        ("tensor_parallel", lambda: bridge.tensor_parallel()),
    ):
        try:
            call()
            obs[f"closed_{name}"] = "no error"
        except BridgeError as exc:
            obs[f"closed_{name}"] = str(exc)
    pgs_before = _pg_count()
    with attach(ps, agreement_timeout=AGREEMENT_TIMEOUT_S) as scoped:
        groups = scoped.expert_groups(2)
        obs["with_created"] = scoped.stats()["created"]
        obs["with_pg_delta"] = _pg_count() - pgs_before
        obs["with_sum"] = _sum_of_ranks(groups.expert_parallel.group)
    obs["with_pg_delta_after"] = _pg_count() - pgs_before
    obs["with_alive_after"] = groups.expert_parallel.group in c10d._world.pg_map
    try:
        scoped.expert_groups(2)
        obs["with_closed"] = "no error"
    except BridgeError as exc:
        obs["with_closed"] = str(exc)
    return obs


def _observe_layout(ps: Any, spec: Dict[str, Any], extras: Tuple[str, ...]) -> Dict[str, Any]:
    from torch.distributed import distributed_c10d as c10d

    from mpu_bridge import attach

    existing = list(c10d._world.pg_map)  # megatron-core's groups (and the world)
    pgs_before = _pg_count()
    bridge = attach(ps, agreement_timeout=AGREEMENT_TIMEOUT_S)
    megatron = _megatron_dense_groups(ps, spec.get("cp", 1))
    obs: Dict[str, Any] = {"order": bridge.layout.config.order, "dense": {}}
    for query in DENSE_QUERIES:
        info = getattr(bridge, query)()
        obs["dense"][query] = {
            "ranks": info.ranks,
            "rank": info.rank,
            "borrowed": info.borrowed,
            "is_megatron": info.group is megatron[query],
            "megatron_ranks": _ranks(megatron[query]),
        }
    obs["created_dense"] = bridge.stats()["created"]
    obs["pg_delta_dense"] = _pg_count() - pgs_before
    ep = spec.get("ep", 1)
    if ep > 1:
        obs["same_ep"] = _expert_observation(bridge, ps, existing, ep, {})
    if "other" in spec:
        other_ep, kwargs = spec["other"]
        obs["other_ep"] = _expert_observation(bridge, ps, existing, other_ep, kwargs)
    if "legacy" in extras:
        obs["legacy"] = _legacy_observation(bridge, ps)
    if "zero" in extras:
        obs["zero"] = _zero_observation(bridge)
    if "data_before_expert" in extras:
        with attach(ps, agreement_timeout=AGREEMENT_TIMEOUT_S) as second:
            obs["data_before_expert"] = _expert_observation(
                second, ps, existing, spec["ep"], {"data_before_expert": True}
            )
    obs["created_total"] = bridge.stats()["created"]
    obs["pg_delta_total"] = _pg_count() - pgs_before
    if "close" in extras:
        obs["close"] = _close_observation(bridge, ps, attach)
    else:
        bridge.close()
    obs["pg_delta_after_close"] = _pg_count() - pgs_before
    return obs


def _megatron_world(
    rank: int, world_size: int, layouts: Dict[str, Dict[str, Any]], extras: Dict[str, Tuple[str, ...]]
) -> Dict[str, Any]:
    ps = megatron_parallel_state()
    out: Dict[str, Any] = {}
    for name, spec in layouts.items():
        initialize_megatron(ps, **spec)
        try:
            out[name] = _observe_layout(ps, spec, extras.get(name, ()))
        finally:
            ps.destroy_model_parallel()
    return out


EXTRAS_4 = {
    "ep4": ("close",),
    "cp2": ("legacy",),
    "tp2": ("legacy",),
    "ep2_dp_before_ep": ("data_before_expert",),
}
EXTRAS_8 = {"tp2_pp2_ep2": ("legacy",), "tp2_cp2_ep2": ("legacy",), "tp2_ep2_dp_before_ep": ("zero",)}


@pytest.fixture(scope="module")
def world4() -> List[Dict[str, Any]]:
    return run_ranks(_megatron_world, 4, LAYOUTS_4, EXTRAS_4, timeout=480)


@pytest.fixture(scope="module")
def world8() -> List[Dict[str, Any]]:
    return run_ranks(_megatron_world, 8, LAYOUTS_8, EXTRAS_8, timeout=600)


def _per_rank(world: List[Dict[str, Any]], layout: str, *path: str) -> Dict[int, Any]:
    out = {}
    for rank, observed in enumerate(world):
        value = observed[layout]
        for key in path:
            value = value[key]
        out[rank] = value
    return out


# ---------------------------------------------------------------------------------------
# Dense queries: megatron-core's own groups, nothing created
# ---------------------------------------------------------------------------------------


ALL_LAYOUTS = [("world4", name) for name in LAYOUTS_4] + [("world8", name) for name in LAYOUTS_8]


@pytest.mark.parametrize("world_name, layout", ALL_LAYOUTS)
def test_dense_queries_return_megatron_core_groups(request, world_name, layout):
    world = request.getfixturevalue(world_name)
    for rank, dense in _per_rank(world, layout, "dense").items():
        assert sorted(dense) == sorted(DENSE_QUERIES)
        for query, answer in dense.items():
            assert answer["is_megatron"], (layout, rank, query)
            assert answer["borrowed"], (layout, rank, query)
            assert answer["ranks"] == answer["megatron_ranks"], (layout, rank, query)
            assert answer["ranks"][answer["rank"]] == rank, (layout, rank, query)


def test_dense_ranks_written_out_for_tp2_cp2_on_8_ranks(world8):
    dense = _per_rank(world8, "tp2_cp2_ep2", "dense")
    assert [dense[r]["tensor_parallel"]["ranks"] for r in range(8)] == [
        (0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5), (6, 7), (6, 7)
    ]
    assert [dense[r]["sequence_parallel"]["ranks"] for r in range(8)] == [
        (0, 2), (1, 3), (0, 2), (1, 3), (4, 6), (5, 7), (4, 6), (5, 7)
    ]
    assert [dense[r]["data_parallel"]["ranks"] for r in range(8)] == [
        (0, 4), (1, 5), (2, 6), (3, 7), (0, 4), (1, 5), (2, 6), (3, 7)
    ]
    assert [dense[r]["sequence_data_parallel"]["ranks"] for r in range(8)] == [(0, 2, 4, 6), (1, 3, 5, 7)] * 4


@pytest.mark.parametrize("world_name, layout", ALL_LAYOUTS)
def test_attaching_and_every_dense_query_create_no_process_group(request, world_name, layout):
    world = request.getfixturevalue(world_name)
    assert set(_per_rank(world, layout, "created_dense").values()) == {0}
    assert set(_per_rank(world, layout, "pg_delta_dense").values()) == {0}


@pytest.mark.parametrize("world_name, layout", ALL_LAYOUTS)
def test_groups_created_by_the_bridge_are_exactly_the_new_groups_torch_holds(request, world_name, layout):
    world = request.getfixturevalue(world_name)
    for rank, observed in enumerate(world):
        assert observed[layout]["created_total"] == observed[layout]["pg_delta_total"], (layout, rank)


def test_the_order_of_megatron_core_is_inferred_from_its_groups(world4, world8):
    assert set(_per_rank(world4, "ep2_dp_before_ep", "order").values()) == {DATA_BEFORE_EXPERT}
    assert set(_per_rank(world8, "tp2_ep2_dp_before_ep", "order").values()) == {DATA_BEFORE_EXPERT}
    assert set(_per_rank(world4, "tp2_ep2", "order").values()) == {DEFAULT_ORDER}


# ---------------------------------------------------------------------------------------
# Expert groups: megatron-core's own ep size is reused, another one is created
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world_name, layout", [("world4", name) for name in WITH_EP] + [("world8", name) for name in WITH_EP_8]
)
def test_expert_groups_of_megatron_cores_ep_size_reuse_its_groups(request, world_name, layout):
    world = request.getfixturevalue(world_name)
    for rank, same in _per_rank(world, layout, "same_ep").items():
        assert same["created"] == 0 and same["pg_delta"] == 0, (layout, rank)
        assert same["ep_ranks"] == same["megatron_ep_ranks"], (layout, rank)
        assert same["edp_ranks"] == same["megatron_edp_ranks"], (layout, rank)
        assert same["ep_is_megatron_group"] and same["edp_is_megatron_group"], (layout, rank)
        assert same["ep_borrowed"] and same["edp_borrowed"], (layout, rank)
        assert same["same_object_again"], (layout, rank)


@pytest.mark.parametrize(
    "world_name, layout",
    [
        ("world4", "tp2_ep2"),  # EP [0, 2] is also the DP group
        ("world4", "ep4"),  # EP [0..3] is also the DP group
        ("world4", "tp2_ep2_etp1"),  # EP [0, 1] is also the TP group
        ("world4", "ep2_dp_before_ep"),  # EP [0, 2]: no dense group has these ranks
        ("world8", "tp2_pp2_ep2"),
        ("world8", "tp2_cp2_ep2"),
        ("world8", "tp2_ep2_dp_before_ep"),
    ],
)
def test_reused_expert_groups_are_megatron_cores_expert_group_objects(request, world_name, layout):
    world = request.getfixturevalue(world_name)
    for rank, same in _per_rank(world, layout, "same_ep").items():
        assert same["ep_is_megatron_ep"], (layout, rank)
        assert same["edp_is_megatron_edp"], (layout, rank)


def test_expert_ranks_written_out_for_tp2_ep2_on_4_ranks(world4):
    same = _per_rank(world4, "tp2_ep2", "same_ep")
    # expert-TP = TP = 2: EP joins the same tensor lane of the two tensor groups.
    assert [same[r]["ep_ranks"] for r in range(4)] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [same[r]["edp_ranks"] for r in range(4)] == [(0,), (1,), (2,), (3,)]


def test_expert_ranks_written_out_for_data_before_expert_on_4_ranks(world4):
    same = _per_rank(world4, "ep2_dp_before_ep", "same_ep")
    assert [same[r]["ep_ranks"] for r in range(4)] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [same[r]["edp_ranks"] for r in range(4)] == [(0, 1), (0, 1), (2, 3), (2, 3)]


def test_data_before_expert_on_a_data_before_expert_mpu_is_its_own_layout(world4):
    # megatron-core's order tp-cp-dp-ep-pp is DeepSpeed's D + E layout (DESIGN.md), so
    # asking for D + E must give megatron-core's expert groups, creating nothing.
    dbe = _per_rank(world4, "ep2_dp_before_ep", "data_before_expert")
    assert [dbe[r]["ep_ranks"] for r in range(4)] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [dbe[r]["edp_ranks"] for r in range(4)] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert {(d["created"], d["pg_delta"]) for d in dbe.values()} == {(0, 0)}


def test_a_different_ep_size_creates_one_group_per_partition(world4):
    other = _per_rank(world4, "ep4", "other_ep")  # megatron-core built ep 4; the bridge asks for 2
    assert [other[r]["ep_ranks"] for r in range(4)] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [other[r]["edp_ranks"] for r in range(4)] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    for rank in range(4):
        assert other[rank]["created"] == 2 and other[rank]["pg_delta"] == 2, rank
        assert not other[rank]["ep_borrowed"] and not other[rank]["edp_borrowed"], rank
        assert not other[rank]["ep_is_megatron_group"] and not other[rank]["edp_is_megatron_group"], rank


def test_a_different_ep_size_creates_one_group_per_partition_on_8_ranks(world8):
    # megatron-core: tp 2, dp 4, no experts; the bridge asks for ep 4 with expert-TP 1.
    other = _per_rank(world8, "tp2", "other_ep")
    assert [other[r]["ep_ranks"] for r in range(8)] == [(0, 1, 2, 3)] * 4 + [(4, 5, 6, 7)] * 4
    assert [other[r]["edp_ranks"] for r in range(8)] == [(0, 4), (1, 5), (2, 6), (3, 7)] * 2
    for rank in range(8):
        assert other[rank]["created"] == 2 and other[rank]["pg_delta"] == 2, rank
        assert other[rank]["ep_sum"] == sum(other[rank]["ep_ranks"]), rank
        assert other[rank]["edp_sum"] == sum(other[rank]["edp_ranks"]), rank


def test_created_expert_groups_reduce_over_exactly_their_members(world4):
    other = _per_rank(world4, "ep4", "other_ep")
    for rank in range(4):
        assert other[rank]["ep_torch_ranks"] == other[rank]["ep_ranks"]
        assert other[rank]["edp_torch_ranks"] == other[rank]["edp_ranks"]
        assert other[rank]["ep_sum"] == sum(other[rank]["ep_ranks"])
        assert other[rank]["edp_sum"] == sum(other[rank]["edp_ranks"])


@pytest.mark.parametrize(
    "world_name, layout, ep_ranks_of_rank_0",
    [
        ("world4", "tp2", (0, 2)),  # ep 2, expert-TP 2: megatron-core's DP group
        ("world4", "pp2", (0, 1)),  # ep 2 inside a stage: megatron-core's DP group
        ("world4", "cp2", (0, 1, 2, 3)),  # ep 4: megatron-core's DP x CP group
        ("world8", "tp2_cp2_ep2", (0, 1, 2, 3)),  # ep 4, expert-TP 1: megatron-core's TP x CP group
    ],
)
def test_a_different_ep_size_creates_nothing_when_megatron_core_has_the_rank_sets(
    request, world_name, layout, ep_ranks_of_rank_0
):
    world = request.getfixturevalue(world_name)
    other = _per_rank(world, layout, "other_ep")
    assert other[0]["ep_ranks"] == ep_ranks_of_rank_0
    for rank, observed in other.items():
        assert observed["created"] == 0 and observed["pg_delta"] == 0, (layout, rank)
        assert observed["ep_is_megatron_group"] and observed["edp_is_megatron_group"], (layout, rank)
        assert observed["ep_sum"] == sum(observed["ep_ranks"]), (layout, rank)


@pytest.mark.parametrize(
    "world_name, layout",
    [
        ("world4", "tp2_ep2_etp1"),  # ep 4 = megatron-core's TP x DP group [0..3]
        ("world8", "tp2_cp2_ep2"),  # ep 4, expert-TP 1 = megatron-core's TP x CP group [0..3]
    ],
)
def test_an_expert_group_reused_from_a_combined_megatron_group_is_marked_borrowed(request, world_name, layout):
    world = request.getfixturevalue(world_name)
    for rank, observed in _per_rank(world, layout, "other_ep").items():
        assert observed["ep_is_megatron_group"], (layout, rank)
        assert observed["ep_borrowed"], (layout, rank)


def test_source_rank_of_a_strided_expert_group_is_its_first_member(world4):
    same = _per_rank(world4, "tp2_ep2", "same_ep")
    assert same[3]["ep_ranks"] == (1, 3)
    assert same[3]["ep_src_rank"] == 1
    assert [same[r]["ep_src_rank"] for r in range(4)] == [0, 1, 0, 1]
    # DeepSpeed's _get_expert_parallel_src_rank: (rank // ep_world_size) * ep_world_size,
    # which names rank 2 for rank 3, a rank outside its expert group [1, 3].
    deepspeed_formula = (3 // 2) * 2
    assert deepspeed_formula == 2 and deepspeed_formula not in same[3]["ep_ranks"]


# ---------------------------------------------------------------------------------------
# hpZ with tensor parallelism
# ---------------------------------------------------------------------------------------


def test_zero_param_groups_are_blocks_of_the_data_parallel_group_with_tp2(world8):
    zero = _per_rank(world8, "tp2_ep2_dp_before_ep", "zero")  # tp 2, dp 4: dp groups [0,2,4,6], [1,3,5,7]
    assert [zero[r]["two"] for r in range(8)] == [
        (0, 2), (1, 3), (0, 2), (1, 3), (4, 6), (5, 7), (4, 6), (5, 7)
    ]
    for rank in range(8):
        assert zero[rank]["two_sum"] == sum(zero[rank]["two"])
        assert zero[rank]["two_again_same"]


def test_zero_param_group_size_is_clamped_to_the_data_parallel_size_with_tp2(world8):
    zero = _per_rank(world8, "tp2_ep2_dp_before_ep", "zero")
    assert [zero[r]["clamped"] for r in range(8)] == [(0, 2, 4, 6), (1, 3, 5, 7)] * 4


def test_zero_param_groups_with_tp2_reuse_megatron_cores_groups(world8):
    # Blocks [0, 2] are megatron-core's EDP groups there, [0, 2, 4, 6] its DP groups.
    zero = _per_rank(world8, "tp2_ep2_dp_before_ep", "zero")
    assert {(z["created"], z["pg_delta"]) for z in zero.values()} == {(0, 0)}


# ---------------------------------------------------------------------------------------
# close() and with
# ---------------------------------------------------------------------------------------


def test_close_destroys_the_groups_the_bridge_created(world4):
    for rank, close in _per_rank(world4, "ep4", "close").items():
        assert close["created_alive_after_close"] == [False, False], rank
        assert close["pg_delta_close"] == -2, rank
        assert close["live_after_close"] == 0, rank


def test_megatron_core_groups_still_work_after_close(world4):
    for rank, close in _per_rank(world4, "ep4", "close").items():
        # ep 4 on 4 ranks: TP and EDP are single ranks, DP and EP the whole world.
        assert close["megatron_sums_after_close"] == {"tp": rank, "dp": 6, "ep": 6, "edp": rank}, rank
        assert close["world_sum_after_close"] == 6


def test_every_layout_leaves_torch_with_the_groups_it_had(world4, world8):
    for world, layouts in ((world4, LAYOUTS_4), (world8, LAYOUTS_8)):
        for name in layouts:
            assert set(_per_rank(world, name, "pg_delta_after_close").values()) == {0}, name


def test_a_closed_bridge_refuses_new_groups(world4):
    for close in _per_rank(world4, "ep4", "close").values():
        assert "closed" in close["closed_expert_groups"]


def test_a_closed_bridge_refuses_dense_queries_too(world4):
    for close in _per_rank(world4, "ep4", "close").values():
        assert "closed" in close["closed_tensor_parallel"]


def test_with_attach_closes_the_bridge_on_exit(world4):
    for rank, close in _per_rank(world4, "ep4", "close").items():
        assert close["with_created"] == 2 and close["with_pg_delta"] == 2, rank
        assert close["with_sum"] == (1 if rank < 2 else 5), rank
        assert close["with_pg_delta_after"] == 0 and not close["with_alive_after"], rank
        assert "closed" in close["with_closed"], rank


# ---------------------------------------------------------------------------------------
# The legacy MPU over megatron-core
# ---------------------------------------------------------------------------------------


def test_legacy_model_parallel_is_tensor_times_pipeline(world8):
    legacy = _per_rank(world8, "tp2_pp2_ep2", "legacy")
    for rank, observed in legacy.items():
        assert observed["model_parallel_world_size"] == 4, rank  # tp 2 x pp 2
        assert observed["model_parallel_group_ranks"] == observed["megatron"]["mp"], rank
        assert observed["model_parallel_group_is_megatron"], rank
    assert legacy[5]["model_parallel_group_ranks"] == [0, 1, 4, 5]


def test_legacy_data_parallel_getters_answer_megatron_cores_group(world8):
    legacy = _per_rank(world8, "tp2_pp2_ep2", "legacy")
    for rank, observed in legacy.items():
        size, dp_rank, ranks = observed["megatron"]["dp"]
        assert observed["data_parallel_group_ranks"] == ranks, rank
        assert (observed["data_parallel_world_size"], observed["data_parallel_rank"]) == (size, dp_rank), rank
        assert observed["data_parallel_group_is_megatron"], rank
    assert [legacy[r]["data_parallel_group_ranks"] for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_legacy_pipe_and_slice_getters_are_pipeline_and_tensor_parallelism(world8):
    for rank, observed in _per_rank(world8, "tp2_pp2_ep2", "legacy").items():
        assert (observed["pipe_parallel_world_size"], observed["pipe_parallel_rank"]) == observed["megatron"]["pp"]
        assert (observed["slice_parallel_world_size"], observed["slice_parallel_rank"]) == observed["megatron"]["tp"]
        assert observed["pipe_parallel_group_is_megatron"] and observed["slice_parallel_group_is_megatron"], rank
        assert observed["tensor_model_parallel_world_size"] == 2, rank


def test_legacy_mpu_raises_attribute_error_for_names_it_does_not_offer(world8):
    for observed in _per_rank(world8, "tp2_pp2_ep2", "legacy").values():
        for name, message in observed["unknown"].items():
            assert name in message and "offers" in message, message


def test_legacy_mpu_never_offers_initialize_sequence_parallel(world4, world8):
    assert not any(_per_rank(world4, "cp2", "legacy", "has_initialize_sequence_parallel").values())
    assert not any(_per_rank(world8, "tp2_pp2_ep2", "legacy", "has_initialize_sequence_parallel").values())


def test_legacy_sequence_getters_are_absent_without_context_parallelism(world4, world8):
    assert not any(_per_rank(world4, "tp2", "legacy", "has_sequence_parallel").values())
    assert not any(_per_rank(world8, "tp2_pp2_ep2", "legacy", "has_sequence_parallel").values())


def test_legacy_sequence_getters_are_context_parallelism_when_cp_is_2(world4, world8):
    legacy4 = _per_rank(world4, "cp2", "legacy")
    assert all(observed["has_sequence_parallel"] for observed in legacy4.values())
    assert [legacy4[r]["sequence_parallel_group_ranks"] for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert {observed["sequence_data_parallel_world_size"] for observed in legacy4.values()} == {4}
    legacy8 = _per_rank(world8, "tp2_cp2_ep2", "legacy")
    for rank, observed in legacy8.items():
        assert observed["sequence_parallel_world_size"] == 2, rank
        assert observed["sequence_data_parallel_world_size"] == 4, rank  # dp 2 x cp 2
        assert observed["sequence_data_parallel_group_is_megatron"], rank


# ---------------------------------------------------------------------------------------
# The world clone
# ---------------------------------------------------------------------------------------


def _world_over_megatron(rank: int, world_size: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge

    ps = megatron_parallel_state()
    initialize_megatron(ps, pp=2)  # pp 2 x dp 2: no dense group spans the 4 ranks
    bridge = mpu_bridge.attach(ps)
    pgs_before = _pg_count()
    world = bridge.world()
    observed = {
        "ranks": world.ranks,
        "created": bridge.stats()["created"],
        "pg_delta": _pg_count() - pgs_before,
        "is_default_group": world.group is dist.group.WORLD,
        "sum": _sum_of_ranks(world.group),
    }
    bridge.close()
    ps.destroy_model_parallel()
    return observed


def test_world_over_megatron_core_is_the_default_group_and_creates_nothing():
    for rank, observed in enumerate(run_ranks(_world_over_megatron, 4, timeout=300)):
        assert observed["ranks"] == (0, 1, 2, 3), rank
        assert (observed["created"], observed["pg_delta"]) == (0, 0), rank
        assert observed["is_default_group"], rank
        assert observed["sum"] == 6, rank
