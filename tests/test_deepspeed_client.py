"""DeepSpeed as a real client of the bridge (4 gloo processes on CPU).

One spawned world (imports and start-up take 20–50 s on a shared 2-core
machine; each engine well under one) runs two parts in sequence, and the rank
function returns plain data that the tests below assert on:

* **dense part**: megatron-core's real ``parallel_state`` with tp=2, dp=2. The raw
  module is passed to ``deepspeed.initialize`` (it fails: the reason the bridge
  exists), then ``attach(parallel_state).as_legacy_mpu()`` trains a small model
  with a tensor-parallel weight under ZeRO 1, ZeRO 2, and ZeRO 2 with clipping
  that triggers; a last engine gets an MPU with a wrong model-parallel group, to
  show the clipping case would catch one. Parameters after two steps are
  compared with plain torch on the concatenated data-parallel batch.
* **standalone part**: no megatron-core; ``attach(None, tp=2)`` is a full layout,
  and DeepSpeed ZeRO 1 / 2 / 2 with clipping train through its legacy MPU equal to
  plain torch (issue 11, section 1).
* **MoE part**: a standalone bridge (tp=1) whose ``ep_size_2`` groups are
  installed into DeepSpeed with :func:`install_expert_groups`; a
  ``deepspeed.moe.layer.MoE`` trains one ZeRO-2 step over them.

A part that raises is reported (with its traceback) instead of ending the
world, so the other part's tests still run.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Dict, List, Tuple

import pytest

import mpu_bridge
from _deepspeed_env import DEEPSPEED_RANK_ENV, part_reports, run_parts, start_deepspeed, zero_config
from _multiproc import run_ranks
from mpu_bridge.deepspeed_install import install_expert_groups, uninstall_expert_groups
from mpu_bridge.errors import BridgeError
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not is_available("megatron.core"),
    reason="needs deepspeed and megatron-core (pip install 'mpu-bridge[deepspeed,megatron]')",
)

WORLD_SIZE = 4
TP = 2
DP = WORLD_SIZE // TP
STEPS = 2
LEARNING_RATE = 0.1
MICRO_BATCH = 2
IN_FEATURES = 3
OUT_FEATURES = 4  # split over the TP ranks: 2 output rows each
CLIP = 0.05  # well below the gradient norm of this problem, so clipping triggers
WORLD_TIMEOUT_S = 300.0

# name -> (ZeRO stage, gradient_clipping, model-parallel group deliberately wrong?)
DENSE_CASES: Dict[str, Tuple[int, float, bool]] = {
    "zero1": (1, 0.0, False),
    "zero2": (2, 0.0, False),
    "zero2_clipped": (2, CLIP, False),
    "zero2_clipped_wrong_mp_group": (2, CLIP, True),
}


# ---------------------------------------------------------------------------
# The problem both DeepSpeed and the plain-torch reference solve
# ---------------------------------------------------------------------------


def _initial_parameters() -> Tuple[Any, Any]:
    """The full column weight ``W`` (out × in) and the replicated vector ``v``."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen), torch.randn(IN_FEATURES, generator=gen)


