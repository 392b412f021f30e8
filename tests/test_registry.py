"""GroupRegistry: creating each rank set once, on every rank in the same way, and tearing down only ours.

Three kinds of tests:

* real worlds of gloo processes (tests/_multiproc.py): one spawn per theme
  (creation, errors, megatron-core); each rank records what it observed and the
  tests below read one observation each, so a world is paid for once;
* one process playing one rank of a big world with PyTorch's ``fake`` backend
  (scale, counting, bad input);
* pure layout properties behind the registry's reuse rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import threading
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed import distributed_c10d as c10d

from _multiproc import run_ranks
from _torch_rule import member_only_moves_counter
from mpu_bridge import partitions
from mpu_bridge.errors import BridgeError, GroupCreationError, LayoutError, PlanMismatchError
from mpu_bridge.layout import KINDS, plan
from mpu_bridge.optional import is_available
from mpu_bridge.registry import GroupRegistry, Partition

# --------------------------------------------------------------------------------------
# Helpers used inside rank processes (module level: run_ranks pickles by reference)
# --------------------------------------------------------------------------------------


def _sum_of_ranks(group: Any) -> int:
    """All-reduce of the global rank over ``group``: the sum of its members' ranks."""
    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _ranks_of(group: Any) -> List[int]:
    return sorted(dist.get_process_group_ranks(group))


@contextlib.contextmanager
def counting_new_group() -> Iterator[Dict[str, int]]:
    """Count this process's ``new_group`` calls: ``"all"`` (every rank must enter them) and
    ``"local"`` (``use_local_synchronization=True``, members only)."""
    real = dist.new_group
    calls = {"all": 0, "local": 0}

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["local" if kwargs.get("use_local_synchronization") else "all"] += 1
        return real(*args, **kwargs)

    dist.new_group = counted  # type: ignore[assignment]
    try:
        yield calls
    finally:
        dist.new_group = real  # type: ignore[assignment]


def _attempt(fn: Any) -> tuple:
    """Run ``fn``; return ("ok", result) or (exception type name, message)."""
    try:
        return ("ok", fn())
    except BridgeError as exc:
        return (type(exc).__name__, str(exc))


def _pair12(rank: int) -> Partition:
    """A partition that does not cover the world: one group, ranks 1 and 2 (no tp or dp group)."""
    return Partition("pair12", 2, 1, (1, 2) if rank in (1, 2) else None, lambda: [[1, 2]])


def _whole_world(rank: int, world: int, key: str = "world") -> Partition:
    members = tuple(range(world))
    return Partition(key, world, 1, members, lambda: [list(members)])


