"""MpuReader: every recorded MPU flavour answered, resolution rules, errors.

The MPUs here are generated from the records in ``compat/surfaces`` (tests/fakes.py);
their groups are real ``torch.distributed`` process groups of the ``fake`` backend,
one rank of the world at a time in this process. DeepSpeed's real
``PipelineParallelGrid`` is read in four gloo processes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Dict, Iterator, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _multiproc import run_ranks
from fakes import fake_mpu_from_surface, load_surface, surface_names
from mpu_bridge.errors import LayoutError, MpuError
from mpu_bridge.layout import Layout, plan
from mpu_bridge.mpu import (
    ALL_DIMENSIONS,
    DIMENSION_KINDS,
    DIMENSIONS,
    FLAVOURS,
    QUERIES,
    MpuReader,
    MpuSizes,
    candidate_names,
)

ALL = set(ALL_DIMENSIONS)
#: megatron-core 0.19's Generalized Tensor Parallelism dimensions: no names before 0.19.
GTP_DIMS = {"gtp", "egtp"}
#: What a megatron-core release before 0.19 answers: everything but the GTP sizes (the
#: GTP combined groups are answered by the replicate groups there, as the sizes are 1).
PRE_GTP = ALL - GTP_DIMS
#: The one-dimension groups of megatron-core before 0.10, and the distribution groups
#: its replicate groups answer (no GTP there).
OLD = (set(DIMENSIONS) - GTP_DIMS) | {"gtp-dp", "gtp-dp-cp", "egtp-edp"}

#: Which dimensions each recorded MPU answers (world size, rank and group ranks).
EXPECTED_DIMS: Dict[str, set] = {
    "megatron-lm-1.0": {"tp", "dp", "sdp", "mp"},
    "megatron-lm-2.0": {"tp", "pp", "dp", "sdp", "mp"},
    "megatron-deepspeed-mpu-86dba34": {"tp", "pp", "dp", "sdp", "mp"},
    "megatron-deepspeed-f1feb88": {"tp", "pp", "dp", "cp", "sdp", "mp"},
    "deepspeed-pipe-grid-0.19.8": {"tp", "pp", "dp", "sdp", "mp"},
    "deepspeed-ulysses-0.19.8": {"cp", "sdp"},
    "megatron-core-0.4.0": OLD | {"tp-dp", "tp-dp-cp", "etp-ep"},
    "megatron-core-0.8.0": OLD | {"tp-cp", "tp-dp", "tp-dp-cp", "etp-ep", "etp-ep-pp", "etp-ep-egtp-pp"},
    "megatron-core-0.9.0": OLD | {"tp-cp", "tp-dp", "tp-dp-cp", "etp-ep", "etp-ep-pp", "etp-ep-egtp-pp"},
    "megatron-core-0.10.0": PRE_GTP,
    "megatron-core-0.11.0": PRE_GTP,
    "megatron-core-0.12.3": PRE_GTP,
    "megatron-core-0.13.1": PRE_GTP,
    "megatron-core-0.14.0": PRE_GTP,
    "megatron-core-0.15.3": PRE_GTP,
    "megatron-core-0.16.1": PRE_GTP,
    "megatron-core-0.17.1": PRE_GTP,
    "megatron-core-0.18.2": PRE_GTP,
    "megatron-core-0.19.2": ALL,
}

#: (record, dim) pairs answered by size/rank getters only: no group getter.
NO_GROUP = {("megatron-core-0.4.0", "ep")}

#: Layouts for the releases with expert tensor parallelism (megatron-core >= 0.10).
EXPERT_TP_LAYOUTS: List[Dict[str, Any]] = [
    dict(world=8, tp=2, pp=2),
    dict(world=16, tp=2, cp=2, ep=4, etp=1),
    dict(world=16, tp=2, pp=2, ep=2, etp=1),
]

#: Layouts each recorded MPU is read under.
LAYOUTS: Dict[str, List[Dict[str, Any]]] = {
    "megatron-lm-1.0": [dict(world=8, tp=2), dict(world=8, tp=4), dict(world=4)],
    "megatron-lm-2.0": [dict(world=8, tp=2, pp=2), dict(world=8, pp=4), dict(world=8, tp=2)],
    "megatron-deepspeed-mpu-86dba34": [dict(world=8, tp=2, pp=2), dict(world=8, pp=2)],
    "megatron-deepspeed-f1feb88": [
        dict(world=8, tp=2, pp=2),
        dict(world=8, cp=4),
        dict(world=8, cp=2),
    ],
    "deepspeed-pipe-grid-0.19.8": [
        dict(world=8, tp=2, pp=2),
        dict(world=8, pp=2),
        dict(world=8, tp=4),
    ],
    "deepspeed-ulysses-0.19.8": [dict(world=8, cp=2), dict(world=8, cp=8), dict(world=4, cp=4)],
    "megatron-core-0.4.0": [
        dict(world=8, tp=2, pp=2),
        dict(world=8, tp=2, cp=2),
        dict(world=8, tp=2, ep=2),
        dict(world=16, tp=2, pp=2, ep=2),
    ],
    "megatron-core-0.8.0": [
        dict(world=8, tp=2, pp=2),
        dict(world=8, tp=2, cp=2),
        dict(world=16, tp=2, pp=2, ep=2),
    ],
    "megatron-core-0.9.0": [
        dict(world=8, tp=2, pp=2),
        dict(world=8, tp=2, cp=2),
        dict(world=8, ep=4),
        dict(world=16, tp=2, pp=2, ep=2, order="tp-cp-dp-ep-pp"),
    ],
    "megatron-core-0.10.0": EXPERT_TP_LAYOUTS,
    "megatron-core-0.11.0": EXPERT_TP_LAYOUTS,
    "megatron-core-0.12.3": EXPERT_TP_LAYOUTS,
    "megatron-core-0.13.1": EXPERT_TP_LAYOUTS,
    "megatron-core-0.14.0": EXPERT_TP_LAYOUTS,
    "megatron-core-0.15.3": EXPERT_TP_LAYOUTS,
    "megatron-core-0.16.1": [
        dict(world=8, tp=2, pp=2),
        dict(world=8, tp=2, cp=2),
        dict(world=16, tp=2, cp=2, ep=4, etp=1),
        dict(world=16, tp=2, pp=2, ep=2, etp=1),
        dict(world=8, tp=2, ep=2, order="tp-cp-dp-ep-pp"),
    ],
    "megatron-core-0.17.1": EXPERT_TP_LAYOUTS,
    "megatron-core-0.18.2": EXPERT_TP_LAYOUTS,
    "megatron-core-0.19.2": EXPERT_TP_LAYOUTS + [
        dict(world=8, tp=2, gtp_remat=2),
        dict(world=16, tp=2, gtp_remat=2, pp=2),
        dict(world=16, tp=2, pp=2, ep=2, etp=1, expert_gtp_remat=2),
        dict(world=16, tp=2, gtp_remat=2, ep=2, expert_gtp_remat=2),
    ],
}

#: The order string each flavour's layout is known by (None: the MPU does not say).
EXPECTED_ORDER = {
    "megatron-lm-1": "tp-dp-pp",
    "megatron-lm-2": "tp-dp-pp",
    "megatron-deepspeed": "tp-cp-dp-pp",
    "deepspeed-ulysses": "tp-cp-dp-pp",
    "deepspeed-pipe-grid": "tp-dp-pp",
    "megatron-core": None,
}

#: Recorded answers the reader deliberately does not use, and why.
UNUSED_ANSWERS = {
    # Megatron-DeepSpeed's legacy getters mean TP and refuse PP > 1; TP has its own names.
    ("megatron-deepspeed-f1feb88", "get_model_parallel_world_size", "tp"),
    ("megatron-deepspeed-f1feb88", "get_model_parallel_rank", "tp"),
    ("megatron-deepspeed-mpu-86dba34", "get_model_parallel_world_size", "tp"),
    ("megatron-deepspeed-mpu-86dba34", "get_model_parallel_rank", "tp"),
    # DeepSpeed's Ulysses MPU aliases get_model_parallel_* to sequence parallelism.
    ("deepspeed-ulysses-0.19.8", "get_model_parallel_world_size", "cp"),
    ("deepspeed-ulysses-0.19.8", "get_model_parallel_rank", "cp"),
    ("deepspeed-ulysses-0.19.8", "get_model_parallel_group", "cp"),
    # the world rank is not a dimension
    ("deepspeed-pipe-grid-0.19.8", "get_global_rank", "world"),
    # the old expert-data rank of megatron-core 0.4-0.9 is derived from the group
    # instead (the getter takes the same keyword as the group getter)
}


def _layout(spec: Dict[str, Any]) -> Layout:
    spec = dict(spec)
    return plan(spec.pop("world"), **spec)


def _cases():
    for name in sorted(LAYOUTS):
        for spec in LAYOUTS[name]:
            label = ",".join(f"{k}={v}" for k, v in spec.items())
            yield pytest.param(name, spec, id=f"{name}[{label}]")


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[Any]:
    """Be rank ``rank`` of a ``fake``-backend world in this process; torn down after."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in the test process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def member_groups(layout: Layout, rank: int) -> Dict[str, Any]:
    """Create every group of every kind (as megatron does); return this rank's, by kind."""
    import torch.distributed as dist

    groups: Dict[str, Any] = {}
    for kind in layout.kinds:
        for ranks in layout.iter_groups(kind):
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[kind] = group
    return groups


