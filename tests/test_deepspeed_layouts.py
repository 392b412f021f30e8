"""DeepSpeed's expert-parallel layouts, reproduced from the layout engine.

Specification of :mod:`mpu_bridge.deepspeed_layouts`. The written-out lists were
worked out by hand from DeepSpeed 0.19.8's ``deepspeed/utils/groups.py``:

* ``_get_expert_parallel_ranks`` (path ``"model_parallel"``): per pipeline stage,
  per tensor lane ``t``, the data-parallel ranks of that lane are cut into
  consecutive EP groups of ``ep`` (E + M + D: the lane's ranks in rank order;
  D + E: the lane's ranks read with stride ``edp·tp``), and the EDP groups zip
  those EP groups position by position.
* ``_create_expert_and_data_parallel`` with ``mp_size`` None/1 (``"legacy"``):
  E + D: EDP groups ``range(stage + i, stage_end, ep)``, EP groups consecutive
  blocks of ``ep``; D + E: EDP groups consecutive blocks of ``edp``, EP groups
  ``range(stage + i, stage_end, edp)``. EDP groups are created first.
* the same function with ``mp_size = tp > 1``, ``mp_mode="tp"``
  (``"tp_strided"``): the stage's ranks are reordered lane by lane, cut into EP
  groups of ``ep``, and the EDP groups zip *all* EP groups of the stage, across
  lanes. Per stage, EP groups are created, then EDP groups.

When DeepSpeed is installed, one subprocess runs the real functions (the pure
``_get_expert_parallel_ranks`` over a sweep, and ``_create_expert_and_data_parallel``
in a single-process ``fake`` torch.distributed world, once per rank) and the
tests compare every list exactly.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpu_bridge import LayoutError, plan
from mpu_bridge.deepspeed_layouts import (
    DATA_BEFORE_EXPERT_ORDER,
    DEEPSPEED_PATHS,
    _get_expert_parallel_ranks,
    deepspeed_expert_groups,
    deepspeed_expert_groups_of,
    deepspeed_group_creation_order,
    expert_layout,
)

EVEN_ODD_16 = [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
PAIRS_16 = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]


def as_sets(groups: List[List[int]]) -> set:
    return {frozenset(group) for group in groups}


# --------------------------------------------------------------------------
# "model_parallel": _get_expert_parallel_ranks (E + M + D and D + E)
# --------------------------------------------------------------------------


def test_e_m_d_world16_tp2_ep4_is_deepspeeds_docstring_example():
    ep_groups, edp_groups = _get_expert_parallel_ranks(16, 2, 4)
    assert ep_groups == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    assert edp_groups == [[0, 8], [2, 10], [4, 12], [6, 14], [1, 9], [3, 11], [5, 13], [7, 15]]


def test_e_m_d_has_megatrons_groups_in_another_order():
    layout = plan(16, tp=2, ep=4)  # megatron-core's default order, expert-TP = TP
    ep_groups, edp_groups = _get_expert_parallel_ranks(16, 2, 4)
    assert layout.groups("ep") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert ep_groups != layout.groups("ep")
    assert as_sets(ep_groups) == as_sets(layout.groups("ep"))
    assert as_sets(edp_groups) == as_sets(layout.groups("edp"))


def test_d_e_world16_tp2_ep4():
    # lane 0 reads [0, 4, 8, 12, 2, 6, 10, 14]; lane 1 reads [1, 5, 9, 13, 3, 7, 11, 15]
    ep_groups, edp_groups = _get_expert_parallel_ranks(16, 2, 4, 1, True)
    assert ep_groups == [[0, 4, 8, 12], [2, 6, 10, 14], [1, 5, 9, 13], [3, 7, 11, 15]]
    assert edp_groups == [[0, 2], [4, 6], [8, 10], [12, 14], [1, 3], [5, 7], [9, 11], [13, 15]]


def test_d_e_is_megatron_order_tp_cp_dp_ep_pp():
    layout = plan(16, tp=2, ep=4, order="tp-cp-dp-ep-pp")
    ep_groups, edp_groups = _get_expert_parallel_ranks(16, 2, 4, 1, True)
    assert as_sets(ep_groups) == as_sets(layout.groups("ep"))
    assert as_sets(edp_groups) == as_sets(layout.groups("edp"))


def test_e_m_d_with_two_pipeline_stages():
    # world 16, tp 2, pp 2: stage 0 = ranks 0..7, data-parallel lanes [0,2,4,6] and [1,3,5,7]
    ep_groups, edp_groups = _get_expert_parallel_ranks(16, 2, 2, 2)
    assert ep_groups == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11], [13, 15]]
    assert edp_groups == [[0, 4], [2, 6], [1, 5], [3, 7], [8, 12], [10, 14], [9, 13], [11, 15]]


def test_d_e_with_two_pipeline_stages():
    ep_groups, edp_groups = _get_expert_parallel_ranks(16, 2, 2, 2, True)
    assert ep_groups == [[0, 4], [2, 6], [1, 5], [3, 7], [8, 12], [10, 14], [9, 13], [11, 15]]
    assert edp_groups == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11], [13, 15]]


def test_without_tensor_parallelism_model_parallel_path_is_legacy_e_d():
    assert _get_expert_parallel_ranks(16, 1, 2) == (PAIRS_16, EVEN_ODD_16)


def test_ep_1_gives_singleton_ep_groups_and_edp_equal_to_the_data_parallel_lanes():
    ep_groups, edp_groups = _get_expert_parallel_ranks(8, 2, 1)
    assert ep_groups == [[0], [2], [4], [6], [1], [3], [5], [7]]
    assert edp_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_positional_defaults_match_deepspeeds_signature():
    assert _get_expert_parallel_ranks(16, 2, 4) == _get_expert_parallel_ranks(16, 2, 4, 1, False)
    assert _get_expert_parallel_ranks(16, 2, 4) == deepspeed_expert_groups(
        16, ep=4, tp=2, path="model_parallel"
    )


# --------------------------------------------------------------------------
# "legacy": _create_expert_and_data_parallel with mp_size None / 1
# --------------------------------------------------------------------------


def test_legacy_e_d_world16_ep2_is_deepspeeds_docstring_example():
    ep_groups, edp_groups = deepspeed_expert_groups(16, ep=2, path="legacy")
    assert ep_groups == PAIRS_16
    assert edp_groups == EVEN_ODD_16


def test_legacy_d_e_world16_ep2():
    ep_groups, edp_groups = deepspeed_expert_groups(
        16, ep=2, path="legacy", data_before_expert=True
    )
    assert ep_groups == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert edp_groups == [list(range(8)), list(range(8, 16))]


def test_legacy_e_d_with_two_pipeline_stages():
    ep_groups, edp_groups = deepspeed_expert_groups(8, ep=2, pp=2, path="legacy")
    assert ep_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_legacy_d_e_with_two_pipeline_stages():
    ep_groups, edp_groups = deepspeed_expert_groups(
        8, ep=2, pp=2, path="legacy", data_before_expert=True
    )
    assert ep_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert edp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("data_before_expert", [False, True])
def test_legacy_path_is_megatrons_layout_with_expert_tp_1_in_megatrons_order(data_before_expert):
    layout = expert_layout(
        24, ep=2, tp=2, pp=2, data_before_expert=data_before_expert, expert_tensor_parallel=False
    )
    ep_groups, edp_groups = deepspeed_expert_groups(
        24, ep=2, tp=2, pp=2, path="legacy", data_before_expert=data_before_expert
    )
    assert (ep_groups, edp_groups) == (layout.groups("ep"), layout.groups("edp"))


def test_legacy_expert_groups_ignore_the_dense_tensor_parallel_size():
    with_tp = deepspeed_expert_groups(16, ep=4, tp=4, path="legacy")
    assert with_tp == deepspeed_expert_groups(16, ep=4, path="legacy")


# --------------------------------------------------------------------------
# "tp_strided": _create_expert_and_data_parallel with mp_size = tp > 1, mp_mode "tp"
# --------------------------------------------------------------------------


def test_tp_strided_world16_tp2_ep4_joins_edp_groups_across_tensor_lanes():
    ep_groups, edp_groups = deepspeed_expert_groups(16, ep=4, tp=2, path="tp_strided")
    assert ep_groups == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    assert edp_groups == [[0, 8, 1, 9], [2, 10, 3, 11], [4, 12, 5, 13], [6, 14, 7, 15]]


def test_tp_strided_ep_groups_are_the_model_parallel_paths():
    for world, tp, ep, pp in [(16, 2, 4, 1), (16, 2, 2, 2), (24, 3, 2, 2), (32, 4, 2, 1)]:
        strided = deepspeed_expert_groups(world, ep=ep, tp=tp, pp=pp, path="tp_strided")
        assert strided[0] == _get_expert_parallel_ranks(world, tp, ep, pp)[0]


def test_tp_strided_edp_groups_are_the_expert_grids_tp_dp_groups():
    layout = expert_layout(24, ep=2, tp=3, pp=2)
    _, edp_groups = deepspeed_expert_groups(24, ep=2, tp=3, pp=2, path="tp_strided")
    assert as_sets(edp_groups) == as_sets(layout.expert.groups(("tp", "dp")))


def test_tp_strided_with_two_pipeline_stages():
    ep_groups, edp_groups = deepspeed_expert_groups(16, ep=2, tp=2, pp=2, path="tp_strided")
    assert ep_groups == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11], [13, 15]]
    assert edp_groups == [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]]


def test_tp_strided_with_tp_1_is_the_legacy_path():
    for data_before_expert in (False, True):
        kwargs = dict(ep=2, pp=2, data_before_expert=data_before_expert)
        assert deepspeed_expert_groups(8, path="tp_strided", **kwargs) == deepspeed_expert_groups(
            8, path="legacy", **kwargs
        )
        assert deepspeed_group_creation_order(
            8, path="tp_strided", **kwargs
        ) == deepspeed_group_creation_order(8, path="legacy", **kwargs)


# --------------------------------------------------------------------------
# Layout, group of one rank, creation order
# --------------------------------------------------------------------------


def test_expert_layout_names_order_and_expert_tensor_parallel_size():
    cases = {
        (False, True): ("tp-cp-ep-dp-pp", 2),
        (True, True): (DATA_BEFORE_EXPERT_ORDER, 2),
        (False, False): ("tp-cp-ep-dp-pp", 1),
        (True, False): ("tp-cp-dp-ep-pp", 1),
    }
    for (data_before_expert, expert_tp), (order, etp) in cases.items():
        layout = expert_layout(
            16, ep=2, tp=2, data_before_expert=data_before_expert, expert_tensor_parallel=expert_tp
        )
        assert (layout.config.order, layout.config.etp, layout.config.tp) == (order, etp, 2)


def test_groups_of_a_rank_are_the_lists_deepspeed_records_on_it():
    assert deepspeed_expert_groups_of(1, 16, ep=4, tp=2, path="tp_strided") == (
        [1, 3, 5, 7],
        [0, 8, 1, 9],
    )
    assert deepspeed_expert_groups_of(9, 16, ep=4, tp=2, path="model_parallel") == (
        [9, 11, 13, 15],
        [1, 9],
    )
    assert deepspeed_expert_groups_of(5, 8, ep=2, pp=2, path="legacy", data_before_expert=True) == (
        [5, 7],
        [4, 5],
    )


def test_creation_order_legacy_creates_edp_groups_first():
    assert deepspeed_group_creation_order(8, ep=2, pp=2, path="legacy") == [
        ("edp", [0, 2]), ("edp", [1, 3]), ("edp", [4, 6]), ("edp", [5, 7]),
        ("ep", [0, 1]), ("ep", [2, 3]), ("ep", [4, 5]), ("ep", [6, 7]),
    ]


def test_creation_order_model_parallel_creates_ep_groups_first():
    assert deepspeed_group_creation_order(8, ep=2, tp=2, path="model_parallel") == [
        ("ep", [0, 2]), ("ep", [4, 6]), ("ep", [1, 3]), ("ep", [5, 7]),
        ("edp", [0, 4]), ("edp", [2, 6]), ("edp", [1, 5]), ("edp", [3, 7]),
    ]


def test_creation_order_tp_strided_goes_stage_by_stage():
    assert deepspeed_group_creation_order(16, ep=2, tp=2, pp=2, path="tp_strided") == [
        ("ep", [0, 2]), ("ep", [4, 6]), ("ep", [1, 3]), ("ep", [5, 7]),
        ("edp", [0, 4, 1, 5]), ("edp", [2, 6, 3, 7]),
        ("ep", [8, 10]), ("ep", [12, 14]), ("ep", [9, 11]), ("ep", [13, 15]),
        ("edp", [8, 12, 9, 13]), ("edp", [10, 14, 11, 15]),
    ]


def test_module_imports_no_torch():
    code = (
        "import sys, mpu_bridge.deepspeed_layouts, mpu_bridge.deepspeed_groups; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


def test_deepspeed_groups_reexports_get_expert_parallel_ranks():
    from mpu_bridge import deepspeed_groups

    assert deepspeed_groups._get_expert_parallel_ranks is _get_expert_parallel_ranks


# --------------------------------------------------------------------------
# Errors: where DeepSpeed asserts, we raise LayoutError naming the numbers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((12, 2, 1, 4), "world size 12 is not divisible by tp·pp = 8"),
        ((16, 2, 3), "world/(tp·pp) = 16/2 = 8 is not divisible by ep = 3"),
        ((16, 0, 2), "tp must be a positive integer, got 0"),
        ((16, 2, 0), "ep must be a positive integer, got 0"),
        ((16, 2, 2.0), "ep must be a positive integer"),
    ],
)
def test_get_expert_parallel_ranks_rejects_what_deepspeed_asserts_on(args, fragment):
    with pytest.raises(LayoutError) as info:
        _get_expert_parallel_ranks(*args)
    assert fragment in str(info.value)


def test_dp_not_divisible_by_ep_names_the_data_parallel_size():
    with pytest.raises(LayoutError, match=r"16/8 = 2 is not divisible by ep = 4"):
        _get_expert_parallel_ranks(16, 2, 4, 4)


def test_legacy_path_rejects_a_stage_not_divisible_by_ep():
    message = r"stage of world/pp = 12/2 = 6 ranks is not divisible by ep = 4"
    with pytest.raises(LayoutError, match=message):
        deepspeed_expert_groups(12, ep=4, pp=2, path="legacy")


def test_world_not_divisible_by_pp_is_rejected():
    # DeepSpeed's legacy path does not check this and asks for ranks past the world.
    with pytest.raises(LayoutError, match=r"world size 10 is not divisible by pp = 3"):
        deepspeed_expert_groups(10, ep=1, pp=3, path="legacy")


def test_tp_strided_rejects_data_before_expert_like_deepspeed():
    with pytest.raises(LayoutError, match=r"does not support D \+ E"):
        deepspeed_expert_groups(16, ep=2, tp=2, path="tp_strided", data_before_expert=True)


def test_tp_strided_rejects_ep_groups_that_would_straddle_tensor_lanes():
    # DeepSpeed would build EP groups [0, 4, 1, 5] and [2, 6, 3, 7] here.
    with pytest.raises(LayoutError, match=r"ep = 4 does not divide the 2 ranks of one tensor lane"):
        deepspeed_expert_groups(8, ep=4, tp=4, path="tp_strided")


def test_unknown_path_lists_the_known_ones():
    with pytest.raises(LayoutError, match="model_parallel, legacy, tp_strided"):
        deepspeed_expert_groups(8, ep=2, path="sp")


def test_rank_outside_the_world_is_rejected():
    with pytest.raises(LayoutError, match=r"rank 8 is outside the world of 8 ranks"):
        deepspeed_expert_groups_of(8, 8, ep=2, path="legacy")


def test_layout_error_is_a_value_error_for_callers_of_deepspeeds_function():
    with pytest.raises(ValueError):
        _get_expert_parallel_ranks(16, 2, 3)


# --------------------------------------------------------------------------
# Properties over random configurations
# --------------------------------------------------------------------------


@st.composite
def configs(draw) -> Tuple[int, Dict[str, Any]]:
    path = draw(st.sampled_from(DEEPSPEED_PATHS))
    tp = draw(st.sampled_from([1, 2, 3, 4]))
    pp = draw(st.sampled_from([1, 2, 3]))
    ep = draw(st.sampled_from([1, 2, 4, 3]))
    rest = draw(st.sampled_from([1, 2, 3]))
    data_before_expert = draw(st.booleans()) and not (path == "tp_strided" and tp > 1)
    kwargs = dict(ep=ep, tp=tp, pp=pp, path=path, data_before_expert=data_before_expert)
    return tp * pp * ep * rest, kwargs


@settings(max_examples=150)
@given(configs())
def test_ep_and_edp_groups_each_partition_the_world(config):
    world, kwargs = config
    for groups in deepspeed_expert_groups(world, **kwargs):
        assert sorted(rank for group in groups for rank in group) == list(range(world))


@settings(max_examples=150)
@given(configs())
def test_an_ep_group_and_an_edp_group_share_at_most_one_rank(config):
    world, kwargs = config
    ep_groups, edp_groups = deepspeed_expert_groups(world, **kwargs)
    edp_of = {rank: index for index, group in enumerate(edp_groups) for rank in group}
    for group in ep_groups:
        assert len({edp_of[rank] for rank in group}) == len(group)


@settings(max_examples=150)
@given(configs())
def test_every_group_stays_inside_one_pipeline_stage(config):
    world, kwargs = config
    stage = world // kwargs["pp"]
    for groups in deepspeed_expert_groups(world, **kwargs):
        assert all(len({rank // stage for rank in group}) == 1 for group in groups)


@settings(max_examples=150)
@given(configs())
def test_groups_are_the_expert_layouts_as_sets(config):
    world, kwargs = config
    path = kwargs["path"]
    layout = expert_layout(
        world,
        ep=kwargs["ep"],
        tp=kwargs["tp"],
        pp=kwargs["pp"],
        data_before_expert=kwargs["data_before_expert"],
        expert_tensor_parallel=(path != "legacy" and kwargs["tp"] > 1),
    )
    ep_groups, edp_groups = deepspeed_expert_groups(world, **kwargs)
    assert as_sets(ep_groups) == as_sets(layout.groups("ep"))
    if path == "tp_strided" and kwargs["tp"] > 1:
        assert as_sets(edp_groups) == as_sets(layout.expert.groups(("tp", "dp")))
    else:
        assert as_sets(edp_groups) == as_sets(layout.groups("edp"))


@settings(max_examples=100)
@given(configs())
def test_groups_of_each_rank_is_its_listed_group_verbatim(config):
    world, kwargs = config
    ep_groups, edp_groups = deepspeed_expert_groups(world, **kwargs)
    for rank in range(world):
        ep_ranks, edp_ranks = deepspeed_expert_groups_of(rank, world, **kwargs)
        assert ep_ranks in ep_groups and rank in ep_ranks
        assert edp_ranks in edp_groups and rank in edp_ranks


@settings(max_examples=100)
@given(configs())
def test_creation_order_holds_exactly_the_listed_groups_in_order(config):
    world, kwargs = config
    ep_groups, edp_groups = deepspeed_expert_groups(world, **kwargs)
    calls = deepspeed_group_creation_order(world, **kwargs)
    assert [ranks for kind, ranks in calls if kind == "ep"] == ep_groups
    assert [ranks for kind, ranks in calls if kind == "edp"] == edp_groups
    assert len(calls) == len(ep_groups) + len(edp_groups)


# --------------------------------------------------------------------------
# The real DeepSpeed as the oracle (one subprocess for the whole module)
# --------------------------------------------------------------------------


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sweep_expert_parallel_ranks() -> List[List[Any]]:
    """Every valid (world, tp, ep, pp, d_before_e) for a spread of world sizes: 532 configs."""
    sweep = []
    for world in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        for tp in _divisors(world):
            for pp in _divisors(world // tp):
                for ep in _divisors(world // (tp * pp)):
                    for data_before_expert in (False, True):
                        sweep.append([world, tp, ep, pp, data_before_expert])
    return sweep


def _sweep_create_expert_and_data_parallel() -> List[Dict[str, Any]]:
    """Configs of the legacy (mp None) and TP-strided (mp > 1) paths, run once per rank."""
    sweep = []
    for world in (1, 2, 4, 6, 8, 12, 16, 24):
        for pp in _divisors(world):
            for ep in _divisors(world // pp):
                for data_before_expert in (False, True):
                    sweep.append(
                        dict(world=world, ep=ep, mp=None, pp=pp, d_before_e=data_before_expert)
                    )
                for mp in _divisors(world // pp)[1:]:
                    sweep.append(dict(world=world, ep=ep, mp=mp, pp=pp, d_before_e=False))
    return sweep


_RANKS_LINE = re.compile(
    r"(creating expert parallel|Creating expert data parallel) process group named \S+ "
    r"with ranks: (\[.*\])"
)


def _deepspeed_oracle(request: Dict[str, Any]) -> Dict[str, Any]:
    """Run DeepSpeed's own functions on ``request``'s configs (in a subprocess: see the bottom)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed.comm as ds_comm
    import torch.distributed as torch_dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    # TorchBackend would otherwise compile a shared-memory op (30-70 s; see ENVIRONMENT.md).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from deepspeed.utils import groups as ds_groups
    from deepspeed.utils import logger as ds_logger

    result: Dict[str, Any] = {
        "expert_parallel_ranks": [
            ds_groups._get_expert_parallel_ranks(*config)
            for config in request["expert_parallel_ranks"]
        ],
        "create_expert_and_data_parallel": [],
    }

    messages: List[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    ds_logger.addHandler(_Collect(level=logging.INFO))
    ds_logger.setLevel(logging.INFO)  # its own stdout handler stays at WARNING
    for config in request["create_expert_and_data_parallel"]:
        world, ep, name = config["world"], config["ep"], f"ep_size_{config['ep']}"
        per_rank, calls = [], []
        for rank in range(world):
            torch_dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            ds_comm.init_distributed(dist_backend="fake")  # wraps the existing world
            messages.clear()
            ds_groups._create_expert_and_data_parallel(
                ep,
                mp_size=config["mp"],
                pp_size=config["pp"],
                mp_mode="tp",
                use_data_before_expert_parallel_=config["d_before_e"],
            )
            per_rank.append(
                [
                    list(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name]),
                    list(ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name]),
                ]
            )
            if rank == 0:  # DeepSpeed logs every new_group call on rank 0 only
                for message in messages:
                    match = _RANKS_LINE.search(message)
                    if match:
                        is_ep = match.group(1).startswith("creating expert parallel")
                        calls.append(["ep" if is_ep else "edp", json.loads(match.group(2))])
            ds_comm.destroy_process_group()  # also clears DeepSpeed's group dictionaries
        result["create_expert_and_data_parallel"].append({"per_rank": per_rank, "calls": calls})
    return result


