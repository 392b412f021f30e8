"""``Bridge.device_mesh``: the bridge's groups as a PyTorch ``DeviceMesh``, in 8 gloo ranks.

One spawned world of 8 ranks. Every rank attaches standalone bridges for several
layouts (one of a non-default order, one with experts) and then one over the real
megatron-core ``parallel_state``, builds meshes and records plain data: the mesh
tensor, the process groups PyTorch holds before and after (``_world.pg_map``),
whether ``mesh[name].get_group()`` is the bridge's group object, and the numbers
DTensor collectives give next to plain ``torch.distributed`` over the bridge's
groups. FSDP2's ``fully_shard`` over the ``dp`` dim trains a tiny model, compared
with the same model trained on the whole batch in one process.

The pure part (the mesh tensor of a layout, the dims' checks) is tested here too,
without processes.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch

from _multiproc import run_ranks
from _rank_rule import assert_rank_rule
from _rank_rule import observe as observe_rank_rule
from mpu_bridge.errors import BridgeError
from mpu_bridge.layout import plan
from mpu_bridge.mesh import mesh_ranks
from mpu_bridge.optional import is_available

WORLD_SIZE = 8
AGREEMENT_TIMEOUT_S = 120
HAS_MEGATRON = is_available("megatron.core")
#: FSDP2 on CPU records events on ``torch.cpu.Stream``; older torch (2.6) has no such events.
FSDP2_ON_CPU = hasattr(torch.cpu.Stream, "record_event")

# name -> standalone sizes
LAYOUTS: Dict[str, Dict[str, Any]] = {
    "tp2_pp2": dict(tp=2, pp=2),
    "tp2_pp2_tp_pp_dp": dict(tp=2, pp=2, order="tp-pp-dp"),
    "tp2_cp2": dict(tp=2, cp=2),
    "tp2_ep2": dict(tp=2, ep=2),
}

# ---------------------------------------------------------------------------------------
# Inside the rank processes (module level: run_ranks pickles functions by reference)
# ---------------------------------------------------------------------------------------


def _pg_count() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _error(call: Callable[[], Any]) -> Dict[str, str]:
    try:
        call()
    except BridgeError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "none", "message": ""}


def _collectives(bridge: Any, mesh: Any, rank: int) -> Dict[str, Any]:
    """DTensor over the mesh next to plain torch.distributed over the bridge's groups."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    out: Dict[str, Any] = {}
    dp = bridge.group("dp")
    local = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank
    # Shard(0) -> Replicate over dp is an all-gather over the dp group.
    gathered = DTensor.from_local(local, mesh["dp"], [Shard(0)]).redistribute(mesh["dp"], [Replicate()])
    parts = [torch.empty_like(local) for _ in range(dp.world_size)]
    dist.all_gather(parts, local, group=dp.group)
    out["dp_gather"] = gathered.to_local().tolist()
    out["dp_gather_plain"] = torch.cat(parts).tolist()
    # Partial -> Replicate over tp is an all-reduce over the tp group.
    value = torch.tensor([float(rank), 1.0])
    reduced = DTensor.from_local(value.clone(), mesh["tp"], [Partial()]).redistribute(mesh["tp"], [Replicate()])
    plain = value.clone()
    dist.all_reduce(plain, group=bridge.group("tp").group)
    out["tp_reduce"] = reduced.to_local().tolist()
    out["tp_reduce_plain"] = plain.tolist()
    # A 2-d mesh (dp, tp): Shard(0) on dp, Shard(1) on tp -> full tensor.
    sub = mesh["dp", "tp"]
    block = torch.full((2, 2), float(rank))
    full = DTensor.from_local(block, sub, [Shard(0), Shard(1)]).full_tensor()
    out["dp_tp_full"] = full.tolist()
    out["dp_tp_mesh"] = sub.mesh.tolist()
    return out


