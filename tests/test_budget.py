"""The planner's communicator budget (mpu_bridge.budget) against a counted megatron-core init.

megatron-core's ``initialize_model_parallel`` runs on the fake backend in a fresh
subprocess (its module state never reaches this pytest process), with
``torch.distributed.new_group`` wrapped to count every call and the groups each rank
is a member of; the counts must equal budget.py's arithmetic, per rank and in total.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

import pytest

from _multiproc import run_ranks
from mpu_bridge.budget import (
    DEFAULT_COMM_MB,
    bridge_rank_sets,
    budget,
    megatron_rank_groups,
    megatron_world_calls,
)
from mpu_bridge.errors import LayoutError
from mpu_bridge.layout import plan
from mpu_bridge.pg_collection import FIELDS

# (world, sizes, megatron options): dense + pp, cp with etp != tp and two dist-opt
# instances, a pp-first order with ep and hierarchical cp.
LAYOUTS: Tuple[Tuple[int, Dict[str, Any], Dict[str, Any]], ...] = (
    (16, dict(tp=2, pp=2), {}),
    (16, dict(tp=2, cp=2, ep=4, etp=1), dict(dist_opt_instances=2)),
    (24, dict(tp=2, pp=3, cp=2, ep=2), dict(hierarchical_cp=(2, 1), all_gather=True)),
    (8, dict(pp=4, order="pp-tp-cp-ep-dp"), {}),
)

_GLOO = "gloo"


def _count_megatron(rank: int, world_size: int, layouts: Any) -> List[Dict[str, Any]]:
    """In a fresh process: for every layout, rank and gloo setting, the counted init."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    real_new_group = dist.new_group
    results: List[Dict[str, Any]] = []
    for world, sizes, opts in layouts:
        for gloo in (True, False):
            for r in range(world):
                tally: Dict[str, int] = {"calls": 0, "gloo_calls": 0, "nccl": 0, "gloo_held": 0}

                def counted(*args: Any, tally: Dict[str, int] = tally, r: int = r, **kwargs: Any) -> Any:
                    ranks = kwargs.get("ranks", args[0] if args else None)
                    is_gloo = kwargs.get("backend") == _GLOO
                    tally["gloo_calls" if is_gloo else "calls"] += 1
                    if is_gloo:  # the fake world has no gloo: count the twin, create it on fake
                        kwargs["backend"] = None
                    group = real_new_group(*args, **kwargs)
                    if ranks is not None and r in ranks:
                        tally["gloo_held" if is_gloo else "nccl"] += 1
                    return group

                dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=world)
                dist.new_group = counted
                try:
                    parallel_state.initialize_model_parallel(
                        tensor_model_parallel_size=sizes.get("tp", 1),
                        pipeline_model_parallel_size=sizes.get("pp", 1),
                        context_parallel_size=sizes.get("cp", 1),
                        expert_model_parallel_size=sizes.get("ep", 1),
                        expert_tensor_parallel_size=sizes.get("etp"),
                        order=sizes.get("order", "tp-cp-ep-dp-pp"),
                        create_gloo_process_groups=gloo,
                        num_distributed_optimizer_instances=opts.get("dist_opt_instances", 1),
                        hierarchical_context_parallel_sizes=list(opts["hierarchical_cp"])
                        if opts.get("hierarchical_cp")
                        else None,
                        create_all_gather_group=opts.get("all_gather", False),
                    )
                finally:
                    dist.new_group = real_new_group
                    parallel_state.destroy_model_parallel()
                    dist.destroy_process_group()
                results.append(dict(world=world, rank=r, gloo=gloo, **tally))
    return results


@pytest.fixture(scope="module")
def counted() -> List[Dict[str, Any]]:
    pytest.importorskip("megatron.core")
    return run_ranks(_count_megatron, 1, LAYOUTS, backend=None, timeout=300)[0]


def _sizes(sizes: Dict[str, Any], world: int) -> Any:
    return plan(world, **sizes)