def _creation_world(rank: int, world: int) -> Dict[str, Any]:
    obs: Dict[str, Any] = {}
    layout = plan(world, tp=2)  # tp: [0, 1] [2, 3]; dp: [0, 2] [1, 3]
    tp = Partition.from_layout(layout, "tp", rank)
    dp = Partition.from_layout(layout, "dp", rank)

    # Member-only creation, one batch.
    registry = GroupRegistry(agreement_timeout=30)
    obs["auto_strategy"] = registry.strategy
    with counting_new_group() as calls:
        tp_group, dp_group = registry.ensure([tp, dp])
    obs["local_batch_strategy"] = registry.last_strategy
    obs["local_sums"] = [_sum_of_ranks(tp_group), _sum_of_ranks(dp_group)]
    obs["local_ranks"] = [_ranks_of(tp_group), _ranks_of(dp_group)]
    obs["local_calls"] = calls
    obs["local_created"] = registry.created

    # Idempotency: the same batch again creates nothing.
    again = registry.ensure([tp, dp])
    obs["again_same_objects"] = again[0] is tp_group and again[1] is dp_group
    obs["again_created"] = registry.created
    obs["again_agreements"] = registry.agreements

    # Thread-safety: four threads ask for the same new partition at once.
    found: List[Any] = []
    # every rank alone: tp and dp hold the pairs already, the default group the world
    cross = Partition("alone", 1, world, (rank,), lambda: [[r] for r in range(world)])
    threads = [
        threading.Thread(target=lambda: found.append(registry.ensure([cross])[0])) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    obs["threads_distinct_groups"] = len({id(g) for g in found})
    obs["threads_results"] = len(found)
    obs["threads_created"] = registry.created - obs["again_created"]
    obs["threads_sum"] = _sum_of_ranks(found[0])

    # A partition that leaves ranks 0 and 3 out: members get a group, the others None.
    (pair,) = registry.ensure([_pair12(rank)])
    obs["pair_is_none"] = pair is None
    obs["pair_sum"] = None if pair is None else _sum_of_ranks(pair)
    obs["pair_strategy"] = registry.last_strategy
    obs["pair_counter"] = c10d._world.group_count
    first_names = {c10d._world.pg_names[g] for g in (tp_group, dp_group)}

    # close() destroys what the registry created; a second close() is a no-op.
    created = [g for g in (tp_group, dp_group, found[0], pair) if g is not None]
    registry.close()
    registry.close()
    obs["closed_left_in_torch"] = sum(g in c10d._world.pg_map for g in created)
    obs["closed_ensure"] = _attempt(lambda: registry.ensure([tp]))

    # A new registry recreating the same groups: PyTorch would reuse the destroyed
    # groups' hashed names; the registry must notice and still produce working groups.
    second = GroupRegistry(agreement_timeout=30)
    tp2, dp2 = second.ensure([tp, dp])
    obs["recreate_strategy"] = second.last_strategy
    obs["recreate_sums"] = [_sum_of_ranks(tp2), _sum_of_ranks(dp2)]
    obs["recreate_names_repeat"] = bool(first_names & {c10d._world.pg_names[g] for g in (tp2, dp2)})
    second.close()

    # megatron-core-like creation (every rank enters every dp group), then borrowed.
    mpu_dp_groups = [dist.new_group(ranks) for ranks in ([0, 2], [1, 3])]
    mpu_dp = mpu_dp_groups[rank % 2]
    third = GroupRegistry(agreement_timeout=30)
    third.borrow(dp.own, mpu_dp)
    dp3, tp3 = third.ensure([dp, tp])
    obs["borrowed_is_reused"] = dp3 is mpu_dp
    obs["borrowed_stats"] = third.stats()
    obs["after_mpu_strategy"] = third.last_strategy
    obs["after_mpu_sums"] = [_sum_of_ranks(dp3), _sum_of_ranks(tp3)]

    # An "embedding" group only ranks 0 and 1 join leaves ranks holding different
    # numbers of groups: member-only creation would name groups differently on members.
    dist.new_group([0, 1])
    obs["held_counts_differ_here"] = len(c10d._world.pg_names)
    created = third.created
    (whole3,) = third.ensure([_whole_world(rank, world, key="world-again")])
    obs["world_is_default_group"] = (whole3 is c10d._get_default_group(), third.created - created)
    obs["world_sum"] = _sum_of_ranks(whole3)

    third.close()
    obs["borrowed_alive_after_close"] = mpu_dp in c10d._world.pg_map
    obs["borrowed_sum_after_close"] = _sum_of_ranks(mpu_dp)

    # Forcing the all-ranks loop: every rank enters both tp groups.
    fourth = GroupRegistry(strategy="new_group", agreement_timeout=30)
    with counting_new_group() as calls:
        (tp4,) = fourth.ensure([tp])
    obs["forced_new_group_calls"] = calls["all"]
    obs["forced_new_group_sum"] = _sum_of_ranks(tp4)
    fourth.close()

    # Ranks 0 and 1 still hold one group more than ranks 2 and 3 (the group above), while
    # PyTorch's group counter is equal everywhere. Where the salt is the held count, tp's
    # groups [0, 1] and [2, 3] each sit on one side: their members agree, so member-only
    # creation is safe; dp's groups [0, 2] and [1, 3] straddle the sides. Where the salt
    # is the counter, every member agrees.
    dist.new_group(list(range(world)))  # one more group everywhere: names not used before
    fifth = GroupRegistry(agreement_timeout=30)
    (tp5,) = fifth.ensure([tp])
    obs["uneven_tp"] = (fifth.last_strategy, _sum_of_ranks(tp5))
    (dp5,) = fifth.ensure([dp])
    obs["uneven_dp"] = (fifth.last_strategy, _sum_of_ranks(dp5))
    fifth.close()
    return obs


def _errors_world(rank: int, world: int) -> Dict[str, Any]:
    obs: Dict[str, Any] = {}
    registry = GroupRegistry(agreement_timeout=20)

    # Ranks 0, 1 plan ep = 2; ranks 2, 3 plan ep = 4.
    ep = 2 if rank < 2 else 4
    experts = Partition.from_layout(plan(world, ep=ep), "ep", rank, key=f"expert_parallel[ep={ep}]")
    obs["mismatch"] = _attempt(lambda: registry.ensure([experts]))
    obs["mismatch_created"] = registry.created

    # Rank 2 passes a malformed partition (its own group lacks rank 2).
    tp = Partition.from_layout(plan(world, tp=2), "tp", rank)
    request = dataclasses.replace(tp, own=(0, 1)) if rank == 2 else tp
    try:
        registry.ensure([request])
        obs["invalid"] = ("ok", None)
    except (LayoutError, PlanMismatchError) as exc:
        obs["invalid"] = (type(exc).__name__, str(exc))

    # The world is still usable: a consistent request succeeds.
    (group,) = registry.ensure([tp])
    obs["recovered_sum"] = _sum_of_ranks(group)

    # Rank 0 alone enters an extra all-ranks-style group (a singleton, so it does not
    # hang): PyTorch's sequential names are now one ahead on rank 0, and an all-ranks
    # loop would pair up different groups on different ranks.
    if rank == 0:
        dist.new_group([0])
    obs["counter"] = c10d._world.group_count
    looping = GroupRegistry(strategy="new_group", agreement_timeout=20)
    obs["sequence_skew"] = _attempt(lambda: looping.ensure([tp]))

    # Rank 3 never asks (it failed before getting here): the others time out.
    dp = Partition.from_layout(plan(world, tp=2), "dp", rank)
    impatient = GroupRegistry(agreement_timeout=5)
    if rank == 3:
        obs["missing"] = ("skipped", None)
    else:
        obs["missing"] = _attempt(lambda: impatient.ensure([dp]))
    return obs


def _megatron_world(rank: int, world: int) -> Dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    # pp = 4: megatron-core's embedding groups join only the first and last stage.
    ps.initialize_model_parallel(pipeline_model_parallel_size=4, create_gloo_process_groups=False)
    obs: Dict[str, Any] = {"held": len(c10d._world.pg_names)}
    registry = GroupRegistry(agreement_timeout=30)
    for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()):
        registry.borrow(dist.get_process_group_ranks(group), group)

    parts = [
        Partition.from_layout(plan(world, pp=4), "tp", rank, key="tp"),  # = megatron's tp groups
        Partition.from_layout(plan(world, tp=2), "tp", rank, key="pairs"),  # spans two stages
        _whole_world(rank, world, key="world"),  # = megatron's pp group
    ]
    groups = registry.ensure(parts)
    obs["reused_mpu_groups"] = [
        groups[0] is ps.get_tensor_model_parallel_group(),
        groups[2] is ps.get_pipeline_model_parallel_group(),
    ]
    obs["sums"] = [_sum_of_ranks(g) for g in groups]
    obs["strategy"] = registry.last_strategy
    obs["stats"] = registry.stats()
    registry.close()
    obs["mpu_pp_alive"] = ps.get_pipeline_model_parallel_group() in c10d._world.pg_map
    ps.destroy_model_parallel()
    return obs


