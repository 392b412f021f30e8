"""The bridge: every process group of MoE / ZeRO / sequence parallelism, derived from one MPU.

``attach(mpu)`` reads the MPU (any flavour :mod:`mpu_bridge.mpu` knows), checks it
against the world, infers its rank order from its own groups, registers its
groups as *borrowed*, and then derives expert, sequence-data, hpZ and all-to-all
groups on request. Each request is one family of :mod:`mpu_bridge.partitions`
handed to one :class:`~mpu_bridge.registry.GroupRegistry`, which reuses any rank
set that already has a communicator (the MPU's or an earlier request's).

What is collective (see the README's reliability section):

* sizes, ranks and rank lists -- :attr:`Bridge.layout`, :meth:`Bridge.ranks` and the
  size/rank getters of the adapters -- are arithmetic: no communication, any rank alone;
* a group the MPU already has for a kind is handed out locally, as the MPU would;
* every other call that returns a group is collective *the first time it is made*:
  all ranks agree on it through the default store (also when every group can be
  reused) within ``agreement_timeout``, or all raise. Asking again returns the
  same object with no communication.

The bridge's view of the MPU is one :class:`State` built in full per attach or
rebuild and swapped in only when complete; a rebuild that fails leaves the bridge
refusing every call with the reason until the MPU can be read again.

Example (every rank)::

    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(2, 2)
    with mpu_bridge.attach(parallel_state) as bridge:
        experts = bridge.expert_groups(4)
        experts.expert_parallel.group        # this rank's EP group
        engine, *_ = deepspeed.initialize(model=m, mpu=bridge.as_legacy_mpu(), ...)
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import torch.distributed as dist

from . import _torch, partitions
from .errors import BridgeError, LayoutError, MpuError
from .kinds import kind_named
from .layout import DEFAULT_ORDER, Layout, plan
from .legacy_mpu import LegacyMpu
from .mpu import MpuReader
from .partitions import Partition
from .registry import GroupRegistry
from .state import (
    AllToAllGroups,
    Broken,
    ExpertGroups,
    GroupInfo,
    State,
    expert_layout,
    expert_layout_for,
    group_ranks,
    mpu_changed,
    prefer_mpu_group,
    puts_data_before_expert,
    read_state,
    resolve_gpus_per_node,
)
from .validate import boolean, optional_bool, positive_int

__all__ = ["GroupInfo", "ExpertGroups", "AllToAllGroups", "Bridge", "attach"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class Bridge:
    """Process groups derived from one MPU (or from the world alone, with no MPU).

    Create with :func:`attach`. Group-returning calls are collective the first time
    they are made (see the module docstring); the bridge checks that every rank made
    the same call before creating anything and raises
    :class:`~mpu_bridge.errors.PlanMismatchError` on every rank otherwise.
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
        self._sizes = {k: v for k, v in dict(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp).items() if v is not None}
        self._mpu_object = mpu
        self._default_group = _torch.default_group()
        self._closed = False
        self._warned_clamp: set = set()
        self._state: Union[State, Broken] = self._build_state()

    def _build_state(self) -> State:
        return read_state(
            self._mpu_object, self.world_size, self.rank, self._order, self._registry_options, self._sizes
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
        agrees and creates, ``finish`` builds the answer from the group infos.
        """
        with self._lock:
            state = self._live()
            if key in state.answers:
                return state.answers[key]
            try:
                named = list(families(state))
            except BridgeError as exc:
                state.registry.fail_round(exc, label)
                raise
            groups = state.registry.ensure([p for _, p in named], label=label)
            infos: List[Optional[GroupInfo]] = []
            for (name, part), group in zip(named, groups):
                if part.own is None and not part.covers(self.world_size):
                    infos.append(None)  # a family that leaves this rank out (embedding groups)
                    continue
                if part.own is None or group is None:
                    raise BridgeError(f"rank {self.rank} is in no group of {part.key}")
                infos.append(GroupInfo(name, group, part.own, part.own.index(self.rank),
                                       state.registry.is_borrowed(group)))
            answer = finish(state, infos)
            state.answers[key] = answer
            return answer

    def _refuse(self, state: State, label: str, exc: BridgeError) -> BridgeError:
        """Share an input error found before :meth:`_request` with the other ranks; return it."""
        state.registry.fail_round(exc, label)
        return exc

    # -- pure views (no communication) -------------------------------------------------

    def _current(self) -> State:
        """The live state; after close(), the last one (for reading counters and sizes)."""
        with self._lock:
            if self._closed and isinstance(self._state, State):
                return self._state
            return self._live()

    @property
    def layout(self) -> Layout:
        """The layout of the MPU's groups (or of the standalone world): pure rank arithmetic."""
        return self._current().layout

    @property
    def reader(self) -> Optional[MpuReader]:
        """The reader of the MPU, None when standalone."""
        return self._current().reader

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
        with self._lock:
            return group_ranks(self._live(), self.rank, name, ep_size)

    # -- dense groups ---------------------------------------------------------------------

    def tensor_parallel(self) -> GroupInfo:
        """Tensor-parallel group (size 1 without an MPU). Local when the MPU has it."""
        return self._dense("tp")

    def pipeline_parallel(self) -> GroupInfo:
        """Pipeline-parallel group (size 1 without an MPU). Local when the MPU has it."""
        return self._dense("pp")

    def model_parallel(self) -> GroupInfo:
        """Model-parallel group: tensor × pipeline (Megatron ≥ 2.0, DeepSpeed's grid)."""
        return self._dense("mp")

    def data_parallel(self) -> GroupInfo:
        """Data-parallel group; without an MPU, a clone of the world group (collective)."""
        return self._dense("dp")

    def sequence_parallel(self) -> GroupInfo:
        """Sequence (context) parallel group: the MPU's, or size 1."""
        return self._dense("cp")

    def sequence_data_parallel(self) -> GroupInfo:
        """The group ZeRO shards over and gradients are reduced in.

        The MPU's own sequence-data group if it has one; else data × context parallel
        when context parallelism is on; else the data-parallel group.
        """
        with self._lock:
            state = self._live()
            if "dp-cp" in state.borrowed:
                return state.borrowed["dp-cp"]
            if state.layout.config.cp == 1:
                return self.data_parallel()
            return self._dense("dp-cp")

    def _dense(self, kind: str) -> GroupInfo:
        """The MPU's own group of ``kind`` (local), or one from the layout (collective, once)."""
        with self._lock:
            state = self._live()
            if kind in state.borrowed:
                return state.borrowed[kind]
            spec = kind_named(kind)
            method = spec.method or kind
            if state.reader is not None and kind in ("tp", "pp", "mp"):
                logger.info("mpu-bridge: the %s MPU has no %s group; creating it", state.reader.flavour, kind)

            def families(s: State) -> List[Tuple[str, Partition]]:
                key = f"{method}[{partitions.layout_signature(s.layout)}]"
                return [(method, partitions.dense(s.layout, spec.name, self.rank, key=key))]

            return self._request(f"dense:{spec.name}", f"{method}()", families, lambda s, infos: infos[0])

    def world(self) -> GroupInfo:
        """A clone of the world group (DeepSpeed's ``_clone_world_group``); reused if one exists."""
        return self._request(
            "world", "world()",
            lambda s: [("world", partitions.world(self.world_size, self.rank))],
            lambda s, infos: infos[0],
        )

    def group(self, name: str, *, ep_size: Optional[int] = None) -> GroupInfo:
        """This rank's group of any kind of the kind table (``"tp-cp"``, ``"etp-ep-pp"``,
        ``"expert_tensor_parallel"`` ...): the MPU's own where it has one, else created.

        Expert kinds use the layout :meth:`expert_groups` gives ``ep_size`` (default: the
        MPU's or the standalone layout's own experts). Collective the first time per
        kind and size, like every group request. Example:
        ``bridge.group("tp-cp").ranks == bridge.ranks("tp-cp")``.
        """
        label = f"group({name!r}{'' if ep_size is None else f', ep_size={ep_size!r}'})"
        with self._lock:
            state = self._live()
            try:
                spec = kind_named(name)
                layout = state.layout
                if spec.grid == "expert" and ep_size is not None:
                    layout = expert_layout_for(state, positive_int("ep_size", ep_size))
                elif spec.name in state.borrowed:
                    return state.borrowed[spec.name]
            except KeyError as exc:
                raise self._refuse(state, label, BridgeError(str(exc.args[0]))) from None
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None
            display = spec.method or spec.name

            def families(s: State) -> List[Tuple[str, Partition]]:
                key = f"{display}[{partitions.layout_signature(layout)}]"
                return [(display, partitions.dense(layout, spec.name, self.rank, key=key))]

            def finish(s: State, infos: List[GroupInfo]) -> GroupInfo:
                return prefer_mpu_group(s, spec.name, infos[0])

            key = f"group:{spec.name}:{partitions.layout_signature(layout)}"
            return self._request(key, label, families, finish)

    def device_mesh(
        self,
        dims: Optional[Sequence[str]] = None,
        *,
        expert: bool = False,
        ep_size: Optional[int] = None,
        names: Union[Dict[str, str], Sequence[str], None] = None,
        keep_size_one: bool = True,
        device_type: str = "cpu",
    ) -> Any:
        """A ``torch.distributed.device_mesh.DeviceMesh`` over this bridge's own groups.

        ``dims`` (slowest first) default to ``("pp", "dp", "cp", "tp")``, or with
        ``expert=True`` to ``("pp", "edp", "ep", "etp")`` for the MPU's experts or
        ``ep_size``'s (the layout :meth:`expert_groups` gives it). ``names``: a mapping
        kind -> mesh dim name, or one name per dim (default: the kind table's
        ``mesh_dim``). ``keep_size_one=False`` drops size-1 dims. Built with
        ``DeviceMesh.from_group``: no group beyond the bridge's own; collective the first
        time, like every group request. See :mod:`mpu_bridge.mesh`.

        Example: ``bridge.device_mesh()["dp"].get_group() is bridge.data_parallel().group``.
        """
        from .mesh import device_mesh

        return device_mesh(self, dims, expert=expert, ep_size=ep_size, names=names,
                           keep_size_one=keep_size_one, device_type=device_type)

    def process_group_collection(self) -> Any:
        """megatron-core's own ``ProcessGroupCollection`` with every field ``use_mpu_process_groups()``
        fills, over this bridge's groups (see :mod:`mpu_bridge.pg_collection`).

        Over megatron-core's ``parallel_state``: its own group objects, nothing created.
        Standalone: the layout's groups, collective the first time. Raises
        MissingDependencyError on megatron-core older than 0.15.0. Example:
        ``GPTModel(..., pg_collection=bridge.process_group_collection())``.
        """
        from .pg_collection import process_group_collection

        return process_group_collection(self)

    def embedding_groups(self) -> Tuple[Optional[GroupInfo], Optional[GroupInfo]]:
        """(word embedding, position embedding) groups of this rank, None where it is in none.

        megatron-core's: the first and last pipeline stage of each pipeline group, and
        the first stage alone (one rank per group when pp = 1). The MPU's own where it
        has them; else created, collective the first time. Example: with pp = 2 on 4
        ranks and tp = 2, rank 1's are ``(1, 3)`` and ``(1,)``; rank 3 has no position one.
        """
        with self._lock:
            state = self._live()
            mpu_own = self._mpu_embedding_groups(state)
            if mpu_own is not None:
                return mpu_own
            if state.layout.config.pp > 1:
                # Position-embedding groups are one rank each but only on first stages, so they
                # are registered there only: first give every rank its one-rank group (covering),
                # so that every later one-rank request finds the same answer on every rank.
                self._request(
                    "one-rank", "embedding_groups()",
                    lambda s: [("one_rank", partitions.dense(plan(self.world_size, tp=1), "tp", self.rank,
                                                             key=f"one_rank[{self.world_size}]"))],
                    lambda s, infos: infos[0],
                )

            def families(s: State) -> List[Tuple[str, Partition]]:
                sig = partitions.layout_signature(s.layout)
                return [
                    ("embedding", partitions.embedding(s.layout, self.rank, key=f"embedding[{sig}]")),
                    ("position_embedding",
                     partitions.position_embedding(s.layout, self.rank, key=f"position_embedding[{sig}]")),
                ]

            return self._request("embedding", "embedding_groups()", families, lambda s, infos: (infos[0], infos[1]))

    def _mpu_embedding_groups(self, state: State) -> Optional[Tuple[Optional[GroupInfo], Optional[GroupInfo]]]:
        """The MPU's own embedding groups when it has megatron-core's getters (local), else None."""
        mpu = state.reader.mpu if state.reader is not None else None
        names = ("get_embedding_group", "get_position_embedding_group")
        if mpu is None or not all(callable(getattr(mpu, n, None)) for n in names):
            return None
        out: List[Optional[GroupInfo]] = []
        for name, getter in zip(("embedding", "position_embedding"), names):
            try:
                group = getattr(mpu, getter)()
            except Exception:  # megatron-core asserts "not initialized" where a rank has none
                group = None
            if group is None or not _torch.is_live(group):
                out.append(None)
                continue
            ranks = tuple(dist.get_process_group_ranks(group))
            out.append(GroupInfo(name, group, ranks, ranks.index(self.rank), True))
        return out[0], out[1]

    # -- expert groups ----------------------------------------------------------------------

    def expert_groups(
        self,
        ep_size: int,
        *,
        data_before_expert: Optional[bool] = None,
        expert_tensor_parallel: bool = True,
    ) -> ExpertGroups:
        """Expert-parallel and expert-data-parallel groups for ``ep_size`` (``"ep_size_<n>"``).

        With an MPU of tp > 1 and ``expert_tensor_parallel``, DeepSpeed's E+M+D
        layout; otherwise E+D, or D+E with ``data_before_expert=True``; pipeline-aware.
        ``data_before_expert=None`` follows the MPU's order (E+D when it has none).
        Groups equal to the MPU's own expert groups are the MPU's group objects:
        nothing is created. Collective the first time per size; asking again for the
        same size returns the same object with no communication.

        Example: over megatron-core initialised with tp 2, ep 2 on 4 ranks,
        ``bridge.expert_groups(2).expert_parallel.ranks`` is ``(0, 2)`` on rank 0.
        """
        label = f"expert_groups({ep_size!r})"
        with self._lock:
            state = self._live()
            try:
                size = positive_int("ep_size", ep_size)
                before = optional_bool("data_before_expert", data_before_expert, LayoutError)
                etp_on = boolean("expert_tensor_parallel", expert_tensor_parallel, LayoutError)
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None
            name = f"ep_size_{size}"
            existing = state.answers.get(f"experts:{name}")
            if isinstance(existing, ExpertGroups):
                return self._same_expert_options(existing, before, etp_on)
            if before is None:
                before = puts_data_before_expert(state)

            def families(s: State) -> List[Tuple[str, Partition]]:
                layout = expert_layout(s, size, before, etp_on)
                sig = partitions.layout_signature(layout)
                return [
                    ("expert_parallel", partitions.dense(layout, "ep", self.rank, key=f"expert_parallel[{sig}]")),
                    ("expert_data_parallel",
                     partitions.dense(layout, "edp", self.rank, key=f"expert_data_parallel[{sig}]")),
                ]

            def finish(s: State, infos: List[GroupInfo]) -> ExpertGroups:
                layout = expert_layout(s, size, before, etp_on)
                ep_info, edp_info = (prefer_mpu_group(s, k, i) for k, i in zip(("ep", "edp"), infos))
                return ExpertGroups(name, size, ep_info, edp_info, layout, bool(before), etp_on)

            return self._request(f"experts:{name}", label, families, finish)

    @staticmethod
    def _same_expert_options(existing: ExpertGroups, before: Optional[bool], etp_on: bool) -> ExpertGroups:
        if (before is None or before == existing.data_before_expert) and etp_on == existing.expert_tensor_parallel:
            return existing
        raise BridgeError(
            f"{existing.name} already exists with data_before_expert={existing.data_before_expert}, "
            f"expert_tensor_parallel={existing.expert_tensor_parallel}; one expert size has "
            "one layout (DeepSpeed names groups by size alone)"
        )

    def _experts(self) -> Dict[str, ExpertGroups]:
        state = self._live()
        return {v.name: v for k, v in state.answers.items() if k.startswith("experts:")}

    def expert_group_names(self) -> Tuple[str, ...]:
        """Names of the expert groups made so far (local)."""
        with self._lock:
            return tuple(self._experts())

    def get_expert_groups(self, name: str) -> ExpertGroups:
        """The expert groups created under ``name`` (``"ep_size_4"``); local."""
        with self._lock:
            experts = self._experts()
            if name in experts:
                return experts[name]
            known = ", ".join(experts) or "none yet"
            raise BridgeError(f"no expert groups named {name!r} (created: {known}); call expert_groups(ep_size) first")

    def max_expert_size(self) -> int:
        """The largest expert-parallel size created so far (local)."""
        with self._lock:
            experts = self._experts()
            if not experts:
                raise BridgeError("no expert groups yet; call expert_groups(ep_size) first")
            return max(g.ep_size for g in experts.values())

    def max_expert_size_name(self) -> str:
        return f"ep_size_{self.max_expert_size()}"

    def max_expert_groups(self) -> ExpertGroups:
        return self.get_expert_groups(self.max_expert_size_name())

    # -- ZeRO++ hpZ ------------------------------------------------------------------

    def zero_param_groups(self, partition_size: int) -> GroupInfo:
        """ZeRO++ hpZ secondary-partition group of ``partition_size`` ranks.

        Without model parallelism: contiguous blocks over the world (DeepSpeed's
        behaviour). With TP or PP > 1: consecutive blocks of this rank's
        sequence-data-parallel group, so a block never mixes model-parallel ranks.
        A size larger than that group is clamped to it, as DeepSpeed does (logged
        once as a warning). Collective the first time per size; several sizes may coexist.
        """
        label = f"zero_param_groups({partition_size!r})"
        with self._lock:
            state = self._live()
            try:
                size = positive_int("partition_size", partition_size)
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None

            def families(s: State) -> List[Tuple[str, Partition]]:
                block = partitions.hpz_block(s.layout, size)
                if block < size:
                    self._warn_clamp(size, block, s.layout)
                return [("zero_param_intra_parallel", partitions.hpz(s.layout, block, self.rank))]

            return self._request(f"zero:{size}", label, families, lambda s, infos: infos[0])

    def _warn_clamp(self, size: int, block: int, layout: Layout) -> None:
        if size in self._warned_clamp:
            return
        self._warned_clamp.add(size)
        c = layout.config
        logger.warning(
            "mpu-bridge: hpZ partition size %d is larger than the data-parallel group (dp=%d, cp=%d: %d ranks); "
            "using blocks of %d, as DeepSpeed does",
            size, c.dp, c.cp, block, block,
        )

    # -- all-to-all --------------------------------------------------------------------

    def all_to_all_groups(self, gpus_per_node: Optional[int] = None) -> AllToAllGroups:
        """Node-local and cross-node groups, as DeepSpeed's ``_get_local_all_to_all_group``.

        GPUs per node come from the argument, then ``attach(gpus_per_node=...)``,
        then ``LOCAL_WORLD_SIZE``, then the accelerator count. Collective the first
        time per node size.
        """
        label = f"all_to_all_groups({gpus_per_node!r})"
        with self._lock:
            state = self._live()
            try:
                gpn = resolve_gpus_per_node(gpus_per_node, self._gpus_per_node)
                eff, nodes = partitions.all_to_all_nodes(self.world_size, gpn)
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None

            def families(s: State) -> List[Tuple[str, Partition]]:
                parts = partitions.all_to_all(self.world_size, gpn, self.rank)
                return list(zip(("local", "cross_node"), parts))

            def finish(s: State, infos: List[GroupInfo]) -> AllToAllGroups:
                return AllToAllGroups(eff, nodes, infos[0], infos[1] if nodes > 1 else None)

            return self._request(f"a2a:{gpn}", label, families, finish)

    # -- adapters & lifecycle ------------------------------------------------------------

    def as_legacy_mpu(self) -> Any:
        """An object with the whole ``mpu`` surface DeepSpeed calls (see :mod:`mpu_bridge.legacy_mpu`)."""
        return LegacyMpu(self)

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

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(mpu: Optional[object] = None, **options: Any) -> Bridge:
    """Build a :class:`Bridge` over ``mpu`` (a module or object), or standalone when ``None``.

    Options: ``backend``, ``timeout`` (a timedelta: bounds creating each group),
    ``pg_options``, ``strategy`` ("auto", "split_group", "local_new_group",
    "new_group"), ``agreement_timeout`` (seconds: bounds each cross-rank agreement),
    ``verify_plan``, ``order`` (the MPU's rank order, if it cannot be inferred; the
    layout's order without an MPU), ``gpus_per_node``. Without an MPU, ``tp``, ``pp``,
    ``cp``, ``ep``, ``etp`` give a full Megatron layout whose groups are created on
    first use (default: data parallel = the world). Reading the MPU is local: no
    communication.

    Example::

        bridge = mpu_bridge.attach(parallel_state)
        bridge.expert_groups(4).expert_parallel.ranks
        standalone = mpu_bridge.attach(None, tp=2, pp=2)   # no Megatron needed
    """
    return Bridge(mpu, **options)
