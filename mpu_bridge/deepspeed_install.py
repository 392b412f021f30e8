"""Hand the bridge's expert and hpZ groups to DeepSpeed, so its MoE layers and ZeRO-3 use them.

DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``) looks its groups up by name
(``"ep_size_<n>"``) in four tables of ``deepspeed.utils.groups`` and creates
groups of its own only when the name is missing there. :func:`install_expert_groups`
creates the groups through the bridge (reusing any rank set that already has a
communicator) and fills those tables, so every MoE layer of that size, and
DeepSpeed's expert-gradient reduction, runs over the bridge's groups.

Call it on every rank before ``deepspeed.initialize`` (that is when the MoE
layers bind their groups). DeepSpeed is imported only inside these functions.

What these functions put into DeepSpeed is remembered per bridge, with the bridge
state it was made in (:attr:`Bridge.state`). When the MPU is re-initialised, the
bridge rebuilds and the groups it had installed are gone: installing again (every
rank) replaces exactly those entries with the rebuilt bridge's groups, rank tables
and expert tensor-parallel size included, and uninstalling removes them whether or
not the bridge rebuilt (or was closed) since. Entries that DeepSpeed, or another
bridge, put there are never replaced: installing raises and names the way out.

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
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .errors import BridgeError

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge, ExpertGroups
    from .state import GroupInfo, State

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
# DeepSpeed's record of the expert tensor-parallel size (set by its E+M+D path; its default is 1).
_ETP_SIZE = "expert_tensor_parallel_world_size"
# DeepSpeed's one ZeRO++ hpZ (secondary partition) group (checked in 0.19.8).
_HPZ_GROUP = "_ZERO_PARAM_INTRA_PARALLEL_GROUP"

# A place in deepspeed.utils.groups: (module variable, key) for an entry of a dict table,
# (module variable, None) for the variable itself.
_Slot = Tuple[str, Optional[str]]


@dataclass(frozen=True)
class _Installed:
    """What one install put into DeepSpeed for one bridge, and the bridge state it was made in.

    The bridge swaps its state when the MPU is re-initialised (and destroys what it
    created): a record whose state is not the bridge's current one is *stale*, and its
    entries are replaced by the next install of the same name.
    """

    name: str  # "ep_size_<n>", or the hpZ variable's name
    values: Tuple[Tuple[_Slot, Any], ...]  # each slot and the group put there
    answer: Any  # the ExpertGroups / GroupInfo the install returned
    state: "weakref.ReferenceType[State]"
    etp: Optional[Tuple[int, int]] = None  # DeepSpeed's expert-TP size (before, as set), if set

    def stale(self, bridge: "Bridge") -> bool:
        return self.state() is not bridge.state


# bridge -> name -> what it installed (a bridge that is garbage-collected leaves no record).
_installed: "weakref.WeakKeyDictionary[Bridge, Dict[str, _Installed]]" = weakref.WeakKeyDictionary()


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
    ranks = getattr(module, _RANKS_TABLES.get(table, ""), None)
    return ranks if isinstance(ranks, MutableMapping) else None


# -- what mpu-bridge put into DeepSpeed: one record per bridge and name ----------------------


def _read(module: Any, slot: _Slot) -> Any:
    variable, key = slot
    holder = getattr(module, variable)
    return holder if key is None else holder.get(key)


def _write(module: Any, slot: _Slot, group: Any, ranks: Optional[List[int]]) -> None:
    variable, key = slot
    if key is None:
        setattr(module, variable, group)
        return
    getattr(module, variable)[key] = group
    table = _ranks_table(module, variable)
    if table is not None and ranks is not None:
        table[key] = ranks


def _clear(module: Any, slot: _Slot) -> None:
    variable, key = slot
    if key is None:
        setattr(module, variable, None)
        return
    getattr(module, variable).pop(key, None)
    table = _ranks_table(module, variable)
    if table is not None:
        table.pop(key, None)


def _records() -> List[Tuple["Bridge", _Installed]]:
    return [(bridge, record) for bridge, named in list(_installed.items()) for record in named.values()]


def _in_deepspeed(module: Any, record: _Installed) -> bool:
    """Whether DeepSpeed still holds any of what ``record`` put there."""
    return any(_read(module, slot) is group for slot, group in record.values)


def _etp_before(module: Any) -> int:
    """DeepSpeed's expert-TP size before mpu-bridge's installs that DeepSpeed still holds set it."""
    current = getattr(module, _ETP_SIZE)
    for _, record in _records():
        if record.etp is not None and record.etp[1] == current and _in_deepspeed(module, record):
            return record.etp[0]
    return current


def _owner(slot: _Slot, group: Any) -> Optional[Tuple["Bridge", _Installed]]:
    """The bridge and record that put ``group`` into ``slot``, if mpu-bridge did."""
    for bridge, record in _records():
        if any(s == slot and g is group for s, g in record.values):
            return bridge, record
    return None


def _remember(bridge: "Bridge", record: _Installed) -> None:
    _installed.setdefault(bridge, {})[record.name] = record


def _take_out(module: Any, bridge: "Bridge", name: str) -> Optional[_Installed]:
    """Remove from DeepSpeed what ``bridge`` installed under ``name`` and forget it; return the
    record if any of it was still there. Entries someone else put there since are left alone;
    DeepSpeed's expert-TP size goes back to what it was unless another install still needs it."""
    record = _installed.get(bridge, {}).pop(name, None)
    if record is None:
        return None
    hit = _in_deepspeed(module, record)
    for slot, group in record.values:
        if _read(module, slot) is group:
            _clear(module, slot)
    if record.etp is not None and getattr(module, _ETP_SIZE, None) == record.etp[1]:
        if not any(other.etp is not None and _in_deepspeed(module, other) for _, other in _records()):
            setattr(module, _ETP_SIZE, record.etp[0])
    return record if hit else None