# --------------------------------------------------------------------------------------
# Worlds (spawned once per module)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def creation() -> List[Dict[str, Any]]:
    return run_ranks(_creation_world, 4, timeout=240)


@pytest.fixture(scope="module")
def errors() -> List[Dict[str, Any]]:
    return run_ranks(_errors_world, 4, timeout=180)


@pytest.fixture(scope="module")
def megatron() -> List[Dict[str, Any]]:
    if not is_available("megatron.core"):
        pytest.skip("needs megatron-core (pip install 'mpu-bridge[megatron]')")
    return run_ranks(_megatron_world, 4, timeout=240)


# -- creation -------------------------------------------------------------------------


def test_auto_picks_member_only_creation_on_gloo(creation):
    assert [o["auto_strategy"] for o in creation] == ["local_new_group"] * 4


def test_member_only_groups_reduce_over_exactly_their_members(creation):
    # tp [0, 1] [2, 3] sums 1, 5; dp [0, 2] [1, 3] sums 2, 4
    assert [o["local_sums"] for o in creation] == [[1, 2], [1, 4], [5, 2], [5, 4]]


def test_member_only_groups_hold_the_layout_ranks(creation):
    assert creation[2]["local_ranks"] == [[2, 3], [0, 2]]


def test_member_only_creation_enters_no_other_group(creation):
    assert [o["local_batch_strategy"] for o in creation] == ["local_new_group"] * 4
    assert [o["local_calls"] for o in creation] == [{"all": 0, "local": 2}] * 4


def test_each_rank_creates_one_group_per_partition(creation):
    assert [o["local_created"] for o in creation] == [2, 2, 2, 2]


