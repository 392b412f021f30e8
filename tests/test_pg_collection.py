"""``Bridge.process_group_collection()``: megatron-core's ``ProcessGroupCollection`` from the bridge.

One spawned world of 8 gloo ranks. For each layout, every rank

1. runs megatron-core's own ``initialize_model_parallel`` and records what
   ``ProcessGroupCollection.use_mpu_process_groups()`` holds, field by field;
2. attaches a bridge to ``parallel_state`` and exports its collection: every field must
   be megatron-core's own object, and PyTorch's group table must not grow;
3. ``destroy_model_parallel``, attaches a *standalone* bridge with the same sizes and
   order and exports again: every field must hold the same ranks (in group-rank order)
   as megatron-core's, proven on the wire by an all-reduce over each group.

Then a real consumer: megatron-core's ``GPTModel`` (tensor-parallel embedding, MLP,
output layer and vocab-parallel cross entropy, CPU initialisation) takes
``pg_collection=``; one forward and backward over parallel_state's collection and over a
standalone bridge's (with ``parallel_state`` destroyed) must give the same loss and
gradients.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest

from _megatron import initialize_megatron, megatron_parallel_state, supports_gtp
from _multiproc import run_ranks
from mpu_bridge import partitions
from mpu_bridge.layout import plan
from mpu_bridge.optional import MissingDependencyError, is_available
from mpu_bridge.pg_collection import (
    ALL_GATHER_FIELDS,
    FIELD_KINDS,
    FIELDS,
    FIRST_RELEASE,
    collection_class,
    declared_fields,
)

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)

WORLD_SIZE = 8
AGREEMENT_TIMEOUT_S = 120
DEFAULT_ORDER = "tp-cp-ep-dp-pp"

# name -> megatron-core sizes and order (8 ranks)
LAYOUTS: Dict[str, Dict[str, Any]] = {
    "tp2_pp4": dict(tp=2, pp=4),  # middle stages are in no embedding group
    "tp2_cp2_ep4_etp1": dict(tp=2, cp=2, ep=4, etp=1),
    "tp2_pp2_ep2_etp1": dict(tp=2, pp=2, ep=2, etp=1),  # embedding groups = pipeline groups
    "tp2_pp2_pp_not_last": dict(tp=2, pp=2, order="tp-cp-ep-pp-dp"),
    "tp2_ep2_dp_before_ep": dict(tp=2, ep=2, order="tp-cp-dp-ep-pp"),
    # megatron-core 0.19's Generalized Tensor Parallelism (skipped where it has none)
    "tp2_gtp2_pp2": dict(tp=2, gtp_remat=2, pp=2),
    "tp2_gtp2_ep2_egtp2_etp1": dict(tp=2, gtp_remat=2, ep=2, etp=1, expert_gtp_remat=2),
}
GTP_SIZES = ("gtp_remat", "expert_gtp_remat")

# ---------------------------------------------------------------------------------------
# Inside the rank processes (module level: run_ranks pickles functions by reference)
# ---------------------------------------------------------------------------------------






def _standalone(spec: Dict[str, Any]) -> Any:
    import mpu_bridge

    sizes = {k: spec[k] for k in ("tp", "pp", "cp", "ep", "etp", *GTP_SIZES) if k in spec}
    return mpu_bridge.attach(None, order=spec.get("order", DEFAULT_ORDER),
                             agreement_timeout=AGREEMENT_TIMEOUT_S, **sizes)


def _pg_count() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _describe(value: Any) -> Any:
    """A field as plain data: None, a group's global ranks in group-rank order, or a list of those."""
    import torch.distributed as dist

    if value is None:
        return None
    if isinstance(value, list):
        return [_describe(v) for v in value]
    return tuple(dist.get_process_group_ranks(value))


def _sum_of_ranks(group: Any) -> int:
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _fields(pgc: Any) -> Dict[str, Any]:
    """The fields the installed release declares; unset ones None (``vars``: megatron-core
    0.19's ``__getattr__`` answers None for any declared field that was never set)."""
    held = vars(pgc)
    return {f: held.get(f) for f in declared_fields(type(pgc))}


