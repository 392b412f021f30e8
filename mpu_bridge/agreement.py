"""Cross-rank agreement on a group-creation plan, through the default ``torch.distributed`` store.

Before any rank creates a process group, every rank publishes a *digest* of what it
is about to create (plus a few *facts* about its own state) and waits until all
ranks have done so. Then every rank reaches the same decision from the same final
numbers: go ahead, or raise the same error. No rank is left behind in a
``new_group`` that the others never enter.

One round, when every rank publishes the same plan and facts (the common case), is
four store operations per rank, three on the last to arrive, whatever the world size:

1. ``compare_set(h, "", mine)``: the first rank to arrive writes its plan-and-facts
   text ``mine``; every other rank gets that text back and compares it with its own.
2. ``add(a, 1 + (world + 1) * differs)``: the arrival, and whether this rank differs
   from the first, in one counter (arrivals in the low digit, differing ranks above).
3. The last to arrive (arrivals == world) knows the final count and writes the
   outcome, ``ok`` or ``differ``, with one atomic ``compare_set`` on ``done``; the
   others ``wait`` for ``done`` ...
4. ... and read it (a ``compare_set`` that never writes).

A difference is therefore known on every rank as soon as the last rank arrives, not
after a timeout. Then every rank runs a *counting round* (:mod:`mpu_bridge.tally`:
records and a counter per value, a few more operations per rank) that says exactly
which facts differ and, when the plans differ, raises :class:`PlanMismatchError` on
every rank with a message naming the ranks of each plan.

Timeouts: a rank whose wait expires tries to write ``timeout`` to ``done``; the first
``compare_set`` wins, so a rank arriving just after the deadline raises too instead of
creating groups alone. The ranks that saw the timeout mark the round *ended* and say
they were there, and each names the ranks that never said so.

Rounds: each rank numbers its agreements through a store (per namespace) 1, 2, 3 ...
in this process (round ``n`` is every rank's ``n``-th agreement), kept beside the store
object, which lives as long as the world it serves. A rank that joins a round that has
ended without it (it skipped a call, or was too slow) moves on to its next round
number, so once the ranks are back in step (a barrier, then identical calls) they
agree again. Grouped facts (a value only the members of one group must share) are
counted only in the counting round: the caller's facts must determine them (the
registry publishes the salt and the reuse votes the grouped salts follow from), so
when every fact is unanimous every group's members agree.

Store keys of round ``n``: ``<namespace>/<n>/{h,a,done,p/<rank>,pc}``, and the counting
round's under ``<namespace>/<n>/s/``. A round leaves three keys, not one per rank.

Example (every rank)::

    store = torch.distributed.distributed_c10d._get_default_store()
    result = agree(store, rank=r, world_size=w, digest="ab12", summary="ep[ep=4]", timeout=60)
    result.is_unanimous("names")
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import tally
from .errors import GroupCreationError, PlanMismatchError
from .tally import Table
from .text import format_ranks
from .validate import seconds

__all__ = ["NAMESPACE", "Agreement", "Table", "agree", "format_ranks"]

logger = logging.getLogger(__name__)

#: Store prefix of every agreement key.
NAMESPACE = "mpu_bridge/agree"

_DIFFER = "differ"
_TIMEOUT = "timeout"
_ENDED = "\x00ended"
#: How long the ranks that saw a timeout wait for each other to say they were there.
_PRESENCE_GRACE_S = 2.0


@dataclass
class Agreement:
    """The outcome of one round on this rank: every rank published the same digest.

    ``unanimous[name]`` says whether every rank reported the same value of fact
    ``name``; every rank sees the same flags, so decisions taken from them are the
    same everywhere. :meth:`collect` fetches every rank's values (a collective step:
    call it on every rank or on none).
    """

    round: int
    rank: int
    world_size: int
    facts: Mapping[str, str]
    unanimous: Mapping[str, bool]
    distinct: Mapping[str, Optional[int]] = field(default_factory=dict)
    _store: Any = field(default=None, repr=False)
    _prefix: Optional[str] = field(default=None, repr=False)  # the counting round's, if it ran
    _timeout: float = field(default=60.0, repr=False)
    _table: Optional[Table] = field(default=None, repr=False)
    _plan: Tuple[str, str] = field(default=("", ""), repr=False)  # (digest, summary), for a unanimous table

    def is_unanimous(self, name: str) -> bool:
        """Whether every rank reported the same value of fact ``name`` (True for unknown facts)."""
        return self.unanimous.get(name, True)

    def groups_agree(self, name: str, groups: int) -> bool:
        """Whether the members of each of the ``groups`` groups of grouped fact ``name``
        published one value (always, when every fact was unanimous; see the module docstring)."""
        distinct = self.distinct.get(name)
        return distinct is None or distinct == groups

    @property
    def all_unanimous(self) -> bool:
        return all(self.unanimous.values())

    def collect(self) -> Table:
        """Every rank's plan and facts, grouped (O(world) store reads on one rank when they
        differ, none when every rank published the same; collective)."""
        if self._table is None and self._prefix is None:  # every rank published this rank's plan
            self._table = Table.unanimous(self.world_size, self._plan[0], self._plan[1], self.facts)
        elif self._table is None:
            self._table = tally.collect(self._store, str(self._prefix), self.rank, self.world_size, self._timeout)
        return self._table


def agree(
    store: Any,
    *,
    rank: int,
    world_size: int,
    digest: str,
    summary: str,
    facts: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
    namespace: str = NAMESPACE,
    grouped: Optional[Mapping[str, Optional[Tuple[str, str]]]] = None,
) -> Agreement:
    """Agree with every other rank on ``digest`` within ``timeout`` seconds; collective.

    Raises :class:`PlanMismatchError` on every rank when the digests differ (the
    message groups the ranks by ``summary``), and :class:`GroupCreationError` on every
    rank that arrived when some rank did not arrive in time (naming the missing ranks).
    ``facts`` (short strings) are compared too, but a disagreement there is reported
    in the result, not raised. ``grouped`` maps a name to this rank's ``(group id,
    value)`` or None (a rank in no group), values that ``facts`` determine (see the
    module docstring); every rank passes the same names. Example::

        agree(store, rank=0, world_size=4, digest=d, summary="ep[ep=2]", facts={"seq": "3"},
              grouped={"salt/0": ("0", "5")}).groups_agree("salt/0", 2)
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise GroupCreationError(f"rank {rank} is outside a world of {world_size} ranks")
    timeout = seconds("agreement_timeout", timeout, GroupCreationError)
    clean = {str(k): str(v) for k, v in (facts or {}).items()}
    pairs = {str(k): None if v is None else (str(v[0]), str(v[1])) for k, v in (grouped or {}).items()}
    try:
        return _agree(store, _Seat(namespace, rank, world_size, digest, summary, clean, pairs, timeout))
    except RuntimeError as exc:  # the store itself failed (DistError and friends)
        raise GroupCreationError(
            f"rank {rank}: the default store failed while the ranks agreed on a group plan: "
            f"{exc}. The process hosting the store (usually rank 0) may have died; see its log."
        ) from exc


