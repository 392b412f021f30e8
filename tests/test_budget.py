"""The planner's communicator budget (mpu_bridge.budget) against a counted megatron-core init.

megatron-core's ``initialize_model_parallel`` (and, from 0.18, ``create_all_gather_groups``)
runs on the fake backend in a fresh subprocess (its module state never reaches this pytest
process), with ``torch.distributed.new_group`` wrapped to count every call and the groups
each rank is a member of; the counts must equal budget.py's arithmetic for the installed
release's line, per rank and in total. The GTP layouts need megatron-core 0.19's
``gtp_remat_size`` (checked by feature, not version string) and are skipped before it.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest

from _multiproc import run_ranks
from mpu_bridge.budget import (
    COLLECTION_FIELDS,
    DEFAULT_COMM_MB,
    MEGATRON_KINDS,
    MEGATRON_LINES,
    bridge_fields,
    bridge_rank_sets,
    bridge_twins,
    budget,
    megatron_line,
    megatron_rank_groups,
    megatron_world_calls,
)
from mpu_bridge.errors import LayoutError
from mpu_bridge.layout import plan

# (world, sizes, megatron options): dense + pp, cp with etp != tp and two dist-opt
# instances, a pp-first order with ep and hierarchical cp and all-gather twins, and the
# GTP layouts of megatron-core 0.19: dense GTP, expert GTP with pp and ep, both with cp
# and an explicit gtp_remat token, and all-gather twins with ep but without GTP.
LAYOUTS: Tuple[Tuple[int, Dict[str, Any], Dict[str, Any]], ...] = (
    (16, dict(tp=2, pp=2), {}),
    (16, dict(tp=2, cp=2, ep=4, etp=1), dict(dist_opt_instances=2)),
    (24, dict(tp=2, pp=3, cp=2, ep=2), dict(hierarchical_cp=(2, 1), all_gather=True)),
    (8, dict(pp=4, order="pp-tp-cp-ep-dp"), {}),
    (8, dict(tp=2, gtp_remat=2), {}),
    (16, dict(tp=2, pp=2, ep=2, expert_gtp_remat=2), {}),
    (16, dict(tp=2, cp=2, gtp_remat=2, ep=2, expert_gtp_remat=2, order="tp-gtp_remat-cp-ep-dp-pp"), {}),
    (16, dict(pp=2, ep=4, expert_gtp_remat=2), {}),
    (8, dict(ep=2), dict(all_gather=True)),
)

#: Layouts whose all-gather groups megatron-core 0.19.2's create_all_gather_groups() cannot build.
AG_WITH_GTP: Tuple[Tuple[int, Dict[str, Any]], ...] = (
    (8, dict(tp=2, gtp_remat=2)),
    (16, dict(tp=2, ep=2, expert_gtp_remat=2)),
)

_GLOO = "gloo"
_GTP_SIZES = ("gtp_remat", "expert_gtp_remat")


def _init_kwargs(sizes: Dict[str, Any], opts: Dict[str, Any], gloo: bool, ag_in_init: bool) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = dict(
        tensor_model_parallel_size=sizes.get("tp", 1),
        pipeline_model_parallel_size=sizes.get("pp", 1),
        context_parallel_size=sizes.get("cp", 1),
        expert_model_parallel_size=sizes.get("ep", 1),
        expert_tensor_parallel_size=sizes.get("etp"),
        order=sizes.get("order", "tp-cp-ep-dp-pp"),
        create_gloo_process_groups=gloo,
        num_distributed_optimizer_instances=opts.get("dist_opt_instances", 1),
        hierarchical_context_parallel_sizes=list(opts["hierarchical_cp"]) if opts.get("hierarchical_cp") else None,
    )
    if ag_in_init:  # megatron-core <= 0.17
        kwargs["create_all_gather_group"] = opts.get("all_gather", False)
    if any(sizes.get(k, 1) > 1 for k in _GTP_SIZES):
        kwargs.update(gtp_remat_size=sizes.get("gtp_remat", 1), expert_gtp_remat_size=sizes.get("expert_gtp_remat", 1))
    return kwargs


def _features() -> Dict[str, Any]:
    """What the installed megatron-core offers, by feature: GTP, and where all-gather groups come from."""
    import dataclasses
    import inspect
    from importlib import metadata

    from megatron.core import parallel_state

    params = inspect.signature(parallel_state.initialize_model_parallel).parameters
    try:
        from megatron.core.process_groups_config import ProcessGroupCollection

        fields: Optional[List[str]] = [f.name for f in dataclasses.fields(ProcessGroupCollection)]
    except ImportError:  # before megatron-core 0.15
        fields = None
    return {
        "version": metadata.version("megatron-core"),
        "gtp": "gtp_remat_size" in params,
        "ag_in_init": "create_all_gather_group" in params,
        "fields": fields,
    }


def _count_one(world: int, r: int, sizes: Dict[str, Any], opts: Dict[str, Any], gloo: bool, ag_in_init: bool) -> Any:
    """One counted init of rank ``r`` on the fake backend: new_group calls, groups held."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    real_new_group = dist.new_group
    tally: Dict[str, int] = {"calls": 0, "gloo_calls": 0, "nccl": 0, "gloo_held": 0}

    def counted(*args: Any, **kwargs: Any) -> Any:
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
        parallel_state.initialize_model_parallel(**_init_kwargs(sizes, opts, gloo, ag_in_init))
        if opts.get("all_gather") and not ag_in_init:  # megatron-core >= 0.18
            parallel_state.create_all_gather_groups(for_expert_parallelism=True)
    finally:
        dist.new_group = real_new_group
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return dict(world=world, rank=r, gloo=gloo, **tally)