def test_ensuring_the_same_partitions_again_returns_the_same_groups(creation):
    assert all(o["again_same_objects"] for o in creation)


def test_ensuring_again_creates_nothing_but_still_agrees(creation):
    # Every ensure agrees, also when everything is registered: ranks that asked for
    # different (registered) groups must fail, not return groups that hang a collective.
    assert [o["again_created"] for o in creation] == [2, 2, 2, 2]
    assert [o["again_agreements"] for o in creation] == [2, 2, 2, 2]


def test_concurrent_ensure_from_threads_creates_one_group(creation):
    assert [o["threads_created"] for o in creation] == [1, 1, 1, 1]
    assert [o["threads_distinct_groups"] for o in creation] == [1, 1, 1, 1]
    assert [o["threads_results"] for o in creation] == [4, 4, 4, 4]


def test_the_group_threads_share_works(creation):
    assert [o["threads_sum"] for o in creation] == [0, 1, 2, 3]


def test_ranks_outside_a_partial_partition_get_none(creation):
    assert [o["pair_is_none"] for o in creation] == [True, False, False, True]
    assert [o["pair_sum"] for o in creation] == [None, 3, 3, None]


def test_a_partition_that_does_not_cover_the_world_is_created_by_its_members_only(creation):
    # Where creating a member-only group moves PyTorch's group counter on its members alone
    # (torch >= 2.14), every rank then moves its counter to one agreed value (next test).
    assert [o["pair_strategy"] for o in creation] == ["local_new_group"] * 4


def test_a_partition_that_does_not_cover_the_world_leaves_every_ranks_group_counter_equal(creation):
    assert len({o["pair_counter"] for o in creation}) == 1


def test_close_destroys_every_group_the_registry_created(creation):
    assert [o["closed_left_in_torch"] for o in creation] == [0, 0, 0, 0]


def test_a_closed_registry_refuses_new_requests(creation):
    kind, message = creation[0]["closed_ensure"]
    assert kind == "GroupCreationError" and "closed" in message


def test_recreating_destroyed_groups_avoids_reusing_their_names(creation):
    assert not any(o["recreate_names_repeat"] for o in creation)
    # The held count drops when groups are destroyed (the names would repeat: fall back);
    # PyTorch's group counter never does (fresh names: member-only creation again).
    expected = "local_new_group" if member_only_moves_counter() else "new_group"
    assert [o["recreate_strategy"] for o in creation] == [expected] * 4


def test_recreated_groups_work(creation):
    assert [o["recreate_sums"] for o in creation] == [[1, 2], [1, 4], [5, 2], [5, 4]]


def test_a_borrowed_group_is_reused_not_created(creation):
    assert all(o["borrowed_is_reused"] for o in creation)
    assert [o["borrowed_stats"]["created"] for o in creation] == [1, 1, 1, 1]
    assert [o["borrowed_stats"]["borrowed"] for o in creation] == [1, 1, 1, 1]
    assert [o["borrowed_stats"]["reused"] for o in creation] == [1, 1, 1, 1]


def test_member_only_creation_works_after_all_ranks_creation_and_borrowing(creation):
    assert [o["after_mpu_strategy"] for o in creation] == ["local_new_group"] * 4
    assert [o["after_mpu_sums"] for o in creation] == [[2, 1], [4, 1], [2, 5], [4, 5]]


def test_the_whole_worlds_rank_set_is_the_default_group_never_created(creation):
    counts = [o["held_counts_differ_here"] for o in creation]
    assert counts[0] == counts[1] != counts[2] == counts[3]
    assert [o["world_is_default_group"] for o in creation] == [(True, 0)] * 4
    assert [o["world_sum"] for o in creation] == [6, 6, 6, 6]


def test_groups_whose_members_hold_equal_counts_are_created_member_only_when_others_differ(creation):
    assert [o["uneven_tp"] for o in creation] == [("local_new_group", 1), ("local_new_group", 1),
                                                  ("local_new_group", 5), ("local_new_group", 5)]


def test_groups_whose_members_would_hash_different_salts_fall_back_to_the_all_ranks_loop(creation):
    # dp's members hold different numbers of groups, but have equal group counters.
    expected = "local_new_group" if member_only_moves_counter() else "new_group"
    assert [o["uneven_dp"] for o in creation] == [(expected, 2), (expected, 4), (expected, 2), (expected, 4)]


def test_close_leaves_borrowed_groups_alive_and_working(creation):
    assert all(o["borrowed_alive_after_close"] for o in creation)
    assert [o["borrowed_sum_after_close"] for o in creation] == [2, 4, 2, 4]


