"""The hostile-input battery of issue 8 (cases 6, 7 and 8; guarantees G5 and G6).

Every input a user can get wrong is tried the way a hostile user would: things that
are not MPUs given to ``attach``/``set_mpu``; bools, floats and strings where a
size is due; ``"no"`` where a bool is due; infinite, huge, zero, negative, NaN and
string timeouts; and MPUs whose getters answer with floats, strings, bools or
non-group objects. Each must be refused with the documented error type and a
message naming the input (or the MPU getter) and the value -- never coerced,
never a raw ``TypeError``/``AssertionError``. numpy integers are accepted wherever
``plan`` takes them.

The battery also runs under ``python -O`` (:func:`test_the_battery_holds_under_optimize`
re-runs this file in a subprocess): validation must not rely on ``assert``. Under
``-O`` the library's ``assert`` statements are stripped while this file's still
check (pytest rewrites a test module's asserts into plain ``if``/``raise``);
:func:`test_python_dash_O_strips_library_asserts_but_not_the_tests` proves both
inside that run.

Worlds: a ``fake``-backend world (one process, no communication, rank 0 of 2 or
4) for everything that is read or refused locally; four real gloo processes for
the check that pure getters need no communication.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np
import pytest
import torch.distributed as dist

import mpu_bridge
from _multiproc import run_ranks
from mpu_bridge import deepspeed_groups
from mpu_bridge.errors import GroupCreationError, LayoutError, MpuError
from mpu_bridge.layout import expert_order, plan

# Set by test_the_battery_holds_under_optimize for the subprocess it starts.
_UNDER_O_ENV = "MPU_BRIDGE_HOSTILE_BATTERY_UNDER_O"

# What every "not an MPU" message must say an MPU provides.
_MPU_NEEDS = r"getters such as get_tensor_model_parallel_world_size"


@contextlib.contextmanager
def _fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a test left torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        deepspeed_groups.reset()
        dist.destroy_process_group()


@pytest.fixture
def world_of_4() -> Iterator[None]:
    """Rank 0 of a 4-rank ``fake`` world (no communication, no plan check)."""
    with _fake_world(4):
        yield


@pytest.fixture
def world_of_2() -> Iterator[None]:
    """Rank 0 of a 2-rank ``fake`` world."""
    with _fake_world(2):
        yield


# ---------------------------------------------------------------------------------------
# Case 7: things that are not MPUs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "not_an_mpu, message",
    [
        ("megatron.core.parallel_state",
         r"^'megatron\.core\.parallel_state' is a str \(import it instead of naming it\), not an MPU; "),
        (42, r"^42 is a int, not an MPU; "),
        ({}, r"^\{\} is a dict, not an MPU; "),
        (object(), r"^<object object at 0x[0-9a-f]+> has none of the getters an MPU provides; "),
        (types.ModuleType("m"), r"^<module 'm'> has none of the getters an MPU provides; "),
    ],
    ids=["module-name-string", "int", "empty-dict", "bare-object", "module-without-getters"],
)
def test_attach_refuses_what_is_not_an_mpu(world_of_4, not_an_mpu, message):
    with pytest.raises(MpuError, match=message + r".*" + _MPU_NEEDS):
        mpu_bridge.attach(not_an_mpu)


def test_set_mpu_refuses_the_module_name_as_a_string():
    deepspeed_groups.reset()
    try:
        with pytest.raises(
            MpuError,
            match=r"^'megatron\.core\.parallel_state' is a str \(import it instead of naming it\), "
                  r"not an MPU; .*" + _MPU_NEEDS,
        ):
            deepspeed_groups.set_mpu("megatron.core.parallel_state")
    finally:
        deepspeed_groups.reset()


# A small, well-formed MPU for rank 0 of a 2-rank world: tp = pp = 1, dp = 2 (Megatron-LM
# 2.x names). Each answer can be overridden; an exception instance as the answer is raised.
# Every malformed value used below would coerce (int(), bool-as-int) to the right answer,
# so accepting one is a silent coercion, not a visible failure elsewhere.


class _Mpu:
    def __init__(self, groups: Dict[str, Any], **answers: Any) -> None:
        self._groups = groups
        self._answers = answers

    def _answer(self, name: str, default: Any) -> Any:
        value = self._answers.get(name, default)
        if isinstance(value, BaseException):
            raise value
        return value

    def get_tensor_model_parallel_world_size(self):
        return self._answer("get_tensor_model_parallel_world_size", 1)

    def get_tensor_model_parallel_rank(self):
        return self._answer("get_tensor_model_parallel_rank", 0)

    def get_tensor_model_parallel_group(self):
        return self._answer("get_tensor_model_parallel_group", self._groups["tp"])

    def get_tensor_model_parallel_group_ranks(self):
        return self._answer("get_tensor_model_parallel_group_ranks", [0])

    def get_pipeline_model_parallel_world_size(self):
        return self._answer("get_pipeline_model_parallel_world_size", 1)

    def get_pipeline_model_parallel_rank(self):
        return self._answer("get_pipeline_model_parallel_rank", 0)

    def get_pipeline_model_parallel_group(self):
        return self._answer("get_pipeline_model_parallel_group", self._groups["pp"])

    def get_data_parallel_world_size(self):
        return self._answer("get_data_parallel_world_size", 2)

    def get_data_parallel_rank(self):
        return self._answer("get_data_parallel_rank", 0)

    def get_data_parallel_group(self):
        return self._answer("get_data_parallel_group", self._groups["dp"])

    def get_data_parallel_group_ranks(self):
        return self._answer("get_data_parallel_group_ranks", [0, 1])


@pytest.fixture
def mpu_groups(world_of_2) -> Dict[str, Any]:
    """Rank 0's tp, pp ([0]) and dp ([0, 1]) groups in the 2-rank fake world."""
    single = dist.new_group([0], use_local_synchronization=True)
    return {"tp": single, "pp": single, "dp": dist.new_group([0, 1], use_local_synchronization=True)}


