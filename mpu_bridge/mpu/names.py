"""The MPU name tables: which getter names answer which (dimension, query), per flavour.

Resolution is data-driven: per flavour, per (dimension, query), :data:`NAME_TABLES`
holds an ordered list of :class:`Getter` candidates (a name, optional keyword
arguments, optional condition such as ``cp>1``); :data:`ALIASES` says which
dimension answers for another when the MPU has no names of its own (e.g.
sequence-data = data when cp = 1, model = tensor when pp = 1, expert-tensor =
tensor on megatron-core < 0.10); :data:`FIXED_ORDERS` the rank orders fixed by a
flavour's own code. :func:`detect_flavour` picks the flavour from the names an MPU
has, :func:`check_is_mpu` refuses what is no MPU at all.

Meaning of the ambiguous legacy names, per flavour (see ``compat/README.md``):

* ``get_model_parallel_*``: TP×PP on DeepSpeed's grid and custom objects (DeepSpeed's
  convention); the tensor-parallel group on Megatron-LM 1.0 (no pipeline there, so it
  is also TP×PP); on Megatron-DeepSpeed only ``get_model_parallel_group`` is TP×PP
  (its ``get_model_parallel_world_size``/``rank`` mean TP and refuse PP > 1, so they
  are not used); on DeepSpeed's Ulysses MPU they alias *sequence* parallelism and are
  not used; megatron-core has only ``get_model_parallel_group`` (TP×PP).
* ``get_sequence_parallel_*`` (Megatron-DeepSpeed, Ulysses) is the ``cp`` dimension;
  ``get_sequence_data_parallel_*`` is ``sdp``.
* ``device-mesh`` is a PyTorch ``DeviceMesh`` read through ``mpu_bridge.mesh.MeshMpu``
  (``attach(mesh)``): megatron-core's names for the dims the mesh has, detected by class.
* ``pg-collection`` is megatron-core's ``ProcessGroupCollection`` read through
  ``mpu_bridge.collection_mpu.CollectionMpu`` (``attach(collection)``): megatron-core's
  group getter names for the fields it holds, detected by class.

Pure data and name lookups: no torch, nothing from :mod:`mpu_bridge.mpu.reader`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..collection_mpu import CollectionMpu
from ..errors import MpuError
from ..kinds import KIND_BY_DIM

__all__ = [
    "DIMENSIONS",
    "COMBINED_DIMENSIONS",
    "ALL_DIMENSIONS",
    "QUERIES",
    "FLAVOURS",
    "DIMENSION_KINDS",
    "DIMENSION_DESCRIPTIONS",
    "Condition",
    "Getter",
    "Alias",
    "NAME_TABLES",
    "ALIASES",
    "FIXED_ORDERS",
    "candidate_names",
    "check_is_mpu",
    "detect_flavour",
]

#: The dimensions every reader answers (when the MPU can). ``gtp`` / ``egtp`` are
#: megatron-core 0.19's Generalized Tensor Parallelism (size 1 where the MPU has none).
DIMENSIONS: Tuple[str, ...] = ("tp", "pp", "dp", "cp", "sdp", "mp", "ep", "edp", "etp", "gtp", "egtp")

#: Combined groups some MPUs also hold (named by their :mod:`mpu_bridge.layout` kind),
#: useful for reusing the MPU's own communicators; the last four are megatron-core
#: 0.19's data-distribution groups and expert model-parallel group with GTP.
COMBINED_DIMENSIONS: Tuple[str, ...] = (
    "tp-cp", "tp-dp", "tp-dp-cp", "etp-ep", "etp-ep-pp", "gtp-dp", "gtp-dp-cp", "egtp-edp", "etp-ep-egtp-pp",
)

ALL_DIMENSIONS: Tuple[str, ...] = DIMENSIONS + COMBINED_DIMENSIONS

# Wordings the reader's messages have always used (tests and users match on them).
_DESCRIPTION_OVERRIDES = {
    "cp": "sequence / context parallel",
    "sdp": "sequence-data parallel (data x context)",
}

#: The four queries.
QUERIES: Tuple[str, ...] = ("world_size", "rank", "group", "ranks")

#: Flavours :func:`detect_flavour` can return.
FLAVOURS: Tuple[str, ...] = (
    "megatron-core",
    "megatron-lm-1",
    "megatron-lm-2",
    "megatron-deepspeed",
    "deepspeed-pipe-grid",
    "deepspeed-ulysses",
    "device-mesh",
    "pg-collection",
    "custom",
)

#: The :mod:`mpu_bridge.layout` kind each dimension corresponds to (from :mod:`mpu_bridge.kinds`).
DIMENSION_KINDS: Mapping[str, str] = MappingProxyType({dim: KIND_BY_DIM[dim].name for dim in ALL_DIMENSIONS})

#: What each dimension means, in words (from :mod:`mpu_bridge.kinds`).
DIMENSION_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {dim: _DESCRIPTION_OVERRIDES.get(dim, KIND_BY_DIM[dim].description) for dim in ALL_DIMENSIONS}
)

Condition = Tuple[str, str, int]  # (dim, "==" or ">", value), e.g. ("cp", ">", 1)


@dataclass(frozen=True)
class Getter:
    """One way to answer a query: call ``name(**kwargs)`` when ``when`` holds.

    ``when`` is ``(dim, op, value)`` with ``op`` in ``{"==", ">"}``, evaluated on the
    MPU's own sizes (a dimension the MPU has no names for counts as size 1).

    Example: ``Getter("get_data_parallel_group", (("with_context_parallel", True),),
    ("cp", ">", 1)).render()`` is
    ``"get_data_parallel_group(with_context_parallel=True) [when cp>1]"``.
    """

    name: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    when: Optional[Condition] = None

    def render(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:  # the tables are constant: render each getter once
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs)
        text = f"{self.name}({args})"
        if self.when is not None:
            dim, op, value = self.when
            text += f" [when {dim}{op}{value}]"
        return text


@dataclass(frozen=True)
class Alias:
    """Answer ``dim`` with ``target``'s answer when ``when`` holds (and the MPU has no
    names of its own that answered).

    ``when`` may also be ``("absent", name, 0)``: only when the MPU lacks ``name``.
    """

    target: str
    when: Optional[Condition] = None

    def render(self) -> str:
        if self.when is None:
            return f"same as {self.target}"
        if self.when[0] == "absent":
            return f"same as {self.target} (no {self.when[1]})"
        dim, op, value = self.when
        return f"same as {self.target} when {dim}{op}{value}"


_Table = Dict[Tuple[str, str], Tuple[Getter, ...]]


def _trio(
    dim: str,
    prefix: str,
    *,
    ranks: Sequence[str] = (),
    group_kwargs: Tuple[Tuple[str, Any], ...] = (),
    when: Optional[Condition] = None,
) -> _Table:
    """Candidates ``<prefix>_world_size``, ``<prefix>_rank``, ``<prefix>_group`` and the
    ranks getters ``<prefix>_group_ranks`` (DeepSpeed's spelling) plus ``ranks``."""
    ranks_names = tuple(ranks) if group_kwargs else (f"{prefix}_group_ranks",) + tuple(
        name for name in ranks if name != f"{prefix}_group_ranks"
    )
    return {
        (dim, "world_size"): (Getter(f"{prefix}_world_size", group_kwargs, when),),
        (dim, "rank"): (Getter(f"{prefix}_rank", group_kwargs, when),),
        (dim, "group"): (Getter(f"{prefix}_group", group_kwargs, when),),
        (dim, "ranks"): tuple(Getter(name, (), when) for name in ranks_names),
    }


def _merge(*tables: _Table) -> _Table:
    merged: Dict[Tuple[str, str], Tuple[Getter, ...]] = {}
    for table in tables:
        for key, getters in table.items():
            merged[key] = merged.get(key, ()) + getters
    return merged


def _only(table: _Table, **keep: Sequence[str]) -> _Table:
    """Keep only the listed queries of each dim, e.g. ``mp=("group",)``."""
    return {key: value for key, value in table.items() if key[0] not in keep or key[1] in keep[key[0]]}


_WITH_CP = (("with_context_parallel", True),)
_CP_GT_1: Condition = ("cp", ">", 1)
_CP_EQ_1: Condition = ("cp", "==", 1)
# megatron-core 0.19: the data-parallel getters answer the data-*distribution* group
# (spanning gtp_remat) by default; with_gtp_remat=False is the replicate group that
# gradient reduction and ZeRO use, the bridge's dp / sdp / edp. Older releases have
# no such parameter (the candidate is skipped) and their plain getter is the same group.
_REPLICATE = (("with_gtp_remat", False),)
_DISTRIBUTION = (("with_gtp_remat", True),)

_TP = _trio("tp", "get_tensor_model_parallel")
_PP = _trio("pp", "get_pipeline_model_parallel")
_DP = _merge(_trio("dp", "get_data_parallel", group_kwargs=_REPLICATE), _trio("dp", "get_data_parallel"))
_CONTEXT = _trio("cp", "get_context_parallel", ranks=("get_context_parallel_global_ranks",))
_SEQUENCE = _trio("cp", "get_sequence_parallel")
_SEQUENCE_DATA = _trio("sdp", "get_sequence_data_parallel")
_DP_WITH_CP = _merge(
    _trio("sdp", "get_data_parallel", group_kwargs=_WITH_CP + _REPLICATE, when=_CP_GT_1),
    _trio("sdp", "get_data_parallel", group_kwargs=_WITH_CP, when=_CP_GT_1),
)
_MP = _trio("mp", "get_model_parallel")
_EP = _trio("ep", "get_expert_model_parallel")
_GTP = _merge(
    _trio("gtp", "get_gtp_weight_remat", ranks=("get_gtp_weight_remat_global_ranks",)),
    _trio("egtp", "get_expert_gtp_weight_remat", ranks=("get_expert_gtp_weight_remat_global_ranks",)),
    _trio("gtp-dp", "get_data_parallel", group_kwargs=_DISTRIBUTION),
    _trio("gtp-dp-cp", "get_data_parallel", group_kwargs=_WITH_CP + _DISTRIBUTION),
    _trio("egtp-edp", "get_expert_data_parallel", group_kwargs=_DISTRIBUTION),
    {("etp-ep-egtp-pp", "group"): (Getter("get_expert_tensor_model_pipeline_parallel_group",
                                          (("with_egtp_remat", True),)),)},
)
_EDP = _merge(
    _trio("edp", "get_expert_data_parallel", group_kwargs=_REPLICATE),
    _trio("edp", "get_expert_data_parallel"),
    # megatron-core 0.7-0.9: the expert-data group that includes context parallelism
    _trio("edp", "get_data_modulo_expert_parallel", group_kwargs=_WITH_CP, when=_CP_GT_1),
    # megatron-core 0.4-0.9: without context parallelism (the same group when cp == 1)
    _trio("edp", "get_data_modulo_expert_parallel", when=_CP_EQ_1),
)
_ETP = _trio("etp", "get_expert_tensor_parallel")
_COMBINED = _merge(
    _trio("tp-cp", "get_tensor_and_context_parallel"),
    _trio("tp-dp", "get_tensor_and_data_parallel"),
    _trio("tp-dp-cp", "get_tensor_and_data_parallel", group_kwargs=_WITH_CP),
    _trio("etp-ep", "get_expert_tensor_and_model_parallel"),
    _trio("etp-ep", "get_tensor_and_expert_parallel"),  # megatron-core < 0.10 (etp = tp)
    {
        ("etp-ep-pp", "group"): (
            Getter("get_expert_tensor_model_pipeline_parallel_group"),
            # megatron-core 0.6-0.9: the model-parallel group of the expert layout (etp = tp)
            Getter("get_model_parallel_group", (("with_expert_parallel", True),)),
        )
    },
)
_PIPE_GRID = _merge(
    _trio("tp", "get_slice_parallel"),
    _only(_TP, tp=("world_size", "rank")),
    _trio("pp", "get_pipe_parallel"),
    _only(_PP, pp=("world_size", "rank")),
    _DP,
    _MP,
    # not DeepSpeed's grid, but objects shaped like it (legacy adapters) may add these:
    _SEQUENCE,
    _SEQUENCE_DATA,
)

_FLAVOUR_TABLES: Dict[str, _Table] = {
    "megatron-core": _merge(
        _TP, _PP, _DP, _CONTEXT, _DP_WITH_CP, _only(_MP, mp=("group",)), _EP, _EDP, _ETP, _COMBINED, _GTP
    ),
    # Megatron-LM 1.0: get_model_parallel_* is the tensor-parallel group (no pipeline).
    "megatron-lm-1": _merge(_trio("tp", "get_model_parallel"), _DP, _MP),
    # Megatron-LM 2.x: tensor/pipeline/data getters; only the group for TP×PP.
    "megatron-lm-2": _merge(_TP, _PP, _DP, _only(_MP, mp=("group",))),
    # Megatron-DeepSpeed: its get_model_parallel_world_size/rank mean TP and refuse PP > 1.
    "megatron-deepspeed": _merge(
        _TP, _PP, _DP, _SEQUENCE, _SEQUENCE_DATA, _only(_MP, mp=("group",))
    ),
    "deepspeed-pipe-grid": _PIPE_GRID,
    # DeepSpeed's Ulysses MPU: get_model_parallel_* alias sequence parallelism: not used.
    "deepspeed-ulysses": _merge(_SEQUENCE, _SEQUENCE_DATA),
    # A DeviceMesh read through mpu_bridge.mesh.MeshMpu: megatron-core's names for the
    # dims the mesh has (tp, pp, cp, dp and dp with cp; ep, expert data and expert TP when
    # the mesh names them). It has no combined or pre-0.10 names, and no record in
    # compat/surfaces (it exists only over a live mesh: see compat/README.md).
    # A ProcessGroupCollection read through mpu_bridge.collection_mpu.CollectionMpu:
    # megatron-core's group getters for the fields it holds (sizes come from the groups).
    "pg-collection": _merge(
        _TP, _PP, _DP, _CONTEXT, _DP_WITH_CP, _only(_MP, mp=("group",)), _EP, _EDP, _ETP, _COMBINED, _GTP
    ),
    "device-mesh": _merge(
        _TP, _PP, _DP, _trio("cp", "get_context_parallel"), _DP_WITH_CP, _EP,
        _trio("edp", "get_expert_data_parallel"), _ETP,
    ),
    "custom": _merge(
        _TP,
        _trio("tp", "get_slice_parallel"),
        _PP,
        _trio("pp", "get_pipe_parallel"),
        _DP,
        _CONTEXT,
        _SEQUENCE,
        _SEQUENCE_DATA,
        _DP_WITH_CP,
        _MP,
        _EP,
        _EDP,
        _ETP,
        _COMBINED,
        _GTP,
    ),
}

#: Every getter name any flavour reads.
_ALL_GETTER_NAMES: Tuple[str, ...] = tuple(
    sorted({g.name for table in _FLAVOUR_TABLES.values() for getters in table.values() for g in getters})
)

#: Per flavour, per (dimension, query): the candidates, tried in order (read-only).
NAME_TABLES: Mapping[str, Mapping[Tuple[str, str], Tuple[Getter, ...]]] = {
    flavour: MappingProxyType(table) for flavour, table in _FLAVOUR_TABLES.items()
}

def _aliases(flavour: str) -> Dict[str, Tuple[Alias, ...]]:
    aliases: Dict[str, Tuple[Alias, ...]] = {
        "sdp": (Alias("dp", _CP_EQ_1),),
        "mp": (Alias("tp", ("pp", "==", 1)),),
        "tp-dp-cp": (Alias("tp-dp", _CP_EQ_1),),
    }
    if flavour in ("megatron-core", "pg-collection"):
        # without GTP (size 1, or a release before megatron-core 0.19) the distribution
        # groups are the replicate ones
        aliases["gtp-dp"] = (Alias("dp", ("gtp", "==", 1)),)
        aliases["gtp-dp-cp"] = (Alias("sdp", ("gtp", "==", 1)),)
        aliases["egtp-edp"] = (Alias("edp", ("egtp", "==", 1)),)
        aliases["etp-ep-egtp-pp"] = (Alias("etp-ep-pp", ("egtp", "==", 1)),)
    if flavour in ("megatron-core", "device-mesh", "pg-collection"):
        # megatron-core < 0.10 has no expert-tensor parallelism: experts use the TP group;
        # a mesh without a flattened "etp" dim keeps experts on the TP group too.
        aliases["etp"] = (Alias("tp", ("absent", "get_expert_tensor_parallel_world_size", 0)),)
    return aliases


#: Per flavour: aliases tried after a dimension's own names (read-only).
ALIASES: Mapping[str, Mapping[str, Tuple[Alias, ...]]] = {
    flavour: MappingProxyType(_aliases(flavour)) for flavour in FLAVOURS
}

#: Rank layouts that are fixed by the flavour's own code (megatron order strings).
FIXED_ORDERS: Mapping[str, str] = {
    "megatron-lm-1": "tp-dp-pp",
    "megatron-lm-2": "tp-dp-pp",
    "megatron-deepspeed": "tp-cp-dp-pp",
    "deepspeed-ulysses": "tp-cp-dp-pp",
}

_GRID_AXIS_TOKENS = {"model": "tp", "data": "dp", "pipe": "pp"}


def _has(mpu: Any, name: str) -> bool:
    """Whether ``mpu`` has a callable ``name``; a lookup that raises anything but
    AttributeError (a property that raises) is an MpuError naming it, not "absent"."""
    try:
        return callable(getattr(mpu, name))
    except AttributeError:
        return False
    except Exception as exc:
        raise MpuError(
            f"reading {name} from the MPU {_short(mpu)} raised {type(exc).__name__}: {exc}; "
            "an MPU's getters must be plain functions or methods"
        ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: Built-in values that are never an MPU (a common slip: the module's *name* as a string).
_NOT_MPUS = (str, bytes, bool, int, float, complex, dict, list, tuple, set, frozenset)


def check_is_mpu(mpu: Any) -> None:
    """Raise MpuError unless ``mpu`` looks like an MPU: an object or module with at least
    one getter any flavour reads (e.g. ``get_tensor_model_parallel_world_size``).

    Example: ``check_is_mpu("megatron.core.parallel_state")`` raises (a string, not the module).
    """
    what = (
        "pass megatron.core.parallel_state (the module itself), an old Megatron-LM mpu, DeepSpeed's "
        "PipelineParallelGrid, or an object with getters such as get_tensor_model_parallel_world_size, "
        "get_data_parallel_group or get_model_parallel_world_size"
    )
    if mpu is None:
        raise MpuError(f"no MPU given; {what}")
    if isinstance(mpu, _NOT_MPUS):
        hint = " (import it instead of naming it)" if isinstance(mpu, str) else ""
        raise MpuError(f"{_short(mpu)} is a {type(mpu).__name__}{hint}, not an MPU; {what}")
    if not any(_has(mpu, name) for name in _ALL_GETTER_NAMES):
        raise MpuError(f"{_short(mpu)} has none of the getters an MPU provides; {what}")


def _is_mesh_mpu(mpu: Any) -> bool:
    """Whether ``mpu`` is a :class:`mpu_bridge.mesh.MeshMpu`, without importing torch: a
    MeshMpu exists only once :mod:`mpu_bridge.mesh` (which imports torch) was imported."""
    mesh = sys.modules.get("mpu_bridge.mesh")
    cls = getattr(mesh, "MeshMpu", None)
    return isinstance(cls, type) and issubclass(type(mpu), cls)  # type(): no __class__ lookup on mpu


def detect_flavour(mpu: Any) -> str:
    """Which kind of MPU ``mpu`` is, from the names it has (and its module name).

    Example: ``detect_flavour(megatron.core.parallel_state)`` -> ``"megatron-core"``;
    ``detect_flavour(MeshMpu(mesh))`` (what ``attach(mesh)`` reads) -> ``"device-mesh"``.
    """
    if _is_mesh_mpu(mpu):
        return "device-mesh"
    if isinstance(mpu, CollectionMpu):
        return "pg-collection"
    if _has(mpu, "initialize_sequence_parallel"):
        return "deepspeed-ulysses"
    if _has(mpu, "get_pipe_parallel_world_size") or _has(mpu, "get_slice_parallel_world_size"):
        return "deepspeed-pipe-grid"
    has_tensor = _has(mpu, "get_tensor_model_parallel_world_size")
    if has_tensor and (
        _has(mpu, "get_sequence_parallel_world_size") or _has(mpu, "get_sequence_data_parallel_group")
    ):
        return "megatron-deepspeed"
    module_name = getattr(mpu, "__name__", "") if inspect.ismodule(mpu) else ""
    if has_tensor and (
        module_name.startswith("megatron.core")
        or _has(mpu, "get_context_parallel_world_size")
        or _has(mpu, "get_expert_model_parallel_world_size")
    ):
        return "megatron-core"
    if has_tensor and _has(mpu, "get_pipeline_model_parallel_world_size"):
        return "megatron-lm-2"
    legacy_only = _has(mpu, "get_model_parallel_world_size") and not any(
        _has(mpu, name)
        for name in (
            "get_tensor_model_parallel_world_size",
            "get_pipeline_model_parallel_world_size",
            "get_context_parallel_world_size",
            "get_sequence_parallel_world_size",
            "get_expert_model_parallel_world_size",
        )
    )
    if legacy_only:
        return "megatron-lm-1"
    return "custom"



def candidate_names(flavour: str) -> List[Tuple[str, str, Getter]]:
    """``(dim, query, getter)`` for every candidate of ``flavour``, in table order.

    Example: ``("sdp", "group", Getter("get_sequence_data_parallel_group"))`` is among
    ``candidate_names("megatron-deepspeed")``.
    """
    if flavour not in NAME_TABLES:
        raise MpuError(f"unknown MPU flavour {flavour!r}; valid flavours: {', '.join(FLAVOURS)}")
    return [(dim, query, g) for (dim, query), gs in NAME_TABLES[flavour].items() for g in gs]