def _ranks_to_check(world: int) -> List[int]:
    return list(range(world)) if world <= 8 else [0, 1, 5, world // 2 + 3, world - 1]


# -- the records themselves ---------------------------------------------------------


def test_reading_an_mpu_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, mpu_bridge.mpu; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_recorded_surface_has_a_flavour_source_and_known_meanings():
    names = surface_names()
    assert set(names) == set(EXPECTED_DIMS), "a record without expectations (or vice versa)"
    for name in names:
        record = load_surface(name)
        assert record["flavour"] in FLAVOURS, name
        source = record["source"]
        assert ("repo" in source and "path" in source) or "package" in source, name
        for getter, entry in record["names"].items():
            for answer in entry["answers"]:
                assert answer["dim"] in ALL or answer["dim"] == "world", (name, getter)
                assert answer["query"] in QUERIES or answer["query"] == "global_rank", (name, getter)


def _without_defaults(record, getter, kwargs):
    """``kwargs`` less those equal to the recorded getter's defaults (megatron-core 0.19's
    ``with_gtp_remat=True`` is its default: asked for explicitly, it is the plain call)."""
    params = dict(p.split("=", 1) for p in record["names"].get(getter, {}).get("params", []) if "=" in p)
    return tuple((k, v) for k, v in kwargs if params.get(k) != repr(v))


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_every_recorded_answer_is_a_candidate_of_the_reader(name):
    record = load_surface(name)
    candidates = {
        (dim, query, getter.name, tuple(sorted(dict(getter.kwargs).items())))
        for dim, query, getter in candidate_names(record["flavour"])
    }
    candidates = {(dim, query, name_, _without_defaults(record, name_, kwargs))
                  for dim, query, name_, kwargs in candidates}
    missing = []
    for getter, entry in record["names"].items():
        for answer in entry["answers"]:
            key = (answer["dim"], answer["query"], getter,
                   _without_defaults(record, getter, tuple(sorted(answer.get("kwargs", {}).items()))))
            if key in candidates or (name, getter, answer["dim"]) in UNUSED_ANSWERS:
                continue
            missing.append(key)
    assert missing == []


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_each_recorded_flavour_is_detected(name):
    record = load_surface(name)
    reader = MpuReader(fake_mpu_from_surface(record))
    assert reader.flavour == record["flavour"]
    assert reader.is_ulysses == (record["flavour"] == "deepspeed-ulysses")


# -- every flavour answered ------------------------------------------------------------


@pytest.mark.parametrize("name, spec", list(_cases()))
def test_reader_answers_every_flavour_like_the_layout(name, spec):
    record = load_surface(name)
    layout = _layout(spec)
    expected_dims = set(EXPECTED_DIMS[name])
    if name == "megatron-core-0.4.0" and layout.config.cp > 1:
        expected_dims -= {"edp", "egtp-edp"}  # 0.4's data-modulo-expert group excludes cp
    for rank in _ranks_to_check(layout.world_size):
        with fake_world(layout.world_size, rank):
            groups = member_groups(layout, rank)
            reader = MpuReader(fake_mpu_from_surface(record, layout, rank, groups))
            for dim in ALL_DIMENSIONS:
                kind = DIMENSION_KINDS[dim]
                if dim not in expected_dims:
                    assert not reader.has(dim), (dim, reader.source(dim, "world_size"))
                    continue
                assert reader.world_size(dim) == layout.size(kind), dim
                assert reader.rank(dim) == layout.rank_in_group(kind, rank), dim
                if (name, dim) in NO_GROUP:
                    assert not reader.has(dim, "group")
                    continue
                assert reader.group_ranks(dim) == layout.group_of(kind, rank), dim
            reader.check_against_world(layout.world_size, rank)


@pytest.mark.parametrize("name, spec", list(_cases()))
def test_reader_sizes_for_every_flavour(name, spec):
    record = load_surface(name)
    layout = _layout(spec)
    config = layout.config
    expert = record["flavour"] == "megatron-core"
    reader = MpuReader(fake_mpu_from_surface(record, layout, rank=layout.world_size - 1))
    assert reader.sizes() == MpuSizes(
        tp=config.tp,
        pp=config.pp,
        dp=config.dp,
        cp=config.cp,
        ep=config.ep if expert else None,
        etp=config.etp if expert else None,
        order=EXPECTED_ORDER[record["flavour"]],
        flavour=record["flavour"],
        gtp=config.gtp_remat,
        egtp=config.expert_gtp_remat,
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tp=st.sampled_from([1, 2, 4]),
    pp=st.sampled_from([1, 2]),
    cp=st.sampled_from([1, 2]),
    dp=st.sampled_from([1, 2, 4]),
    ep=st.sampled_from([1, 2, 4]),
    etp=st.sampled_from([None, 1, 2]),
    order=st.sampled_from(["tp-cp-ep-dp-pp", "tp-cp-dp-ep-pp", "tp-dp-cp-ep-pp"]),
    gtp=st.sampled_from([1, 2]),
    egtp=st.sampled_from([1, 2]),
    data=st.data(),
)
@pytest.mark.parametrize("name", ["megatron-core-0.16.1", "megatron-core-0.19.2"])
def test_property_megatron_core_record_matches_layout(name, tp, pp, cp, dp, ep, etp, order, gtp, egtp, data):
    if name != "megatron-core-0.19.2" and (gtp, egtp) != (1, 1):
        return  # GTP is megatron-core 0.19's
    try:
        layout = plan(tp * pp * cp * dp * gtp, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, order=order,
                      gtp_remat=gtp, expert_gtp_remat=egtp)
    except LayoutError:
        return
    rank = data.draw(st.integers(0, layout.world_size - 1))
    record = load_surface(name)
    with fake_world(layout.world_size, rank):
        reader = MpuReader(fake_mpu_from_surface(record, layout, rank, member_groups(layout, rank)))
        for dim in sorted(EXPECTED_DIMS[name]):
            kind = DIMENSION_KINDS[dim]
            assert reader.world_size(dim) == layout.size(kind)
            assert reader.rank(dim) == layout.rank_in_group(kind, rank)
            assert reader.group_ranks(dim) == layout.group_of(kind, rank)
        reader.check_against_world(layout.world_size, rank)


# -- resolution rules ------------------------------------------------------------------


def test_sequence_data_is_the_data_parallel_group_with_context_when_cp_gt_1():
    layout = plan(8, tp=2, cp=2)
    with fake_world(8, 1):
        fake = fake_mpu_from_surface(load_surface("megatron-core-0.16.1"), layout, 1, member_groups(layout, 1))
        reader = MpuReader(fake)
        assert reader.source("sdp", "group") == "get_data_parallel_group(with_context_parallel=True) [when cp>1]"
        assert reader.group_ranks("sdp") == [1, 3, 5, 7]
        assert reader.group_ranks("dp") == [1, 5]


def test_sequence_data_is_the_data_parallel_group_when_cp_is_1():
    layout = plan(8, tp=2)
    with fake_world(8, 1):
        fake = fake_mpu_from_surface(load_surface("megatron-core-0.16.1"), layout, 1, member_groups(layout, 1))
        reader = MpuReader(fake)
        assert reader.source("sdp", "group") == "get_data_parallel_group() (sdp same as dp when cp==1)"
        assert reader.group_ranks("sdp") == [1, 3, 5, 7]


def test_megatron_deepspeed_sequence_data_uses_its_own_getter():
    layout = plan(8, cp=4)
    with fake_world(8, 6):
        fake = fake_mpu_from_surface(load_surface("megatron-deepspeed-f1feb88"), layout, 6, member_groups(layout, 6))
        reader = MpuReader(fake)
        assert reader.source("sdp", "group") == "get_sequence_data_parallel_group()"
        assert reader.group_ranks("cp") == [4, 5, 6, 7]
        assert reader.group_ranks("dp") == [2, 6]
        assert reader.group_ranks("sdp") == list(range(8))


def test_megatron_deepspeed_model_parallel_comes_from_the_group_not_the_legacy_getters():
    layout = plan(8, tp=2, pp=2)
    with fake_world(8, 3):
        fake = fake_mpu_from_surface(load_surface("megatron-deepspeed-f1feb88"), layout, 3, member_groups(layout, 3))
        with pytest.raises(AssertionError):
            fake.get_model_parallel_world_size()  # legacy: TP only, refuses PP > 1
        reader = MpuReader(fake)
        assert reader.world_size("mp") == 4
        assert reader.source("mp", "world_size") == "world_size of get_model_parallel_group()"
        assert reader.group_ranks("mp") == [2, 3, 6, 7]


def test_megatron_lm_1_model_parallel_names_mean_tensor_parallel():
    reader = MpuReader(fake_mpu_from_surface(load_surface("megatron-lm-1.0"), plan(8, tp=4), rank=6))
    assert reader.flavour == "megatron-lm-1"
    assert (reader.world_size("tp"), reader.rank("tp")) == (4, 2)
    assert reader.source("tp", "world_size") == "get_model_parallel_world_size()"
    assert reader.world_size("mp") == 4
    assert reader.sizes().pp == 1
    assert not reader.has("pp")


def test_ulysses_mpu_is_detected_and_its_model_parallel_alias_is_not_used():
    record = load_surface("deepspeed-ulysses-0.19.8")
    reader = MpuReader(fake_mpu_from_surface(record, plan(8, cp=4), rank=5))
    assert reader.is_ulysses
    assert reader.flavour == "deepspeed-ulysses"
    assert hasattr(reader.mpu, "get_model_parallel_world_size")
    assert not reader.has("mp")
    assert not reader.has("dp")
    assert (reader.world_size("cp"), reader.rank("cp")) == (4, 1)
    assert reader.world_size("sdp") == 8
    assert reader.sizes().dp == 2  # sequence-data / sequence


def test_ulysses_detection_needs_only_initialize_sequence_parallel():
    class SlimUlysses:
        def initialize_sequence_parallel(self, sequence_parallel_size):
            raise NotImplementedError

    reader = MpuReader(SlimUlysses())
    assert reader.is_ulysses and reader.flavour == "deepspeed-ulysses"


def test_expert_tensor_parallel_is_tensor_parallel_on_megatron_core_before_0_10():
    layout = plan(8, tp=2, ep=2)
    with fake_world(8, 3):
        fake = fake_mpu_from_surface(load_surface("megatron-core-0.9.0"), layout, 3, member_groups(layout, 3))
        reader = MpuReader(fake)
        assert reader.world_size("etp") == 2
        assert reader.source("etp", "group") == (
            "get_tensor_model_parallel_group() (etp same as tp (no get_expert_tensor_parallel_world_size))"
        )


def test_old_expert_data_group_with_context_parallel_uses_the_keyword():
    layout = plan(8, tp=2, cp=2)
    with fake_world(8, 2):
        fake = fake_mpu_from_surface(load_surface("megatron-core-0.9.0"), layout, 2, member_groups(layout, 2))
        reader = MpuReader(fake)
        assert reader.source("edp", "group") == (
            "get_data_modulo_expert_parallel_group(with_context_parallel=True) [when cp>1]"
        )
        assert reader.group_ranks("edp") == [0, 2, 4, 6]


def test_megatron_core_0_4_has_no_expert_data_group_including_context_parallel():
    reader = MpuReader(fake_mpu_from_surface(load_surface("megatron-core-0.4.0"), plan(8, tp=2, cp=2), rank=0))
    with pytest.raises(MpuError) as info:
        reader.world_size("edp")
    message = str(info.value)
    assert "get_expert_data_parallel_world_size(): absent" in message
    assert "get_data_modulo_expert_parallel_group() [when cp==1]: skipped (cp = 2)" in message


def test_tried_lists_every_candidate_in_order():
    reader = MpuReader(object(), flavour="custom")
    assert reader.tried("sdp", "group") == [
        "get_sequence_data_parallel_group()",
        "get_data_parallel_group(with_context_parallel=True, with_gtp_remat=False) [when cp>1]",
        "get_data_parallel_group(with_context_parallel=True) [when cp>1]",
        "same as dp when cp==1",
        "    get_data_parallel_group(with_gtp_remat=False)",
        "    get_data_parallel_group()",
    ]
    assert reader.tried("tp", "world_size") == [
        "get_tensor_model_parallel_world_size()",
        "get_slice_parallel_world_size()",
        "derived from the tp group",
        "    get_tensor_model_parallel_group()",
        "    get_slice_parallel_group()",
    ]


# -- a user object with only some names -------------------------------------------------


class PartialMpu:
    """A user's MPU: tensor and data parallel sizes and ranks, no groups, nothing else."""

    def __init__(self, tp: int, dp: int, rank: int) -> None:
        self.tp, self.dp, self._rank = tp, dp, rank

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_rank(self):
        return self._rank % self.tp

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_rank(self):
        return self._rank // self.tp


def test_user_object_with_only_some_names():
    reader = MpuReader(PartialMpu(tp=2, dp=4, rank=5))
    assert reader.flavour == "custom"
    assert reader.sizes() == MpuSizes(tp=2, pp=1, dp=4, cp=1, ep=None, etp=None, order=None, flavour="custom")
    assert (reader.rank("tp"), reader.rank("dp")) == (1, 2)
    assert not reader.has("pp") and not reader.has("ep") and not reader.has("tp", "group")
    assert reader.world_size("sdp") == 4  # the data-parallel size, cp being 1
    reader.check_against_world(8, 5)


def test_user_object_missing_a_needed_name_lists_every_name_tried():
    reader = MpuReader(PartialMpu(tp=2, dp=4, rank=5))
    with pytest.raises(MpuError) as info:
        reader.group("dp")
    message = str(info.value)
    assert "cannot answer the data parallel (dp) group" in message
    assert "- get_data_parallel_group(): absent" in message
    with pytest.raises(MpuError) as info:
        reader.world_size("pp")
    message = str(info.value)
    for name in (
        "get_pipeline_model_parallel_world_size(): absent",
        "get_pipe_parallel_world_size(): absent",
        "get_pipeline_model_parallel_group(): absent",
        "get_pipe_parallel_group(): absent",
    ):
        assert name in message
    assert "uninitialised" not in message


def test_unknown_dimension_lists_the_valid_ones():
    reader = MpuReader(PartialMpu(tp=2, dp=4, rank=0))
    valid = "tp, pp, dp, cp, sdp, mp, ep, edp, etp"
    with pytest.raises(MpuError, match=rf"unknown dimension 'zp'; valid dimensions: {valid}"):
        reader.world_size("zp")
    with pytest.raises(MpuError, match="unknown query 'size'"):
        reader.has("tp", "size")


def test_no_mpu_and_unknown_flavour_are_errors():
    with pytest.raises(MpuError, match="no MPU given"):
        MpuReader(None)
    with pytest.raises(MpuError, match="unknown MPU flavour 'megatron-9'"):
        MpuReader(PartialMpu(1, 1, 0), flavour="megatron-9")


# -- uninitialised MPUs ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_uninitialised_mpu_is_reported_with_what_each_name_answered(name):
    reader = MpuReader(fake_mpu_from_surface(load_surface(name), layout=None))
    with pytest.raises(MpuError, match="looks uninitialised"):
        reader.sizes()


def test_zero_before_initialisation_is_not_an_answer():
    reader = MpuReader(fake_mpu_from_surface(load_surface("megatron-core-0.16.1"), layout=None))
    assert not reader.has("dp")
    with pytest.raises(MpuError) as info:
        reader.world_size("ep")
    message = str(info.value)
    assert "get_expert_model_parallel_world_size(): returned 0" in message
    assert "get_expert_model_parallel_group(): raised AssertionError" in message
    assert "looks uninitialised" in message


def test_none_before_initialisation_is_not_an_answer():
    reader = MpuReader(fake_mpu_from_surface(load_surface("megatron-core-0.16.1"), layout=None))
    with pytest.raises(MpuError) as info:
        reader.world_size("etp")
    assert "get_expert_tensor_parallel_world_size(): returned None" in str(info.value)


def test_rank_zero_is_an_answer_but_minus_one_is_not():
    class Mpu(PartialMpu):
        def get_data_parallel_rank(self):
            return -1

    reader = MpuReader(Mpu(tp=2, dp=4, rank=0))
    assert reader.rank("tp") == 0
    with pytest.raises(MpuError, match=r"get_data_parallel_rank\(\): returned -1 \(not a member\)"):
        reader.rank("dp")


# -- checks against the world -----------------------------------------------------------


def test_sizes_that_do_not_multiply_to_the_world_are_an_error():
    class Mpu(PartialMpu):
        def get_pipeline_model_parallel_world_size(self):
            return 2

        def get_pipeline_model_parallel_rank(self):
            return 0

    reader = MpuReader(Mpu(tp=2, dp=4, rank=0))
    with pytest.raises(MpuError) as info:
        reader.check_against_world(8, 0)
    message = str(info.value)
    assert "tp·pp·dp·cp = 2·2·4·1 = 16, but the world has 8 ranks" in message


def test_world_not_divisible_when_the_mpu_has_no_data_parallel_size():
    record = load_surface("deepspeed-ulysses-0.19.8")

    class NoSequenceData:
        initialize_sequence_parallel = staticmethod(lambda n: None)
        get_sequence_parallel_world_size = staticmethod(lambda: 3)
        get_sequence_parallel_rank = staticmethod(lambda: 0)

    assert record["flavour"] == "deepspeed-ulysses"
    reader = MpuReader(NoSequenceData())
    with pytest.raises(MpuError, match=r"world size 8 is not divisible by tp·pp·cp = 3"):
        reader.check_against_world(8, 0)


def test_group_size_that_differs_from_the_reported_size_is_an_error():
    layout = plan(8, tp=2)
    with fake_world(8, 0):
        groups = member_groups(layout, 0)
        groups["dp"] = groups["tp-dp"]  # a 8-rank group where the 4-rank dp group belongs
        reader = MpuReader(fake_mpu_from_surface(load_surface("megatron-lm-2.0"), layout, 0, groups))
        with pytest.raises(MpuError) as info:
            reader.check_against_world(8, 0)
    expected = "the MPU's dp group (get_data_parallel_group()) has 8 ranks, but the MPU reports a dp size of 4"
    assert expected in str(info.value)


def test_rank_missing_from_its_own_group_is_an_error():
    class Mpu(PartialMpu):
        def get_data_parallel_group_ranks(self):
            return [0, 2, 4, 6]  # rank 5's data-parallel group is [1, 3, 5, 7]

    reader = MpuReader(Mpu(tp=2, dp=4, rank=5))
    with pytest.raises(MpuError, match=r"rank 5 is not in its own dp group \[0, 2, 4, 6\]"):
        reader.check_against_world(8, 5)


def test_a_non_member_sentinel_is_not_a_group():
    layout = plan(8, tp=2)
    with fake_world(8, 0):
        import torch.distributed as dist

        groups = member_groups(layout, 0)
        groups["tp"] = dist.new_group([2, 3])  # rank 0 gets torch's non-member sentinel
        reader = MpuReader(fake_mpu_from_surface(load_surface("megatron-lm-2.0"), layout, 0, groups))
        with pytest.raises(MpuError, match=r"get_tensor_model_parallel_group\(\): returned -100, not a process group"):
            reader.group("tp")


def test_inconsistent_sequence_data_size_is_an_error():
    class Mpu(PartialMpu):
        def get_sequence_data_parallel_world_size(self):
            return 2

    reader = MpuReader(Mpu(tp=2, dp=4, rank=0))
    with pytest.raises(MpuError, match=r"sequence-data parallel \(data x context\) size is 2 .* imply 4"):
        reader.check_against_world(8, 0)


# -- DeepSpeed's real PipelineParallelGrid ----------------------------------------------


def _read_deepspeed_grid(rank: int, world_size: int, topologies):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for num_pp, num_mp, num_dp in topologies:
        grid = PipelineParallelGrid(
            topology=PipeModelDataParallelTopology(num_pp=num_pp, num_mp=num_mp, num_dp=num_dp)
        )
        reader = MpuReader(grid)
        reader.check_against_world(world_size, rank)
        answers = {
            dim: (reader.world_size(dim), reader.rank(dim), reader.group_ranks(dim))
            for dim in DIMENSIONS
            if reader.has(dim)
        }
        results.append((reader.flavour, reader.sizes(), answers))
    ulysses = importlib.import_module("deepspeed.runtime.sequence_parallel.parallel_state_sp")
    ulysses.initialize_sequence_parallel(sequence_parallel_size=2)
    reader = MpuReader(ulysses)
    reader.check_against_world(world_size, rank)
    answers = {
        dim: (reader.world_size(dim), reader.rank(dim), reader.group_ranks(dim))
        for dim in DIMENSIONS
        if reader.has(dim)
    }
    results.append((reader.flavour, reader.sizes(), answers))
    return results


def test_real_deepspeed_pipeline_grid_and_ulysses_mpu_in_four_processes():
    topologies = [(2, 2, 1), (2, 1, 2), (1, 2, 2)]  # (pp, tp, dp)
    per_rank = run_ranks(_read_deepspeed_grid, 4, topologies, timeout=180)
    for rank, results in enumerate(per_rank):
        flavour, sizes, answers = results[-1]  # the Ulysses MPU, sequence parallel 2
        assert flavour == "deepspeed-ulysses"
        assert sizes == MpuSizes(tp=1, pp=1, dp=2, cp=2, ep=None, etp=None, order="tp-cp-dp-pp", flavour=flavour)
        assert answers == {
            "cp": (2, rank % 2, [0, 1] if rank < 2 else [2, 3]),
            "sdp": (4, rank, [0, 1, 2, 3]),
        }
        for (pp, tp, dp), (flavour, sizes, answers) in zip(topologies, results):
            layout = plan(4, tp=tp, pp=pp)
            assert flavour == "deepspeed-pipe-grid"
            assert sizes == MpuSizes(tp=tp, pp=pp, dp=dp, cp=1, ep=None, etp=None, order="tp-dp-pp", flavour=flavour)
            assert set(answers) == {"tp", "pp", "dp", "sdp", "mp"}
            for dim, (size, dim_rank, ranks) in answers.items():
                kind = DIMENSION_KINDS[dim]
                assert (size, dim_rank, ranks) == (
                    layout.size(kind),
                    layout.rank_in_group(kind, rank),
                    layout.group_of(kind, rank),
                ), (rank, (pp, tp, dp), dim)


def test_names_present_ignores_aliases_and_initialisation():
    lm1 = MpuReader(fake_mpu_from_surface(load_surface("megatron-lm-1.0")))
    assert lm1.names_present("tp") and lm1.names_present("dp")
    assert not lm1.names_present("pp") and not lm1.names_present("cp")
    assert not lm1.names_present("sdp")  # answered as the data-parallel group, by alias
    mds = MpuReader(fake_mpu_from_surface(load_surface("megatron-deepspeed-f1feb88")))
    assert mds.names_present("cp") and mds.names_present("sdp")


def test_a_ranks_getter_is_preferred_to_the_group():
    class Mpu(PartialMpu):
        def get_tensor_model_parallel_group_ranks(self):
            return [4, 5]

    reader = MpuReader(Mpu(tp=2, dp=4, rank=5))
    assert reader.group_ranks("tp") == [4, 5]
    assert reader.source("tp", "ranks") == "get_tensor_model_parallel_group_ranks()"
    reader.check_against_world(8, 5)