def test_the_well_formed_test_mpu_attaches(mpu_groups):
    """Control for the malformed cases below: the unmodified MPU is read as it is."""
    bridge = mpu_bridge.attach(_Mpu(mpu_groups))
    assert bridge.ranks("tensor_parallel") == (0,)
    assert bridge.ranks("data_parallel") == (0, 1)
    assert bridge.data_parallel().group is mpu_groups["dp"]
    assert bridge.data_parallel().borrowed is True


def _raising_property(self):
    raise RuntimeError("boom from a property")


@pytest.mark.parametrize(
    "getter",
    [
        "get_tensor_model_parallel_world_size",
        "get_data_parallel_group",
        "get_tensor_model_parallel_group",
        "get_pipeline_model_parallel_group",
        "get_data_parallel_group_ranks",
    ],
)
def test_a_getter_that_is_a_raising_property_is_an_error_naming_it(mpu_groups, getter):
    """Not "absent": a property that raises is a broken MPU, whichever getter it is."""
    hostile = type("HostileMpu", (_Mpu,), {getter: property(_raising_property)})
    with pytest.raises(MpuError, match=rf"{getter}\b.*RuntimeError: boom from a property"):
        mpu_bridge.attach(hostile(mpu_groups))


# ---------------------------------------------------------------------------------------
# Case 8: malformed MPU answers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "getter, value, shown",
    [
        ("get_data_parallel_group_ranks", [0.0, 1.0], "[0.0, 1.0]"),
        ("get_data_parallel_group_ranks", "01", "'01'"),
        ("get_data_parallel_group_ranks", [True, False], "[True, False]"),
        ("get_data_parallel_group_ranks", [False, True], "[False, True]"),
        ("get_tensor_model_parallel_group_ranks", (0.0,), "(0.0,)"),
        ("get_tensor_model_parallel_world_size", True, "True (bool)"),
        ("get_data_parallel_world_size", 2.0, "2.0 (float)"),
        ("get_data_parallel_rank", 0.0, "0.0 (float)"),
        ("get_tensor_model_parallel_rank", False, "False (bool)"),
    ],
    ids=["ranks-floats", "ranks-string", "ranks-bools", "ranks-bools-in-order", "tp-ranks-float",
         "size-true", "size-float", "rank-float", "rank-false"],
)
def test_a_malformed_mpu_answer_is_an_error_naming_the_getter_and_value(mpu_groups, getter, value, shown):
    with pytest.raises(
        MpuError, match=rf"answered {getter}\(\) with a malformed value: .*returned {re.escape(shown)}"
    ):
        mpu_bridge.attach(_Mpu(mpu_groups, **{getter: value}))


