"""Cross-rank agreement on a group-creation plan, through the default ``torch.distributed`` store.

Before any rank creates a process group, every rank publishes a *digest* of what it
is about to create (plus a few *facts* about its own state) and waits until all
ranks have done so. Then every rank knows, from the same final counters, whether
all digests are equal and which facts were unanimous, and all ranks reach the
same decision: go ahead, or raise the same error. No rank is left behind in a
``new_group`` that the others never enter.

Cost in the success path: O(1) store operations per rank, whatever the world size
(one record, one counter per digest and per fact, one arrival counter, one wait on
a key the last rank sets). Only an error or a disagreement reads every rank's
record, and then on a single *reporting* rank that publishes the result for the
others (O(world) in total, not per rank).

Consistency: the round ends through one atomic ``compare_set`` on the round's
``done`` key. The last rank to arrive writes ``ok``; a rank whose wait times out
tries to write ``timeout``. Whichever lands first is what every rank reads, so a
rank arriving just after the deadline raises too instead of creating groups alone.

Rounds and epochs (why one rank's missed call cannot shift every later round):
rounds are numbered per *epoch*. ``epoch`` is one shared counter; ``rounds/<epoch>/<rank>``
counts the rounds a rank has joined in it, so round ``n`` of an epoch is every
rank's ``n``-th agreement since the epoch began. A round that fails (the plans
differ, or a rank did not arrive in time) ends its epoch: every rank that saw the
failure moves the shared counter on (one atomic ``compare_set``) *before* it
raises, so each rank's next round -- including a rank that skipped the failed one
-- starts at round 1 of the new epoch. Once the ranks are back in step (a barrier,
then identical calls) they agree again.

Grouped facts: a value that only the members of one group must share (the salt
PyTorch will hash into the group's name on each member, say) is published as
``(group id, value)``; the first member to publish a pair also counts it in the
round's ``distinct`` counter for that name, so after the round every rank reads how
many distinct pairs there were: the number of groups exactly when the members of
every group reported the same value. One more store operation per name per rank (two
on the first member of a pair); the distinct counters are read with the others.

Store layout (all under ``mpu_bridge/agree/``): ``epoch``; ``rounds/<epoch>/<rank>``;
the keys of round ``n`` live under ``<epoch>.<n>/``.

Example (every rank)::

    store = torch.distributed.distributed_c10d._get_default_store()
    result = agree(store, rank=r, world_size=w, digest="ab12", summary="ep[ep=4]", timeout=60)
    result.is_unanimous("names")
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import GroupCreationError, PlanMismatchError
from .text import format_ranks
from .validate import seconds

__all__ = ["NAMESPACE", "Agreement", "Table", "agree", "format_ranks"]

logger = logging.getLogger(__name__)

#: Store prefix of every agreement key.
NAMESPACE = "mpu_bridge/agree"

_OK = "ok"
_MAX_VALUE_IN_KEY = 64
_MAX_SUMMARY = 600
_MULTI_GET_CHUNK = 4096


def _value_key(value: str) -> str:
    """A store-key-safe form of a fact value: itself if short, else its hash."""
    if len(value) <= _MAX_VALUE_IN_KEY and "/" not in value:
        return value
    return "h" + hashlib.sha1(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Table:
    """Every rank's answer, grouped: which ranks planned what, and which held which fact values.

    ``plans`` is ``((ranks, digest, summary), ...)`` and ``facts[name]`` is
    ``((ranks, value), ...)``, each sorted by its smallest rank, so every rank
    builds the same messages from it.
    """

    plans: Tuple[Tuple[Tuple[int, ...], str, str], ...]
    facts: Mapping[str, Tuple[Tuple[Tuple[int, ...], str], ...]]

    def describe_plans(self) -> str:
        """``ranks [0, 1] planned <A>; ranks [2, 3] planned <B>``."""
        return "; ".join(
            f"ranks {format_ranks(ranks)} planned {summary}" for ranks, _, summary in self.plans
        )

    def describe_fact(self, name: str) -> str:
        """``ranks [0, 1] have 5; ranks [2, 3] have 4`` for one fact."""
        return "; ".join(
            f"ranks {format_ranks(ranks)} have {value}" for ranks, value in self.facts.get(name, ())
        )

    @classmethod
    def from_json(cls, text: str) -> "Table":
        raw = json.loads(text)
        plans = tuple((tuple(r), d, s) for r, d, s in raw["plans"])
        facts = {
            name: tuple((tuple(r), v) for r, v in entries) for name, entries in raw["facts"].items()
        }
        return cls(plans=plans, facts=facts)

    def to_json(self) -> str:
        return json.dumps(
            {
                "plans": [[list(r), d, s] for r, d, s in self.plans],
                "facts": {n: [[list(r), v] for r, v in e] for n, e in self.facts.items()},
            }
        )


@dataclass
class Agreement:
    """The outcome of one round on this rank: every rank published the same digest.

    ``unanimous[name]`` says whether every rank reported the same value of fact
    ``name``; every rank sees the same flags, so decisions taken from them are the
    same everywhere. :meth:`collect` fetches every rank's values (a collective step:
    call it on every rank or on none).
    """

    round: int
    epoch: int
    rank: int
    world_size: int
    facts: Mapping[str, str]
    unanimous: Mapping[str, bool]
    _store: Any = field(repr=False)
    _prefix: str = field(repr=False)
    _timeout: float = field(repr=False)
    _table: Optional[Table] = field(default=None, repr=False)
    distinct: Mapping[str, int] = field(default_factory=dict)

    def is_unanimous(self, name: str) -> bool:
        """Whether every rank reported the same value of fact ``name`` (True for unknown facts)."""
        return self.unanimous.get(name, True)

    def distinct_pairs(self, name: str) -> int:
        """How many distinct ``(group id, value)`` pairs the ranks published for grouped
        fact ``name``: the number of groups exactly when each group's members agree."""
        return self.distinct[name]

    @property
    def all_unanimous(self) -> bool:
        return all(self.unanimous.values())

    def collect(self) -> Table:
        """Every rank's plan and facts, grouped (O(world) store reads on one rank; collective)."""
        if self._table is None:
            self._table = _collect(self._store, self._prefix, self.rank, self.world_size, self._timeout)
        return self._table