def _one_layout(spec: Dict[str, Any]) -> Dict[str, Any]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    import mpu_bridge

    ps = megatron_parallel_state()
    obs: Dict[str, Any] = {}
    initialize_megatron(ps, **spec)
    reference = _fields(ProcessGroupCollection.use_mpu_process_groups())
    obs["megatron"] = {f: _describe(g) for f, g in reference.items()}

    before = _pg_count()
    bridge = mpu_bridge.attach(ps, agreement_timeout=AGREEMENT_TIMEOUT_S)
    over_mpu = _fields(bridge.process_group_collection())
    again = _fields(bridge.process_group_collection())
    obs["mpu_new_groups"] = _pg_count() - before
    obs["mpu_stats_created"] = bridge.stats()["created"]
    obs["mpu_same_objects"] = {f: over_mpu[f] is reference[f] for f in reference}
    obs["mpu_again_same"] = all(again[f] is over_mpu[f] for f in reference)
    bridge.close()
    ps.destroy_model_parallel()

    standalone = _standalone(spec)
    pgc = standalone.process_group_collection()
    fields = _fields(pgc)
    obs["type"] = type(pgc) is ProcessGroupCollection
    obs["standalone"] = {f: _describe(g) for f, g in fields.items()}
    obs["sums"] = {f: _sum_of_ranks(g) for f, g in fields.items() if g is not None and not isinstance(g, list)}
    before = _pg_count()
    again = _fields(standalone.process_group_collection())
    obs["standalone_again_new_groups"] = _pg_count() - before
    obs["standalone_again_same"] = all(again[f] is fields[f] for f in fields)
    obs["standalone_distinct_groups"] = len({id(g) for g in fields.values() if g is not None})
    obs["standalone_distinct_rank_sets"] = len(
        {tuple(sorted(_describe(g))) for g in fields.values() if g is not None and not isinstance(g, list)}
    )
    obs["all_gather"] = _all_gather_twins(standalone, fields)
    standalone.close()
    return obs


def _all_gather_twins(bridge: Any, plain: Dict[str, Any]) -> Dict[str, Any]:
    """With ``all_gather=True``: each twin's ranks, whether it is a communicator of its own,
    and an all-reduce over it (0.18+; empty where the class has no such fields)."""
    fields = _fields(bridge.process_group_collection(all_gather=True))
    out: Dict[str, Any] = {}
    for field, twin in ALL_GATHER_FIELDS.items():
        if field in fields:
            group = fields[field]
            out[field] = {
                "ranks": _describe(group),
                "twin_ranks": _describe(plain[twin]),
                "own_communicator": group is not None and group is not plain[twin],
                "sum": None if group is None else _sum_of_ranks(group),
                "others_unchanged": all(fields[f] is plain[f] for f in plain if f not in ALL_GATHER_FIELDS),
            }
    return out