def _batch(step: int, dp_rank: int) -> Tuple[Any, Any, Any]:
    """Inputs and targets of one data-parallel rank at one step (same on its TP ranks)."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + 100 * step + dp_rank)
    inputs = torch.randn(MICRO_BATCH, IN_FEATURES, generator=gen)
    column_target = torch.randn(MICRO_BATCH, OUT_FEATURES, generator=gen)
    shared_target = torch.randn(MICRO_BATCH, generator=gen)
    return inputs, column_target, shared_target


def _loss(inputs: Any, column: Any, column_target: Any, shared: Any, shared_target: Any) -> Any:
    """Squared error of ``x Wᵀ`` (any block of W's rows) plus that of ``x v``, per sample."""
    column_error = ((inputs @ column.T - column_target) ** 2).sum()
    shared_error = ((inputs @ shared - shared_target) ** 2).sum()
    return (column_error + shared_error) / inputs.shape[0]


def _reference_training(clip: float) -> Dict[str, Any]:
    """Plain torch, float64: the data-parallel mean loss, DeepSpeed's clipping rule, SGD.

    DeepSpeed averages gradients over the data-parallel ranks, takes the norm over
    every parameter once (tensor-parallel shards together make ``W``), and scales
    gradients by ``1 / max(1, (norm + 1e-6) / clip)``.
    """
    import torch

    column, shared = (t.double().requires_grad_() for t in _initial_parameters())
    norms = []
    for step in range(STEPS):
        losses = []
        for dp_rank in range(DP):
            inputs, column_target, shared_target = (t.double() for t in _batch(step, dp_rank))
            losses.append(_loss(inputs, column, column_target, shared, shared_target))
        column.grad = shared.grad = None
        (sum(losses) / DP).backward()
        norm = torch.sqrt(column.grad.pow(2).sum() + shared.grad.pow(2).sum()).item()
        norms.append(norm)
        scale = 1.0 / max(1.0, (norm + 1e-6) / clip) if clip > 0 else 1.0
        with torch.no_grad():
            column -= LEARNING_RATE * scale * column.grad
            shared -= LEARNING_RATE * scale * shared.grad
    return {"column": column.detach(), "shared": shared.detach(), "norms": norms}


def _column_block(tp_rank: int) -> slice:
    rows = OUT_FEATURES // TP
    return slice(tp_rank * rows, (tp_rank + 1) * rows)


# ---------------------------------------------------------------------------
# Rank functions (module level: run_ranks pickles them by reference)
# ---------------------------------------------------------------------------


def _sharded_model(tp_rank: int) -> Any:
    """This TP rank's model: its block of W's rows (tensor-parallel) and a copy of v."""
    import torch

    column, shared = _initial_parameters()

    class ShardedRegression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.column = torch.nn.Parameter(column[_column_block(tp_rank)].clone())
            self.column.tensor_model_parallel = True  # DeepSpeed counts its norm on every TP rank
            self.shared = torch.nn.Parameter(shared.clone())

        def forward(self, inputs: Any, column_target: Any, shared_target: Any) -> Any:
            target = column_target[:, _column_block(tp_rank)]
            return _loss(inputs, self.column, target, self.shared, shared_target)

    return ShardedRegression()


class _WrongModelParallelMpu:
    """A legacy MPU whose model-parallel group is the whole world (a deliberate bug)."""

    def __init__(self, legacy: Any, world_group: Any, world_size: int) -> None:
        self._legacy = legacy
        self._world_group = world_group
        self._world_size = world_size

    def get_model_parallel_group(self) -> Any:
        return self._world_group

    def get_model_parallel_world_size(self) -> int:
        return self._world_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._legacy, name)


def _train_dense_case(deepspeed: Any, mpu: Any, stage: int, clip: float, tp_rank: int, dp_rank: int) -> Dict:
    import torch
    import torch.distributed as dist

    model = _sharded_model(tp_rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    config = zero_config(stage, micro_batch_per_rank=MICRO_BATCH, data_parallel_size=DP, gradient_clipping=clip)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    norms = []
    for step in range(STEPS):
        loss = engine(*_batch(step, dp_rank))
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return {
        "column": model.column.detach().tolist(),
        "shared": model.shared.detach().tolist(),
        "norms": norms,
        "dp_world_size": engine.dp_world_size,
        "dp_ranks": dist.get_process_group_ranks(engine.data_parallel_group),
        "zero_ranks": dist.get_process_group_ranks(engine.seq_data_parallel_group),
        "mp_world_size": engine.mp_world_size,
        "zero_mp_ranks": dist.get_process_group_ranks(engine.optimizer.model_parallel_group),
    }


def _dense_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, create_gloo_process_groups=False)
    report: Dict[str, Any] = {
        "megatron_dp_ranks": dist.get_process_group_ranks(parallel_state.get_data_parallel_group()),
        "megatron_mp_ranks": dist.get_process_group_ranks(parallel_state.get_model_parallel_group()),
    }
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    try:
        _train_dense_case(deepspeed, parallel_state, 2, 0.0, tp_rank, dp_rank)
        report["raw_parallel_state_error"] = None
    except AttributeError as exc:
        report["raw_parallel_state_error"] = str(exc)

    bridge = mpu_bridge.attach(parallel_state)
    legacy = bridge.as_legacy_mpu()
    world = bridge.world()
    for name, (stage, clip, wrong_mp_group) in DENSE_CASES.items():
        mpu = _WrongModelParallelMpu(legacy, world.group, world.world_size) if wrong_mp_group else legacy
        report[name] = _train_dense_case(deepspeed, mpu, stage, clip, tp_rank, dp_rank)
    report["tp_rank"], report["dp_rank"] = tp_rank, dp_rank
    report["expert_groups"] = _expert_groups_against_deepspeeds(bridge, legacy)
    bridge.close()
    return report