def _wait(store: Any, key: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``key``; False on timeout (a store error other than that raises)."""
    if seconds <= 0:
        return bool(store.check([key]))
    try:
        store.wait([key], datetime.timedelta(seconds=seconds))
        return True
    except RuntimeError as exc:  # DistStoreError (a RuntimeError) on timeout
        if store.check([key]):
            return True
        if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
            return False
        raise


def _missing_ranks(store: Any, prefix: str, world_size: int) -> List[int]:
    """Ranks whose record is absent, found by halving: O(missing · log world) ``check`` calls."""
    missing: List[int] = []
    stack = [(0, world_size)]
    while stack:
        lo, hi = stack.pop()
        keys = [f"{prefix}/r/{r}" for r in range(lo, hi)]
        if store.check(keys):
            continue
        if hi - lo == 1:
            missing.append(lo)
            continue
        mid = (lo + hi) // 2
        stack.append((mid, hi))
        stack.append((lo, mid))
    return sorted(missing)


def _read_records(store: Any, prefix: str, world_size: int) -> List[Dict[str, Any]]:
    keys = [f"{prefix}/r/{r}" for r in range(world_size)]
    values: List[bytes] = []
    multi_get = getattr(store, "multi_get", None)
    for start in range(0, len(keys), _MULTI_GET_CHUNK):
        chunk = keys[start : start + _MULTI_GET_CHUNK]
        if multi_get is not None:
            try:
                values.extend(multi_get(chunk))
                continue
            except (RuntimeError, NotImplementedError):
                multi_get = None
        values.extend(store.get(k) for k in chunk)
    return [json.loads(v.decode("utf-8")) for v in values]


def _build_table(records: List[Dict[str, Any]]) -> Table:
    plans: Dict[Tuple[str, str], List[int]] = {}
    facts: Dict[str, Dict[str, List[int]]] = {}
    for r, rec in enumerate(records):
        plans.setdefault((rec["d"], rec["s"]), []).append(r)
        for name, value in rec["f"].items():
            facts.setdefault(name, {}).setdefault(value, []).append(r)
    plan_rows = sorted(((tuple(rs), d, s) for (d, s), rs in plans.items()), key=lambda x: x[0][0])
    fact_rows = {
        name: tuple(sorted(((tuple(rs), v) for v, rs in by_value.items()), key=lambda x: x[0][0]))
        for name, by_value in sorted(facts.items())
    }
    return Table(plans=tuple(plan_rows), facts=fact_rows)


def _collect(store: Any, prefix: str, rank: int, world_size: int, timeout: float) -> Table:
    """One rank (the first to claim) reads every record and publishes the table; the rest wait."""
    table_key = f"{prefix}/table"
    if int(store.add(f"{prefix}/table_claim", 1)) == 1:
        table = _build_table(_read_records(store, prefix, world_size))
        store.set(table_key, table.to_json())
        return table
    if not _wait(store, table_key, timeout):
        raise GroupCreationError(
            f"rank {rank}: the rank collecting every rank's group plan did not publish it within "
            f"{timeout:g} s (agreement_timeout); it may have died. Check the other ranks' logs."
        )
    return Table.from_json(store.get(table_key).decode("utf-8"))


def _timeout_error(
    rank: int, world_size: int, round_: str, timeout: float, outcome: Mapping[str, Any], missed: bool = False
) -> GroupCreationError:
    missing = outcome.get("missing")
    if missing and rank in missing:
        return GroupCreationError(
            f"rank {rank}: this rank arrived too late: the other ranks gave up waiting for it after "
            f"the agreement timeout of {timeout:g} s (agreement round {round_}; late ranks "
            f"{format_ranks(missing)}). It was slower than the others or made a call they did not "
            "make; bring the ranks back in step (e.g. a barrier), or raise agreement_timeout."
        )
    if missing:
        who = f"ranks {format_ranks(missing)} of {world_size} never arrived"
    else:
        who = f"not all {world_size} ranks arrived (which ones could not be determined)"
    return GroupCreationError(
        f"rank {rank}: group creation did not start: the ranks did not agree on a plan within "
        f"the agreement timeout of {timeout:g} s: {who} (agreement round {round_}). A missing rank "
        "crashed, raised before creating its groups, or made a different sequence of group "
        "requests; fix that rank (see its log), or raise agreement_timeout if it is merely slow."
        + (
            " Note: this rank itself missed an earlier round that the other ranks gave up on (it was "
            "slower than them, or skipped or added a call), so it may be the one out of step."
            if missed
            else ""
        )
    )


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
    value)`` or None (a rank in no group); every rank passes the same names, and at
    least one rank a pair for each (see the module docstring). Example::

        agree(store, rank=0, world_size=4, digest=d, summary="ep[ep=2]", facts={"seq": "3"},
              grouped={"salt/0": ("0", "5")}).distinct_pairs("salt/0")
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise GroupCreationError(f"rank {rank} is outside a world of {world_size} ranks")
    timeout = seconds("agreement_timeout", timeout, GroupCreationError)
    try:
        return _agree(store, rank, world_size, digest, summary, facts, timeout, namespace, grouped or {})
    except RuntimeError as exc:  # the store itself failed (DistError and friends)
        raise GroupCreationError(
            f"rank {rank}: the default store failed while the ranks agreed on a group plan: "
            f"{exc}. The process hosting the store (usually rank 0) may have died; see its log."
        ) from exc


@dataclass(frozen=True)
class _Seat:
    """One rank's place in one round: where its keys live and what it published."""

    namespace: str
    rank: int
    world_size: int
    epoch: int
    round: int
    missed: bool  # this rank had not seen the failure that began this epoch
    digest: str
    facts: Mapping[str, str]
    grouped: Mapping[str, Optional[Tuple[str, str]]]

    @property
    def prefix(self) -> str:
        return f"{self.namespace}/{self.epoch}.{self.round}"

    @property
    def label(self) -> str:
        return f"{self.epoch}.{self.round}"


def _join(store: Any, namespace: str, rank: int, world_size: int, digest: str, summary: str,
          facts: Mapping[str, str], grouped: Mapping[str, Optional[Tuple[str, str]]]) -> Tuple[_Seat, int]:
    """Take this rank's seat in its next round and publish its plan; returns (seat, arrivals).

    The record goes first (so "record absent" means "never arrived"), then the counters,
    then the arrival: when arrivals reach ``world_size``, every counter is final.
    """
    epoch = int(store.add(f"{namespace}/epoch", 0))
    # The last epoch this rank knew of: behind the shared one means it missed a failed round.
    missed = int(store.add(f"{namespace}/seen/{rank}", 0)) < epoch
    if missed:
        store.set(f"{namespace}/seen/{rank}", str(epoch))
    round_ = int(store.add(f"{namespace}/rounds/{epoch}/{rank}", 1))
    seat = _Seat(namespace, rank, world_size, epoch, round_, missed, digest, facts, grouped)
    store.set(f"{seat.prefix}/r/{rank}", json.dumps({"d": digest, "s": summary[:_MAX_SUMMARY], "f": facts}))
    store.add(f"{seat.prefix}/d/{_value_key(digest)}", 1)
    for name, value in facts.items():
        store.add(f"{seat.prefix}/f/{name}/{_value_key(value)}", 1)
    for name, pair in grouped.items():
        if pair is not None:
            group_id, value = pair
            if int(store.add(f"{seat.prefix}/g/{name}/{_value_key(group_id)}/{_value_key(value)}", 1)) == 1:
                store.add(f"{seat.prefix}/gd/{name}", 1)
    return seat, int(store.add(f"{seat.prefix}/arrived", 1))


def _settle(store: Any, seat: _Seat, arrived: int, deadline: float) -> str:
    """The round's outcome: ``ok`` (all arrived) or a timeout record, the same for every rank."""
    done_key = f"{seat.prefix}/done"
    if arrived == seat.world_size:
        text = store.compare_set(done_key, "", _OK)
    elif _wait(store, done_key, deadline - time.monotonic()):
        text = store.get(done_key)
    else:
        text = _declare_timeout(store, seat.prefix, seat.world_size)
    return text.decode("utf-8") if isinstance(text, bytes) else text


def _conclude(store: Any, seat: _Seat, outcome_text: str, timeout: float) -> Agreement:
    """Raise what every rank raises for this outcome, or return the agreement."""
    if outcome_text != _OK:
        _end_epoch(store, seat.namespace, seat.rank, seat.epoch)
        raise _timeout_error(seat.rank, seat.world_size, seat.label, timeout, json.loads(outcome_text),
                             seat.missed)
    prefix, world_size = seat.prefix, seat.world_size
    # Every counter is final once the round is ok; this rank created its own keys: read
    # them all in one round trip where the store can.
    names, grouped = list(seat.facts), list(seat.grouped)
    counts = _counters(
        store,
        [f"{prefix}/d/{_value_key(seat.digest)}"]
        + [f"{prefix}/f/{name}/{_value_key(seat.facts[name])}" for name in names]
        + [f"{prefix}/gd/{name}" for name in grouped],
    )
    agreement = Agreement(
        round=seat.round,
        epoch=seat.epoch,
        rank=seat.rank,
        world_size=world_size,
        facts=seat.facts,
        unanimous={name: count == world_size for name, count in zip(names, counts[1:])},
        _store=store,
        _prefix=prefix,
        _timeout=timeout,
        distinct=dict(zip(grouped, counts[1 + len(names):])),
    )
    if counts[0] != world_size:
        table = agreement.collect()
        _end_epoch(store, seat.namespace, seat.rank, seat.epoch)
        raise PlanMismatchError(
            f"ranks disagree on the process groups to create (agreement round {seat.label}, "
            f"{world_size} ranks): {table.describe_plans()}. Every rank must request the same "
            "groups (same sizes, same order of calls); fix the rank(s) that differ."
        )
    if agreement.all_unanimous:
        # Nobody will collect this round: drop this rank's record to keep the store small.
        try:
            store.delete_key(f"{prefix}/r/{seat.rank}")
        except (RuntimeError, NotImplementedError):
            pass
    return agreement


def _counters(store: Any, keys: List[str]) -> List[int]:
    """The values of counter ``keys`` (all present): one ``multi_get`` where the store has it."""
    multi_get = getattr(store, "multi_get", None)
    if multi_get is not None:
        try:
            return [int(v) for v in multi_get(keys)]
        except (RuntimeError, NotImplementedError):
            pass
    return [int(store.add(key, 0)) for key in keys]


def _agree(
    store: Any,
    rank: int,
    world_size: int,
    digest: str,
    summary: str,
    facts: Optional[Mapping[str, str]],
    timeout: float,
    namespace: str,
    grouped: Mapping[str, Optional[Tuple[str, str]]],
) -> Agreement:
    deadline = time.monotonic() + timeout
    clean = {str(k): str(v) for k, v in (facts or {}).items()}
    pairs = {str(k): None if v is None else (str(v[0]), str(v[1])) for k, v in grouped.items()}
    seat, arrived = _join(store, namespace, rank, world_size, digest, summary, clean, pairs)
    agreement = _conclude(store, seat, _settle(store, seat, arrived, deadline), timeout)
    logger.debug("mpu-bridge: rank %d agreed on round %s (%s)", rank, seat.label, summary[:120])
    return agreement


def _end_epoch(store: Any, namespace: str, rank: int, epoch: int) -> None:
    """Move the shared epoch from ``epoch`` to ``epoch + 1`` (a no-op if another rank did),
    and note that this rank saw it end."""
    store.compare_set(f"{namespace}/epoch", str(epoch), str(epoch + 1))
    store.set(f"{namespace}/seen/{rank}", str(epoch + 1))


def _declare_timeout(store: Any, prefix: str, world_size: int) -> bytes:
    """End the round as timed out, naming the ranks that never arrived; returns whatever
    outcome won (it may be ``ok``, if the last rank arrived meanwhile).

    Every rank that timed out names the missing ranks itself (O(missing · log world)
    store checks, on the error path only) and tries to settle the round; the first
    ``compare_set`` wins and every rank reads the same outcome.
    """
    missing = _missing_ranks(store, prefix, world_size)
    text = json.dumps({"status": "timeout", "missing": missing})
    return store.compare_set(f"{prefix}/done", "", text)
