"""The adapters answer from the bridge's current state, on every call (issue 17).

An adapter that decided its surface once -- when it was made -- goes wrong as soon as
the bridge's state is not the one it saw: a standalone layout with context parallelism
(no MPU reader to ask), or an MPU re-initialised with other sizes. Likewise, what the
bridge installed into DeepSpeed's tables has to follow the bridge's rebuilds.

One spawned world of 4 gloo processes (DeepSpeed on CPU, real megatron-core) runs the
parts below in sequence; each rank returns plain data and the tests read it. A part
that raises is reported with its traceback instead of ending the world.

* **surface**: which ``get_sequence_*`` names the legacy MPU offers, standalone and over
  megatron-core, and when megatron-core is re-initialised under an adapter made before;
* **cp2**: one ZeRO-1 step with context parallelism 2 (tp 1, dp 2) through the legacy
  MPU of megatron-core, of a standalone layout, and of an adapter made before the MPU
  was re-initialised with cp 2: the two context-parallel peers must train alike;
* **install**: :func:`install_expert_groups` / :func:`install_hpz_group` across
  ``destroy_model_parallel()`` + ``initialize_model_parallel()``;
* **groups_module**: ``mpu_bridge.deepspeed_groups``' hpZ state across the same.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Dict, List

import pytest

from _deepspeed_env import DEEPSPEED_RANK_ENV, part_reports, run_parts, start_deepspeed, zero_config
from _megatron import initialize_megatron, megatron_parallel_state
from _multiproc import run_ranks
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not is_available("megatron.core"),
    reason="needs deepspeed and megatron-core (pip install 'mpu-bridge[deepspeed,megatron]')",
)

WORLD_SIZE = 4
CP = 2
DP = WORLD_SIZE // CP  # tp 1
FEATURES = 3
MICRO_BATCH = 2
LEARNING_RATE = 0.1
WORLD_TIMEOUT_S = 360.0
SEQUENCE_NAMES = sorted(
    f"get_{family}_{part}"
    for family in ("sequence_parallel", "sequence_data_parallel")
    for part in ("world_size", "rank", "group", "group_ranks", "src_rank")
)

# ---------------------------------------------------------------------------------------
# The world: every part in sequence on 4 ranks (rank functions at module level: run_ranks
# pickles them by reference)
# ---------------------------------------------------------------------------------------


def _world(rank: int, world_size: int) -> Dict[str, Dict[str, Any]]:
    deepspeed = start_deepspeed()
    parts = (
        ("surface", _surface_part),
        ("cp2", _cp2_part),
        ("install", _install_part),
        ("groups_module", _groups_module_part),
    )
    return run_parts(parts, deepspeed, rank, world_size)


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=WORLD_TIMEOUT_S, env=DEEPSPEED_RANK_ENV)


def _ranks(group: Any) -> List[int]:
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(group))


def _sum_of_ranks(group: Any) -> int:
    import torch
    import torch.distributed as dist

    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


def _outcome(call: Callable[[], Any]) -> Dict[str, Any]:
    """``{"value": ...}``, or ``{"error": type, "message": ...}`` for an exception."""
    try:
        return {"value": call()}
    except Exception as exc:  # the observation is the error itself
        return {"error": type(exc).__name__, "message": str(exc)}


def _reinitialize(ps: Any, **sizes: Any) -> None:
    """What a trainer does to change its layout: destroy megatron-core's groups, initialise again."""
    ps.destroy_model_parallel()
    initialize_megatron(ps, **sizes)


def _sequence_names(legacy: Any) -> List[str]:
    return [name for name in SEQUENCE_NAMES if hasattr(legacy, name)]


# ---------------------------------------------------------------------------------------
# The legacy MPU's surface is the current state's
# ---------------------------------------------------------------------------------------


