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

import functools
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from . import partitions, support
from .bridge_base import BridgeBase, Outside, served
from .errors import BridgeError, LayoutError, OutsideSpanError
from .kinds import Kind, kind_named
from .layout import Layout
from .legacy_mpu import LegacyMpu
from .partitions import Partition
from .state import (
    AllToAllGroups,
    ExpertGroups,
    GroupInfo,
    State,
    expert_layout,
    expert_layout_for,
    mpu_embedding_groups,
    prefer_mpu_group,
    puts_data_before_expert,
    resolve_gpus_per_node,
)
from .validate import boolean, optional_bool, positive_int

__all__ = ["GroupInfo", "ExpertGroups", "AllToAllGroups", "Bridge", "attach"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

class Bridge(BridgeBase):
    """Process groups derived from one MPU (or from the world alone, with no MPU).

    Create with :func:`attach`. Group-returning calls are collective the first time
    they are made (see the module docstring); the bridge checks that every rank made
    the same call before creating anything and raises
    :class:`~mpu_bridge.errors.PlanMismatchError` on every rank otherwise. The
    lifecycle, sizes and rank lists come from :class:`~mpu_bridge.bridge_base.BridgeBase`.
    """

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
        """Data-parallel group; without an MPU and sizes, the whole world: the default group (collective)."""
        return self._dense("dp")

    def sequence_parallel(self) -> GroupInfo:
        """Sequence (context) parallel group: the MPU's, or size 1."""
        return self._dense("cp")

    def sequence_data_parallel(self) -> GroupInfo:
        """The group ZeRO shards over and gradients are reduced in.

        The MPU's own sequence-data group if it has one; else data × context parallel
        when context parallelism is on; else the data-parallel group.
        """
        state = self._view()
        if "dp-cp" in state.borrowed:
            return state.borrowed["dp-cp"]
        if state.layout.config.cp == 1:
            return self.data_parallel()
        return self._dense("dp-cp")

    def _dense(self, kind: str) -> GroupInfo:
        """The MPU's own group of ``kind`` (local), or one from the layout (collective, once)."""
        spec = kind_named(kind)
        state = self._view()
        if state.reader is not None and kind in ("tp", "pp", "mp") and kind not in state.borrowed:
            logger.info("mpu-bridge: the %s MPU has no %s group; creating it", state.reader.flavour, kind)
        return self._group(spec, None, f"{spec.method or kind}()")

    def world(self) -> GroupInfo:
        """The whole world's group, for DeepSpeed's ``_clone_world_group``: the MPU's own
        world-sized group if it has one, else the default group itself (one communicator
        per rank set) -- unless the bridge has its own backend or ``pg_options`` (then one
        group is created, once). DeepSpeed clones the world only because old PyTorch's
        ``get_global_rank`` refused ``WORLD``."""
        cached = self._view().answers.get("world")  # asked before: local, never waits
        if cached is not None:
            return served(cached)
        with self._lock:
            state = self._live()
            span = state.layout.ranks
            group = state.registry.world_group() if len(span) == self.world_size else None
            if group is not None:  # local: nothing to create, nothing to agree on
                if "world" not in state.answers:
                    state.answers["world"] = GroupInfo("world", group, tuple(range(self.world_size)), self.rank,
                                                       state.registry.is_borrowed(group))
                return state.answers["world"]
        return self._request(
            "world", "world()",
            lambda s: [("world", partitions.world(len(span), self.rank, span.start))],
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
            try:
                spec = kind_named(name)
            except KeyError as exc:
                raise self._refuse(self._live(), label, BridgeError(str(exc.args[0]))) from None
            return self._group(spec, ep_size, label)

    def prepare(
        self, kinds: Sequence[str] = (), *, expert_sizes: Sequence[int] = (), embedding: bool = False,
        world: bool = False,
    ) -> int:
        """Make the groups a trainer will ask for in one agreement round; returns how many
        requests were new (0: nothing to do, and no round).

        ``kinds``: names of the kind table (as :meth:`group`); expert kinds for each of
        ``expert_sizes`` (as ``group(kind, ep_size=size)``), or for the bridge's own experts
        when there are none. Each size also prepares :meth:`expert_groups`;
        ``embedding``: :meth:`embedding_groups`; ``world``: :meth:`world` (a rank span's
        group of all its ranks; the whole world's needs no round). Later
        calls of those getters answer from the cache, locally. Collective, like every
        group request: every rank passes the same arguments. Example:
        ``bridge.prepare(["tp-cp", "dp-cp"], expert_sizes=[2]); bridge.group("tp-cp")``.
        """
        label = (f"prepare({list(kinds)!r}, expert_sizes={list(expert_sizes)!r}, embedding={embedding!r}, "
                 f"world={world!r})")
        with self._lock:
            state = self._live()
            try:
                if isinstance(kinds, str) or not isinstance(kinds, (list, tuple)):
                    raise BridgeError(f"kinds must be a list of kind names, got {kinds!r}")
                if isinstance(expert_sizes, str) or not isinstance(expert_sizes, (list, tuple)):
                    raise BridgeError(f"expert_sizes must be a list of sizes, got {expert_sizes!r}")
                specs = [kind_named(k) if isinstance(k, str) else kind_named(repr(k)) for k in kinds]
                sizes = [positive_int("ep_size", size) for size in expert_sizes]
                with_embedding = boolean("embedding", embedding, LayoutError)
                with_world = boolean("world", world, LayoutError)
            except KeyError as exc:
                raise self._refuse(state, label, BridgeError(str(exc.args[0]))) from None
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None

            def asks() -> None:
                calls: List[Callable[[], Any]] = [
                    functools.partial(self._group, spec, size, label)
                    for spec in specs for size in (sizes if spec.grid == "expert" and sizes else [None])
                ]
                calls += [functools.partial(self.expert_groups, size) for size in sizes]
                calls += [self.embedding_groups] if with_embedding else []
                calls += [self.world] if with_world else []
                for call in calls:
                    try:
                        call()
                    except OutsideSpanError:  # made before, on a rank outside the span: nothing to do
                        continue

            return self._batched(label, asks)

    def _group(self, spec: Kind, ep_size: Optional[int], label: str) -> GroupInfo:
        """The one request path of :meth:`group` and the dense getters (one answer per kind)."""
        if ep_size is None or spec.grid != "expert":  # answered before, or the MPU's own: never waits
            view = self._view()
            known = view.borrowed.get(spec.name) or view.answers.get(_group_key(spec, view.layout))
            if known is not None:
                return served(known)
            if spec.name in view.outside_kinds:  # the span's members borrow it: no request
                raise Outside(self.rank, view.layout).error()
        with self._lock:
            state = self._live()
            try:
                layout = state.layout
                if spec.grid == "expert" and ep_size is not None:
                    layout = expert_layout_for(state, positive_int("ep_size", ep_size))
                elif spec.name in state.borrowed:
                    return state.borrowed[spec.name]
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None
            display = spec.method or spec.name

            def families(s: State) -> List[Tuple[str, Partition]]:
                key = f"{display}[{partitions.layout_signature(layout)}]"
                return [(display, partitions.dense(layout, spec.name, self.rank, key=key))]

            def finish(s: State, infos: List[GroupInfo]) -> GroupInfo:
                return prefer_mpu_group(s, spec.name, infos[0])

            return self._request(_group_key(spec, layout), label, families, finish)

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

    def process_group_collection(self, *, all_gather: bool = False) -> Any:
        """megatron-core's own ``ProcessGroupCollection`` with every field the installed
        release declares, over this bridge's groups (see :mod:`mpu_bridge.pg_collection`).

        Over megatron-core's ``parallel_state``: its own group objects, nothing created.
        Standalone: the layout's groups, collective the first time. ``all_gather=True``
        also fills ``dp_cp_ag`` / ``expt_dp_ag`` (megatron-core >= 0.18) with communicators
        of their own. Raises MissingDependencyError on megatron-core older than 0.15.0.
        Example: ``GPTModel(..., pg_collection=bridge.process_group_collection())``.
        """
        from .pg_collection import process_group_collection

        return process_group_collection(self, all_gather=boolean("all_gather", all_gather, LayoutError))

    def embedding_groups(self) -> Tuple[Optional[GroupInfo], Optional[GroupInfo]]:
        """(word embedding, position embedding) groups of this rank, None where it is in none.

        megatron-core's: the first and last pipeline stage of each pipeline group, and
        the first stage alone (one rank per group when pp = 1). The MPU's own where it
        has them; else created, collective the first time. Example: with pp = 2 on 4
        ranks and tp = 2, rank 1's are ``(1, 3)`` and ``(1,)``; rank 3 has no position one.
        """
        with self._lock:
            state = self._live()
            mpu_own = mpu_embedding_groups(state, self.rank)
            if mpu_own is not None:
                return mpu_own
            def families(s: State) -> List[Tuple[str, Partition]]:
                sig = partitions.layout_signature(s.layout)
                return [
                    ("embedding", partitions.embedding(s.layout, self.rank, key=f"embedding[{sig}]")),
                    ("position_embedding",
                     partitions.position_embedding(s.layout, self.rank, key=f"position_embedding[{sig}]")),
                ]

            return self._request("embedding", "embedding_groups()", families, lambda s, infos: (infos[0], infos[1]))

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
            existing = served(state.answers.get(f"experts:{name}"))
            if isinstance(existing, ExpertGroups):
                return self._same_expert_options(existing, before, etp_on)
            if before is None:
                before = puts_data_before_expert(state)

            planned: List[Layout] = []  # the expert layout, computed once by families()

            def families(s: State) -> List[Tuple[str, Partition]]:
                layout = expert_layout(s, size, before, etp_on)
                planned.append(layout)
                sig = partitions.layout_signature(layout)
                return [
                    ("expert_parallel", partitions.dense(layout, "ep", self.rank, key=f"expert_parallel[{sig}]")),
                    ("expert_data_parallel",
                     partitions.dense(layout, "edp", self.rank, key=f"expert_data_parallel[{sig}]")),
                ]

            def finish(s: State, infos: List[GroupInfo]) -> ExpertGroups:
                ep_info, edp_info = (prefer_mpu_group(s, k, i) for k, i in zip(("ep", "edp"), infos))
                return ExpertGroups(name, size, ep_info, edp_info, planned[0], bool(before), etp_on)

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
                span = state.layout.ranks
                eff, nodes = partitions.all_to_all_nodes(len(span), gpn)
                if span.start % eff:
                    raise LayoutError(
                        f"this bridge's rank span starts at rank {span.start}, which is not the first "
                        f"rank of a node of {eff} GPUs: its node-local all-to-all groups would cross nodes"
                    )
            except BridgeError as exc:
                raise self._refuse(state, label, exc) from None

            def families(s: State) -> List[Tuple[str, Partition]]:
                parts = partitions.all_to_all(len(span), gpn, self.rank, span.start)
                return list(zip(("local", "cross_node"), parts))

            def finish(s: State, infos: List[GroupInfo]) -> AllToAllGroups:
                return AllToAllGroups(eff, nodes, infos[0], infos[1] if nodes > 1 else None)

            return self._request(f"a2a:{gpn}", label, families, finish)

    # -- adapters -----------------------------------------------------------------------------

    def as_legacy_mpu(self) -> Any:
        """An object with the whole ``mpu`` surface DeepSpeed calls (see :mod:`mpu_bridge.legacy_mpu`)."""
        return LegacyMpu(self)


def _group_key(spec: Kind, layout: Layout) -> str:
    """The answer cache's key of :meth:`Bridge.group` for ``spec`` in ``layout``."""
    return f"group:{spec.name}:{partitions.layout_signature(layout)}"


def attach(mpu: Optional[object] = None, **options: Any) -> Bridge:
    """Build a :class:`Bridge` over ``mpu`` (a module or object), or standalone when ``None``.

    Options: ``backend``, ``timeout`` (a timedelta: bounds creating each group),
    ``pg_options``, ``strategy`` ("auto", "split_group", "local_new_group",
    "new_group"), ``agreement_timeout`` (seconds: bounds each cross-rank agreement),
    ``verify_plan``, ``order`` (the MPU's rank order, if it cannot be inferred; the
    layout's order without an MPU), ``gpus_per_node``. Without an MPU, ``tp``, ``pp``,
    ``cp``, ``ep``, ``etp`` (and megatron-core 0.19's ``gtp_remat``, ``expert_gtp_remat``)
    give a full Megatron layout whose groups are created on first use (default: data
    parallel = the world). Reading the MPU is local: no
    communication.

    Example::

        bridge = mpu_bridge.attach(parallel_state)
        bridge.expert_groups(4).expert_parallel.ranks
        standalone = mpu_bridge.attach(None, tp=2, pp=2)   # no Megatron needed
    """
    support.note_untested_releases()  # once per process: a torch / megatron-core / DeepSpeed newer than tested
    return Bridge(mpu, **options)
