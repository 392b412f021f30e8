"""The cross-rank plan check (mpu_bridge.agreement), with ranks simulated by threads.

Each thread plays one rank against one shared in-memory ``HashStore`` — the same
store operations a real world performs against its TCPStore (the multi-process
version is in test_registry.py). No process groups are involved.
"""

from __future__ import annotations

import datetime
import gc
import threading
from typing import Any, Callable, Dict, List

import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from mpu_bridge.agreement import Table, agree, format_ranks
from mpu_bridge.errors import BridgeError, GroupCreationError, PlanMismatchError


def run_threads(world: int, fn: Callable[[int], Any], timeout: float = 30.0) -> List[Any]:
    """Run ``fn(rank)`` in one thread per rank; each slot holds the result or the exception."""
    results: List[Any] = [None] * world

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise AssertionError("a simulated rank is still blocked: the agreement hung")
    return results


def plans_round(store: Any, digests: Dict[int, str], timeout: float = 10.0, facts=None):
    world = len(digests)

    def rank_fn(rank: int):
        return agree(
            store,
            rank=rank,
            world_size=world,
            digest=digests[rank],
            summary=f"plan {digests[rank]}",
            facts=None if facts is None else facts[rank],
            timeout=timeout,
        )

    return run_threads(world, rank_fn)


def test_equal_digests_agree_on_every_rank_in_round_one():
    results = plans_round(dist.HashStore(), {r: "A" for r in range(4)})
    assert [r.round for r in results] == [1, 1, 1, 1]


def test_rounds_count_per_rank_so_the_nth_call_meets_the_nth_call():
    store = dist.HashStore()
    plans_round(store, {r: "A" for r in range(3)})
    results = plans_round(store, {r: "B" for r in range(3)})
    assert [r.round for r in results] == [2, 2, 2]


