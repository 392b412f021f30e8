"""The bridge's lifecycle: one immutable state per reading of the MPU, and the request path.

:class:`BridgeBase` is everything a :class:`~mpu_bridge.bridge.Bridge` is besides its
group methods: it reads the MPU into a :class:`~mpu_bridge.state.State` at attach,
swaps in a new one when the MPU is re-initialised (or refuses every call with the
reason when it cannot), answers sizes and rank lists by arithmetic, and runs every
group request the same way -- family (pure) -> registry (agree, reuse or create) ->
group info, made once per state and cached. See :mod:`mpu_bridge.bridge` for what is
collective.

Example::

    bridge = mpu_bridge.attach(parallel_state)   # a Bridge, i.e. a BridgeBase
    bridge.ranks("data_parallel"), bridge.layout.config.order, bridge.stats()
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union, cast

import torch.distributed as dist

from . import _torch
from .errors import BridgeError, LayoutError, MpuError, OutsideSpanError
from .layout import DEFAULT_ORDER, Layout
from .mpu import MpuReader
from .partitions import Partition
from .registry import GroupRegistry
from .state import Broken, ExpertGroups, GroupInfo, State, group_ranks, mpu_changed, read_state
from .validate import positive_int

__all__ = ["BridgeBase", "Outside", "served"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_B = TypeVar("_B", bound="BridgeBase")


class _Ask(NamedTuple):
    """One request of :meth:`BridgeBase._request`: its cache key, label, partitions and answer."""

    key: str
    label: str
    families: Callable[[State], Sequence[Tuple[str, Partition]]]
    finish: Callable[[State, List[Any]], Any]


class Outside(NamedTuple):
    """The answer a rank outside a rank span's layout gets: it took part in making the
    request's groups (every rank does, as with megatron-core's ``rank_offset``) and holds
    none of them. :func:`served` raises its :meth:`error`."""

    rank: int
    layout: Layout

    def error(self) -> OutsideSpanError:
        span = self.layout.ranks
        return OutsideSpanError(
            f"rank {self.rank} is outside this bridge's rank span {span[0]}..{span[-1]} "
            f"(rank_offset {self.layout.rank_offset}, local_world_size {self.layout.world_size}) "
            "and holds none of its groups; ask the bridge of the module this rank runs"
        )


def served(answer: Any) -> Any:
    """``answer``, unless it is an :class:`Outside` (then its error is raised)."""
    if isinstance(answer, Outside):
        raise answer.error()
    return answer


class BridgeBase:
    """The state, lifecycle and request path of a bridge (see the module docstring).

    Not used alone: :func:`mpu_bridge.attach` returns a :class:`~mpu_bridge.bridge.Bridge`.
    """

    def __init__(
        self,
        mpu: Optional[object] = None,
        *,
        backend: Optional[str] = None,
        timeout: datetime.timedelta = datetime.timedelta(minutes=10),
        pg_options: Optional[object] = None,
        strategy: str = "auto",
        agreement_timeout: float = 60.0,
        verify_plan: Optional[bool] = None,
        order: Optional[str] = None,
        gpus_per_node: Optional[int] = None,
        tp: Optional[int] = None,
        pp: Optional[int] = None,
        cp: Optional[int] = None,
        ep: Optional[int] = None,
        etp: Optional[int] = None,
        gtp_remat: Optional[int] = None,
        expert_gtp_remat: Optional[int] = None,
        rank_offset: Optional[int] = None,
        local_world_size: Optional[int] = None,
        module: Optional[str] = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise BridgeError(
                "torch.distributed is not initialised; call torch.distributed.init_process_group "
                "(or the trainer's initialisation) before mpu_bridge.attach"
            )
        if order is not None and not isinstance(order, str):
            raise LayoutError(f"order must be a string such as {DEFAULT_ORDER!r} or None, got {order!r}")
        self._gpus_per_node = None if gpus_per_node is None else positive_int("gpus_per_node", gpus_per_node)
        self._lock = threading.RLock()
        self.world_size: int = dist.get_world_size()
        self.rank: int = dist.get_rank()
        self._registry_options = dict(
            backend=backend,
            timeout=timeout,
            pg_options=pg_options,
            strategy=strategy,
            agreement_timeout=agreement_timeout,
            verify_plan=verify_plan,
        )
        self._order = order
        sizes = dict(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, gtp_remat=gtp_remat, expert_gtp_remat=expert_gtp_remat,
                     rank_offset=rank_offset, local_world_size=local_world_size)
        self._sizes = {k: v for k, v in sizes.items() if v is not None}
        self._mpu_object = mpu
        self._module = module
        self._default_group = _torch.default_group()
        self._closed = False
        self._warned_clamp: set = set()
        self._collecting: Optional[List[_Ask]] = None  # requests noted by _batched, under the lock
        self._state: Union[State, Broken] = self._build_state()

    def _build_state(self) -> State:
        return read_state(
            self._mpu_object, self.world_size, self.rank, self._order, self._registry_options, self._sizes,
            module=self._module,
        )

    # -- staying current ---------------------------------------------------------------

    def _live(self) -> State:
        """The current state; raises instead of serving anything stale.

        * closed -> BridgeError; the default group destroyed or replaced -> BridgeError;
        * the MPU's groups destroyed and not re-created -> MpuError;
        * the MPU re-initialised -> a new state is built (what this bridge created is
          destroyed first); if that fails, every call raises the reason until it works.
        """
        if self._closed:
            raise BridgeError("this bridge is closed; attach again to get groups")
        if _torch.default_group() is not self._default_group or self._default_group is None:
            self.close()
            raise BridgeError(
                "the default process group this bridge was attached in has been destroyed "
                "(torch.distributed.destroy_process_group), and every group with it; "
                "re-initialise torch.distributed and the MPU, then call mpu_bridge.attach again"
            )
        state = self._state
        if isinstance(state, State) and not mpu_changed(state):
            return state
        return self._rebuild()

    def _view(self) -> State:
        """The current state for what needs no communication (sizes, rank lists, answers
        already made): read without the lock, since a :class:`State` is never changed in
        place, only swapped whole. Only when it must be swapped (the MPU re-initialised,
        a failed read, the bridge closed) does this wait for the lock, as :meth:`_live`.

        So a thread that asks for ``ranks("tp")`` while another is in a collective
        request (waiting for late ranks) is answered at once.
        """
        state = self._state
        default = self._default_group
        if (
            not self._closed
            and isinstance(state, State)
            and default is not None
            and _torch.default_group() is default
            and not mpu_changed(state)
        ):
            return state
        with self._lock:
            return self._live()

    def _rebuild(self) -> State:
        old = self._state
        if isinstance(old, State):
            logger.warning("mpu-bridge: rank %d: the MPU was re-initialised; rebuilding the bridge", self.rank)
            old.registry.close()
            self._state = Broken("the MPU was re-initialised and is being read again")
        try:
            state = self._build_state()
        except BridgeError as exc:
            self._state = Broken(
                f"the MPU was re-initialised and the bridge cannot read it: {exc}. Every call raises "
                "this until the MPU is readable again (or close() the bridge)"
            )
            raise MpuError(self._state.reason) from None
        self._state = state
        return state

    # -- the request path: family -> registry -> group info ----------------------------

    def _request(
        self,
        key: str,
        label: str,
        families: Callable[[State], Sequence[Tuple[str, Partition]]],
        finish: Callable[[State, List[Any]], _T],
    ) -> _T:
        """The answer to request ``key``: made once per state (collective), then cached.

        ``families`` computes the partitions (pure; an input error there is shared
        with the other ranks through the registry before it is raised), the registry
        agrees and creates, ``finish`` builds the answer from the group infos. While
        :meth:`_batched` collects, the request is only noted (and None returned).
        """
        cached = self._view().answers.get(key)  # asking again is local: no lock, no wait
        if cached is not None:
            return cast(_T, served(cached))
        with self._lock:
            if self._collecting is not None:
                self._collecting.append(_Ask(key, label, families, finish))
                return cast(_T, None)
            self._answer_all([_Ask(key, label, families, finish)], label)
            return cast(_T, served(self._live().answers[key]))

    def _batched(self, label: str, asks: Callable[[], None]) -> int:
        """Run ``asks`` (getter calls) collecting their requests, then make every new one in
        one registry batch: one agreement round. Returns how many requests were new."""
        with self._lock:
            collected: List[_Ask] = []
            self._collecting = collected
            try:
                asks()
            finally:
                self._collecting = None
            return self._answer_all(collected, label)

    def _answer_all(self, asks: Sequence["_Ask"], label: str) -> int:
        """Make the answers to ``asks`` not made yet in one registry batch (collective)."""
        state = self._live()
        pending: Dict[str, _Ask] = {}
        for ask in asks:
            if ask.key not in state.answers:
                pending.setdefault(ask.key, ask)
        if not pending:
            return 0
        try:
            named = [list(ask.families(state)) for ask in pending.values()]
        except BridgeError as exc:
            state.registry.fail_round(exc, label)
            raise
        groups = iter(state.registry.ensure([p for batch in named for _, p in batch], label=label))
        if not state.layout.holds(self.rank):  # a rank span's outsider: took part, holds nothing
            for key in pending:
                state.answers[key] = Outside(self.rank, state.layout)
            return len(pending)
        for ask, batch in zip(pending.values(), named):
            infos: List[Optional[GroupInfo]] = []
            for (name, part), group in zip(batch, groups):
                if part.own is None and not part.covers(self.world_size):
                    infos.append(None)  # a family that leaves this rank out (embedding groups)
                    continue
                if part.own is None or group is None:
                    raise BridgeError(f"rank {self.rank} is in no group of {part.key}")
                infos.append(GroupInfo(name, group, part.own, part.own.index(self.rank),
                                       state.registry.is_borrowed(group)))
            state.answers[ask.key] = ask.finish(state, infos)
        return len(pending)

    def _refuse(self, state: State, label: str, exc: BridgeError) -> BridgeError:
        """Share an input error found before :meth:`_request` with the other ranks; return it."""
        state.registry.fail_round(exc, label)
        return exc

    # -- pure views (no communication) -------------------------------------------------

    def _current(self) -> State:
        """The live state (see :meth:`_view`: no lock); after close(), the last one (for
        reading counters and sizes)."""
        state = self._state
        if self._closed and isinstance(state, State):
            return state
        return self._view()

    @property
    def layout(self) -> Layout:
        """The layout of the MPU's groups (or of the standalone world): pure rank arithmetic."""
        return self._current().layout

    @property
    def reader(self) -> Optional[MpuReader]:
        """The reader of the MPU, None when standalone."""
        return self._current().reader

    @property
    def state(self) -> State:
        """The current reading of the MPU (rebuilt first if it was re-initialised); local.

        A new object after every rebuild: adapters read their surface from it on every use,
        and anything installed elsewhere remembers the state it was made in.
        """
        return self._current()

    @property
    def registry(self) -> GroupRegistry:
        """The registry holding this bridge's groups (borrowed and created)."""
        return self._current().registry

    def ranks(self, name: str, *, ep_size: Optional[int] = None) -> Tuple[int, ...]:
        """This rank's group of ``name`` as global ranks in group-rank order; no communication.

        ``name`` is a bridge method (``"data_parallel"``), a kind (``"dp"``) or an MPU
        dimension (``"sdp"``), or ``"world"``; expert kinds need ``ep_size`` and use the
        layout :meth:`expert_groups` gave (or would give) that size. ``len(...)`` is
        the group's size and ``.index(bridge.rank)`` this rank's place in it.

        Example: over megatron-core with tp 2 on 4 ranks, ``bridge.ranks("data_parallel")``
        is ``(0, 2)`` on rank 0.
        """
        return group_ranks(self._view(), self.rank, name, ep_size)

    # -- what was made so far (local) ----------------------------------------------------

    def _experts(self) -> Dict[str, ExpertGroups]:
        answers = tuple(self._view().answers.items())  # one C-level copy: safe while a request adds
        return {v.name: v for k, v in answers if k.startswith("experts:") and isinstance(v, ExpertGroups)}

    def expert_group_names(self) -> Tuple[str, ...]:
        """Names of the expert groups made so far (local, never waits)."""
        return tuple(self._experts())

    def get_expert_groups(self, name: str) -> ExpertGroups:
        """The expert groups created under ``name`` (``"ep_size_4"``); local, never waits."""
        experts = self._experts()
        if name in experts:
            return experts[name]
        known = ", ".join(experts) or "none yet"
        raise BridgeError(f"no expert groups named {name!r} (created: {known}); call expert_groups(ep_size) first")

    def max_expert_size(self) -> int:
        """The largest expert-parallel size created so far (local, never waits)."""
        experts = self._experts()
        if not experts:
            raise BridgeError("no expert groups yet; call expert_groups(ep_size) first")
        return max(g.ep_size for g in experts.values())

    def max_expert_size_name(self) -> str:
        return f"ep_size_{self.max_expert_size()}"

    def max_expert_groups(self) -> ExpertGroups:
        return self.get_expert_groups(self.max_expert_size_name())

    @property
    def strategy(self) -> str:
        """How groups are created: ``split_group``, ``local_new_group`` or ``new_group``."""
        return self.registry.strategy

    def stats(self) -> Dict[str, int]:
        """Counters of this rank's groups: created, borrowed, reused, agreements."""
        return self.registry.stats()

    def close(self) -> None:
        """Destroy the groups this bridge created (never the MPU's). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if isinstance(self._state, State):
                self._state.registry.close()
                self._state.answers.clear()

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
