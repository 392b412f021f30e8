"""Turning rank sets into process groups: one cache, agreed batches, safe teardown.

A :class:`GroupRegistry` owns every communicator a bridge creates. It is keyed by
``(sorted ranks, backend, options)``, so a rank set never gets a second
communicator: groups the MPU already has are registered with :meth:`~GroupRegistry.borrow`
(and never destroyed here), and a request for a rank set that is registered gets
the registered group back.

Requests come as :class:`~mpu_bridge.partitions.Partition` s: all groups of one
kind, which together cover the world. :meth:`GroupRegistry.ensure` takes a batch:

1. every rank publishes what it is about to do and waits for the others
   (:mod:`mpu_bridge.agreement`) -- *always*, also when every group is registered
   already, so ranks that ask for different things fail on every rank instead of
   returning different groups that later hang a collective;
2. :mod:`mpu_bridge.planning` turns the round's outcome into one decision per
   partition (reuse or create, and how), identical on every rank;
3. a :mod:`mpu_bridge.strategies` object creates what is missing.

The member-only strategy has a hazard in PyTorch: such a group is named
``sha1("<ranks joined by _>_<salt>")``, by its ranks *and a per-rank number*, the
salt, and that name is the store prefix under which the members rendezvous. Which
number is the salt changed between releases (``distributed_c10d._hash_ranks_to_str``):
up to 2.13 it is how many groups the calling process holds (``len(_world.pg_names)``),
from 2.14 it is PyTorch's group counter (``_world.group_count``), which then also moves
with every member-only group on its members alone -- and the same counter names every
all-ranks ``new_group``. :func:`mpu_bridge._torch.member_only_naming` finds the running
release's rule by behaviour; a PyTorch it does not recognise gets no member-only
creation at all (the all-ranks loop, said once in the log). So:

(a) every member must hash the same salt when it creates the group: the registry uses
    member-only creation for a batch only when the round shows that the members of
    every group to create will (a grouped fact, :func:`mpu_bridge.agreement.agree`:
    O(1) store operations per rank and partition); ranks may differ -- after embedding
    groups, which leave ranks out -- as long as each group's members agree;
(b) a name must never repeat: after ``destroy_process_group`` the held-group count
    drops (and a re-initialised world restarts the counter), the same ranks hash to the
    same name again, and the new group's rendezvous reads the dead group's addresses
    from the store; the registry marks every name it used in the store and falls back
    when one is about to repeat;
(c) the ranks' group counters must stay equal, or every later all-ranks group (the
    registry's, megatron-core's, the user's) is named differently on different ranks:
    where member-only creation may move the counter (from 2.14, and wherever the probe
    cannot tell), a member-only batch that creates a family leaving ranks out (embedding
    groups, a rank span's groups) ends with every rank moving its counter up to one
    agreed value, the counter before the batch (the round shows it equal on every rank)
    plus the number of partitions created (:func:`_even_counter`); where the counters
    differed before, it uses the all-ranks loop, which moves every rank's counter alike,
    and that loop itself runs only when the round shows every rank's counter equal (else
    a clear error).

Otherwise a batch falls back to ``new_group`` (the reason logged once). Without the
round (``verify_plan=False``, the ``fake`` backend) the registry cannot measure (a), and
falls back once it has created a family that leaves ranks out
(:func:`mpu_bridge.planning.safe_without_check`).

Timeouts: the agreement round is bounded by ``agreement_timeout``; creating a
group after it is bounded by the process-group ``timeout`` (a rank that dies
inside ``new_group`` is noticed by its peers only then).

Example (every rank)::

    registry = GroupRegistry()
    tp = partitions.dense(plan(dist.get_world_size(), tp=2), "tp", dist.get_rank())
    (group,) = registry.ensure([tp])
    registry.close()   # destroys only what it created
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from . import _torch, planning, strategies
from .agreement import NAMESPACE, Agreement, agree
from .errors import BridgeError, GroupCreationError, LayoutError
from .partitions import Partition, abbrev
from .planning import STRATEGIES
from .validate import MAX_TIMEOUT_S, integer, optional_bool, seconds

__all__ = ["STRATEGIES", "Partition", "GroupRegistry"]

logger = logging.getLogger(__name__)

# Store keys marking member-only group names already used (see the module docstring).
_USED_NAME_PREFIX = "mpu_bridge/used_group_name"
_DUPLICATE_PREFIX = "mpu_bridge/duplicate_made"


@dataclass
class _Entry:
    ranks: Tuple[int, ...]
    group: Any
    borrowed: bool
    source: str  # partition key, or "borrowed"
    strategy: Optional[str] = None


@dataclass(frozen=True)
class _Options:
    """The validated constructor arguments of a registry."""

    backend: str
    default_backend: str
    timeout: datetime.timedelta
    pg_options: Optional[object]
    requested_strategy: str
    agreement_timeout: float
    verify_plan: Optional[bool]

    @classmethod
    def check(cls, backend: Optional[str], timeout: Any, pg_options: Optional[object], strategy: Any,
              agreement_timeout: Any, verify_plan: Any) -> "_Options":
        if strategy != "auto" and strategy not in STRATEGIES:
            raise GroupCreationError(
                f"unknown group creation strategy {strategy!r}; use 'auto' or one of {', '.join(STRATEGIES)}"
            )
        if not isinstance(timeout, datetime.timedelta) or not 0 < timeout.total_seconds() <= MAX_TIMEOUT_S:
            raise GroupCreationError(
                f"timeout must be a positive datetime.timedelta of at most 30 days, got {timeout!r}"
            )
        optional_bool("verify_plan", verify_plan, GroupCreationError)
        if backend is not None and not isinstance(backend, str):
            raise GroupCreationError(f"backend must be a string such as 'gloo' or 'nccl', got {backend!r}")
        default_backend = str(dist.get_backend()).lower()
        return cls(
            backend=backend.lower() if backend else default_backend,
            default_backend=default_backend,
            timeout=timeout,
            pg_options=pg_options,
            requested_strategy=strategy,
            agreement_timeout=seconds("agreement_timeout", agreement_timeout, GroupCreationError),
            verify_plan=verify_plan,
        )


class GroupRegistry:
    """One rank's cache of process groups, keyed by (sorted ranks, backend, options).

    ``backend`` defaults to the default group's; ``timeout`` and ``pg_options`` go to
    every group it creates. ``strategy`` is ``"auto"`` or one of :data:`STRATEGIES`;
    the resolved choice is the ``strategy`` attribute (and one INFO log line).
    ``agreement_timeout`` (seconds, finite, at most 30 days) bounds each cross-rank
    round; ``verify_plan`` None means "agree unless the world is a single rank or
    uses the ``fake`` backend".

    All methods are thread-safe; ``close`` is idempotent. ``ensure`` is collective:
    every rank must call it with the same partitions in the same order (over the span's
    ranks only, after :meth:`narrow`). One class, longer than most here, because the cache,
    the per-batch decisions and the teardown share one lock and one set of counters; the
    decisions themselves are pure functions of :mod:`mpu_bridge.planning`. Example::

        registry = GroupRegistry(agreement_timeout=30)
        registry.borrow(tp_ranks, mpu.get_tensor_model_parallel_group())
        ep, edp = registry.ensure([ep_partition, edp_partition])
        registry.close()
    """

    def __init__(
        self,
        *,
        backend: Optional[str] = None,
        timeout: datetime.timedelta = datetime.timedelta(minutes=10),
        pg_options: Optional[object] = None,
        strategy: str = "auto",
        agreement_timeout: float = 60.0,
        verify_plan: Optional[bool] = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise GroupCreationError(
                "torch.distributed is not initialised; call torch.distributed.init_process_group "
                "before creating a GroupRegistry"
            )
        opts = _Options.check(backend, timeout, pg_options, strategy, agreement_timeout, verify_plan)
        self._lock = threading.RLock()
        self.rank: int = dist.get_rank()
        self.world_size: int = dist.get_world_size()
        self.default_backend = opts.default_backend
        self.backend = opts.backend
        self.timeout = opts.timeout
        self.pg_options = opts.pg_options
        self.agreement_timeout = opts.agreement_timeout
        self.requested_strategy = opts.requested_strategy
        self.strategy: str = strategies.choose(strategy, backend=self.backend, default_backend=self.default_backend)
        self.last_strategy: Optional[str] = None
        self.verify_plan: bool = self._resolve_verify(opts.verify_plan)
        self._store: Any = _torch.default_store() if self.verify_plan else None
        self._options_key: Any = None if pg_options is None else ("options", id(pg_options))
        self._entries: Dict[Tuple[Any, ...], _Entry] = {}
        self._created: List[_Entry] = []
        self._borrowed_groups: List[Any] = []
        self._closed = False
        self._warned: set = set()
        self._strategies: Dict[str, strategies.Strategy] = {}
        # Set once a group that leaves ranks out is created: the ranks' salts may differ.
        self._uneven = False
        # Fingerprints of the partitions ensured so far (without the round: a rank in none of
        # a partition's groups knows it exists on the others only from this).
        self._ensured: set = set()
        self._world_borrowed: Any = None  # the first borrowed group over the whole world
        self.scope: Optional[range] = None  # the ranks that take part in every batch (None: the world)
        self._salted: Optional[strategies.SaltedNewGroup] = None  # the batch's, when it names groups itself
        self._unchecked_batches = 0
        self.created = self.borrowed = self.reused = self.agreements = self.fallbacks = 0
        logger.info(
            "mpu-bridge: creating process groups with strategy %s (requested %s, backend %s, plan check %s)",
            self.strategy,
            strategy,
            self.backend,
            "on" if self.verify_plan else "off",
        )

    # -- configuration -----------------------------------------------------------

    def _resolve_verify(self, verify_plan: Optional[bool]) -> bool:
        fake = self.default_backend == "fake"
        if verify_plan is None:
            if fake:
                logger.info("mpu-bridge: 'fake' backend: the cross-rank plan check is skipped")
                return False
            return self.world_size > 1
        if verify_plan and fake:
            raise GroupCreationError(
                "verify_plan=True needs a real store, but the 'fake' backend's FakeStore cannot "
                "count; use verify_plan=None (skips the check on 'fake')"
            )
        if not verify_plan:
            logger.info("mpu-bridge: plan check disabled (verify_plan=False)")
        return bool(verify_plan) and self.world_size > 1

    def _key(
        self, ranks: Sequence[int], backend: Optional[str] = None, options: Any = "self", channel: str = ""
    ) -> Tuple[Any, ...]:
        """The cache key of a rank set: ranks, backend, options, and -- on a channel other
        than ``""`` (the all-gather twins) -- the channel inside the options part."""
        opts = self._options_key if options == "self" else options
        return (
            tuple(sorted(ranks)),
            self.backend if backend is None else backend,
            opts if not channel else (opts, "channel", channel),
        )

    def _strategy(self, name: str) -> strategies.Strategy:
        if name not in self._strategies:
            backend = self.backend if self.backend != self.default_backend else None
            self._strategies[name] = strategies.by_name(
                name, timeout=self.timeout, pg_options=self.pg_options, backend=backend
            )
        return self._strategies[name]

    # -- public API ------------------------------------------------------------------

    def narrow(self, ranks: range) -> None:
        """Make the rank span ``ranks`` (holding this rank) the only ranks that take part in
        this registry's batches: a bridge read from one module's collection, which the ranks
        outside never build. Its groups are then created member-only (see
        :func:`mpu_bridge.planning.decide_span_strategy`): no rank outside ever enters a
        ``new_group``, and PyTorch's group counters stay as they were. Before any batch.
        Example: ``registry.narrow(range(8, 64))`` on ranks 8..63.
        """
        with self._lock:
            if self.rank not in ranks or ranks.start < 0 or ranks.stop > self.world_size or ranks.step != 1:
                raise GroupCreationError(f"rank {self.rank}: {ranks} is not a rank span of the world holding it")
            if self.agreements:
                raise GroupCreationError("narrow() comes before the registry's first batch")
            self.scope = ranks if len(ranks) < self.world_size else None

    def borrow(self, ranks: Sequence[int], group: Any) -> Any:
        """Register ``group`` (owned by the MPU) for ``ranks``; it is reused, never destroyed.

        Returns ``group``. Raises GroupCreationError if ``group`` is not this rank's
        process group over exactly ``ranks``. Borrowing a rank set that is already
        registered keeps the first group for lookups. Example:
        ``registry.borrow([0, 1], mpu.get_tensor_model_parallel_group())``.
        """
        with self._lock:
            self._check_open()
            if set(map(type, ranks)) <= {int}:  # the common case, checked at C speed
                members = tuple(sorted(ranks))
            else:
                members = tuple(sorted(integer("a borrowed rank", r, GroupCreationError) for r in ranks))
            self._check_borrowable(members, group)
            try:
                actual = tuple(sorted(dist.get_process_group_ranks(group)))
                backend = str(dist.get_backend(group)).lower()
            except Exception as exc:  # ValueError / KeyError / RuntimeError by version
                raise GroupCreationError(
                    f"rank {self.rank}: cannot borrow {group!r} for ranks {abbrev(members)}: "
                    f"torch.distributed does not know it ({exc})"
                ) from exc
            if actual != members:
                raise GroupCreationError(
                    f"rank {self.rank}: the group borrowed for ranks {abbrev(members)} actually "
                    f"holds ranks {abbrev(actual)}; pass the ranks of that very group"
                )
            key = self._key(members, backend=backend, options=None)
            if key not in self._entries:
                self._entries[key] = _Entry(members, group, borrowed=True, source="borrowed")
                if len(members) == self.world_size and key[1:] == (self.backend, self._options_key):
                    self._world_borrowed = group
            if not any(g is group for g in self._borrowed_groups):
                self._borrowed_groups.append(group)
                self.borrowed += 1
            return group

    def _check_borrowable(self, members: Tuple[int, ...], group: Any) -> None:
        if group is None or group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
            raise GroupCreationError(
                f"rank {self.rank}: cannot borrow {group!r} for ranks {abbrev(members)}: "
                "it is not a process group this rank belongs to"
            )
        if self.rank not in members:
            raise GroupCreationError(
                f"rank {self.rank}: cannot borrow a group for ranks {abbrev(members)}, "
                f"which do not include rank {self.rank}"
            )

    def is_borrowed(self, group: Any) -> bool:
        """Whether ``group`` was registered with :meth:`borrow` (the MPU owns it)."""
        with self._lock:
            return any(g is group for g in self._borrowed_groups)

    def created_here(self, group: Any) -> bool:
        """Whether this registry created ``group`` (and has not destroyed it)."""
        with self._lock:
            return any(entry.group is group for entry in self._created)

    def serves_world(self) -> bool:
        """Whether the default group is this registry's group for the whole world's rank
        set: its backend and options are the default group's (one communicator per rank set)."""
        return self.backend == self.default_backend and self.pg_options is None

    def world_group(self) -> Optional[Any]:
        """This registry's group for the whole world without listing it: the MPU's own
        world-sized group if one was borrowed, else the default group where
        :meth:`serves_world`, else None (one must be created). O(1)."""
        with self._lock:
            if self._world_borrowed is not None:
                return self._world_borrowed
            return _torch.default_group() if self.serves_world() else None

    def lookup(self, ranks: Sequence[int], channel: str = "") -> Optional[Any]:
        """The registered group for ``ranks`` (this registry's backend and options, on
        ``channel``), or None; for the whole world's rank set on the main channel,
        :meth:`world_group` when nothing is registered."""
        with self._lock:
            if self._closed:
                return None
            entry = self._entries.get(self._key([int(r) for r in ranks], channel=channel))
            if entry is None and len(ranks) == self.world_size and not channel:
                return self.world_group()
            return None if entry is None else entry.group

    def ensure(self, partitions: Sequence[Partition], *, label: str = "") -> List[Optional[Any]]:
        """This rank's group of each partition, creating what is not registered yet; collective.

        Agrees with every rank on the batch first (one store round, also when every
        group is registered already), then, in order, reuses or creates each
        partition. ``label`` names the caller's request in error messages (e.g.
        ``"expert_groups(4)"``). Returns one entry per partition: this rank's group,
        or None when the rank is in none of its groups. Raises PlanMismatchError when
        ranks ask for different partitions, GroupCreationError when ranks do not all
        arrive within ``agreement_timeout`` or creation fails, LayoutError for
        malformed partitions. Example: ``ep_group, edp_group = registry.ensure([ep, edp])``.
        """
        with self._lock:
            self._check_open()
            parts = list(partitions)
            for p in parts:
                if not isinstance(p, Partition):
                    raise LayoutError(f"ensure() takes Partition objects, got {type(p).__name__}: {p!r}")
            if not parts:
                return []
            try:
                for p in parts:
                    p.check(self.world_size, self.rank)
            except LayoutError as exc:
                self.fail_round(exc, label)
                raise
            try:
                reuse, strategy, even = self._plan_batch(parts, label)
            except RuntimeError as exc:  # a store operation outside agree() failed
                raise GroupCreationError(
                    f"rank {self.rank}: the default store failed while planning groups: {exc}"
                ) from exc
            self.last_strategy = strategy
            results: List[Optional[Any]] = []
            try:
                for p, reused in zip(parts, reuse):
                    if reused:
                        self.reused += 1
                        results.append(None if p.own is None else self.lookup(p.own, p.channel))
                    elif reused is None:  # mixed: enter every group, keep what this rank holds
                        self._uneven = True  # the holders keep one group, the others gain one
                        results.append(self._create_keeping(p))
                    else:
                        results.append(self._create(p, strategy))
            finally:
                if even is not None:  # every rank, whatever it created: the counters equal again
                    _torch.advance_group_counter(even)
            if not self.verify_plan:
                self._ensured.update(p.fingerprint() for p in parts if p.own is None)
            return results

    def fail_round(self, exc: Exception, label: str = "") -> None:
        """Join the current round with an 'invalid request' plan, so the other ranks fail
        at once instead of waiting for this one; then the caller raises ``exc``.

        For input errors found on this rank before :meth:`ensure` could run (every rank
        that finds the same error agrees on it and raises it; the others get a
        PlanMismatchError naming it). Collective, like ``ensure``.
        """
        if not self.verify_plan:
            return
        message = str(exc)
        digest = "invalid-" + hashlib.sha1(message.encode("utf-8")).hexdigest()
        summary = f"an invalid request ({message[:300]}){' from ' + label if label else ''}"
        try:
            self._agree(digest=digest, summary=summary)
        except (BridgeError, RuntimeError) as other:
            logger.debug("mpu-bridge: rank %d: round after invalid input ended with %s", self.rank, other)

    def stats(self) -> Dict[str, int]:
        """Counters on this rank: created, borrowed, reused, live (created, not yet destroyed),
        agreements (store rounds), fallbacks (batches that could not use the chosen strategy)."""
        with self._lock:
            return {
                "created": self.created,
                "borrowed": self.borrowed,
                "reused": self.reused,
                "live": len(self._created),
                "agreements": self.agreements,
                "fallbacks": self.fallbacks,
            }

    def close(self) -> None:
        """Destroy the groups this registry created (newest first); borrowed ones stay. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            alive = dist.is_available() and dist.is_initialized()
            for entry in reversed(self._created):
                if not alive or not _torch.is_live(entry.group):
                    continue  # already gone with the world, or destroyed by someone else
                try:
                    dist.destroy_process_group(entry.group)
                except (RuntimeError, ValueError) as exc:
                    logger.warning(
                        "mpu-bridge: rank %d could not destroy group %s: %s", self.rank, abbrev(entry.ranks), exc
                    )
            if self._created and alive:
                _torch.let_workers_retire(0.05)  # gloo retires recent collectives, also of groups it does not park
            _park([entry.group for entry in self._created])
            self._created.clear()
            self._entries.clear()
            self._world_borrowed = None

    def __enter__(self) -> "GroupRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise GroupCreationError("this group registry is closed; create a new one (attach again)")

    def _registered(self) -> set:
        """Registered rank sets of this backend and options: plain rank tuples on the main
        channel, ``(channel, ranks)`` on another (see :func:`planning.reuse_votes`)."""
        out: set = set()
        for ranks, backend, opts in self._entries:
            if backend != self.backend:
                continue
            if opts == self._options_key:
                out.add(ranks)
            elif isinstance(opts, tuple) and len(opts) == 3 and opts[:2] == (self._options_key, "channel"):
                out.add((opts[2], ranks))
        return out

    def _plan_batch(
        self, parts: Sequence[Partition], label: str
    ) -> Tuple[List[Optional[bool]], str, Optional[int]]:
        """Agree on the batch and decide, identically on every rank, what to reuse, how to
        create, and the group counter every rank moves to afterwards (None: leave it)."""
        if self.scope is not None:
            return (*self._plan_span_batch(parts, label), None)
        votes = planning.reuse_votes(parts, self._registered(), self.world_size if self.serves_world() else 0)
        if not self.verify_plan:
            return (*self._plan_unchecked(parts, votes), None)
        facts, grouped = _batch_facts(parts, votes, self.strategy, self._store)
        result, reuse, equal = self._round(parts, label, votes, facts, grouped)
        covering = self._covering(parts, reuse)
        # Counters equal before the batch can be made equal after it (see _even_counter).
        evenable = "seq" in facts and result.is_unanimous("seq")
        strategy, reason = planning.decide_strategy(
            self.strategy,
            equal_salts=equal,
            fresh_names=_everyone(result, facts, "fresh"),
            mixed=any(r is None for r in reuse),
            named=_everyone(result, facts, "naming"),
            counter_safe=_everyone(result, facts, "apart") or covering or evenable,
        )
        strategy = self._note_fallback(strategy, reason)
        if strategy == "new_group" and not all(reuse) and not result.is_unanimous("seq"):
            raise _sequence_error(self.rank, result)
        even = None
        if strategy == "local_new_group" and not covering and evenable:
            even = _even_counter(int(facts["seq"]), reuse)
        return reuse, strategy, even

    def _round(
        self, parts: Sequence[Partition], label: str, votes: List[str], facts: Dict[str, str],
        grouped: Dict[str, Optional[Tuple[str, str]]],
    ) -> Tuple[Agreement, List[Optional[bool]], bool]:
        """The batch's agreement round, and what follows from it alike on every rank: the reuse
        decision per partition, and whether the members of every group to create agree on its
        salt."""
        digest, summary = planning.digest(
            parts, label, backend=self.backend, strategy=self.requested_strategy, options=self.pg_options
        )
        result = self._agree(digest=digest, summary=summary, facts=facts, grouped=grouped)
        reuse: List[Optional[bool]]
        if result.is_unanimous("reuse"):
            reuse = [v == "1" for v in votes]
        else:
            reuse = planning.merge_votes(parts, result.collect().facts.get("reuse", ()))
        equal = all(
            reused is not False or result.groups_agree(name, p.num_groups)
            for p, reused, name in zip(parts, reuse, grouped)
        )
        return result, reuse, equal

    def _agree(self, **round_args: Any) -> Agreement:
        """One agreement round of every rank of the world, or of the span's ranks only
        (numbered from the span's first rank, in a namespace of the span's own)."""
        self.agreements += 1
        if self.scope is None:
            return agree(self._store, rank=self.rank, world_size=self.world_size,
                         timeout=self.agreement_timeout, **round_args)
        start, size = self.scope.start, len(self.scope)
        try:
            return agree(self._store, rank=self.rank - start, world_size=size, timeout=self.agreement_timeout,
                         namespace=f"{NAMESPACE}/span/{start}+{size}", **round_args)
        except BridgeError as exc:
            raise type(exc)(f"{exc} [in the rank span {start}..{start + size - 1}: the ranks named here "
                            f"count from its first rank; add {start} for the global rank]") from None

    def _plan_span_batch(self, parts: Sequence[Partition], label: str) -> Tuple[List[Optional[bool]], str]:
        """The decision for a batch only the span's ranks take part in (see :meth:`narrow`)."""
        scope = self.scope if self.scope is not None else range(self.world_size)
        votes = planning.reuse_votes(parts, self._registered(), 0)
        salted = _torch.counter_is_salt()
        bound = _torch.bound_device() is not None
        reuse: List[Optional[bool]]
        if self.verify_plan:
            facts, grouped = _batch_facts(parts, votes, "local_new_group", self._store)
            facts.update(salted="1" if salted else "0", bound="1" if bound else "0")
            result, reuse, equal = self._round(parts, label, votes, facts, grouped)
            number = result.round
            shared = dict(bound=not _everyone_zero(result, facts, "bound"), salted=_everyone(result, facts, "salted"),
                          named=_everyone(result, facts, "naming"), fresh_names=_everyone(result, facts, "fresh"))
        else:  # no round: every member decides from what it alone knows
            reuse = [v == "1" or (v == "-" and p.fingerprint() in self._ensured) for p, v in zip(parts, votes)]
            equal = planning.safe_without_check(parts, len(scope)) and not self._uneven
            self._unchecked_batches += 1
            number = self._unchecked_batches
            shared = dict(bound=bound, salted=salted, named=_torch.member_only_naming().recognised, fresh_names=True)
        strategy, problem = planning.decide_span_strategy(
            creating=not all(reuse), mixed=any(r is None for r in reuse), equal_salts=equal, **shared
        )
        if problem is not None:
            raise GroupCreationError(
                f"rank {self.rank}: cannot create {label or 'these groups'} over the rank span "
                f"{scope[0]}..{scope[-1]} member-only: {problem}. The ranks outside the span do not "
                "take part, so no rank can enter every group instead"
            )
        if strategy == "salted":
            namespace = f"{NAMESPACE}/span/{scope.start}+{len(scope)}"
            backend = self.backend if self.backend != self.default_backend else None
            self._salted = strategies.SaltedNewGroup(base=planning.span_salt(namespace, number),
                                                     timeout=self.timeout, pg_options=self.pg_options, backend=backend)
        return reuse, strategy

    def _plan_unchecked(self, parts: Sequence[Partition], votes: List[str]) -> Tuple[List[Optional[bool]], str]:
        """The decision without the round, from what every rank knows alike (see the module docstring)."""
        reuse: List[Optional[bool]] = [
            v == "1" or (v == "-" and p.fingerprint() in self._ensured) for p, v in zip(parts, votes)
        ]
        strategy = self.strategy
        if strategy == "local_new_group":
            naming = _torch.member_only_naming()
            strategy, reason = planning.decide_strategy(
                strategy,
                equal_salts=not self._uneven and planning.safe_without_check(parts, self.world_size),
                checked=False,
                named=naming.recognised,
                counter_safe=naming.counter_apart or self._covering(parts, reuse),
            )
            strategy = self._note_fallback(strategy, reason)
        return reuse, strategy

    def _covering(self, parts: Sequence[Partition], reuse: Sequence[Optional[bool]]) -> bool:
        """Whether every partition the batch creates covers the world."""
        return all(reused is not False or p.covers(self.world_size) for p, reused in zip(parts, reuse))

    def _note_fallback(self, strategy: str, reason: Optional[str]) -> str:
        if reason is None:
            return strategy
        self.fallbacks += 1
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(
                "mpu-bridge: creating this batch with new_group on every rank instead of %s: %s",
                self.strategy,
                reason,
            )
        return strategy

    # -- creation -----------------------------------------------------------------------------

    def _create_keeping(self, p: Partition) -> Optional[Any]:
        """Enter every group of ``p`` (all-ranks loop); a rank that already holds its group
        keeps that one and destroys the fresh duplicate once its members made theirs."""
        held = self.lookup(p.own, p.channel) if p.own is not None else None
        if held is None or p.own is None:
            return self._create(p, "new_group")
        duplicate = self._strategy("new_group").create(p)
        if duplicate is not None and duplicate is not held and _torch.is_live(duplicate):
            self._discard_duplicate(duplicate, p.own)
        self.reused += 1
        return held

    def _discard_duplicate(self, duplicate: Any, members: Sequence[int]) -> None:
        """Destroy a fresh duplicate of a group this rank holds, once every member made it.

        Its members all hold the group (see :func:`planning.merge_votes`), so each discards
        its own copy; a gloo group connects eagerly, and one member destroying its copy while
        another is still in the handshake breaks the other's creation ("connection closed by
        peer"). With the plan check's store each member says it is done and waits for the
        others; without it the copy lives until :meth:`close`.
        """
        name = _torch.group_name(duplicate)
        if self._store is None or name is None:
            self._created.append(_Entry(tuple(members), duplicate, borrowed=False, source="duplicate",
                                        strategy="new_group"))
            return
        prefix = f"{_DUPLICATE_PREFIX}/{name}"
        self._store.set(f"{prefix}/{self.rank}", "1")
        try:
            self._store.wait([f"{prefix}/{m}" for m in members], self.timeout)
        except Exception as exc:  # the store raises RuntimeError or DistStoreError on timeout
            raise GroupCreationError(
                f"rank {self.rank}: the other members of group {abbrev(members)} never finished "
                f"creating it within the process-group timeout ({self.timeout}): {exc}"
            ) from exc
        dist.destroy_process_group(duplicate)

    def _create(self, p: Partition, strategy: str) -> Optional[Any]:
        creator = self._salted if strategy == "salted" and self._salted is not None else self._strategy(strategy)
        try:
            group = creator.create(p)
        except BridgeError:
            raise
        except Exception as exc:  # torch raises RuntimeError, ValueError, DistError ...
            raise GroupCreationError(
                f"rank {self.rank}: creating the {p.key!r} group "
                f"{abbrev(p.own) if p.own else '(none on this rank)'} with {strategy} failed: {exc} "
                f"(creation is bounded by the process-group timeout, {self.timeout})"
            ) from exc
        if not p.covers(self.world_size):
            self._uneven = True
        if group is None or p.own is None:
            return None
        if isinstance(creator, strategies.LocalNewGroup) and self._store is not None and self.rank == p.own[0]:
            if creator.last_name:
                self._store.set(f"{_USED_NAME_PREFIX}/{creator.last_name}", p.key)
        entry = _Entry(tuple(p.own), group, borrowed=False, source=p.key, strategy=strategy)
        self._entries[self._key(p.own, channel=p.channel)] = entry
        self._created.append(entry)
        self.created += 1
        return group