def test_forced_new_group_enters_every_group_of_the_partition(creation):
    assert [o["forced_new_group_calls"] for o in creation] == [2, 2, 2, 2]
    assert [o["forced_new_group_sum"] for o in creation] == [1, 1, 5, 5]


# -- errors across ranks -----------------------------------------------------------------


def test_mismatched_plans_raise_plan_mismatch_on_every_rank(errors):
    assert [o["mismatch"][0] for o in errors] == ["PlanMismatchError"] * 4


def test_plan_mismatch_names_the_ranks_and_what_each_planned(errors):
    message = errors[3]["mismatch"][1]
    assert "ranks [0-1] planned [expert_parallel[ep=2]" in message
    assert "ranks [2-3] planned [expert_parallel[ep=4]" in message


def test_nothing_is_created_when_plans_mismatch(errors):
    assert [o["mismatch_created"] for o in errors] == [0, 0, 0, 0]


def test_invalid_input_on_one_rank_fails_every_rank_without_waiting_for_the_timeout(errors):
    kinds = [o["invalid"][0] for o in errors]
    assert kinds == ["PlanMismatchError", "PlanMismatchError", "LayoutError", "PlanMismatchError"]
    assert "does not contain rank 2" in errors[2]["invalid"][1]
    assert "ranks [2] planned an invalid request" in errors[0]["invalid"][1]


def test_the_world_recovers_after_a_rejected_plan(errors):
    assert [o["recovered_sum"] for o in errors] == [1, 1, 5, 5]


def test_ranks_with_skewed_sequential_group_names_refuse_the_all_ranks_loop(errors):
    assert [o["sequence_skew"][0] for o in errors] == ["GroupCreationError"] * 4
    counters = [o["counter"] for o in errors]
    assert counters[0] == counters[1] + 1 and len(set(counters[1:])) == 1
    message = errors[2]["sequence_skew"][1]
    assert "group counter, which names every all-ranks group, differs across the ranks" in message
    assert f"ranks [0] have {counters[0]}; ranks [1-3] have {counters[1]}" in message


def test_a_rank_that_never_arrives_ends_every_other_rank_with_a_timeout_error(errors):
    assert [o["missing"][0] for o in errors] == ["GroupCreationError"] * 3 + ["skipped"]


def test_the_timeout_error_names_the_missing_rank_and_the_timeout(errors):
    message = errors[1]["missing"][1]
    assert "ranks [3] of 4 never arrived" in message
    assert "agreement timeout of 5 s" in message


# -- real megatron-core ------------------------------------------------------------------


def test_megatron_pipeline_leaves_ranks_with_different_group_counts(megatron):
    # Embedding groups join only the first and last stage: the hazard is real here.
    held = [o["held"] for o in megatron]
    assert len(set(held)) > 1


def test_groups_created_after_megatron_reduce_correctly(megatron):
    # tp singletons: the rank itself; pairs [0, 1] [2, 3]; the whole world
    assert [o["sums"] for o in megatron] == [[0, 1, 6], [1, 1, 6], [2, 5, 6], [3, 5, 6]]


def test_after_megatron_member_only_creation_is_used_only_where_the_salts_agree(megatron):
    # The pairs straddle pipeline stages that hold different numbers of groups (the
    # embedding groups) but have equal group counters (megatron-core enters every group).
    expected = "local_new_group" if member_only_moves_counter() else "new_group"
    assert [o["strategy"] for o in megatron] == [expected] * 4


def test_megatron_groups_with_the_same_ranks_are_reused(megatron):
    assert all(o["reused_mpu_groups"] == [True, True] for o in megatron)
    assert [o["stats"]["reused"] for o in megatron] == [2] * 4
    assert [o["stats"]["created"] for o in megatron] == [1] * 4


def test_closing_leaves_megatron_groups_alive(megatron):
    assert all(o["mpu_pp_alive"] for o in megatron)


