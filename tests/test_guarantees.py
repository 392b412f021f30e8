"""The guarantees, tried as a hostile user would, on real gloo ranks and real megatron-core.

* **G1 members**: after the MPU is re-initialised, the bridge serves its new groups;
  when it cannot read the MPU again, it refuses every call with the reason (never the
  old layout) until it can.
* **G2 orders**: any rank order megatron-core accepts is inferred from the MPU's own
  groups: 36 cases with 34 different orders at 8 ranks, cp > 1 and ep > 1 among them,
  each rank simulated with torch's ``fake`` backend (megatron-core's real code creates
  real group objects; only the communication is simulated), plus one real gloo world above.
* **G3 no hang / G4 recovery**: ranks that ask for different things -- other sizes,
  other methods (even when every group could be reused), another order of calls, a
  skipped or an extra call, a slow rank, a dead rank -- get an error on every
  participating rank within the agreement timeout; after a barrier, identical calls
  work again, on the same bridge and on a new one.

Each scenario runs in one world of local processes; its assertions follow it.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import time
from typing import Any, Callable, Dict, List, Tuple

import pytest

from _megatron import initialize_megatron, megatron_parallel_state
from _multiproc import run_ranks
from mpu_bridge.errors import LayoutError
from mpu_bridge.layout import plan
from mpu_bridge.optional import is_available

needs_megatron = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)
pytestmark = needs_megatron

WORLD = 4
#: How long ranks wait for each other in the fault scenarios (attach(agreement_timeout=...)).
T = 3.0
#: An error must arrive within the agreement timeout plus this (process scheduling on a
#: loaded 2-core machine); a hang would take the whole world's deadline.
SLACK = 12.0
DEADLINE = 600.0


# ---------------------------------------------------------------------------------------
# Helpers used inside the rank processes
# ---------------------------------------------------------------------------------------


def _timed(call: Callable[[], Any]) -> Dict[str, Any]:
    """What ``call()`` did and how long it took: error type and message, or the value."""
    start = time.monotonic()
    try:
        value = call()
    except Exception as exc:  # the type and message are what the tests read
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "value": value, "seconds": time.monotonic() - start}


def _sum(group: Any) -> int:
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _align(name: str) -> None:
    """A barrier through the default store (a gloo barrier could pair with a stray collective)."""
    from torch.distributed import distributed_c10d as c10d

    store = c10d._get_default_store()
    if int(store.add(f"guarantees/{name}/arrived", 1)) == WORLD:
        store.set(f"guarantees/{name}/go", "1")
    store.wait([f"guarantees/{name}/go"], datetime.timedelta(seconds=DEADLINE))


# ---------------------------------------------------------------------------------------
# G1: re-initialised MPU, failed rebuild (issue 8, case 1)
# ---------------------------------------------------------------------------------------


def _reinit_world(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge

    ps = megatron_parallel_state()
    obs: Dict[str, Any] = {}
    initialize_megatron(ps, tp=2)
    bridge = mpu_bridge.attach(ps)
    obs["before"] = bridge.tensor_parallel().ranks
    ps.destroy_model_parallel()
    initialize_megatron(ps, tp=2, order="dp-tp-cp-ep-pp")
    tp, dp = bridge.tensor_parallel(), bridge.data_parallel()
    obs["after_tp"] = (tp.ranks, tp.borrowed, tp.group is ps.get_tensor_model_parallel_group())
    obs["after_dp"] = (dp.ranks, dp.group is ps.get_data_parallel_group())
    obs["after_sums"] = (_sum(tp.group), _sum(dp.group))

    # A bridge told the default order: after the MPU moves to another order it cannot
    # read the MPU, and must refuse every call, every time, until it can again.
    ps.destroy_model_parallel()
    initialize_megatron(ps, tp=2)
    forced = mpu_bridge.attach(ps, order="tp-cp-ep-dp-pp")
    ps.destroy_model_parallel()
    initialize_megatron(ps, tp=2, order="dp-tp-cp-ep-pp")
    obs["refused"] = [
        _timed(lambda: forced.tensor_parallel().ranks),
        _timed(lambda: forced.tensor_parallel().ranks),
        _timed(lambda: forced.data_parallel().ranks),
        _timed(lambda: forced.ranks("data_parallel")),
    ]
    ps.destroy_model_parallel()
    initialize_megatron(ps, tp=2)
    tp = forced.tensor_parallel()
    obs["readable_again"] = (tp.ranks, tp.group is ps.get_tensor_model_parallel_group())
    forced.close()
    bridge.close()
    ps.destroy_model_parallel()
    return obs


@pytest.fixture(scope="module")
def reinit() -> List[Dict[str, Any]]:
    return run_ranks(_reinit_world, WORLD, timeout=DEADLINE)


def test_before_reinitialisation_the_tensor_groups_are_the_default_orders(reinit):
    assert [o["before"] for o in reinit] == [(0, 1), (0, 1), (2, 3), (2, 3)]


def test_after_reinitialisation_with_another_order_the_new_tensor_groups_are_served(reinit):
    # order dp-tp-...: data parallel fastest, so tp pairs ranks 2 apart.
    assert [o["after_tp"] for o in reinit] == [
        ((0, 2), True, True), ((1, 3), True, True), ((0, 2), True, True), ((1, 3), True, True)
    ]


def test_after_reinitialisation_the_data_parallel_group_is_megatrons_new_one(reinit):
    assert [o["after_dp"] for o in reinit] == [((0, 1), True), ((0, 1), True), ((2, 3), True), ((2, 3), True)]


def test_after_reinitialisation_the_groups_sum_their_new_members(reinit):
    assert [o["after_sums"] for o in reinit] == [(2, 1), (4, 1), (2, 5), (4, 5)]


def test_a_failed_rebuild_refuses_every_call_with_the_reason(reinit):
    for o in reinit:
        assert [r["error"] for r in o["refused"]] == ["MpuError"] * 4
        for r in o["refused"]:
            assert "cannot read it" in r["message"] and "'tp-cp-ep-dp-pp'" in r["message"], r["message"]


def test_the_bridge_works_again_once_the_mpu_is_readable(reinit):
    assert [o["readable_again"] for o in reinit] == [((0, 1), True), ((0, 1), True), ((2, 3), True), ((2, 3), True)]


# ---------------------------------------------------------------------------------------
# G2: any accepted order is inferred (issue 8, case 2)
# ---------------------------------------------------------------------------------------

_SIZES = [
    dict(tp=2, pp=2),
    dict(tp=2, cp=2),
    dict(tp=2, ep=2),
    dict(cp=2, ep=2),
    dict(tp=2, cp=2, ep=2),
    dict(pp=2, ep=2),
    dict(ep=4),
    dict(cp=2, ep=4),
    dict(tp=2, cp=2, pp=2),
    dict(tp=2, pp=2, ep=2),
]


def _accepted_orders(count_per_size: int = 4) -> List[Tuple[Dict[str, int], str]]:
    """Up to ``count_per_size`` accepted orders per size set, each giving another layout,
    preferring order strings not chosen yet (the planner accepts what megatron-core does)."""
    chosen: List[Tuple[Dict[str, int], str]] = []
    used: set = set()
    for sizes in _SIZES:
        by_layout: Dict[Any, List[str]] = {}
        for tokens in itertools.permutations(("tp", "cp", "ep", "dp", "pp")):
            order = "-".join(tokens)
            try:
                layout = plan(8, order=order, **sizes)
            except LayoutError:
                continue
            key = tuple(tuple(map(tuple, layout.groups(k))) for k in layout.kinds)
            by_layout.setdefault(key, []).append(order)
        for candidates in list(by_layout.values())[:count_per_size]:
            order = next((o for o in candidates if o not in used), candidates[0])
            used.add(order)
            chosen.append((sizes, order))
    return chosen


ORDERS = _accepted_orders()


def _orders_seen_by(rank: int, cases: List[Tuple[Dict[str, int], str]]) -> List[Dict[str, Any]]:
    """Rank ``rank`` of an 8-rank ``fake`` world: megatron-core initialised with each case
    (real code; only the communication is simulated), attached without an order."""
    import torch.distributed as dist
    from test_mpu_reader import fake_world

    import mpu_bridge

    ps = megatron_parallel_state()
    out = []
    with fake_world(8, rank):
        for sizes, order in cases:
            initialize_megatron(ps, order=order, **sizes)
            try:
                bridge = mpu_bridge.attach(ps)
                layout = bridge.layout
                theirs = {
                    "tp": ps.get_tensor_model_parallel_group(),
                    "cp": ps.get_context_parallel_group(),
                    "dp": ps.get_data_parallel_group(),
                    "pp": ps.get_pipeline_model_parallel_group(),
                    "ep": ps.get_expert_model_parallel_group(),
                    "edp": ps.get_expert_data_parallel_group(),
                    "etp": ps.get_expert_tensor_parallel_group(),
                }
                reference = plan(8, order=order, **sizes)
                out.append({
                    "order": order,
                    "inferred": layout.config.order,
                    "megatron": {k: sorted(dist.get_process_group_ranks(g)) for k, g in theirs.items()},
                    "bridge": {k: layout.group_of(k, rank) for k in theirs},
                    "same_layout": all(
                        sorted(map(tuple, layout.groups(k))) == sorted(map(tuple, reference.groups(k)))
                        for k in layout.kinds
                    ),
                })
                bridge.close()
            except Exception as exc:  # reported per case
                out.append({"order": order, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                ps.destroy_model_parallel()
    return out


def _orders_seen_by_every_rank(_: int, __: int, cases: List[Tuple[Dict[str, int], str]]) -> List[List[Dict[str, Any]]]:
    return [_orders_seen_by(rank, cases) for rank in range(8)]


@pytest.fixture(scope="module")
def orders() -> List[List[Dict[str, Any]]]:
    # In a process of its own: megatron-core's module state must not leak into this one.
    (per_rank,) = run_ranks(_orders_seen_by_every_rank, 1, ORDERS, backend=None, timeout=DEADLINE)
    return per_rank


def test_at_least_20_different_accepted_orders_are_tried_with_cp_and_ep_among_them():
    assert len(ORDERS) >= 20
    assert any(s.get("cp", 1) > 1 and s.get("ep", 1) > 1 for s, _ in ORDERS)
    assert len({o for _, o in ORDERS}) >= 20


def test_every_accepted_order_attaches_without_being_told(orders):
    errors = [case for rank in orders for case in rank if "error" in case]
    assert errors == []


def test_the_inferred_order_gives_megatrons_groups_on_every_rank(orders):
    for rank_cases in orders:
        for case in rank_cases:
            assert case["bridge"] == case["megatron"], case["order"]


def test_the_inferred_order_gives_the_same_layout_as_megatrons_order(orders):
    for rank_cases in orders:
        for case in rank_cases:
            assert case["same_layout"], (case["order"], case["inferred"])


# ---------------------------------------------------------------------------------------
# G3 / G4: the fault matrix on 4 ranks over megatron-core ep=2 (issue 8, cases 3 and 4)
# ---------------------------------------------------------------------------------------


def _recover(bridge: Any, name: str) -> Dict[str, Any]:
    """After a failed round: a barrier, then identical calls on the same bridge and a new one."""
    import mpu_bridge

    _align(f"{name}/recover")
    same = _timed(lambda: _sum(bridge.zero_param_groups(2).group))
    fresh = mpu_bridge.attach(megatron_parallel_state(), agreement_timeout=T)
    new = _timed(lambda: _sum(fresh.expert_groups(2).expert_parallel.group))
    fresh.close()
    return {"same": same, "new": new}


def _fault_world(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge

    ps = megatron_parallel_state()
    initialize_megatron(ps, ep=2)  # tp 1: EP [0, 1] [2, 3], EDP [0, 2] [1, 3]; the world group is megatron's too
    obs: Dict[str, Any] = {}

    def scenario(name: str, calls: Callable[[Any], Any]) -> None:
        _align(name)
        bridge = mpu_bridge.attach(ps, agreement_timeout=T)
        before = bridge.stats()["created"]
        obs[name] = _timed(lambda: calls(bridge))
        obs[name]["created"] = bridge.stats()["created"] - before
        obs[name]["recovery"] = _recover(bridge, name)
        bridge.close()

    # Sizes differ, every group reusable (case 3): rank 0 asks ep 2, the others ep 4.
    scenario("sizes", lambda b: b.expert_groups(2 if rank == 0 else 4))
    # Methods differ, both met entirely by reuse: megatron's expert groups, and hpZ blocks
    # of 2 over dp = the world ([0, 1] [2, 3]: megatron's EP groups again).
    scenario("methods", lambda b: b.expert_groups(2) if rank == 0 else b.zero_param_groups(2))
    # Order of calls differs.
    scenario("order", lambda b: [b.zero_param_groups(4), b.all_to_all_groups(2)] if rank == 0
             else [b.all_to_all_groups(2), b.zero_param_groups(4)])
    # Rank 3 skips a call (case 4) and waits at the barrier of the recovery.
    scenario("skip", lambda b: None if rank == 3 else b.zero_param_groups(4))
    # Rank 0 makes one call more than the others.
    scenario("extra", lambda b: [b.all_to_all_groups(2), b.zero_param_groups(4)] if rank == 0
             else [b.zero_param_groups(4)])
    # Rank 3 is slower than the agreement timeout.
    scenario("slow", lambda b: (time.sleep(2 * T) if rank == 3 else None, b.zero_param_groups(4)))
    ps.destroy_model_parallel()
    return obs


@pytest.fixture(scope="module")
def faults() -> List[Dict[str, Any]]:
    return run_ranks(_fault_world, WORLD, timeout=DEADLINE)


FAULTS = ["sizes", "methods", "order", "skip", "extra", "slow"]


@pytest.mark.parametrize("name", FAULTS)
def test_every_rank_gets_a_bridge_error_within_the_agreement_timeout(faults, name):
    calling = faults[:3] if name == "skip" else faults  # rank 3 made no call there
    for o in calling:
        assert o[name]["error"] in ("PlanMismatchError", "GroupCreationError"), o[name]
        assert o[name]["seconds"] < T + SLACK


@pytest.mark.parametrize("name", FAULTS)
def test_nothing_is_created_when_ranks_disagree(faults, name):
    assert [o[name]["created"] for o in faults] == [0, 0, 0, 0]


@pytest.mark.parametrize("name", FAULTS)
def test_after_a_barrier_identical_calls_work_on_the_same_bridge(faults, name):
    # hpZ blocks of 2 over dp = world: [0, 1] [2, 3].
    assert [o[name]["recovery"]["same"].get("value") for o in faults] == [1, 1, 5, 5]


@pytest.mark.parametrize("name", FAULTS)
def test_after_a_barrier_identical_calls_work_on_a_new_bridge(faults, name):
    assert [o[name]["recovery"]["new"].get("value") for o in faults] == [1, 1, 5, 5]


def test_disagreeing_sizes_met_by_reuse_are_a_plan_mismatch_naming_both_calls(faults):
    for o in faults:
        message = o["sizes"]["message"]
        assert o["sizes"]["error"] == "PlanMismatchError"
        assert "ranks [0] planned" in message and "from expert_groups(2)" in message, message
        assert "ranks [1-3] planned" in message and "from expert_groups(4)" in message, message


def test_disagreeing_methods_met_by_reuse_are_a_plan_mismatch_naming_both_calls(faults):
    for o in faults:
        message = o["methods"]["message"]
        assert "from expert_groups(2)" in message and "from zero_param_groups(2)" in message, message


def test_another_order_of_calls_names_the_first_call_of_each_rank(faults):
    for o in faults:
        message = o["order"]["message"]
        assert "ranks [0] planned" in message and "from zero_param_groups(4)" in message, message
        assert "ranks [1-3] planned" in message and "from all_to_all_groups(2)" in message, message


def test_a_skipped_call_names_the_rank_that_skipped_it(faults):
    for o in faults[:3]:
        assert o["skip"]["error"] == "GroupCreationError"
        assert "ranks [3] of 4 never arrived" in o["skip"]["message"], o["skip"]["message"]
    assert faults[3]["skip"]["error"] is None  # it made no call


def test_an_extra_call_is_a_plan_mismatch_naming_it(faults):
    for o in faults:
        message = o["extra"]["message"]
        assert "ranks [0] planned" in message and "from all_to_all_groups(2)" in message, message


def test_a_slow_rank_is_named_by_the_others_and_told_it_was_late(faults):
    for o in faults[:3]:
        assert "ranks [3] of 4 never arrived" in o["slow"]["message"], o["slow"]["message"]
    assert faults[3]["slow"]["error"] == "GroupCreationError"
    assert "this rank itself missed an earlier round" in faults[3]["slow"]["message"]


# ---------------------------------------------------------------------------------------
# G3: a rank dies in the agreement, or inside group creation (issue 8, case 10)
# ---------------------------------------------------------------------------------------

DEATH_EXIT = 23


def _death_world(rank: int, world: int, where: str) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge

    # tp 2: groups [0, 1] and [2, 3] (the whole world would be the default group: nothing to create)
    bridge = mpu_bridge.attach(None, tp=2, agreement_timeout=T, timeout=datetime.timedelta(seconds=T))
    _align(f"death/{where}")
    if rank == 3 and where == "agreement":
        os._exit(DEATH_EXIT)
    if rank == 3 and where == "creation":
        real = dist.new_group

        def dying_new_group(*args: Any, **kwargs: Any) -> Any:
            os._exit(DEATH_EXIT)
            return real(*args, **kwargs)

        dist.new_group = dying_new_group  # type: ignore[assignment]
    return _timed(lambda: bridge.tensor_parallel().ranks)


def _run_dying(where: str) -> Tuple[Dict[int, Any], Dict[int, Any]]:
    from test_faults import _run_ranks_with_exits

    return _run_ranks_with_exits(functools.partial(_death_world, where=where), WORLD, exiting=(3,), timeout=DEADLINE)


@pytest.mark.parametrize("where", ["agreement", "creation"])
def test_a_rank_that_dies_gives_the_others_an_error_bounded_by_the_timeouts(where):
    results, exits = _run_dying(where)
    assert exits == {3: DEATH_EXIT}
    # agreement: every rank waits for rank 3, bounded by agreement_timeout; creation: its
    # group's other member, rank 2, bounded by the process-group timeout (ranks 0 and 1
    # create [0, 1] member-only and never wait for rank 3).
    failing = (0, 1, 2) if where == "agreement" else (2,)
    for rank in failing:
        assert results[rank]["error"] == "GroupCreationError", results[rank]
        assert results[rank]["seconds"] < T + SLACK
    if where == "agreement":
        assert all("ranks [3] of 4 never arrived" in results[r]["message"] for r in failing)
    else:
        assert "process-group timeout" in results[2]["message"]
        assert [results[r].get("value") for r in (0, 1)] == [(0, 1), (0, 1)]


# ---------------------------------------------------------------------------------------
# A family that left ranks out, then a covering one over some of the same rank sets
# ---------------------------------------------------------------------------------------


def _mixed_world(rank: int, world: int) -> Dict[str, Any]:
    from mpu_bridge import partitions
    from mpu_bridge.registry import GroupRegistry

    registry = GroupRegistry(agreement_timeout=60)
    pair = partitions.Partition("pair01", 2, 1, (0, 1) if rank < 2 else None, lambda: [[0, 1]])
    (first,) = registry.ensure([pair])  # ranks 0 and 1 hold [0, 1]; ranks 2 and 3 nothing
    (tp,) = registry.ensure([partitions.dense(plan(world, tp=2), "tp", rank)])  # [0, 1] [2, 3]
    obs = {
        "kept": first is not None and tp is first,
        "sum": _sum(tp),
        "strategy": registry.last_strategy,
        "created": registry.created,
    }
    registry.close()
    return obs


def test_a_covering_family_over_rank_sets_some_ranks_hold_is_created_by_all_and_kept_by_holders():
    observed = run_ranks(_mixed_world, WORLD, timeout=DEADLINE)
    assert [o["kept"] for o in observed] == [True, True, False, False]
    assert [o["sum"] for o in observed] == [1, 1, 5, 5]
    assert {o["strategy"] for o in observed} == {"new_group"}
    # ranks 0 and 1: the pair only; ranks 2 and 3: their tp group only
    assert [o["created"] for o in observed] == [1, 1, 1, 1]


def _slow_duplicate_world(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist

    from mpu_bridge import partitions
    from mpu_bridge.registry import GroupRegistry

    registry = GroupRegistry(agreement_timeout=60)
    pair = partitions.Partition("pair01", 2, 1, (0, 1) if rank < 2 else None, lambda: [[0, 1]])
    registry.ensure([pair])
    times: Dict[str, float] = {}
    real_new_group, real_destroy = dist.new_group, dist.destroy_process_group

    def slow_new_group(ranks: Any, **kwargs: Any) -> Any:
        group = real_new_group(ranks, **kwargs)
        if list(ranks) == [0, 1]:
            time.sleep(1.0)  # rank 1 is still busy with its copy of [0, 1]
            times["made"] = time.time()
        return group

    def timed_destroy(group: Any = None) -> None:
        times.setdefault("destroyed", time.time())
        real_destroy(group)

    dist.new_group = slow_new_group if rank == 1 else real_new_group
    dist.destroy_process_group = timed_destroy if rank == 0 else real_destroy
    try:
        registry.ensure([partitions.dense(plan(world, tp=2), "tp", rank)])
    finally:
        dist.new_group, dist.destroy_process_group = real_new_group, real_destroy
    registry.close()
    return times


def test_a_holder_destroys_its_duplicate_only_after_every_member_made_theirs():
    # gloo connects a group eagerly: destroying rank 0's copy of [0, 1] while rank 1 is
    # still creating its own breaks rank 1's creation ("connection closed by peer")
    observed = run_ranks(_slow_duplicate_world, WORLD, timeout=DEADLINE)
    assert observed[0]["destroyed"] >= observed[1]["made"]