def _count_megatron(rank: int, world_size: int, layouts: Any) -> Dict[str, Any]:
    """In a fresh process: the features, and for every layout the installed release can build
    (None where it lacks GTP), every rank's counted init with gloo on and off."""
    features = _features()
    counts: List[Optional[List[Dict[str, Any]]]] = []
    for world, sizes, opts in layouts:
        if any(sizes.get(k, 1) > 1 for k in _GTP_SIZES) and not features["gtp"]:
            counts.append(None)
            continue
        counts.append([
            _count_one(world, r, sizes, opts, gloo, features["ag_in_init"])
            for gloo in (True, False) for r in range(world)
        ])
    return {"features": features, "counts": counts}


def _all_gather_errors(rank: int, world_size: int, cases: Any) -> List[Optional[str]]:
    """In a fresh process: what megatron-core's create_all_gather_groups() raises for GTP layouts."""
    errors: List[Optional[str]] = []
    for world, sizes in cases:
        try:
            _count_one(world, 0, sizes, dict(all_gather=True), False, False)
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - the error is the measurement
            errors.append(f"{type(error).__name__}: {error}")
    return errors


@pytest.fixture(scope="module")
def counted() -> Dict[str, Any]:
    pytest.importorskip("megatron.core")
    return run_ranks(_count_megatron, 1, LAYOUTS, backend=None, timeout=300)[0]


@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_megatron_counts_match_a_counted_init(counted: Dict[str, Any], index: int) -> None:
    world, sizes, opts = LAYOUTS[index]
    rows = counted["counts"][index]
    if rows is None:
        pytest.skip(f"megatron-core {counted['features']['version']} has no gtp_remat_size")
    version = counted["features"]["version"]
    layout = plan(world, **sizes)
    assert len(rows) == 2 * world
    for row in rows:
        groups = megatron_rank_groups(layout, row["rank"], megatron=version, gloo=row["gloo"], **opts)
        assert row["nccl"] == sum(a for a, _ in groups.values()), (sizes, row)
        assert row["gloo_held"] == sum(b for _, b in groups.values()), (sizes, row)
        calls = megatron_world_calls(layout, megatron=version, gloo=row["gloo"], **opts)
        assert row["calls"] == sum(a for a, _ in calls.values()), (sizes, row)
        assert row["gloo_calls"] == sum(b for _, b in calls.values()), (sizes, row)
        m = budget(layout, row["rank"], megatron=version, **opts)["per_rank"]["megatron"]
        assert m["nccl"] == row["nccl"]
        if row["gloo"]:
            assert m["gloo"] == row["gloo_held"]
    on = sum(row["calls"] + row["gloo_calls"] for row in rows if row["gloo"])
    off = sum(row["calls"] + row["gloo_calls"] for row in rows if not row["gloo"])
    report = budget(layout, megatron=version, **opts)
    assert (report["world"]["megatron_new_group"]["gloo_on"], report["world"]["megatron_new_group"]["gloo_off"]) == (
        on,
        off,
    )
    assert report["max_per_rank"]["megatron_nccl"] == max(row["nccl"] for row in rows)


