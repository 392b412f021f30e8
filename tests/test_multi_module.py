"""Multi-module trainers: ``multi_module_collection`` from one bridge per module, and
``attach(multi, module=...)`` reading one module back (issue 18, megatron-core >= 0.17).

The world of 6 gloo ranks runs an encoder on ranks 0..1 (tp 1, dp 2) and a language
model on ranks 2..5 (tp 2, pp 2), each a rank span of its own. Every rank builds both
span bridges and the multi-module collection; each then attaches the module it runs.
The scenarios run once per module-scoped fixture; the assertions follow.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from _multiproc import run_ranks
from mpu_bridge.optional import is_available

WORLD = 6
ENCODER = dict(tp=1, local_world_size=2)
LLM = dict(tp=2, pp=2, rank_offset=2, local_world_size=4)


def _has_multi_module() -> bool:
    if not is_available("megatron.core"):
        return False
    from megatron.core import process_groups_config

    return hasattr(process_groups_config, "MultiModuleProcessGroupCollection")


pytestmark = pytest.mark.skipif(
    not _has_multi_module(), reason="this megatron-core has no MultiModuleProcessGroupCollection (< 0.17)"
)


def _ranks_of(group: Any) -> Any:
    import torch.distributed as dist

    return None if group is None else tuple(dist.get_process_group_ranks(group))


def _fields(collection: Any) -> Dict[str, Any]:
    return {k: _ranks_of(v) if not isinstance(v, list) else [_ranks_of(g) for g in v]
            for k, v in vars(collection).items() if v is not None}


def _build_and_read_back(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.errors import MpuError
    from mpu_bridge.multi_module import multi_module_collection

    encoder = mpu_bridge.attach(None, **ENCODER)
    llm = mpu_bridge.attach(None, **LLM)
    multi = multi_module_collection({"encoder": encoder, "llm": llm}, language_model="llm")
    mine = "encoder" if rank < 2 else "llm"
    span_bridge = encoder if mine == "encoder" else llm
    obs: Dict[str, Any] = {
        "modules": sorted(multi.module_pgs), "language_model": multi.language_model_module_name,
        "same_objects": all(getattr(multi.module_pgs[mine], f) is g
                            for f, g in vars(span_bridge.process_group_collection()).items()),
    }
    back = mpu_bridge.attach(multi, module=mine)
    kinds = ["tp", "pp", "dp", "mp", "dp-cp", "tp-dp-cp"]
    obs["ranks_back"] = {k: back.ranks(k) for k in kinds}
    obs["ranks_span"] = {k: span_bridge.ranks(k) for k in kinds}
    obs["offset"] = back.layout.rank_offset
    obs["size"] = back.layout.world_size
    obs["flavour"] = back.reader.flavour
    obs["round_trip"] = _fields(back.process_group_collection()) == _fields(multi.module_pgs[mine])
    obs["created_back"] = back.stats()["created"]
    obs["rounds_back"] = back.stats()["agreements"]
    errors = {}
    for label, call in (("no_module", lambda: mpu_bridge.attach(multi)),
                        ("other_module", lambda: mpu_bridge.attach(multi, module="llm" if mine == "encoder" else
                                                                   "encoder")),
                        ("module_of_no_multi", lambda: mpu_bridge.attach(None, module="llm"))):
        try:
            call()
            errors[label] = None
        except MpuError as exc:
            errors[label] = str(exc)
    obs["errors"] = errors
    back.close()
    encoder.close()
    llm.close()
    return obs


@pytest.fixture(scope="module")
def built() -> List[Dict[str, Any]]:
    return run_ranks(_build_and_read_back, WORLD, timeout=180)


def test_each_rank_gets_the_modules_whose_span_holds_it(built):
    assert [obs["modules"] for obs in built] == [["encoder"]] * 2 + [["llm"]] * 4


def test_the_language_model_is_named_only_on_its_ranks(built):
    assert [obs["language_model"] for obs in built] == [None] * 2 + ["llm"] * 4


def test_each_module_collection_holds_its_span_bridges_own_groups(built):
    assert all(obs["same_objects"] for obs in built)


def test_attaching_one_module_finds_its_span_from_its_groups(built):
    assert [(obs["offset"], obs["size"]) for obs in built] == [(0, 2)] * 2 + [(2, 4)] * 4
    assert [obs["flavour"] for obs in built] == ["pg-collection"] * WORLD


def test_attaching_one_module_gives_the_span_bridges_rank_lists(built):
    for obs in built:
        assert obs["ranks_back"] == obs["ranks_span"]
    assert [obs["ranks_back"]["pp"] for obs in built[2:]] == [(2, 4), (3, 5), (2, 4), (3, 5)]


def test_a_module_read_back_exports_the_same_groups_and_creates_nothing(built):
    assert all(obs["round_trip"] for obs in built)
    assert [obs["created_back"] for obs in built] == [0] * WORLD
    assert [obs["rounds_back"] for obs in built] == [0] * WORLD


def test_attaching_a_multi_module_collection_needs_a_module(built):
    assert all("attach(multi, module=NAME)" in obs["errors"]["no_module"] for obs in built)


def test_attaching_a_module_this_rank_does_not_run_names_the_ones_it_runs(built):
    assert "runs no module 'llm'" in built[0]["errors"]["other_module"]
    assert "holds 'encoder'" in built[0]["errors"]["other_module"]
    assert "runs no module 'encoder'" in built[3]["errors"]["other_module"]


def test_module_is_refused_for_anything_but_a_multi_module_collection(built):
    assert all("drop module=" in obs["errors"]["module_of_no_multi"] for obs in built)


def _every_rank_outside(rank: int, world: int) -> str:
    import mpu_bridge
    from mpu_bridge.errors import BridgeError
    from mpu_bridge.multi_module import multi_module_collection

    llm = mpu_bridge.attach(None, **LLM)  # ranks 0, 1 run no module
    try:
        multi_module_collection({"llm": llm})
        return "ok"
    except BridgeError as exc:
        return str(exc)
    finally:
        llm.close()


def test_a_rank_in_no_module_gets_a_clear_error_and_the_others_their_collection():
    observed = run_ranks(_every_rank_outside, WORLD, timeout=120)
    assert all("runs none of the modules ['llm']" in message for message in observed[:2])
    assert observed[2:] == ["ok"] * 4


def _derive_over_one_module(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge
    from mpu_bridge import _torch
    from mpu_bridge.multi_module import multi_module_collection

    encoder = mpu_bridge.attach(None, **ENCODER)
    llm = mpu_bridge.attach(None, tp=1, rank_offset=2, local_world_size=4)  # dp 4
    multi = multi_module_collection({"encoder": encoder, "llm": llm}, language_model="llm")
    counter = _torch.group_counter()
    obs: Dict[str, Any] = {}
    if rank >= 2:  # only the language model's ranks: the encoder's never build this bridge
        back = mpu_bridge.attach(multi, module="llm", agreement_timeout=30)
        experts = back.expert_groups(2, data_before_expert=True)  # D+E: strided, not held
        obs["strategy"] = back.registry.last_strategy
        obs["ep"] = experts.expert_parallel.ranks
        obs["world"] = back.world().ranks
        obs["sum"] = _sum(experts.expert_parallel.group, rank)
        obs["created"] = back.stats()["created"]
        back.close()
    obs["counter_moved"] = _torch.group_counter() - counter
    everyone = dist.new_group(list(range(world)))  # all-ranks: named alike only if the counters are equal
    obs["everyone"] = _sum(everyone, rank)
    encoder.close()
    llm.close()
    return obs


def _sum(group: Any, rank: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank])
    dist.all_reduce(t, group=group)
    return int(t)


def test_a_module_read_back_derives_what_it_lacks_among_its_own_ranks_only():
    from _torch_rule import member_only_moves_counter

    observed = run_ranks(_derive_over_one_module, WORLD, timeout=180)
    llm = observed[2:]
    # dp 4 on ranks 2..5: DeepSpeed's D+E puts the expert-parallel peers a stride apart
    assert [o["ep"] for o in llm] == [(2, 4), (3, 5), (2, 4), (3, 5)]
    assert [o["sum"] for o in llm] == [6, 8, 6, 8]
    assert [o["world"] for o in llm] == [(2, 3, 4, 5)] * 4
    assert [o["created"] for o in llm] == [2] * 4  # the ep and the edp group, by their members
    expected = "salted" if member_only_moves_counter() else "local_new_group"
    assert [o["strategy"] for o in llm] == [expected] * 4
    # nobody's PyTorch group counter moved, so the all-ranks group after works everywhere
    assert [o["counter_moved"] for o in observed] == [0] * WORLD
    assert [o["everyone"] for o in observed] == [15] * WORLD


def _colocated(rank: int, world: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.multi_module import multi_module_collection

    encoder = mpu_bridge.attach(None, tp=1)  # every rank runs both modules
    llm = mpu_bridge.attach(None, tp=2)
    multi = multi_module_collection({"encoder": encoder, "llm": llm}, language_model="llm")
    back = {name: mpu_bridge.attach(multi, module=name) for name in ("encoder", "llm")}
    obs = {"modules": sorted(multi.module_pgs), "language_model": multi.language_model_module_name,
           "tp": {name: b.tensor_parallel().ranks for name, b in back.items()},
           "created": [b.stats()["created"] for b in back.values()]}
    for bridge in (*back.values(), encoder, llm):
        bridge.close()
    return obs


def test_colocated_modules_are_both_on_every_rank_and_read_back_each_with_its_own_sizes():
    observed = run_ranks(_colocated, WORLD, timeout=180)
    for rank, obs in enumerate(observed):
        assert obs["modules"] == ["encoder", "llm"] and obs["language_model"] == "llm"
        assert obs["tp"] == {"encoder": (rank,), "llm": (rank - rank % 2, rank - rank % 2 + 1)}
        assert obs["created"] == [0, 0]