#: Groups close() destroyed, with when: kept referenced for a while (see _park).
_parked: List[Tuple[float, List[Any]]] = []
_parked_lock = threading.Lock()
_parked_at_exit: List[Any] = []  # the exit handler, once registered
_PARK_S = 1.0


def _park(groups: List[Any]) -> None:
    """Keep ``groups`` (just destroyed) referenced for about a second, releasing older ones.

    PyTorch up to 2.7 runs a ProcessGroup's C++ destructor with the GIL held, and a gloo
    group's destructor waits for its worker threads, one of which may still be retiring
    a collective that just finished and need the GIL to free its tensors: a deadlock when
    the last reference goes right after a collective (pytorch/pytorch#154976). A second
    later those workers are long idle. ``destroy_process_group`` has already run, so torch
    no longer knows the groups; only their objects live on, until a later close() or exit.
    """
    now = time.monotonic()
    with _parked_lock:
        old = [batch for when, batch in _parked if now - when >= _PARK_S]
        _parked[:] = [(when, batch) for when, batch in _parked if now - when < _PARK_S]
        if groups:
            if not _parked_at_exit:
                _parked_at_exit.append(atexit.register(_unpark_at_exit))
            _parked.append((now, list(groups)))
    old.clear()  # outside the lock: destructors may take a while


