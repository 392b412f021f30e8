"""The layout engine on small worlds, with every rank list written out.

Every expected list below was worked out by hand from megatron-core's rule:
the order string lists the dimensions with the first token varying fastest,
so ``rank = sum(index[token] * stride[token])`` where ``stride`` is the product
of the sizes of the tokens before it. Groups of a kind vary the kind's tokens
(ascending inside a group) and are enumerated over the remaining tokens, again
first token fastest. The dense grid holds tp, cp, dp, pp; the expert grid holds
etp, ep, edp = world / (etp·ep·pp), pp (context parallelism folds into edp).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, NamedTuple

import pytest

from mpu_bridge import KINDS, LayoutError, ParallelConfig, RankGrid, plan
from mpu_bridge.layout import expert_order

ALL_KINDS = (
    "tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-dp", "tp-dp-cp", "mp",
    "ep", "etp", "edp", "etp-ep", "etp-ep-pp",
)


def singletons(world: int) -> List[List[int]]:
    """Every rank alone, in rank order: the groups of a dimension of size 1."""
    return [[rank] for rank in range(world)]


class Example(NamedTuple):
    plan_kwargs: Dict[str, Any]
    groups: Dict[str, List[List[int]]]


PAIRS_8 = [[0, 1], [2, 3], [4, 5], [6, 7]]
PAIRS_16 = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
STRIDE2_PAIRS_16 = [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
QUADS_16 = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
STRIDE4_QUADS_16 = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
HALVES_16 = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
EVEN_ODD_16 = [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
STRIDE8_PAIRS_16 = [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
WHOLE_16 = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]

EXAMPLES: Dict[str, Example] = {
    # rank = tp + 2*dp + 4*pp
    "8 ranks tp2 pp2": Example(
        dict(world_size=8, tp=2, pp=2),
        {
            "tp": PAIRS_8,
            "cp": singletons(8),
            "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "dp-cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "tp-cp": PAIRS_8,
            "tp-dp": [[0, 1, 2, 3], [4, 5, 6, 7]],
            "tp-dp-cp": [[0, 1, 2, 3], [4, 5, 6, 7]],
            "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
            "ep": singletons(8),
            "etp": PAIRS_8,
            "edp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "etp-ep": PAIRS_8,
            "etp-ep-pp": [[0, 1, 4, 5], [2, 3, 6, 7]],
        },
    ),
    # dense: rank = tp + 2*cp + 4*pp (dp = 1); expert: rank = etp + 2*edp + 4*pp
    "8 ranks tp2 cp2 pp2": Example(
        dict(world_size=8, tp=2, cp=2, pp=2),
        {
            "tp": PAIRS_8,
            "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "dp": singletons(8),
            "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "dp-cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "tp-cp": [[0, 1, 2, 3], [4, 5, 6, 7]],
            "tp-dp": PAIRS_8,
            "tp-dp-cp": [[0, 1, 2, 3], [4, 5, 6, 7]],
            "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
            "ep": singletons(8),
            "etp": PAIRS_8,
            "edp": [[0, 2], [1, 3], [4, 6], [5, 7]],  # = dp-cp: cp folds into edp
            "etp-ep": PAIRS_8,
            "etp-ep-pp": [[0, 1, 4, 5], [2, 3, 6, 7]],
        },
    ),
    # pp not last, valid because edp == dp == 2: rank = tp + 2*pp + 4*dp
    "8 ranks tp2 pp2 order tp-pp-dp": Example(
        dict(world_size=8, tp=2, pp=2, order="tp-pp-dp"),
        {
            "tp": PAIRS_8,
            "cp": singletons(8),
            "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "dp-cp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "tp-cp": PAIRS_8,
            "tp-dp": [[0, 1, 4, 5], [2, 3, 6, 7]],
            "tp-dp-cp": [[0, 1, 4, 5], [2, 3, 6, 7]],
            "mp": [[0, 1, 2, 3], [4, 5, 6, 7]],
            "ep": singletons(8),
            "etp": PAIRS_8,
            "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
            "etp-ep": PAIRS_8,
            "etp-ep-pp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        },
    ),
    # dense: rank = tp + 2*dp (dp = 8); expert: rank = etp + 2*ep + 8*edp (edp = 2)
    "16 ranks tp2 ep4": Example(
        dict(world_size=16, tp=2, ep=4),
        {
            "tp": PAIRS_16,
            "cp": singletons(16),
            "dp": EVEN_ODD_16,
            "pp": singletons(16),
            "dp-cp": EVEN_ODD_16,
            "tp-cp": PAIRS_16,
            "tp-dp": WHOLE_16,
            "tp-dp-cp": WHOLE_16,
            "mp": PAIRS_16,
            "ep": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
            "etp": PAIRS_16,
            "edp": STRIDE8_PAIRS_16,
            "etp-ep": HALVES_16,
            "etp-ep-pp": HALVES_16,
        },
    ),
    # DeepSpeed's D+E layout. Dense as above; expert: rank = etp + 2*edp + 4*ep
    "16 ranks tp2 ep4 order tp-cp-dp-ep-pp": Example(
        dict(world_size=16, tp=2, ep=4, order="tp-cp-dp-ep-pp"),
        {
            "tp": PAIRS_16,
            "cp": singletons(16),
            "dp": EVEN_ODD_16,
            "pp": singletons(16),
            "dp-cp": EVEN_ODD_16,
            "tp-cp": PAIRS_16,
            "tp-dp": WHOLE_16,
            "tp-dp-cp": WHOLE_16,
            "mp": PAIRS_16,
            "ep": STRIDE4_QUADS_16,
            "etp": PAIRS_16,
            "edp": STRIDE2_PAIRS_16,
            "etp-ep": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
            "etp-ep-pp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
        },
    ),
    # cp and ep missing from the order (both size 1): rank = tp + 2*dp + 8*pp
    "16 ranks tp2 pp2 order tp-dp-pp": Example(
        dict(world_size=16, tp=2, pp=2, order="tp-dp-pp"),
        {
            "tp": PAIRS_16,
            "cp": singletons(16),
            "dp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
            "pp": STRIDE8_PAIRS_16,
            "dp-cp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
            "tp-cp": PAIRS_16,
            "tp-dp": HALVES_16,
            "tp-dp-cp": HALVES_16,
            "mp": [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]],
            "ep": singletons(16),
            "etp": PAIRS_16,
            "edp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
            "etp-ep": PAIRS_16,
            "etp-ep-pp": [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]],
        },
    ),
    # pp before dp with ep > 1, valid because edp == dp == 4 and the pp strides
    # agree (tp = etp·ep = 2). dense: rank = tp + 2*pp + 4*dp;
    # expert: rank = ep + 2*pp + 4*edp
    "16 ranks tp2 pp2 ep2 etp1 order tp-cp-ep-pp-dp": Example(
        dict(world_size=16, tp=2, pp=2, ep=2, etp=1, order="tp-cp-ep-pp-dp"),
        {
            "tp": PAIRS_16,
            "cp": singletons(16),
            "dp": STRIDE4_QUADS_16,
            "pp": STRIDE2_PAIRS_16,
            "dp-cp": STRIDE4_QUADS_16,
            "tp-cp": PAIRS_16,
            "tp-dp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
            "tp-dp-cp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
            "mp": QUADS_16,
            "ep": PAIRS_16,
            "etp": singletons(16),
            "edp": STRIDE4_QUADS_16,
            "etp-ep": PAIRS_16,
            "etp-ep-pp": QUADS_16,
        },
    ),
    # dense: rank = tp + 2*cp + 4*dp; expert (etp = tp): rank = etp + 2*ep + 4*edp
    "16 ranks tp2 cp2 ep2": Example(
        dict(world_size=16, tp=2, cp=2, ep=2),
        {
            "tp": PAIRS_16,
            "cp": STRIDE2_PAIRS_16,
            "dp": STRIDE4_QUADS_16,
            "pp": singletons(16),
            "dp-cp": EVEN_ODD_16,
            "tp-cp": QUADS_16,
            "tp-dp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
            "tp-dp-cp": WHOLE_16,
            "mp": PAIRS_16,
            "ep": STRIDE2_PAIRS_16,
            "etp": PAIRS_16,
            "edp": STRIDE4_QUADS_16,
            "etp-ep": QUADS_16,
            "etp-ep-pp": QUADS_16,
        },
    ),
    # dense as above; expert (etp = 1, edp = 8): rank = ep + 2*edp
    "16 ranks tp2 cp2 ep2 etp1": Example(
        dict(world_size=16, tp=2, cp=2, ep=2, etp=1),
        {
            "tp": PAIRS_16,
            "cp": STRIDE2_PAIRS_16,
            "dp": STRIDE4_QUADS_16,
            "pp": singletons(16),
            "dp-cp": EVEN_ODD_16,
            "tp-cp": QUADS_16,
            "tp-dp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
            "tp-dp-cp": WHOLE_16,
            "mp": PAIRS_16,
            "ep": PAIRS_16,
            "etp": singletons(16),
            "edp": EVEN_ODD_16,  # = dp-cp: cp folds into edp
            "etp-ep": PAIRS_16,
            "etp-ep-pp": PAIRS_16,
        },
    ),
    # etp > tp. dense: rank = dp + 8*pp (dp = 8);
    # expert: rank = etp + 2*ep + 4*edp + 8*pp (edp = 2)
    "16 ranks pp2 ep2 etp2": Example(
        dict(world_size=16, pp=2, ep=2, etp=2),
        {
            "tp": singletons(16),
            "cp": singletons(16),
            "dp": HALVES_16,
            "pp": STRIDE8_PAIRS_16,
            "dp-cp": HALVES_16,
            "tp-cp": singletons(16),
            "tp-dp": HALVES_16,
            "tp-dp-cp": HALVES_16,
            "mp": STRIDE8_PAIRS_16,
            "ep": STRIDE2_PAIRS_16,
            "etp": PAIRS_16,
            "edp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
            "etp-ep": QUADS_16,
            "etp-ep-pp": [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]],
        },
    ),
}

EXAMPLE_CASES = [
    pytest.param(name, kind, id=f"{name}-{kind}") for name in EXAMPLES for kind in ALL_KINDS
]


def layout_of(name: str):
    kwargs = dict(EXAMPLES[name].plan_kwargs)
    return plan(kwargs.pop("world_size"), **kwargs)


# -- the written-out lists -----------------------------------------------------


def test_kinds_are_the_fourteen_megatron_groups_in_a_fixed_order():
    assert tuple(KINDS)[: len(ALL_KINDS)] == ALL_KINDS
    assert plan(8).kinds == ALL_KINDS


def test_the_gtp_kinds_and_all_gather_twins_follow_the_fourteen_and_are_listed_only_when_active():
    assert tuple(KINDS)[len(ALL_KINDS):] == (
        "gtp", "gtp-dp", "gtp-dp-cp", "egtp", "egtp-edp", "etp-ep-egtp-pp", "dp-cp-ag", "edp-ag"
    )
    assert plan(8, tp=2, gtp_remat=2).kinds == ALL_KINDS + ("gtp", "gtp-dp", "gtp-dp-cp")
    assert plan(8, ep=2, expert_gtp_remat=2).kinds == ALL_KINDS + ("egtp", "egtp-edp", "etp-ep-egtp-pp")


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_every_example_spells_out_every_kind(name):
    assert set(EXAMPLES[name].groups) == set(ALL_KINDS)


@pytest.mark.parametrize("name, kind", EXAMPLE_CASES)
def test_groups_match_the_hand_worked_lists(name, kind):
    assert layout_of(name).groups(kind) == EXAMPLES[name].groups[kind]


@pytest.mark.parametrize("name, kind", EXAMPLE_CASES)
def test_group_of_finds_each_rank_in_its_listed_group(name, kind):
    layout = layout_of(name)
    expected = EXAMPLES[name].groups[kind]
    for index, group in enumerate(expected):
        for position, rank in enumerate(group):
            assert layout.group_of(kind, rank) == group
            assert layout.group_index(kind, rank) == index
            assert layout.rank_in_group(kind, rank) == position


@pytest.mark.parametrize("name, kind", EXAMPLE_CASES)
def test_group_by_index_iter_groups_size_and_count_follow_the_lists(name, kind):
    layout = layout_of(name)
    expected = EXAMPLES[name].groups[kind]
    assert [layout.group(kind, i) for i in range(len(expected))] == expected
    assert list(layout.iter_groups(kind)) == expected
    assert layout.num_groups(kind) == len(expected)
    assert layout.size(kind) == len(expected[0])


def test_a_world_of_one_rank_has_one_singleton_group_of_every_kind():
    layout = plan(1)
    for kind in ALL_KINDS:
        assert layout.groups(kind) == [[0]]
        assert layout.group_of(kind, 0) == [0]


# -- single queries, picked by hand ---------------------------------------------


def test_group_of_a_strided_expert_data_parallel_group():
    layout = plan(16, tp=2, ep=4)
    assert layout.group_of("edp", 5) == [5, 13]
    assert layout.group_index("edp", 5) == 5
    assert layout.rank_in_group("edp", 13) == 1


def test_group_of_an_expert_parallel_group_under_the_default_order():
    layout = plan(16, tp=2, ep=4)
    assert layout.group_of("ep", 11) == [9, 11, 13, 15]
    assert layout.group_index("ep", 11) == 3
    assert layout.rank_in_group("ep", 11) == 1


def test_group_of_an_expert_parallel_group_under_deepspeed_data_before_expert():
    layout = plan(16, tp=2, ep=4, order="tp-cp-dp-ep-pp")
    assert layout.group_of("ep", 6) == [2, 6, 10, 14]
    assert layout.group_index("ep", 6) == 2
    assert layout.rank_in_group("ep", 6) == 1
    assert layout.group_of("etp-ep", 7) == [2, 3, 6, 7, 10, 11, 14, 15]
    assert layout.group_index("etp-ep", 7) == 1
    assert layout.rank_in_group("etp-ep", 7) == 3


def test_group_of_pipeline_and_data_groups_when_pp_is_not_last():
    layout = plan(16, tp=2, pp=2, ep=2, etp=1, order="tp-cp-ep-pp-dp")
    assert layout.group_of("pp", 13) == [13, 15]
    assert layout.group_index("pp", 13) == 7
    assert layout.rank_in_group("pp", 13) == 0
    assert layout.group_of("dp", 10) == [2, 6, 10, 14]
    assert layout.group_index("dp", 10) == 2
    assert layout.rank_in_group("dp", 10) == 2


def test_group_by_index_picks_the_index_th_group():
    layout = plan(16, tp=2, ep=4)
    assert layout.group("edp", 7) == [7, 15]
    assert layout.group("tp", 0) == [0, 1]
    assert layout.group("ep", 2) == [8, 10, 12, 14]


def test_sizes_and_group_counts():
    layout = plan(16, tp=2, ep=4)
    sizes = {kind: (layout.size(kind), layout.num_groups(kind)) for kind in ALL_KINDS}
    assert sizes == {
        "tp": (2, 8), "cp": (1, 16), "dp": (8, 2), "pp": (1, 16), "dp-cp": (8, 2),
        "tp-cp": (2, 8), "tp-dp": (16, 1), "tp-dp-cp": (16, 1), "mp": (2, 8),
        "ep": (4, 4), "etp": (2, 8), "edp": (2, 8), "etp-ep": (8, 2), "etp-ep-pp": (8, 2),
    }


def test_groups_returns_a_fresh_list_each_call():
    layout = plan(8, tp=2)
    first = layout.groups("tp")
    first[0].append(99)
    first.append([42])
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_rank_grid_is_megatrons_rank_generator_as_arithmetic():
    grid = RankGrid.build(tp=2, dp=2, pp=2, order="tp-dp-pp")
    assert grid.order == ("tp", "dp", "pp", "cp", "ep")
    assert grid.sizes == (2, 2, 2, 1, 1)
    assert grid.world_size == 8
    assert grid.groups(("dp",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.groups(("tp", "pp")) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert grid.group_of(("dp",), 5) == [5, 7]


# -- nodes -----------------------------------------------------------------------


def test_intra_node_with_eight_gpus_per_node():
    # 64 ranks, tp 2, pp 2, ep 4: dense rank = tp + 2*dp + 32*pp (dp = 16),
    # expert rank = etp + 2*ep + 8*edp + 32*pp (edp = 4); nodes are 8 ranks wide.
    layout = plan(64, tp=2, pp=2, ep=4, gpus_per_node=8)
    assert {kind: layout.intra_node(kind) for kind in ALL_KINDS} == {
        "tp": True, "cp": True, "dp": False, "pp": False, "dp-cp": False,
        "tp-cp": True, "tp-dp": False, "tp-dp-cp": False, "mp": False,
        "ep": True, "etp": True, "edp": False, "etp-ep": True, "etp-ep-pp": False,
    }


def test_a_group_smaller_than_a_node_can_still_straddle_two_nodes():
    # tp groups [0, 1, 2], [3, 4, 5], ...; nodes [0..3], [4..7], ...: [3, 4, 5] straddles.
    assert plan(24, tp=3, gpus_per_node=4).intra_node("tp") is False
    assert plan(24, tp=3, gpus_per_node=6).intra_node("tp") is True


def test_one_gpu_per_node_keeps_only_singleton_kinds_intra_node():
    layout = plan(8, tp=2, gpus_per_node=1)
    assert layout.intra_node("tp") is False
    assert layout.intra_node("pp") is True
    assert layout.intra_node("cp") is True


def test_node_of_counts_nodes_from_rank_zero():
    layout = plan(64, tp=2, pp=2, ep=4, gpus_per_node=8)
    assert [layout.node_of(rank) for rank in (0, 7, 8, 13, 63)] == [0, 0, 1, 1, 7]


# -- export ----------------------------------------------------------------------


def test_to_dict_survives_a_json_round_trip():
    described = plan(64, tp=2, pp=2, ep=4, gpus_per_node=8).to_dict()
    assert json.loads(json.dumps(described)) == described


def test_to_dict_lists_the_config_with_derived_sizes():
    described = plan(16, tp=2, ep=4).to_dict()
    assert described["config"] == {
        "world_size": 16, "tp": 2, "pp": 1, "cp": 1, "ep": 4, "etp": 2, "dp": 8, "edp": 2,
        "order": "tp-cp-ep-dp-pp", "gpus_per_node": None, "gtp_remat": 1, "expert_gtp_remat": 1,
    }


def test_to_dict_truncates_to_max_groups_and_says_so():
    kinds = plan(16, tp=2, ep=4).to_dict(max_groups=2)["kinds"]
    assert list(kinds) == list(ALL_KINDS)
    assert kinds["tp"] == {
        "description": KINDS["tp"].description,
        "size": 2,
        "num_groups": 8,
        "groups": [[0, 1], [2, 3]],
        "truncated": True,
    }
    assert kinds["dp"]["groups"] == EVEN_ODD_16
    assert kinds["dp"]["truncated"] is False


def test_to_dict_without_a_bound_lists_every_group():
    kinds = plan(16, tp=2, ep=4).to_dict(max_groups=None)["kinds"]
    assert kinds["edp"]["groups"] == STRIDE8_PAIRS_16
    assert kinds["edp"]["truncated"] is False


def test_to_dict_reports_intra_node_only_when_nodes_are_known():
    assert "intra_node" not in plan(16, tp=2).to_dict()["kinds"]["tp"]
    kinds = plan(16, tp=2, gpus_per_node=8).to_dict()["kinds"]
    assert kinds["tp"]["intra_node"] is True
    assert kinds["dp"]["intra_node"] is False


# -- configuration -----------------------------------------------------------------


def test_parallel_config_derives_dp_and_edp():
    config = ParallelConfig(64, tp=2, pp=2, ep=4)
    assert (config.dp, config.edp, config.etp) == (16, 4, 2)


def test_context_parallelism_shrinks_dp_but_folds_into_edp():
    config = ParallelConfig(32, tp=2, cp=2, ep=4)
    assert (config.dp, config.edp) == (8, 4)
    config = ParallelConfig(32, tp=2, cp=2, ep=4, etp=1)
    assert (config.dp, config.edp) == (8, 8)


def test_expert_tensor_parallel_size_defaults_to_tp():
    assert ParallelConfig(16, tp=4).etp == 4
    assert ParallelConfig(16, tp=4, etp=1).etp == 1


def test_order_is_normalised_to_lower_case_without_spaces():
    layout = plan(8, tp=2, pp=2, order=" TP-DP-PP ")
    assert layout.config.order == "tp-dp-pp"
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_numpy_integer_sizes_are_accepted_as_plain_ints():
    numpy = pytest.importorskip("numpy")
    config = plan(numpy.int64(16), tp=numpy.int32(2)).config
    assert (config.world_size, config.tp) == (16, 2)
    assert type(config.world_size) is int and type(config.tp) is int


def test_parallel_config_is_frozen():
    config = ParallelConfig(8, tp=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tp = 4  # type: ignore[misc]


def test_equal_sizes_give_equal_layouts():
    assert plan(16, tp=2, ep=4) == plan(16, tp=2, ep=4, etp=2)
    assert plan(16, tp=2, ep=4) != plan(16, tp=2, ep=4, order="tp-cp-dp-ep-pp")


def test_plan_rejects_sizes_that_cannot_form_a_layout():
    # one smoke check here; tests/test_layout_errors.py holds the full battery
    with pytest.raises(LayoutError):
        plan(12, tp=2, pp=4)


# -- expert_order: where ep and dp go when expert groups are planned --------------------


def test_expert_order_puts_a_missing_ep_just_before_dp():
    assert expert_order("tp-cp-dp-pp") == "tp-cp-ep-dp-pp"


def test_expert_order_puts_a_missing_dp_just_after_ep():
    assert expert_order("tp-ep-pp") == "tp-ep-dp-pp"


def test_expert_order_with_data_before_expert_swaps_ep_and_dp():
    assert expert_order("tp-cp-ep-dp-pp", data_before_expert=True) == "tp-cp-dp-ep-pp"


def test_expert_order_keeps_an_order_that_already_has_data_before_expert():
    assert expert_order("tp-cp-dp-ep-pp", data_before_expert=True) == "tp-cp-dp-ep-pp"
    assert expert_order("tp-cp-dp-ep-pp") == "tp-cp-dp-ep-pp"
    assert expert_order("tp-cp-dp-ep-pp", data_before_expert=False) == "tp-cp-ep-dp-pp"
