"""DeepSpeed ZeRO-3 with ZeRO++ hpZ over the bridge's hpZ groups (4 gloo processes on CPU).

ZeRO-3 runs on CPU / gloo in DeepSpeed 0.19.8 with torch 2.13, with and without
``zero_hpz_partition_size``. One spawned world (20–40 s on a shared 2-core
machine) runs three parts in sequence; the rank function returns plain data that
the tests below assert on:

* **bridge part**: a standalone bridge with tp=2 (``attach(None, tp=2)``: data
  parallel [0, 2] [1, 3]). :func:`install_hpz_group` installs its hpZ groups of
  2 (blocks of the data-parallel group: [0, 2] [1, 3]; DeepSpeed's own would be
  [0, 1] [2, 3], mixing tensor-parallel ranks) into DeepSpeed. Then three ZeRO-3
  engines with ``zero_hpz_partition_size: 2`` are built one after the other in
  the same process: one by ``deepspeed.initialize`` alone, two whose models are
  built under ``deepspeed.zero.Init(zero_param_parallel_group=...)`` (the
  two-model case of DeepSpeed #4901 / #7066). Each trains two steps equal to a
  float64 plain-torch reference; DeepSpeed's own group creation never runs.
* **smaller-than-dp part**: a standalone bridge with tp=1 (dp 4), hpZ 2: the
  secondary partitions split the data-parallel group ([0, 1] [2, 3]); one
  ``zero.Init`` engine trains equal to plain torch.
* **DeepSpeed-alone part** (negative control, after uninstalling): without the
  bridge, ``zero.Init`` creates DeepSpeed's own world blocks ([0, 1] [2, 3],
  mixing the tp=2 ranks) and an engine over them trains the tensor-parallel
  weight wrong on every rank; a second ``zero.Init`` fails with DeepSpeed's
  assertion, and :func:`install_hpz_group` then refuses to replace DeepSpeed's group.

A part that raises is reported (with its traceback) instead of ending the world.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Dict, List, Tuple

import pytest

import mpu_bridge
from _deepspeed_env import DEEPSPEED_RANK_ENV, part_reports, run_parts, start_deepspeed
from _multiproc import run_ranks
from mpu_bridge.deepspeed_install import install_hpz_group, uninstall_hpz_group
from mpu_bridge.errors import BridgeError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="needs deepspeed (pip install 'mpu-bridge[deepspeed]')",
)

WORLD_SIZE = 4
TP = 2
DP = WORLD_SIZE // TP
HPZ = 2
STEPS = 2
LEARNING_RATE = 0.1
MICRO_BATCH = 2
IN_FEATURES = 3
OUT_FEATURES = 4  # split over the TP ranks: 2 output rows each
WORLD_TIMEOUT_S = 240.0
ENGINES = ("initialize_only", "zero_init_first", "zero_init_second")


# ---------------------------------------------------------------------------
# The problem DeepSpeed and the plain-torch reference both solve
# ---------------------------------------------------------------------------


def _initial_parameters() -> Tuple[Any, Any]:
    """The full column weight ``W`` (out × in) and the replicated vector ``v``."""
    import torch

    gen = torch.Generator().manual_seed(4321)
    return torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen), torch.randn(IN_FEATURES, generator=gen)


def _batch(step: int, dp_rank: int) -> Tuple[Any, Any, Any]:
    """Inputs and targets of one data-parallel rank at one step (same on its TP ranks)."""
    import torch

    gen = torch.Generator().manual_seed(20_000 + 100 * step + dp_rank)
    inputs = torch.randn(MICRO_BATCH, IN_FEATURES, generator=gen)
    return inputs, torch.randn(MICRO_BATCH, OUT_FEATURES, generator=gen), torch.randn(MICRO_BATCH, generator=gen)


def _loss(inputs: Any, column: Any, column_target: Any, shared: Any, shared_target: Any) -> Any:
    column_error = ((inputs @ column.T - column_target) ** 2).sum()
    shared_error = ((inputs @ shared - shared_target) ** 2).sum()
    return (column_error + shared_error) / inputs.shape[0]


def _column_block(tp_rank: int, tp: int = TP) -> slice:
    rows = OUT_FEATURES // tp
    return slice(tp_rank * rows, (tp_rank + 1) * rows)


def _reference_training(dp: int = DP) -> Dict[str, Any]:
    """Plain torch, float64: SGD on the data-parallel mean loss (no clipping)."""
    import torch

    column, shared = (t.double().requires_grad_() for t in _initial_parameters())
    for step in range(STEPS):
        losses = [_loss(*_reference_inputs(step, dp_rank, column, shared)) for dp_rank in range(dp)]
        column.grad = shared.grad = None
        (sum(losses) / dp).backward()
        with torch.no_grad():
            column -= LEARNING_RATE * column.grad
            shared -= LEARNING_RATE * shared.grad
    return {"column": column.detach(), "shared": shared.detach()}


def _reference_inputs(step: int, dp_rank: int, column: Any, shared: Any) -> Tuple[Any, ...]:
    inputs, column_target, shared_target = (t.double() for t in _batch(step, dp_rank))
    return inputs, column, column_target, shared, shared_target


def _zero3_config(hpz: int, dp: int = DP) -> Dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "train_batch_size": MICRO_BATCH * dp,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default would be 1.0
        "zero_allow_untested_optimizer": True,
        # threshold 0: no parameter stays gathered (persistent), so every one gets hpZ partitions
        "zero_optimization": {"stage": 3, "zero_hpz_partition_size": hpz, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------------
# Rank functions (module level: run_ranks pickles them by reference)
# ---------------------------------------------------------------------------


def _sharded_model(tp_rank: int, tp: int = TP) -> Any:
    """This TP rank's model: its block of W's rows (tensor-parallel) and a copy of v."""
    import torch

    column, shared = _initial_parameters()

    class ShardedRegression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.column = torch.nn.Parameter(column[_column_block(tp_rank, tp)].clone())
            self.column.tensor_model_parallel = True
            self.shared = torch.nn.Parameter(shared.clone())

        def forward(self, inputs: Any, column_target: Any, shared_target: Any) -> Any:
            target = column_target[:, _column_block(tp_rank, tp)]
            return _loss(inputs, self.column, target, self.shared, shared_target)

    return ShardedRegression()


def _train_engine(
    deepspeed: Any, bridge: Any, hpz_group: Any, use_zero_init: bool, tp_rank: int, dp_rank: int, model: Any = None
) -> Dict[str, Any]:
    """Two ZeRO-3 hpZ steps of this rank's model (built here, under ``zero.Init`` if asked, unless given)."""
    import torch
    import torch.distributed as dist

    tp, dp = len(bridge.ranks("tensor_parallel")), len(bridge.ranks("data_parallel"))
    config = _zero3_config(HPZ, dp)
    if model is not None:
        pass
    elif use_zero_init:
        with deepspeed.zero.Init(
            config_dict_or_path=config,
            mpu=bridge.as_legacy_mpu(),  # the config's batch sizes count data-parallel ranks
            data_parallel_group=bridge.data_parallel().group,
            zero_param_parallel_group=hpz_group,
        ):
            model = _sharded_model(tp_rank, tp)
    else:
        model = _sharded_model(tp_rank, tp)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=bridge.as_legacy_mpu())
    params = [model.column, model.shared]
    secondary_after_forward = []
    for step in range(STEPS):
        loss = engine(*_batch(step, dp_rank))
        # Released after the forward, parameters get hpZ (secondary) partitions for the
        # backward's all-gather (the step drops them; from step 2 on, DeepSpeed's trace may
        # keep this one module's parameters gathered until the backward instead).
        secondary_after_forward.append(all(p.ds_secondary_tensor is not None for p in params))
        engine.backward(loss)
        engine.step()
    report = {
        "params_use_bridge_hpz_group": all(p.ds_zero_param_process_group is hpz_group for p in params),
        "offload_uses_bridge_hpz_group": engine.optimizer.parameter_offload.zero_param_parallel_group is hpz_group,
        "secondary_group_sizes": [p.ds_secondary_tensor_group_size for p in params],
        "secondary_after_forward": secondary_after_forward,
        "zero_ranks": dist.get_process_group_ranks(engine.seq_data_parallel_group),
    }
    with deepspeed.zero.GatheredParameters(params):
        report["column"] = model.column.detach().clone().tolist()
        report["shared"] = model.shared.detach().clone().tolist()
    return report


