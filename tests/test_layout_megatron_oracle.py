"""The layout engine against megatron-core itself.

Two oracles, both the real ``megatron.core.parallel_state``:

* ``RankGenerator`` (pure functions, in this process): for a few hundred valid
  configurations covering all 120 orders of the five tokens and orders that
  leave tokens out, every kind's rank lists must equal megatron-core's exactly
  (same groups, same enumeration order), and ``group_of`` / ``group_index`` /
  ``rank_in_group`` must agree for every rank.
* ``initialize_model_parallel`` (in a subprocess, on PyTorch's ``fake``
  backend, one simulated rank per configuration): over the same sweep plus
  invalid candidates, megatron-core must reject exactly the configurations
  ``plan()`` rejects, and the groups it builds for that rank must equal
  ``group_of``.

The sweep is deterministic: candidates are drawn from a ``random.Random``
seeded by the order string.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

from mpu_bridge import LayoutError, plan

parallel_state = pytest.importorskip("megatron.core.parallel_state")
RankGenerator = parallel_state.RankGenerator

REPO_ROOT = Path(__file__).resolve().parents[1]

#: kind -> (which megatron-core generator, its token), as initialize_model_parallel uses them
MEGATRON_TOKEN: Dict[str, Tuple[str, str]] = {
    "tp": ("dense", "tp"),
    "cp": ("dense", "cp"),
    "dp": ("dense", "dp"),
    "pp": ("dense", "pp"),
    "dp-cp": ("dense", "dp-cp"),
    "tp-cp": ("dense", "tp-cp"),
    "tp-dp": ("dense", "tp-dp"),
    "tp-dp-cp": ("dense", "tp-dp-cp"),
    "mp": ("dense", "tp-pp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "edp": ("expert", "dp"),
    "etp-ep": ("expert", "tp-ep"),
    "etp-ep-pp": ("expert", "tp-ep-pp"),
}

TOKENS = ("tp", "cp", "ep", "dp", "pp")
PERMUTATION_ORDERS = ["-".join(p) for p in itertools.permutations(TOKENS)]
MISSING_TOKEN_ORDERS = [
    "tp-dp-pp",
    "tp-pp-dp",
    "tp-cp-dp-pp",
    "tp-ep-dp-pp",
    "tp-dp-ep-pp",
    "tp-cp-ep-dp",
    "cp-ep-dp-pp",
    "ep-dp-pp",
    "ep-tp-pp-dp",
    "tp-ep-pp",
    "tp-cp-ep-pp",
    "dp-pp",
    "pp-dp",
    "tp-dp",
    "dp",
]
ORDERS = PERMUTATION_ORDERS + MISSING_TOKEN_ORDERS
VALID_PER_ORDER = 4
INVALID_PER_ORDER = 3
MAX_DRAWS_PER_ORDER = 4000


class Candidate(NamedTuple):
    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: Optional[int]
    order: str

    @property
    def id(self) -> str:
        etp = "" if self.etp is None else f" etp{self.etp}"
        return (
            f"{self.world} ranks tp{self.tp} pp{self.pp} cp{self.cp} ep{self.ep}{etp} "
            f"{self.order}"
        )


def plan_of(candidate: Candidate):
    return plan(
        candidate.world,
        tp=candidate.tp,
        pp=candidate.pp,
        cp=candidate.cp,
        ep=candidate.ep,
        etp=candidate.etp,
        order=candidate.order,
    )


def plan_accepts(candidate: Candidate) -> bool:
    try:
        plan_of(candidate)
    except LayoutError:
        return False
    return True


def _draw(rng: random.Random, order: str) -> Candidate:
    """One candidate; sizes of tokens the order leaves out are usually 1."""
    present = set(order.split("-"))

    def size(token: str, menu: Tuple[int, ...]) -> int:
        if token not in present and rng.random() < 0.85:
            return 1
        return rng.choice(menu)

    tp = size("tp", (1, 2, 4))
    cp = size("cp", (1, 2))
    pp = size("pp", (1, 2, 3, 4))
    ep = size("ep", (1, 2, 4))
    etp = None if "tp" not in present and rng.random() < 0.85 else rng.choice((None, 1, 2, 4))
    data = size("dp", (1, 2, 3, 4))
    world = tp * cp * pp * data
    if rng.random() < 0.15:  # a world that need not divide by tp·pp·cp
        world = rng.choice((6, 8, 12, 16, 24, 32, 48, 64))
    return Candidate(world, tp, pp, cp, ep, etp, order)


def _sweep(order: str) -> Tuple[List[Candidate], List[Candidate]]:
    rng = random.Random(order)
    valid: List[Candidate] = []
    invalid: List[Candidate] = []
    for _ in range(MAX_DRAWS_PER_ORDER):
        if len(valid) >= VALID_PER_ORDER and len(invalid) >= INVALID_PER_ORDER:
            break
        candidate = _draw(rng, order)
        if candidate in valid or candidate in invalid:
            continue
        if plan_accepts(candidate):
            if len(valid) < VALID_PER_ORDER:
                valid.append(candidate)
        elif len(invalid) < INVALID_PER_ORDER:
            invalid.append(candidate)
    return valid, invalid


#: order -> (valid candidates, invalid candidates), by plan()'s verdict
SWEEP: Dict[str, Tuple[List[Candidate], List[Candidate]]] = {o: _sweep(o) for o in ORDERS}
VALID = [c for order in ORDERS for c in SWEEP[order][0]]
ALL_CANDIDATES = [c for order in ORDERS for c in SWEEP[order][0] + SWEEP[order][1]]


def megatron_generators(candidate: Candidate):
    """megatron-core's two generators, built as initialize_model_parallel builds them."""
    dp = candidate.world // (candidate.tp * candidate.pp * candidate.cp)
    etp = candidate.tp if candidate.etp is None else candidate.etp
    edp = candidate.world // (etp * candidate.ep * candidate.pp)
    dense = RankGenerator(
        tp=candidate.tp, ep=1, dp=dp, pp=candidate.pp, cp=candidate.cp, order=candidate.order
    )
    expert = RankGenerator(
        tp=etp, ep=candidate.ep, dp=edp, pp=candidate.pp, cp=1, order=candidate.order
    )
    return {"dense": dense, "expert": expert}


