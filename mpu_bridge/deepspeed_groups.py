"""Functions named like ``deepspeed.utils.groups``, for code written against DeepSpeed.

Every function works on one module-level default :class:`~mpu_bridge.bridge.Bridge`,
attached lazily to the MPU given to :func:`set_mpu` (standalone without one) and
dropped by :func:`reset`. Differences from the reference, all deliberate:

* source ranks come from the group's own ranks (``ranks[0]``), also for strided groups;
* asking twice for hpZ groups of the same size is a no-op, not an error;
* ``_zero_param_parallel_is_initialized`` returns a real bool, read from the bridge's
  current state: after the MPU is re-initialised (the bridge rebuilds, its hpZ groups go
  with the old state) it is False until ``_create_zero_param_parallel_group`` runs again;
* unknown group names raise :class:`~mpu_bridge.errors.BridgeError`, not ``AssertionError``;
* sizes, ranks, rank lists and source ranks are arithmetic: no communication, so they
  may be called on any single rank (e.g. for logging); only the ``*_group`` getters
  and the ``_create_*`` functions may be collective (the first time).

Importing this module does not import torch; the first group query does.

Example::

    >>> _get_expert_parallel_ranks(16, 2, 4)[0]
    [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .deepspeed_layouts import _get_expert_parallel_ranks
from .errors import BridgeError
from .validate import positive_int

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge, ExpertGroups, GroupInfo
    from .state import State

__all__ = [
    "_get_expert_parallel_ranks",
    "set_mpu",
    "reset",
    "get_bridge",
    "initialize",
    "_create_expert_and_data_parallel",
    "_create_expert_data_and_model_parallel",
    "_get_max_expert_size",
    "_get_max_expert_size_name",
    "_get_max_expert_parallel_group",
    "_get_expert_parallel_group",
    "_get_expert_parallel_group_ranks",
    "_get_expert_parallel_group_dict",
    "_get_expert_data_parallel_group",
    "_get_expert_data_parallel_group_ranks",
    "_get_expert_data_parallel_group_dict",
    "_get_expert_parallel_world_size",
    "_get_expert_parallel_rank",
    "_get_expert_parallel_src_rank",
    "_get_expert_data_parallel_world_size",
    "_get_expert_data_parallel_rank",
    "_get_expert_broadcast_src_rank",
    "_get_expert_model_parallel_world_size",
    "_clone_world_group",
    "_get_local_all_to_all_group",
    "_get_data_parallel_group",
    "_get_data_parallel_group_ranks",
    "_get_data_parallel_world_size",
    "_get_data_parallel_rank",
    "_get_model_parallel_world_size",
    "_get_broadcast_src_rank",
    "_get_sequence_parallel_world_size",
    "_get_sequence_parallel_rank",
    "_get_sequence_parallel_group",
    "_get_sequence_data_parallel_world_size",
    "_get_sequence_data_parallel_rank",
    "_get_sequence_data_parallel_group",
    "_create_zero_param_parallel_group",
    "_get_zero_param_intra_parallel_group",
    "_zero_param_parallel_is_initialized",
    "_get_zero_param_intra_parallel_rank_in_mygroup",
    "_get_zero_param_intra_parallel_group_world_size",
    "_get_zero_param_intra_parallel_group_ranks",
]


# ---------------------------------------------------------------------------
# The deepspeed.utils.groups function names, over one module-level default bridge.
# ---------------------------------------------------------------------------


class _DefaultBridge:
    """The one bridge behind this module's functions: attached lazily, replaced by set_mpu()."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._mpu: Optional[object] = None
        self._bridge: Optional["Bridge"] = None
        # hpZ size made by create_zero, and the bridge state it was made in
        self._zero: Optional[Tuple[int, "weakref.ReferenceType[State]"]] = None

    def get(self) -> "Bridge":
        with self._lock:
            if self._bridge is None:
                from .bridge import attach

                self._bridge = attach(self._mpu)
            return self._bridge

    def set_mpu(self, mpu: Optional[object]) -> None:
        if mpu is not None:
            from .mpu import check_is_mpu

            check_is_mpu(mpu)
        with self._lock:
            if self._bridge is not None and mpu is self._mpu:
                return
            self.reset()
            self._mpu = mpu

    def reset(self) -> None:
        with self._lock:
            if self._bridge is not None:
                self._bridge.close()
            self._bridge = None
            self._mpu = None
            self._zero = None

    def adopt(self, mpu: object) -> None:
        """Use ``mpu`` unless the current bridge already stands on the same layout."""
        from .legacy_mpu import LegacyMpu
        from .mpu import MpuReader

        with self._lock:
            if self._bridge is None or mpu is self._mpu:
                self.set_mpu(mpu)
                return
            if isinstance(mpu, LegacyMpu) and mpu.bridge is self._bridge:
                return
            sizes = MpuReader(mpu).sizes()
            c = self._bridge.layout.config
            if (sizes.tp, sizes.pp, sizes.cp) != (c.tp, c.pp, c.cp):
                raise BridgeError(
                    f"the MPU given (tp={sizes.tp}, pp={sizes.pp}, cp={sizes.cp}) differs from the one the "
                    f"groups were built on (tp={c.tp}, pp={c.pp}, cp={c.cp}); call reset() first"
                )

    def _zero_size_now(self) -> Optional[int]:
        """The hpZ size made by :meth:`create_zero` in the bridge's *current* state, or None.

        The bridge rebuilds when the MPU is re-initialised, and the hpZ groups of the old
        state go with it: they are then not initialised, as in a fresh process.
        """
        if self._zero is None:
            return None
        size, state = self._zero
        bridge = self._bridge
        return size if bridge is not None and state() is bridge.state else None

    def create_zero(self, group_size: int) -> None:
        """hpZ groups of ``group_size``; the same size again is a no-op, another size an error."""
        with self._lock:
            size = self._zero_size_now()
            if size is not None and size != group_size:
                raise BridgeError(
                    f"hpZ groups of size {size} already exist; DeepSpeed's getters take no "
                    f"size, so size {group_size} cannot be added here (use Bridge.zero_param_groups for several)"
                )
            bridge = self.get()
            bridge.zero_param_groups(group_size)
            self._zero = (group_size, weakref.ref(bridge.state))

    def zero_info(self) -> "GroupInfo":
        """The hpZ group made by :meth:`create_zero` (local: it exists already)."""
        with self._lock:
            size = self._zero_size_now()
            if size is None:
                again = " again (the MPU was re-initialised since)" if self._zero is not None else ""
                raise BridgeError(f"no hpZ groups yet; call _create_zero_param_parallel_group(size) first{again}")
            return self.get().zero_param_groups(size)

    def zero_initialized(self) -> bool:
        with self._lock:
            return self._zero_size_now() is not None

    def uses_ulysses(self) -> bool:
        reader = self.get().reader
        return reader is not None and reader.is_ulysses


