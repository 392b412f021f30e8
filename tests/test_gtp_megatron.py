"""megatron-core 0.19's Generalized Tensor Parallelism (GTP) over the bridge, on 8 gloo ranks.

``initialize_model_parallel(tp=2, gtp_remat_size=2)`` puts a ``gtp_remat`` axis right
after ``tp``: model parallel is tp x gtp_remat x pp, the data-parallel *replicate* group
(gradient reduction, ZeRO, hpZ) is what is left, and megatron-core's plain
``get_data_parallel_group()`` now answers the data-*distribution* group (replicate x
gtp_remat). Before GTP support, ``attach(parallel_state)`` refused this MPU
("model-parallel size 4 vs 2"), and the data-parallel group it would have handed to
DeepSpeed was the distribution group ([0, 2, 4, 6] where megatron-core's own collection
uses [0, 4]). Specified here, against megatron-core's own answers on every rank:

* attach reads the MPU and borrows its groups: nothing is created for the dense kinds;
* data parallel (bridge, legacy MPU, DeepSpeed names, hpZ blocks) is the replicate group;
* the GTP kinds (``gtp``, ``gtp-dp``, ``gtp-dp-cp``, ``egtp``, ``egtp-edp``,
  ``etp-ep-egtp-pp``) are megatron-core's own groups;
* a standalone bridge with the same sizes has the same rank lists.

Skipped where the installed megatron-core has no ``gtp_remat_size`` (before 0.19).
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from _megatron import initialize_megatron, megatron_parallel_state, supports_gtp
from _multiproc import run_ranks
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)

WORLD_SIZE = 8
SIZES = dict(tp=2, gtp_remat=2, ep=2, etp=1, expert_gtp_remat=2)
GTP_KINDS = ("gtp", "gtp-dp", "gtp-dp-cp", "egtp", "egtp-edp", "etp-ep-egtp-pp")


def _ranks(group: Any) -> List[int]:
    import torch.distributed as dist

    return sorted(dist.get_process_group_ranks(group))


def _megatron(ps: Any) -> Dict[str, List[int]]:
    """megatron-core's own rank lists, by the bridge's kind names."""
    return {
        "dp": _ranks(ps.get_data_parallel_group(with_gtp_remat=False)),
        "mp": _ranks(ps.get_model_parallel_group()),
        "gtp": sorted(ps.get_gtp_weight_remat_global_ranks()),
        "gtp-dp": _ranks(ps.get_data_parallel_group()),
        "gtp-dp-cp": _ranks(ps.get_data_parallel_group(with_context_parallel=True)),
        "egtp": sorted(ps.get_expert_gtp_weight_remat_global_ranks()),
        "edp": _ranks(ps.get_expert_data_parallel_group(with_gtp_remat=False)),
        "egtp-edp": _ranks(ps.get_expert_data_parallel_group()),
        "etp-ep-egtp-pp": _ranks(ps.get_expert_tensor_model_pipeline_parallel_group(with_egtp_remat=True)),
    }


def _over_megatron(rank: int, world_size: int) -> Dict[str, Any]:
    import mpu_bridge

    ps = megatron_parallel_state()
    if not supports_gtp(ps):
        return {"skipped": True}
    initialize_megatron(ps, **SIZES)
    obs: Dict[str, Any] = {"skipped": False, "megatron": _megatron(ps)}
    bridge = mpu_bridge.attach(ps, agreement_timeout=60)
    obs["bridge"] = {kind: list(bridge.group(kind).ranks) for kind in (*GTP_KINDS, "mp", "edp")}
    obs["dp"] = list(bridge.data_parallel().ranks)
    obs["dp_is_megatrons"] = bridge.data_parallel().group is ps.get_data_parallel_group(with_gtp_remat=False)
    obs["sizes"] = (bridge.layout.config.gtp_remat, bridge.layout.config.expert_gtp_remat, bridge.layout.config.dp)
    obs["created_by_dense_and_gtp"] = bridge.stats()["created"]
    legacy = bridge.as_legacy_mpu()
    obs["legacy_dp"] = _ranks(legacy.get_data_parallel_group())
    obs["legacy_dp_size"] = legacy.get_data_parallel_world_size()
    obs["legacy_mp_size"] = legacy.get_model_parallel_world_size()
    obs["hpz"] = list(bridge.zero_param_groups(2).ranks)
    bridge.close()
    ps.destroy_model_parallel()
    standalone = mpu_bridge.attach(None, agreement_timeout=60, **SIZES)
    obs["standalone"] = {kind: list(standalone.group(kind).ranks) for kind in (*GTP_KINDS, "dp", "mp", "edp")}
    standalone.close()
    return obs


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    observed = run_ranks(_over_megatron, WORLD_SIZE, timeout=240)
    if observed[0]["skipped"]:
        pytest.skip("this megatron-core has no Generalized Tensor Parallelism (gtp_remat_size)")
    return observed


def test_attach_reads_the_gtp_sizes_and_borrows_without_creating(world):
    for rank, obs in enumerate(world):
        assert obs["sizes"] == (2, 2, 2), rank  # gtp_remat, expert_gtp_remat, replicate dp = 8 / (tp·gtp)
        assert obs["created_by_dense_and_gtp"] == 0, rank


def test_data_parallel_is_the_replicate_group_everywhere(world):
    # rank 0: replicate [0, 4], distribution [0, 2, 4, 6] (tp 2, gtp_remat 2 fastest)
    assert world[0]["megatron"]["dp"] == [0, 4] and world[0]["megatron"]["gtp-dp"] == [0, 2, 4, 6]
    for rank, obs in enumerate(world):
        replicate = obs["megatron"]["dp"]
        assert obs["dp"] == replicate and obs["dp_is_megatrons"], rank
        assert obs["legacy_dp"] == replicate and obs["legacy_dp_size"] == 2, rank
        assert obs["legacy_mp_size"] == 4, rank  # DeepSpeed's model parallel: tp x gtp_remat x pp
        assert set(obs["hpz"]) <= set(replicate), rank  # hpZ blocks cut the replicate group


def test_gtp_kinds_are_megatron_cores_groups(world):
    for rank, obs in enumerate(world):
        for kind in (*GTP_KINDS, "mp", "edp"):
            assert obs["bridge"][kind] == obs["megatron"][kind], (rank, kind)


def test_a_standalone_gtp_layout_has_megatron_cores_rank_lists(world):
    for rank, obs in enumerate(world):
        for kind in (*GTP_KINDS, "dp", "mp", "edp"):
            assert obs["standalone"][kind] == obs["megatron"][kind], (rank, kind)
