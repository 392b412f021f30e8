"""MpuReader on the REAL megatron-core ``parallel_state`` (the installed release).

Several local gloo processes each run ``initialize_model_parallel`` for a few layouts;
every answer of the reader must equal megatron-core's own getters and
``Layout.group_of`` for the same sizes and order.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest

from _multiproc import run_ranks
from mpu_bridge.errors import MpuError
from mpu_bridge.layout import plan
from mpu_bridge.mpu import ALL_DIMENSIONS, DIMENSION_KINDS, MpuReader, MpuSizes
from mpu_bridge.optional import is_available

COMPAT = Path(__file__).resolve().parent.parent / "compat"
#: megatron-core is an extra: where it is not installed (the Python 3.13 line of the release
#: matrix), the tests that need it are skipped.
needs_megatron = pytest.mark.skipif(
    not is_available("megatron.core"), reason="needs megatron-core (pip install 'mpu-bridge[megatron]')"
)

LAYOUTS_4 = [
    dict(tp=2, pp=2),
    dict(tp=2, cp=2),
    dict(cp=2, ep=2),
    dict(tp=2, ep=2, etp=1),
    dict(ep=4, etp=1),
    dict(tp=2, ep=2, order="tp-cp-dp-ep-pp"),
]
LAYOUTS_8 = [
    dict(tp=2, cp=2, pp=2, ep=2, etp=1),
    dict(tp=2, ep=4, etp=1),
]
#: Generalized Tensor Parallelism layouts, where the installed megatron-core has it (0.19).
GTP_LAYOUTS_4 = [dict(tp=2, gtp_remat=2), dict(ep=2, expert_gtp_remat=2)]
GTP_LAYOUTS_8 = [
    dict(tp=2, gtp_remat=2, pp=2),
    dict(tp=2, gtp_remat=2, ep=2, etp=1, expert_gtp_remat=2),
    dict(gtp_remat=2, cp=2, ep=2, expert_gtp_remat=2),
]


def _has_gtp() -> bool:
    import inspect

    return "gtp_remat_size" in inspect.signature(_import_parallel_state().initialize_model_parallel).parameters


def _megatron_gtp(ps, of) -> Dict[str, tuple]:
    """megatron-core 0.19's own GTP answers; the data-distribution groups are its default."""
    return {
        "gtp": (ps.get_gtp_weight_remat_world_size(), ps.get_gtp_weight_remat_rank(),
                list(ps.get_gtp_weight_remat_global_ranks())),
        "egtp": (ps.get_expert_gtp_weight_remat_world_size(), ps.get_expert_gtp_weight_remat_rank(),
                 list(ps.get_expert_gtp_weight_remat_global_ranks())),
        "gtp-dp": of(ps.get_data_parallel_group()),
        "gtp-dp-cp": of(ps.get_data_parallel_group(with_context_parallel=True)),
        "egtp-edp": of(ps.get_expert_data_parallel_group()),
        "etp-ep-egtp-pp": of(ps.get_expert_tensor_model_pipeline_parallel_group(with_egtp_remat=True)),
    }


def _import_parallel_state():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    return parallel_state


def _megatron_direct(ps) -> Dict[str, tuple]:
    """megatron-core's own answers: (world size, rank, global ranks) per dimension."""
    import torch.distributed as dist

    def of(group):
        return (dist.get_world_size(group), dist.get_rank(group), dist.get_process_group_ranks(group))

    gtp = _has_gtp()
    # 0.19: the plain data-parallel getters answer the distribution group; replicate = ours
    rep: Dict[str, Any] = {"with_gtp_remat": False} if gtp else {}
    direct = {
        "tp": (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(),
            of(ps.get_tensor_model_parallel_group())[2],
        ),
        "pp": (
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank(),
            of(ps.get_pipeline_model_parallel_group())[2],
        ),
        "dp": (
            ps.get_data_parallel_world_size(**rep),
            ps.get_data_parallel_rank(**rep),
            of(ps.get_data_parallel_group(**rep))[2],
        ),
        "cp": (
            ps.get_context_parallel_world_size(),
            ps.get_context_parallel_rank(),
            list(ps.get_context_parallel_global_ranks()),
        ),
        "sdp": (
            ps.get_data_parallel_world_size(with_context_parallel=True, **rep),
            ps.get_data_parallel_rank(with_context_parallel=True, **rep),
            of(ps.get_data_parallel_group(with_context_parallel=True, **rep))[2],
        ),
        "mp": of(ps.get_model_parallel_group()),
        "ep": (
            ps.get_expert_model_parallel_world_size(),
            ps.get_expert_model_parallel_rank(),
            of(ps.get_expert_model_parallel_group())[2],
        ),
        "edp": (
            ps.get_expert_data_parallel_world_size(**rep),
            ps.get_expert_data_parallel_rank(**rep),
            of(ps.get_expert_data_parallel_group(**rep))[2],
        ),
        "etp": (
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(),
            of(ps.get_expert_tensor_parallel_group())[2],
        ),
        "tp-cp": (
            ps.get_tensor_and_context_parallel_world_size(),
            ps.get_tensor_and_context_parallel_rank(),
            of(ps.get_tensor_and_context_parallel_group())[2],
        ),
        "tp-dp": of(ps.get_tensor_and_data_parallel_group()),
        "tp-dp-cp": of(ps.get_tensor_and_data_parallel_group(with_context_parallel=True)),
        "etp-ep": (
            ps.get_expert_tensor_and_model_parallel_world_size(),
            ps.get_expert_tensor_and_model_parallel_rank(),
            of(ps.get_expert_tensor_and_model_parallel_group())[2],
        ),
        "etp-ep-pp": of(ps.get_expert_tensor_model_pipeline_parallel_group()),
    }
    if gtp:
        direct.update(_megatron_gtp(ps, of))
    return {dim: (int(size), int(rank), [int(r) for r in ranks]) for dim, (size, rank, ranks) in direct.items()}


