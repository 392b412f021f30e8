"""Export to megatron-core: the bridge's groups as a ``ProcessGroupCollection``.

:func:`process_group_collection` (``Bridge.process_group_collection``) returns
megatron-core's own ``megatron.core.process_groups_config.ProcessGroupCollection``
with every field the installed release declares (of the 27 names of :data:`FIELDS`:
twenty in 0.15.0-0.17, 22 in 0.18 with the all-gather twins, all
27 in 0.19 with Generalized Tensor Parallelism), so a model, DDP, an optimizer or
``finalize_model_grads`` that takes ``pg_collection=`` runs over the bridge's groups.

Under GTP (megatron-core 0.19) ``dp``, ``dp_cp`` and ``expt_dp`` are the *replicate*
groups (``with_gtp_remat=False``, what megatron-core's own collection holds);
``dp_cp_gtp_remat`` and ``expt_dp_gtp_remat`` the data-distribution groups.

The all-gather fields ``dp_cp_ag`` and ``expt_dp_ag`` (megatron-core >= 0.18) are None,
as in megatron-core's ``use_mpu_process_groups()``, unless asked for with
``all_gather=True``: then each is a communicator of its own over the ranks of
``dp_cp`` / ``expt_dp`` (``expt_dp_ag`` only with ep > 1, as megatron-core's
``create_all_gather_groups``), so parameter all-gathers overlap gradient
reduce-scatters. They live on a channel of their own in the registry (``"ag"``): the
one documented exception to "one communicator per rank set", and the communicator
budget counts them. Within that channel the rule holds again: where the two twins'
ranks are equal (dp·cp = edp), they share one communicator.

Where each field comes from:

* **over an MPU** that has megatron-core's getters (``parallel_state``): each field is
  what that getter returns, called as ``use_mpu_process_groups()`` calls it -- the
  MPU's own objects, nothing created, no communication. A field with a kind is
  checked against the bridge's layout (MpuError if its ranks differ); ``embd`` and
  ``pos_embd`` are taken as they are (megatron-core lets the user choose their
  stages). Fields whose getter the MPU lacks (another flavour) are derived as standalone;
* **standalone** (``attach(None, tp=..., ...)``, or a field the MPU does not answer):
  the fields with a kind in :mod:`mpu_bridge.kinds` (its ``pg_field`` column) are
  :meth:`Bridge.group` of that kind; ``embd`` / ``pos_embd`` are the
  :func:`~mpu_bridge.partitions.embedding` / :func:`~mpu_bridge.partitions.position_embedding`
  families (None on ranks outside, as in megatron-core); and, as megatron-core does
  with one distributed-optimizer instance and no hierarchical context parallelism:
  ``hcp`` None, ``intra_dp_cp`` = ``dp_cp``, ``intra_expt_dp`` = ``expt_dp``,
  ``inter_dist_opt`` None, ``intra_dist_opt`` the whole world, :meth:`Bridge.world`: the
  default group, which already holds that rank set (megatron-core creates a second
  world group for it).

Groups are created (lazily, one communicator per rank set, agreed across ranks)
only by the bridge and its registry, never here. Collective the first time, like
every group request; asking again is local and returns a new collection holding the
same group objects.

Example (every rank)::

    bridge = mpu_bridge.attach(None, tp=2, pp=2)
    pgc = bridge.process_group_collection()
    model = GPTModel(config, spec, vocab_size, max_len, pg_collection=pgc)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from importlib import metadata
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import torch.distributed as dist

from . import partitions
from .bridge_base import Outside
from .errors import MpuError
from .kinds import KIND_TABLE
from .optional import MissingDependencyError, require

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = [
    "ALL_GATHER_FIELDS",
    "FIELDS",
    "declared_fields",
    "FIRST_RELEASE",
    "FIELD_KINDS",
    "collection_class",
    "collection_groups",
    "process_group_collection",
]

#: The first megatron-core release with ``ProcessGroupCollection`` (0.12 to 0.14 have
#: ``ModelCommProcessGroups`` and ``GradCommProcessGroups`` instead).
FIRST_RELEASE = "0.15.0"

#: Every field of ``ProcessGroupCollection`` the bridge fills, in megatron-core 0.19.2's
#: order (27); a release's class declares a subset (20 in 0.15.0-0.17), and only those are set.
FIELDS: Tuple[str, ...] = (
    "tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "hcp", "ep", "expt_tp", "tp_ep",
    "tp_ep_pp", "tp_ep_pp_with_egtp_remat", "tp_dp_cp", "dp", "dp_cp", "dp_cp_gtp_remat", "dp_cp_ag",
    "gtp_remat", "expt_gtp_remat", "expt_dp", "expt_dp_gtp_remat", "expt_dp_ag", "intra_dp_cp",
    "intra_expt_dp", "inter_dist_opt", "intra_dist_opt",
)

#: The all-gather twins: field -> the field whose ranks they share (their own communicator).
ALL_GATHER_FIELDS: Mapping[str, str] = {"dp_cp_ag": "dp_cp", "expt_dp_ag": "expt_dp"}

#: Field -> kind name, from the kind table's ``pg_field`` column.
FIELD_KINDS: Mapping[str, str] = {k.pg_field: k.name for k in KIND_TABLE if k.pg_field}

_NO_CHECK: Dict[str, Any] = {"check_initialized": False}
_REPLICATE: Dict[str, Any] = {"with_gtp_remat": False}
#: Keyword arguments megatron-core < 0.19 lacks; dropped where the getter has no such
#: parameter (without GTP its plain answer is the same group). Every answer is checked
#: against the layout anyway.
_SINCE_GTP = frozenset({"with_gtp_remat", "with_egtp_remat"})
#: Field -> (getter of megatron-core's ``parallel_state``, keyword arguments), as
#: ``use_mpu_process_groups()`` calls them in 0.19.2 (0.16.1 without the GTP arguments).
_MPU_GETTERS: Mapping[str, Tuple[str, Dict[str, Any]]] = {
    "tp": ("get_tensor_model_parallel_group", _NO_CHECK),
    "pp": ("get_pipeline_model_parallel_group", _NO_CHECK),
    "mp": ("get_model_parallel_group", _NO_CHECK),
    "cp": ("get_context_parallel_group", _NO_CHECK),
    "tp_cp": ("get_tensor_and_context_parallel_group", _NO_CHECK),
    "hcp": ("get_hierarchical_context_parallel_groups", _NO_CHECK),
    "ep": ("get_expert_model_parallel_group", _NO_CHECK),
    "expt_tp": ("get_expert_tensor_parallel_group", _NO_CHECK),
    "tp_ep": ("get_expert_tensor_and_model_parallel_group", _NO_CHECK),
    "tp_ep_pp": ("get_expert_tensor_model_pipeline_parallel_group", _NO_CHECK),
    "tp_ep_pp_with_egtp_remat": (
        "get_expert_tensor_model_pipeline_parallel_group", {**_NO_CHECK, "with_egtp_remat": True}
    ),
    "embd": ("get_embedding_group", _NO_CHECK),
    "pos_embd": ("get_position_embedding_group", _NO_CHECK),
    "dp": ("get_data_parallel_group", _REPLICATE),
    "dp_cp": ("get_data_parallel_group", {"with_context_parallel": True, **_REPLICATE}),
    "dp_cp_gtp_remat": ("get_data_parallel_group", {"with_context_parallel": True, "with_gtp_remat": True}),
    "intra_dp_cp": (
        "get_data_parallel_group", {"with_context_parallel": True, **_REPLICATE, "partial_data_parallel": True}
    ),
    "intra_expt_dp": (
        "get_expert_data_parallel_group", {**_NO_CHECK, **_REPLICATE, "partial_expert_data_parallel": True}
    ),
    "inter_dist_opt": ("get_inter_distributed_optimizer_instance_group", _NO_CHECK),
    "intra_dist_opt": ("get_intra_distributed_optimizer_instance_group", _NO_CHECK),
    "expt_dp": ("get_expert_data_parallel_group", {**_NO_CHECK, **_REPLICATE}),
    "expt_dp_gtp_remat": ("get_expert_data_parallel_group", {**_NO_CHECK, "with_gtp_remat": True}),
    "tp_dp_cp": ("get_tensor_and_data_parallel_group", {**_NO_CHECK, "with_context_parallel": True}),
    "gtp_remat": ("get_gtp_weight_remat_group", _NO_CHECK),
    "expt_gtp_remat": ("get_expert_gtp_weight_remat_group", _NO_CHECK),
}

#: Fields that may be None on some or all ranks in megatron-core (taken as the MPU gives them).
_MAY_BE_NONE = frozenset({"embd", "pos_embd", "hcp", "inter_dist_opt"})


def _megatron_version() -> str:
    try:
        from megatron.core import package_info

        return str(package_info.__version__)
    except (ImportError, AttributeError):
        try:
            return metadata.version("megatron-core")
        except metadata.PackageNotFoundError:
            return "unknown"


def collection_class(module: Optional[Any] = None, version: Optional[str] = None) -> Any:
    """megatron-core's ``ProcessGroupCollection`` class; MissingDependencyError when
    megatron-core is missing or older than :data:`FIRST_RELEASE`.

    ``module`` and ``version`` default to the installed ``megatron.core.process_groups_config``
    and megatron-core's version (given, they say where the class is looked up).

    Example: ``collection_class().__name__ == "ProcessGroupCollection"``; on
    megatron-core 0.14.0 it raises ``MissingDependencyError("megatron-core 0.14.0 has no
    ProcessGroupCollection ... first in megatron-core 0.15.0 ...")``.
    """
    if module is None:
        require("megatron.core", package="megatron-core", extra="megatron",
                needed_for="Bridge.process_group_collection()")
        try:
            module = importlib.import_module("megatron.core.process_groups_config")
        except ImportError:  # megatron-core < 0.12 has no such module
            module = None
    cls = getattr(module, "ProcessGroupCollection", None)
    if isinstance(cls, type):
        return cls
    found = version or _megatron_version()
    raise MissingDependencyError(
        f"megatron-core {found} has no megatron.core.process_groups_config.ProcessGroupCollection; "
        f"the class is first in megatron-core {FIRST_RELEASE} (0.12-0.14 have ModelCommProcessGroups "
        f"and GradCommProcessGroups instead): pip install 'megatron-core>={FIRST_RELEASE}'"
    )


def _ranks(group: Any) -> List[int]:
    return sorted(dist.get_process_group_ranks(group))


def _from_mpu(bridge: "Bridge", mpu: object, fields: Tuple[str, ...]) -> Dict[str, Any]:
    """The ``fields`` the MPU answers itself (its own objects), checked against the layout."""
    layout, rank = bridge.layout, bridge.rank
    out: Dict[str, Any] = {}
    for field in fields:
        if field not in _MPU_GETTERS:
            continue
        name, kwargs = _MPU_GETTERS[field]
        getter = getattr(mpu, name, None)
        if not callable(getter):
            continue
        kwargs = _supported(getter, kwargs)
        try:
            group = getter(**kwargs)
        except (AssertionError, TypeError, RuntimeError, ValueError):
            continue  # not initialised, or an older signature: derive it instead
        if group is None and field not in _MAY_BE_NONE:
            continue
        if field in FIELD_KINDS:  # embd / pos_embd: the MPU's own choice of stages is the truth
            want = layout.group_of(FIELD_KINDS[field], rank)
            have = _ranks(group)
            if have != want:
                raise MpuError(
                    f"rank {rank}: the MPU's {name}({_kwargs(kwargs)}) holds ranks {have}, but its layout "
                    f"({partitions.layout_signature(layout)}) says {want}; the MPU's groups and sizes disagree"
                )
        out[field] = group
    return out


def _supported(getter: Any, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """``kwargs`` less the GTP-era ones ``getter`` does not take (megatron-core < 0.19)."""
    try:
        params = inspect.signature(getter).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params or k not in _SINCE_GTP}


def _kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _embedding_groups(bridge: "Bridge") -> Tuple[Any, Any]:
    """This rank's (embedding, position embedding) group objects, or None where it is in none."""
    embd, pos = bridge.embedding_groups()
    return (None if embd is None else embd.group), (None if pos is None else pos.group)


def collection_groups(
    bridge: "Bridge", fields: Tuple[str, ...] = FIELDS, *, all_gather: bool = False
) -> Dict[str, Any]:
    """Field -> group (or None, or a list for ``hcp``) for each name of ``fields`` (a
    subset of :data:`FIELDS`, in that order; default all of them).

    The fields the MPU answers are its own objects (local); the rest come from the
    bridge (collective the first time). ``all_gather`` creates the all-gather twins
    (see the module docstring). Example:
    ``collection_groups(bridge)["tp"] is bridge.tensor_parallel().group`` over megatron-core.
    """
    wanted = [f for f in FIELDS if f in fields]  # fixed order: every rank makes the same requests
    needs = set(wanted) | {ALL_GATHER_FIELDS[f] for f in wanted if f in ALL_GATHER_FIELDS}
    reader = bridge.reader
    ordered = tuple(f for f in FIELDS if f in needs)
    out = _from_mpu(bridge, reader.mpu, ordered) if reader is not None else {}
    held = getattr(reader.mpu, "all_gather_groups", {}) if reader is not None else {}
    bridge.prepare(_kinds_to_make(bridge, ordered, out, held, all_gather))  # one agreement round
    # then, apart, what leaves ranks out (every covering rank set is registered first): the
    # embedding groups, and a rank span's group of all its ranks (the world's needs no round)
    embedding = bool(needs & {"embd", "pos_embd"}) and ("embd" not in out or "pos_embd" not in out)
    bridge.prepare([], embedding=embedding, world="intra_dist_opt" in needs and "intra_dist_opt" not in out)
    if not bridge.layout.holds(bridge.rank):  # took part in both rounds, holds none of the groups
        raise Outside(bridge.rank, bridge.layout).error()
    for field in ordered:
        if field in out or field in ALL_GATHER_FIELDS or field in ("embd", "pos_embd"):
            continue
        if field in FIELD_KINDS:
            out[field] = bridge.group(FIELD_KINDS[field]).group
        elif field in ("hcp", "inter_dist_opt"):
            out[field] = None  # megatron-core: no hierarchical CP, one optimizer instance
        elif field == "intra_dist_opt":
            out[field] = bridge.world().group  # one optimizer instance: the whole world
        elif field == "intra_dp_cp":
            out[field] = out.get("dp_cp") or bridge.group("dp-cp").group
        elif field == "intra_expt_dp":
            out[field] = out.get("expt_dp") or bridge.group("edp").group
    if embedding:
        embd, pos = _embedding_groups(bridge)
        out.setdefault("embd", embd)
        out.setdefault("pos_embd", pos)
    for field in ALL_GATHER_FIELDS:
        if field in needs:  # last: their own communicators, created only when asked for (or a collection's own)
            own = held.get(field)
            if own is not None:
                _check_held(bridge, field, own)
            out[field] = own or (_all_gather_group(bridge, field) if all_gather else None)
    return {field: out[field] for field in wanted}


def _kinds_to_make(
    bridge: "Bridge", ordered: Tuple[str, ...], out: Mapping[str, Any], held: Mapping[str, Any], all_gather: bool
) -> List[str]:
    """The kinds :func:`collection_groups` asks the bridge for, in its order: every field's the
    MPU did not answer, except the embedding groups (they leave ranks out: asked for apart,
    after these, so every covering rank set is registered first)."""
    kinds: List[str] = []
    for field in ordered:
        if field in out or field in ("embd", "pos_embd", "hcp", "inter_dist_opt", "intra_dist_opt"):
            continue
        if field in ALL_GATHER_FIELDS:
            if all_gather and held.get(field) is None and not (field == "expt_dp_ag" and bridge.layout.config.ep == 1):
                kinds.append(FIELD_KINDS[field])
        elif field == "intra_dp_cp" or field == "intra_expt_dp":
            twin = "dp_cp" if field == "intra_dp_cp" else "expt_dp"
            if twin not in out:
                kinds.append("dp-cp" if field == "intra_dp_cp" else "edp")
        elif field in FIELD_KINDS:
            kinds.append(FIELD_KINDS[field])
    return list(dict.fromkeys(kinds))


def _check_held(bridge: "Bridge", field: str, group: Any) -> None:
    """MpuError unless a collection's own ``field`` group holds the layout's ranks."""
    want = bridge.layout.group_of(FIELD_KINDS[field], bridge.rank)
    have = _ranks(group)
    if have != want:
        raise MpuError(
            f"rank {bridge.rank}: the collection's {field} holds ranks {have}, but its layout "
            f"({partitions.layout_signature(bridge.layout)}) says {want}; its groups and sizes disagree"
        )


def _all_gather_group(bridge: "Bridge", field: str) -> Any:
    """The all-gather twin of ``field``'s twin (its own communicator); None for
    ``expt_dp_ag`` without expert parallelism, as in megatron-core."""
    kind = FIELD_KINDS[field]
    if field == "expt_dp_ag" and bridge.layout.config.ep == 1:
        return None
    return bridge.group(kind).group  # a twin kind: its own channel in the registry


def declared_fields(cls: Any) -> Tuple[str, ...]:
    """The names of :data:`FIELDS` that ``cls`` (a ``ProcessGroupCollection`` class) declares."""
    names = {f.name for f in dataclasses.fields(cls)}
    return tuple(f for f in FIELDS if f in names)


def process_group_collection(bridge: "Bridge", *, all_gather: bool = False) -> Any:
    """megatron-core's ``ProcessGroupCollection`` over ``bridge``'s groups, every field the
    installed release declares (see the module docstring).

    Raises MissingDependencyError (a BridgeError) where megatron-core is missing or
    older than :data:`FIRST_RELEASE`, before any communication.

    Example: ``process_group_collection(bridge).dp is bridge.data_parallel().group``.
    """
    cls = collection_class()
    groups = collection_groups(bridge, declared_fields(cls), all_gather=all_gather)
    return cls(**groups)