def _surface_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    import mpu_bridge
    from mpu_bridge.legacy_mpu import legacy_names

    ps = megatron_parallel_state()
    report: Dict[str, Any] = {}

    initialize_megatron(ps, cp=CP)
    over_megatron = mpu_bridge.attach(ps)
    report["megatron_cp2_names"] = legacy_names(over_megatron)
    over_megatron.close()
    ps.destroy_model_parallel()

    standalone = mpu_bridge.attach(None, cp=CP)
    legacy = standalone.as_legacy_mpu()
    report["standalone_cp2_names"] = legacy_names(standalone)
    report["standalone_cp2_sequence_names"] = _sequence_names(legacy)
    report["standalone_cp2_in_dir"] = [name for name in SEQUENCE_NAMES if name in dir(legacy)]
    report["standalone_cp2_sequence_ranks"] = _outcome(lambda: legacy.get_sequence_parallel_group_ranks())
    report["standalone_cp2_sequence_data_ranks"] = _outcome(lambda: legacy.get_sequence_data_parallel_group_ranks())
    report["standalone_cp2_unknown"] = _outcome(lambda: callable(legacy.get_no_such_thing))
    report["standalone_cp2_ulysses"] = hasattr(legacy, "initialize_sequence_parallel")
    standalone.close()

    plain = mpu_bridge.attach(None)
    report["standalone_cp1_sequence_names"] = _sequence_names(plain.as_legacy_mpu())
    plain.close()

    initialize_megatron(ps, cp=1)
    bridge = mpu_bridge.attach(ps)
    made_at_cp1 = bridge.as_legacy_mpu()
    report["made_at_cp1"] = _sequence_names(made_at_cp1)
    _reinitialize(ps, cp=CP)
    report["after_reinit_cp2"] = _sequence_names(made_at_cp1)
    report["after_reinit_cp2_in_dir"] = [name for name in SEQUENCE_NAMES if name in dir(made_at_cp1)]
    report["after_reinit_cp2_sizes"] = _outcome(
        lambda: [made_at_cp1.get_sequence_parallel_world_size(), made_at_cp1.get_sequence_data_parallel_world_size()]
    )
    made_at_cp2 = bridge.as_legacy_mpu()
    report["made_at_cp2"] = _sequence_names(made_at_cp2)
    _reinitialize(ps, cp=1)
    report["after_reinit_cp1"] = _sequence_names(made_at_cp2)
    report["after_reinit_cp1_message"] = _outcome(lambda: callable(made_at_cp2.get_sequence_data_parallel_group))
    bridge.close()
    ps.destroy_model_parallel()
    return report


@pytest.fixture(scope="module")
def surface(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "surface")


def test_a_standalone_layout_with_context_parallelism_offers_the_sequence_getters(surface):
    for report in surface:
        assert report["standalone_cp2_sequence_names"] == SEQUENCE_NAMES
        assert report["standalone_cp2_in_dir"] == SEQUENCE_NAMES


def test_a_standalone_layout_offers_the_same_names_as_megatron_core_with_the_same_sizes(surface):
    for report in surface:
        assert report["standalone_cp2_names"] == report["megatron_cp2_names"]


def test_a_standalone_layouts_sequence_getters_are_its_context_and_data_context_groups(surface):
    # tp 1, cp 2 on 4 ranks: CP [0, 1] [2, 3]; data x context parallel = the world.
    assert [r["standalone_cp2_sequence_ranks"] for r in surface] == [
        {"value": ranks} for ranks in ([0, 1], [0, 1], [2, 3], [2, 3])
    ]
    assert [r["standalone_cp2_sequence_data_ranks"] for r in surface] == [{"value": [0, 1, 2, 3]}] * WORLD_SIZE


def test_without_context_parallelism_the_sequence_getters_are_absent(surface):
    for report in surface:
        assert report["standalone_cp1_sequence_names"] == []
        assert report["made_at_cp1"] == []


def test_a_standalone_layout_invents_no_other_names(surface):
    for report in surface:
        assert report["standalone_cp2_unknown"]["error"] == "AttributeError"
        assert "get_no_such_thing" in report["standalone_cp2_unknown"]["message"]
        assert report["standalone_cp2_ulysses"] is False


