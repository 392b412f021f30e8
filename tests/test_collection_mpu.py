"""``attach(collection)``: megatron-core's ``ProcessGroupCollection`` as the MPU (issue 18 §1).

A trainer on explicit process-group collections has no ``parallel_state`` to hand over.
One spawned world of 8 gloo ranks; each scenario sits next to the assertions that read it:

* **round trip over parallel_state**: ``attach(parallel_state).process_group_collection()``
  -> ``attach(that)``: every dense and expert rank list equals the first bridge's, the
  inferred order is megatron-core's, nothing is created (not for the dense kinds, the
  expert groups, nor the collection exported again), and the exported collection holds
  the very same group objects;
* **round trip from a standalone bridge** (no ``parallel_state`` initialised): the same;
* **what the collection lacks is derived**: other expert sizes, hpZ, the legacy MPU;
* **a collection whose groups form no Megatron layout** is an ``MpuError`` naming the
  field that disagrees.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from _megatron import initialize_megatron, megatron_parallel_state
from _multiproc import run_ranks
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core.process_groups_config"),
    reason="needs megatron-core >= 0.15 (ProcessGroupCollection)",
)

WORLD_SIZE = 8
SIZES = dict(tp=2, pp=2, ep=2, etp=1)
KINDS = ("tp", "pp", "dp", "cp", "dp-cp", "mp", "tp-cp", "tp-dp-cp", "ep", "etp", "edp", "etp-ep", "etp-ep-pp")


def _observe(first: Any, pgc: Any) -> Dict[str, Any]:
    """attach(pgc) beside ``first``: rank lists, order, what was created, objects exported again."""
    import mpu_bridge
    from mpu_bridge.pg_collection import declared_fields

    second = mpu_bridge.attach(pgc, agreement_timeout=60)
    obs: Dict[str, Any] = {"flavour": second.reader.flavour, "order": second.layout.config.order,
                           "first_order": first.layout.config.order}
    obs["ranks"] = {k: (list(first.ranks(k)), list(second.ranks(k))) for k in KINDS}
    again = second.process_group_collection()
    obs["created"] = second.stats()["created"]
    held = vars(pgc)
    obs["same_objects"] = {f: vars(again).get(f) is held.get(f) for f in declared_fields(type(pgc))}
    obs["tp_is_fields"] = second.tensor_parallel().group is pgc.tp
    obs["hpz"] = list(second.zero_param_groups(2).ranks)
    obs["hpz_first"] = list(first.zero_param_groups(2).ranks)
    obs["experts4"] = list(second.expert_groups(4, expert_tensor_parallel=False).expert_parallel.ranks)
    obs["legacy_dp"] = second.as_legacy_mpu().get_data_parallel_world_size()
    second.close()
    return obs


def _broken(pgc: Any) -> str:
    """A collection whose 'dp' holds the pipeline group: no Megatron layout."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    import mpu_bridge

    bad = ProcessGroupCollection(tp=pgc.tp, pp=pgc.pp, dp=pgc.pp, cp=pgc.cp, mp=pgc.mp)
    try:
        mpu_bridge.attach(bad, agreement_timeout=60)
    except mpu_bridge.MpuError as exc:
        return str(exc)
    return ""


def _world(rank: int, world_size: int) -> Dict[str, Any]:
    import mpu_bridge

    ps = megatron_parallel_state()
    initialize_megatron(ps, **SIZES)
    over_ps = mpu_bridge.attach(ps, agreement_timeout=60)
    obs = {"parallel_state": _observe(over_ps, over_ps.process_group_collection())}
    obs["broken"] = _broken(over_ps.process_group_collection())
    over_ps.close()
    ps.destroy_model_parallel()

    standalone = mpu_bridge.attach(None, agreement_timeout=60, **SIZES)
    obs["standalone"] = _observe(standalone, standalone.process_group_collection())
    obs["standalone_parallel_state_initialised"] = ps.model_parallel_is_initialized()
    standalone.close()
    return obs


@pytest.fixture(scope="module")
def world() -> List[Dict[str, Any]]:
    return run_ranks(_world, WORLD_SIZE, timeout=240)


@pytest.mark.parametrize("source", ["parallel_state", "standalone"])
def test_the_round_trip_gives_every_rank_list_back(world, source):
    for rank, obs in enumerate(world):
        got = obs[source]
        assert got["flavour"] == "pg-collection", rank
        assert got["order"] == got["first_order"], rank
        for kind, (first, second) in got["ranks"].items():
            assert second == first, (rank, kind)


@pytest.mark.parametrize("source", ["parallel_state", "standalone"])
def test_the_round_trip_borrows_every_group_and_creates_none(world, source):
    for rank, obs in enumerate(world):
        got = obs[source]
        assert got["created"] == 0, rank
        assert got["tp_is_fields"], rank
        assert got["same_objects"] == {f: True for f in got["same_objects"]}, rank


@pytest.mark.parametrize("source", ["parallel_state", "standalone"])
def test_what_the_collection_lacks_is_derived(world, source):
    for rank, obs in enumerate(world):
        got = obs[source]
        assert got["hpz"] == got["hpz_first"], rank
        assert len(got["experts4"]) == 4 and rank in got["experts4"], rank
        assert got["legacy_dp"] == 2, rank  # tp 2 x pp 2 on 8 ranks


def test_a_collection_that_is_no_layout_names_the_field(world):
    for rank, obs in enumerate(world):
        assert "do not form one Megatron layout" in obs["broken"], (rank, obs["broken"])
        assert "dp = field 'dp'" in obs["broken"], (rank, obs["broken"])


def test_the_standalone_round_trip_needs_no_parallel_state(world):
    assert not any(obs["standalone_parallel_state_initialised"] for obs in world)