_Refuse = Callable[[Any, Optional[Tuple["Bridge", _Installed]]], BridgeError]


def _make_room(module: Any, bridge: "Bridge", record: _Installed, refuse: _Refuse) -> None:
    """Clear the slots ``record`` is about to fill. Each must be empty, hold the group already,
    or hold what ``bridge`` installed under the same name from an earlier state (the MPU was
    re-initialised since): that is taken out. Anything else raises ``refuse(present, owner)``
    (owner: the bridge and record that installed it, None for DeepSpeed's own) before any change."""
    stale = []
    for slot, group in record.values:
        present = _read(module, slot)
        if present is None or present is group:
            continue
        owner = _owner(slot, present)
        if owner is None or owner[0] is not bridge or owner[1].name != record.name or not owner[1].stale(bridge):
            raise refuse(present, owner)
        stale.append(owner[1].name)
    for name in dict.fromkeys(stale):
        logger.info(
            "mpu-bridge: rank %d: the bridge was rebuilt since it installed DeepSpeed's %s "
            "(the MPU was re-initialised); installing the rebuilt bridge's groups instead",
            bridge.rank, name,
        )
        _take_out(module, bridge, name)


def _install(
    module: Any, bridge: "Bridge", record: _Installed, ranks: Dict[_Slot, List[int]], refuse: _Refuse
) -> bool:
    """Put ``record``'s groups into DeepSpeed for ``bridge`` (see :func:`_make_room`) and
    remember them; False if DeepSpeed held exactly these already."""
    _make_room(module, bridge, record, refuse)
    already = all(_read(module, slot) is group for slot, group in record.values)
    if not already and record.name in _installed.get(bridge, {}):
        _take_out(module, bridge, record.name)  # an earlier record whose entries DeepSpeed dropped since
    for slot, group in record.values:
        _write(module, slot, group, ranks.get(slot))
    _remember(bridge, record)
    return not already


# -- expert groups --------------------------------------------------------------------------