# -- the sweep itself ------------------------------------------------------------


def test_sweep_covers_every_permutation_with_valid_configurations():
    assert len(VALID) >= 300
    covered = {c.order for c in VALID}
    assert set(PERMUTATION_ORDERS) <= covered
    assert all(len(SWEEP[order][0]) == VALID_PER_ORDER for order in PERMUTATION_ORDERS)


def test_sweep_covers_orders_with_missing_tokens():
    for order in MISSING_TOKEN_ORDERS:
        assert SWEEP[order][0], f"no valid configuration drawn for order {order!r}"


def test_sweep_exercises_every_dimension_and_the_hard_cases():
    assert any(c.cp > 1 and c.ep > 1 for c in VALID)
    assert any(c.etp is not None and c.etp != c.tp for c in VALID)
    assert any(c.pp > 1 and not c.order.endswith("pp") for c in VALID)
    assert max(c.world for c in VALID) >= 64
    assert len(ALL_CANDIDATES) - len(VALID) >= 300


# -- RankGenerator -----------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_every_kind_equals_megatron_rank_generator(order):
    for candidate in SWEEP[order][0]:
        layout = plan_of(candidate)
        generators = megatron_generators(candidate)
        for kind, (grid, token) in MEGATRON_TOKEN.items():
            expected = generators[grid].get_ranks(token)
            assert layout.groups(kind) == expected, (candidate.id, kind)


@pytest.mark.parametrize("order", ORDERS)
def test_group_of_every_rank_equals_megatron_rank_generator(order):
    for candidate in SWEEP[order][0]:
        layout = plan_of(candidate)
        generators = megatron_generators(candidate)
        for kind, (grid, token) in MEGATRON_TOKEN.items():
            for index, group in enumerate(generators[grid].get_ranks(token)):
                for position, rank in enumerate(group):
                    where = (candidate.id, kind, rank)
                    assert layout.group_of(kind, rank) == group, where
                    assert layout.group_index(kind, rank) == index, where
                    assert layout.rank_in_group(kind, rank) == position, where


def _has_rank_offset() -> bool:
    import inspect

    return "rank_offset" in inspect.signature(RankGenerator).parameters


@pytest.mark.skipif(not _has_rank_offset(), reason="this megatron-core's RankGenerator has no rank_offset (< 0.17)")
@pytest.mark.parametrize("order", PERMUTATION_ORDERS[::7] + MISSING_TOKEN_ORDERS[::3])
def test_every_kind_of_a_rank_span_equals_megatron_rank_generator_with_rank_offset(order):
    # megatron-core 0.17's initialize_model_parallel(rank_offset=, local_world_size=): both
    # generators take the offset; the layout's world is the span
    for candidate in SWEEP[order][0]:
        offset = 3 + len(candidate.order)
        layout = plan_of(candidate)
        c = layout.config
        span = plan(c.world_size, tp=c.tp, pp=c.pp, cp=c.cp, ep=c.ep, etp=c.etp, order=c.order,
                    rank_offset=offset)
        dp, edp = c.dp, c.edp
        generators = {
            "dense": RankGenerator(tp=c.tp, ep=1, dp=dp, pp=c.pp, cp=c.cp, order=c.order, rank_offset=offset),
            "expert": RankGenerator(tp=c.etp, ep=c.ep, dp=edp, pp=c.pp, cp=1, order=c.order, rank_offset=offset),
        }
        for kind, (grid, token) in MEGATRON_TOKEN.items():
            assert span.groups(kind) == generators[grid].get_ranks(token), (candidate.id, offset, kind)


# -- initialize_model_parallel --------------------------------------------------------

_INITIALIZE_WORKER = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from megatron.core import parallel_state as ps