# --------------------------------------------------------------------------------------
# One rank of a big world (fake backend) and single-rank gloo worlds, in this process
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a test left torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def gloo_world_of_one() -> Iterator[None]:
    if dist.is_initialized():
        raise RuntimeError("a test left torch.distributed initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_of_16384_creates_only_its_own_groups():
    layout = plan(16384, tp=8, pp=8, ep=8)
    rank = 12345
    with fake_world(16384, rank):
        registry = GroupRegistry()
        groups_before = len(c10d._world.pg_map)
        parts = [Partition.from_layout(layout, kind, rank) for kind in ("tp", "dp", "ep", "edp")]
        with counting_new_group() as calls:
            groups = registry.ensure(parts)
        assert registry.created == 4
        assert len(c10d._world.pg_map) - groups_before == 4
        assert calls == {"all": 0, "local": 4}  # no all-ranks new_group call
        assert [_ranks_of(g) for g in groups] == [layout.group_of(k, rank) for k in ("tp", "dp", "ep", "edp")]
        registry.close()
        assert len(c10d._world.pg_map) == groups_before


def test_fake_backend_skips_the_plan_check():
    with fake_world(64, 3):
        assert GroupRegistry().verify_plan is False


def test_fake_backend_refuses_a_forced_plan_check():
    with fake_world(64, 3):
        with pytest.raises(GroupCreationError, match="FakeStore"):
            GroupRegistry(verify_plan=True)


def test_forced_all_ranks_loop_calls_new_group_once_per_group():
    layout = plan(64, tp=4)
    with fake_world(64, 9):
        registry = GroupRegistry(strategy="new_group")
        with counting_new_group() as calls:
            (group,) = registry.ensure([Partition.from_layout(layout, "tp", 9)])
        assert calls == {"all": 16, "local": 0}
        assert _ranks_of(group) == [8, 9, 10, 11]


def test_a_borrowed_rank_set_is_returned_instead_of_created():
    layout = plan(32, tp=4)
    with fake_world(32, 6):
        registry = GroupRegistry()
        mpu_tp = dist.new_group([4, 5, 6, 7], use_local_synchronization=True)
        assert registry.borrow([7, 6, 5, 4], mpu_tp) is mpu_tp
        (group,) = registry.ensure([Partition.from_layout(layout, "tp", 6)])
        assert group is mpu_tp
        assert registry.stats() == {
            "created": 0, "borrowed": 1, "reused": 1, "live": 0, "agreements": 0, "fallbacks": 0
        }


def test_lookup_finds_created_and_borrowed_groups_by_rank_set():
    layout = plan(32, tp=4)
    with fake_world(32, 6):
        registry = GroupRegistry()
        mpu_dp = dist.new_group(layout.group_of("dp", 6), use_local_synchronization=True)
        registry.borrow(layout.group_of("dp", 6), mpu_dp)
        (tp,) = registry.ensure([Partition.from_layout(layout, "tp", 6)])
        assert registry.lookup([7, 4, 6, 5]) is tp
        assert registry.lookup(layout.group_of("dp", 6)) is mpu_dp
        assert registry.lookup([0, 1, 2, 3]) is None


def test_close_destroys_created_groups_only():
    layout = plan(32, tp=4)
    with fake_world(32, 6):
        registry = GroupRegistry()
        mpu_dp = dist.new_group(layout.group_of("dp", 6), use_local_synchronization=True)
        registry.borrow(layout.group_of("dp", 6), mpu_dp)
        (tp,) = registry.ensure([Partition.from_layout(layout, "tp", 6)])
        registry.close()
        assert tp not in c10d._world.pg_map
        assert mpu_dp in c10d._world.pg_map
        registry.close()  # idempotent


def test_the_same_rank_set_in_two_partitions_of_one_batch_is_created_once():
    layout = plan(32, tp=2)  # ep = 1: edp groups equal dp groups
    with fake_world(32, 11):
        registry = GroupRegistry()
        dp, edp = registry.ensure(
            [Partition.from_layout(layout, "dp", 11), Partition.from_layout(layout, "edp", 11)]
        )
        assert dp is edp
        assert (registry.created, registry.reused) == (1, 1)


def test_threads_ensuring_together_create_each_partition_once():
    layout = plan(256, tp=8, ep=4)
    parts = [Partition.from_layout(layout, k, 77) for k in ("tp", "dp", "ep")]
    with fake_world(256, 77):
        registry = GroupRegistry()
        results: List[List[Any]] = []
        threads = [threading.Thread(target=lambda: results.append(registry.ensure(parts))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert registry.created == 3
        assert len(results) == 8
        assert all(all(a is b for a, b in zip(r, results[0])) for r in results)


@settings(max_examples=25)
@given(
    st.sampled_from([(64, 2, 2, 1, 2), (128, 2, 1, 2, 4), (96, 4, 1, 1, 2), (256, 2, 2, 2, 2)]),
    st.data(),
)
def test_every_kind_gets_its_layout_group_and_each_rank_set_one_communicator(sizes, data):
    world, tp, pp, cp, ep = sizes
    layout = plan(world, tp=tp, pp=pp, cp=cp, ep=ep)
    rank = data.draw(st.integers(0, world - 1))
    kinds = list(KINDS)
    with fake_world(world, rank):
        registry = GroupRegistry()
        groups = registry.ensure([Partition.from_layout(layout, k, rank) for k in kinds])
        for kind, group in zip(kinds, groups):
            assert _ranks_of(group) == layout.group_of(kind, rank)
        # one communicator per rank set and channel: the all-gather twins have a channel of their own
        distinct = {(KINDS[k].twin_of is not None, tuple(layout.group_of(k, rank))) for k in kinds}
        assert len({id(g) for g in groups}) == len(distinct)
        world_held = (False, tuple(range(world))) in distinct  # the default group, not created
        assert registry.created == len(distinct) - world_held


# -- strategy choice on gloo (world of one, in process) ------------------------------


def test_forcing_split_group_without_a_bound_device_is_a_clear_error():
    with gloo_world_of_one():
        with pytest.raises(GroupCreationError, match="bound to a device"):
            GroupRegistry(strategy="split_group")


def test_each_runnable_strategy_can_be_forced_on_gloo():
    with gloo_world_of_one():
        assert GroupRegistry(strategy="local_new_group").strategy == "local_new_group"
        assert GroupRegistry(strategy="new_group").strategy == "new_group"


def test_a_single_rank_world_needs_no_plan_check():
    with gloo_world_of_one():
        registry = GroupRegistry()
        (group,) = registry.ensure([_whole_world(0, 1)])
        assert registry.verify_plan is False
        assert _sum_of_ranks(group) == 0


# -- bad input ------------------------------------------------------------------------


def test_a_registry_needs_an_initialised_world():
    with pytest.raises(GroupCreationError, match="not initialised"):
        GroupRegistry()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "fastest"}, "unknown group creation strategy 'fastest'"),
        ({"agreement_timeout": 0}, "agreement_timeout must be a positive number"),
        ({"agreement_timeout": True}, "agreement_timeout must be a positive number"),
        ({"timeout": 30}, "timeout must be a positive datetime.timedelta"),
        ({"timeout": datetime.timedelta(0)}, "timeout must be a positive datetime.timedelta"),
        ({"verify_plan": "yes"}, "verify_plan must be True, False or None"),
    ],
)
def test_bad_registry_arguments_are_named(kwargs, match):
    with fake_world(8, 0):
        with pytest.raises(GroupCreationError, match=match):
            GroupRegistry(**kwargs)


