"""MpuReader and the bridge over whichever megatron-core release is installed (0.8 … 0.16).

The version matrix (``compat/run_matrix.py``) runs this file in one environment per
megatron-core release line. It is written against what every release has in
common and asks each release only what it offers:

* ``initialize_model_parallel`` is called with the keyword arguments its signature
  has (``expert_tensor_parallel_size`` and ``create_gloo_process_groups`` arrived
  in later releases);
* megatron-core's own answers (the oracle) are read through the names the
  installed release uses for each group, written out below per release range.

One spawned world of 4 gloo processes runs every layout in sequence; each rank
returns plain data, and the tests below each check one behaviour:

* the reader's world size, rank and group ranks equal megatron-core's own, for
  every dimension the release has;
* megatron-core's groups equal ``mpu_bridge.layout.plan`` for the same sizes and
  order -- except the one documented difference: releases before 0.10 build the
  expert groups with context parallelism from the dense grid (expert-parallel
  stride tp·cp), written out below;
* attaching the bridge borrows megatron-core's group objects and creates none (on
  releases before 0.10 with cp > 1 and ep > 1 it finds the rank order that
  reproduces their expert groups: data before expert).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from mpu_bridge.optional import is_available

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _multiproc import run_ranks  # noqa: E402  (tests/ holds the process harness)

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)

WORLD_SIZE = 4
DEFAULT_ORDER = "tp-cp-ep-dp-pp"


def _release() -> Tuple[int, int]:
    try:
        text = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


RELEASE = _release()
#: Expert-tensor parallelism (its own size, groups and getters) arrived in 0.10.
HAS_EXPERT_TENSOR_PARALLEL = RELEASE >= (0, 10)

# name -> sizes (and rank order) given to initialize_model_parallel
LAYOUTS: Dict[str, Dict[str, Any]] = {
    "tp2_pp2": dict(tp=2, pp=2),
    "tp2_cp2": dict(tp=2, cp=2),
    "ep4": dict(ep=4),
    "tp2_ep2": dict(tp=2, ep=2),
    "cp2_ep2": dict(cp=2, ep=2),
    "tp2_ep2_data_before_expert": dict(tp=2, ep=2, order="tp-cp-dp-ep-pp"),
}
if HAS_EXPERT_TENSOR_PARALLEL:
    LAYOUTS["tp2_ep2_etp1"] = dict(tp=2, ep=2, etp=1)

#: Layouts whose expert groups differ from mpu_bridge.layout on this release.
EXPERT_LAYOUT_DIFFERS = set() if HAS_EXPERT_TENSOR_PARALLEL else {"cp2_ep2"}
EXPERT_DIMS = ("ep", "edp", "etp-ep", "etp-ep-pp")

# megatron-core dimension -> bridge query returning the same group
BRIDGE_DENSE_QUERIES = {
    "tp": "tensor_parallel",
    "pp": "pipeline_parallel",
    "dp": "data_parallel",
    "cp": "sequence_parallel",
    "sdp": "sequence_data_parallel",
    "mp": "model_parallel",
}


# ---------------------------------------------------------------------------
# In the rank processes
# ---------------------------------------------------------------------------


def _import_parallel_state():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    return parallel_state


def _initialize(ps, spec: Dict[str, Any]) -> None:
    """``initialize_model_parallel`` with the keyword arguments this release accepts."""
    params = inspect.signature(ps.initialize_model_parallel).parameters
    kwargs: Dict[str, Any] = dict(
        tensor_model_parallel_size=spec.get("tp", 1),
        pipeline_model_parallel_size=spec.get("pp", 1),
        context_parallel_size=spec.get("cp", 1),
        expert_model_parallel_size=spec.get("ep", 1),
        order=spec.get("order", DEFAULT_ORDER),
    )
    if "expert_tensor_parallel_size" in params:
        kwargs["expert_tensor_parallel_size"] = spec.get("etp")
    elif spec.get("etp") is not None:
        raise ValueError(f"megatron-core {RELEASE} has no expert_tensor_parallel_size")
    if "create_gloo_process_groups" in params:
        kwargs["create_gloo_process_groups"] = False
    missing = sorted(k for k in kwargs if k not in params)
    if missing:
        raise TypeError(f"initialize_model_parallel of megatron-core {RELEASE} lacks {missing}")
    ps.initialize_model_parallel(**kwargs)


def _accepts(fn, keyword: str) -> bool:
    return keyword in inspect.signature(fn).parameters


def _megatron_groups(ps, cp: int) -> Dict[str, Any]:
    """megatron-core's own group object per dimension, through the installed release's names.

    ≥ 0.10: ``get_expert_data_parallel_group``, ``get_expert_tensor_*``,
    ``get_expert_tensor_and_model_parallel_group``,
    ``get_expert_tensor_model_pipeline_parallel_group``.
    < 0.10: ``get_data_modulo_expert_parallel_group`` (with_context_parallel=True
    when it has that keyword and cp > 1), experts on the tensor-parallel group,
    ``get_tensor_and_expert_parallel_group``, ``get_model_parallel_group(with_expert_parallel=True)``.
    A dimension the release cannot answer is absent.
    """
    groups: Dict[str, Any] = {
        "tp": ps.get_tensor_model_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
        "dp": ps.get_data_parallel_group(),
        "cp": ps.get_context_parallel_group(),
        "sdp": ps.get_data_parallel_group(with_context_parallel=True),
        "mp": ps.get_model_parallel_group(),
        "ep": ps.get_expert_model_parallel_group(),
        "tp-cp": ps.get_tensor_and_context_parallel_group(),
        "tp-dp": ps.get_tensor_and_data_parallel_group(),
        "tp-dp-cp": ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
    }
    if hasattr(ps, "get_expert_data_parallel_group"):
        groups["edp"] = ps.get_expert_data_parallel_group()
        groups["etp"] = ps.get_expert_tensor_parallel_group()
        groups["etp-ep"] = ps.get_expert_tensor_and_model_parallel_group()
        groups["etp-ep-pp"] = ps.get_expert_tensor_model_pipeline_parallel_group()
    else:
        modulo = ps.get_data_modulo_expert_parallel_group
        if _accepts(modulo, "with_context_parallel"):
            groups["edp"] = modulo(with_context_parallel=True)
        elif cp == 1:
            groups["edp"] = modulo()
        groups["etp"] = ps.get_tensor_model_parallel_group()
        groups["etp-ep"] = ps.get_tensor_and_expert_parallel_group()
        if _accepts(ps.get_model_parallel_group, "with_expert_parallel"):
            groups["etp-ep-pp"] = ps.get_model_parallel_group(with_expert_parallel=True)
    return groups


def _ranks(group) -> List[int]:
    import torch.distributed as dist

    return [int(r) for r in dist.get_process_group_ranks(group)]


def _observe_layout(ps, rank: int, spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge
    from mpu_bridge.errors import MpuError
    from mpu_bridge.mpu import MpuReader

    groups = _megatron_groups(ps, spec.get("cp", 1))
    megatron = {dim: (dist.get_world_size(g), dist.get_rank(g), _ranks(g)) for dim, g in groups.items()}
    reader = MpuReader(ps)
    answers: Dict[str, Optional[tuple]] = {}
    for dim in megatron:
        try:
            answers[dim] = (reader.world_size(dim), reader.rank(dim), list(reader.group_ranks(dim)))
        except MpuError as exc:
            answers[dim] = ("MpuError", str(exc))
    sizes = reader.sizes()
    observed: Dict[str, Any] = {
        "megatron": megatron,
        "reader": answers,
        "flavour": reader.flavour,
        "sizes": dict(tp=sizes.tp, pp=sizes.pp, dp=sizes.dp, cp=sizes.cp, ep=sizes.ep, etp=sizes.etp),
    }
    groups_before = len(dist.distributed_c10d._world.pg_map)
    try:
        bridge = mpu_bridge.attach(ps)
    except MpuError as exc:
        observed["attach_error"] = str(exc)
        return observed
    with bridge:
        observed["order"] = bridge.layout.config.order
        dense = {dim: getattr(bridge, query)() for dim, query in BRIDGE_DENSE_QUERIES.items()}
        # megatron-core may hold several objects with one rank set (with cp = 1 its
        # data-parallel group with and without context parallelism): any of them will do.
        observed["bridge_dense"] = {
            dim: (any(info.group is g for g in groups.values()), info.borrowed, list(info.ranks))
            for dim, info in dense.items()
        }
        ep = spec.get("ep", 1)
        if ep > 1:
            experts = bridge.expert_groups(ep)
            observed["bridge_ep"] = (list(experts.expert_parallel.ranks), experts.expert_parallel.borrowed)
        observed["created"] = bridge.stats()["created"]
        observed["groups_added"] = len(dist.distributed_c10d._world.pg_map) - groups_before
    return observed


def _run_layouts(rank: int, world_size: int, layouts: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    from mpu_bridge.errors import MpuError
    from mpu_bridge.mpu import MpuReader

    ps = _import_parallel_state()
    out: Dict[str, Any] = {}
    try:
        MpuReader(ps).sizes()
        out["before_init"] = "answered"
    except MpuError as exc:
        out["before_init"] = str(exc)
    for name, spec in layouts.items():
        _initialize(ps, spec)
        try:
            out[name] = _observe_layout(ps, rank, spec)
        finally:
            ps.destroy_model_parallel()
    return out


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    # a bound against hangs, not a speed requirement: on a loaded 2-core machine the
    # imports alone can take minutes
    return run_ranks(_run_layouts, WORLD_SIZE, LAYOUTS, timeout=900)


def test_the_installed_release_is_read_as_megatron_core(world):
    assert all(per_rank[name]["flavour"] == "megatron-core" for per_rank in world for name in LAYOUTS)


def test_reading_before_initialisation_says_the_mpu_looks_uninitialised(world):
    for per_rank in world:
        assert "looks uninitialised" in per_rank["before_init"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reader_answers_equal_megatron_cores_own_groups(world, layout):
    for rank, per_rank in enumerate(world):
        observed = per_rank[layout]
        for dim, expected in observed["megatron"].items():
            assert tuple(observed["reader"][dim]) == tuple(expected), (layout, rank, dim)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reader_sizes_are_the_sizes_given_to_megatron_core(world, layout):
    spec = LAYOUTS[layout]
    tp, pp, cp, ep = (spec.get(k, 1) for k in ("tp", "pp", "cp", "ep"))
    etp = spec.get("etp") or tp
    expected = dict(tp=tp, pp=pp, dp=WORLD_SIZE // (tp * pp * cp), cp=cp, ep=ep, etp=etp)
    for per_rank in world:
        assert per_rank[layout]["sizes"] == expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_cores_groups_equal_the_planned_layout(world, layout):
    from mpu_bridge.layout import plan
    from mpu_bridge.mpu import DIMENSION_KINDS

    planned = plan(WORLD_SIZE, **LAYOUTS[layout])
    for rank, per_rank in enumerate(world):
        for dim, (size, group_rank, ranks) in per_rank[layout]["megatron"].items():
            if layout in EXPERT_LAYOUT_DIFFERS and dim in EXPERT_DIMS:
                continue
            kind = DIMENSION_KINDS[dim]
            expected = (planned.size(kind), planned.rank_in_group(kind, rank), planned.group_of(kind, rank))
            assert (size, group_rank, ranks) == expected, (layout, rank, dim)


def test_expert_groups_with_context_parallelism_as_this_release_builds_them(world):
    ep_groups = sorted({tuple(per_rank["cp2_ep2"]["megatron"]["ep"][2]) for per_rank in world})
    if HAS_EXPERT_TENSOR_PARALLEL:
        # expert grid etp·ep·edp·pp: cp folds into edp, ep is contiguous
        assert ep_groups == [(0, 1), (2, 3)]
    else:
        # < 0.10: ep is carved out of dp in the dense grid, stride tp·cp = 2
        assert ep_groups == [(0, 2), (1, 3)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bridge_borrows_megatron_cores_dense_groups_and_creates_none(world, layout):
    for rank, per_rank in enumerate(world):
        observed = per_rank[layout]
        assert "attach_error" not in observed, observed.get("attach_error")
        for dim, (megatrons_object, borrowed, ranks) in observed["bridge_dense"].items():
            assert megatrons_object and borrowed, (layout, rank, dim)
            assert ranks == observed["megatron"][dim][2], (layout, rank, dim)
        assert observed["created"] == 0
        assert observed["groups_added"] == 0


@pytest.mark.parametrize("layout", sorted(name for name in LAYOUTS if LAYOUTS[name].get("ep", 1) > 1))
def test_bridge_expert_groups_of_megatron_cores_size_reuse_its_groups(world, layout):
    for per_rank in world:
        ranks, borrowed = per_rank[layout]["bridge_ep"]
        assert ranks == per_rank[layout]["megatron"]["ep"][2]
        assert borrowed


def test_bridge_infers_the_order_that_reproduces_megatron_cores_expert_groups(world):
    orders = {per_rank["cp2_ep2"]["order"] for per_rank in world}
    if HAS_EXPERT_TENSOR_PARALLEL:
        assert orders == {DEFAULT_ORDER}
    else:
        # ep stride tp·cp = expert data (edp = cp·dp/ep) before ep in the expert grid
        assert orders == {"tp-cp-dp-ep-pp"}