def _dense(bridge: Any, rank: int) -> Dict[str, Any]:
    obs: Dict[str, Any] = {}
    groups = {dim: bridge.group(dim) for dim in ("pp", "dp", "cp", "tp")}  # the bridge's own
    before = _pg_count()
    mesh = bridge.device_mesh()
    obs["mesh"] = mesh.mesh.tolist()
    obs["names"] = mesh.mesh_dim_names
    obs["identity"] = {dim: mesh[dim].get_group() is info.group for dim, info in groups.items()}
    obs["coordinate"] = mesh.get_coordinate()
    dropped = bridge.device_mesh(keep_size_one=False, names={"dp": "dp_shard"})
    obs["dropped_names"] = dropped.mesh_dim_names
    obs["dropped_shape"] = tuple(dropped.mesh.shape)
    obs.update(_collectives(bridge, mesh, rank))
    obs["new_groups"] = _pg_count() - before
    flat = bridge.device_mesh(("pp", "dp-cp", "tp"), names=("stage", "data", "model"))
    obs["flat_names"] = flat.mesh_dim_names
    obs["flat_mesh"] = flat.mesh.tolist()
    obs["flat_identity"] = flat["data"].get_group() is bridge.sequence_data_parallel().group
    return obs


def _expert(bridge: Any, ep_size: Any) -> Dict[str, Any]:
    groups = {k: bridge.group(k, ep_size=ep_size) for k in ("ep", "etp", "edp")}
    groups["pp"] = bridge.group("pp")
    before = _pg_count()
    mesh = bridge.device_mesh(expert=True, ep_size=ep_size)
    return {
        "mesh": mesh.mesh.tolist(),
        "names": mesh.mesh_dim_names,
        "identity": {k: mesh[k].get_group() is info.group for k, info in groups.items()},
        "new_groups": _pg_count() - before,
    }


def _fsdp2(bridge: Any) -> Dict[str, Any]:
    """fully_shard over the dp dim vs the same model on the whole batch, 3 SGD steps."""
    import torch
    from torch.distributed.fsdp import fully_shard

    dp_mesh = bridge.device_mesh()["dp"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    before = _pg_count()
    fully_shard(model, mesh=dp_mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    index, size = dp_mesh.get_local_rank(), dp_mesh.size()
    for _ in range(3):
        x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)
        torch.nn.functional.mse_loss(model(x.chunk(size)[index]), y.chunk(size)[index]).backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    trained = {k: v.full_tensor() for k, v in model.state_dict().items()}
    diff = max(float((trained[k] - v).abs().max()) for k, v in reference.state_dict().items())
    moved = max(float((trained[k] - v).abs().max()) for k, v in initial.items())
    return {"max_diff": diff, "moved": moved, "new_groups": _pg_count() - before}


def _errors(bridge: Any) -> Dict[str, Dict[str, str]]:
    return {
        "unknown": _error(lambda: bridge.device_mesh(("pp", "dp", "zz"))),
        "expert_dim_in_dense": _error(lambda: bridge.device_mesh(("pp", "dp", "ep", "tp"))),
        "duplicate_names": _error(lambda: bridge.device_mesh(names=("a", "a", "b", "c"))),
        "ep_size_without_expert": _error(lambda: bridge.device_mesh(ep_size=2)),
        "expert_without_size": _error(lambda: bridge.device_mesh(expert=True)),
        "device_index": _error(lambda: bridge.device_mesh(device_type="cuda:0")),
        "uncovered": _error(lambda: bridge.device_mesh(("pp", "tp"))),
    }


def _megatron(rank: int) -> Dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as ps

    import mpu_bridge

    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 expert_model_parallel_size=2, create_gloo_process_groups=False)
    try:
        before = _pg_count()
        with mpu_bridge.attach(ps, agreement_timeout=AGREEMENT_TIMEOUT_S) as bridge:
            mesh = bridge.device_mesh()
            expert = bridge.device_mesh(expert=True)
            own = {
                "pp": ps.get_pipeline_model_parallel_group(),
                "dp": ps.get_data_parallel_group(),
                "cp": ps.get_context_parallel_group(),
                "tp": ps.get_tensor_model_parallel_group(),
            }
            own_expert = {
                "ep": ps.get_expert_model_parallel_group(),
                "etp": ps.get_expert_tensor_parallel_group(),
                "edp": ps.get_expert_data_parallel_group(),
                "pp": ps.get_pipeline_model_parallel_group(),
            }
            return {
                "mesh": mesh.mesh.tolist(),
                "expert_mesh": expert.mesh.tolist(),
                "identity": {k: mesh[k].get_group() is g for k, g in own.items()},
                "expert_identity": {k: expert[k].get_group() is g for k, g in own_expert.items()},
                "new_groups": _pg_count() - before,
                "created": bridge.stats()["created"],
            }
    finally:
        ps.destroy_model_parallel()


