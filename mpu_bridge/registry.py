"""Turning rank sets into process groups: one cache, three creation strategies, safe teardown.

A :class:`GroupRegistry` owns every communicator a bridge creates. It is keyed by
``(sorted ranks, backend, options)``, so a rank set never gets a second
communicator: groups the MPU already has are registered with :meth:`~GroupRegistry.borrow`
(and never destroyed here), and a request for a rank set that is registered gets
the registered group back.

Requests come as :class:`Partition` s: all groups of one kind, which together
cover the world. :meth:`GroupRegistry.ensure` takes a batch of them and

1. agrees with every other rank on the batch (:mod:`mpu_bridge.agreement`), so a
   rank that asks for something else fails on every rank instead of hanging;
2. for each partition in order, reuses this rank's group if its rank set is
   registered, or creates the partition with one of three strategies:

   * ``split_group``: one ``torch.distributed.split_group`` per partition, when the
     default group has a bound device (NCCL with ``device_id``). There every
     ``new_group`` is already a world-wide split, and member-only creation hangs.
   * ``local_new_group``: each rank creates only its own group,
     ``new_group(own, use_local_synchronization=True)``; non-members do nothing.
   * ``new_group``: every rank enters every group's ``new_group`` in the agreed
     order (what megatron-core does); the fallback for everything else.

The member-only strategy has a hazard in PyTorch (checked in 2.13's
``distributed_c10d._hash_ranks_to_str``): such a group is named
``sha1("<ranks joined by _>_<len(_world.pg_names)>")``, i.e. by its ranks *and the
number of groups the calling process holds*, and that name is the store prefix
under which the members rendezvous. So (a) every member must hold the same number
of groups when it creates the group, and (b) a name must never repeat: after
``destroy_process_group`` the count drops, the same ranks hash to the same name
again, and the new group's rendezvous reads the dead group's addresses from the
store (gloo fails with "Connection reset by peer"). The registry therefore uses
the member-only strategy for a batch only when the agreement round shows that all
ranks hold the same number of groups and none of the names about to be used was
used before in this store, and only for partitions that cover the world (each
rank then creates exactly one group per partition, so the counts stay equal);
otherwise it falls back to ``new_group`` for that batch and logs why.

Example (every rank)::

    registry = GroupRegistry()
    layout = plan(dist.get_world_size(), tp=2)
    tp = Partition.from_layout(layout, "tp", dist.get_rank())
    (group,) = registry.ensure([tp])
    ...
    registry.close()   # destroys only what it created
"""

from __future__ import annotations

import array
import datetime
import hashlib
import inspect
import functools
import itertools
import json
import logging
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from .agreement import Agreement, agree, format_ranks
from .errors import BridgeError, GroupCreationError, LayoutError
from .layout import Layout

__all__ = ["STRATEGIES", "Partition", "GroupRegistry"]

logger = logging.getLogger(__name__)

#: The creation strategies a registry can use (``"auto"`` picks one of them).
STRATEGIES = ("split_group", "local_new_group", "new_group")

# Store keys marking member-only group names already used (see the module docstring).
_USED_NAME_PREFIX = "mpu_bridge/used_group_name"


def _as_int(name: str, value: Any) -> int:
    """``value`` as an int (numpy integers too), never a bool or float."""
    if isinstance(value, bool):
        raise LayoutError(f"{name} must be an integer, got {value!r} (bool)")
    try:
        return operator.index(value)
    except TypeError:
        raise LayoutError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def _abbrev(ranks: Sequence[int], limit: int = 8) -> str:
    if len(ranks) <= limit:
        return "[" + ", ".join(map(str, ranks)) + "]"
    head = ", ".join(map(str, ranks[:3]))
    return f"[{head}, ..., {ranks[-1]}]"


