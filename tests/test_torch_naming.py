"""How PyTorch names member-only groups, and the registry's safety check on every torch line.

PyTorch names a ``new_group(ranks, use_local_synchronization=True)`` group
``sha1("r0_r1_..._<salt>")``; up to torch 2.13 the salt is the number of groups the
process holds, from 2.14 it is PyTorch's group counter (which then also moves with
every member-only group). The bridge finds the rule by behaviour
(:func:`mpu_bridge._torch.member_only_naming`). These tests hold on every supported
torch, whichever rule it has; where the expected outcome differs by rule, the rule is
observed independently (:mod:`_torch_rule`).

* one process playing one rank of a big world (``fake`` backend): the probe's prediction
  against PyTorch's real names after many histories; an unrecognised PyTorch (fault
  injection: a patched private hash) gets the all-ranks loop and one log line;
* real worlds of gloo processes: a group counter skew that the held counts hide, and an
  unrecognised PyTorch on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from _multiproc import run_ranks
from _torch_rule import member_only_moves_counter
from mpu_bridge import _torch, strategies
from mpu_bridge.errors import BridgeError, GroupCreationError
from mpu_bridge.layout import plan
from mpu_bridge.registry import GroupRegistry, Partition


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


@pytest.fixture(autouse=True)
def trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts (and leaves the process) with member-only naming trusted."""
    monkeypatch.setattr(_torch, "_doubt", None)


def _foreign_hash(ranks: Any) -> str:
    """A member-only naming rule no PyTorch release had: salted with a constant."""
    return _torch.hashed_group_name(ranks, 10**6)


# -- the probe, against PyTorch's real names (fake backend, one process) -------------------------


def _next_member_only_name_is_predicted(own: List[int]) -> bool:
    naming = _torch.member_only_naming()
    group = dist.new_group(own, use_local_synchronization=True)
    return naming.recognised and c10d._world.pg_names[group] == _torch.hashed_group_name(own, naming.salt)


def test_the_probe_predicts_the_name_when_held_groups_and_the_counter_differ():
    # Rank 5 enters an all-ranks group it is not in: the counter moves, the held count does not.
    with fake_world(16, 5):
        dist.new_group([0, 1])
        assert len(c10d._world.pg_names) != c10d._world.group_count
        naming = _torch.member_only_naming()
        assert naming.source in _torch.SALT_SOURCES
        assert _next_member_only_name_is_predicted([4, 5, 6, 7])


def test_the_probe_predicts_pytorchs_names_after_every_kind_of_history():
    with fake_world(16, 5):
        steps = [
            lambda: dist.new_group([0, 1]),  # all-ranks, not a member
            lambda: dist.new_group([4, 5]),  # all-ranks, a member
            lambda: dist.new_group([5], use_local_synchronization=True),  # member-only
            lambda: dist.destroy_process_group(dist.new_group([5, 6], use_local_synchronization=True)),
            lambda: [dist.new_group([r, r + 1]) for r in range(0, 16, 2)],  # megatron-style loop
        ]
        for i, step in enumerate(steps * 2):
            step()
            own = [[5], [4, 5], [5, 6, 7], [4, 5, 6, 7]][i % 4]
            assert _next_member_only_name_is_predicted(own), f"after step {i}"


def test_the_probe_only_reads():
    with fake_world(16, 5):
        dist.new_group([0, 1])
        before = (c10d._world.group_count, dict(c10d._world.pg_names))
        _torch.member_only_naming()
        assert (c10d._world.group_count, dict(c10d._world.pg_names)) == before


def test_when_both_candidates_are_equal_the_probe_says_so_and_assumes_the_counter_may_move():
    with fake_world(16, 5):
        if len(c10d._world.pg_names) != c10d._world.group_count:
            pytest.skip("this PyTorch starts a world with unequal held count and counter")
        naming = _torch.member_only_naming()
        assert (naming.source, naming.salt, naming.counter_apart) == ("both", c10d._world.group_count, False)