@dataclass(frozen=True)
class _Seat:
    """What one rank brings to a round."""

    namespace: str
    rank: int
    world_size: int
    digest: str
    summary: str
    facts: Mapping[str, str]
    grouped: Mapping[str, Optional[Tuple[str, str]]]
    timeout: float

    @property
    def text(self) -> str:
        """The plan-and-facts text compared with the first rank's (short: long values hashed)."""
        return json.dumps([tally.value_key(self.digest),
                           sorted((n, tally.value_key(v)) for n, v in self.facts.items())])


class _RoundBook:
    """Each rank's next round number per store object and namespace, in this process.

    Round ``n`` must be every rank's ``n``-th agreement through the store; the count
    lives beside the store object (weakly keyed), so a new world, with a new store,
    starts at round 1, and ranks simulated by threads of one process count apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_store: "weakref.WeakKeyDictionary[Any, Dict[Tuple[str, int], int]]" = weakref.WeakKeyDictionary()

    def take(self, store: Any, namespace: str, rank: int) -> int:
        """This rank's next round number (1, 2, ...)."""
        with self._lock:
            rounds = self._by_store.setdefault(store, {})
            rounds[namespace, rank] = number = rounds.get((namespace, rank), 0) + 1
            return number


#: The one round book of this process (see :class:`_RoundBook`).
_BOOK = _RoundBook()


@dataclass(frozen=True)
class _Joined:
    """This rank's place in a round, after its first two operations."""

    number: int
    prefix: str
    arrival: int  # the arrival counter as this rank's add left it
    scale: int  # world_size + 1: arrivals in the low digit, differing ranks above
    missed: bool  # this rank skipped rounds that had ended without it


def _agree(store: Any, seat: _Seat) -> Agreement:
    deadline = time.monotonic() + seat.timeout
    return _finish(store, seat, _join(store, seat), deadline)


def _join(store: Any, seat: _Seat) -> _Joined:
    """Operations 1 and 2: compare with the first rank's text, then arrive (see the module docstring)."""
    mine, missed = seat.text, False
    while True:
        number = _BOOK.take(store, seat.namespace, seat.rank)
        prefix = f"{seat.namespace}/{number}"
        first = tally.text(store.compare_set(f"{prefix}/h", "", mine))
        if first != _ENDED:
            break
        missed = True  # that round ended without this rank: the others have moved on
    scale = seat.world_size + 1
    arrival = int(store.add(f"{prefix}/a", 1 + scale * (first != mine)))
    return _Joined(number, prefix, arrival, scale, missed)