def _standalone_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    """No megatron-core at all: a standalone bridge with a full layout (tp 2) under DeepSpeed."""
    import torch.distributed as dist

    bridge = mpu_bridge.attach(None, tp=TP)
    legacy = bridge.as_legacy_mpu()
    tp_rank = bridge.ranks("tensor_parallel").index(rank)
    dp_rank = bridge.ranks("data_parallel").index(rank)
    report: Dict[str, Any] = {"tp_rank": tp_rank, "dp_rank": dp_rank}
    for name in ("zero1", "zero2", "zero2_clipped"):
        stage, clip, _ = DENSE_CASES[name]
        report[name] = _train_dense_case(deepspeed, legacy, stage, clip, tp_rank, dp_rank)
    report["tp_ranks"] = dist.get_process_group_ranks(bridge.tensor_parallel().group)
    report["created"] = bridge.stats()["created"]
    bridge.close()
    return report


def _expert_groups_against_deepspeeds(bridge: Any, legacy: Any) -> Dict[str, Any]:
    """DeepSpeed's own E+M+D groups for ep_size 2 over the MPU, then the bridge's installed instead."""
    from deepspeed.utils import groups as ds_groups

    name = "ep_size_2"

    def deepspeeds_tables() -> Dict[str, Any]:
        # The group objects: every DeepSpeed keeps them (the _RANKS tables only since 0.17).
        import torch.distributed as dist

        return {
            "ep": dist.get_process_group_ranks(ds_groups._EXPERT_PARALLEL_GROUP[name]),
            "edp": dist.get_process_group_ranks(ds_groups._EXPERT_DATA_PARALLEL_GROUP[name]),
            "etp": getattr(ds_groups, "expert_tensor_parallel_world_size", 1),
        }

    ds_groups.mpu = legacy  # as deepspeed.initialize(mpu=legacy) leaves it
    ds_groups._create_expert_data_and_model_parallel(2, mpu=legacy)
    created_by_deepspeed = deepspeeds_tables()
    try:
        install_expert_groups(bridge, 2)
        conflict = None
    except BridgeError as exc:
        conflict = str(exc)
    for table in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
    ):
        getattr(ds_groups, table, {}).pop(name, None)
    ds_groups.expert_tensor_parallel_world_size = 1
    experts = install_expert_groups(bridge, 2)
    installed = deepspeeds_tables()
    installed["groups_are_bridges"] = (
        ds_groups._EXPERT_PARALLEL_GROUP[name] is experts.expert_parallel.group
        and ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] is experts.expert_data_parallel.group
    )
    uninstall_expert_groups(bridge)
    return {"created_by_deepspeed": created_by_deepspeed, "installed": installed, "conflict": conflict}


def _train_moe_step(deepspeed: Any, bridge: Any, rank: int, world_size: int) -> Tuple[Any, Any, List]:
    """One ZeRO-2 step of a dense layer followed by DeepSpeed's MoE (2 experts, ep_size 2)."""
    import torch
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)  # every rank builds the same initial model

    class MoeModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = torch.nn.Linear(4, 4)
            self.moe = MoE(4, torch.nn.Linear(4, 4), num_experts=2, ep_size=2, k=1, min_capacity=8, use_rts=False)

        def forward(self, inputs: Any) -> Any:
            output, aux_loss, _ = self.moe(self.dense(inputs))
            return output.pow(2).sum() + aux_loss

    model = MoeModel()
    expert_weight = model.moe.deepspeed_moe.experts.deepspeed_experts[0].weight
    initial_expert = expert_weight.detach().clone().tolist()
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"}
    )
    optimizer = torch.optim.SGD(param_groups, lr=LEARNING_RATE)
    config = zero_config(2, micro_batch_per_rank=8, data_parallel_size=world_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=bridge.as_legacy_mpu())
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
    loss = engine(inputs)
    engine.backward(loss)
    engine.step()
    return model, engine, initial_expert