def _bridge_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    # Pass-through recorder: counts every time DeepSpeed would create an hpZ group itself.
    created_by_deepspeed: List[int] = []
    real_create = ds_groups._create_zero_param_parallel_group

    def recording_create(group_size: int) -> Any:
        created_by_deepspeed.append(group_size)
        return real_create(group_size)

    bridge = mpu_bridge.attach(None, tp=TP)
    tp_rank = bridge.ranks("tensor_parallel").index(rank)
    dp_rank = bridge.ranks("data_parallel").index(rank)
    hpz = install_hpz_group(bridge, HPZ)
    report: Dict[str, Any] = {
        "tp_rank": tp_rank,
        "dp_rank": dp_rank,
        "dp_ranks": list(bridge.ranks("data_parallel")),
        "hpz_ranks": list(hpz.ranks),
        "installed_again_is_same": install_hpz_group(bridge, HPZ) is hpz,
        "getter_is_bridges": ds_groups._get_zero_param_intra_parallel_group() is hpz.group,
        "getter_ranks": list(ds_groups._get_zero_param_intra_parallel_group_ranks()),
        "getter_world_size": ds_groups._get_zero_param_intra_parallel_group_world_size(),
        "getter_rank": ds_groups._get_zero_param_intra_parallel_rank_in_mygroup(),
    }
    try:
        install_hpz_group(bridge, 1)
        report["size_one_error"] = None
    except BridgeError as exc:
        report["size_one_error"] = str(exc)
    ds_groups._create_zero_param_parallel_group = recording_create
    try:
        for name in ENGINES:
            report[name] = _train_engine(deepspeed, bridge, hpz.group, name != "initialize_only", tp_rank, dp_rank)
    finally:
        ds_groups._create_zero_param_parallel_group = real_create
    report["created_by_deepspeed"] = created_by_deepspeed
    removed = uninstall_hpz_group(bridge)
    report["uninstalled_ranks"] = list(removed.ranks) if removed is not None else None
    report["left_in_deepspeed"] = ds_groups._get_zero_param_intra_parallel_group() is not None
    report["uninstalled_again"] = uninstall_hpz_group(bridge)
    report["bridge_groups_created"] = bridge.stats()["created"]
    bridge.close()
    dist.barrier()
    return report