# -- import: attach(mesh) ------------------------------------------------------------------


def _attach_error(mesh: Any) -> Dict[str, str]:
    import mpu_bridge

    return _error(lambda: mpu_bridge.attach(mesh, agreement_timeout=AGREEMENT_TIMEOUT_S).close())


def _getters(bridge: Any) -> List[str]:
    """The getter names of the MeshMpu the bridge reads."""
    return sorted(name for name in dir(bridge.reader.mpu) if name.startswith("get_"))


def _round_trip(rank: int) -> Dict[str, Any]:
    """A bridge's own mesh attached as an MPU: the same layout and group objects, nothing new."""
    import mpu_bridge
    from mpu_bridge.layout import KINDS

    out: Dict[str, Any] = {}
    for name, sizes in LAYOUTS.items():
        with mpu_bridge.attach(None, agreement_timeout=AGREEMENT_TIMEOUT_S, **sizes) as first:
            mesh = first.device_mesh()
            dense = {k: first.group(k).group for k in ("pp", "dp", "cp", "tp")}
            before = _pg_count()
            with mpu_bridge.attach(mesh, agreement_timeout=AGREEMENT_TIMEOUT_S) as second:
                out[name] = {
                    "flavour": second.reader.flavour,
                    "getters": _getters(second),
                    "groups_equal": all(second.layout.group_of(k, rank) == first.layout.group_of(k, rank)
                                        for k in KINDS if first.layout.spec(k).grid == "dense"),
                    "same": {k: second.group(k).group is g for k, g in dense.items()},
                    "borrowed": second.data_parallel().borrowed,
                    "new_groups": _pg_count() - before,
                    "errors": {
                        "unknown": _attach_error(first.device_mesh(names={"dp": "data"})),
                        "ambiguous": _attach_error(first.device_mesh(names={"cp": "dp_shard"})),
                        "submesh": _attach_error(mesh["tp"]),
                    },
                }
    return out


