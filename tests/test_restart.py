"""Restarts and teardown without leaks (issue 17): what an in-process restart does to the bridge.

In-process restart (NVIDIA resiliency-ext's ``inprocess`` wrapper, TorchFT) destroys and
re-creates the process groups, sometimes with a smaller world. Each rank here runs
``CYCLES`` cycles of

    init world (a fresh store) -> megatron-core init -> attach -> derived groups, the
    ProcessGroupCollection and a DeviceMesh -> bridge.close() -> destroy_model_parallel
    -> destroy the world

counting PyTorch's live groups (``pg_map``) at each step, then "loses" two of its 8
ranks and restarts the other 6 in a fresh world of 6. Specified here:

* the bridge's own contribution to ``pg_map`` is 0 after ``close()`` in every cycle,
  and it never destroys megatron-core's groups (megatron-core's own leftovers after
  ``destroy_model_parallel`` are measured beside it, not asserted: they are its own);
* after the restart, a new bridge over the new MPU gives megatron-core's groups of
  the new world and they work on the wire;
* the bridge from the lost world raises a clear ``BridgeError`` on use, and using or
  closing it changes nothing in the new world (no group destroyed or created).

The order a resilience wrapper must follow is in README's *Reliability* section.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from _megatron import initialize_megatron, megatron_parallel_state
from _multiproc import run_ranks
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)

WORLD, SMALLER, CYCLES = 8, 6, 5
SIZES = dict(tp=2, pp=2, ep=2, etp=1)


def _pg_count() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _init_world(store_dir: str, name: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_dir}/{name}", rank=rank, world_size=world_size)


def _one_cycle(ps: Any, keep_open: bool) -> Dict[str, Any]:
    """megatron init -> attach -> every export -> close -> megatron destroy; pg_map counts."""
    import mpu_bridge
    from mpu_bridge import _torch

    counts = {"world": _pg_count()}
    initialize_megatron(ps, **SIZES)
    counts["megatron"] = _pg_count()
    bridge = mpu_bridge.attach(ps, gpus_per_node=2, agreement_timeout=60)  # cross-node a2a: new groups
    bridge.zero_param_groups(2)
    bridge.all_to_all_groups()
    bridge.expert_groups(4, expert_tensor_parallel=False)  # ep 4 x etp 1 x pp 2: new groups
    bridge.process_group_collection()
    bridge.device_mesh()
    bridge.as_legacy_mpu().get_data_parallel_group()
    counts["bridge"] = _pg_count()
    created = bridge.stats()["created"]
    tp_group = ps.get_tensor_model_parallel_group()
    if not keep_open:
        bridge.close()
    counts["closed"] = _pg_count()
    megatron_alive = _torch.is_live(tp_group)
    ps.destroy_model_parallel()
    counts["destroyed"] = _pg_count()
    return {"counts": counts, "created": created, "megatron_alive": megatron_alive,
            "bridge": bridge}


def _restarts(rank: int, world_size: int, store_dir: str) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist

    ps = megatron_parallel_state()
    cycles: List[Dict[str, Any]] = []
    old = None
    for cycle in range(CYCLES):
        _init_world(store_dir, f"world-{cycle}", rank, world_size)
        last = cycle == CYCLES - 1
        got = _one_cycle(ps, keep_open=last)  # the last cycle's bridge is left open: the "old" one
        old = got.pop("bridge")
        dist.destroy_process_group()
        got["counts"]["after_world"] = _pg_count()
        cycles.append(got)
    out: Dict[str, Any] = {"cycles": cycles}
    if rank >= SMALLER:
        return out  # lost in the failure

    _init_world(store_dir, "smaller", rank, SMALLER)
    initialize_megatron(ps, tp=2)
    import mpu_bridge

    new = mpu_bridge.attach(ps, agreement_timeout=60)
    dp = new.data_parallel()
    out["new_dp"] = list(dp.ranks)
    out["megatron_dp"] = sorted(dist.get_process_group_ranks(ps.get_data_parallel_group()))
    before = _pg_count()
    try:
        old.ranks("tp")
        out["old_error"] = None
    except mpu_bridge.BridgeError as exc:
        out["old_error"] = f"{type(exc).__name__}: {exc}"
    old.close()
    out["pg_change_from_old"] = _pg_count() - before
    value = torch.tensor([rank])
    dist.all_reduce(value, group=dp.group)  # the new world still works after the old bridge's calls
    out["dp_sum"] = int(value)
    new.close()
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> List[Dict[str, Any]]:
    store_dir = str(tmp_path_factory.mktemp("stores"))
    return run_ranks(_restarts, WORLD, store_dir, timeout=300, backend=None)


def test_the_bridge_leaves_no_group_behind_in_any_cycle(world):
    for rank, obs in enumerate(world):
        for cycle, got in enumerate(obs["cycles"][:-1]):
            counts = got["counts"]
            assert got["created"] > 0, (rank, cycle)  # the cycle made groups of its own
            assert counts["bridge"] - counts["megatron"] == got["created"], (rank, cycle)
            assert counts["closed"] == counts["megatron"], (rank, cycle, counts)  # 0 growth from the bridge
            assert got["megatron_alive"], (rank, cycle)  # close() never destroys the MPU's groups


def test_every_cycle_starts_from_an_empty_world(world):
    for rank, obs in enumerate(world):
        starts = [got["counts"]["world"] for got in obs["cycles"]]
        assert starts == [starts[0]] * CYCLES, rank
        assert [got["counts"]["after_world"] for got in obs["cycles"]] == [0] * CYCLES, rank


def test_a_new_bridge_after_a_restart_with_a_smaller_world_is_megatrons(world):
    for rank, obs in enumerate(world[:SMALLER]):
        assert obs["new_dp"] == obs["megatron_dp"], rank
        assert obs["dp_sum"] == sum(obs["new_dp"]), rank


def test_the_bridge_of_the_lost_world_refuses_and_touches_nothing(world):
    for rank, obs in enumerate(world[:SMALLER]):
        assert obs["old_error"] is not None and "destroyed" in obs["old_error"], (rank, obs["old_error"])
        assert "attach again" in obs["old_error"], rank
        assert obs["pg_change_from_old"] == 0, rank