def test_member_only_creation_through_the_registry_keeps_trusting_the_naming(caplog):
    layout = plan(64, tp=4, ep=2)
    with fake_world(64, 9), caplog.at_level(logging.WARNING, logger="mpu_bridge"):
        dist.new_group([0, 1])  # held count and counter differ from here on
        registry = GroupRegistry()
        registry.ensure([Partition.from_layout(layout, k, 9) for k in ("tp", "dp", "ep")])
        assert registry.last_strategy == "local_new_group" and registry.created == 3
        assert _torch.member_only_naming().recognised
    assert not [r for r in caplog.records if "named a member-only group" in r.getMessage()]


# -- an unrecognised PyTorch (fault injection) ------------------------------------------------------


def test_a_foreign_naming_rule_is_not_recognised_and_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(c10d, "_hash_ranks_to_str", _foreign_hash)
    with fake_world(16, 5):
        naming = _torch.member_only_naming()
        assert not naming.recognised and naming.salt is None
        assert "_hash_ranks_to_str salts member-only group names with neither" in naming.problem


def test_a_missing_hash_function_is_not_recognised_and_named(monkeypatch):
    monkeypatch.delattr(c10d, "_hash_ranks_to_str")
    with fake_world(16, 5):
        naming = _torch.member_only_naming()
        assert not naming.recognised and "has no _hash_ranks_to_str" in naming.problem


def test_an_unrecognised_pytorch_gets_the_all_ranks_loop_and_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(c10d, "_hash_ranks_to_str", _foreign_hash)
    monkeypatch.setattr(strategies, "_told", set())
    layout = plan(16, tp=4)
    with fake_world(16, 5), caplog.at_level(logging.WARNING, logger="mpu_bridge"):
        first, second = GroupRegistry(), GroupRegistry()
        assert (first.strategy, second.strategy) == ("new_group", "new_group")
        (group,) = first.ensure([Partition.from_layout(layout, "tp", 5)])
        assert sorted(dist.get_process_group_ranks(group)) == [4, 5, 6, 7]
    lines = [r.getMessage() for r in caplog.records if "not recognised" in r.getMessage()]
    assert len(lines) == 1 and "_hash_ranks_to_str" in lines[0]


def test_forcing_member_only_creation_on_an_unrecognised_pytorch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(c10d, "_hash_ranks_to_str", _foreign_hash)
    with fake_world(16, 5):
        with pytest.raises(GroupCreationError, match="naming is not recognised: .*_hash_ranks_to_str"):
            GroupRegistry(strategy="local_new_group")


def test_a_name_pytorch_gives_otherwise_than_predicted_ends_member_only_creation(monkeypatch, caplog):
    # PyTorch's naming path (not the probed hash) changes: the first creation shows it.
    real = c10d._process_group_name
    monkeypatch.setattr(c10d, "_process_group_name", lambda ranks, use_hashed_name: real(ranks, use_hashed_name) + "x")
    layout = plan(16, tp=4)
    with fake_world(16, 5), caplog.at_level(logging.WARNING, logger="mpu_bridge"):
        registry = GroupRegistry()
        registry.ensure([Partition.from_layout(layout, "tp", 5)])
        assert registry.last_strategy == "local_new_group"
        assert not _torch.member_only_naming().recognised
        registry.ensure([Partition.from_layout(layout, "dp", 5)])
        assert registry.last_strategy == "new_group"
        assert GroupRegistry().strategy == "new_group"
    assert any("named a member-only group" in r.getMessage() for r in caplog.records)