class CountingStore:
    """A store that counts each simulated rank's operations (the rank is the thread's name)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.ops: Dict[str, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                who = threading.current_thread().name
                self.ops[who] = self.ops.get(who, 0) + 1
            return attr(*args, **kwargs)

        return counted


def test_a_round_where_every_rank_agrees_costs_at_most_four_store_operations_per_rank():
    store = CountingStore(dist.HashStore())
    facts = {r: {"reuse": "10", "seq": "7", "salt": "7"} for r in range(8)}
    results = plans_round(store, {r: "A" for r in range(8)}, facts=facts)
    assert all(r.all_unanimous for r in results)
    # the last to arrive writes the outcome (3), the others wait for it and read it (4)
    assert sorted(store.ops.values()) == [3] + [4] * 7


def test_a_unanimous_round_leaves_three_keys_whatever_the_world_size():
    for world in (2, 16):
        store = dist.HashStore()
        plans_round(store, {r: "A" for r in range(world)})
        assert store.num_keys() == 3


def test_a_mismatch_is_known_on_every_rank_when_the_last_rank_arrives_not_after_the_timeout():
    # run_threads gives up (an AssertionError) after 30 s; the agreement timeout is 600 s
    results = plans_round(dist.HashStore(), {0: "a", 1: "b", 2: "a"}, timeout=600.0)
    assert all(isinstance(r, PlanMismatchError) for r in results)


def test_a_rank_that_skipped_a_call_meets_the_others_again_once_back_in_step():
    store = dist.HashStore()
    with pytest.raises(GroupCreationError):  # rank 1 skipped this call
        agree(store, rank=0, world_size=2, digest="A", summary="A", timeout=0.3)
    # the next call on both ranks: rank 1 joins the round that ended without it, moves on
    results = plans_round(store, {0: "B", 1: "B"})
    assert [r.round for r in results] == [2, 2]


def test_different_digests_raise_plan_mismatch_on_every_rank():
    results = plans_round(dist.HashStore(), {0: "ep2", 1: "ep2", 2: "ep4", 3: "ep4"})
    assert all(isinstance(r, PlanMismatchError) for r in results)


def test_plan_mismatch_names_the_ranks_of_each_plan():
    results = plans_round(dist.HashStore(), {0: "ep2", 1: "ep2", 2: "ep4", 3: "ep4"})
    message = str(results[0])
    assert "ranks [0-1] planned plan ep2" in message
    assert "ranks [2-3] planned plan ep4" in message


def test_plan_mismatch_message_is_the_same_on_every_rank():
    results = plans_round(dist.HashStore(), {0: "x", 1: "y", 2: "x"})
    assert len({str(r) for r in results}) == 1


def test_one_odd_rank_is_named_alone():
    results = plans_round(dist.HashStore(), {0: "a", 1: "a", 2: "b", 3: "a"})
    assert "ranks [0-1, 3] planned plan a; ranks [2] planned plan b" in str(results[1])


def test_a_rank_that_never_arrives_ends_the_round_with_a_timeout_naming_it():
    store = dist.HashStore()

    def rank_fn(rank: int):
        if rank == 2:
            return "stayed away"
        return agree(store, rank=rank, world_size=4, digest="A", summary="A", timeout=2.0)

    results = run_threads(4, rank_fn)
    for rank in (0, 1, 3):
        assert isinstance(results[rank], GroupCreationError)
        assert "ranks [2] of 4 never arrived" in str(results[rank])


def test_the_timeout_message_names_the_configured_timeout():
    store = dist.HashStore()
    with pytest.raises(GroupCreationError, match=r"agreement timeout of 0\.5 s"):
        agree(store, rank=0, world_size=2, digest="A", summary="A", timeout=0.5)


def test_a_rank_arriving_after_the_timeout_raises_too_instead_of_going_ahead():
    store = dist.HashStore()
    with pytest.raises(GroupCreationError):
        agree(store, rank=0, world_size=2, digest="A", summary="A", timeout=0.3)
    # Rank 1 arrives after rank 0 gave up: the round it was late for has ended (and its
    # epoch with it), so rank 1 starts the next epoch's first round, where rank 0 never
    # comes; it raises too, saying it missed the failed round, instead of going ahead.
    with pytest.raises(GroupCreationError, match=r"ranks \[0\] of 2 never arrived.*this rank itself missed"):
        agree(store, rank=1, world_size=2, digest="A", summary="A", timeout=0.5)


def test_several_missing_ranks_are_all_named():
    store = dist.HashStore()

    def rank_fn(rank: int):
        if rank in (1, 5, 6):
            return None
        return agree(store, rank=rank, world_size=8, digest="A", summary="A", timeout=2.0)

    results = run_threads(8, rank_fn)
    assert "ranks [1, 5-6] of 8 never arrived" in str(results[0])


def test_a_store_that_went_away_is_reported_as_a_group_creation_error():
    server = dist.TCPStore(
        "127.0.0.1", 0, None, True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5)
    )
    client = dist.TCPStore("127.0.0.1", server.port, None, False, timeout=datetime.timedelta(seconds=5))
    del server  # the process hosting the store died
    gc.collect()
    with pytest.raises(GroupCreationError, match="the default store failed"):
        agree(client, rank=0, world_size=2, digest="A", summary="A", timeout=5)


def test_unanimous_facts_are_reported_unanimous():
    facts = {r: {"names": "3", "reuse": "10"} for r in range(3)}
    results = plans_round(dist.HashStore(), {r: "A" for r in range(3)}, facts=facts)
    assert all(r.unanimous == {"names": True, "reuse": True} for r in results)


def test_a_differing_fact_is_reported_on_every_rank_without_raising():
    facts = {0: {"names": "3"}, 1: {"names": "3"}, 2: {"names": "4"}}
    results = plans_round(dist.HashStore(), {r: "A" for r in range(3)}, facts=facts)
    assert [r.is_unanimous("names") for r in results] == [False, False, False]


def grouped_round(pairs: Dict[int, Any], salt: Dict[int, str]) -> List[Any]:
    """One round where rank r publishes fact "salt" as ``salt[r]`` and grouped fact "held"
    as ``pairs[r]`` (a value the facts determine, as agree() requires)."""
    store, world = dist.HashStore(), len(pairs)
    return run_threads(
        world,
        lambda rank: agree(store, rank=rank, world_size=world, digest="A", summary="A", timeout=10,
                           facts={"salt": salt[rank]}, grouped={"held": pairs[rank]}),
    )


def test_a_grouped_fact_agrees_when_each_groups_members_publish_one_value():
    # groups [0, 1] and [2, 3]; the groups differ from each other, their members do not
    pairs = {0: ("0", "5"), 1: ("0", "5"), 2: ("2", "6"), 3: ("2", "6")}
    results = grouped_round(pairs, {0: "5", 1: "5", 2: "6", 3: "6"})
    assert [r.groups_agree("held", 2) for r in results] == [True] * 4
    assert [r.distinct["held"] for r in results] == [2] * 4


def test_a_grouped_fact_disagrees_when_a_groups_members_differ():
    pairs = {0: ("0", "5"), 1: ("0", "6"), 2: ("2", "6"), 3: ("2", "6")}
    results = grouped_round(pairs, {0: "5", 1: "6", 2: "6", 3: "6"})
    assert [r.groups_agree("held", 2) for r in results] == [False] * 4
    assert [r.distinct["held"] for r in results] == [3] * 4


def test_ranks_in_no_group_publish_no_pair_of_a_grouped_fact():
    pairs = {0: ("0", "5"), 1: ("0", "5"), 2: None, 3: None}
    results = grouped_round(pairs, {0: "5", 1: "5", 2: "4", 3: "4"})
    assert [r.distinct["held"] for r in results] == [1] * 4


def test_grouped_facts_are_not_counted_when_every_fact_is_unanimous():
    # the facts determine the grouped values, so equal facts mean every group agrees
    pairs = {0: ("0", "5"), 1: ("0", "5"), 2: None, 3: None}
    results = grouped_round(pairs, {r: "5" for r in range(4)})
    assert [r.distinct["held"] for r in results] == [None] * 4
    assert all(r.groups_agree("held", 1) for r in results)


def test_collect_groups_the_ranks_by_fact_value_identically_on_every_rank():
    store = dist.HashStore()
    facts = {0: {"reuse": "1-"}, 1: {"reuse": "1-"}, 2: {"reuse": "-0"}}

    def rank_fn(rank: int) -> Table:
        result = agree(
            store, rank=rank, world_size=3, digest="A", summary="A", facts=facts[rank], timeout=10
        )
        return result.collect()

    tables = run_threads(3, rank_fn)
    assert tables[0].facts["reuse"] == (((0, 1), "1-"), ((2,), "-0"))
    assert tables[0] == tables[1] == tables[2]


def test_long_fact_values_are_compared_by_hash():
    long_value = "1" * 500
    facts = {r: {"reuse": long_value} for r in range(2)}
    results = plans_round(dist.HashStore(), {0: "A", 1: "A"}, facts=facts)
    assert all(r.is_unanimous("reuse") for r in results)


def test_a_single_rank_world_agrees_with_itself():
    result = agree(dist.HashStore(), rank=0, world_size=1, digest="A", summary="A", timeout=1)
    assert result.round == 1


def test_bad_arguments_are_bridge_errors():
    with pytest.raises(BridgeError, match="outside a world of 2"):
        agree(dist.HashStore(), rank=2, world_size=2, digest="A", summary="A")
    with pytest.raises(BridgeError, match="must be a positive number of seconds"):
        agree(dist.HashStore(), rank=0, world_size=2, digest="A", summary="A", timeout=0)


@pytest.mark.parametrize(
    "ranks, text",
    [
        ([], "[]"),
        ([3], "[3]"),
        ([0, 1, 2, 5], "[0-2, 5]"),
        ([7, 0, 1], "[0-1, 7]"),
        ([0, 2, 4], "[0, 2, 4]"),
    ],
)
def test_format_ranks_compresses_runs(ranks, text):
    assert format_ranks(ranks) == text


def test_format_ranks_cuts_long_lists_with_a_count():
    assert format_ranks(range(0, 200, 2), limit=3) == "[0, 2, 4, ... (100 ranks in all)]"


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 300), max_size=60))
def test_format_ranks_lists_exactly_the_given_ranks(ranks):
    text = format_ranks(sorted(ranks), limit=10_000)
    listed = set()
    for part in filter(None, text.strip("[]").split(", ")):
        lo, _, hi = part.partition("-")
        listed.update(range(int(lo), int(hi or lo) + 1))
    assert listed == ranks