@pytest.mark.parametrize("getter", ["get_data_parallel_group", "get_tensor_model_parallel_group"])
def test_a_group_getter_returning_a_non_group_is_an_error_naming_it(mpu_groups, getter):
    with pytest.raises(
        MpuError,
        match=rf"answered {getter}\(\) with a malformed value: .*returned <object object at 0x[0-9a-f]+>, "
              r"not a process group",
    ):
        mpu_bridge.attach(_Mpu(mpu_groups, **{getter: object()}))


_UNINITIALISED_GROUPS = {
    name: AssertionError("group is not initialized")
    for name in (
        "get_tensor_model_parallel_rank", "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_group_ranks", "get_pipeline_model_parallel_rank",
        "get_pipeline_model_parallel_group", "get_data_parallel_rank", "get_data_parallel_group",
        "get_data_parallel_group_ranks",
    )
}


@pytest.mark.parametrize("size", [0, None], ids=["zero", "none"])
def test_size_getters_answering_zero_or_none_read_as_uninitialised(mpu_groups, size):
    """megatron's answers before initialize_model_parallel: not malformed, uninitialised."""
    answers = dict(_UNINITIALISED_GROUPS)
    for name in ("get_tensor_model_parallel_world_size", "get_pipeline_model_parallel_world_size",
                 "get_data_parallel_world_size"):
        answers[name] = size
    with pytest.raises(
        MpuError,
        match=rf"(?s)get_tensor_model_parallel_world_size\(\): returned {size}\n.*"
              r"The MPU looks uninitialised",
    ):
        mpu_bridge.attach(_Mpu(mpu_groups, **answers))


# ---------------------------------------------------------------------------------------
# Case 8 / G6: loose arguments of the bridge's requests
# ---------------------------------------------------------------------------------------

# (value, message): each would have been read as 1 / 2 / 2 / ... by int() or truthiness.
_NOT_POSITIVE_INTS = [
    (True, "must be a positive integer, got True (bool)"),
    (2.5, "must be a positive integer, got 2.5 (float)"),
    (2.7, "must be a positive integer, got 2.7 (float)"),
    ("2", "must be a positive integer, got '2' (str)"),
    (0, "must be a positive integer, got 0"),
    (-1, "must be a positive integer, got -1"),
]
_IDS = ["true", "2.5", "2.7", "str-2", "zero", "minus-1"]


@pytest.mark.parametrize("value, message", _NOT_POSITIVE_INTS, ids=_IDS)
def test_all_to_all_groups_refuses_a_loose_node_size(world_of_4, value, message):
    bridge = mpu_bridge.attach()
    with pytest.raises(LayoutError, match=r"^gpus_per_node " + re.escape(message) + "$"):
        bridge.all_to_all_groups(value)


@pytest.mark.parametrize("value, message", _NOT_POSITIVE_INTS, ids=_IDS)
def test_zero_param_groups_refuses_a_loose_partition_size(world_of_4, value, message):
    bridge = mpu_bridge.attach()
    with pytest.raises(LayoutError, match=r"^partition_size " + re.escape(message) + "$"):
        bridge.zero_param_groups(value)


@pytest.mark.parametrize("value, message", _NOT_POSITIVE_INTS, ids=_IDS)
def test_expert_groups_refuses_a_loose_expert_size(world_of_4, value, message):
    bridge = mpu_bridge.attach()
    with pytest.raises(LayoutError, match=r"^ep_size " + re.escape(message) + "$"):
        bridge.expert_groups(value)


