"""Pure planning of one batch of group requests: what every rank asked -> what to do.

The registry gathers, per batch of partitions, this rank's *votes* (does it hold
a communicator for its group of each partition already?) and a few facts; the
agreement round tells it which of those every rank shares. The functions here
turn that into one decision -- reuse or create each partition, and with which
strategy -- that is the same on every rank because it is computed only from
values every rank sees alike. No torch, no store: testable without processes.

Example::

    >>> decide_strategy("local_new_group", equal_salts=True, fresh_names=True)
    ('local_new_group', None)
"""

from __future__ import annotations

import hashlib
import json
from typing import AbstractSet, Any, List, Optional, Sequence, Tuple

from .partitions import Partition

__all__ = [
    "STRATEGIES", "FALLBACK_REASONS", "digest", "reuse_votes", "merge_votes", "salts", "safe_without_check",
    "decide_strategy", "decide_span_strategy", "span_salt",
]

#: The creation strategies a registry can use (``"auto"`` picks one of them).
STRATEGIES = ("split_group", "local_new_group", "new_group")

#: Why a member-only batch falls back to the all-ranks loop, by cause.
FALLBACK_REASONS = {
    "salt": (
        "the members of some group would hash different salts into its name (PyTorch names a "
        "member-only group after its ranks and a per-rank number: the groups the rank holds up to "
        "PyTorch 2.13, its group counter from 2.14; they differ e.g. after megatron-core's embedding "
        "groups with pp > 1), so PyTorch would name that group differently on its members"
    ),
    "unchecked": (
        "without the cross-rank plan check (verify_plan=False, or the 'fake' backend) the registry "
        "cannot see each rank's salt for member-only group names, and groups that left ranks out "
        "(embedding groups) were created before, or this batch orders such families unsafely"
    ),
    "mixed": (
        "some ranks already hold a communicator for their group of a partition (made by a family "
        "that left other ranks out, e.g. embedding groups) and others do not; every rank enters "
        "every group and the holders keep the communicator they have"
    ),
    "stale": (
        "PyTorch would reuse the name of a group destroyed earlier (same ranks, same salt), and its "
        "rendezvous would read stale addresses"
    ),
    "naming": (
        "this PyTorch's naming of member-only groups is not recognised on some rank (each rank logs "
        "what it found), and a group named differently on its members would hang or meet the wrong "
        "peers"
    ),
    "counter": (
        "a family that leaves ranks out is created here, and with this PyTorch creating a member-only "
        "group may also advance PyTorch's group counter on its members alone (it does from PyTorch "
        "2.14); the ranks' counters, which name every all-ranks group, would then differ for good"
    ),
}


def digest(
    parts: Sequence[Partition], label: str, *, backend: str, strategy: str, options: Optional[object]
) -> Tuple[str, str]:
    """``(digest, summary)`` of a batch: what every rank must have asked for alike.

    The digest covers the partitions' fingerprints, the caller's request ``label``
    and the creation settings; the summary names them for error messages. Example:
    ``digest([tp], "tensor_parallel()", backend="gloo", strategy="auto", options=None)[1]``
    starts with ``"[tp (2 groups of 2, first [0, 1])]"``.
    """
    config = [backend, strategy, type(options).__name__, label]
    text = json.dumps([config, [p.fingerprint() for p in parts]])
    summary = "[" + ", ".join(p.summary() for p in parts) + f"] (backend {backend})"
    if label:
        summary = f"{summary} from {label}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest(), summary


def reuse_votes(
    parts: Sequence[Partition], registered: AbstractSet[Tuple[int, ...]], world_held: int = 0
) -> List[str]:
    """Per partition: ``"1"`` if this rank's group is registered (or asked for earlier in
    the batch, or is the whole world of ``world_held`` ranks, which the default group
    holds; 0: it does not serve), ``"0"`` if not, ``"-"`` if the rank is in none of its groups.

    Why this is the same on every rank (so every rank creates exactly one group per
    created partition, in the same order): a covering partition of translates of an
    offset set O is the *unique* tiling of the world by translates of O -- the
    smallest rank not yet covered must be the base of the next group. If this rank's
    group of P equals its group of Q (registered earlier, or the MPU's groups of one
    kind, which megatron-core builds the same way), the offset sets are equal, hence
    P == Q entirely, and every other rank's group of P is registered as well. The
    agreement round checks it anyway: the votes are a fact every rank must share.

    A partition on another channel (``p.channel``, e.g. the all-gather twins' ``"ag"``)
    is its own set of communicators: it matches only ``(channel, ranks)`` entries of
    ``registered`` and is never the default group.

    Example: ``reuse_votes([tp], {(0, 1)}) == ["1"]`` on rank 0 of ``plan(4, tp=2)``.
    """
    seen = set(registered)
    votes = []
    for p in parts:
        if p.own is None:
            votes.append("-")
            continue
        channel = getattr(p, "channel", "")
        if world_held and p.group_size == world_held and not channel:
            votes.append("1")
            continue
        own: Any = tuple(p.own) if not channel else (channel, tuple(p.own))
        votes.append("1" if own in seen else "0")
        seen.add(own)
    return votes


def merge_votes(
    parts: Sequence[Partition], rows: Sequence[Tuple[Sequence[int], str]]
) -> List[Optional[bool]]:
    """Reuse decisions from every rank's votes (``rows``: ``(ranks, vote string)``).

    Per partition: True when some rank holds its group and none lacks one (reuse),
    False when none holds one (create), None when some ranks hold theirs and others
    do not -- *mixed*, which happens when an earlier family left ranks out (embedding
    groups): the members of each group still agree, so the batch is created with the
    all-ranks loop and the holders keep their communicator. Example:
    ``merge_votes([p], [((0, 1), "1"), ((2, 3), "0")]) == [None]``.
    """
    reuse: List[Optional[bool]] = []
    for i, _ in enumerate(parts):
        have = any(vec[i] == "1" for _, vec in rows)
        lack = any(vec[i] == "0" for _, vec in rows)
        reuse.append(None if have and lack else have)
    return reuse


