"""Hand the bridge's expert and hpZ groups to DeepSpeed, so its MoE layers and ZeRO-3 use them.

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

ZeRO++ hpZ (``zero_hpz_partition_size``) keeps one secondary-partition group per
process in ``deepspeed.utils.groups._ZERO_PARAM_INTRA_PARALLEL_GROUP``. DeepSpeed
creates it as contiguous blocks of the *world* (blocks that mix tensor-parallel
ranks under TP), and ``deepspeed.zero.Init`` creates it again whenever its
``zero_param_parallel_group`` argument is None, which fails the second time
("ZeRO parameter intra parallel group is already initialized": a second model
in one process). :func:`install_hpz_group` puts the bridge's hpZ group there
instead (blocks of the data-parallel group, :meth:`Bridge.zero_param_groups`);
ZeRO-3 engines then find it and create none, and ``zero.Init`` gets it as
``zero_param_parallel_group=``::

    hpz = install_hpz_group(bridge, 2)
    mpu = bridge.as_legacy_mpu()
    with deepspeed.zero.Init(config_dict_or_path=config, mpu=mpu, data_parallel_group=bridge.data_parallel().group,
                             zero_param_parallel_group=hpz.group):
        model = MyModel()
    engine, *_ = deepspeed.initialize(model=model, config=config, mpu=mpu, ...)
"""

from __future__ import annotations

import importlib
import logging
import weakref
from collections.abc import MutableMapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, List, Optional

from .errors import BridgeError

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge, ExpertGroups
    from .state import GroupInfo

__all__ = [
    "install_expert_groups",
    "uninstall_expert_groups",
    "install_hpz_group",
    "uninstall_hpz_group",
    "deepspeed_groups_module",
]

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
# DeepSpeed's one ZeRO++ hpZ (secondary partition) group (checked in 0.19.8).
_HPZ_GROUP = "_ZERO_PARAM_INTRA_PARALLEL_GROUP"
# What install_hpz_group put into DeepSpeed, per bridge (so it can tell its own entry from DeepSpeed's).
_installed_hpz: "weakref.WeakKeyDictionary[Bridge, GroupInfo]" = weakref.WeakKeyDictionary()


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


def _hpz_groups_module() -> Any:
    """``deepspeed.utils.groups``, checked to hold the hpZ group variable (BridgeError otherwise)."""
    try:
        module = importlib.import_module(_GROUPS_MODULE)
    except ImportError as exc:
        raise BridgeError(
            f"DeepSpeed is not available ({_GROUPS_MODULE} cannot be imported: {exc}); install "
            "deepspeed (pip install 'mpu-bridge[deepspeed]') or use bridge.zero_param_groups() directly"
        ) from exc
    if not hasattr(module, _HPZ_GROUP):
        raise BridgeError(
            f"DeepSpeed {_deepspeed_version()} has no {_HPZ_GROUP} in {_GROUPS_MODULE} (ZeRO++ hpZ "
            "keeps it there in the ZeRO++ releases, checked with 0.19.8); this DeepSpeed version is not supported by "
            "install_hpz_group: pass bridge.zero_param_groups(n).group to deepspeed.zero.Init yourself"
        )
    return module


def _installed_by(group: Any) -> Optional["GroupInfo"]:
    """The hpZ group info mpu-bridge installed whose group is ``group``, if any."""
    for info in list(_installed_hpz.values()):
        if info.group is group:
            return info
    return None


def _other_hpz_group(present: Any, info: "GroupInfo", rank: int) -> BridgeError:
    """The error for a DeepSpeed that already holds another hpZ group than ``info``'s."""
    ours = _installed_by(present)
    held = list(ours.ranks) if ours is not None else _group_ranks(present)
    if ours is not None:
        return BridgeError(
            f"DeepSpeed already holds an hpZ group installed by mpu-bridge (ranks {held} on rank "
            f"{rank}, size {len(held)}), not the bridge's size-{info.world_size} group "
            f"{list(info.ranks)}; DeepSpeed keeps one hpZ group per process: call "
            "uninstall_hpz_group on the bridge that installed it first"
        )
    return BridgeError(
        f"DeepSpeed already holds a ZeRO parameter intra parallel (hpZ) group that mpu-bridge did "
        f"not create (ranks {held} on rank {rank}, the bridge's are {list(info.ranks)}); "
        "call install_hpz_group before deepspeed.initialize and deepspeed.zero.Init, which "
        "create their own when zero_hpz_partition_size > 1 and none is installed"
    )