def _finish(store: Any, seat: _Seat, joined: _Joined, deadline: float) -> Agreement:
    """Operations 3 and 4: the outcome, then the agreement or the error every rank raises."""
    number, prefix, arrival, scale = joined.number, joined.prefix, joined.arrival, joined.scale
    outcome, waited_out = _settle(store, prefix, arrival, scale, seat.world_size, deadline)
    if outcome == tally.OK:
        logger.debug("mpu-bridge: rank %d agreed on round %d (%s)", seat.rank, number, seat.summary[:120])
        return Agreement(round=number, rank=seat.rank, world_size=seat.world_size, facts=seat.facts,
                         unanimous={name: True for name in seat.facts},
                         distinct={name: None for name in seat.grouped}, _plan=(seat.digest, seat.summary))
    if outcome == _DIFFER:
        return _counted(store, seat, number, deadline, joined.missed)
    late = not waited_out and arrival % scale > _arrivals_when_declared(outcome)
    raise _timed_out(store, seat, prefix, number, late, joined.missed)


def _settle(store: Any, prefix: str, arrival: int, scale: int, world_size: int, deadline: float) -> Tuple[str, bool]:
    """``(outcome, this rank's wait expired)``: ``ok``, ``differ`` or a timeout record, the same
    for every rank (the last to arrive writes it, or a rank that gave up waiting does)."""
    done = f"{prefix}/done"
    if arrival % scale == world_size:
        return tally.text(store.compare_set(done, "", tally.OK if arrival // scale == 0 else _DIFFER)), False
    if tally.wait_for(store, done, deadline - time.monotonic()):
        return tally.peek(store, done), False
    arrived = int(store.add(f"{prefix}/a", 0)) % scale
    return tally.text(store.compare_set(done, "", f"{_TIMEOUT}:{arrived}")), True


def _arrivals_when_declared(outcome: str) -> int:
    """How many ranks had arrived when the round was declared timed out."""
    return int(outcome.partition(":")[2] or 0)


def _counted(store: Any, seat: _Seat, number: int, deadline: float, missed: bool) -> Agreement:
    """The counting round, after some rank differed from the first: exact flags, or the mismatch."""
    prefix = f"{seat.namespace}/{number}/s"
    counts = tally.count(store, prefix, rank=seat.rank, world_size=seat.world_size, digest=seat.digest,
                         summary=seat.summary, facts=seat.facts, grouped=seat.grouped, deadline=deadline)
    if counts.missing is not None:
        store.set(f"{seat.namespace}/{number}/h", _ENDED)
        raise _timeout_error(seat, number, counts.missing, late=seat.rank in counts.missing, missed=missed)
    agreement = Agreement(round=number, rank=seat.rank, world_size=seat.world_size, facts=seat.facts,
                          unanimous=counts.unanimous, distinct=counts.distinct, _store=store,
                          _prefix=prefix, _timeout=seat.timeout)
    if not counts.same_plan:
        raise PlanMismatchError(
            f"ranks disagree on the process groups to create (agreement round {number}, "
            f"{seat.world_size} ranks): {agreement.collect().describe_plans()}. Every rank must "
            "request the same groups (same sizes, same order of calls); fix the rank(s) that differ."
        )
    return agreement


def _timed_out(store: Any, seat: _Seat, prefix: str, number: int, late: bool, missed: bool) -> GroupCreationError:
    """End the round (later joiners move on), say this rank was there, wait briefly for the
    other ranks that arrived to say so too, and name the ranks that did not."""
    store.set(f"{prefix}/h", _ENDED)
    store.set(f"{prefix}/p/{seat.rank}", "1")
    present = int(store.add(f"{prefix}/pc", 1))
    scale = seat.world_size + 1
    end = time.monotonic() + min(seat.timeout, _PRESENCE_GRACE_S)
    while present < int(store.add(f"{prefix}/a", 0)) % scale and time.monotonic() < end:
        time.sleep(0.02)
        present = int(store.add(f"{prefix}/pc", 0))
    return _timeout_error(seat, number, tally.missing_ranks(store, f"{prefix}/p", seat.world_size), late, missed)


def _timeout_error(seat: _Seat, number: int, missing: List[int], late: bool, missed: bool) -> GroupCreationError:
    rank, world_size, timeout = seat.rank, seat.world_size, seat.timeout
    if late:
        return GroupCreationError(
            f"rank {rank}: this rank arrived too late: the other ranks gave up waiting for it after "
            f"the agreement timeout of {timeout:g} s (agreement round {number}"
            + (f"; ranks {format_ranks(missing)} were not there" if missing else "")
            + "). It was slower than the others or made a call they did not make; bring the ranks "
            "back in step (e.g. a barrier), or raise agreement_timeout."
        )
    if missing:
        who = f"ranks {format_ranks(missing)} of {world_size} never arrived"
    else:
        who = f"not all {world_size} ranks arrived (which ones could not be determined)"
    return GroupCreationError(
        f"rank {rank}: group creation did not start: the ranks did not agree on a plan within "
        f"the agreement timeout of {timeout:g} s: {who} (agreement round {number}). A missing rank "
        "crashed, raised before creating its groups, or made a different sequence of group "
        "requests; fix that rank (see its log), or raise agreement_timeout if it is merely slow."
        + (
            " Note: this rank itself missed an earlier round that the other ranks gave up on (it was "
            "slower than them, or skipped or added a call), so it may be the one out of step."
            if missed
            else ""
        )
    )
