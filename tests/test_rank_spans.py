"""Rank spans: a standalone layout over ranks ``[rank_offset, rank_offset + local_world_size)``
(megatron-core's ``initialize_model_parallel(rank_offset=, local_world_size=)``), issue 18.

A multi-module trainer (a vision encoder on some ranks, the language model on the
others) builds one bridge per module. As with megatron-core's ``rank_offset`` and
``HyperCommGrid``, every rank of the world builds every module's bridge and makes
its requests alike; only a span's members create (and hold) its groups, so two
modules' groups never mix, and a rank outside a span gets a clear error from that
bridge for any group, never a hang.

The pure part (rank lists) is written out for small spans; the multi-rank scenarios
(one spawned world of 6 gloo ranks each) sit next to their assertions.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from _multiproc import run_ranks
from mpu_bridge import partitions
from mpu_bridge.errors import LayoutError
from mpu_bridge.layout import ParallelConfig, plan

# -- the layout of a span (pure) ----------------------------------------------------------


def test_a_span_layout_is_the_zero_based_layout_shifted_by_its_offset():
    span = plan(8, tp=2, pp=2, rank_offset=8)
    assert span.groups("tp") == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert span.groups("pp") == [[8, 12], [9, 13], [10, 14], [11, 15]]
    assert span.groups("dp") == [[8, 10], [9, 11], [12, 14], [13, 15]]
    assert span.group_of("dp", 13) == [13, 15]
    assert span.group_view_of("pp", 9).first(2) == [9, 13]
    assert list(span.ranks) == list(range(8, 16))


def test_a_span_answers_positions_and_indices_of_global_ranks():
    span = plan(8, tp=2, pp=2, rank_offset=8)
    assert span.rank_in_group("pp", 13) == 1
    assert span.group_index("tp", 12) == 2
    assert [span.holds(r) for r in (7, 8, 15, 16)] == [False, True, True, False]


def test_a_rank_outside_the_span_is_refused_with_the_span_named():
    span = plan(4, tp=2, rank_offset=4)
    with pytest.raises(LayoutError, match=r"rank 3 is outside this layout's ranks 4\.\.7"):
        span.group_of("tp", 3)


def test_a_negative_rank_offset_is_refused():
    with pytest.raises(LayoutError, match="rank_offset must be an integer >= 0"):
        plan(4, rank_offset=-1)


def test_rank_offset_must_be_an_integer():
    with pytest.raises(LayoutError, match="rank_offset"):
        ParallelConfig(4, rank_offset=1.5)  # type: ignore[arg-type]


def test_the_config_of_a_span_says_its_offset_and_a_world_layout_does_not():
    assert plan(4, tp=2, rank_offset=4).to_dict()["config"]["rank_offset"] == 4
    assert "rank_offset" not in plan(4, tp=2).to_dict()["config"]
    assert plan(4, tp=2, rank_offset=4).to_dict()["kinds"]["tp"]["groups"] == [[4, 5], [6, 7]]


def test_a_node_aligned_span_keeps_tensor_parallel_inside_nodes():
    assert plan(8, tp=4, rank_offset=8, gpus_per_node=8).intra_node("tp")


def test_a_span_not_aligned_to_nodes_is_judged_by_its_actual_groups():
    # ranks 6..13 on nodes of 8: tp group [6, 7, 8, 9] crosses from node 0 to node 1
    assert not plan(8, tp=4, rank_offset=6, gpus_per_node=4).intra_node("tp")
    # ranks 4..11 on nodes of 8 with tp 4: [4..7] and [8..11], each inside one node
    assert plan(8, tp=4, rank_offset=4, gpus_per_node=4).intra_node("tp")


def test_partitions_of_a_span_leave_outsiders_in_no_group():
    span = plan(4, tp=2, pp=2, rank_offset=2)
    assert partitions.dense(span, "tp", 1).own is None
    assert partitions.dense(span, "tp", 3).own == (2, 3)
    assert partitions.embedding(span, 1).own is None
    assert partitions.embedding(span, 4).own == (2, 4)
    assert partitions.world(4, 5, rank_offset=2).own == (2, 3, 4, 5)
    assert not partitions.dense(span, "tp", 3).covers(6)


def test_the_expert_layout_of_a_span_keeps_the_span():
    span = partitions.expert_layout(plan(4, tp=2, rank_offset=4), 2)
    assert span.groups("ep") == [[4, 6], [5, 7]]


# -- two modules on one world (6 gloo ranks) -----------------------------------------------

WORLD = 6
ENCODER = dict(tp=1, local_world_size=2)  # ranks 0, 1
LLM = dict(tp=2, pp=2, rank_offset=2, local_world_size=4)  # ranks 2..5


def _sum_over(group: Any, rank: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank])
    dist.all_reduce(t, group=group)
    return int(t)


def _two_modules(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.errors import BridgeError

    encoder = mpu_bridge.attach(None, **ENCODER)
    llm = mpu_bridge.attach(None, **LLM)
    kinds = ["tp", "pp", "dp", "mp"]
    obs: Dict[str, Any] = {"errors": {}, "groups": {}, "sums": {}, "world_errors": {}}
    for name, bridge in (("encoder", encoder), ("llm", llm)):  # every rank, both modules alike
        bridge.prepare(kinds, embedding=True)
        try:
            bridge.world()  # collective: the outsiders take part and get the error after
        except BridgeError as exc:
            obs["world_errors"][name] = type(exc).__name__
    for name, bridge in (("encoder", encoder), ("llm", llm)):
        try:
            tp = bridge.tensor_parallel()
            dp = bridge.data_parallel()
            obs["groups"][name] = {"tp": tp.ranks, "dp": dp.ranks, "pp": bridge.pipeline_parallel().ranks,
                                   "world": bridge.world().ranks}
            obs["sums"][name] = {"tp": _sum_over(tp.group, rank), "dp": _sum_over(dp.group, rank)}
        except BridgeError as exc:
            obs["errors"][name] = str(exc)
    obs["created"] = {"encoder": encoder.stats()["created"], "llm": llm.stats()["created"]}
    encoder.close()
    llm.close()
    return obs


def test_two_span_bridges_give_each_module_its_own_groups_and_outsiders_a_clear_error():
    observed = run_ranks(_two_modules, WORLD)
    assert [sorted(obs["groups"]) for obs in observed] == [["encoder"]] * 2 + [["llm"]] * 4
    assert [obs["groups"].get("encoder", {}).get("dp") for obs in observed[:2]] == [(0, 1), (0, 1)]
    assert [obs["groups"]["llm"]["tp"] for obs in observed[2:]] == [(2, 3), (2, 3), (4, 5), (4, 5)]
    assert [obs["groups"]["llm"]["pp"] for obs in observed[2:]] == [(2, 4), (3, 5), (2, 4), (3, 5)]
    assert [obs["groups"]["llm"]["world"] for obs in observed[2:]] == [(2, 3, 4, 5)] * 4
    # the collectives ran on the groups: each sum is its members' ranks
    assert [obs["sums"]["llm"]["tp"] for obs in observed[2:]] == [5, 5, 9, 9]
    assert [obs["sums"]["encoder"]["dp"] for obs in observed[:2]] == [1, 1]
    outside = [{"llm": "OutsideSpanError"}] * 2 + [{"encoder": "OutsideSpanError"}] * 4
    assert [obs["world_errors"] for obs in observed] == outside
    for obs in observed[:2]:
        assert "outside this bridge's rank span 2..5" in obs["errors"]["llm"]
    for obs in observed[2:]:
        assert "outside this bridge's rank span 0..1" in obs["errors"]["encoder"]
    # only members hold the span's groups; outsiders created none of them
    assert [obs["created"]["llm"] for obs in observed[:2]] == [0, 0]
    assert [obs["created"]["encoder"] for obs in observed[2:]] == [0, 0, 0, 0]


def _span_past_the_world(rank: int, world: int) -> str:
    import mpu_bridge
    from mpu_bridge.errors import LayoutError

    with pytest.raises(LayoutError) as info:
        mpu_bridge.attach(None, tp=2, rank_offset=4, local_world_size=4)
    return str(info.value)


def test_a_span_past_the_end_of_the_world_is_refused_on_every_rank():
    for message in run_ranks(_span_past_the_world, WORLD):
        assert "goes past the world of 6 ranks" in message


def _member_only_then_all_ranks(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge
    from mpu_bridge import _torch

    encoder = mpu_bridge.attach(None, **ENCODER)
    llm = mpu_bridge.attach(None, **LLM)
    strategies = []
    for bridge in (encoder, llm):
        bridge.prepare(["tp", "pp", "dp"], embedding=True)
        strategies.append(bridge.registry.last_strategy)
    counter = _torch.group_counter()
    everyone = dist.new_group(list(range(world)))  # named by the counter: must agree everywhere
    obs = {"strategies": strategies, "counter": counter, "sum": _sum_over(everyone, rank),
           "fallbacks": encoder.stats()["fallbacks"] + llm.stats()["fallbacks"]}
    encoder.close()
    llm.close()
    return obs


def test_span_groups_are_created_by_their_members_only_and_leave_the_group_counters_equal():
    # member-only: the outsiders enter no new_group of the span; afterwards every rank's
    # PyTorch group counter (the name of the next all-ranks group) is the same, on every
    # supported PyTorch (from 2.14 a member-only group moves it on its members alone)
    observed = run_ranks(_member_only_then_all_ranks, WORLD)
    assert [obs["strategies"] for obs in observed] == [["local_new_group"] * 2] * WORLD
    assert [obs["fallbacks"] for obs in observed] == [0] * WORLD
    assert len({obs["counter"] for obs in observed}) == 1
    assert [obs["sum"] for obs in observed] == [15] * WORLD


def _outsider_asks_again(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.errors import BridgeError

    llm = mpu_bridge.attach(None, **LLM)
    llm.prepare(["tp"])
    before = llm.stats()["agreements"]
    errors = []
    for _ in range(2):  # asked twice, answered locally: no round that the members skip
        try:
            llm.tensor_parallel()
        except BridgeError as exc:
            errors.append(type(exc).__name__)
    obs = {"errors": errors, "rounds": llm.stats()["agreements"] - before}
    llm.close()
    return obs


def test_an_outsider_asking_after_prepare_gets_the_error_locally_every_time():
    observed = run_ranks(_outsider_asks_again, WORLD)
    assert [obs["errors"] for obs in observed] == [["OutsideSpanError"] * 2] * 2 + [[]] * 4
    assert [obs["rounds"] for obs in observed] == [0] * WORLD


# -- a registry only a span's ranks take part in (what attach(one module's collection) uses) --


def _narrowed(rank: int, world: int, skew: bool) -> Dict[str, Any]:
    import torch.distributed as dist

    from mpu_bridge import _torch
    from mpu_bridge.errors import GroupCreationError
    from mpu_bridge.partitions import dense
    from mpu_bridge.registry import GroupRegistry

    counter = _torch.group_counter()
    obs: Dict[str, Any] = {}
    if rank >= 2:  # ranks 0, 1 never take part
        if skew and rank == 2:  # rank 2 alone holds one more group (a member-only singleton)
            dist.new_group([2], use_local_synchronization=True)
            counter = _torch.group_counter()
        registry = GroupRegistry(agreement_timeout=30)
        registry.narrow(range(2, 6))
        tp = dense(plan(4, tp=2, rank_offset=2), "tp", rank)
        try:
            (group,) = registry.ensure([tp])
            obs["sum"] = _sum_over(group, rank)
            obs["strategy"] = registry.last_strategy
        except GroupCreationError as exc:
            obs["error"] = str(exc)
        obs["agreements"] = registry.agreements
        registry.close()
    obs["counter_moved"] = _torch.group_counter() - counter
    if not skew:  # the skew itself moved rank 2's counter from PyTorch 2.14: no all-ranks group after it
        obs["everyone"] = _sum_over(dist.new_group(list(range(world))), rank)
    return obs


def test_a_narrowed_registry_creates_among_the_span_only_and_moves_no_counter():
    from _torch_rule import member_only_moves_counter

    observed = run_ranks(_narrowed, WORLD, False)
    expected = "salted" if member_only_moves_counter() else "local_new_group"
    assert [o.get("strategy") for o in observed] == [None] * 2 + [expected] * 4
    assert [o.get("sum") for o in observed] == [None, None, 5, 5, 9, 9]
    assert [o.get("agreements") for o in observed] == [None, None, 1, 1, 1, 1]
    assert [o["counter_moved"] for o in observed] == [0] * WORLD
    assert [o["everyone"] for o in observed] == [15] * WORLD


def test_a_narrowed_registry_names_groups_itself_where_torch_allows_else_refuses_unequal_salts():
    # rank 2 holds one group more than rank 3: PyTorch up to 2.13 would name their group
    # differently on each (its salt is the held-group count); from 2.14 the registry chooses
    # the salt itself. There is no all-ranks fallback in a span: a clear error, on every member.
    from _torch_rule import member_only_moves_counter

    observed = run_ranks(_narrowed, WORLD, True)
    if member_only_moves_counter():
        assert [o.get("sum") for o in observed[2:]] == [5, 5, 9, 9]
    else:
        for o in observed[2:]:
            assert "over the rank span 2..5 member-only" in o["error"]
            assert "different salts" in o["error"]
    assert [o["counter_moved"] for o in observed] == [0] * WORLD


def _narrowed_mismatch(rank: int, world: int) -> Any:
    from mpu_bridge.errors import PlanMismatchError
    from mpu_bridge.partitions import dense
    from mpu_bridge.registry import GroupRegistry

    if rank < 2:
        return None
    registry = GroupRegistry(agreement_timeout=30)
    registry.narrow(range(2, 6))
    tp = dense(plan(4, tp=2 if rank != 5 else 4, rank_offset=2), "tp", rank)
    try:
        registry.ensure([tp])
        return "ok"
    except PlanMismatchError as exc:
        return str(exc)
    finally:
        registry.close()


def test_a_mismatch_inside_a_span_is_raised_on_its_members_saying_how_ranks_are_counted():
    observed = run_ranks(_narrowed_mismatch, WORLD)
    for message in observed[2:]:
        assert "in the rank span 2..5" in message and "add 2 for the global rank" in message


# -- every span is the 0-based layout shifted (hypothesis) -------------------------------------



@st.composite
def _spans(draw: Any) -> Any:
    tp, pp, cp = (draw(st.sampled_from([1, 2, 4])) for _ in range(3))
    dp = draw(st.sampled_from([1, 2, 3]))
    ep = draw(st.sampled_from([e for e in (1, 2, 4) if (dp * cp) % e == 0]))
    order = draw(st.sampled_from(["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-dp-cp-ep-pp", "pp-tp-cp-ep-dp"]))
    offset = draw(st.integers(0, 1000))
    return dict(tp=tp, pp=pp, cp=cp, ep=ep, order=order), tp * pp * cp * dp, offset


@settings(max_examples=60, deadline=None)
@given(_spans(), st.data())
def test_every_kind_of_a_span_is_the_zero_based_kind_shifted(case, data):
    sizes, size, offset = case
    try:
        base = plan(size, **sizes)
    except LayoutError:
        assume(False)  # not a layout (e.g. pp not last with edp != dp): nothing to shift
    span = plan(size, rank_offset=offset, **sizes)
    local = data.draw(st.integers(0, size - 1))
    for kind in base.kinds:
        assert span.groups(kind) == [[r + offset for r in g] for g in base.groups(kind)], kind
        assert span.group_of(kind, local + offset) == [r + offset for r in base.group_of(kind, local)]
        assert span.rank_in_group(kind, local + offset) == base.rank_in_group(kind, local)
        assert span.group_index(kind, local + offset) == base.group_index(kind, local)
        assert list(span.group_view_of(kind, local + offset)) == span.group_of(kind, local + offset)


def _narrowed_twice(rank: int, world: int) -> Dict[str, Any]:
    from mpu_bridge.errors import GroupCreationError
    from mpu_bridge.partitions import dense
    from mpu_bridge.registry import GroupRegistry

    obs: Dict[str, Any] = {"sums": [], "errors": []}
    if rank < 2:
        return obs
    for _ in range(2):  # a bridge over one module, closed and read again (a restart)
        registry = GroupRegistry(agreement_timeout=30)
        registry.narrow(range(2, 6))
        try:
            (group,) = registry.ensure([dense(plan(4, tp=2, rank_offset=2), "tp", rank)])
            obs["sums"].append(_sum_over(group, rank))
        except GroupCreationError as exc:
            obs["errors"].append(str(exc))
        registry.close()
    return obs


def test_a_narrowed_registry_read_again_after_close_names_its_groups_afresh_where_torch_allows():
    # From PyTorch 2.14 the registry names the groups itself: new names, the same groups
    # again. Up to 2.13 PyTorch's own name would repeat the destroyed group's (its salt, the
    # held-group count, dropped with it) and its rendezvous would read stale addresses, and
    # a span has no all-ranks fallback: every member says so, nothing hangs.
    from _torch_rule import member_only_moves_counter

    observed = run_ranks(_narrowed_twice, WORLD)
    if member_only_moves_counter():
        assert [o["sums"] for o in observed[2:]] == [[5, 5], [5, 5], [9, 9], [9, 9]]
    else:
        for o in observed[2:]:
            assert len(o["sums"]) == 1 and len(o["errors"]) == 1
            assert "reuse the name of a group destroyed earlier" in o["errors"][0]


def _mesh_over_a_span(rank: int, world: int) -> Any:
    import mpu_bridge

    llm = mpu_bridge.attach(None, **LLM)
    try:
        mesh = llm.device_mesh()  # every rank: one round; the outsiders then get the error
        return mesh.mesh.tolist(), mesh["tp"].get_group() is llm.tensor_parallel().group
    except mpu_bridge.OutsideSpanError:
        return "outside"
    finally:
        llm.close()


def test_a_spans_device_mesh_holds_its_global_ranks_over_its_own_groups():
    observed = run_ranks(_mesh_over_a_span, WORLD)
    assert observed[:2] == ["outside"] * 2
    # dims (pp, dp, cp, tp) over ranks 2..5 with tp 2, pp 2
    assert observed[2:] == [([[[[2, 3]]], [[[4, 5]]]], True)] * 4