def test_the_default_line_is_the_installed_release(counted: Dict[str, Any]) -> None:
    version = counted["features"]["version"]
    line = megatron_line(version)
    assert megatron_line() == line
    assert budget(plan(8))["megatron"] == {"line": line, "source": f"installed megatron-core {version}"}


def test_collection_fields_are_the_installed_collection_fields(counted: Dict[str, Any]) -> None:
    names = counted["features"]["fields"]
    if names is None:
        pytest.skip("this megatron-core has no ProcessGroupCollection")
    line = megatron_line(counted["features"]["version"])
    assert list(COLLECTION_FIELDS[line]) == names
    assert list(budget(plan(8, tp=2))["per_rank"]["bridge"]["fields"]) == names


def test_all_gather_with_gtp_fails_in_megatron_core_and_the_budget_says_so(counted: Dict[str, Any]) -> None:
    features = counted["features"]
    if not features["gtp"] or features["ag_in_init"]:
        pytest.skip(f"megatron-core {features['version']} has no GTP or no create_all_gather_groups()")
    errors = run_ranks(_all_gather_errors, 1, AG_WITH_GTP, backend=None, timeout=120)[0]
    for (world, sizes), error in zip(AG_WITH_GTP, errors):
        assert error is not None and "out of range" in error, (sizes, error)
        notes = budget(plan(world, **sizes), megatron="0.19", all_gather=True)["notes"]
        assert any("create_all_gather_groups() raises" in note for note in notes), notes


# -- the bridge: distinct rank sets, listed -------------------------------------------------


def _distinct_sets(layout: Any, rank: int, line: str) -> int:
    """The distinct rank sets of every field, listed (small worlds only)."""
    kinds = ["tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-dp-cp", "mp", "ep", "etp", "edp", "etp-ep", "etp-ep-pp"]
    if line == "0.19":
        kinds += ["gtp", "gtp-dp-cp", "egtp", "egtp-edp", "etp-ep-egtp-pp"]
    sets = {tuple(layout.group_of(kind, rank)) for kind in kinds}
    pp = layout.group_of("pp", rank)
    if rank in (pp[0], pp[-1]):
        sets.add(tuple(sorted({pp[0], pp[-1]})))
    if rank == pp[0]:
        sets.add((rank,))
    sets.discard(tuple(range(layout.world_size)))  # the default group holds the world
    return len(sets)


@pytest.mark.parametrize("line", MEGATRON_LINES)
@pytest.mark.parametrize("world, sizes, opts", LAYOUTS)
def test_bridge_rank_sets_match_listed_sets(world: int, sizes: Dict[str, Any], opts: Dict[str, Any], line: str) -> None:
    layout = plan(world, **sizes)
    if line != "0.19" and any(sizes.get(k, 1) > 1 for k in _GTP_SIZES):
        with pytest.raises(LayoutError, match="needs megatron-core 0.19"):
            budget(layout, megatron=line)
        return
    per_rank = [_distinct_sets(layout, r, line) for r in range(world)]
    assert [len(bridge_rank_sets(layout, r, megatron=line)) for r in range(world)] == per_rank
    twins = len(bridge_twins(layout, 0, megatron=line)) if opts.get("all_gather") else 0
    b = budget(layout, megatron=line, **opts)
    assert b["world"]["bridge_new_group"] == sum(per_rank) + twins * world
    assert b["max_per_rank"]["bridge"] == max(per_rank) + twins
    assert list(b["per_rank"]["bridge"]["fields"]) == list(COLLECTION_FIELDS[line])
    assert b["per_rank"]["bridge"]["twins"] == twins
    assert b["memory_mib"]["bridge"] == (per_rank[0] + twins) * DEFAULT_COMM_MB