GETTERS = {
    "tp": (ps.get_tensor_model_parallel_group, {}),
    "cp": (ps.get_context_parallel_group, {}),
    "dp": (ps.get_data_parallel_group, {"with_context_parallel": False}),
    "pp": (ps.get_pipeline_model_parallel_group, {}),
    "dp-cp": (ps.get_data_parallel_group, {"with_context_parallel": True}),
    "tp-cp": (ps.get_tensor_and_context_parallel_group, {}),
    "tp-dp": (ps.get_tensor_and_data_parallel_group, {"with_context_parallel": False}),
    "tp-dp-cp": (ps.get_tensor_and_data_parallel_group, {"with_context_parallel": True}),
    "mp": (ps.get_model_parallel_group, {}),
    "ep": (ps.get_expert_model_parallel_group, {}),
    "etp": (ps.get_expert_tensor_parallel_group, {}),
    "edp": (ps.get_expert_data_parallel_group, {}),
    "etp-ep": (ps.get_expert_tensor_and_model_parallel_group, {}),
    "etp-ep-pp": (ps.get_expert_tensor_model_pipeline_parallel_group, {}),
}


def verdict(c):
    dist.init_process_group("fake", store=FakeStore(), rank=c["rank"], world_size=c["world"])
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=c["tp"],
            pipeline_model_parallel_size=c["pp"],
            context_parallel_size=c["cp"],
            expert_model_parallel_size=c["ep"],
            expert_tensor_parallel_size=c["etp"],
            order=c["order"],
            create_gloo_process_groups=False,
        )
    except (AssertionError, RuntimeError) as exc:
        return {"accepted": False, "error": f"{type(exc).__name__}: {exc}"}
    except ValueError as exc:  # megatron-core 0.19 fails inside for orders without 'tp'
        return {"accepted": False, "crashed": True, "error": f"{type(exc).__name__}: {exc}"}
    else:
        groups = {k: dist.get_process_group_ranks(f(**kw)) for k, (f, kw) in GETTERS.items()}
        return {"accepted": True, "groups": groups}
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


json.dump([verdict(c) for c in json.load(sys.stdin)], sys.stdout)
"""


def _probe_rank(index: int, world: int) -> int:
    """A rank spread over the world, different from config to config."""
    return (index * 7919 + 3) % world


@pytest.fixture(scope="module")
def megatron_verdicts() -> List[dict]:
    """initialize_model_parallel's answer for every candidate, one fake rank each."""
    pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    requests = [
        dict(c._asdict(), rank=_probe_rank(i, c.world)) for i, c in enumerate(ALL_CANDIDATES)
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore")
    completed = subprocess.run(
        [sys.executable, "-c", _INITIALIZE_WORKER],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    verdicts = json.loads(completed.stdout)
    assert len(verdicts) == len(requests)
    for request, verdict in zip(requests, verdicts):
        verdict["rank"] = request["rank"]
    return verdicts


def test_initialize_model_parallel_rejects_exactly_what_plan_rejects(megatron_verdicts):
    disagreements = [
        f"{c.id}: megatron-core {'accepts' if v['accepted'] else 'rejects (' + v['error'] + ')'}, "
        f"plan {'accepts' if plan_accepts(c) else 'rejects'}"
        for c, v in zip(ALL_CANDIDATES, megatron_verdicts)
        if v["accepted"] != plan_accepts(c) and not v.get("crashed")
    ]
    assert not disagreements, "\n".join(disagreements)


def test_megatron_core_fails_inside_only_for_orders_without_tp(megatron_verdicts):
    # megatron-core 0.19 injects its gtp_remat axis after 'tp' and fails with a ValueError
    # when the order leaves 'tp' out; earlier releases run those orders, and so does plan()
    crashed = [(c, v) for c, v in zip(ALL_CANDIDATES, megatron_verdicts) if v.get("crashed")]
    assert all("tp" not in c.order.split("-") for c, _ in crashed), [c.id for c, _ in crashed]


def test_the_rejections_cover_every_megatron_check(megatron_verdicts):
    errors = [v["error"] for v in megatron_verdicts if not v["accepted"]]
    assert any("is not divisible by expert_tensor_model_pipeline" in e for e in errors)
    assert any(e.startswith("RuntimeError: world_size") and "expert" not in e for e in errors)
    assert any("but you haven't" in e for e in errors)  # RankGenerator: token missing
    assert any("pp-last rank ordering" in e for e in errors)
    assert any("Pipeline parallel groups are expected to be the same" in e for e in errors)


def test_initialized_groups_of_one_rank_equal_group_of(megatron_verdicts):
    checked = 0
    for candidate, verdict in zip(ALL_CANDIDATES, megatron_verdicts):
        if not verdict["accepted"]:
            continue
        layout = plan_of(candidate)
        rank = verdict["rank"]
        for kind, ranks in verdict["groups"].items():
            assert layout.group_of(kind, rank) == ranks, (candidate.id, kind, rank)
        checked += 1
    assert checked >= 300