def _tp_partition(rank: int = 5, **changes: Any) -> Partition:
    return dataclasses.replace(Partition.from_layout(plan(16, tp=4), "tp", rank), **changes)


@pytest.mark.parametrize(
    "partition, match",
    [
        (_tp_partition(own=(0, 1, 2, 3)), "does not contain rank 5"),
        (_tp_partition(own=(5, 4, 6, 7)), "must be ascending without repeats"),
        (_tp_partition(own=(4, 5, 6)), "has 3 ranks, but group_size is 4"),
        (_tp_partition(own=(5, 6, 7, 16)), r"ranks \[16\] are outside the world of 16"),
        (_tp_partition(own=(1, 3, 5, 7)), "not made of translates"),
        (_tp_partition(own=None), "gives rank 5 no group"),
        (_tp_partition(num_groups=8), "more than the world of 16"),
        (_tp_partition(group_size=0), "both must be >= 1"),
        (_tp_partition(group_size=4.0), "must be an integer"),
        (_tp_partition(key=""), "non-empty string key"),
        (_tp_partition(groups=lambda: iter(())), "enumerates no groups"),
        (_tp_partition(groups=lambda: [[0, 0, 1, 2]]), "repeats a rank"),
    ],
)
def test_malformed_partitions_are_rejected_with_the_numbers(partition, match):
    with fake_world(16, 5):
        registry = GroupRegistry()
        with pytest.raises(LayoutError, match=match):
            registry.ensure([partition])
        assert registry.created == 0


def test_ensure_takes_partitions_only():
    with fake_world(16, 5):
        with pytest.raises(LayoutError, match="takes Partition objects, got list"):
            GroupRegistry().ensure([[4, 5, 6, 7]])


def test_an_empty_batch_creates_nothing():
    with fake_world(16, 5):
        assert GroupRegistry().ensure([]) == []