@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_megatron_counts_match_a_counted_init(counted: List[Dict[str, Any]], index: int) -> None:
    world, sizes, opts = LAYOUTS[index]
    layout = _sizes(sizes, world)
    rows = [row for row in counted[sum(2 * w for w, _, _ in LAYOUTS[:index]) :][: 2 * world]]
    assert len(rows) == 2 * world
    for row in rows:
        assert row["world"] == world
        groups = megatron_rank_groups(layout, row["rank"], gloo=row["gloo"], **opts)
        assert row["nccl"] == sum(a for a, _ in groups.values()), (sizes, row)
        assert row["gloo_held"] == sum(b for _, b in groups.values()), (sizes, row)
        calls = megatron_world_calls(layout, gloo=row["gloo"], **opts)
        assert row["calls"] == sum(a for a, _ in calls.values()), (sizes, row)
        assert row["gloo_calls"] == sum(b for _, b in calls.values()), (sizes, row)
        m = budget(layout, row["rank"], **opts)["per_rank"]["megatron"]
        assert m["nccl"] == row["nccl"]
        if row["gloo"]:
            assert m["gloo"] == row["gloo_held"]
    on = sum(row["calls"] + row["gloo_calls"] for row in rows if row["gloo"])
    off = sum(row["calls"] + row["gloo_calls"] for row in rows if not row["gloo"])
    report = budget(layout, **opts)["world"]["megatron_new_group"]
    assert (report["gloo_on"], report["gloo_off"]) == (on, off)
    most = max(row["nccl"] for row in rows)
    assert budget(layout, **opts)["max_per_rank"]["megatron_nccl"] == most


def _distinct_sets(layout: Any, rank: int) -> int:
    """The distinct rank sets of every field, listed (small worlds only)."""
    sets = set()
    for kind in ("tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-dp-cp", "mp", "ep", "etp", "edp", "etp-ep", "etp-ep-pp"):
        sets.add(tuple(layout.group_of(kind, rank)))
    pp = layout.group_of("pp", rank)
    if rank in (pp[0], pp[-1]):
        sets.add(tuple(sorted({pp[0], pp[-1]})))
    if rank == pp[0]:
        sets.add((rank,))
    sets.discard(tuple(range(layout.world_size)))  # the default group holds the world
    return len(sets)


@pytest.mark.parametrize("world, sizes, opts", LAYOUTS)
def test_bridge_rank_sets_match_listed_sets(world: int, sizes: Dict[str, Any], opts: Dict[str, Any]) -> None:
    layout = plan(world, **sizes)
    per_rank = [_distinct_sets(layout, r) for r in range(world)]
    assert [len(bridge_rank_sets(layout, r)) for r in range(world)] == per_rank
    b = budget(layout)
    assert b["world"]["bridge_new_group"] == sum(per_rank)
    assert b["max_per_rank"]["bridge"] == max(per_rank)
    assert set(b["per_rank"]["bridge"]["fields"]) == set(FIELDS)
    assert b["memory_mib"]["bridge"] == per_rank[0] * DEFAULT_COMM_MB


def test_budget_example_numbers() -> None:
    b = budget(plan(16, tp=2, pp=2), comm_mb=600)
    assert b["per_rank"]["megatron"]["nccl"] == 17
    assert b["per_rank"]["megatron"]["gloo"] == 3
    assert b["per_rank"]["bridge"]["rank_sets"] == 6
    assert b["world"]["megatron_new_group"] == {"gloo_on": 2000, "gloo_off": 1808}
    assert b["world"]["bridge_new_group"] == 96
    assert b["memory_mib"]["megatron"] == 17 * 600
    assert b["memory_mib"]["bridge"] == 6 * 600


def test_budget_is_bounded_at_huge_worlds() -> None:
    b = budget(plan(2**40, tp=8, pp=8, ep=8))
    assert b["per_rank"]["megatron"]["nccl"] == 17
    assert b["world"]["megatron_new_group"]["gloo_off"] > 2**40


@pytest.mark.parametrize(
    "kwargs", [dict(comm_mb=-1), dict(comm_mb=True), dict(dist_opt_instances=3), dict(hierarchical_cp=(4,))]
)
def test_budget_rejects_bad_options(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(LayoutError):
        budget(plan(8, tp=2, cp=2), **kwargs)


def test_budget_stays_torch_free() -> None:
    import subprocess

    code = "import sys, mpu_bridge.budget, mpu_bridge.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