@pytest.mark.parametrize(
    "value, message",
    [("no", "data_before_expert must be True, False or None, got 'no' (str)"),
     (0, "data_before_expert must be True, False or None, got 0 (int)")],
    ids=["no", "zero"],
)
def test_expert_groups_refuses_a_non_bool_data_before_expert(world_of_4, value, message):
    bridge = mpu_bridge.attach()
    with pytest.raises(LayoutError, match=r"^" + re.escape(message) + "$"):
        bridge.expert_groups(2, data_before_expert=value)


def test_expert_groups_refuses_an_int_for_expert_tensor_parallel(world_of_4):
    bridge = mpu_bridge.attach()
    with pytest.raises(LayoutError, match=r"^expert_tensor_parallel must be True or False, got 1 \(int\)$"):
        bridge.expert_groups(2, expert_tensor_parallel=1)


def test_ranks_refuses_a_loose_expert_size(world_of_4):
    bridge = mpu_bridge.attach()
    with pytest.raises(LayoutError, match=r"^ep_size must be a positive integer, got True \(bool\)$"):
        bridge.ranks("expert_parallel", ep_size=True)


def test_numpy_integers_are_accepted_wherever_plan_takes_them(world_of_4):
    assert plan(np.int64(4), tp=np.int64(2)).group_of("tp", 0) == [0, 1]
    bridge = mpu_bridge.attach(gpus_per_node=np.int32(2))
    assert bridge.zero_param_groups(np.int64(2)).ranks == (0, 1)
    experts = bridge.expert_groups(np.int64(2))
    assert (experts.name, experts.ep_size) == ("ep_size_2", 2)
    assert experts.expert_parallel.ranks == (0, 1)
    assert experts.expert_data_parallel.ranks == (0, 2)
    assert bridge.all_to_all_groups(np.int64(2)).local.ranks == (0, 1)
    assert bridge.all_to_all_groups().cross_node.ranks == (0, 2)
    assert bridge.ranks("expert_parallel", ep_size=np.int64(4)) == (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------
# Case 8 / G6: attach options, refused at attach (not at the first request)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [("x", "gpus_per_node must be a positive integer, got 'x' (str)"),
     (0, "gpus_per_node must be a positive integer, got 0"),
     (True, "gpus_per_node must be a positive integer, got True (bool)"),
     (2.0, "gpus_per_node must be a positive integer, got 2.0 (float)")],
    ids=["str-x", "zero", "true", "float"],
)
def test_attach_refuses_a_loose_gpus_per_node(world_of_4, value, message):
    with pytest.raises(LayoutError, match=r"^" + re.escape(message) + "$"):
        mpu_bridge.attach(gpus_per_node=value)


_FINITE = "agreement_timeout must be a positive number of seconds, finite and at most 2.592e+06 (30 days), got "
_NUMBER = "agreement_timeout must be a positive number of seconds (or a datetime.timedelta), got "


@pytest.mark.parametrize(
    "value, message",
    [
        (float("inf"), _FINITE + "inf"),
        (1e14, _FINITE + "100000000000000.0"),
        (30 * 24 * 3600 + 1, _FINITE + "2592001"),
        (0, _FINITE + "0"),
        (-1, _FINITE + "-1"),
        (float("nan"), _FINITE + "nan"),
        ("5", _NUMBER + "'5' (str)"),
        (True, _NUMBER + "True (bool)"),
    ],
    ids=["inf", "1e14", "30-days-and-a-second", "zero", "minus-1", "nan", "str-5", "true"],
)
def test_attach_refuses_an_unusable_agreement_timeout(world_of_4, value, message):
    with pytest.raises(GroupCreationError, match=r"^" + re.escape(message) + "$"):
        mpu_bridge.attach(agreement_timeout=value)


@pytest.mark.parametrize(
    "value, seconds",
    [(0.5, 0.5), (np.float64(7), 7.0), (datetime.timedelta(seconds=30), 30.0), (2592000, 2592000.0)],
    ids=["half-second", "numpy-float", "timedelta", "30-days"],
)
def test_attach_accepts_a_finite_positive_agreement_timeout(world_of_4, value, seconds):
    assert mpu_bridge.attach(agreement_timeout=value).registry.agreement_timeout == seconds