def _moe_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    import deepspeed.comm as ds_comm
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    bridge = mpu_bridge.attach()
    experts = install_expert_groups(bridge, 2)
    installed_again = install_expert_groups(bridge, 2)

    # Record the group of every all-to-all DeepSpeed's MoE runs (and run it unchanged).
    all_to_all_groups: List[Any] = []
    real_all_to_all = ds_comm.all_to_all_single

    def recording_all_to_all(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        all_to_all_groups.append(dist.get_process_group_ranks(group) if group is not None else "world")
        return real_all_to_all(*args, **kwargs)

    ds_comm.all_to_all_single = recording_all_to_all
    try:
        model, engine, initial_expert = _train_moe_step(deepspeed, bridge, rank, world_size)
    finally:
        ds_comm.all_to_all_single = real_all_to_all
    expert_weight = model.moe.deepspeed_moe.experts.deepspeed_experts[0].weight

    name = "ep_size_2"
    report = {
        "installed_again_is_same": installed_again is experts,
        "ep_ranks": list(experts.expert_parallel.ranks),
        "edp_ranks": list(experts.expert_data_parallel.ranks),
        "moe_uses_bridge_ep_group": model.moe.deepspeed_moe.ep_group is experts.expert_parallel.group,
        "deepspeed_ep_group_is_bridge": ds_groups._get_expert_parallel_group(name) is experts.expert_parallel.group,
        "deepspeed_edp_group_is_bridge": ds_groups._get_expert_data_parallel_group(name)
        is experts.expert_data_parallel.group,
        # what DeepSpeed's own getters report (the *_ranks getters exist since 0.17)
        "deepspeed_ep_ranks": dist.get_process_group_ranks(ds_groups._get_expert_parallel_group(name)),
        "deepspeed_edp_ranks": dist.get_process_group_ranks(ds_groups._get_expert_data_parallel_group(name)),
        "engine_edp_group_is_bridge": engine.expert_data_parallel_group[name] is experts.expert_data_parallel.group,
        "all_to_all_groups": all_to_all_groups,
        "initial_expert": initial_expert,
        "expert": expert_weight.detach().tolist(),
        "dense": model.dense.weight.detach().tolist(),
        "uninstalled": uninstall_expert_groups(bridge),
        "left_in_deepspeed": sorted(ds_groups._EXPERT_PARALLEL_GROUP) + sorted(ds_groups._EXPERT_DATA_PARALLEL_GROUP),
    }
    bridge.close()
    return report


def _world(rank: int, world_size: int) -> Dict[str, Dict[str, Any]]:
    """Both parts on one rank, in sequence; a part that raises is reported, not re-raised."""
    import torch.distributed as dist

    torch_world = dist.group.WORLD
    deepspeed = start_deepspeed()
    import deepspeed.comm as ds_comm

    reports: Dict[str, Dict[str, Any]] = {
        "setup": {
            "deepspeed_kept_torch_world": dist.group.WORLD is torch_world,
            "deepspeed_world_size": ds_comm.get_world_size(),
        }
    }
    parts = (("dense", _dense_part), ("moe", _moe_part), ("standalone", _standalone_part))
    reports.update(run_parts(parts, deepspeed, rank, world_size))
    return reports


# ---------------------------------------------------------------------------
# Fixtures: one world, shared by the tests that read it
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=WORLD_TIMEOUT_S, env=DEEPSPEED_RANK_ENV)


@pytest.fixture(scope="module")
def dense_reports(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "dense")


@pytest.fixture(scope="module")
def moe_reports(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "moe")


@pytest.fixture(scope="module")
def standalone_reports(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "standalone")


def _assert_matches_reference(reports: List[Dict[str, Any]], case: str, clip: float) -> None:
    import torch

    reference = _reference_training(clip)
    for report in reports:
        result = report[case]
        column = torch.tensor(result["column"], dtype=torch.float64)
        expected_column = reference["column"][_column_block(report["tp_rank"])]
        torch.testing.assert_close(column, expected_column, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            torch.tensor(result["shared"], dtype=torch.float64), reference["shared"], rtol=1e-5, atol=1e-6
        )
        assert result["norms"] == pytest.approx(reference["norms"], rel=1e-5)


# ---------------------------------------------------------------------------
# Dense part: megatron-core + DeepSpeed ZeRO through the bridge
# ---------------------------------------------------------------------------


def test_raw_megatron_core_parallel_state_is_rejected_by_deepspeed(dense_reports):
    for report in dense_reports:
        assert "get_model_parallel_world_size" in report["raw_parallel_state_error"]


def test_deepspeed_reuses_the_existing_torch_process_group(world):
    assert [r["setup"]["deepspeed_kept_torch_world"] for r in world] == [True] * WORLD_SIZE
    assert [r["setup"]["deepspeed_world_size"] for r in world] == [WORLD_SIZE] * WORLD_SIZE


