"""``attach(grid)``: megatron-core's ``HyperCommGrid`` read as the layout (issue 18 §3).

A trainer on Megatron-Bridge's decentralized process groups builds a grid and creates
groups with ``grid.create_pg``; it has no ``parallel_state``. The grid's shape and dim
names are megatron-core's sizes and order, so the bridge plans that layout, borrows every
group the grid created (nothing created for those rank sets) and derives the rest.

Pure parts first (a grid needs ``WORLD_SIZE`` or an initialised world, nothing more),
then one spawned world of 8 gloo ranks; the assertions follow each scenario.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict

import pytest

from _multiproc import run_ranks
from mpu_bridge.errors import MpuError
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core.hyper_comm_grid") or not is_available("einops"),
    reason="needs megatron-core's HyperCommGrid (and einops, which it uses)",
)

WORLD = 8


@pytest.fixture
def world_of_8(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))  # what HyperCommGrid reads without a world


def _grid(shape, names, offset=0):
    from megatron.core.hyper_comm_grid import HyperCommGrid

    return HyperCommGrid(shape, names, rank_offset=offset)


def test_a_grid_is_the_layout_its_shape_and_dim_names_describe(world_of_8):
    from mpu_bridge.grid_mpu import grid_layout

    layout = grid_layout(_grid([2, 2, 2], ["tp", "dp", "pp"]), WORLD)
    c = layout.config
    assert (c.tp, c.dp, c.pp, c.cp) == (2, 2, 2, 1)
    assert c.order.startswith("tp-dp-pp")
    assert layout.group_of("dp", 0) == [0, 2]
    assert layout.group_of("pp", 0) == [0, 4]


@pytest.mark.parametrize(
    "shape, names",
    [([2, 2, 2], ["tp", "dp", "pp"]), ([2, 2, 2], ["pp", "tp", "dp"]), ([2, 2, 2], ["tp", "cp", "dp"]),
     ([2, 4], ["dp", "tp"]), ([1, 2, 2, 2], ["tp", "cp", "dp", "pp"]), ([8], ["dp"])],
)
def test_every_kind_of_the_grids_layout_is_the_grids_own_enumeration(world_of_8, shape, names):
    # the bridge derives groups from the layout; the grid would enumerate these
    from mpu_bridge.grid_mpu import grid_layout, kind_of_dims

    grid = _grid(shape, names)
    layout = grid_layout(grid, WORLD)
    for r in range(1, len(names) + 1):
        for dims in itertools.combinations(names, r):
            kind = kind_of_dims(dims)
            if kind is None:
                continue
            have = sorted(sorted(g) for g in grid.get_rank_enum(list(dims)))
            assert have == sorted(layout.groups(kind.name)), (dims, kind.name)


@pytest.mark.parametrize(
    "dims, kind",
    [(("tp",), "tp"), (("dp", "cp"), "dp-cp"), (("cp", "tp"), "tp-cp"), (("tp", "pp"), "mp"),
     (("tp", "dp", "cp"), "tp-dp-cp"), (("pp", "dp"), None)],
)
def test_the_dims_of_a_grid_group_name_one_kind(dims, kind):
    from mpu_bridge.grid_mpu import kind_of_dims

    found = kind_of_dims(dims)
    assert (found.name if found else None) == kind


def test_a_grid_over_part_of_the_world_is_a_rank_span(world_of_8):
    from mpu_bridge.grid_mpu import grid_layout

    layout = grid_layout(_grid([2, 2], ["tp", "dp"], offset=4), WORLD)
    assert (layout.rank_offset, layout.world_size) == (4, 4)
    assert layout.groups("tp") == [[4, 5], [6, 7]]
    assert layout.groups("dp") == [[4, 6], [5, 7]]


def test_a_grid_past_the_end_of_the_world_is_refused_naming_its_span(world_of_8):
    from mpu_bridge.grid_mpu import grid_layout

    grid = _grid([2, 2], ["tp", "dp"], offset=4)
    with pytest.raises(MpuError, match=r"covers ranks \[4, 8\), outside the world of 6 ranks"):
        grid_layout(grid, 6)


def test_an_expert_grid_is_refused_saying_so(world_of_8):
    from mpu_bridge.grid_mpu import grid_layout

    with pytest.raises(MpuError, match="expert grid"):
        grid_layout(_grid([2, 2, 2], ["tp", "ep", "dp"]), WORLD)


def _attach_grid(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist
    from megatron.core.hyper_comm_grid import HyperCommGrid

    import mpu_bridge

    grid = HyperCommGrid([2, 2, 2], ["tp", "dp", "pp"])
    made = {"tp": grid.create_pg("tp"), "dp": grid.create_pg("dp"), "mp": grid.create_pg(["tp", "pp"])}
    bridge = mpu_bridge.attach(grid)
    same = {kind: bridge.group(kind).group is group for kind, group in made.items()}
    created_for_grid_groups = bridge.stats()["created"]
    derived = {kind: bridge.group(kind).ranks for kind in ("pp", "tp-dp", "dp-cp")}
    grid_says = {
        kind: next(tuple(g) for g in grid.get_rank_enum(dims) if rank in g)
        for kind, dims in (("pp", ["pp"]), ("tp-dp", ["tp", "dp"]), ("dp-cp", ["dp"]))
    }
    legacy = bridge.as_legacy_mpu()
    obs = {
        "same": same, "created_for_grid_groups": created_for_grid_groups, "derived": derived,
        "grid_says": grid_says, "tp_rank": legacy.get_tensor_model_parallel_rank(),
        "dp_size": legacy.get_data_parallel_world_size(), "order": bridge.layout.config.order,
        "live": len(dist.distributed_c10d._world.pg_map),
    }
    bridge.close()
    obs["live_after_close"] = len(dist.distributed_c10d._world.pg_map)
    return obs


def test_attach_grid_borrows_the_grids_groups_and_derives_the_rest_on_its_arithmetic():
    observed = run_ranks(_attach_grid, WORLD)
    for rank, obs in enumerate(observed):
        assert obs["same"] == {"tp": True, "dp": True, "mp": True}
        assert obs["created_for_grid_groups"] == 0
        assert obs["derived"] == obs["grid_says"]
        assert obs["tp_rank"] == rank % 2
        assert obs["dp_size"] == 2
        assert obs["order"].startswith("tp-dp-pp")
        assert obs["live"] - obs["live_after_close"] == 2  # the bridge's pp and tp-dp; dp-cp is dp
    assert [o["derived"]["pp"] for o in observed] == [(0, 4), (1, 5), (2, 6), (3, 7)] * 2


def _attach_grid_with_a_view(rank: int, world: int) -> Dict[str, Any]:
    from megatron.core.hyper_comm_grid import HyperCommGrid

    import mpu_bridge

    grid = HyperCommGrid([2, 4], ["tp", "dp"])
    grid.register_view("expert", [2, 2, 2], ["tp", "ep", "dp"], shared_dims=["tp"])
    ep = grid.create_pg("ep", view="expert")
    bridge = mpu_bridge.attach(grid)
    experts = bridge.expert_groups(2)
    obs = {"ranks": experts.expert_parallel.ranks, "same": experts.expert_parallel.group is ep,
           "view_ranks": next(tuple(g) for g in grid.get_rank_enum("ep", view="expert") if rank in g)}
    bridge.close()
    return obs


def _has_views() -> bool:
    if not is_available("megatron.core.hyper_comm_grid"):
        return False
    from megatron.core.hyper_comm_grid import HyperCommGrid

    return hasattr(HyperCommGrid, "register_view")


@pytest.mark.skipif(not _has_views(), reason="needs megatron-core >= 0.19 (HyperCommGrid.register_view)")
def test_a_views_group_with_the_ranks_of_a_derived_group_is_that_group():
    observed = run_ranks(_attach_grid_with_a_view, WORLD)
    for obs in observed:
        assert obs["ranks"] == obs["view_ranks"]
        assert obs["same"]


def _two_module_grids(rank: int, world: int) -> Dict[str, Any]:
    from megatron.core.hyper_comm_grid import HyperCommGrid

    import mpu_bridge

    # every rank builds both modules' grids and creates their groups (create_pg: all enter)
    encoder = HyperCommGrid([2, 2], ["tp", "dp"])  # ranks 0..3
    llm = HyperCommGrid([2, 2], ["tp", "pp"], rank_offset=4)  # ranks 4..7
    made = {name: grid.create_pg("tp") for name, grid in (("encoder", encoder), ("llm", llm))}
    obs: Dict[str, Any] = {"tp": {}, "errors": {}, "created": {}}
    for name, grid in (("encoder", encoder), ("llm", llm)):
        bridge = mpu_bridge.attach(grid)
        bridge.prepare(["tp", "pp", "dp", "mp"])  # every rank, alike: only members create
        try:
            tp = bridge.tensor_parallel()
            obs["tp"][name] = (tp.ranks, tp.group is made[name])
            obs["pp_" + name] = bridge.pipeline_parallel().ranks
        except mpu_bridge.OutsideSpanError as exc:
            obs["errors"][name] = str(exc)
        obs["created"][name] = bridge.stats()["created"]
        bridge.close()
    return obs


def test_grids_over_two_modules_are_two_span_bridges_whose_groups_never_mix():
    observed = run_ranks(_two_module_grids, WORLD)
    assert [o["tp"] for o in observed[:4]] == [{"encoder": ((0, 1), True)}] * 2 + [{"encoder": ((2, 3), True)}] * 2
    assert [o["tp"] for o in observed[4:]] == [{"llm": ((4, 5), True)}] * 2 + [{"llm": ((6, 7), True)}] * 2
    assert [o["pp_llm"] for o in observed[4:]] == [(4, 6), (5, 7), (4, 6), (5, 7)]
    assert all("outside this bridge's rank span 4..7" in o["errors"]["llm"] for o in observed[:4])
    assert all("outside this bridge's rank span 0..3" in o["errors"]["encoder"] for o in observed[4:])
    assert [o["created"]["llm"] for o in observed[:4]] == [0] * 4  # outsiders hold nothing of it