@pytest.fixture(scope="module")
def deepspeed_answers(tmp_path_factory) -> Dict[str, Any]:
    if importlib.util.find_spec("deepspeed") is None:  # checked without importing it (seconds)
        pytest.skip("deepspeed is not installed")
    folder = tmp_path_factory.mktemp("deepspeed_oracle")
    request = {
        "expert_parallel_ranks": _sweep_expert_parallel_ranks(),
        "create_expert_and_data_parallel": _sweep_create_expert_and_data_parallel(),
    }
    (folder / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, str(folder / "request.json"), str(folder / "answer.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
    )
    if done.returncode != 0:
        pytest.fail(f"the DeepSpeed oracle failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    answers = json.loads((folder / "answer.json").read_text())
    answers["request"] = request
    return answers


def test_get_expert_parallel_ranks_equals_deepspeeds_on_a_sweep(deepspeed_answers):
    configs_ = deepspeed_answers["request"]["expert_parallel_ranks"]
    expected = deepspeed_answers["expert_parallel_ranks"]
    assert len(configs_) == len(expected) == 532
    mismatches = [
        (config, want)
        for config, want in zip(configs_, expected)
        if list(_get_expert_parallel_ranks(*config)) != want
    ]
    assert mismatches == []


def _ours(config: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = dict(
        ep=config["ep"],
        pp=config["pp"],
        tp=config["mp"] or 1,
        path="legacy" if config["mp"] is None else "tp_strided",
        data_before_expert=config["d_before_e"],
    )
    return kwargs


def _tp_strided_straddles(config: Dict[str, Any]) -> bool:
    mp = config["mp"] or 1
    return mp > 1 and (config["world"] // (config["pp"] * mp)) % config["ep"] != 0


def test_create_expert_and_data_parallel_records_our_groups_on_every_rank(deepspeed_answers):
    configs_ = deepspeed_answers["request"]["create_expert_and_data_parallel"]
    answers = deepspeed_answers["create_expert_and_data_parallel"]
    checked = 0
    mismatches = []
    for config, answer in zip(configs_, answers):
        if _tp_strided_straddles(config):
            continue
        for rank, recorded in enumerate(answer["per_rank"]):
            ours = list(deepspeed_expert_groups_of(rank, config["world"], **_ours(config)))
            checked += 1
            if ours != recorded:
                mismatches.append((config, rank, recorded, ours))
    assert checked > 2000
    assert mismatches == []


def test_create_expert_and_data_parallel_calls_new_group_in_our_creation_order(deepspeed_answers):
    configs_ = deepspeed_answers["request"]["create_expert_and_data_parallel"]
    answers = deepspeed_answers["create_expert_and_data_parallel"]
    checked = 0
    mismatches = []
    for config, answer in zip(configs_, answers):
        if _tp_strided_straddles(config):
            continue
        calls = deepspeed_group_creation_order(config["world"], **_ours(config))
        ours = [list(call) for call in calls]
        checked += 1
        if ours != answer["calls"]:
            mismatches.append((config, answer["calls"], ours))
    assert checked > 200
    assert mismatches == []


def test_where_we_refuse_tp_strided_deepspeed_mixes_tensor_lanes_in_an_ep_group(deepspeed_answers):
    configs_ = deepspeed_answers["request"]["create_expert_and_data_parallel"]
    answers = deepspeed_answers["create_expert_and_data_parallel"]
    refused = 0
    for config, answer in zip(configs_, answers):
        if not _tp_strided_straddles(config):
            continue
        refused += 1
        with pytest.raises(LayoutError, match="straddle|different tensor lanes"):
            deepspeed_expert_groups(config["world"], **_ours(config))
        ep_groups = [ranks for kind, ranks in answer["calls"] if kind == "ep"]
        lanes = [{rank % config["mp"] for rank in group} for group in ep_groups]
        assert any(len(lane) > 1 for lane in lanes), (config, ep_groups)
    assert refused > 10


if __name__ == "__main__":
    # The oracle subprocess: python tests/test_deepspeed_layouts.py REQUEST.json ANSWER.json
    _request_path, _answer_path = sys.argv[1:3]
    _answer = _deepspeed_oracle(json.loads(Path(_request_path).read_text()))
    Path(_answer_path).write_text(json.dumps(_answer))