def test_a_group_counter_that_moves_otherwise_than_the_rule_says_ends_member_only_creation(monkeypatch, caplog):
    real = c10d._process_group_name

    def moves_twice(ranks: Any, use_hashed_name: bool) -> Any:
        name = real(ranks, use_hashed_name)
        if use_hashed_name:
            c10d._world.group_count += 1  # one more than any known rule
        return name

    monkeypatch.setattr(c10d, "_process_group_name", moves_twice)
    with fake_world(16, 5), caplog.at_level(logging.WARNING, logger="mpu_bridge"):
        dist.new_group([0, 1])  # held count and counter differ: the probe is unambiguous
        GroupRegistry().ensure([Partition.from_layout(plan(16, tp=4), "tp", 5)])
        assert not _torch.member_only_naming().recognised
    assert any("moved PyTorch's group counter by" in r.getMessage() for r in caplog.records)


# -- real worlds --------------------------------------------------------------------------------------


def _sum_of_ranks(group: Any) -> int:
    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _attempt(fn: Any) -> tuple:
    try:
        return ("ok", fn())
    except BridgeError as exc:
        return (type(exc).__name__, str(exc))


def _counter_skew_world(rank: int, world: int) -> Dict[str, Any]:
    """Rank 0 alone enters an all-ranks group it is not in: its group counter is one ahead,
    every rank still holds the same number of groups. Then tp [0, 1] [2, 3] is asked for."""
    tp = Partition.from_layout(plan(world, tp=2), "tp", rank)
    registry = GroupRegistry(agreement_timeout=30, timeout=datetime.timedelta(seconds=20))
    if rank == 0:
        dist.new_group([3])  # no rendezvous for a non-member (TORCH_DIST_INIT_BARRIER is 0)
    obs: Dict[str, Any] = {"held": len(c10d._world.pg_names), "counter": c10d._world.group_count}
    outcome = _attempt(lambda: _sum_of_ranks(registry.ensure([tp])[0]))
    obs["outcome"] = outcome
    obs["strategy"] = registry.last_strategy
    return obs


def test_a_group_counter_skew_that_the_held_counts_hide_never_misnames_a_group():
    observed = run_ranks(_counter_skew_world, 4, timeout=150)
    assert len({o["held"] for o in observed}) == 1 and observed[0]["counter"] == observed[1]["counter"] + 1
    if member_only_moves_counter():
        # The salt is the counter: group [0, 1] would be named differently on its members,
        # and the all-ranks loop would misname every group: a clear error, not a hang.
        assert [o["outcome"][0] for o in observed] == ["GroupCreationError"] * 4
        assert "group counter, which names every all-ranks group, differs" in observed[1]["outcome"][1]
    else:
        # The salt is the held count, equal everywhere: member-only creation is safe.
        assert [o["outcome"] for o in observed] == [("ok", 1), ("ok", 1), ("ok", 5), ("ok", 5)]
        assert [o["strategy"] for o in observed] == ["local_new_group"] * 4


def _unrecognised_world(rank: int, world: int) -> Dict[str, Any]:
    """Every rank runs a PyTorch whose member-only naming the bridge does not know."""
    records: List[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mpu_bridge").addHandler(handler)
    c10d._hash_ranks_to_str = _foreign_hash
    layout = plan(world, tp=2)
    registry = GroupRegistry(agreement_timeout=30)
    pair = Partition("pair01", 2, 1, (0, 1) if rank < 2 else None, lambda: [[0, 1]])
    groups = registry.ensure([Partition.from_layout(layout, k, rank) for k in ("tp", "dp")] + [pair])
    return {
        "strategy": (registry.strategy, registry.last_strategy),
        "sums": [None if g is None else _sum_of_ranks(g) for g in groups],
        "lines": [line for line in records if "not recognised" in line],
    }


def test_an_unrecognised_pytorch_on_every_rank_still_gets_exactly_its_groups():
    observed = run_ranks(_unrecognised_world, 4, timeout=150)
    assert [o["strategy"] for o in observed] == [("new_group", "new_group")] * 4
    assert [o["sums"] for o in observed] == [[1, 2, 1], [1, 4, 1], [5, 2, None], [5, 4, None]]
    assert all(len(o["lines"]) == 1 and "_hash_ranks_to_str" in o["lines"][0] for o in observed)