@pytest.mark.parametrize("line", MEGATRON_LINES)
@pytest.mark.parametrize("world, sizes, opts", LAYOUTS)
def test_bridge_split_group_partitions_match_listed_partitions(
    world: int, sizes: Dict[str, Any], opts: Dict[str, Any], line: str
) -> None:
    """One split_group per field that brings a rank set not held yet (covering fields first,
    then embd and pos_embd), plus one per all-gather twin."""
    layout = plan(world, **sizes)
    if line != "0.19" and any(sizes.get(k, 1) > 1 for k in _GTP_SIZES):
        return
    parts: Dict[str, set] = {}
    for r in range(world):
        for field, view in bridge_fields(layout, r, megatron=line).items():
            if view is not None and view.size < world and not field.endswith("_ag"):
                parts.setdefault(field, set()).add(tuple(view))
    order = [f for f in parts if f not in ("embd", "pos_embd")] + [f for f in ("embd", "pos_embd") if f in parts]
    held: set = set()
    calls = 0
    for field in order:
        calls += bool(parts[field] - held)
        held |= parts[field]
    twins = len(bridge_twins(layout, 0, megatron=line)) if opts.get("all_gather") else 0
    b = budget(layout, megatron=line, **opts)
    assert b["world"]["bridge_partitions"] == calls + twins
    assert b["world"]["bridge_split_group"] == world * (calls + twins)


# -- written-out numbers -------------------------------------------------------------------


def test_budget_example_numbers() -> None:
    b = budget(plan(16, tp=2, pp=2), comm_mb=600, megatron="0.16")
    assert b["per_rank"]["megatron"]["nccl"] == 17
    assert b["per_rank"]["megatron"]["gloo"] == 3
    assert b["per_rank"]["bridge"]["rank_sets"] == 6
    assert b["world"]["megatron_new_group"] == {"gloo_on": 2000, "gloo_off": 1808}
    assert b["world"]["bridge_new_group"] == 96
    assert b["memory_mib"]["megatron"] == 17 * 600
    assert b["memory_mib"]["bridge"] == 6 * 600
    assert b["megatron"] == {"line": "0.16", "source": "megatron='0.16'"} and b["notes"] == []


def test_megatron_0_19_adds_three_groups_per_rank_without_gtp() -> None:
    layout = plan(16, tp=2, pp=2)
    old = megatron_rank_groups(layout, 0, megatron="0.18")
    new = megatron_rank_groups(layout, 0, megatron="0.19")
    assert {k: v for k, v in new.items() if k not in old} == {
        "gtp": (1, 0), "gtp-dp": (0, 0), "gtp-dp-cp": (0, 0), "egtp": (1, 0), "etp-ep-egtp-pp": (1, 0),
        "egtp-edp": (0, 0),
    }
    b = budget(layout, megatron="0.19")
    assert b["per_rank"]["megatron"]["nccl"] == 17 + 3
    assert b["per_rank"]["megatron"]["size_one"] == budget(layout, megatron="0.16")["per_rank"]["megatron"][
        "size_one"
    ] + 2  # gtp and egtp: singletons
    assert b["per_rank"]["bridge"]["rank_sets"] == 6  # the singleton is held already (cp, pos_embd)