@dataclass(frozen=True)
class Partition:
    """All groups of one kind that together cover the world.

    Every group is a translate of one offset set (``group = base + offsets``), so
    equal rank sets imply equal partitions. A partition may also leave ranks out
    (``own`` None there); such a batch is created with the all-ranks loop. ``key`` names the partition identically
    on every rank (e.g. ``"expert_parallel[ep=4]"``); ``own`` is this rank's group
    (ascending) or None if the rank is in none; ``groups()`` enumerates all groups
    lazily in the agreed order (only the ``new_group`` strategy walks them all).

    Example::

        Partition.from_layout(plan(8, tp=2), "tp", rank=3)
        # key "tp", group_size 2, num_groups 4, own (2, 3), groups -> [0, 1], [2, 3], ...
    """

    key: str
    group_size: int
    num_groups: int
    own: Optional[Tuple[int, ...]]
    groups: Callable[[], Iterable[Sequence[int]]]
    #: Set only by the layout engine's constructors (ascending ints, translates of one
    #: pattern, by construction): the O(group size) per-group checks are skipped.
    #: Not an init argument, so ``dataclasses.replace`` yields an untrusted copy.
    trusted: bool = field(default=False, compare=False, init=False)

    @classmethod
    def from_layout(cls, layout: Layout, kind: str, rank: int, key: Optional[str] = None) -> "Partition":
        """The partition of ``kind`` in ``layout``, seen from ``rank``."""
        return cls(
            key=key or kind,
            group_size=layout.size(kind),
            num_groups=layout.num_groups(kind),
            own=tuple(layout.group_of(kind, rank)),
            groups=lambda: layout.iter_groups(kind),
        ).as_trusted()

    def as_trusted(self) -> "Partition":
        """Mark this partition as built from the layout engine (internal; returns self)."""
        object.__setattr__(self, "trusted", True)
        return self

    def first_group(self) -> Tuple[int, ...]:
        """The first group in enumeration order, ascending (O(group size), computed once)."""
        return self._first

    @functools.cached_property
    def _first(self) -> Tuple[int, ...]:
        try:
            first = next(iter(self.groups()))
        except StopIteration:
            raise LayoutError(f"partition {self.key!r} enumerates no groups") from None
        if self.trusted:
            return tuple(first)
        return tuple(sorted(_as_int(f"a rank of partition {self.key!r}", r) for r in first))

    def covers(self, world_size: int) -> bool:
        """Whether the groups cover the whole world (every rank is in exactly one)."""
        return self.group_size * self.num_groups == world_size

    def fingerprint(self) -> str:
        """What must be identical on every rank: key, sizes and the first group. O(group size)."""
        first = self.first_group()
        digest = hashlib.blake2b(array.array("q", first).tobytes(), digest_size=16).hexdigest()
        return f"{self.key}|{self.group_size}x{self.num_groups}|{_abbrev(first)}|{digest}"

    def summary(self) -> str:
        """A short human description, e.g. ``ep[ep=2] (2 groups of 2, first [0, 2])``."""
        return (
            f"{self.key} ({self.num_groups} group{'' if self.num_groups == 1 else 's'} of {self.group_size}, "
            f"first {_abbrev(self.first_group())})"
        )

    def check(self, world_size: int, rank: int) -> None:
        """Raise LayoutError unless this partition is well formed for ``rank`` of ``world_size``."""
        if not isinstance(self.key, str) or not self.key:
            raise LayoutError(f"a partition needs a non-empty string key, got {self.key!r}")
        size = _as_int(f"group_size of partition {self.key!r}", self.group_size)
        count = _as_int(f"num_groups of partition {self.key!r}", self.num_groups)
        if size < 1 or count < 1:
            raise LayoutError(
                f"partition {self.key!r} has group_size {size} and num_groups {count}; both must be >= 1"
            )
        if size * count > world_size:
            raise LayoutError(
                f"partition {self.key!r} has {count} groups of {size} = {size * count} ranks, "
                f"more than the world of {world_size}"
            )
        if not callable(self.groups):
            raise LayoutError(f"partition {self.key!r}: groups must be a callable returning the groups")
        first = self.first_group()
        if self.trusted:
            if self.own is not None and rank not in self.own:
                raise LayoutError(
                    f"partition {self.key!r}: rank {rank}'s own group {_abbrev(self.own)} does not "
                    f"contain rank {rank}"
                )
            return
        _check_ranks(self.key, first, size, world_size)
        if self.own is None:
            if self.covers(world_size):
                raise LayoutError(
                    f"partition {self.key!r} covers all {world_size} ranks but gives rank {rank} "
                    "no group (own is None); pass the group that holds it"
                )
            return
        own = tuple(_as_int(f"a rank of partition {self.key!r}", r) for r in self.own)
        if list(own) != sorted(set(own)):
            raise LayoutError(
                f"partition {self.key!r}: own group {list(own)} must be ascending without repeats"
            )
        _check_ranks(self.key, own, size, world_size)
        if rank not in own:
            raise LayoutError(
                f"partition {self.key!r}: rank {rank}'s own group {list(own)} does not contain rank {rank}"
            )
        own_offsets = [r - own[0] for r in own]
        first_offsets = [r - first[0] for r in first]
        if own_offsets != first_offsets:
            raise LayoutError(
                f"partition {self.key!r} is not made of translates of one rank pattern: rank {rank}'s "
                f"group {_abbrev(own)} has offsets {_abbrev(own_offsets)}, the first group "
                f"{_abbrev(first)} has {_abbrev(first_offsets)}"
            )