def _smaller_than_data_parallel_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    """tp 1, dp 4, hpZ 2: secondary partitions of half the data-parallel group, over the bridge's blocks."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    bridge = mpu_bridge.attach(None)
    hpz = install_hpz_group(bridge, HPZ)
    try:
        report = _train_engine(deepspeed, bridge, hpz.group, True, 0, bridge.ranks("data_parallel").index(rank))
        report["hpz_ranks"] = list(hpz.ranks)
        report["getter_ranks"] = dist.get_process_group_ranks(ds_groups._get_zero_param_intra_parallel_group())
        try:
            install_hpz_group(bridge, 2 * HPZ)  # DeepSpeed has one slot: another size must wait
            report["other_size_error"] = None
        except BridgeError as exc:
            report["other_size_error"] = str(exc)
    finally:
        uninstall_hpz_group(bridge)
        bridge.close()
    return report


def _deepspeed_alone_part(deepspeed: Any, rank: int, world_size: int) -> Dict[str, Any]:
    """Without the bridge's group: DeepSpeed's own blocks, its assertion, and the refusal to replace them."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    bridge = mpu_bridge.attach(None, tp=TP)
    tp_rank = bridge.ranks("tensor_parallel").index(rank)
    config = _zero3_config(HPZ)
    init_options = {"config_dict_or_path": config, "mpu": bridge.as_legacy_mpu(),
                    "data_parallel_group": bridge.data_parallel().group}
    report: Dict[str, Any] = {"before": ds_groups._get_zero_param_intra_parallel_group() is None, "tp_rank": tp_rank}
    try:
        with deepspeed.zero.Init(**init_options):
            model = _sharded_model(tp_rank)
        own_group = ds_groups._get_zero_param_intra_parallel_group()
        report["deepspeed_ranks"] = dist.get_process_group_ranks(own_group)
        dp_rank = bridge.ranks("data_parallel").index(rank)
        report["trained_on_deepspeeds_blocks"] = _train_engine(
            deepspeed, bridge, own_group, True, tp_rank, dp_rank, model=model
        )
        try:
            with deepspeed.zero.Init(**init_options):
                _sharded_model(tp_rank)
            report["second_zero_init_error"] = None
        except AssertionError as exc:
            report["second_zero_init_error"] = str(exc)
        try:
            install_hpz_group(bridge, HPZ)
            report["install_error"] = None
        except BridgeError as exc:
            report["install_error"] = str(exc)
        report["uninstall_left_deepspeeds"] = uninstall_hpz_group(bridge) is None and (
            ds_groups._get_zero_param_intra_parallel_group() is not None
        )
    finally:
        ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None  # leave DeepSpeed as this part found it
        bridge.close()
    return report