def _megatron_names(rank: int) -> Dict[str, Any]:
    """A mesh with Megatron's names and ep as a root dim, carved out of data parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    import mpu_bridge

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "ep", "tp"))
    before = _pg_count()
    with mpu_bridge.attach(mesh, agreement_timeout=AGREEMENT_TIMEOUT_S) as bridge:
        c = bridge.layout.config
        experts = bridge.expert_groups(2)
        out = {
            "sizes": dict(tp=c.tp, pp=c.pp, cp=c.cp, dp=c.dp, ep=c.ep, etp=c.etp, edp=c.edp),
            "flavour": bridge.reader.flavour,
            "getters": _getters(bridge),
            "ep_same": experts.expert_parallel.group is mesh.get_group("ep"),
            "edp_same": experts.expert_data_parallel.group is mesh.get_group("dp"),
            "tp_same": bridge.tensor_parallel().group is mesh.get_group("tp"),
            "new_before_dp": _pg_count() - before,
            "dp": bridge.data_parallel().ranks,
            "ep": experts.expert_parallel.ranks,
            "edp": experts.expert_data_parallel.ranks,
        }
        out["new_with_dp"] = _pg_count() - before
        return out


def _torchtitan(rank: int) -> Dict[str, Any]:
    """torchtitan's dims and flattened dims (dp, dp_shard_cp, dp_cp; ep over dp_shard x cp)."""
    from torch.distributed.device_mesh import init_device_mesh

    import mpu_bridge

    mesh = init_device_mesh("cpu", (1, 2, 1, 2, 2), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
    flat = {
        "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
        "dp_shard_cp": mesh["dp_shard", "cp"]._flatten("dp_shard_cp"),
        "dp_cp": mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
        "ep": mesh["dp_shard", "cp"]._flatten("ep"),
    }
    before = _pg_count()
    with mpu_bridge.attach(mesh, agreement_timeout=AGREEMENT_TIMEOUT_S) as bridge:
        c = bridge.layout.config
        experts = bridge.expert_groups(2)
        return {
            "sizes": dict(tp=c.tp, pp=c.pp, cp=c.cp, dp=c.dp, ep=c.ep),
            "flavour": bridge.reader.flavour,
            "getters": _getters(bridge),
            "dp_same": bridge.data_parallel().group is flat["dp"].get_group(),
            "sdp_same": bridge.sequence_data_parallel().group is flat["dp_cp"].get_group(),
            "cp_same": bridge.sequence_parallel().group is mesh.get_group("cp"),
            "ep_same": experts.expert_parallel.group is flat["ep"].get_group(),
            "sdp": bridge.sequence_data_parallel().ranks,
            "ep": experts.expert_parallel.ranks,
            "edp": experts.expert_data_parallel.ranks,
            "created": bridge.stats()["created"],
            "new_groups": _pg_count() - before,
        }


def _no_names(bridge: Any) -> Dict[str, str]:
    from torch.distributed.device_mesh import DeviceMesh

    return _attach_error(DeviceMesh.from_group(bridge.group("dp").group, "cpu"))



# -- the rank rule: what the bridge reports as a rank is its group's own rank -----------------

#: 8-rank meshes: name -> (mesh tensor as nested lists, dim names). Those whose slices all
#: ascend are read; those with a slice that runs backwards are refused.
_ORDER_MESHES: Dict[str, Any] = {
    "ascending_dp_tp": ([[0, 1], [2, 3], [4, 5], [6, 7]], ("dp", "tp")),
    "ascending_pp_dp_tp": ([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], ("pp", "dp", "tp")),
    "ascending_tp_first": ([[0, 2, 4, 6], [1, 3, 5, 7]], ("tp", "dp")),  # tp listed first, still ascending
    "ascending_ep_root": ([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], ("dp", "ep", "tp")),
    "backwards_tp": ([[1, 0], [3, 2], [5, 4], [7, 6]], ("dp", "tp")),
    "backwards_dp": ([[6, 7], [4, 5], [2, 3], [0, 1]], ("dp", "tp")),
    "backwards_pp": ([[[4, 5], [6, 7]], [[0, 1], [2, 3]]], ("pp", "dp", "tp")),
    "backwards_ep_root": ([[[0, 1], [6, 7]], [[4, 5], [2, 3]]], ("dp", "ep", "tp")),
}


def _order_meshes(rank: int) -> Dict[str, Any]:
    """Every mesh of :data:`_ORDER_MESHES` attached: the rank rule, or the error."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    import mpu_bridge

    out: Dict[str, Any] = {}
    for name, (tensor, names) in _ORDER_MESHES.items():
        mesh = DeviceMesh("cpu", tensor, mesh_dim_names=names)
        try:
            with mpu_bridge.attach(mesh, agreement_timeout=AGREEMENT_TIMEOUT_S) as bridge:
                out[name] = observe_rank_rule(bridge)
        except BridgeError as exc:
            out[name] = {"type": type(exc).__name__, "message": str(exc)}
    # torchtitan's names with flattened dims
    mesh = init_device_mesh("cpu", (1, 2, 1, 2, 2), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    mesh["dp_shard", "cp"]._flatten("ep")
    with mpu_bridge.attach(mesh, agreement_timeout=AGREEMENT_TIMEOUT_S) as bridge:
        out["torchtitan"] = observe_rank_rule(bridge)
    return out


def _world(rank: int, world_size: int) -> Dict[str, Any]:
    import mpu_bridge

    out: Dict[str, Any] = {}
    for name, sizes in LAYOUTS.items():
        with mpu_bridge.attach(None, agreement_timeout=AGREEMENT_TIMEOUT_S, **sizes) as bridge:
            out[name] = _dense(bridge, rank)
            if sizes.get("ep", 1) > 1:
                out[name]["expert"] = _expert(bridge, None)
    with mpu_bridge.attach(None, tp=2, agreement_timeout=AGREEMENT_TIMEOUT_S) as bridge:
        out["tp2_ep4"] = _expert(bridge, 4)
        out["errors"] = _errors(bridge)
        if FSDP2_ON_CPU:
            out["fsdp2"] = _fsdp2(bridge)
        out["no_names"] = _no_names(bridge)
    out["round_trip"] = _round_trip(rank)
    out["megatron_names"] = _megatron_names(rank)
    out["torchtitan"] = _torchtitan(rank)
    out["order_meshes"] = _order_meshes(rank)
    if HAS_MEGATRON:
        out["megatron"] = _megatron(rank)
    return out


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=600)


def _each(world: List[Dict[str, Any]], *path: str) -> List[Any]:
    out = []
    for obs in world:
        for key in path:
            obs = obs[key]
        out.append(obs)
    return out


# ---------------------------------------------------------------------------------------
# Pure: the mesh tensor of a layout
# ---------------------------------------------------------------------------------------

PP_DP_CP_TP = ("pp", "dp", "cp", "tp")


def test_mesh_of_tp2_pp2_written_out():
    assert mesh_ranks(plan(8, tp=2, pp=2), PP_DP_CP_TP) == [
        [[[0, 1]], [[2, 3]]],
        [[[4, 5]], [[6, 7]]],
    ]


def test_mesh_of_a_non_default_order_written_out():
    # order tp-pp-dp: rank = tp + 2·pp + 4·dp
    assert mesh_ranks(plan(8, tp=2, pp=2, order="tp-pp-dp"), PP_DP_CP_TP) == [
        [[[0, 1]], [[4, 5]]],
        [[[2, 3]], [[6, 7]]],
    ]


def test_mesh_of_context_parallelism_and_a_flattened_dim():
    layout = plan(8, tp=2, cp=2)
    assert mesh_ranks(layout, PP_DP_CP_TP) == [[[[0, 1], [2, 3]], [[4, 5], [6, 7]]]]
    assert mesh_ranks(layout, ("dp-cp", "tp")) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_expert_mesh_written_out():
    assert mesh_ranks(plan(8, tp=2, ep=2), ("pp", "edp", "ep", "etp"), expert=True) == [
        [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    ]
    # expert-TP 1 under TP 2: ep and edp span the tensor-parallel ranks too
    assert mesh_ranks(plan(8, tp=2, ep=4, etp=1), ("pp", "edp", "ep", "etp"), expert=True) == [
        [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]
    ]


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-pp-dp", "dp-tp-pp", "pp-dp-tp", "tp-dp-pp"])
def test_every_slice_of_the_mesh_is_a_group_of_the_layout_for_any_order(order):
    layout = plan(8, tp=2, pp=2, order=order)
    mesh = mesh_ranks(layout, ("pp", "dp", "tp"))
    for a in range(2):
        for b in range(2):
            for c in range(2):
                rank = mesh[a][b][c]
                assert [mesh[i][b][c] for i in range(2)] == layout.group_of("pp", rank)
                assert [mesh[a][i][c] for i in range(2)] == layout.group_of("dp", rank)
                assert [mesh[a][b][i] for i in range(2)] == layout.group_of("tp", rank)
    assert sorted(r for x in mesh for y in x for r in y) == list(range(8))


@pytest.mark.parametrize(
    "dims, expert, message",
    [
        (("dp", "tp"), False, "leave out the dense grid's pp (size 2)"),
        (("pp", "dp-cp", "dp", "tp"), False, "must not overlap"),
        (("pp", "zz"), False, "unknown group kind 'zz'"),
        (("pp", "ep"), False, "pass expert=True"),
        (("pp", "dp"), True, "drop expert=True"),
        ("dp", False, "must be a tuple"),
        ((), False, "dims is empty"),
    ],
)
def test_bad_dims_are_bridge_errors(dims, expert, message):
    with pytest.raises(BridgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mesh_ranks(plan(8, tp=2, pp=2), dims, expert=expert)


# ---------------------------------------------------------------------------------------
# In 8 ranks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_mesh_tensor_is_the_layouts(world, name):
    layout = plan(WORLD_SIZE, **LAYOUTS[name])
    for obs in _each(world, name):
        assert obs["mesh"] == mesh_ranks(layout, PP_DP_CP_TP)
        assert obs["names"] == PP_DP_CP_TP


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_mesh_creates_no_group_and_hands_out_the_bridges_own(world, name):
    for obs in _each(world, name):
        assert obs["new_groups"] == 0
        assert obs["identity"] == {"pp": True, "dp": True, "cp": True, "tp": True}


def test_the_coordinate_is_the_ranks_place_in_each_group(world):
    layout = plan(WORLD_SIZE, **LAYOUTS["tp2_pp2_tp_pp_dp"])
    for rank, coordinate in enumerate(_each(world, "tp2_pp2_tp_pp_dp", "coordinate")):
        assert tuple(coordinate) == tuple(layout.rank_in_group(k, rank) for k in PP_DP_CP_TP)


def test_size_one_dims_are_dropped_when_asked(world):
    assert set(_each(world, "tp2_pp2", "dropped_names")) == {("pp", "dp_shard", "tp")}
    assert set(_each(world, "tp2_pp2", "dropped_shape")) == {(2, 2, 2)}
    assert set(_each(world, "tp2_cp2", "dropped_names")) == {("dp_shard", "cp", "tp")}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_flattened_dim_is_the_sequence_data_parallel_group(world, name):
    layout = plan(WORLD_SIZE, **LAYOUTS[name])
    for obs in _each(world, name):
        assert obs["flat_names"] == ("stage", "data", "model")
        assert obs["flat_mesh"] == mesh_ranks(layout, ("pp", "dp-cp", "tp"))
        assert obs["flat_identity"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dtensor_collectives_equal_plain_torch_distributed(world, name):
    for obs in _each(world, name):
        assert obs["dp_gather"] == obs["dp_gather_plain"]
        assert obs["tp_reduce"] == obs["tp_reduce_plain"]


def test_dtensor_collectives_written_out_for_tp2_pp2(world):
    # rank 0's dp group is (0, 2); its tp group (0, 1)
    obs = world[0]["tp2_pp2"]
    assert obs["dp_gather"] == [[0, 1], [2, 3], [4, 5], [200, 201], [202, 203], [204, 205]]
    assert obs["tp_reduce"] == [1.0, 2.0]
    assert obs["dp_tp_full"] == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_expert_mesh_of_the_bridges_own_experts(world):
    layout = plan(WORLD_SIZE, tp=2, ep=2)
    for obs in _each(world, "tp2_ep2", "expert"):
        assert obs["mesh"] == mesh_ranks(layout, ("pp", "edp", "ep", "etp"), expert=True)
        assert obs["names"] == ("pp", "edp", "ep", "etp")
        assert obs["new_groups"] == 0
        assert all(obs["identity"].values())


def test_expert_mesh_for_an_expert_size(world):
    # tp 2, ep 4: E+M+D; etp = tp = 2, edp = 1
    for obs in _each(world, "tp2_ep4"):
        assert obs["mesh"] == [[[[0, 1], [2, 3], [4, 5], [6, 7]]]]
        assert obs["new_groups"] == 0
        assert all(obs["identity"].values())


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown", "unknown group kind 'zz'"),
        ("expert_dim_in_dense", "pass expert=True"),
        ("duplicate_names", "must be distinct"),
        ("ep_size_without_expert", "pass expert=True"),
        ("expert_without_size", "ep_size=N"),
        ("device_index", "no index"),
        ("uncovered", "leave out"),
    ],
)
def test_bad_requests_are_bridge_errors_on_every_rank(world, case, message):
    for error in _each(world, "errors", case):
        assert error["type"] == "BridgeError"
        assert message in error["message"]


@pytest.mark.skipif(not FSDP2_ON_CPU, reason="this torch's FSDP2 cannot run on CPU (no torch.cpu.Stream.record_event)")
def test_fsdp2_fully_shard_over_the_dp_dim_trains_like_the_reference(world):
    for obs in _each(world, "fsdp2"):
        assert obs["max_diff"] < 1e-6
        assert obs["moved"] > 1e-3  # it did train
        assert obs["new_groups"] == 0


@pytest.mark.skipif(not HAS_MEGATRON, reason="needs megatron-core")
def test_over_megatron_core_the_mesh_is_its_own_groups_and_creates_nothing(world):
    layout = plan(WORLD_SIZE, tp=2, pp=2, ep=2)
    for obs in _each(world, "megatron"):
        assert obs["mesh"] == mesh_ranks(layout, PP_DP_CP_TP)
        assert obs["expert_mesh"] == mesh_ranks(layout, ("pp", "edp", "ep", "etp"), expert=True)
        assert all(obs["identity"].values()), obs["identity"]
        assert all(obs["expert_identity"].values()), obs["expert_identity"]
        assert obs["new_groups"] == 0
        assert obs["created"] == 0


# ---------------------------------------------------------------------------------------
# Import: attach(mesh)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_attaching_a_bridges_mesh_gives_its_layout_and_groups_and_creates_nothing(world, name):
    for obs in _each(world, "round_trip", name):
        assert obs["groups_equal"]
        assert obs["same"] == {"pp": True, "dp": True, "cp": True, "tp": True}
        assert obs["borrowed"]
        assert obs["new_groups"] == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown", "dims 'data' that mpu-bridge cannot read; accepted names: root dims pp, dp, dp_replicate"),
        ("ambiguous", "both 'dp' and 'dp_replicate'/'dp_shard'"),
        ("submesh", "spans 2 ranks, not the world of 8"),
    ],
)
def test_meshes_that_are_no_mpu_are_mpu_errors(world, case, message):
    for error in _each(world, "round_trip", "tp2_pp2", "errors", case):
        assert error["type"] == "MpuError"
        assert message in error["message"]


def test_a_mesh_without_dim_names_is_an_mpu_error(world):
    for error in _each(world, "no_names"):
        assert error["type"] == "MpuError"
        assert "no dim names" in error["message"]


def test_megatron_names_with_ep_as_a_root_dim(world):
    layout = plan(WORLD_SIZE, tp=2, ep=2)
    for rank, obs in enumerate(_each(world, "megatron_names")):
        assert obs["sizes"] == dict(tp=2, pp=1, cp=1, dp=4, ep=2, etp=2, edp=2)
        assert obs["ep_same"] and obs["edp_same"] and obs["tp_same"]
        assert obs["new_before_dp"] == 0
        assert list(obs["dp"]) == layout.group_of("dp", rank)
        assert list(obs["ep"]) == layout.group_of("ep", rank)
        assert list(obs["edp"]) == layout.group_of("edp", rank)
        assert obs["new_with_dp"] == 1  # dense dp = dp x ep: no mesh dim holds it


def test_torchtitan_names_and_flattened_dims(world):
    layout = plan(WORLD_SIZE, tp=2, cp=2, ep=2)
    for rank, obs in enumerate(_each(world, "torchtitan")):
        assert obs["sizes"] == dict(tp=2, pp=1, cp=2, dp=2, ep=2)
        assert obs["dp_same"] and obs["sdp_same"] and obs["cp_same"] and obs["ep_same"]
        assert list(obs["sdp"]) == layout.group_of("dp-cp", rank)
        assert list(obs["ep"]) == layout.group_of("ep", rank)
        assert list(obs["edp"]) == layout.group_of("edp", rank)
        # every group was the mesh's: expert data parallel (0, 4) is the flattened dp's rank set
        assert obs["created"] == 0
        assert obs["new_groups"] == 0


def _mesh_reads(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for obs in world:
        out += list(obs["round_trip"].values()) + [obs["megatron_names"], obs["torchtitan"]]
    return out


def test_an_attached_mesh_is_read_as_the_device_mesh_flavour(world):
    assert {read["flavour"] for read in _mesh_reads(world)} == {"device-mesh"}


def test_every_getter_of_a_real_mesh_mpu_is_a_candidate_of_its_name_table(world):
    # the device-mesh flavour has no record in compat/surfaces (compat/README.md): the real
    # MeshMpu's names, over Megatron's and torchtitan's meshes, are checked here instead
    from mpu_bridge.mpu import candidate_names

    candidates = {getter.name for _, _, getter in candidate_names("device-mesh")}
    seen = set()
    for read in _mesh_reads(world):
        seen |= set(read["getters"])
        assert set(read["getters"]) <= candidates, sorted(set(read["getters"]) - candidates)
    for prefix in ("tensor_model", "pipeline_model", "context", "data", "expert_model", "expert_data"):
        assert f"get_{prefix}_parallel_group" in seen, prefix


def test_the_device_mesh_flavour_is_detected_by_class_and_only_then():
    from mpu_bridge.mesh import MeshMpu
    from mpu_bridge.mpu import detect_flavour

    mesh_mpu = MeshMpu.__new__(MeshMpu)  # the class decides; no live mesh needed to detect
    mesh_mpu.__dict__["_getters"] = {"get_tensor_model_parallel_world_size": lambda: 2}
    assert detect_flavour(mesh_mpu) == "device-mesh"

    class LooksAlike:  # megatron-core's names, but not a MeshMpu
        def get_tensor_model_parallel_world_size(self) -> int:
            return 2

        def get_context_parallel_world_size(self) -> int:
            return 1

    assert detect_flavour(LooksAlike()) == "megatron-core"


# -- the rank rule -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(_ORDER_MESHES) + ["torchtitan"])
def test_every_reported_rank_is_the_rank_in_the_group_handed_out(world, name):
    # for every mesh, on every rank: either the mesh is refused (on every rank alike), or every
    # group the bridge hands out reports the group's own order as its ranks and
    # dist.get_rank(group) as its rank -- the legacy MPU's rank getters too
    observed = _each(world, "order_meshes", name)
    assert_rank_rule(observed)


def test_meshes_whose_slices_all_ascend_are_read(world):
    for name in [n for n in _ORDER_MESHES if n.startswith("ascending")] + ["torchtitan"]:
        for obs in _each(world, "order_meshes", name):
            assert "type" not in obs, (name, obs)


@pytest.mark.parametrize(
    "name, dim, slice_, group",
    [
        ("backwards_tp", "tp", [1, 0], [0, 1]),
        ("backwards_dp", "dp", [6, 4, 2, 0], [0, 2, 4, 6]),
        ("backwards_pp", "pp", [4, 0], [0, 4]),
        ("backwards_ep_root", "ep", [0, 6], [0, 6]),
    ],
)
def test_a_mesh_whose_slices_run_backwards_is_refused(world, name, dim, slice_, group):
    # DeviceMesh("cpu", [[1, 0], [3, 2]], ("dp", "tp")): the mesh puts rank 0 at tp place 1,
    # its group (torch orders every group by global rank) at 0; a layer that picks its shard
    # by tp rank and all-gathers over the group would misplace shards: refused, on every rank
    for rank, error in enumerate(_each(world, "order_meshes", name)):
        assert error.get("type") == "MpuError", (rank, error)
        assert "runs backwards" in error["message"] or "ascend" in error["message"], error["message"]
    message = world[0]["order_meshes"][name]["message"]
    if name != "backwards_ep_root":
        assert f"{dim!r} slice through rank 0 is {slice_}" in message, message
        assert f"its process group orders them {group}" in message, message