def _unpark_at_exit() -> None:
    """Release the parked groups before the interpreter finalizes, once their workers had
    time to retire what they ran (sleeping releases the GIL)."""
    with _parked_lock:
        batches = [batch for _, batch in _parked]
        _parked.clear()
    if batches:
        time.sleep(0.2)  # the workers of a group used just before exit retire its collectives
    batches.clear()


def _everyone_zero(result: Agreement, facts: Dict[str, str], name: str) -> bool:
    """Whether every rank published ``"0"`` for fact ``name``."""
    return facts.get(name, "0") == "0" and result.is_unanimous(name)


def _everyone(result: Agreement, facts: Dict[str, str], name: str) -> bool:
    """Whether every rank published ``"1"`` for fact ``name`` (True when nobody published it)."""
    return facts.get(name, "1") == "1" and result.is_unanimous(name)


def _batch_facts(
    parts: Sequence[Partition], votes: List[str], strategy: str, store: Any
) -> Tuple[Dict[str, str], Dict[str, Optional[Tuple[str, str]]]]:
    """What this rank publishes for a batch: facts every rank must share, and grouped facts
    each group's members must share, for the decision to be safe (see the module docstring).

    ``seq``: PyTorch's group counter (all-ranks names). For member-only creation also
    ``naming`` (this rank recognises PyTorch's member-only naming), ``apart`` (creating a
    member-only group provably leaves the counter alone here), ``fresh`` (no name about to
    be used was used before), ``salt`` (the number PyTorch hashes into its next member-only
    name) and, per partition, the grouped fact ``salt/<i>``: (this rank's group, the salt it
    will name it with), which ``reuse`` and ``salt`` determine."""
    facts: Dict[str, str] = {"reuse": "".join(votes)}
    grouped: Dict[str, Optional[Tuple[str, str]]] = {}
    if strategy != "split_group":
        facts["seq"] = str(_torch.group_counter())
    if strategy == "local_new_group":
        naming = _torch.member_only_naming()
        facts["naming"] = "1" if naming.recognised else "0"
        facts["apart"] = "1" if naming.counter_apart else "0"
        names = []
        facts["salt"] = str(naming.salt)  # with "reuse", determines every grouped salt below
        salts = planning.salts(votes, naming.salt if naming.salt is not None else -1)
        for i, (p, vote, salt) in enumerate(zip(parts, votes, salts)):
            grouped[f"salt/{i}"] = None if p.own is None else (str(p.own[0]), str(salt))
            if vote == "0" and naming.recognised:
                names.append(_torch.hashed_group_name(p.own, salt))  # type: ignore[arg-type]
        stale = any(store.check([f"{_USED_NAME_PREFIX}/{n}"]) for n in names)
        facts["fresh"] = "0" if stale else "1"
    return facts, grouped


def _even_counter(counter: int, reuse: Sequence[Optional[bool]]) -> int:
    """The group counter every rank moves to after a member-only batch that leaves ranks out,
    from the counter every rank had before it (``counter``, unanimous in the round).

    A member-only creation moves its caller's counter by one where the counter is the salt
    (PyTorch >= 2.14) and not at all elsewhere; a rank creates at most one group per created
    partition. So no rank's counter passes ``counter`` + the number of created partitions,
    and moving every rank there (never down) leaves them equal again: later all-ranks groups
    (the registry's, megatron-core's, the user's) are named alike everywhere. Example:
    ``_even_counter(7, [True, False, False]) == 9``.
    """
    return counter + sum(1 for reused in reuse if reused is False)


def _sequence_error(rank: int, result: Agreement) -> GroupCreationError:
    table = result.collect()
    return GroupCreationError(
        f"rank {rank}: cannot create groups with new_group: PyTorch's group counter, which names "
        f"every all-ranks group, differs across the ranks ({table.describe_fact('seq')}), so the "
        "ranks would name the same group differently and different groups alike. Every rank must "
        "create the same all-ranks groups in the same order before this point (and groups that "
        "leave ranks out, from PyTorch 2.14, only by every rank entering them)."
    )