def install_hpz_group(bridge: "Bridge", partition_size: int) -> "GroupInfo":
    """Create the bridge's ZeRO++ hpZ group of ``partition_size`` and make it DeepSpeed's.

    Sets ``deepspeed.utils.groups._ZERO_PARAM_INTRA_PARALLEL_GROUP`` to this rank's
    group of :meth:`Bridge.zero_param_groups` (consecutive blocks of the
    data-parallel group, so under TP or PP a block never mixes model-parallel
    ranks; a size above the data-parallel size is clamped, as DeepSpeed does).
    ZeRO-3 engines (``deepspeed.initialize`` with ``zero_hpz_partition_size``) then
    use it and create no group of their own; pass the returned ``.group`` as
    ``zero_param_parallel_group=`` to every ``deepspeed.zero.Init`` (it creates a
    group whenever that argument is None, and fails if one exists already).
    DeepSpeed holds one such group per process: every ZeRO-3 engine built while it
    is installed uses it, so give them all the same ``zero_hpz_partition_size``
    and the bridge's data-parallel group (``mpu=bridge.as_legacy_mpu()``).

    Collective the first time (call on every rank, before ``deepspeed.initialize``
    and ``zero.Init``); installing the same group again is a no-op.

    Raises :class:`~mpu_bridge.errors.BridgeError` if DeepSpeed is missing or keeps
    the group elsewhere, if ``partition_size`` (after clamping) is below 2 (hpZ
    off: install nothing), or if DeepSpeed already holds another hpZ group (one
    it created itself, or one installed for another bridge or size:
    :func:`uninstall_hpz_group` that first).

    Example: ``install_hpz_group(attach(None, tp=2), 2).ranks`` -> ``(0, 2)`` on rank 0 of 4.
    """
    module = _hpz_groups_module()
    if isinstance(partition_size, int) and not isinstance(partition_size, bool) and partition_size < 2:
        raise BridgeError(
            f"hpZ partition size {partition_size} switches hpZ off (DeepSpeed uses it only above 1); "
            "install no hpZ group and leave zero_hpz_partition_size at 1, or choose a size of 2 or more"
        )
    info = bridge.zero_param_groups(partition_size)
    if info.world_size < 2:
        raise BridgeError(
            f"hpZ partition size {partition_size} is clamped to the data-parallel size {info.world_size}: "
            "hpZ would be off; install no hpZ group"
        )
    present = getattr(module, _HPZ_GROUP)
    if present is info.group:
        _installed_hpz[bridge] = info
        return info
    if present is not None:
        raise _other_hpz_group(present, info, bridge.rank)
    setattr(module, _HPZ_GROUP, info.group)
    _installed_hpz[bridge] = info
    logger.info(
        "mpu-bridge: installed DeepSpeed's hpZ (ZeRO parameter intra parallel) group on rank %d: %s",
        bridge.rank,
        list(info.ranks),
    )
    return info


def uninstall_hpz_group(bridge: "Bridge") -> Optional["GroupInfo"]:
    """Remove from DeepSpeed the hpZ group ``bridge`` installed; return it (None if none was there).

    Local. Call before ``bridge.close()`` so DeepSpeed keeps no destroyed group, or
    before installing another size. A group DeepSpeed created itself is left alone.
    Engines built meanwhile keep the group they hold.

    Example: ``uninstall_hpz_group(bridge).ranks`` -> ``(0, 2)`` on rank 0 of ``attach(None, tp=2)``.
    """
    module = _hpz_groups_module()
    info = _installed_hpz.pop(bridge, None)
    if info is None or getattr(module, _HPZ_GROUP) is not info.group:
        return None
    setattr(module, _HPZ_GROUP, None)
    return info


def _group_ranks(group: Any) -> List[int]:
    """The global ranks of ``group`` (for messages), or [] if torch does not know it."""
    try:
        import torch.distributed as dist

        return list(dist.get_process_group_ranks(group))
    except Exception:  # a destroyed or foreign group: the message says less, nothing fails
        return []