def _expert_slot_taken(
    name: str, rank: int, ours: List[int], present: Any, owner: Optional[Tuple["Bridge", _Installed]]
) -> BridgeError:
    """Why DeepSpeed's ``name`` slot cannot take this bridge's expert groups: another bridge
    installed its own there (``owner``), or DeepSpeed made ``present`` itself."""
    if owner is not None:
        theirs = owner[1].answer.expert_parallel.ranks
        return BridgeError(
            f"DeepSpeed already holds expert groups named {name!r} that mpu-bridge installed for another "
            f"bridge (expert-parallel ranks {list(theirs)} on rank {rank}, this bridge's are "
            f"{ours}); DeepSpeed keeps one per name: call uninstall_expert_groups on the "
            "bridge that installed them first"
        )
    return BridgeError(
        f"DeepSpeed already holds expert groups named {name!r} that mpu-bridge did not create "
        f"(expert-parallel ranks {_group_ranks(present)} on rank {rank}, the bridge's are "
        f"{ours}); call install_expert_groups before deepspeed.initialize "
        "and before any MoE layer creates its groups"
    )


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
    same groups again is a no-op; after the MPU was re-initialised, installing again
    replaces what this bridge installed before with its rebuilt groups.

    Raises :class:`~mpu_bridge.errors.BridgeError` if DeepSpeed is missing or keeps
    its tables elsewhere (checked before any group is created), or if DeepSpeed
    already holds *other* groups under that name (its own, or another bridge's:
    :func:`uninstall_expert_groups` that bridge first).

    Example: ``install_expert_groups(bridge, 2).expert_parallel.ranks`` -> ``(0, 1)`` on rank 0 of 4.
    """
    module = deepspeed_groups_module()
    experts = bridge.expert_groups(
        ep_size, data_before_expert=data_before_expert, expert_tensor_parallel=expert_tensor_parallel
    )
    name = experts.name
    ep_info, edp_info = experts.expert_parallel, experts.expert_data_parallel
    ep_slot, edp_slot = (_EP_TABLE, name), (_EDP_TABLE, name)
    etp = experts.layout.config.etp or 1
    etp_change = None
    if etp > 1 and hasattr(module, _ETP_SIZE):
        etp_change = (_etp_before(module), etp)
    record = _Installed(name, ((ep_slot, ep_info.group), (edp_slot, edp_info.group)), experts,
                        weakref.ref(bridge.state), etp_change)

    def refuse(present: Any, owner: Optional[Tuple["Bridge", _Installed]]) -> BridgeError:
        return _expert_slot_taken(name, bridge.rank, list(ep_info.ranks), present, owner)

    changed = _install(module, bridge, record, {ep_slot: list(ep_info.ranks), edp_slot: list(edp_info.ranks)},
                       refuse)
    if etp_change is not None:
        setattr(module, _ETP_SIZE, etp)
    if changed:
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

    Local. Works after the MPU was re-initialised (the entries from before the
    bridge's rebuild are removed) and after ``bridge.close()``; call it before
    ``close()`` so DeepSpeed holds no destroyed group meanwhile. Entries DeepSpeed
    created itself are left alone; DeepSpeed's expert tensor-parallel size goes back
    to its value from before the install.

    Example: ``uninstall_expert_groups(bridge)`` -> ``["ep_size_2"]``.
    """
    module = deepspeed_groups_module()
    names = [name for name in _installed.get(bridge, {}) if name != _HPZ_GROUP]
    return [name for name in names if _take_out(module, bridge, name) is not None]


# -- ZeRO++ hpZ -----------------------------------------------------------------------------


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


def _other_hpz_group(
    present: Any, info: "GroupInfo", rank: int, owner: Optional[Tuple["Bridge", _Installed]]
) -> BridgeError:
    """The error for a DeepSpeed that already holds another hpZ group than ``info``'s."""
    if owner is not None:
        held = list(owner[1].answer.ranks)
        return BridgeError(
            f"DeepSpeed already holds an hpZ group installed by mpu-bridge (ranks {held} on rank "
            f"{rank}, size {len(held)}), not the bridge's size-{info.world_size} group "
            f"{list(info.ranks)}; DeepSpeed keeps one hpZ group per process: call "
            "uninstall_hpz_group on the bridge that installed it first"
        )
    return BridgeError(
        f"DeepSpeed already holds a ZeRO parameter intra parallel (hpZ) group that mpu-bridge did "
        f"not create (ranks {_group_ranks(present)} on rank {rank}, the bridge's are {list(info.ranks)}); "
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
    and ``zero.Init``); installing the same group again is a no-op. After the MPU
    was re-initialised, installing again replaces the group this bridge installed
    before with its rebuilt one.

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
    record = _Installed(_HPZ_GROUP, (((_HPZ_GROUP, None), info.group),), info, weakref.ref(bridge.state))

    def refuse(present: Any, owner: Optional[Tuple["Bridge", _Installed]]) -> BridgeError:
        return _other_hpz_group(present, info, bridge.rank, owner)

    if _install(module, bridge, record, {}, refuse):
        logger.info(
            "mpu-bridge: installed DeepSpeed's hpZ (ZeRO parameter intra parallel) group on rank %d: %s",
            bridge.rank,
            list(info.ranks),
        )
    return info


def uninstall_hpz_group(bridge: "Bridge") -> Optional["GroupInfo"]:
    """Remove from DeepSpeed the hpZ group ``bridge`` installed; return it (None if none was there).

    Local. Works after the MPU was re-initialised and after ``bridge.close()``; call
    it before ``close()`` so DeepSpeed holds no destroyed group meanwhile, or before
    installing another size. A group DeepSpeed created itself is left alone.
    Engines built meanwhile keep the group they hold.

    Example: ``uninstall_hpz_group(bridge).ranks`` -> ``(0, 2)`` on rank 0 of ``attach(None, tp=2)``.
    """
    module = _hpz_groups_module()
    record = _take_out(module, bridge, _HPZ_GROUP)
    return record.answer if record is not None else None


def _group_ranks(group: Any) -> List[int]:
    """The global ranks of ``group`` (for messages), or [] if torch does not know it."""
    try:
        import torch.distributed as dist

        return list(dist.get_process_group_ranks(group))
    except Exception:  # a destroyed or foreign group: the message says less, nothing fails
        return []
