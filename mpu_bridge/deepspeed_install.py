"""Hand the bridge's expert groups to DeepSpeed, so its MoE layers use them.

DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``) looks its groups up by name
(``"ep_size_<n>"``) in four tables of ``deepspeed.utils.groups`` and creates
groups of its own only when the name is missing there. :func:`install_expert_groups`
creates the groups through the bridge (reusing any rank set that already has a
communicator) and fills those tables, so every MoE layer of that size, and
DeepSpeed's expert-gradient reduction, runs over the bridge's groups.

Call it on every rank before ``deepspeed.initialize`` (that is when the MoE
layers bind their groups). DeepSpeed is imported only inside these functions.

Example (every rank)::

    bridge = mpu_bridge.attach(parallel_state)
    install_expert_groups(bridge, ep_size=2)
    model = MyModel(moe=MoE(hidden, expert, num_experts=4, ep_size=2))
    engine, *_ = deepspeed.initialize(model=model, mpu=bridge.as_legacy_mpu(), ...)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import MutableMapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, List, Optional

from .errors import BridgeError

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge, ExpertGroups

__all__ = ["install_expert_groups", "uninstall_expert_groups", "deepspeed_groups_module"]

logger = logging.getLogger(__name__)

_GROUPS_MODULE = "deepspeed.utils.groups"
_EP_TABLE = "_EXPERT_PARALLEL_GROUP"
_EP_RANKS_TABLE = "_EXPERT_PARALLEL_GROUP_RANKS"
_EDP_TABLE = "_EXPERT_DATA_PARALLEL_GROUP"
_EDP_RANKS_TABLE = "_EXPERT_DATA_PARALLEL_GROUP_RANKS"
_TABLES = (_EP_TABLE, _EDP_TABLE)  # every DeepSpeed with MoE (0.6 to 0.19)
# Rank tables beside them, where the DeepSpeed version has them (0.17 and later).
_RANKS_TABLES = {_EP_TABLE: _EP_RANKS_TABLE, _EDP_TABLE: _EDP_RANKS_TABLE}
# DeepSpeed's record of the expert tensor-parallel size (set by its E+M+D path).
_ETP_SIZE = "expert_tensor_parallel_world_size"


def _deepspeed_version() -> str:
    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "unknown"


def deepspeed_groups_module() -> Any:
    """``deepspeed.utils.groups``, checked to hold the expert-group tables.

    Raises :class:`~mpu_bridge.errors.BridgeError` when DeepSpeed cannot be
    imported, or when this DeepSpeed version keeps its tables elsewhere (the
    message names the version and the missing tables).
    """
    try:
        module = importlib.import_module(_GROUPS_MODULE)
    except ImportError as exc:
        raise BridgeError(
            f"DeepSpeed is not available ({_GROUPS_MODULE} cannot be imported: {exc}); install "
            "deepspeed (pip install 'mpu-bridge[deepspeed]') or use bridge.expert_groups() directly"
        ) from exc
    missing = [name for name in _TABLES if not isinstance(getattr(module, name, None), MutableMapping)]
    if missing:
        raise BridgeError(
            f"DeepSpeed {_deepspeed_version()} has no expert-group tables {', '.join(missing)} in "
            f"{_GROUPS_MODULE} (expected dicts, as in DeepSpeed 0.6 to 0.19); this DeepSpeed version "
            "is not supported by install_expert_groups: pass the groups from bridge.expert_groups() "
            "to your MoE layers yourself"
        )
    return module


def _ranks_table(module: Any, table: str) -> Optional[MutableMapping]:
    """The rank table beside ``table``, or None where this DeepSpeed keeps none."""
    ranks = getattr(module, _RANKS_TABLES[table], None)
    return ranks if isinstance(ranks, MutableMapping) else None


def install_expert_groups(
    bridge: "Bridge",
    ep_size: int,
    *,
    data_before_expert: Optional[bool] = None,
    expert_tensor_parallel: bool = True,
) -> "ExpertGroups":
    """Create the ``ep_size`` expert groups through ``bridge`` and register them in DeepSpeed.

    Fills ``deepspeed.utils.groups``' ``_EXPERT_PARALLEL_GROUP[_RANKS]`` and
    ``_EXPERT_DATA_PARALLEL_GROUP[_RANKS]`` under ``"ep_size_<ep_size>"`` with this
    rank's groups (the ``_RANKS`` tables where the DeepSpeed version has them), and,
    when the experts are tensor-parallel (expert-TP > 1), sets DeepSpeed's
    ``expert_tensor_parallel_world_size`` as its own E+M+D path does.
    ``data_before_expert`` as in :meth:`Bridge.expert_groups` (``None``: the MPU's order).
    Collective: call on every rank, before ``deepspeed.initialize``. Installing the
    same groups again is a no-op.

    Raises :class:`~mpu_bridge.errors.BridgeError` if DeepSpeed is missing or keeps
    its tables elsewhere (checked before any group is created), or if DeepSpeed
    already holds *other* groups under that name.

    Example: ``install_expert_groups(bridge, 2).expert_parallel.ranks`` -> ``(0, 1)`` on rank 0 of 4.
    """
    module = deepspeed_groups_module()
    name = f"ep_size_{ep_size}"
    experts = bridge.expert_groups(
        ep_size, data_before_expert=data_before_expert, expert_tensor_parallel=expert_tensor_parallel
    )
    ep_info, edp_info = experts.expert_parallel, experts.expert_data_parallel
    present = {table: getattr(module, table).get(name) for table in _TABLES}
    if any(group is not None for group in present.values()):
        if present[_EP_TABLE] is ep_info.group and present[_EDP_TABLE] is edp_info.group:
            return experts
        theirs = present[_EP_TABLE]
        held = _group_ranks(theirs) if theirs is not None else []
        raise BridgeError(
            f"DeepSpeed already holds expert groups named {name!r} that mpu-bridge did not create "
            f"(expert-parallel ranks {held} on rank {bridge.rank}, the bridge's are "
            f"{list(ep_info.ranks)}); call install_expert_groups before deepspeed.initialize "
            "and before any MoE layer creates its groups"
        )
    for table, info in ((_EP_TABLE, ep_info), (_EDP_TABLE, edp_info)):
        getattr(module, table)[name] = info.group
        ranks = _ranks_table(module, table)
        if ranks is not None:
            ranks[name] = list(info.ranks)
    etp = experts.layout.config.etp or 1
    if etp > 1 and hasattr(module, _ETP_SIZE):
        setattr(module, _ETP_SIZE, etp)
    logger.info(
        "mpu-bridge: installed DeepSpeed expert groups %s on rank %d: expert parallel %s, "
        "expert data parallel %s",
        name,
        bridge.rank,
        list(ep_info.ranks),
        list(edp_info.ranks),
    )
    return experts


def uninstall_expert_groups(bridge: "Bridge") -> List[str]:
    """Remove from DeepSpeed's tables every expert group ``bridge`` installed; return their names.

    Call before ``bridge.close()`` so DeepSpeed keeps no destroyed group. Entries
    DeepSpeed created itself are left alone.

    Example: ``uninstall_expert_groups(bridge)`` -> ``["ep_size_2"]``.
    """
    module = deepspeed_groups_module()
    removed = []
    for name in bridge.expert_group_names():
        experts = bridge.get_expert_groups(name)
        pairs = ((_EP_TABLE, experts.expert_parallel.group), (_EDP_TABLE, experts.expert_data_parallel.group))
        hit = False
        for table, group in pairs:
            if getattr(module, table).get(name) is group:
                del getattr(module, table)[name]
                ranks = _ranks_table(module, table)
                if ranks is not None:
                    ranks.pop(name, None)
                hit = True
        if hit:
            removed.append(name)
    return removed


def _group_ranks(group: Any) -> List[int]:
    """The global ranks of ``group`` (for messages), or [] if torch does not know it."""
    try:
        import torch.distributed as dist

        return list(dist.get_process_group_ranks(group))
    except Exception:  # a destroyed or foreign group: the message says less, nothing fails
        return []
