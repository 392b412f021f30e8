"""Faults, through the public bridge API, in worlds of 4 local gloo processes.

Two spawned worlds, each running its scenarios in sequence; the rank functions
record what they observe as plain data and the tests below read one observation
each.

**Setup faults** (standalone bridges; ranks wait :data:`AGREEMENT_TIMEOUT_S` for a
missing rank):

1. ranks disagree about the plan: rank 3 asks for ``expert_groups(4)``, ranks 0-2
   for ``expert_groups(2)`` -> :class:`PlanMismatchError` on every rank, naming
   which ranks planned what; nothing is created;
2. rank 3 raises in its own setup before calling ``expert_groups`` -> ranks 0-2 get
   :class:`GroupCreationError` naming rank 3 and the timeout (no hang: the error
   arrives; the harness deadline is the backstop);
3. rank 3 exits (``os._exit``) during setup -> the same error on ranks 0-2, while
   rank 3's process is gone.

**Lifecycle under megatron-core** (tp=2 on 4 ranks):

4. ``torch.distributed.destroy_process_group()`` underneath the bridge -> every query
   raises :class:`BridgeError`, and keeps doing so after re-initialisation (nothing
   stale); ``init_process_group`` again (a fresh prefix of the rendezvous store) +
   megatron-core again + ``attach`` -> correct groups;
5. ``destroy_model_parallel()`` -> :class:`MpuError` on the next query;
6. megatron-core again with other sizes (tp=1, pp=2) -> the same bridge object
   serves the new groups (megatron-core's own; all-reduces sum right), and so does
   the legacy MPU adapter taken before.

Expected rank lists for 4 ranks: tp=2 -> TP [0, 1] [2, 3], DP [0, 2] [1, 3],
EP(2) [0, 2] [1, 3]; tp=1 pp=2 -> PP [0, 2] [1, 3], DP [0, 1] [2, 3], EP(2) [0, 1] [2, 3].
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import pytest

import _multiproc
from _megatron import initialize_megatron, megatron_parallel_state
from _multiproc import RanksTimeout, run_ranks
from mpu_bridge.optional import is_available

WORLD_SIZE = 4
FAULTY_RANK = 3
#: How long the ranks wait for a missing rank before giving up (attach(agreement_timeout=...)).
AGREEMENT_TIMEOUT_S = 3.0
#: The agreement timeout where nobody is missing (a disagreement is seen once all arrive).
GENEROUS_TIMEOUT_S = 120.0
#: Hard deadline of a whole world: the backstop that turns a hang into a failure (importing
#: torch and megatron-core in 4 processes takes minutes on a loaded 2-core machine).
WORLD_TIMEOUT_S = 600.0
FAULT_EXIT_CODE = 17

needs_megatron = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)


# ---------------------------------------------------------------------------------------
# Inside the rank processes (module level: the harness pickles functions by reference)
# ---------------------------------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> Dict[str, Any]:
    """What ``call()`` did: ``{"error": type name, "message": text}`` or ``{"error": None}``."""
    try:
        call()
    except Exception as exc:  # the type and message are what the tests look at
        return {"error": type(exc).__name__, "message": str(exc), "bridge_error": _is_bridge_error(exc)}
    return {"error": None, "message": "", "bridge_error": False}


def _is_bridge_error(exc: BaseException) -> bool:
    from mpu_bridge.errors import BridgeError

    return isinstance(exc, BridgeError)


def _sum_of_ranks(group: Any) -> int:
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _torch_ranks(group: Any) -> Tuple[int, ...]:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group))


def _load_model_before_the_bridge() -> None:
    """Stands for a trainer's own setup code that fails on one rank."""
    raise RuntimeError("checkpoint shard missing on this rank")


def _align(store: Any, scenario: str, world_size: int) -> None:
    """Wait until every rank got here: a barrier through the store, so a rank may exit right after."""
    if int(store.add(f"faults/{scenario}/arrived", 1)) == world_size:
        store.set(f"faults/{scenario}/go", "1")
    store.wait([f"faults/{scenario}/go"], datetime.timedelta(seconds=WORLD_TIMEOUT_S))