def test_gtp_budget_rows_on_8_ranks() -> None:
    """tp 2, gtp_remat 2 on 8 ranks (dense order tp-gtp_remat-cp-ep-dp-pp, dp 2), rank 0."""
    layout = plan(8, tp=2, gtp_remat=2)
    assert megatron_world_calls(layout, megatron="0.19") == {
        "gtp": (4, 0), "dp-cp": (4, 0), "intra-dp-cp": (0, 0), "dp": (4, 0), "gtp-dp": (2, 0),
        "gtp-dp-cp": (2, 0), "cp": (8, 0), "hcp": (0, 0), "mp": (2, 0), "tp": (4, 0), "pp": (8, 0),
        "embd": (8, 0), "pos-embd": (8, 0), "tp-dp-cp": (1, 0), "tp-dp": (1, 0), "tp-cp": (4, 0),
        "egtp": (8, 0), "ep": (8, 0), "etp": (4, 0), "etp-ep": (4, 0), "etp-ep-pp": (4, 0),
        "etp-ep-egtp-pp": (4, 0), "edp": (2, 0), "intra-edp": (0, 0), "inter-edp": (0, 0),
        "egtp-edp": (0, 0), "intra-dist-opt": (1, 0), "dp-cp-ag": (0, 0), "edp-ag": (0, 0),
    }  # no gloo twins: megatron-core turns them off under GTP; 95 groups in all
    fields = bridge_fields(layout, 0, megatron="0.19")
    listed = {f: (None if v is None else list(v)) for f, v in fields.items()}
    assert listed == {
        "tp": [0, 1], "pp": [0], "mp": [0, 1, 2, 3], "embd": [0], "pos_embd": [0], "cp": [0], "tp_cp": [0, 1],
        "hcp": None, "ep": [0], "expt_tp": [0, 1], "tp_ep": [0, 1], "tp_ep_pp": [0, 1],
        "tp_ep_pp_with_egtp_remat": [0, 1], "tp_dp_cp": list(range(8)), "dp": [0, 4], "dp_cp": [0, 4],
        "dp_cp_gtp_remat": [0, 2, 4, 6], "dp_cp_ag": None, "gtp_remat": [0, 2], "expt_gtp_remat": [0],
        "expt_dp": [0, 2, 4, 6], "expt_dp_gtp_remat": [0, 2, 4, 6], "expt_dp_ag": None, "intra_dp_cp": [0, 4],
        "intra_expt_dp": [0, 2, 4, 6], "inter_dist_opt": None, "intra_dist_opt": None,
    }
    b = budget(layout, megatron="0.19")
    assert b["per_rank"]["megatron"]["nccl"] == 22 and b["per_rank"]["megatron"]["gloo"] == 0
    assert b["per_rank"]["bridge"]["rank_sets"] == 6  # [0,1] [0] [0..3] [0,4] [0,2,4,6] [0,2]
    assert b["world"]["megatron_new_group"] == {"gloo_on": 8 * 95, "gloo_off": 8 * 95}


def test_expert_gtp_keeps_dense_gloo_and_drops_expert_gloo() -> None:
    layout = plan(16, tp=2, pp=2, ep=2, expert_gtp_remat=2)  # edp 1: expert grid tp-cp-ep-gtp_remat-dp-pp
    mine = megatron_rank_groups(layout, 0, megatron="0.19")
    assert (mine["dp-cp"], mine["dp"], mine["edp"], mine["egtp-edp"]) == ((1, 1), (1, 1), (1, 0), (1, 0))
    assert layout.group_of("egtp", 0) == [0, 4] and layout.group_of("etp-ep-egtp-pp", 0) == list(range(16))


def test_all_gather_twins_are_extra_communicators_and_said_so() -> None:
    layout = plan(16, tp=2, pp=2, ep=2)
    plain, twins = budget(layout, megatron="0.19"), budget(layout, megatron="0.19", all_gather=True)
    assert twins["per_rank"]["bridge"]["rank_sets"] == plain["per_rank"]["bridge"]["rank_sets"]
    assert twins["per_rank"]["bridge"]["twins"] == 2
    assert twins["per_rank"]["bridge"]["communicators"] == plain["per_rank"]["bridge"]["communicators"] + 2
    assert twins["per_rank"]["megatron"]["by_kind"]["dp-cp-ag"] == {"nccl": 1, "gloo": 0}
    assert twins["per_rank"]["megatron"]["by_kind"]["edp-ag"] == {"nccl": 1, "gloo": 0}
    assert twins["per_rank"]["bridge"]["fields"]["dp_cp_ag"] == 4
    assert twins["world"]["bridge_split_group"] == plain["world"]["bridge_split_group"] + 2 * 16
    assert "the one exception to one communicator per rank set" in twins["notes"][0]
    old = budget(layout, megatron="0.16", all_gather=True)  # create_all_gather_group: dp-cp only
    assert old["per_rank"]["bridge"]["twins"] == 1 and "dp_cp_ag" not in old["per_rank"]["bridge"]["fields"]


def test_twins_in_another_order_are_noted() -> None:
    notes = budget(plan(8, pp=4, order="pp-tp-cp-ep-dp"), megatron="0.18", all_gather=True)["notes"]
    assert any("default order tp-cp-ep-dp-pp" in note for note in notes)
    assert len(budget(plan(8, pp=4, order="pp-tp-cp-ep-dp"), megatron="0.16", all_gather=True)["notes"]) == 1