def test_an_adapter_made_before_reinitialising_with_cp2_offers_the_sequence_getters(surface):
    for report in surface:
        assert report["after_reinit_cp2"] == SEQUENCE_NAMES
        assert report["after_reinit_cp2_in_dir"] == SEQUENCE_NAMES
        assert report["after_reinit_cp2_sizes"] == {"value": [CP, WORLD_SIZE]}


def test_an_adapter_made_at_cp2_loses_the_sequence_getters_when_the_mpu_goes_back_to_cp1(surface):
    for report in surface:
        assert report["made_at_cp2"] == SEQUENCE_NAMES
        assert report["after_reinit_cp1"] == []
        outcome = report["after_reinit_cp1_message"]
        assert outcome["error"] == "AttributeError"
        assert "now cp=1" in outcome["message"]


# ---------------------------------------------------------------------------------------
# DeepSpeed trains context parallelism alike over every legacy MPU
# ---------------------------------------------------------------------------------------


def _initial_weight() -> Any:
    import torch

    return torch.randn(FEATURES, generator=torch.Generator().manual_seed(77))


def _rank_batch(rank: int) -> Any:
    """This rank's inputs and targets: a different part of the data on every rank (CP peers see
    different chunks of the sequence, DP peers different samples)."""
    import torch

    gen = torch.Generator().manual_seed(500 + rank)
    return torch.randn(MICRO_BATCH, FEATURES, generator=gen), torch.randn(MICRO_BATCH, generator=gen)


def _zero1_step(deepspeed: Any, mpu: Any, rank: int) -> Dict[str, Any]:
    import torch

    weight = _initial_weight()

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight.clone())

        def forward(self, inputs: Any, targets: Any) -> Any:
            return ((inputs @ self.weight - targets) ** 2).mean()

    model = Regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    config = zero_config(1, micro_batch_per_rank=MICRO_BATCH, data_parallel_size=DP)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    loss = engine(*_rank_batch(rank))
    engine.backward(loss)
    engine.step()
    return {
        "weight": model.weight.detach().tolist(),
        "zero_ranks": _ranks(engine.seq_data_parallel_group),
        "sequence_parallel_size": engine.sequence_parallel_size,
    }


def _cp2_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    import mpu_bridge

    ps = megatron_parallel_state()
    report: Dict[str, Any] = {}

    initialize_megatron(ps, cp=CP)
    over_megatron = mpu_bridge.attach(ps)
    report["megatron"] = _zero1_step(deepspeed, over_megatron.as_legacy_mpu(), rank)
    report["cp_ranks"] = list(over_megatron.ranks("sequence_parallel"))
    over_megatron.close()
    ps.destroy_model_parallel()

    standalone = mpu_bridge.attach(None, cp=CP)
    report["standalone"] = _zero1_step(deepspeed, standalone.as_legacy_mpu(), rank)
    standalone.close()

    initialize_megatron(ps, cp=1)
    bridge = mpu_bridge.attach(ps)
    made_at_cp1 = bridge.as_legacy_mpu()
    _reinitialize(ps, cp=CP)
    report["made_before_reinit"] = _zero1_step(deepspeed, made_at_cp1, rank)
    bridge.close()
    ps.destroy_model_parallel()
    return report


@pytest.fixture(scope="module")
def cp2(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "cp2")


def test_megatron_core_context_parallel_peers_train_alike(cp2):
    # The reference: over megatron-core, ZeRO shards and reduces over data x context parallel.
    assert [r["cp_ranks"] for r in cp2] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for report in cp2:
        assert report["megatron"]["zero_ranks"] == [0, 1, 2, 3]
        assert report["megatron"]["weight"] == cp2[0]["megatron"]["weight"]


def test_a_standalone_cp2_layout_reduces_over_data_and_context_parallel_ranks(cp2):
    for report in cp2:
        assert report["standalone"]["zero_ranks"] == [0, 1, 2, 3]
        assert report["standalone"]["sequence_parallel_size"] == CP