def _world(rank: int, world_size: int) -> Dict[str, Dict[str, Any]]:
    deepspeed = start_deepspeed()
    parts = (
        ("bridge", _bridge_part),
        ("smaller_than_dp", _smaller_than_data_parallel_part),
        ("deepspeed_alone", _deepspeed_alone_part),
    )
    return run_parts(parts, deepspeed, rank, world_size)


# ---------------------------------------------------------------------------
# Fixtures: one world, shared by the tests that read it
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=WORLD_TIMEOUT_S, env=DEEPSPEED_RANK_ENV)


@pytest.fixture(scope="module")
def bridge_reports(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "bridge")


@pytest.fixture(scope="module")
def smaller_reports(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "smaller_than_dp")


@pytest.fixture(scope="module")
def alone_reports(world: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return part_reports(world, "deepspeed_alone")


# ---------------------------------------------------------------------------
# Bridge part
# ---------------------------------------------------------------------------


def test_hpz_blocks_follow_the_data_parallel_group_under_tp(bridge_reports):
    # tp 2 on 4 ranks: DP [0, 2] [1, 3]; hpZ 2 = blocks of 2 of each DP group.
    assert [r["dp_ranks"] for r in bridge_reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["hpz_ranks"] for r in bridge_reports] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_deepspeeds_getters_return_the_bridges_group(bridge_reports):
    for rank, report in enumerate(bridge_reports):
        assert report["getter_is_bridges"]
        assert report["getter_ranks"] == report["hpz_ranks"]
        assert report["getter_world_size"] == HPZ
        assert report["getter_rank"] == report["hpz_ranks"].index(rank)


def test_installing_twice_returns_the_same_group(bridge_reports):
    assert [r["installed_again_is_same"] for r in bridge_reports] == [True] * WORLD_SIZE


def test_a_partition_size_of_one_is_refused(bridge_reports):
    for report in bridge_reports:
        assert "hpZ partition size 1 switches hpZ off" in report["size_one_error"]


@pytest.mark.parametrize("engine", ENGINES)
def test_every_zero3_engine_partitions_over_the_bridges_groups(bridge_reports, engine):
    for report in bridge_reports:
        result = report[engine]
        assert result["params_use_bridge_hpz_group"]
        assert result["offload_uses_bridge_hpz_group"]
        assert result["secondary_after_forward"][0]
        assert result["secondary_group_sizes"] == [HPZ, HPZ]
        assert result["zero_ranks"] == report["dp_ranks"]


def test_deepspeed_creates_no_hpz_group_of_its_own(bridge_reports):
    # Three engines, two zero.Init contexts: DeepSpeed's creation path never ran.
    assert [r["created_by_deepspeed"] for r in bridge_reports] == [[]] * WORLD_SIZE


@pytest.mark.parametrize("engine", ENGINES)
def test_each_of_three_engines_in_one_process_trains_like_plain_torch(bridge_reports, engine):
    import torch

    reference = _reference_training()
    for report in bridge_reports:
        result = report[engine]
        expected_column = reference["column"][_column_block(report["tp_rank"])]
        torch.testing.assert_close(
            torch.tensor(result["column"], dtype=torch.float64), expected_column, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(result["shared"], dtype=torch.float64), reference["shared"], rtol=1e-5, atol=1e-6
        )


def test_uninstall_removes_exactly_the_bridges_group(bridge_reports):
    for report in bridge_reports:
        assert report["uninstalled_ranks"] == report["hpz_ranks"]
        assert report["left_in_deepspeed"] is False
        assert report["uninstalled_again"] is None


def test_the_hpz_group_is_the_data_parallel_group_when_the_sizes_agree(bridge_reports):
    # hpZ 2 = dp 2: the bridge reuses its data-parallel communicator (one rank set, one
    # group); with model parallel = tensor parallel, 2 groups in all.
    assert [r["bridge_groups_created"] for r in bridge_reports] == [2] * WORLD_SIZE


def test_hpz_smaller_than_data_parallel_trains_like_plain_torch(smaller_reports):
    """tp 1, dp 4, hpZ 2: the secondary partitions really split the data-parallel group."""
    import torch

    assert [r["hpz_ranks"] for r in smaller_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["getter_ranks"] for r in smaller_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    reference = _reference_training(dp=WORLD_SIZE)
    for report in smaller_reports:
        assert report["zero_ranks"] == [0, 1, 2, 3]
        assert report["params_use_bridge_hpz_group"] and report["secondary_after_forward"][0]
        assert report["secondary_group_sizes"] == [HPZ, HPZ]
        torch.testing.assert_close(
            torch.tensor(report["column"], dtype=torch.float64), reference["column"], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(report["shared"], dtype=torch.float64), reference["shared"], rtol=1e-5, atol=1e-6
        )


def test_installing_another_size_while_one_is_installed_is_refused(smaller_reports):
    for report in smaller_reports:
        assert "already holds an hpZ group installed by mpu-bridge" in report["other_size_error"]
        assert "call uninstall_hpz_group" in report["other_size_error"]


# ---------------------------------------------------------------------------
# DeepSpeed alone: its own blocks, its assertion, the bridge's refusal
# ---------------------------------------------------------------------------


def test_deepspeeds_own_hpz_blocks_mix_tensor_parallel_ranks(alone_reports):
    assert all(r["before"] for r in alone_reports)
    assert [r["deepspeed_ranks"] for r in alone_reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_a_second_zero_init_fails_without_the_bridges_group(alone_reports):
    for report in alone_reports:
        assert report["second_zero_init_error"] == "ZeRO parameter intra parallel group is already initialized"


def test_install_refuses_to_replace_a_group_deepspeed_created(alone_reports):
    for report in alone_reports:
        assert "already holds a ZeRO parameter intra parallel (hpZ) group that mpu-bridge did not create" in (
            report["install_error"]
        )
        assert report["uninstall_left_deepspeeds"]


# ---------------------------------------------------------------------------
# install_hpz_group checks DeepSpeed before touching the bridge (no processes)
# ---------------------------------------------------------------------------


def test_install_without_deepspeed_raises_bridge_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", None)  # makes the import fail
    with pytest.raises(BridgeError, match="DeepSpeed is not available"):
        install_hpz_group(bridge=None, partition_size=2)  # type: ignore[arg-type]


def test_install_into_a_deepspeed_without_hpz_names_the_version(monkeypatch):
    from importlib.metadata import version

    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", types.ModuleType("deepspeed.utils.groups"))
    with pytest.raises(BridgeError) as excinfo:
        install_hpz_group(bridge=None, partition_size=2)  # type: ignore[arg-type]
    assert f"DeepSpeed {version('deepspeed')} has no _ZERO_PARAM_INTRA_PARALLEL_GROUP" in str(excinfo.value)


def test_deepspeeds_own_blocks_do_not_train_like_plain_torch_under_tp(alone_reports):
    """Negative control: the same ZeRO-3 hpZ run over DeepSpeed's [0, 1] [2, 3] blocks ends elsewhere."""
    import torch

    reference = _reference_training()
    mismatches = 0
    for report in alone_reports:
        result = report["trained_on_deepspeeds_blocks"]
        expected_column = reference["column"][_column_block(report["tp_rank"])]
        column = torch.tensor(result["column"], dtype=torch.float64)
        mismatches += not torch.allclose(column, expected_column, rtol=1e-4, atol=1e-5)
    assert mismatches == WORLD_SIZE  # every rank's tensor-parallel block is corrupted
