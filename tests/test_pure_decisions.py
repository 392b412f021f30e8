"""The pure decisions under the registry and the bridge, without processes.

* :mod:`mpu_bridge.planning`: votes -> reuse decisions and the creation strategy;
* :mod:`mpu_bridge.mpu.order`: an MPU's own groups -> the rank order it used;
* :mod:`mpu_bridge.partitions`: the group families (hpZ, all-to-all, world, experts).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpu_bridge import partitions, planning
from mpu_bridge.errors import LayoutError, MpuError
from mpu_bridge.layout import plan
from mpu_bridge.mpu.order import infer_order, step_of

# -- planning ------------------------------------------------------------------------------


def test_a_registered_group_votes_reuse_and_a_new_one_votes_create():
    layout = plan(4, tp=2)
    tp, dp = partitions.dense(layout, "tp", 0), partitions.dense(layout, "dp", 0)
    assert planning.reuse_votes([tp, dp], {(0, 1)}) == ["1", "0"]


def test_a_group_asked_for_twice_in_one_batch_is_created_once():
    tp = partitions.dense(plan(4, tp=2), "tp", 0)
    assert planning.reuse_votes([tp, tp], set()) == ["0", "1"]


def test_a_rank_in_no_group_abstains():
    pair = partitions.Partition("pair01", 2, 1, None, lambda: [[0, 1]])
    assert planning.reuse_votes([pair], set()) == ["-"]


def test_votes_merge_to_reuse_when_some_rank_holds_the_group_and_none_lacks_it():
    tp = partitions.dense(plan(4, tp=2), "tp", 0)
    assert planning.merge_votes([tp], [((0, 1), "1"), ((2, 3), "-")]) == [True]


def test_votes_where_some_ranks_hold_their_group_and_others_not_are_mixed():
    # e.g. one-rank groups made earlier by a family that left ranks 2 and 3 out
    tp = partitions.dense(plan(4, tp=2), "tp", 0)
    assert planning.merge_votes([tp], [((0, 1), "1"), ((2, 3), "0")]) == [None]


def test_a_mixed_partition_is_created_by_every_rank_entering_every_group():
    strategy, why = planning.decide_strategy("local_new_group", equal_salts=True, mixed=True)
    assert strategy == "new_group" and "holders keep the communicator they have" in why


def test_member_only_creation_is_kept_when_it_is_safe():
    assert planning.decide_strategy("local_new_group", equal_salts=True, fresh_names=True) == (
        "local_new_group",
        None,
    )


@pytest.mark.parametrize(
    "facts, reason",
    [
        (dict(equal_salts=False), "members of some group would hash different salts"),
        (dict(equal_salts=False, checked=False), "without the cross-rank plan check"),
        (dict(equal_salts=True, fresh_names=False), "destroyed earlier"),
        (dict(equal_salts=True, named=False), "naming of member-only groups is not recognised"),
        (dict(equal_salts=True, counter_safe=False), "counters, which name every all-ranks group, would then differ"),
    ],
)
def test_member_only_creation_falls_back_to_new_group_and_says_why(facts, reason):
    strategy, why = planning.decide_strategy("local_new_group", **facts)
    assert strategy == "new_group" and reason in why


@pytest.mark.parametrize("chosen", ["split_group", "new_group"])
def test_other_strategies_never_fall_back(chosen):
    facts = dict(equal_salts=False, checked=False, fresh_names=False, named=False, counter_safe=False)
    assert planning.decide_strategy(chosen, **facts) == (chosen, None)


def test_an_unrecognised_naming_is_the_reason_before_any_measurement():
    # Without the rule, the measured salts mean nothing: say what is really missing.
    strategy, why = planning.decide_strategy("local_new_group", equal_salts=False, named=False, counter_safe=False)
    assert strategy == "new_group" and why == planning.FALLBACK_REASONS["naming"]


def test_each_created_group_adds_one_to_the_salt_the_next_one_is_named_with():
    assert planning.salts(["0", "-", "1", "0", "0"], 5) == [5, 6, 6, 6, 7]


def test_without_the_check_covering_families_then_one_that_leaves_ranks_out_are_safe():
    layout = plan(8, tp=2, pp=4)
    parts = [partitions.dense(layout, k, 0) for k in ("tp", "dp", "pp")]
    embd, pos = partitions.embedding(layout, 0), partitions.position_embedding(layout, 0)
    assert not embd.covers(8) and embd.group_size == 2 and pos.group_size == 1
    assert planning.safe_without_check(parts + [embd, pos], 8)


def test_without_the_check_a_family_after_one_that_left_ranks_out_is_unsafe():
    layout = plan(8, tp=2, pp=4)
    embd, pp = partitions.embedding(layout, 0), partitions.dense(layout, "pp", 0)
    assert not planning.safe_without_check([embd, pp], 8)
    assert not planning.safe_without_check([embd, embd], 8)


# -- order inference --------------------------------------------------------------------------


def test_the_step_of_an_evenly_spaced_group():
    assert step_of("dp", [1, 3, 5, 7]) == 2


def test_an_unevenly_spaced_group_follows_no_megatron_order():
    with pytest.raises(MpuError, match=r"dp group \[0, 1, 3\] is not evenly spaced"):
        step_of("dp", [0, 1, 3])


def test_data_parallel_fastest_is_inferred_from_the_steps():
    # 8 ranks, tp 2, dp 2, pp 2 laid out dp-tp-pp: dp step 1, tp step 2, pp step 4.
    order = infer_order(8, {}, {"tp": [1, 3], "dp": [0, 1], "pp": [0, 4]})
    assert plan(8, tp=2, pp=2, order=order).group_of("tp", 1) == [1, 3]


def test_dense_and_expert_groups_that_need_contradicting_orders_are_an_error():
    # dense: dp before tp; expert: tp before dp (edp = dp here).
    with pytest.raises(MpuError, match="contradicting rank orders"):
        infer_order(8, {}, {"tp": [0, 2], "dp": [0, 1], "etp": [0, 1], "edp": [0, 2]})


_SIZE_SETS = [
    dict(tp=2, pp=2), dict(tp=2, cp=2), dict(tp=2, ep=2), dict(cp=2, ep=2), dict(tp=2, cp=2, ep=2),
    dict(pp=2, ep=2), dict(ep=4), dict(tp=4, ep=2, etp=1), dict(tp=2, pp=2, ep=2, etp=1), dict(cp=2, ep=4),
]
_ORDERS = ["-".join(p) for p in itertools.permutations(("tp", "cp", "ep", "dp", "pp"))]


@settings(max_examples=150)
@given(st.sampled_from(_SIZE_SETS), st.sampled_from(_ORDERS), st.integers(0, 15))
def test_any_accepted_order_is_inferred_from_one_ranks_groups(sizes, order, rank):
    try:
        truth = plan(16, order=order, **sizes)
    except LayoutError:
        return  # megatron-core (and the planner) refuse this order for these sizes
    own = {dim: truth.group_of(kind, rank) for dim, kind in
           (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("ep", "ep"), ("etp", "etp"), ("edp", "edp"))}
    inferred = plan(16, order=infer_order(16, {}, own), **sizes)
    for kind in truth.kinds:
        assert sorted(map(tuple, inferred.groups(kind))) == sorted(map(tuple, truth.groups(kind))), (kind, order)


# -- families ----------------------------------------------------------------------------------


def test_hpz_blocks_without_model_parallelism_are_contiguous():
    assert [partitions.hpz(plan(8), 4, r).own for r in (0, 5)] == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_hpz_blocks_with_tensor_parallelism_follow_the_data_parallel_group():
    assert partitions.hpz(plan(8, tp=2), 2, 3).own == (1, 3)


def test_an_hpz_size_larger_than_data_parallel_is_clamped():
    assert partitions.hpz_block(plan(8, tp=2, pp=2), 8) == 2


def test_an_hpz_size_that_does_not_divide_data_parallel_is_refused():
    with pytest.raises(LayoutError, match="hpZ partition size 3 does not divide the data-parallel size 4"):
        partitions.hpz_block(plan(8, tp=2), 3)


def test_all_to_all_groups_are_the_node_and_the_same_local_rank_across_nodes():
    assert [p.own for p in partitions.all_to_all(8, 4, 5)] == [(4, 5, 6, 7), (1, 5)]


def test_all_to_all_on_one_node_has_no_cross_node_group():
    assert [p.own for p in partitions.all_to_all(4, 8, 2)] == [(0, 1, 2, 3)]


def test_all_to_all_refuses_a_partial_last_node():
    with pytest.raises(LayoutError, match=r"world size 12 does not divide into nodes of 8 GPUs"):
        partitions.all_to_all_nodes(12, 8)


def test_the_world_family_is_one_group_of_everyone():
    assert partitions.world(4, 2).own == (0, 1, 2, 3)


def test_expert_layouts_put_ep_before_or_after_dp():
    base = plan(8, tp=2)
    assert partitions.expert_layout(base, 2, data_before_expert=False).group_of("ep", 0) == [0, 2]
    assert partitions.expert_layout(base, 2, data_before_expert=True).group_of("ep", 0) == [0, 4]