_default = _DefaultBridge()


def set_mpu(mpu: Optional[object]) -> None:
    """Use ``mpu`` for every function of this module (``None``: standalone)."""
    _default.set_mpu(mpu)


def reset() -> None:
    """Forget the MPU and destroy the groups the default bridge created."""
    _default.reset()


def get_bridge() -> "Bridge":
    """The bridge behind this module's functions."""
    return _default.get()


def initialize(ep_size: int = 1, mpu: Optional[object] = None) -> None:
    """Removed in DeepSpeed too: raises, saying what to call instead."""
    raise BridgeError(
        "groups.initialize() is deprecated (as in DeepSpeed): pass ep_size to the MoE layer, or call "
        "_create_expert_and_data_parallel(ep_size) / mpu_bridge.attach(mpu).expert_groups(ep_size)"
    )


def _create_expert_and_data_parallel(
    expert_parallel_size_: int,
    mp_size: Optional[int] = None,
    pp_size: Optional[int] = None,
    mp_mode: str = "tp",
    use_data_before_expert_parallel_: bool = False,
    folding_spec: Optional[object] = None,
) -> None:
    """Expert groups with expert-TP 1: DeepSpeed's E+D (or D+E) path, pipeline-aware.

    ``mp_size > 1`` with ``mp_mode="sp"`` gives the same lists as the plain path.
    DeepSpeed's TP-strided path (``mp_size > 1``, ``mp_mode="tp"``, used by its
    AutoEP fallback) joins expert-data groups across tensor lanes, which is no
    Megatron layout: it is refused with a clear error, as is ``folding_spec``.
    """
    if folding_spec is not None:
        raise BridgeError("folding_spec (DeepSpeed AutoEP folding tables) is not supported by mpu-bridge")
    if mp_mode not in ("tp", "sp"):
        raise BridgeError(f"mp_mode must be 'tp' or 'sp', got {mp_mode!r}")
    if mp_size is not None:
        mp_size = positive_int("mp_size", mp_size)
    if pp_size is not None:
        pp_size = positive_int("pp_size", pp_size)
    if mp_size is not None and mp_size > 1 and mp_mode == "tp":
        raise BridgeError(
            f"mp_size={mp_size} with mp_mode='tp' is DeepSpeed's TP-strided AutoEP layout, whose "
            "expert-data groups span tensor lanes; mpu-bridge does not build it. Use "
            "_create_expert_data_and_model_parallel(ep, mpu) for expert tensor parallelism, or mp_mode='sp'"
        )
    bridge = _default.get()
    pp = bridge.layout.config.pp
    if pp_size is not None and pp_size != pp:
        raise BridgeError(
            f"pp_size={pp_size} disagrees with the MPU's pipeline-parallel size {pp}; "
            "set the MPU with set_mpu() or drop pp_size"
        )
    bridge.expert_groups(
        expert_parallel_size_,
        data_before_expert=use_data_before_expert_parallel_,
        expert_tensor_parallel=False,
    )