def _read_megatron_core(rank: int, world_size: int, layouts: List[Dict[str, Any]]) -> Dict[str, Any]:
    ps = _import_parallel_state()
    reader = MpuReader(ps)
    with pytest.raises(MpuError) as before:
        reader.sizes()
    out: Dict[str, Any] = {"flavour": reader.flavour, "before_init": str(before.value), "layouts": []}
    for spec in layouts:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=spec.get("tp", 1),
            pipeline_model_parallel_size=spec.get("pp", 1),
            context_parallel_size=spec.get("cp", 1),
            expert_model_parallel_size=spec.get("ep", 1),
            expert_tensor_parallel_size=spec.get("etp"),
            order=spec.get("order", "tp-cp-ep-dp-pp"),
            create_gloo_process_groups=False,
            **({"gtp_remat_size": spec["gtp_remat"]} if "gtp_remat" in spec else {}),
            **({"expert_gtp_remat_size": spec["expert_gtp_remat"]} if "expert_gtp_remat" in spec else {}),
        )
        try:
            reader.check_against_world(world_size, rank)
            with pytest.raises(MpuError) as wrong_world:
                reader.check_against_world(2 * world_size, rank)
            megatron = _megatron_direct(ps)
            out["layouts"].append(
                {
                    "reader": {
                        dim: (reader.world_size(dim), reader.rank(dim), reader.group_ranks(dim))
                        for dim in megatron
                    },
                    "megatron": megatron,
                    "sizes": reader.sizes(),
                    "wrong_world": str(wrong_world.value),
                }
            )
        finally:
            ps.destroy_model_parallel()
    return out


def _check(per_rank: List[Dict[str, Any]], world_size: int, layouts: List[Dict[str, Any]], has_gtp: bool) -> None:
    for rank, result in enumerate(per_rank):
        assert result["flavour"] == "megatron-core"
        assert "looks uninitialised" in result["before_init"]
        for spec, answers in zip(layouts, result["layouts"]):
            layout = plan(world_size, **spec)
            config = layout.config
            gtp_dims = {"gtp", "egtp", "gtp-dp", "gtp-dp-cp", "egtp-edp", "etp-ep-egtp-pp"}
            assert set(answers["megatron"]) == set(ALL_DIMENSIONS) - (set() if has_gtp else gtp_dims)
            for dim in answers["megatron"]:
                kind = DIMENSION_KINDS[dim]
                expected = (layout.size(kind), layout.rank_in_group(kind, rank), layout.group_of(kind, rank))
                assert tuple(answers["megatron"][dim]) == expected, (spec, rank, dim, "megatron vs layout")
                assert tuple(answers["reader"][dim]) == expected, (spec, rank, dim, "reader")
            assert answers["sizes"] == MpuSizes(
                tp=config.tp,
                pp=config.pp,
                dp=config.dp,
                cp=config.cp,
                ep=config.ep,
                etp=config.etp,
                order=None,
                flavour="megatron-core",
                gtp=config.gtp_remat,
                egtp=config.expert_gtp_remat,
            )
            dense = config.tp * config.pp * config.cp * config.dp * config.gtp_remat
            assert f"= {dense}, but the world has {2 * world_size} ranks" in answers["wrong_world"]


@needs_megatron
def test_reader_equals_megatron_core_and_layout_in_four_processes():
    has_gtp = _has_gtp()
    layouts = LAYOUTS_4 + (GTP_LAYOUTS_4 if has_gtp else [])
    per_rank = run_ranks(_read_megatron_core, 4, layouts, timeout=180)
    _check(per_rank, 4, layouts, has_gtp)


@needs_megatron
def test_reader_equals_megatron_core_and_layout_in_eight_processes():
    has_gtp = _has_gtp()
    layouts = LAYOUTS_8 + (GTP_LAYOUTS_8 if has_gtp else [])
    per_rank = run_ranks(_read_megatron_core, 8, layouts, timeout=240)
    _check(per_rank, 8, layouts, has_gtp)


# -- in this process: the module itself, torch.distributed not initialised ------------------


@needs_megatron
def test_uninitialised_megatron_core_reports_the_zero_answers():
    import torch.distributed as dist

    assert not dist.is_initialized()
    reader = MpuReader(_import_parallel_state())
    assert reader.flavour == "megatron-core"
    with pytest.raises(MpuError) as info:
        reader.world_size("dp")
    message = str(info.value)
    assert "get_data_parallel_world_size(): returned 0" in message
    # megatron's own assertion text changes by release (0.19 adds "(with GTP_remat)"): only its type is ours
    assert re.search(r"get_data_parallel_group\(\): raised AssertionError: .*not initialized", message)
    assert "looks uninitialised" in message


@needs_megatron
def test_recorded_surface_matches_the_installed_megatron_core():
    import torch.distributed as dist

    assert not dist.is_initialized()
    spec = importlib.util.spec_from_file_location("record_surface", COMPAT / "record_surface.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    fresh = module.record_megatron_core()
    path = COMPAT / "surfaces" / f"megatron-core-{fresh['release']}.json"
    assert path.exists(), f"record the installed release: python compat/record_surface.py --output {path}"
    committed = json.loads(path.read_text())
    fresh = json.loads(json.dumps(fresh))
    for record in (fresh, committed):
        record["source"].pop("date")
    assert fresh == committed