def _setup_faults_world(rank: int, world_size: int) -> Dict[str, Any]:
    from torch.distributed import distributed_c10d as c10d

    import mpu_bridge

    store = c10d._get_default_store()
    observed: Dict[str, Any] = {}
    # Each scenario starts with a barrier, so the ranks that do arrive arrive together
    # (one arriving later than the timeout after another would be named missing too).
    # It goes through the store: a gloo barrier may still need the exiting rank's messages.

    # 1. Disagreeing plans.
    _align(store, "mismatch", world_size)
    bridge = mpu_bridge.attach(agreement_timeout=GENEROUS_TIMEOUT_S)
    observed["mismatch"] = _outcome(lambda: bridge.expert_groups(4 if rank == FAULTY_RANK else 2))
    observed["mismatch_created"] = bridge.stats()["created"]
    bridge.close()

    # 2. The faulty rank raises in its own setup; the others go on to expert_groups.
    _align(store, "raises", world_size)
    bridge = mpu_bridge.attach(agreement_timeout=AGREEMENT_TIMEOUT_S)
    if rank == FAULTY_RANK:
        observed["raises"] = _outcome(_load_model_before_the_bridge)
        # Stay alive (as a rank stuck in its error handling would) until the others have their answer.
        store.wait(["faults/raises/done"], datetime.timedelta(seconds=WORLD_TIMEOUT_S))
    else:
        observed["raises"] = _outcome(lambda: bridge.expert_groups(2))
        if int(store.add("faults/raises/answered", 1)) == world_size - 1:
            store.set("faults/raises/done", "1")
    bridge.close()

    # 3. The faulty rank's process exits during setup.
    _align(store, "exits", world_size)
    bridge = mpu_bridge.attach(agreement_timeout=AGREEMENT_TIMEOUT_S)
    if rank == FAULTY_RANK:
        os._exit(FAULT_EXIT_CODE)
    observed["exits"] = _outcome(lambda: bridge.expert_groups(2))
    bridge.close()
    return observed






def _reinitialize_torch_distributed(rank: int, world_size: int, generation: int) -> None:
    """``init_process_group`` again, over a fresh prefix of the harness's rendezvous store."""
    import torch.distributed as dist

    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S),
    )
    store = dist.PrefixStore(f"mpu_bridge_test/reinit/{generation}", client)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S)
    )


def _groups_observation(bridge: Any, ps: Any) -> Dict[str, Any]:
    """The bridge's groups, megatron-core's, and all-reduce sums over the bridge's."""
    tp, pp, dp = bridge.tensor_parallel(), bridge.pipeline_parallel(), bridge.data_parallel()
    experts = bridge.expert_groups(2)
    return {
        "tp": tp.ranks,
        "pp": pp.ranks,
        "dp": dp.ranks,
        "ep": experts.expert_parallel.ranks,
        "edp": experts.expert_data_parallel.ranks,
        "megatron_tp": _torch_ranks(ps.get_tensor_model_parallel_group()),
        "megatron_pp": _torch_ranks(ps.get_pipeline_model_parallel_group()),
        "megatron_dp": _torch_ranks(ps.get_data_parallel_group()),
        "tp_is_megatrons": tp.group is ps.get_tensor_model_parallel_group(),
        "pp_is_megatrons": pp.group is ps.get_pipeline_model_parallel_group(),
        "dp_is_megatrons": dp.group is ps.get_data_parallel_group(),
        "sums": {
            "tp": _sum_of_ranks(tp.group),
            "pp": _sum_of_ranks(pp.group),
            "dp": _sum_of_ranks(dp.group),
            "ep": _sum_of_ranks(experts.expert_parallel.group),
            "edp": _sum_of_ranks(experts.expert_data_parallel.group),
        },
    }


def _legacy_observation(legacy: Any) -> Dict[str, Any]:
    return {
        "tensor": legacy.get_tensor_model_parallel_world_size(),
        "pipeline": legacy.get_pipeline_model_parallel_world_size(),
        "model": legacy.get_model_parallel_world_size(),
        "data": legacy.get_data_parallel_world_size(),
        "data_ranks": tuple(legacy.get_data_parallel_group_ranks()),
    }


_QUERIES = ("tensor_parallel", "data_parallel", "sequence_data_parallel", "world")