def _check_ranks(key: str, ranks: Sequence[int], size: int, world_size: int) -> None:
    if len(ranks) != size:
        raise LayoutError(
            f"partition {key!r}: group {_abbrev(list(ranks))} has {len(ranks)} ranks, "
            f"but group_size is {size}"
        )
    if len(set(ranks)) != len(ranks):
        raise LayoutError(f"partition {key!r}: group {_abbrev(list(ranks))} repeats a rank")
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise LayoutError(
            f"partition {key!r}: ranks {bad[:8]} are outside the world of {world_size} ranks "
            f"(0..{world_size - 1})"
        )


@dataclass
class _Entry:
    ranks: Tuple[int, ...]
    group: Any
    borrowed: bool
    source: str  # partition key, or "borrowed"
    strategy: Optional[str] = None


def _supports(fn: Callable[..., Any], parameter: str) -> bool:
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _hashed_group_name(ranks: Sequence[int], held: int) -> str:
    """The name torch 2.x gives a member-only group: ``sha1("r0_r1_..._<groups held>")``.

    Mirrors ``distributed_c10d._hash_ranks_to_str``; :meth:`GroupRegistry._create_local`
    checks the prediction against the real name and warns if PyTorch changes it.
    """
    text = "_".join(map(str, ranks)) + "_" + str(held)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class GroupRegistry:
    """One rank's cache of process groups, keyed by (sorted ranks, backend, options).

    ``backend`` defaults to the default group's; ``timeout`` and ``pg_options`` go to
    every group it creates. ``strategy`` is ``"auto"`` or one of :data:`STRATEGIES`;
    the resolved choice is the ``strategy`` attribute (and one INFO log line).
    ``agreement_timeout`` (seconds) bounds the cross-rank plan check; ``verify_plan``
    None means "check unless the world is a single rank or uses the ``fake`` backend".

    All methods are thread-safe; ``ensure`` and ``close`` are idempotent. Creation is
    collective: every rank must call ``ensure`` with the same partitions in the same
    order. Example::

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
        if strategy != "auto" and strategy not in STRATEGIES:
            raise GroupCreationError(
                f"unknown group creation strategy {strategy!r}; use 'auto' or one of {', '.join(STRATEGIES)}"
            )
        if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
            raise GroupCreationError(
                f"timeout must be a positive datetime.timedelta, got {timeout!r}"
            )
        if (
            isinstance(agreement_timeout, bool)
            or not isinstance(agreement_timeout, (int, float))
            or not agreement_timeout > 0
        ):
            raise GroupCreationError(
                f"agreement_timeout must be a positive number of seconds, got {agreement_timeout!r}"
            )
        if verify_plan is not None and not isinstance(verify_plan, bool):
            raise GroupCreationError(f"verify_plan must be True, False or None, got {verify_plan!r}")

        self._lock = threading.RLock()
        self.rank: int = dist.get_rank()
        self.world_size: int = dist.get_world_size()
        self.default_backend: str = str(dist.get_backend()).lower()
        self.backend: str = str(backend).lower() if backend else self.default_backend
        self.timeout = timeout
        self.pg_options = pg_options
        self.agreement_timeout = float(agreement_timeout)
        self.requested_strategy = strategy
        self.strategy: str = self._resolve_strategy(strategy)
        self.last_strategy: Optional[str] = None
        self.verify_plan: bool = self._resolve_verify(verify_plan)
        self._store: Any = c10d._get_default_store() if self.verify_plan else None
        self._options_key: Any = None if pg_options is None else ("options", id(pg_options))
        self._entries: Dict[Tuple[Any, ...], _Entry] = {}
        self._created: List[_Entry] = []
        self._borrowed_groups: List[Any] = []
        self._closed = False
        self._warned: set = set()
        self.created = 0
        self.borrowed = 0
        self.reused = 0
        self.agreements = 0
        self.fallbacks = 0
        logger.info(
            "mpu-bridge: creating process groups with strategy %s (requested %s, backend %s, "
            "plan check %s)",
            self.strategy,
            strategy,
            self.backend,
            "on" if self.verify_plan else "off",
        )

    # -- configuration -----------------------------------------------------------

    def _resolve_strategy(self, requested: str) -> str:
        bound = getattr(c10d._get_default_group(), "bound_device_id", None)
        same_backend = self.backend == self.default_backend
        has_split = hasattr(dist, "split_group")
        has_local = _supports(dist.new_group, "use_local_synchronization") and self.backend != "mpi"
        if requested == "split_group":
            if bound is None:
                raise GroupCreationError(
                    "strategy 'split_group' needs a default process group bound to a device "
                    "(init_process_group(backend='nccl', device_id=torch.device('cuda', local_rank))); "
                    f"this one (backend {self.default_backend!r}) has none; use strategy='auto'"
                )
            if not has_split:
                raise GroupCreationError(
                    "strategy 'split_group' needs torch.distributed.split_group (PyTorch >= 2.5); "
                    "use strategy='auto'"
                )
            if not same_backend:
                raise GroupCreationError(
                    f"strategy 'split_group' keeps the default group's backend "
                    f"{self.default_backend!r}, but backend {self.backend!r} was asked for; "
                    "use strategy='new_group' or drop the backend argument"
                )
            return "split_group"
        if requested == "local_new_group":
            if bound is not None:
                raise GroupCreationError(
                    f"strategy 'local_new_group' hangs when the default group is bound to a device "
                    f"({bound}): every new_group is then a world-wide split that non-members "
                    "never join; use strategy='auto' (split_group)"
                )
            if not has_local:
                raise GroupCreationError(
                    f"strategy 'local_new_group' needs new_group(use_local_synchronization=True) "
                    f"(PyTorch >= 2.1, not MPI); backend {self.backend!r}; use strategy='auto'"
                )
            return "local_new_group"
        if requested == "new_group":
            return "new_group"
        if bound is not None:
            return "split_group" if (has_split and same_backend) else "new_group"
        return "local_new_group" if has_local else "new_group"

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

    def _key(self, ranks: Sequence[int], backend: Optional[str] = None, options: Any = "self") -> Tuple[Any, ...]:
        return (
            tuple(sorted(ranks)),
            self.backend if backend is None else backend,
            self._options_key if options == "self" else options,
        )

    # -- public API ------------------------------------------------------------------

    def borrow(self, ranks: Sequence[int], group: Any) -> Any:
        """Register ``group`` (owned by the MPU) for ``ranks``; it is reused, never destroyed.

        Returns ``group``. Raises GroupCreationError if ``group`` is not this rank's
        process group over exactly ``ranks``. Borrowing a rank set that is already
        registered keeps the first group for lookups. Example:
        ``registry.borrow([0, 1], mpu.get_tensor_model_parallel_group())``.
        """
        with self._lock:
            self._check_open()
            members = tuple(sorted(_as_int("a borrowed rank", r) for r in ranks))
            if group is None or group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
                raise GroupCreationError(
                    f"rank {self.rank}: cannot borrow {group!r} for ranks {_abbrev(members)}: "
                    "it is not a process group this rank belongs to"
                )
            if self.rank not in members:
                raise GroupCreationError(
                    f"rank {self.rank}: cannot borrow a group for ranks {_abbrev(members)}, "
                    f"which do not include rank {self.rank}"
                )
            try:
                actual = tuple(sorted(dist.get_process_group_ranks(group)))
                backend = str(dist.get_backend(group)).lower()
            except Exception as exc:  # ValueError / KeyError / RuntimeError by version
                raise GroupCreationError(
                    f"rank {self.rank}: cannot borrow {group!r} for ranks {_abbrev(members)}: "
                    f"torch.distributed does not know it ({exc})"
                ) from exc
            if actual != members:
                raise GroupCreationError(
                    f"rank {self.rank}: the group borrowed for ranks {_abbrev(members)} actually "
                    f"holds ranks {_abbrev(actual)}; pass the ranks of that very group"
                )
            key = self._key(members, backend=backend, options=None)
            if key not in self._entries:
                self._entries[key] = _Entry(members, group, borrowed=True, source="borrowed")
            if not any(g is group for g in self._borrowed_groups):
                self._borrowed_groups.append(group)
                self.borrowed += 1
            return group

    def is_borrowed(self, group: Any) -> bool:
        """Whether ``group`` was registered with :meth:`borrow` (the MPU owns it)."""
        with self._lock:
            return any(g is group for g in self._borrowed_groups)

    def lookup(self, ranks: Sequence[int]) -> Optional[Any]:
        """The registered group for ``ranks`` (this registry's backend and options), or None."""
        with self._lock:
            if self._closed:
                return None
            entry = self._entries.get(self._key([int(r) for r in ranks]))
            return None if entry is None else entry.group

    def ensure(self, partitions: Sequence[Partition]) -> List[Optional[Any]]:
        """This rank's group of each partition, creating what is not registered yet; collective.

        Agrees with every rank on the batch first (one store round; skipped when this
        rank already holds all of them), then, in order, reuses or creates each
        partition. Returns one entry per partition: this rank's group, or None when
        the rank is in none of its groups. Raises PlanMismatchError when ranks ask for
        different partitions, GroupCreationError when ranks do not all arrive within
        ``agreement_timeout`` or creation fails, LayoutError for malformed partitions.
        Example: ``ep_group, edp_group = registry.ensure([ep, edp])``.
        """
        with self._lock:
            self._check_open()
            parts = list(partitions)
            for p in parts:
                if not isinstance(p, Partition):
                    raise LayoutError(
                        f"ensure() takes Partition objects, got {type(p).__name__}: {p!r}"
                    )
            if not parts:
                return []
            try:
                for p in parts:
                    p.check(self.world_size, self.rank)
            except LayoutError as exc:
                self._fail_round(parts, exc)
                raise
            votes = self._reuse_votes(parts)
            covering = all(p.covers(self.world_size) for p in parts)
            if covering and all(v == "1" for v in votes):
                # Everything is registered here, and for covering partitions of translates
                # the same then holds on every rank that registered the same kinds (see
                # _reuse_votes), so no store round is needed. A rank that did not would wait
                # for this one and fail with a timeout naming it, not hang.
                self.reused += len(parts)
                return [self.lookup(p.own) for p in parts]  # type: ignore[arg-type]
            try:
                reuse, strategy = self._plan_batch(parts, votes)
            except RuntimeError as exc:  # a store operation outside agree() failed
                raise GroupCreationError(
                    f"rank {self.rank}: the default store failed while planning groups: {exc}"
                ) from exc
            self.last_strategy = strategy
            results: List[Optional[Any]] = []
            for p, reused in zip(parts, reuse):
                if reused:
                    self.reused += 1
                    results.append(None if p.own is None else self.lookup(p.own))
                else:
                    results.append(self._create(p, strategy))
            return results

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
                if not alive or entry.group not in c10d._world.pg_map:
                    continue  # already gone with the world, or destroyed by someone else
                try:
                    dist.destroy_process_group(entry.group)
                except (RuntimeError, ValueError) as exc:
                    logger.warning(
                        "mpu-bridge: rank %d could not destroy group %s: %s",
                        self.rank,
                        _abbrev(entry.ranks),
                        exc,
                    )
            self._created.clear()
            self._entries.clear()

    def __enter__(self) -> "GroupRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise GroupCreationError("this group registry is closed; create a new one (attach again)")

    def _reuse_votes(self, parts: Sequence[Partition]) -> List[str]:
        """Per partition: "1" if this rank's group is registered (or created earlier in the
        batch), "0" if not, "-" if the rank is in none of its groups.

        Why this is the same decision on every rank (so every rank creates exactly one
        group per created partition, in the same order): a covering partition of
        translates of an offset set O is the *unique* tiling of the world by translates of
        O — the smallest rank not yet covered must be the base of the next group, so the
        tiling is forced. If this rank's group of P equals its group of Q (a partition
        registered earlier, or the MPU's groups of one kind, which megatron-core builds
        the same way), the two offset sets are equal, hence P == Q entirely, and every
        other rank's group of P is registered as well. The agreement round checks this
        anyway: the votes are a fact every rank must share.
        """
        seen = {k[0] for k in self._entries if k[1:] == (self.backend, self._options_key)}
        votes = []
        for p in parts:
            if p.own is None:
                votes.append("-")
                continue
            own = tuple(p.own)
            votes.append("1" if own in seen else "0")
            seen.add(own)
        return votes

    def _digest(self, parts: Sequence[Partition]) -> Tuple[str, str]:
        config = [self.backend, self.requested_strategy, type(self.pg_options).__name__]
        text = json.dumps([config, [p.fingerprint() for p in parts]])
        summary = "[" + ", ".join(p.summary() for p in parts) + f"] (backend {self.backend})"
        return hashlib.sha1(text.encode("utf-8")).hexdigest(), summary

    def _fail_round(self, parts: Sequence[Partition], exc: Exception) -> None:
        """Join the round with an 'invalid' plan so the other ranks fail fast, not by timeout."""
        if not self.verify_plan:
            return
        message = str(exc)
        digest = "invalid-" + hashlib.sha1(message.encode("utf-8")).hexdigest()
        try:
            self.agreements += 1
            agree(
                self._store,
                rank=self.rank,
                world_size=self.world_size,
                digest=digest,
                summary=f"an invalid request ({message[:300]})",
                timeout=self.agreement_timeout,
            )
        except (BridgeError, RuntimeError) as other:
            logger.debug("mpu-bridge: rank %d: round after invalid input ended with %s", self.rank, other)

    def _plan_batch(self, parts: Sequence[Partition], votes: List[str]) -> Tuple[List[bool], str]:
        """Agree on the batch and decide, identically on every rank, what to reuse and how to create."""
        local_candidate = self.strategy == "local_new_group"
        # Decided from the plan alone (identical on every rank), never from local votes.
        all_covering = all(p.covers(self.world_size) for p in parts)
        if not self.verify_plan:
            reuse = [v == "1" for v in votes]
            if local_candidate and not all_covering:
                return reuse, self._fallback("a partition does not cover the world")
            return reuse, self.strategy

        facts: Dict[str, str] = {"reuse": "".join(votes)}
        names_used: List[str] = []
        if self.strategy != "split_group":
            facts["seq"] = str(getattr(c10d._world, "group_count", 0))
        if local_candidate and all_covering:
            held = len(c10d._world.pg_names)
            facts["names"] = str(held)
            for p, v in zip(parts, votes):
                if v == "0":
                    names_used.append(_hashed_group_name(p.own, held))  # type: ignore[arg-type]
                    held += 1
            stale = any(self._store.check([f"{_USED_NAME_PREFIX}/{n}"]) for n in names_used)
            facts["fresh"] = "0" if stale else "1"

        digest, summary = self._digest(parts)
        self.agreements += 1
        result = agree(
            self._store,
            rank=self.rank,
            world_size=self.world_size,
            digest=digest,
            summary=summary,
            facts=facts,
            timeout=self.agreement_timeout,
        )
        reuse = self._merge_votes(parts, votes, result)
        strategy = self.strategy
        if local_candidate:
            if not all_covering:
                strategy = self._fallback("a partition does not cover the world")
            elif not result.is_unanimous("names"):
                strategy = self._fallback(
                    "ranks hold different numbers of process groups (e.g. megatron-core's "
                    "embedding groups with pp > 1), so PyTorch would name the same group "
                    "differently on its members"
                )
            elif not (result.is_unanimous("fresh") and facts["fresh"] == "1"):
                strategy = self._fallback(
                    "PyTorch would reuse the name of a group destroyed earlier (same ranks, same "
                    "number of groups held), and its rendezvous would read stale addresses"
                )
        if strategy == "new_group" and not result.is_unanimous("seq"):
            table = result.collect()
            raise GroupCreationError(
                f"rank {self.rank}: cannot create groups with new_group: the ranks have created "
                f"different numbers of all-ranks groups so far, so PyTorch's sequential group "
                f"names would not match (PyTorch's group counter: {table.describe_fact('seq')}). Every rank "
                "must create the same groups in the same order before this point."
            )
        return reuse, strategy

    def _merge_votes(self, parts: Sequence[Partition], votes: List[str], result: Agreement) -> List[bool]:
        if result.is_unanimous("reuse"):
            return [v == "1" for v in votes]
        table = result.collect()
        rows = table.facts.get("reuse", ())
        reuse: List[bool] = []
        for i, p in enumerate(parts):
            have = [ranks for ranks, vec in rows if vec[i] == "1"]
            lack = [ranks for ranks, vec in rows if vec[i] == "0"]
            if have and lack:
                holders = sorted(itertools.chain.from_iterable(have))
                others = sorted(itertools.chain.from_iterable(lack))
                raise GroupCreationError(
                    f"partition {p.key!r}: ranks {format_ranks(holders)} already hold a communicator "
                    f"for their group but ranks {format_ranks(others)} do not, so the ranks cannot "
                    "agree on whether to create it; the groups borrowed from the MPU (or created "
                    "earlier, e.g. by a partition that left some ranks out) differ between ranks. "
                    "Borrow the same kinds of groups on every rank."
                )
            reuse.append(bool(have))
        return reuse

    def _fallback(self, reason: str) -> str:
        self.fallbacks += 1
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(
                "mpu-bridge: creating this batch with new_group on every rank instead of %s: %s",
                self.strategy,
                reason,
            )
        return "new_group"

    # -- creation -----------------------------------------------------------------------------

    def _create(self, p: Partition, strategy: str) -> Optional[Any]:
        try:
            if strategy == "split_group":
                group = self._create_split(p)
            elif strategy == "local_new_group":
                group = self._create_local(p)
            else:
                group = self._create_all_ranks(p)
        except BridgeError:
            raise
        except Exception as exc:  # torch raises RuntimeError, ValueError, DistError ...
            raise GroupCreationError(
                f"rank {self.rank}: creating the {p.key!r} group "
                f"{_abbrev(p.own) if p.own else '(none on this rank)'} with {strategy} failed: {exc}"
            ) from exc
        if group is None or p.own is None:
            return None
        entry = _Entry(tuple(p.own), group, borrowed=False, source=p.key, strategy=strategy)
        self._entries[self._key(p.own)] = entry
        self._created.append(entry)
        self.created += 1
        return group

    def _new_group_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"timeout": self.timeout, "pg_options": self.pg_options}
        if self.backend != self.default_backend:
            kwargs["backend"] = self.backend
        return kwargs

    def _create_split(self, p: Partition) -> Optional[Any]:
        # split_group only uses the caller's own group (it computes the split color from
        # it), so each member passes just its group: O(group size), not O(world). A rank
        # in no group passes a group without itself and gets None back (NCCL no-color).
        split_ranks = [list(p.own)] if p.own is not None else [list(p.first_group())]
        kwargs: Dict[str, Any] = {"timeout": self.timeout, "pg_options": self.pg_options}
        if _supports(dist.split_group, "group_desc"):
            kwargs["group_desc"] = p.key
        return dist.split_group(None, split_ranks, **kwargs)

    def _create_local(self, p: Partition) -> Optional[Any]:
        if p.own is None:
            return None
        held = len(c10d._world.pg_names)
        kwargs = self._new_group_kwargs()
        if _supports(dist.new_group, "group_desc"):
            kwargs["group_desc"] = p.key
        group = dist.new_group(list(p.own), use_local_synchronization=True, **kwargs)
        name = c10d._world.pg_names.get(group)
        if name is None or "name-scheme-checked" not in self._warned:
            # The prediction costs O(group size), as PyTorch's own naming does: check the
            # scheme once per registry, not for every group.
            self._warned.add("name-scheme-checked")
            predicted = _hashed_group_name(p.own, held)
            if name is not None and name != predicted and "name-scheme" not in self._warned:
                self._warned.add("name-scheme")
                logger.warning(
                    "mpu-bridge: PyTorch named a member-only group %s, not %s as expected; the check "
                    "against reused group names is unreliable with this PyTorch version",
                    name,
                    predicted,
                )
            name = name or predicted
        if self._store is not None and self.rank == p.own[0]:
            self._store.set(f"{_USED_NAME_PREFIX}/{name}", p.key)
        return group

    def _create_all_ranks(self, p: Partition) -> Optional[Any]:
        own = tuple(p.own) if p.own is not None else None
        kwargs = self._new_group_kwargs()
        if _supports(dist.new_group, "group_desc"):
            kwargs["group_desc"] = p.key
        mine = None
        count = 0
        for members in p.groups():
            if p.trusted:
                ranks = list(members)
            else:
                ranks = sorted(int(r) for r in members)
                _check_ranks(p.key, ranks, p.group_size, self.world_size)
            group = dist.new_group(ranks, **kwargs)
            count += 1
            if own is not None and tuple(ranks) == own:
                mine = group
        if count != p.num_groups:
            raise LayoutError(
                f"partition {p.key!r} enumerated {count} groups, but num_groups is {p.num_groups}"
            )
        if own is not None and mine is None:
            raise LayoutError(
                f"partition {p.key!r}: rank {self.rank}'s own group {_abbrev(own)} is not among "
                "the groups it enumerates"
            )
        return mine
