"""The counting round of an agreement: exact per-value counts when the ranks' plans differ.

:mod:`mpu_bridge.agreement` settles the common case (every rank publishes the same
plan and facts) in a few store operations per rank. When some rank differs, every
rank runs this round too, under the round's own prefix: it publishes a record (its
digest, summary and facts, for messages), adds one to a counter per digest and per
fact value, and per grouped fact to a counter of distinct ``(group id, value)``
pairs. Once every rank has arrived the counters are final and every rank reads the
same numbers: whether the digests are equal, which facts are unanimous, how many
distinct pairs each grouped fact has. A :class:`Table` of every rank's record (for
messages naming ranks) is read by one rank and published for the others.

Store layout under the prefix: ``r/<rank>`` records; ``d/<digest>``, ``f/<name>/<value>``,
``g/<name>/<group>/<value>`` and ``gd/<name>`` counters; ``arrived``; ``done``; ``table``.

Example (every rank, after the fast round said "differ")::

    counts = count(store, "mpu_bridge/agree/7/s", rank=r, world_size=w, digest=d,
                   summary="tp (4 groups of 2)", facts={"seq": "3"}, grouped={},
                   deadline=time.monotonic() + 60)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import GroupCreationError
from .text import format_ranks

__all__ = ["Table", "Counts", "count", "collect", "missing_ranks", "wait_for", "peek", "value_key"]

OK = "ok"
#: What :func:`peek` returns for a key that does not exist (never a value the bridge writes).
ABSENT = "\x00absent"
_MAX_VALUE_IN_KEY = 64
_MAX_SUMMARY = 600
_MULTI_GET_CHUNK = 4096


def value_key(value: str) -> str:
    """A store-key-safe form of a value: itself if short, else its hash."""
    if len(value) <= _MAX_VALUE_IN_KEY and "/" not in value:
        return value
    return "h" + hashlib.sha1(value.encode("utf-8")).hexdigest()


def text(value: Any) -> str:
    """A store value as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def peek(store: Any, key: str) -> str:
    """The value of ``key`` without waiting for it: :data:`ABSENT` when it does not exist
    (one ``compare_set`` that never writes: expected and desired are the same sentinel)."""
    return text(store.compare_set(key, ABSENT, ABSENT))


def wait_for(store: Any, key: str, seconds: float) -> bool:
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
    def unanimous(cls, world_size: int, digest: str, summary: str, facts: Mapping[str, str]) -> "Table":
        """The table of a round where every rank published ``digest`` and ``facts``."""
        everyone = tuple(range(world_size))
        return cls(plans=((everyone, digest, summary),),
                   facts={name: ((everyone, value),) for name, value in sorted(facts.items())})

    @classmethod
    def from_json(cls, raw_text: str) -> "Table":
        raw = json.loads(raw_text)
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


@dataclass(frozen=True)
class Counts:
    """The outcome of a counting round, the same on every rank: ``missing`` is None when
    every rank arrived (then the rest is final), else the ranks that did not."""

    same_plan: bool
    unanimous: Mapping[str, bool]
    distinct: Mapping[str, int]
    missing: Optional[List[int]] = None


def count(
    store: Any,
    prefix: str,
    *,
    rank: int,
    world_size: int,
    digest: str,
    summary: str,
    facts: Mapping[str, str],
    grouped: Mapping[str, Optional[Tuple[str, str]]],
    deadline: float,
) -> Counts:
    """Run the counting round under ``prefix`` (collective); see the module docstring.

    The record goes first (so "record absent" means "never arrived"), then the counters,
    then the arrival: when arrivals reach ``world_size``, every counter is final.
    """
    store.set(f"{prefix}/r/{rank}", json.dumps({"d": digest, "s": summary[:_MAX_SUMMARY], "f": dict(facts)}))
    store.add(f"{prefix}/d/{value_key(digest)}", 1)
    for name, value in facts.items():
        store.add(f"{prefix}/f/{name}/{value_key(value)}", 1)
    for name, pair in grouped.items():
        if pair is not None:
            group_id, value = pair
            if int(store.add(f"{prefix}/g/{name}/{value_key(group_id)}/{value_key(value)}", 1)) == 1:
                store.add(f"{prefix}/gd/{name}", 1)
    done = f"{prefix}/done"
    if int(store.add(f"{prefix}/arrived", 1)) == world_size:
        outcome = text(store.compare_set(done, "", OK))
    elif wait_for(store, done, deadline - time.monotonic()):
        outcome = peek(store, done)
    else:
        missing = missing_ranks(store, f"{prefix}/r", world_size)
        outcome = text(store.compare_set(done, "", json.dumps({"missing": missing})))
    if outcome != OK:
        return Counts(False, {}, {}, missing=list(json.loads(outcome)["missing"]))
    names, grouped_names = list(facts), list(grouped)
    values = counters(
        store,
        [f"{prefix}/d/{value_key(digest)}"]
        + [f"{prefix}/f/{name}/{value_key(facts[name])}" for name in names]
        + [f"{prefix}/gd/{name}" for name in grouped_names],
    )
    return Counts(
        same_plan=values[0] == world_size,
        unanimous={name: n == world_size for name, n in zip(names, values[1:])},
        distinct=dict(zip(grouped_names, values[1 + len(names):])),
    )


def counters(store: Any, keys: List[str]) -> List[int]:
    """The values of counter ``keys`` (all present): one ``multi_get`` where the store has it."""
    multi_get = getattr(store, "multi_get", None)
    if multi_get is not None:
        try:
            return [int(v) for v in multi_get(keys)]
        except (RuntimeError, NotImplementedError):
            pass
    return [int(store.add(key, 0)) for key in keys]


def missing_ranks(store: Any, prefix: str, world_size: int) -> List[int]:
    """Ranks ``r`` with no key ``<prefix>/<r>``, found by halving: O(missing · log world) ``check`` calls."""
    missing: List[int] = []
    stack = [(0, world_size)]
    while stack:
        lo, hi = stack.pop()
        if store.check([f"{prefix}/{r}" for r in range(lo, hi)]):
            continue
        if hi - lo == 1:
            missing.append(lo)
            continue
        mid = (lo + hi) // 2
        stack.append((mid, hi))
        stack.append((lo, mid))
    return sorted(missing)


def collect(store: Any, prefix: str, rank: int, world_size: int, timeout: float) -> Table:
    """Every rank's record as a :class:`Table` (collective: every rank or none): the first
    rank to claim reads the records and publishes the table; the rest wait for it."""
    table_key = f"{prefix}/table"
    if int(store.add(f"{prefix}/table_claim", 1)) == 1:
        table = _build_table(_read_records(store, prefix, world_size))
        store.set(table_key, table.to_json())
        return table
    if not wait_for(store, table_key, timeout):
        raise GroupCreationError(
            f"rank {rank}: the rank collecting every rank's group plan did not publish it within "
            f"{timeout:g} s (agreement_timeout); it may have died. Check the other ranks' logs."
        )
    return Table.from_json(text(store.get(table_key)))


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
    return [json.loads(text(v)) for v in values]


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