@pytest.mark.parametrize(
    "value, shown",
    [(5, "5"), (5.0, "5.0"), ("5", "'5'"), (None, "None"),
     (datetime.timedelta(0), "datetime.timedelta(0)"),
     (datetime.timedelta(days=365), "datetime.timedelta(days=365)")],
    ids=["int", "float", "str", "none", "zero-timedelta", "a-year"],
)
def test_attach_refuses_a_timeout_that_is_not_a_bounded_timedelta(world_of_4, value, shown):
    with pytest.raises(
        GroupCreationError,
        match=r"^timeout must be a positive datetime\.timedelta of at most 30 days, got " + re.escape(shown) + "$",
    ):
        mpu_bridge.attach(timeout=value)


def test_attach_refuses_an_order_that_is_not_a_string(world_of_4):
    with pytest.raises(LayoutError, match=r"^order must be a string such as 'tp-cp-ep-dp-pp' or None, got 3$"):
        mpu_bridge.attach(order=3)


def test_attach_refuses_a_verify_plan_that_is_not_a_bool(world_of_4):
    with pytest.raises(GroupCreationError, match=r"^verify_plan must be True, False or None, got 'yes' \(str\)$"):
        mpu_bridge.attach(verify_plan="yes")


# ---------------------------------------------------------------------------------------
# Case 8 / G6: the deepspeed.utils.groups names use the same validators
# ---------------------------------------------------------------------------------------


def test_deepspeed_expert_creation_refuses_a_string_mp_size(world_of_4):
    # Validated before it is compared with 1 (never a raw TypeError).
    with pytest.raises(LayoutError, match=r"mp_size must be a positive integer, got '2' \(str\)"):
        deepspeed_groups._create_expert_and_data_parallel(2, mp_size="2")


@pytest.mark.parametrize(
    "value, message",
    [(True, "pp_size must be a positive integer, got True (bool)"),
     (1.0, "pp_size must be a positive integer, got 1.0 (float)")],
    ids=["true", "float"],
)
def test_deepspeed_expert_creation_refuses_a_loose_pp_size(world_of_4, value, message):
    # pp is 1 here: True and 1.0 compare equal to it, so only validation refuses them.
    with pytest.raises(LayoutError, match=re.escape(message)):
        deepspeed_groups._create_expert_and_data_parallel(2, pp_size=value)


def test_deepspeed_expert_creation_refuses_a_non_bool_data_before_expert(world_of_4):
    with pytest.raises(LayoutError, match=r"^data_before_expert must be True, False or None, got 'no' \(str\)$"):
        deepspeed_groups._create_expert_and_data_parallel(2, use_data_before_expert_parallel_="no")


def test_deepspeed_zero_creation_refuses_a_bool_and_accepts_numpy(world_of_4):
    with pytest.raises(LayoutError, match=r"^partition_size must be a positive integer, got True \(bool\)$"):
        deepspeed_groups._create_zero_param_parallel_group(True)
    deepspeed_groups._create_zero_param_parallel_group(np.int64(2))
    assert deepspeed_groups._get_zero_param_intra_parallel_group_ranks() == [0, 1]


# ---------------------------------------------------------------------------------------
# Case 8: the layout helpers
# ---------------------------------------------------------------------------------------


def test_layout_to_dict_refuses_a_negative_group_limit():
    with pytest.raises(LayoutError, match=r"max_groups.*-1"):
        plan(8, tp=2).to_dict(max_groups=-1)


def test_expert_order_refuses_none():
    with pytest.raises(LayoutError, match=r"order must be a string.*None"):
        expert_order(None)


# ---------------------------------------------------------------------------------------
# Case 6 / G5: pure getters on one rank alone, in a real 4-rank gloo world
# ---------------------------------------------------------------------------------------

_AGREEMENT_TIMEOUT_S = 5.0
# The pure calls together must take well under the agreement timeout (a collective one
# would block rank 0 for the whole timeout, then raise: ranks 1-3 are in a barrier).
_PURE_BUDGET_S = _AGREEMENT_TIMEOUT_S / 2