def test_a_standalone_cp2_layouts_context_parallel_peers_train_alike(cp2):
    # CP peers [0, 1] and [2, 3] must end with the same weights (every rank does: dp x cp = world).
    for report in cp2:
        assert report["standalone"]["weight"] == cp2[0]["standalone"]["weight"]


def test_a_standalone_cp2_layout_trains_like_megatron_core(cp2):
    import torch

    for report in cp2:
        torch.testing.assert_close(
            torch.tensor(report["standalone"]["weight"]), torch.tensor(report["megatron"]["weight"])
        )


def test_an_adapter_made_before_reinitialising_with_cp2_trains_like_megatron_core(cp2):
    import torch

    for report in cp2:
        assert report["made_before_reinit"]["zero_ranks"] == [0, 1, 2, 3]
        torch.testing.assert_close(
            torch.tensor(report["made_before_reinit"]["weight"]), torch.tensor(report["megatron"]["weight"])
        )


# ---------------------------------------------------------------------------------------
# What the bridge installed into DeepSpeed follows its rebuilds
# ---------------------------------------------------------------------------------------


def _install_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    ps = megatron_parallel_state()
    scenarios = (
        ("reinstall", _reinstall_after_reinit),
        ("uninstall", _uninstall_after_reinit),
        ("other_sizes", _reinstall_with_other_sizes),
        ("another_bridge", _another_bridges_groups),
        ("hpz", _hpz_after_reinit),
    )
    report: Dict[str, Any] = {}
    for name, scenario in scenarios:
        try:
            report[name] = scenario(ps)
        except Exception as exc:  # one scenario's failure is its own test's, not the others'
            report[name] = {"raised": f"{type(exc).__name__}: {exc}"}
            _forget_everything(ps)
    return report


@pytest.fixture(scope="module")
def install(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "install")