def test_megatron_lines_and_their_kinds() -> None:
    assert MEGATRON_LINES == ("0.16", "0.18", "0.19")
    assert [megatron_line(v) for v in ("0.16.1", "0.17.1", "0.18.2", "0.19.2", "0.20", "1.0")] == [
        "0.16", "0.16", "0.18", "0.19", "0.19", "0.19"
    ]
    assert [k for k, _ in MEGATRON_KINDS["0.19"]][:6] == ["gtp", "dp-cp", "intra-dp-cp", "dp", "gtp-dp", "gtp-dp-cp"]
    assert len(COLLECTION_FIELDS["0.16"]) == 20 and len(COLLECTION_FIELDS["0.18"]) == 22
    assert len(COLLECTION_FIELDS["0.19"]) == 27


def test_budget_is_bounded_at_huge_worlds() -> None:
    b = budget(plan(2**40, tp=8, pp=8, ep=8), megatron="0.16")
    assert b["per_rank"]["megatron"]["nccl"] == 17
    assert b["world"]["megatron_new_group"]["gloo_off"] > 2**40
    huge = budget(plan(2**62, tp=8, pp=8, ep=16, gtp_remat=4, expert_gtp_remat=2), megatron="0.19", all_gather=True)
    assert huge["per_rank"]["megatron"]["nccl"] == 17 + 3 + 3 + 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(comm_mb=-1), "comm_mb"),
        (dict(comm_mb=True), "comm_mb"),
        (dict(dist_opt_instances=3), "3 distributed-optimizer instances must divide dp x cp = 4"),
        (dict(hierarchical_cp=(4,)), r"hierarchical cp sizes \[4\] must multiply to cp = 2"),
        (dict(megatron="0.15.3"), "older than the oldest line the budget models"),
        (dict(megatron="latest"), "version such as"),
        (dict(megatron=19), "version string"),
        (dict(all_gather="yes"), "all_gather must be True or False"),
    ],
)
def test_budget_rejects_bad_options(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        budget(plan(8, tp=2, cp=2), **kwargs)


def test_gtp_refuses_old_lines_and_several_optimizer_instances() -> None:
    with pytest.raises(LayoutError, match=r"gtp_remat = 2, expert_gtp_remat = 1: .* models the 0.18 line"):
        budget(plan(8, tp=2, gtp_remat=2), megatron="0.18")
    with pytest.raises(LayoutError, match="with 2 distributed-optimizer instances"):
        budget(plan(16, tp=2, gtp_remat=2), megatron="0.19", dist_opt_instances=2)


def test_budget_stays_torch_free() -> None:
    import subprocess

    code = (
        "import sys, mpu_bridge.budget, mpu_bridge.cli; from mpu_bridge.layout import plan; "
        "mpu_bridge.budget.budget(plan(8)); assert 'torch' not in sys.modules and 'megatron' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- past sys.maxsize ranks ------------------------------------------------------------------


@pytest.mark.parametrize("world", [2**63, 2**64 + 64, 10**38 + 56])
@pytest.mark.parametrize("line", MEGATRON_LINES)
def test_budget_past_sys_maxsize_ranks_scales_the_small_world(world: int, line: str) -> None:
    # was: budget(plan(2**63, tp=8)) raised OverflowError (len() of a view past sys.maxsize).
    # Per rank nothing depends on the world size once dp > 1: the counts equal 64 ranks'.
    big, small = budget(plan(world, tp=8), megatron=line), budget(plan(64, tp=8), megatron=line)
    for side in ("megatron", "bridge"):
        ours, theirs = dict(big["per_rank"][side]), dict(small["per_rank"][side])
        ours.pop("fields", None), theirs.pop("fields", None)
        assert ours == theirs, side
    assert big["max_per_rank"] == small["max_per_rank"]
    assert big["world"]["bridge_partitions"] == small["world"]["bridge_partitions"]
    assert big["world"]["bridge_split_group"] == world * big["world"]["bridge_partitions"]
    fields = big["per_rank"]["bridge"]["fields"]
    assert fields["tp"] == 8 and fields["dp"] == world // 8 and fields["pp"] == 1
    assert budget(plan(world, tp=8), world - 1, megatron=line)["per_rank"]["bridge"]["fields"]["dp"] == world // 8