def test_borrowing_a_group_under_the_wrong_ranks_is_refused():
    with fake_world(16, 5):
        group = dist.new_group([4, 5], use_local_synchronization=True)
        with pytest.raises(GroupCreationError, match=r"actually holds ranks \[4, 5\]"):
            GroupRegistry().borrow([5, 6], group)


def test_borrowing_ranks_without_this_rank_is_refused():
    with fake_world(16, 5):
        group = dist.new_group([4, 5], use_local_synchronization=True)
        with pytest.raises(GroupCreationError, match="do not include rank 5"):
            GroupRegistry().borrow([0, 1], group)


def test_borrowing_no_group_is_refused():
    with fake_world(16, 5):
        with pytest.raises(GroupCreationError, match="not a process group this rank belongs to"):
            GroupRegistry().borrow([4, 5], None)


# --------------------------------------------------------------------------------------
# The reuse rule's premise, on layouts (pure arithmetic)
# --------------------------------------------------------------------------------------


@settings(max_examples=80)
@given(
    st.sampled_from([1, 2, 4]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([1, 2, 3]),
    st.sampled_from(["tp-cp-ep-dp-pp", "tp-cp-dp-ep-pp", "tp-pp-dp-cp-ep"]),
    st.data(),
)
def test_one_shared_group_means_the_whole_partitions_are_equal(tp, pp, cp, ep, dp_factor, order, data):
    """The registry decides reuse from this rank's group alone; that is sound because two
    covering partitions of translates that share one group are the same partition."""
    world = tp * pp * cp * ep * dp_factor
    try:
        layout = plan(world, tp=tp, pp=pp, cp=cp, ep=ep, order=order)
    except LayoutError:
        return
    rank = data.draw(st.integers(0, world - 1))
    for a, b in itertools.combinations(KINDS, 2):
        if layout.group_of(a, rank) == layout.group_of(b, rank):
            assert sorted(map(tuple, layout.groups(a))) == sorted(map(tuple, layout.groups(b)))


# -- without the cross-rank check (fake backend): families that leave ranks out --------------


def test_a_standalone_collection_without_the_check_is_member_only_where_torch_allows_and_one_group_per_rank_set():
    import mpu_bridge
    from mpu_bridge.pg_collection import collection_groups

    world, rank = 4096, 2053  # tp 4, pp 4: stage 2 of its pipeline, in no embedding group
    moves_counter = member_only_moves_counter()
    with fake_world(world, rank):
        bridge = mpu_bridge.attach(None, tp=4, pp=4)
        groups = collection_groups(bridge)
        sets = {tuple(sorted(dist.get_process_group_ranks(g))) for g in groups.values() if g is not None}
        assert groups["embd"] is None and groups["pos_embd"] is None
        assert groups["intra_dist_opt"] is dist.group.WORLD  # the world: the default group
        # the embedding families come last; every rank enters them where creating a member-only
        # group would move PyTorch's group counter on their members alone (torch >= 2.14)
        assert bridge.stats()["fallbacks"] == (1 if moves_counter else 0)
        assert bridge.stats()["created"] == len(sets) - 1
        bridge.close()


def test_without_the_check_requests_after_a_family_that_left_ranks_out_fall_back():
    # Embedding groups were created member-only, so the ranks' group counts may differ; no
    # rank can see the others' counts without the check, so the next creation enters
    # every group (rank 2053 is on a middle stage, in no embedding group).
    import mpu_bridge

    with fake_world(4096, 2053):
        bridge = mpu_bridge.attach(None, tp=4, pp=4)
        bridge.embedding_groups()
        before = bridge.stats()["fallbacks"]
        bridge.zero_param_groups(2)
        assert bridge.stats()["fallbacks"] == before + 1
        assert bridge.registry.last_strategy == "new_group"
        bridge.close()


def test_without_the_check_a_rank_outside_a_family_made_earlier_does_not_enter_it_again():
    # Asking again for a family that left this rank out: its members reuse their groups, so
    # this rank must not enter the all-ranks loop alone (its group counter would run ahead).
    layout = plan(16, tp=2, pp=4)
    with fake_world(16, 5):  # stage 1 of its pipeline: in no embedding group
        registry = GroupRegistry(strategy="new_group")
        embedding = partitions.embedding(layout, 5)
        assert embedding.own is None
        with counting_new_group() as first:
            registry.ensure([embedding])
        with counting_new_group() as again:
            assert registry.ensure([embedding]) == [None]
        assert (first["all"], again) == (embedding.num_groups, {"all": 0, "local": 0})