def _scenario(install: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    for rank, report in enumerate(install):
        if "raised" in report[name]:
            pytest.fail(f"the {name} scenario raised on rank {rank}: {report[name]['raised']}", pytrace=False)
    return [report[name] for report in install]


def _deepspeed_tables(name: str = "ep_size_2") -> Dict[str, Any]:
    """What DeepSpeed holds under ``name`` now (ranks read from its own tables)."""
    from deepspeed.utils import groups as ds_groups

    return {
        "ep_ranks": ds_groups._EXPERT_PARALLEL_GROUP_RANKS.get(name),
        "edp_ranks": ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS.get(name),
        "names": sorted(ds_groups._EXPERT_PARALLEL_GROUP) + sorted(ds_groups._EXPERT_DATA_PARALLEL_GROUP),
        "etp": ds_groups.expert_tensor_parallel_world_size,
    }


def _forget_everything(ps: Any) -> None:
    """Leave DeepSpeed's tables and megatron-core as a fresh process has them."""
    from deepspeed.utils import groups as ds_groups

    for table in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                  "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        getattr(ds_groups, table).clear()
    ds_groups.expert_tensor_parallel_world_size = 1
    ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _reinstall_after_reinit(ps: Any) -> Dict[str, Any]:
    """install, re-initialise megatron-core with the same sizes, install again."""
    from deepspeed.utils import groups as ds_groups

    import mpu_bridge
    from mpu_bridge.deepspeed_install import install_expert_groups

    initialize_megatron(ps, tp=2)
    bridge = mpu_bridge.attach(ps)
    install_expert_groups(bridge, 2)
    _reinitialize(ps, tp=2)
    again = _outcome(lambda: install_expert_groups(bridge, 2))
    report: Dict[str, Any] = {"error": again.get("message")}
    if "value" in again:
        experts = again["value"]
        held = ds_groups._EXPERT_PARALLEL_GROUP["ep_size_2"]
        report.update(
            deepspeed_holds_rebuilt_groups=held is experts.expert_parallel.group
            and ds_groups._EXPERT_DATA_PARALLEL_GROUP["ep_size_2"] is experts.expert_data_parallel.group,
            bridge_ep_ranks=list(experts.expert_parallel.ranks),
            tables=_deepspeed_tables(),
            sum_over_deepspeeds_group=_sum_of_ranks(held),
        )
    bridge.close()
    _forget_everything(ps)
    return report


def test_install_expert_groups_again_after_reinitialising_installs_the_rebuilt_groups(install):
    reports = _scenario(install, "reinstall")
    for report in reports:
        assert report["error"] is None
        assert report["deepspeed_holds_rebuilt_groups"]
        assert report["tables"]["ep_ranks"] == report["bridge_ep_ranks"]
    # tp 2, ep 2 on 4 ranks (E+M+D): EP [0, 2] [1, 3]; DeepSpeed's group is live and right.
    assert [r["sum_over_deepspeeds_group"] for r in reports] == [2, 4, 2, 4]


def _uninstall_after_reinit(ps: Any) -> Dict[str, Any]:
    """install, re-initialise megatron-core, uninstall without installing again."""
    import mpu_bridge
    from mpu_bridge.deepspeed_install import install_expert_groups, uninstall_expert_groups

    initialize_megatron(ps, tp=2)
    bridge = mpu_bridge.attach(ps)
    install_expert_groups(bridge, 2)
    _reinitialize(ps, tp=2)
    report = {"removed": uninstall_expert_groups(bridge), "tables": _deepspeed_tables()}
    bridge.close()
    _forget_everything(ps)
    return report


def test_uninstall_expert_groups_after_reinitialising_removes_what_was_installed(install):
    for report in _scenario(install, "uninstall"):
        assert report["removed"] == ["ep_size_2"]
        assert report["tables"]["names"] == []


def _reinstall_with_other_sizes(ps: Any) -> Dict[str, Any]:
    """install at tp 2 (expert tensor parallelism 2), re-initialise at tp 1, install again."""
    import mpu_bridge
    from mpu_bridge.deepspeed_install import install_expert_groups, uninstall_expert_groups

    initialize_megatron(ps, tp=2)
    bridge = mpu_bridge.attach(ps)
    install_expert_groups(bridge, 2)
    report: Dict[str, Any] = {"before": _deepspeed_tables()}
    _reinitialize(ps, tp=1)
    report["error"] = _outcome(lambda: install_expert_groups(bridge, 2)).get("message")
    report["after"] = _deepspeed_tables()
    uninstall_expert_groups(bridge)
    bridge.close()
    _forget_everything(ps)
    return report


def test_reinstalled_expert_groups_follow_the_new_layout(install):
    reports = _scenario(install, "other_sizes")
    # Before: tp 2, so E+M+D. After: tp 1, so E+D.
    assert [r["before"]["ep_ranks"] for r in reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    for report in reports:
        assert report["error"] is None
    assert [r["after"]["ep_ranks"] for r in reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["after"]["edp_ranks"] for r in reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_reinstalled_expert_groups_give_deepspeed_the_new_expert_tensor_parallel_size(install):
    reports = _scenario(install, "other_sizes")
    assert [r["before"]["etp"] for r in reports] == [2] * WORLD_SIZE
    assert [r["after"]["etp"] for r in reports] == [1] * WORLD_SIZE  # DeepSpeed's own value, restored


def _another_bridges_groups(ps: Any) -> Dict[str, Any]:
    """A bridge that installed ep_size_2; a second bridge (another layout) asks for the same name."""
    import mpu_bridge
    from mpu_bridge.deepspeed_install import install_expert_groups, uninstall_expert_groups

    first = mpu_bridge.attach(None, tp=2)
    install_expert_groups(first, 2)
    second = mpu_bridge.attach(None)
    report = {"refused": _outcome(lambda: install_expert_groups(second, 2))}
    uninstall_expert_groups(first)
    report["after_uninstall"] = "value" in _outcome(lambda: install_expert_groups(second, 2))
    uninstall_expert_groups(second)
    first.close()
    second.close()
    _forget_everything(ps)
    return report


def test_another_bridges_expert_groups_are_refused_naming_uninstall(install):
    for report in _scenario(install, "another_bridge"):
        refused = report["refused"]
        assert refused["error"] == "BridgeError"
        assert "installed for another bridge" in refused["message"]
        assert "call uninstall_expert_groups" in refused["message"]
        assert report["after_uninstall"]


def _hpz_after_reinit(ps: Any) -> Dict[str, Any]:
    from deepspeed.utils import groups as ds_groups

    import mpu_bridge
    from mpu_bridge.deepspeed_install import install_hpz_group, uninstall_hpz_group

    initialize_megatron(ps, tp=2)
    bridge = mpu_bridge.attach(ps)
    install_hpz_group(bridge, 2)
    _reinitialize(ps, tp=2)
    again = _outcome(lambda: install_hpz_group(bridge, 2))
    report: Dict[str, Any] = {"error": again.get("message")}
    if "value" in again:
        held = ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP
        report["deepspeed_holds_rebuilt_group"] = held is again["value"].group
        report["sum_over_deepspeeds_group"] = _sum_of_ranks(held)
        removed = uninstall_hpz_group(bridge)
        report["uninstalled"] = list(removed.ranks) if removed is not None else None
        report["left"] = ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP is not None
    bridge.close()
    _forget_everything(ps)
    return report


def test_install_hpz_group_again_after_reinitialising_installs_the_rebuilt_group(install):
    reports = _scenario(install, "hpz")
    for report in reports:
        assert report["error"] is None
        assert report["deepspeed_holds_rebuilt_group"]
    # tp 2 on 4 ranks: DP [0, 2] [1, 3], hpZ 2 = the DP group; DeepSpeed's group is live and right.
    assert [r["sum_over_deepspeeds_group"] for r in reports] == [2, 4, 2, 4]


def test_uninstall_hpz_group_removes_the_reinstalled_group(install):
    reports = _scenario(install, "hpz")
    assert [r.get("uninstalled") for r in reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r.get("left") for r in reports] == [False] * WORLD_SIZE


# ---------------------------------------------------------------------------------------
# mpu_bridge.deepspeed_groups answers from the current state
# ---------------------------------------------------------------------------------------


def _groups_module_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    from mpu_bridge import deepspeed_groups as groups

    ps = megatron_parallel_state()
    initialize_megatron(ps, tp=2)
    groups.set_mpu(ps)
    groups._create_zero_param_parallel_group(2)
    report: Dict[str, Any] = {"initialized_before": groups._zero_param_parallel_is_initialized()}
    _reinitialize(ps, tp=2)
    report["initialized_after_reinit"] = groups._zero_param_parallel_is_initialized()
    report["size_after_reinit"] = _outcome(groups._get_zero_param_intra_parallel_group_world_size)
    groups._create_zero_param_parallel_group(2)
    report["created_again"] = {
        "initialized": groups._zero_param_parallel_is_initialized(),
        "ranks": groups._get_zero_param_intra_parallel_group_ranks(),
        "sum": _sum_of_ranks(groups._get_zero_param_intra_parallel_group()),
    }
    groups.reset()
    ps.destroy_model_parallel()
    return report


@pytest.fixture(scope="module")
def groups_module(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "groups_module")


def test_hpz_groups_of_the_groups_module_are_not_initialised_after_reinitialising(groups_module):
    for report in groups_module:
        assert report["initialized_before"] is True
        assert report["initialized_after_reinit"] is False


def test_hpz_getters_after_reinitialising_say_to_create_them_again(groups_module):
    for report in groups_module:
        outcome = report["size_after_reinit"]
        assert outcome["error"] == "BridgeError"
        assert "_create_zero_param_parallel_group" in outcome["message"]


def test_hpz_groups_created_again_after_reinitialising_are_the_rebuilt_bridges(groups_module):
    assert [r["created_again"]["ranks"] for r in groups_module] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["created_again"]["sum"] for r in groups_module] == [2, 4, 2, 4]
    assert all(r["created_again"]["initialized"] for r in groups_module)