def _pure_getters_alone(rank: int, world_size: int) -> Dict[str, Any]:
    """Rank 0 alone reads sizes, ranks and rank lists while ranks 1-3 wait in a barrier
    (outside the bridge); then every rank makes the same group calls."""
    import torch
    import torch.distributed as dist

    from mpu_bridge import attach
    from mpu_bridge import deepspeed_groups as groups

    groups.reset()
    bridge = attach(agreement_timeout=_AGREEMENT_TIMEOUT_S)
    legacy = bridge.as_legacy_mpu()
    default = groups.get_bridge()  # attaching is local
    out: Dict[str, Any] = {}
    if rank == 0:
        calls = {
            "ds._get_model_parallel_world_size": groups._get_model_parallel_world_size,
            "ds._get_sequence_parallel_world_size": groups._get_sequence_parallel_world_size,
            "ds._get_sequence_parallel_rank": groups._get_sequence_parallel_rank,
            "ds._get_data_parallel_world_size": groups._get_data_parallel_world_size,
            "ds._get_data_parallel_rank": groups._get_data_parallel_rank,
            "ds._get_data_parallel_group_ranks": groups._get_data_parallel_group_ranks,
            "ds._get_sequence_data_parallel_world_size": groups._get_sequence_data_parallel_world_size,
            "ds._get_sequence_data_parallel_rank": groups._get_sequence_data_parallel_rank,
            "ds._get_broadcast_src_rank": groups._get_broadcast_src_rank,
            "bridge.ranks(tensor_parallel)": lambda: bridge.ranks("tensor_parallel"),
            "bridge.ranks(data_parallel)": lambda: bridge.ranks("data_parallel"),
            "bridge.ranks(expert_parallel, ep_size=2)": lambda: bridge.ranks("expert_parallel", ep_size=2),
            "bridge.layout.group_of(dp, 0)": lambda: bridge.layout.group_of("dp", 0),
            "bridge.layout.group_of(tp, 0)": lambda: bridge.layout.group_of("tp", 0),
            "legacy.get_model_parallel_world_size": legacy.get_model_parallel_world_size,
            "legacy.get_model_parallel_rank": legacy.get_model_parallel_rank,
            "legacy.get_tensor_model_parallel_world_size": legacy.get_tensor_model_parallel_world_size,
            "legacy.get_tensor_model_parallel_rank": legacy.get_tensor_model_parallel_rank,
            "legacy.get_pipeline_model_parallel_world_size": legacy.get_pipeline_model_parallel_world_size,
            "legacy.get_pipe_parallel_rank": legacy.get_pipe_parallel_rank,
            "legacy.get_data_parallel_world_size": legacy.get_data_parallel_world_size,
            "legacy.get_data_parallel_rank": legacy.get_data_parallel_rank,
            "legacy.get_data_parallel_group_ranks": legacy.get_data_parallel_group_ranks,
            "legacy.get_data_parallel_src_rank": legacy.get_data_parallel_src_rank,
        }
        answers: Dict[str, Any] = {}
        start = time.monotonic()
        for name, call in calls.items():
            try:
                answers[name] = call()
            except Exception as exc:  # reported, not raised: the other ranks are in a barrier
                answers[name] = f"raised {type(exc).__name__}: {exc}"
        out["pure_seconds"] = time.monotonic() - start
        out["answers"] = answers
        out["agreements_after_pure"] = (bridge.stats()["agreements"], default.stats()["agreements"])
    dist.barrier()
    sums = []
    # expert groups of size 2 ([0, 1] and [2, 3]): a first-time request, agreed by all ranks
    for group in (bridge.expert_groups(2).expert_parallel.group, default.expert_groups(2).expert_parallel.group):
        value = torch.tensor([1 + dist.get_rank()])
        dist.all_reduce(value, group=group)
        sums.append(int(value) - 2)  # the sum of the group's global ranks
    out["world_sums"] = sums
    out["agreements_after_world"] = (bridge.stats()["agreements"], default.stats()["agreements"])
    bridge.close()
    groups.reset()
    return out