def _lifecycle_world(rank: int, world_size: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge

    ps = megatron_parallel_state()
    observed: Dict[str, Any] = {}

    initialize_megatron(ps, tp=2)
    first = mpu_bridge.attach(ps, agreement_timeout=GENEROUS_TIMEOUT_S)
    observed["first"] = _groups_observation(first, ps)
    first_legacy = first.as_legacy_mpu()

    # 4. The trainer destroys the default process group underneath the bridge.
    dist.destroy_process_group()
    observed["first_query_after_destroy"] = _outcome(first.data_parallel)
    observed["after_destroy"] = {q: _outcome(getattr(first, q)) for q in _QUERIES}
    observed["after_destroy"]["expert_groups"] = _outcome(lambda: first.expert_groups(2))
    observed["after_destroy"]["legacy"] = _outcome(first_legacy.get_data_parallel_group)

    ps.destroy_model_parallel()
    _reinitialize_torch_distributed(rank, world_size, generation=1)
    initialize_megatron(ps, tp=2)
    observed["old_bridge_after_reinit"] = {q: _outcome(getattr(first, q)) for q in _QUERIES}
    observed["old_bridge_after_reinit"]["expert_groups"] = _outcome(lambda: first.expert_groups(2))
    bridge = mpu_bridge.attach(ps, agreement_timeout=GENEROUS_TIMEOUT_S)
    observed["reattached"] = _groups_observation(bridge, ps)
    legacy = bridge.as_legacy_mpu()
    observed["legacy_before"] = _legacy_observation(legacy)

    # 5. megatron-core's groups go away.
    ps.destroy_model_parallel()
    observed["after_destroy_model_parallel"] = {
        "tensor_parallel": _outcome(bridge.tensor_parallel),
        "expert_groups": _outcome(lambda: bridge.expert_groups(2)),
        "legacy": _outcome(legacy.get_tensor_model_parallel_world_size),
    }

    # 6. ... and come back with other sizes.
    initialize_megatron(ps, tp=1, pp=2)
    observed["rebuilt"] = _groups_observation(bridge, ps)
    observed["legacy_after"] = _legacy_observation(legacy)
    observed["rebuilt_bridge_is_same_object"] = legacy.get_data_parallel_group() is bridge.data_parallel().group
    bridge.close()
    ps.destroy_model_parallel()
    return observed


# ---------------------------------------------------------------------------------------
# A world in which some ranks are expected to exit without reporting
# ---------------------------------------------------------------------------------------


def _run_ranks_with_exits(
    fn: Callable[..., Any], world_size: int, exiting: Tuple[int, ...], timeout: float
) -> Tuple[Dict[int, Any], Dict[int, Optional[int]]]:
    """Like :func:`_multiproc.run_ranks`, but ranks in ``exiting`` may die without reporting.

    Returns the other ranks' results and the exit codes of the ``exiting`` ranks.
    Raises the first rank exception, or :class:`RanksTimeout` past ``timeout``.
    """
    import torch.distributed as dist

    ctx = _multiproc._context()
    results = ctx.Queue()
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size=None,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    processes = [
        ctx.Process(
            target=_multiproc._rank_main,
            args=(fn, rank, world_size, (), int(store.port), "gloo", {}, timeout, results, dict(os.environ)),
            name=f"rank-{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    reporting = set(range(world_size)) - set(exiting)
    reports: Dict[int, Tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        for proc in processes:
            proc.start()
        while not reporting <= set(reports) and time.monotonic() < deadline:
            try:
                status, rank, value = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r in sorted(reporting - set(reports)) if not processes[r].is_alive()]
                if dead:  # a rank that should report died: its report may still be in flight
                    try:
                        status, rank, value = results.get(timeout=1.0)
                    except queue_module.Empty:
                        raise _multiproc.RankFailure(
                            f"rank {dead[0]} exited with code {processes[dead[0]].exitcode} without reporting"
                        ) from None
                else:
                    continue
            reports[rank] = (status, value)
        for rank in exiting:
            processes[rank].join(max(0.1, deadline - time.monotonic()))
        exit_codes = {rank: processes[rank].exitcode for rank in exiting}
    finally:
        _multiproc._stop(processes)
        results.close()
        results.join_thread()
        del store
    failed = sorted(r for r, (status, _) in reports.items() if status == "error")
    if failed:
        _multiproc._raise_failure(failed[0], reports[failed[0]][1], failed[1:])
    if not reporting <= set(reports):
        missing = sorted(reporting - set(reports))
        raise RanksTimeout(f"ranks {missing} of {world_size} did not finish within {timeout:g} s")
    return {rank: value for rank, (_, value) in reports.items()}, exit_codes


# ---------------------------------------------------------------------------------------
# Fixtures: one run per world
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup_faults() -> Dict[str, Any]:
    results, exit_codes = _run_ranks_with_exits(
        _setup_faults_world, WORLD_SIZE, exiting=(FAULTY_RANK,), timeout=WORLD_TIMEOUT_S
    )
    return {"ranks": results, "exit_codes": exit_codes}


@pytest.fixture(scope="module")
def lifecycle() -> List[Dict[str, Any]]:
    return run_ranks(_lifecycle_world, WORLD_SIZE, timeout=WORLD_TIMEOUT_S)


HEALTHY_RANKS = [r for r in range(WORLD_SIZE) if r != FAULTY_RANK]


# ---------------------------------------------------------------------------------------
# Ranks that disagree about the plan
# ---------------------------------------------------------------------------------------


def test_disagreeing_ranks_get_plan_mismatch_error_on_every_rank(setup_faults):
    # Rank 3 exits in a later scenario, so its own report of this one is lost with it; the
    # ranks that report all failed together, which they can only do if rank 3 took part.
    for rank in HEALTHY_RANKS:
        assert setup_faults["ranks"][rank]["mismatch"]["error"] == "PlanMismatchError", rank


def test_the_plan_mismatch_names_which_ranks_planned_what(setup_faults):
    for rank in HEALTHY_RANKS:
        message = setup_faults["ranks"][rank]["mismatch"]["message"]
        assert "ranks [0-2] planned [expert_parallel[" in message, message
        assert "ranks [3] planned [expert_parallel[" in message, message
        assert "ep=2" in message and "ep=4" in message, message


def test_no_group_is_created_when_the_plans_differ(setup_faults):
    for rank in HEALTHY_RANKS:
        assert setup_faults["ranks"][rank]["mismatch_created"] == 0, rank


# ---------------------------------------------------------------------------------------
# A rank that raises, or exits, during setup
# ---------------------------------------------------------------------------------------


def test_the_others_name_a_rank_that_raised_during_setup_and_the_timeout(setup_faults):
    for rank in HEALTHY_RANKS:
        outcome = setup_faults["ranks"][rank]["raises"]
        assert outcome["error"] == "GroupCreationError", (rank, outcome)
        assert "ranks [3] of 4 never arrived" in outcome["message"], outcome["message"]
        assert f"agreement timeout of {AGREEMENT_TIMEOUT_S:g} s" in outcome["message"], outcome["message"]


def test_the_others_name_a_rank_that_exited_during_setup_and_the_timeout(setup_faults):
    for rank in HEALTHY_RANKS:
        outcome = setup_faults["ranks"][rank]["exits"]
        assert outcome["error"] == "GroupCreationError", (rank, outcome)
        assert "ranks [3] of 4 never arrived" in outcome["message"], outcome["message"]
        assert f"agreement timeout of {AGREEMENT_TIMEOUT_S:g} s" in outcome["message"], outcome["message"]


def test_the_exiting_rank_really_died_without_reporting(setup_faults):
    assert setup_faults["exit_codes"] == {FAULTY_RANK: FAULT_EXIT_CODE}
    assert FAULTY_RANK not in setup_faults["ranks"]


def test_a_missing_rank_error_is_a_bridge_error(setup_faults):
    for rank in HEALTHY_RANKS:
        assert setup_faults["ranks"][rank]["raises"]["bridge_error"]
        assert setup_faults["ranks"][rank]["exits"]["bridge_error"]


# ---------------------------------------------------------------------------------------
# destroy_process_group underneath the bridge, and re-attaching
# ---------------------------------------------------------------------------------------

TP2_GROUPS = {  # 4 ranks, megatron-core tp=2 (dp=2), expert_groups(2)
    "tp": [(0, 1), (0, 1), (2, 3), (2, 3)],
    "pp": [(0,), (1,), (2,), (3,)],
    "dp": [(0, 2), (1, 3), (0, 2), (1, 3)],
    "ep": [(0, 2), (1, 3), (0, 2), (1, 3)],
    "edp": [(0,), (1,), (2,), (3,)],
}
TP1_PP2_GROUPS = {  # 4 ranks, megatron-core tp=1 pp=2 (dp=2), expert_groups(2)
    "tp": [(0,), (1,), (2,), (3,)],
    "pp": [(0, 2), (1, 3), (0, 2), (1, 3)],
    "dp": [(0, 1), (0, 1), (2, 3), (2, 3)],
    "ep": [(0, 1), (0, 1), (2, 3), (2, 3)],
    "edp": [(0,), (1,), (2,), (3,)],
}


def _assert_groups(observations: List[Dict[str, Any]], expected: Mapping[str, List[Tuple[int, ...]]]) -> None:
    for rank, observed in enumerate(observations):
        for kind, per_rank in expected.items():
            assert tuple(sorted(observed[kind])) == per_rank[rank], (rank, kind, observed[kind])
            assert observed["sums"][kind] == sum(per_rank[rank]), (rank, kind, observed["sums"])


@needs_megatron
def test_the_groups_are_right_before_any_fault(lifecycle):
    _assert_groups([r["first"] for r in lifecycle], TP2_GROUPS)


@needs_megatron
def test_the_first_query_after_destroy_process_group_says_so(lifecycle):
    for rank, observed in enumerate(lifecycle):
        outcome = observed["first_query_after_destroy"]
        assert outcome["error"] == "BridgeError", (rank, outcome)
        assert "destroy_process_group" in outcome["message"], outcome["message"]
        assert "attach again" in outcome["message"], outcome["message"]


@needs_megatron
@pytest.mark.parametrize("query", [*_QUERIES, "expert_groups", "legacy"])
def test_no_query_returns_a_group_after_destroy_process_group(lifecycle, query):
    for rank, observed in enumerate(lifecycle):
        outcome = observed["after_destroy"][query]
        assert outcome["error"] == "BridgeError", (rank, outcome)
        assert "attach again" in outcome["message"], outcome["message"]


@needs_megatron
@pytest.mark.parametrize("query", [*_QUERIES, "expert_groups"])
def test_the_old_bridge_stays_closed_after_reinitialisation(lifecycle, query):
    for rank, observed in enumerate(lifecycle):
        assert observed["old_bridge_after_reinit"][query]["error"] == "BridgeError", rank


@needs_megatron
def test_a_bridge_attached_after_reinitialisation_has_the_right_groups(lifecycle):
    _assert_groups([r["reattached"] for r in lifecycle], TP2_GROUPS)
    for observed in lifecycle:
        group = observed["reattached"]
        assert group["tp"] == group["megatron_tp"] and group["dp"] == group["megatron_dp"]
        assert group["tp_is_megatrons"] and group["dp_is_megatrons"]


# ---------------------------------------------------------------------------------------
# destroy_model_parallel, and megatron-core again with other sizes
# ---------------------------------------------------------------------------------------


@needs_megatron
@pytest.mark.parametrize("query", ["tensor_parallel", "expert_groups", "legacy"])
def test_queries_after_destroy_model_parallel_raise_mpu_error(lifecycle, query):
    for rank, observed in enumerate(lifecycle):
        outcome = observed["after_destroy_model_parallel"][query]
        assert outcome["error"] == "MpuError", (rank, outcome)
        assert "destroy_model_parallel" in outcome["message"], outcome["message"]


@needs_megatron
def test_the_bridge_rebuilds_for_megatron_core_with_other_sizes(lifecycle):
    _assert_groups([r["rebuilt"] for r in lifecycle], TP1_PP2_GROUPS)


@needs_megatron
def test_the_rebuilt_bridge_serves_megatron_cores_new_groups(lifecycle):
    for rank, observed in enumerate(lifecycle):
        rebuilt = observed["rebuilt"]
        assert rebuilt["tp"] == rebuilt["megatron_tp"], rank
        assert rebuilt["pp"] == rebuilt["megatron_pp"], rank
        assert rebuilt["dp"] == rebuilt["megatron_dp"], rank
        assert rebuilt["tp_is_megatrons"] and rebuilt["pp_is_megatrons"] and rebuilt["dp_is_megatrons"], rank


@needs_megatron
def test_the_legacy_mpu_follows_the_rebuild(lifecycle):
    for rank, observed in enumerate(lifecycle):
        assert observed["legacy_before"] == {
            "tensor": 2,
            "pipeline": 1,
            "model": 2,
            "data": 2,
            "data_ranks": TP2_GROUPS["dp"][rank],
        }, rank
        assert observed["legacy_after"] == {
            "tensor": 1,
            "pipeline": 2,
            "model": 2,
            "data": 2,
            "data_ranks": TP1_PP2_GROUPS["dp"][rank],
        }, rank
        assert observed["rebuilt_bridge_is_same_object"], rank