def _gpt_step(pgc: Any) -> Tuple[float, List[float]]:
    """One forward + backward of a small tensor-parallel GPTModel (MLP-only layers: megatron-core's
    attention needs CUDA) over ``pgc``; returns the loss and each parameter's gradient norm²."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    local = get_gpt_layer_local_spec()
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=local.submodules.pre_mlp_layernorm,
            mlp=local.submodules.mlp,
            mlp_bda=local.submodules.mlp_bda,
        ),
    )
    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=pgc.tp.size(),
        # the unfused vocab-parallel cross entropy reads parallel_state's globals (megatron-core
        # 0.16.1); the fused one takes pg_collection.tp
        cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native",
    )
    torch.manual_seed(0)
    model = GPTModel(config, layer, vocab_size=32, max_sequence_length=8, pg_collection=pgc)
    data = torch.Generator().manual_seed(1 + pgc.dp.rank())  # other data on each dp replica
    tokens = torch.randint(0, 32, (2, 8), generator=data)
    labels = torch.randint(0, 32, (2, 8), generator=data)
    position = torch.arange(8).unsqueeze(0).expand(2, 8).contiguous()
    loss = model(tokens, position, attention_mask=None, labels=labels).sum()
    loss.backward()
    grads = [float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None]
    return float(loss.detach()), grads


def _consumer() -> Dict[str, Any]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps = megatron_parallel_state()
    initialize_megatron(ps, tp=2)
    reference = _gpt_step(ProcessGroupCollection.use_mpu_process_groups())
    ps.destroy_model_parallel()
    bridge = _standalone(dict(tp=2))
    try:
        ours = _gpt_step(bridge.process_group_collection())
        initialised = ps.model_parallel_is_initialized()
    finally:
        bridge.close()
    return {"reference": reference, "bridge": ours, "parallel_state_initialised": initialised}


def _world(rank: int, world_size: int) -> Dict[str, Any]:
    from dataclasses import fields

    from megatron.core.process_groups_config import ProcessGroupCollection

    obs: Dict[str, Any] = {"class_fields": sorted(f.name for f in fields(ProcessGroupCollection))}
    gtp = supports_gtp(megatron_parallel_state())
    obs["layouts"] = {
        name: _one_layout(spec) for name, spec in LAYOUTS.items() if gtp or not set(GTP_SIZES) & set(spec)
    }
    obs["consumer"] = _consumer()
    return obs


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=240)


def _layout_obs(world: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    if name not in world[0]["layouts"]:
        pytest.skip("this megatron-core has no Generalized Tensor Parallelism (gtp_remat_size)")
    return [obs["layouts"][name] for obs in world]


def test_fields_are_megatron_cores(world: List[Dict[str, Any]]) -> None:
    # every field the installed class declares is one the bridge knows (20 in 0.15-0.17, 27 in 0.19)
    assert set(world[0]["class_fields"]) <= set(FIELDS)
    assert set(FIELD_KINDS) <= set(FIELDS)
    assert FIELD_KINDS["expt_tp"] == "etp" and FIELD_KINDS["tp_ep_pp"] == "etp-ep-pp"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_over_parallel_state_every_field_is_megatrons_object(world: List[Dict[str, Any]], name: str) -> None:
    for rank, got in enumerate(_layout_obs(world, name)):
        assert got["mpu_same_objects"] == {f: True for f in world[rank]["class_fields"]}, f"rank {rank}"
        assert got["mpu_new_groups"] == 0 and got["mpu_stats_created"] == 0, f"rank {rank}"
        assert got["mpu_again_same"], f"rank {rank}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_standalone_equals_megatron_field_by_field(world: List[Dict[str, Any]], name: str) -> None:
    for rank, got in enumerate(_layout_obs(world, name)):
        assert got["type"], f"rank {rank}"
        for field in world[rank]["class_fields"]:
            assert got["standalone"][field] == got["megatron"][field], f"rank {rank}, field {field}"
        for field, total in got["sums"].items():  # membership on the wire
            assert total == sum(got["standalone"][field]), f"rank {rank}, field {field}"
        assert got["standalone_again_same"] and got["standalone_again_new_groups"] == 0, f"rank {rank}"
        # one communicator per distinct rank set
        assert got["standalone_distinct_groups"] == got["standalone_distinct_rank_sets"], f"rank {rank}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_all_gather_twins_are_communicators_of_their_own(world: List[Dict[str, Any]], name: str) -> None:
    # megatron-core >= 0.18: dp_cp_ag / expt_dp_ag hold the ranks of dp_cp / expt_dp in a
    # separate communicator (expt_dp_ag only with experts), and asking for them changes no other field
    if not set(ALL_GATHER_FIELDS) & set(world[0]["class_fields"]):
        pytest.skip("this megatron-core's ProcessGroupCollection has no all-gather fields (< 0.18)")
    ep = LAYOUTS[name].get("ep", 1)
    for rank, got in enumerate(_layout_obs(world, name)):
        twins = got["all_gather"]
        assert twins["dp_cp_ag"]["ranks"] == twins["dp_cp_ag"]["twin_ranks"], f"rank {rank}"
        assert twins["dp_cp_ag"]["own_communicator"] and twins["dp_cp_ag"]["others_unchanged"], f"rank {rank}"
        assert twins["dp_cp_ag"]["sum"] == sum(twins["dp_cp_ag"]["ranks"]), f"rank {rank}"
        if ep == 1:
            assert twins["expt_dp_ag"]["ranks"] is None, f"rank {rank}"
        else:
            assert twins["expt_dp_ag"]["ranks"] == twins["expt_dp_ag"]["twin_ranks"], f"rank {rank}"
            assert twins["expt_dp_ag"]["own_communicator"], f"rank {rank}"
            assert twins["expt_dp_ag"]["sum"] == sum(twins["expt_dp_ag"]["ranks"]), f"rank {rank}"


def _fresh_standalone(rank: int, world_size: int) -> Dict[str, Any]:
    """The standalone collection of tp 2, pp 4 in a fresh world (nothing created before)."""
    bridge = _standalone(LAYOUTS["tp2_pp4"])
    fields = _fields(bridge.process_group_collection())
    sets = {tuple(sorted(_describe(g))) for g in fields.values() if g is not None}
    from torch.distributed import distributed_c10d

    counter = int(distributed_c10d._world.group_count)
    return {"stats": bridge.stats(), "rank_sets": len(sets), "counter": counter}


def test_standalone_collection_creates_member_only_and_leaves_the_group_counters_equal() -> None:
    # pp 4: embedding groups leave the middle stages out, but the members of each group
    # have equal salts, so no batch needs the all-ranks loop. Where creating a member-only
    # group moves PyTorch's group counter on its members alone (torch >= 2.14), the batch of
    # the embedding families (asked for last) ends with every rank moving its counter to one
    # agreed value, so the counters, which name all-ranks groups, stay equal. The world is
    # the default group.
    observed = run_ranks(_fresh_standalone, WORLD_SIZE, timeout=240)
    for rank, got in enumerate(observed):
        assert got["stats"]["fallbacks"] == 0, (rank, got["stats"])
        assert got["stats"]["created"] == got["rank_sets"] - 1, (rank, got)
    assert len({got["counter"] for got in observed}) == 1


def test_standalone_embedding_groups_follow_pipeline_stages(world: List[Dict[str, Any]]) -> None:
    pp4 = [obs["layouts"]["tp2_pp4"]["standalone"] for obs in world]
    assert [s["embd"] for s in pp4] == [(0, 6), (1, 7), None, None, None, None, (0, 6), (1, 7)]
    assert [s["pos_embd"] for s in pp4] == [(0,), (1,), None, None, None, None, None, None]
    assert [s["hcp"] for s in pp4] == [None] * WORLD_SIZE
    assert [s["inter_dist_opt"] for s in pp4] == [None] * WORLD_SIZE
    assert [s["intra_dist_opt"] for s in pp4] == [tuple(range(WORLD_SIZE))] * WORLD_SIZE


def test_gpt_model_over_the_bridge_equals_parallel_state(world: List[Dict[str, Any]]) -> None:
    for rank, obs in enumerate(world):
        got = obs["consumer"]
        assert not got["parallel_state_initialised"], f"rank {rank}"
        loss, grads = got["reference"]
        assert got["bridge"][0] == pytest.approx(loss, rel=1e-6), f"rank {rank}"
        assert got["bridge"][1] == pytest.approx(grads, rel=1e-6), f"rank {rank}"
        assert len(grads) > 5
    # tensor-parallel ranks compute one loss; the dp replicas saw other data
    losses = [obs["consumer"]["bridge"][0] for obs in world]
    assert losses[0] == pytest.approx(losses[1]) and losses[0] != pytest.approx(losses[2])


# -- pure: the families and the version error --------------------------------------------


def test_embedding_families() -> None:
    layout = plan(8, tp=2, pp=2)
    assert partitions.embedding(layout, 5).own == (1, 5)
    assert list(partitions.embedding(layout, 0).groups()) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert partitions.position_embedding(layout, 5).own is None
    assert list(partitions.position_embedding(layout, 0).groups()) == [[0], [1], [2], [3]]
    flat = plan(4)
    assert partitions.embedding(flat, 2).own == (2,) and partitions.position_embedding(flat, 2).own == (2,)
    assert partitions.embedding(flat, 2).covers(4) and partitions.embedding(layout, 0).covers(8)
    assert not partitions.embedding(plan(8, pp=4), 0).covers(8)


def test_release_without_the_class_names_the_first_release() -> None:
    import mpu_bridge.layout as no_such_class

    with pytest.raises(MissingDependencyError) as err:
        collection_class(no_such_class, version="0.14.0")
    message = str(err.value)
    assert "megatron-core 0.14.0 has no" in message and f"first in megatron-core {FIRST_RELEASE}" in message
    assert FIRST_RELEASE == "0.15.0"