def test_megatron_core_groups_are_as_expected(dense_reports):
    assert [r["megatron_dp_ranks"] for r in dense_reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["megatron_mp_ranks"] for r in dense_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero2_clipped"])
def test_deepspeed_data_parallel_group_is_megatron_cores(dense_reports, case):
    for report in dense_reports:
        assert report[case]["dp_world_size"] == DP
        assert report[case]["dp_ranks"] == report["megatron_dp_ranks"]
        assert report[case]["zero_ranks"] == report["megatron_dp_ranks"]


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero2_clipped"])
def test_deepspeed_model_parallel_group_is_megatron_cores(dense_reports, case):
    for report in dense_reports:
        assert report[case]["mp_world_size"] == TP
        assert report[case]["zero_mp_ranks"] == report["megatron_mp_ranks"]


def test_zero1_steps_match_plain_torch(dense_reports):
    _assert_matches_reference(dense_reports, "zero1", clip=0.0)


def test_zero2_steps_match_plain_torch(dense_reports):
    _assert_matches_reference(dense_reports, "zero2", clip=0.0)


def test_zero2_with_triggered_clipping_matches_plain_torch(dense_reports):
    assert min(_reference_training(CLIP)["norms"]) > 10 * CLIP  # clipping really acts
    _assert_matches_reference(dense_reports, "zero2_clipped", clip=CLIP)


def test_clipped_case_would_expose_a_wrong_model_parallel_group(dense_reports):
    """Negative control: the same run with the world as model-parallel group ends elsewhere."""
    import torch

    reference = _reference_training(CLIP)
    for report in dense_reports:
        result = report["zero2_clipped_wrong_mp_group"]
        assert result["norms"][0] == pytest.approx(reference["norms"][0] * 2**0.5, rel=1e-5)
        assert not torch.allclose(
            torch.tensor(result["shared"], dtype=torch.float64), reference["shared"], rtol=1e-4, atol=1e-5
        )


def test_installed_expert_groups_equal_deepspeeds_own_for_megatron_tp2(dense_reports):
    """E+M+D (expert tensor parallelism = TP = 2): same lists as DeepSpeed builds from the MPU."""
    expected = [
        {"ep": [0, 2], "edp": [0], "etp": 2},
        {"ep": [1, 3], "edp": [1], "etp": 2},
        {"ep": [0, 2], "edp": [2], "etp": 2},
        {"ep": [1, 3], "edp": [3], "etp": 2},
    ]
    assert [r["expert_groups"]["created_by_deepspeed"] for r in dense_reports] == expected
    assert [r["expert_groups"]["installed"] for r in dense_reports] == [
        dict(groups, groups_are_bridges=True) for groups in expected
    ]


def test_install_refuses_to_replace_expert_groups_deepspeed_created(dense_reports):
    for report in dense_reports:
        assert "DeepSpeed already holds expert groups named 'ep_size_2'" in report["expert_groups"]["conflict"]


# ---------------------------------------------------------------------------
# MoE part: DeepSpeed's MoE layer over the bridge's expert groups
# ---------------------------------------------------------------------------


def test_installed_expert_groups_follow_deepspeeds_e_plus_d_layout(moe_reports):
    assert [r["ep_ranks"] for r in moe_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["edp_ranks"] for r in moe_reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_deepspeed_tables_hold_the_bridges_groups(moe_reports):
    for report in moe_reports:
        assert report["deepspeed_ep_group_is_bridge"]
        assert report["deepspeed_edp_group_is_bridge"]
        assert report["deepspeed_ep_ranks"] == report["ep_ranks"]
        assert report["deepspeed_edp_ranks"] == report["edp_ranks"]


def test_installing_twice_returns_the_same_groups(moe_reports):
    assert [r["installed_again_is_same"] for r in moe_reports] == [True] * WORLD_SIZE


def test_moe_layer_and_engine_use_the_bridges_groups(moe_reports):
    for report in moe_reports:
        assert report["moe_uses_bridge_ep_group"]
        assert report["engine_edp_group_is_bridge"]


def test_moe_all_to_all_runs_over_the_bridges_expert_parallel_group(moe_reports):
    for report in moe_reports:
        assert report["all_to_all_groups"], "the MoE forward/backward ran no all-to-all"
        assert all(ranks == report["ep_ranks"] for ranks in report["all_to_all_groups"])


def test_expert_weights_after_a_step_are_shared_within_edp_and_differ_across_ep(moe_reports):
    r0, r1, r2, r3 = moe_reports
    assert r0["initial_expert"] == r1["initial_expert"]  # same start, so a difference comes from training
    assert r0["expert"] != r0["initial_expert"]
    assert r0["expert"] == r2["expert"] and r1["expert"] == r3["expert"]  # EDP groups [0, 2], [1, 3]
    assert r0["expert"] != r1["expert"]  # EP peers hold different experts


def test_dense_weights_stay_identical_on_every_rank(moe_reports):
    assert all(r["dense"] == moe_reports[0]["dense"] for r in moe_reports)


def test_uninstall_removes_exactly_the_bridges_entries(moe_reports):
    for report in moe_reports:
        assert report["uninstalled"] == ["ep_size_2"]
        assert report["left_in_deepspeed"] == []


# ---------------------------------------------------------------------------
# install_expert_groups checks DeepSpeed before touching the bridge (no processes)
# ---------------------------------------------------------------------------


def test_install_without_deepspeed_raises_bridge_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", None)  # makes the import fail
    with pytest.raises(BridgeError, match="DeepSpeed is not available"):
        install_expert_groups(bridge=None, ep_size=2)  # type: ignore[arg-type]


def test_install_with_tables_elsewhere_names_the_version_and_tables(monkeypatch):
    from importlib.metadata import version

    relocated = types.ModuleType("deepspeed.utils.groups")
    relocated._EXPERT_PARALLEL_GROUP = {}  # the expert-data table is missing
    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", relocated)
    with pytest.raises(BridgeError) as excinfo:
        install_expert_groups(bridge=None, ep_size=2)  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert f"DeepSpeed {version('deepspeed')}" in message
    assert "tables _EXPERT_DATA_PARALLEL_GROUP in" in message


def _install_into_group_tables_only(rank: int, world_size: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge

    old_style = types.ModuleType("deepspeed.utils.groups")  # DeepSpeed < 0.17: no _RANKS tables
    old_style._EXPERT_PARALLEL_GROUP = {}
    old_style._EXPERT_DATA_PARALLEL_GROUP = {}
    sys.modules["deepspeed.utils.groups"] = old_style
    bridge = mpu_bridge.attach(None)
    experts = install_expert_groups(bridge, 2)
    installed = {
        "ep": dist.get_process_group_ranks(old_style._EXPERT_PARALLEL_GROUP["ep_size_2"]),
        "edp": dist.get_process_group_ranks(old_style._EXPERT_DATA_PARALLEL_GROUP["ep_size_2"]),
        "same": old_style._EXPERT_PARALLEL_GROUP["ep_size_2"] is experts.expert_parallel.group,
        "no_rank_tables": not hasattr(old_style, "_EXPERT_PARALLEL_GROUP_RANKS"),
    }
    installed["removed"] = uninstall_expert_groups(bridge)
    installed["left"] = dict(old_style._EXPERT_PARALLEL_GROUP)
    bridge.close()
    return installed


def test_install_into_a_deepspeed_without_rank_tables_fills_the_group_tables():
    # DeepSpeed 0.14-0.16 keep only _EXPERT_PARALLEL_GROUP / _EXPERT_DATA_PARALLEL_GROUP.
    results = run_ranks(_install_into_group_tables_only, 4, timeout=WORLD_TIMEOUT_S)
    assert [r["ep"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["edp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["same"] and r["no_rank_tables"] for r in results)
    assert all(r["removed"] == ["ep_size_2"] and r["left"] == {} for r in results)


# ---------------------------------------------------------------------------
# Standalone part: a full layout without megatron-core, DeepSpeed over its legacy MPU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["zero1", "zero2", "zero2_clipped"])
def test_a_standalone_tp2_layout_trains_like_plain_torch(standalone_reports, case):
    _assert_matches_reference(standalone_reports, case, DENSE_CASES[case][1])


def test_a_standalone_layout_gives_deepspeed_its_groups(standalone_reports):
    # tp 2 on 4 ranks, default order: TP [0, 1] [2, 3], DP [0, 2] [1, 3], MP (tp x pp) = TP.
    assert [r["tp_ranks"] for r in standalone_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for r in standalone_reports:
        assert r["zero2"]["dp_ranks"] == r["zero2"]["zero_ranks"]
    assert [r["zero2"]["dp_ranks"] for r in standalone_reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["zero2"]["zero_mp_ranks"] for r in standalone_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_a_standalone_layout_creates_one_group_per_rank_set_it_needs(standalone_reports):
    # data parallel, model parallel (= the tp rank set) and tensor parallel (reused): 2 groups.
    assert [r["created"] for r in standalone_reports] == [2, 2, 2, 2]