def _create_expert_data_and_model_parallel(
    expert_parallel_size_: int, mpu: object, use_data_before_expert_parallel_: bool = False
) -> None:
    """Expert groups with expert tensor parallelism from ``mpu`` (DeepSpeed's E+M+D / D+E).

    The default bridge is kept when it already stands on ``mpu`` (or on an MPU of
    the same sizes, such as a legacy adapter of it), so earlier groups survive.
    """
    _default.adopt(mpu)
    _default.get().expert_groups(
        expert_parallel_size_, data_before_expert=use_data_before_expert_parallel_, expert_tensor_parallel=True
    )


def _get_max_expert_size() -> Optional[int]:
    bridge = _default.get()
    return bridge.max_expert_size() if bridge.expert_group_names() else None


def _get_max_expert_size_name() -> str:
    return _default.get().max_expert_size_name()


def _get_max_expert_parallel_group() -> Any:
    return _default.get().max_expert_groups().expert_parallel.group


def _expert(group_name: str) -> "ExpertGroups":
    return _default.get().get_expert_groups(group_name)


def _get_expert_parallel_group(group_name: str) -> Any:
    return _expert(group_name).expert_parallel.group


def _get_expert_parallel_group_ranks(group_name: str) -> List[int]:
    return list(_expert(group_name).expert_parallel.ranks)


def _get_expert_parallel_group_dict() -> Dict[str, Any]:
    bridge = _default.get()
    return {name: bridge.get_expert_groups(name).expert_parallel.group for name in bridge.expert_group_names()}


def _get_expert_data_parallel_group(group_name: str) -> Any:
    return _expert(group_name).expert_data_parallel.group


def _get_expert_data_parallel_group_ranks(group_name: str) -> List[int]:
    return list(_expert(group_name).expert_data_parallel.ranks)


def _get_expert_data_parallel_group_dict() -> Dict[str, Any]:
    bridge = _default.get()
    return {
        name: bridge.get_expert_groups(name).expert_data_parallel.group for name in bridge.expert_group_names()
    }