def salts(votes: Sequence[str], salt: int) -> List[int]:
    """The salt this rank will hash into the name of its group of each partition of a batch
    (see :data:`FALLBACK_REASONS` ``"salt"``), created member-only and in order: ``salt`` plus
    one for every earlier partition it creates a group for (vote ``"0"``, see :func:`reuse_votes`).

    Under both known PyTorch rules a member-only creation adds one to its caller's salt and
    to no other rank's, so the members of a group must start from equal salts. Example:
    ``salts(["0", "-", "0"], 5) == [5, 6, 6]``.
    """
    out = []
    for vote in votes:
        out.append(salt)
        salt += vote == "0"
    return out


def safe_without_check(parts: Sequence[Partition], world_size: int) -> bool:
    """Whether member-only creation of ``parts`` keeps every group's members at equal
    salts *by construction*, for when no rank can see the others' salts.

    Assumes every rank has the same salt before the batch. A partition that covers the
    world adds one to the salt on every rank; one that leaves ranks out adds one only on
    its members. So: every covering partition before the first that leaves
    ranks out, and after that only groups of one rank (a group of one cannot disagree
    with itself). Example: ``[tp, dp, embedding (groups of 2), position embedding
    (groups of 1)]`` is safe; ``[embedding, tp]`` is not.
    """
    partial = False
    for p in parts:
        if not p.covers(world_size):
            if partial and p.group_size > 1:
                return False
            partial = True
        elif partial and p.group_size > 1:
            return False
    return True


def decide_strategy(
    chosen: str,
    *,
    equal_salts: bool,
    checked: bool = True,
    fresh_names: bool = True,
    mixed: bool = False,
    named: bool = True,
    counter_safe: bool = True,
) -> Tuple[str, Optional[str]]:
    """``(strategy, fallback reason)`` for a batch: the registry's ``chosen`` strategy,
    or ``new_group`` when member-only creation would be unsafe (see
    :data:`FALLBACK_REASONS`), and for every strategy when some partition's votes are
    ``mixed`` (see :func:`merge_votes`). ``named``: every rank recognises how its PyTorch
    names member-only groups. ``counter_safe``: creating the batch member-only keeps the
    ranks' group counters equal (no created family leaves ranks out, or member-only
    creation leaves the counter alone). ``equal_salts``: the members of every group to
    create will hash equal salts (measured in the agreement when ``checked``, else
    :func:`safe_without_check`). Inputs are unanimous facts, so every rank decides alike.

    Example: ``decide_strategy("local_new_group", equal_salts=False)`` is
    ``("new_group", FALLBACK_REASONS["salt"])``.
    """
    if mixed:
        return "new_group", FALLBACK_REASONS["mixed"]
    if chosen != "local_new_group":
        return chosen, None
    if not named:
        return "new_group", FALLBACK_REASONS["naming"]
    if not counter_safe:
        return "new_group", FALLBACK_REASONS["counter"]
    if not equal_salts:
        return "new_group", FALLBACK_REASONS["salt" if checked else "unchecked"]
    if not fresh_names:
        return "new_group", FALLBACK_REASONS["stale"]
    return chosen, None


#: The smallest salt :func:`span_salt` gives: far above any group counter PyTorch reaches
#: by counting, so a chosen name never meets a name PyTorch chose.
SPAN_SALT_BASE = 1 << 52


def span_salt(namespace: str, round_number: int) -> int:
    """The first salt of the batch agreed in round ``round_number`` of ``namespace`` (a
    rank span's agreement namespace); the batch's ``i``-th created partition uses ``+ i``
    (``i < 4096``). Unique per (namespace, round) while the store lives, so names never
    repeat. Example: ``span_salt("s", 2) - span_salt("s", 1) == 4096``.
    """
    if not 0 < round_number < 1 << 24:
        raise ValueError(f"round number {round_number} is outside 1..2**24-1")
    space = int.from_bytes(hashlib.blake2b(namespace.encode("utf-8"), digest_size=2).digest(), "big") >> 4
    return SPAN_SALT_BASE + (space << 36) + (round_number << 12)


def decide_span_strategy(
    *, creating: bool, mixed: bool, bound: bool, salted: bool, named: bool, equal_salts: bool, fresh_names: bool
) -> Tuple[str, Optional[str]]:
    """``(strategy, problem)`` for a batch only a rank span's members take part in: the ranks
    outside never enter a ``new_group``, so there is no all-ranks fallback; a batch that
    cannot be created member-only safely is a ``problem`` (the registry raises it on every
    member). ``salted``: every member's PyTorch hashes its group counter (from 2.14), so the
    registry names the groups itself (``"salted"``); else PyTorch's own member-only naming,
    when the round shows it safe. Inputs are unanimous facts. Example:
    ``decide_span_strategy(creating=True, mixed=False, bound=False, salted=True, named=True,
    equal_salts=False, fresh_names=False) == ("salted", None)``.
    """
    if not creating:
        return "local_new_group", None
    if bound:
        return "", ("the default group is bound to a device, so every new_group is a world-wide split "
                    "that the ranks outside the span never join")
    if mixed:
        return "", FALLBACK_REASONS["mixed"]
    if not named:
        return "", FALLBACK_REASONS["naming"]
    if salted:
        return "salted", None
    if not equal_salts:
        return "", FALLBACK_REASONS["salt"]
    if not fresh_names:
        return "", FALLBACK_REASONS["stale"]
    return "local_new_group", None