def test_pure_getters_on_rank_0_alone_need_no_communication_on_four_ranks():
    results = run_ranks(_pure_getters_alone, 4, timeout=120)
    rank0 = results[0]
    assert rank0["answers"] == {
            "ds._get_model_parallel_world_size": 1,
            "ds._get_sequence_parallel_world_size": 1,
            "ds._get_sequence_parallel_rank": 0,
            "ds._get_data_parallel_world_size": 4,
            "ds._get_data_parallel_rank": 0,
            "ds._get_data_parallel_group_ranks": [0, 1, 2, 3],
            "ds._get_sequence_data_parallel_world_size": 4,
            "ds._get_sequence_data_parallel_rank": 0,
            "ds._get_broadcast_src_rank": 0,
            "bridge.ranks(tensor_parallel)": (0,),
            "bridge.ranks(data_parallel)": (0, 1, 2, 3),
            "bridge.ranks(expert_parallel, ep_size=2)": (0, 1),
            "bridge.layout.group_of(dp, 0)": [0, 1, 2, 3],
            "bridge.layout.group_of(tp, 0)": [0],
            "legacy.get_model_parallel_world_size": 1,
            "legacy.get_model_parallel_rank": 0,
            "legacy.get_tensor_model_parallel_world_size": 1,
            "legacy.get_tensor_model_parallel_rank": 0,
            "legacy.get_pipeline_model_parallel_world_size": 1,
            "legacy.get_pipe_parallel_rank": 0,
            "legacy.get_data_parallel_world_size": 4,
            "legacy.get_data_parallel_rank": 0,
            "legacy.get_data_parallel_group_ranks": [0, 1, 2, 3],
            "legacy.get_data_parallel_src_rank": 0,
    }
    assert rank0["pure_seconds"] < _PURE_BUDGET_S, f"the pure calls on rank 0 took {rank0['pure_seconds']:.2f} s"
    assert rank0["agreements_after_pure"] == (0, 0)
    # No round was consumed: identical group calls on every rank afterwards work.
    assert [r["world_sums"] for r in results] == [[1, 1], [1, 1], [5, 5], [5, 5]]
    assert [r["agreements_after_world"] for r in results] == [(1, 1)] * 4


# ---------------------------------------------------------------------------------------
# The battery under python -O
# ---------------------------------------------------------------------------------------


def test_python_dash_O_strips_library_asserts_but_not_the_tests():
    """In the ``-O`` subprocess: code compiled as the library is has no ``assert`` left,
    while this module's asserts (rewritten by pytest) still fail when they should."""
    if os.environ.get(_UNDER_O_ENV) != "1":
        pytest.skip(f"only in the python -O run ({_UNDER_O_ENV}=1)")
    if sys.flags.optimize < 1:
        pytest.fail(f"the battery run has sys.flags.optimize == {sys.flags.optimize}, not >= 1")
    exec(compile("assert False, 'a library assert ran under -O'", "<library>", "exec"))  # stripped: no error
    with pytest.raises(AssertionError):
        assert sys.flags.optimize == 0  # a test assert: still checked


def test_the_battery_holds_under_optimize():
    """Every case of this file except the multi-process one, again under ``python -O``."""
    here = Path(__file__).resolve()
    env = dict(os.environ, **{_UNDER_O_ENV: "1"})
    proc = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", "-q", str(here), "-p", "no:cacheprovider",
         "-k", "not under_optimize and not four_ranks"],
        cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode != 0:
        pytest.fail(f"the battery failed under python -O (exit {proc.returncode}):\n{tail}")
    summary = proc.stdout.strip().splitlines()[-1]
    # Everything ran and passed: nothing skipped (the -O check above runs there), only
    # this test and the multi-process one deselected.
    if re.search(r"\b\d+ passed", summary) is None or re.search(r"failed|error|skipped|xpassed", summary) \
            or re.search(r"\b2 deselected", summary) is None:
        pytest.fail(f"the -O run did not run the battery as expected: {summary!r}\n{tail}")