def _get_expert_parallel_world_size(group_name: str) -> int:
    return _expert(group_name).expert_parallel.world_size


def _get_expert_parallel_rank(group_name: str) -> int:
    return _expert(group_name).expert_parallel.rank


def _get_expert_parallel_src_rank(group_name: str) -> int:
    """Global rank of the EP group's rank 0 (right for strided groups, unlike the reference)."""
    return _expert(group_name).expert_parallel.src_rank


def _get_expert_data_parallel_world_size(group_name: str) -> int:
    return _expert(group_name).expert_data_parallel.world_size


def _get_expert_data_parallel_rank(group_name: str) -> int:
    return _expert(group_name).expert_data_parallel.rank


def _get_expert_broadcast_src_rank(group_name: str) -> int:
    return _expert(group_name).expert_data_parallel.src_rank


def _get_expert_model_parallel_world_size() -> int:
    """Expert tensor-parallel size of the largest expert groups (1 when there are none)."""
    bridge = _default.get()
    if not bridge.expert_group_names():
        return 1
    return bridge.max_expert_groups().layout.config.etp or 1


def _clone_world_group() -> Any:
    return _default.get().world().group


def _get_local_all_to_all_group() -> Dict[str, Any]:
    return _default.get().all_to_all_groups().as_dict()


def _get_data_parallel_group() -> Any:
    """The data-parallel group; ``None`` for DeepSpeed's Ulysses MPU, exactly as DeepSpeed."""
    if _default.uses_ulysses():
        return None
    return _default.get().data_parallel().group


def _ranks(method: str) -> Tuple[int, ...]:
    """This rank's group of ``method`` by arithmetic: no communication."""
    return _default.get().ranks(method)


def _rank_in(method: str) -> int:
    bridge = _default.get()
    return bridge.ranks(method).index(bridge.rank)


def _get_data_parallel_group_ranks() -> List[int]:
    return list(_ranks("data_parallel"))


def _get_data_parallel_world_size() -> Optional[int]:
    if _default.uses_ulysses():
        return None
    return len(_ranks("data_parallel"))


def _get_data_parallel_rank() -> int:
    return _rank_in("data_parallel")


def _get_model_parallel_world_size() -> int:
    if _default.uses_ulysses():
        return 1
    return len(_ranks("model_parallel"))


def _get_broadcast_src_rank() -> int:
    return _ranks("sequence_data_parallel")[0]


def _get_sequence_parallel_world_size() -> int:
    return len(_ranks("sequence_parallel"))


def _get_sequence_parallel_rank() -> int:
    return _rank_in("sequence_parallel")


def _get_sequence_parallel_group() -> Any:
    return _default.get().sequence_parallel().group


def _get_sequence_data_parallel_world_size() -> int:
    return len(_ranks("sequence_data_parallel"))


def _get_sequence_data_parallel_rank() -> int:
    return _rank_in("sequence_data_parallel")


def _get_sequence_data_parallel_group() -> Any:
    return _default.get().sequence_data_parallel().group


def _create_zero_param_parallel_group(group_size: int) -> None:
    """ZeRO++ hpZ groups. Asking again for the same size is a no-op (DeepSpeed raises);
    a different size is an error, since the getters below take no size."""
    _default.create_zero(group_size)


def _zero_info() -> "GroupInfo":
    return _default.zero_info()


def _get_zero_param_intra_parallel_group() -> Any:
    return _zero_info().group


def _zero_param_parallel_is_initialized() -> bool:
    """Whether hpZ groups exist (a real bool, unlike the reference's None)."""
    return _default.zero_initialized()


def _get_zero_param_intra_parallel_rank_in_mygroup() -> int:
    return _zero_info().rank


def _get_zero_param_intra_parallel_group_world_size() -> int:
    return _zero_info().world_size


def _get_zero_param_intra_parallel_group_ranks() -> List[int]:
    return list(_zero_info().ranks)
