"""Reading an MPU: world sizes, ranks, groups and group ranks, whatever the MPU calls them.

:class:`MpuReader` answers four queries -- ``world_size``, ``rank``, ``group``,
``ranks`` (the global ranks of this rank's group) -- for each dimension in
:data:`~mpu_bridge.mpu.names.DIMENSIONS`, plus the combined groups in
:data:`~mpu_bridge.mpu.names.COMBINED_DIMENSIONS`, by the flavour's name tables
(:mod:`mpu_bridge.mpu.names`). For each query the reader

1. calls the candidates in order; a name that is absent, raises (megatron's
   ``assert ... is not None``), has no such keyword, or answers 0/None/-1 (megatron's
   "before initialisation" answers) is skipped and recorded;
2. derives ``world_size``/``rank``/``ranks`` from the group when there is one
   (``torch.distributed`` is imported lazily, only then);
3. follows the flavour's aliases (e.g. sequence-data = data when cp = 1, model =
   tensor when pp = 1, expert-tensor = tensor on megatron-core < 0.10);
4. otherwise raises :class:`~mpu_bridge.errors.MpuError` naming every name tried
   and what each did -- and saying the MPU looks uninitialised when some getter
   answered 0/None or asserted "not initialized".

The checks of the answers against the world are in :mod:`mpu_bridge.mpu.checks`.
This module does not import torch at import time.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import MpuError
from . import checks
from .names import (
    _GRID_AXIS_TOKENS,
    ALIASES,
    ALL_DIMENSIONS,
    DIMENSION_DESCRIPTIONS,
    FIXED_ORDERS,
    FLAVOURS,
    NAME_TABLES,
    QUERIES,
    Condition,
    Getter,
    _has,
    _short,
    detect_flavour,
)

__all__ = ["MpuSizes", "MpuReader"]

logger = logging.getLogger("mpu_bridge.mpu")


@dataclass(frozen=True)
class MpuSizes:
    """The MPU's parallel sizes.

    ``tp``, ``pp``, ``cp`` are 1 where the MPU has no names for them at all. ``dp`` is
    the MPU's data-parallel size (or sequence-data size / cp where it has only that,
    as DeepSpeed's Ulysses MPU), ``None`` if it answers neither. ``ep``/``etp`` are
    ``None`` when the MPU knows nothing of experts. ``order`` is the megatron order
    string when the MPU's layout is known (fixed by its flavour, read from DeepSpeed's
    topology, or an ``order`` attribute), else ``None``.

    Example: ``MpuSizes(tp=2, pp=1, dp=4, cp=1, ep=None, etp=None, order=None,
    flavour="megatron-lm-2")``.
    """

    tp: int
    pp: int
    dp: Optional[int]
    cp: int
    ep: Optional[int]
    etp: Optional[int]
    order: Optional[str]
    flavour: str
    gtp: int = 1
    egtp: int = 1

    @property
    def edp(self) -> Optional[int]:
        """Expert-data-parallel size implied by the sizes: tp·gtp·cp·dp / (etp·ep·egtp)."""
        if self.dp is None or self.ep is None:
            return None
        etp = self.tp if self.etp is None else self.etp
        dense = self.tp * self.gtp * self.cp * self.dp
        expert = etp * self.ep * self.egtp
        return dense // expert if dense % expert == 0 else None


def _render_trail(trail: List[str]) -> List[str]:
    lines = []
    for entry in trail:
        depth = (len(entry) - len(entry.lstrip(" "))) // 4
        lines.append("  " + "    " * depth + "- " + entry.strip())
    return lines


class _Failure(Exception):
    """Internal: a query could not be answered (carries the trail)."""

    def __init__(self, trail: List[str], uninitialised: bool) -> None:
        super().__init__("; ".join(trail))
        self.trail = trail
        self.uninitialised = uninitialised


_UNINIT_WORDS = ("not initialized", "not initialised", "uninitialized", "is none")


def _as_index(value: Any) -> Optional[int]:
    """``value`` as an int if it is an integer (numpy's too), never a bool/float/str; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_process_group(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, bytes)):
        return False
    dist = _dist()
    return isinstance(value, dist.ProcessGroup)


def _dist() -> Any:
    import torch.distributed as dist  # lazy: only when a group must be inspected

    return dist



def _call_getter(mpu: Any, flavour: str, getter: Getter) -> Tuple[bool, Any, str]:
    """Call ``getter`` on ``mpu``: (called, value, note); the note says why not or what it raised."""
    try:
        func = getattr(mpu, getter.name)
    except AttributeError:
        return False, None, "absent"
    except Exception as exc:  # a property that raises: not "absent", a broken MPU
        raise MpuError(
            f"reading {getter.name} from the MPU ({flavour}) raised {type(exc).__name__}: {exc}; "
            "an MPU's getters must be plain functions or methods"
        ) from None
    if not callable(func):
        return False, None, f"not callable ({type(func).__name__})"
    kwargs = dict(getter.kwargs)
    if kwargs:
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError):
            params = None
        if params is not None:
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            missing = [key for key in kwargs if key not in params]
            if missing and not takes_any:
                return False, None, f"has no parameter {missing[0]!r}"
    try:
        return True, func(**kwargs), ""
    except Exception as exc:
        return True, None, f"raised {type(exc).__name__}: {exc}"


def _validate_answer(query: str, value: Any) -> Tuple[bool, Any, str]:
    """(valid, value, note). ``None``, 0 sizes and negative ranks are megatron's
    "not initialised / not a member" answers (skipped, noted); a value of the
    wrong type is malformed: the note starts with ``"malformed: "``."""
    if value is None:
        return False, None, "returned None"
    if query in ("world_size", "rank"):
        number = _as_index(value)
        if number is None:
            return False, None, f"malformed: returned {value!r} ({type(value).__name__}), not an int"
        if query == "world_size" and number <= 0:
            return False, None, f"returned {number}"
        if query == "rank" and number < 0:
            return False, None, f"returned {number} (not a member)"
        return True, number, ""
    if query == "group":
        if not _is_process_group(value):
            return False, None, f"malformed: returned {_short(value)}, not a process group"
        return True, value, ""
    try:
        items = list(value)
    except TypeError:
        return False, None, f"malformed: returned {_short(value)}, not a list of ranks"
    ranks = [_as_index(r) for r in items]
    if any(r is None for r in ranks) or isinstance(value, (str, bytes)):
        return False, None, f"malformed: returned {_short(value)}, not a list of integer ranks"
    if not ranks:
        return False, None, "returned an empty list"
    return True, ranks, ""


def _answer_from_group(query: str, group: Any) -> Any:
    """``query`` (world_size, rank or ranks) read from ``group`` through torch.distributed."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised")
    if query == "world_size":
        size = dist.get_world_size(group=group)
        if size <= 0:
            raise RuntimeError(f"group size {size}")
        return int(size)
    if query == "rank":
        rank = dist.get_rank(group=group)
        if rank < 0:
            raise RuntimeError("this rank is not a member of the group")
        return int(rank)
    return list(map(int, dist.get_process_group_ranks(group)))


def _layout_order(mpu: Any, flavour: str) -> Optional[str]:
    """The MPU's megatron order string when known: an ``order`` attribute, fixed by the
    flavour, or read from DeepSpeed's topology; else None."""
    order = getattr(mpu, "order", None)
    if isinstance(order, str) and order:
        return order
    if flavour in FIXED_ORDERS:
        return FIXED_ORDERS[flavour]
    if flavour == "deepspeed-pipe-grid" and _has(mpu, "topology"):
        try:
            axes = list(mpu.topology().get_axis_names())
        except Exception:
            return None
        if all(axis in _GRID_AXIS_TOKENS for axis in axes):
            # DeepSpeed's ProcessTopology varies its last axis fastest.
            tokens = [_GRID_AXIS_TOKENS[axis] for axis in reversed(axes)]
            return "-".join(tokens)
    return None


def _failure_error(flavour: str, dim: str, query: str, failure: _Failure) -> MpuError:
    """The MpuError for a query no candidate answered: every name tried and what it did."""
    what = f"{DIMENSION_DESCRIPTIONS[dim]} ({dim}) {query.replace('_', ' ')}"
    lines = "\n".join(_render_trail(failure.trail)) or "  (no candidates)"
    message = f"the MPU ({flavour}) cannot answer the {what}; tried:\n{lines}"
    if failure.uninitialised:
        message += (
            "\nThe MPU looks uninitialised (getters answered 0/None or asserted "
            "'not initialized'): call its initialize_model_parallel(...) before "
            "reading it."
        )
    else:
        message += (
            f"\nGive the MPU one of these names, or build the {dim} group another way."
        )
    return MpuError(message)


class MpuReader:
    """Answers world size, rank, group and group ranks for each dimension of an MPU.

    ``mpu`` is a module or an object. ``flavour`` overrides detection (one of
    :data:`FLAVOURS`). Nothing is cached: every answer comes from the MPU when asked,
    except inside :meth:`snapshot`.

    Example::

        >>> reader = MpuReader(parallel_state)                      # doctest: +SKIP
        >>> reader.sizes()                                           # doctest: +SKIP
        MpuSizes(tp=2, pp=2, dp=2, cp=1, ep=1, etp=2, order=None, flavour='megatron-core')
    """

    def __init__(self, mpu: object, *, flavour: Optional[str] = None) -> None:
        if mpu is None:
            raise MpuError("no MPU given: pass megatron.core.parallel_state, an mpu module or object")
        if flavour is not None and flavour not in FLAVOURS:
            raise MpuError(f"unknown MPU flavour {flavour!r}; valid flavours: {', '.join(FLAVOURS)}")
        self.mpu: Any = mpu
        self.flavour: str = flavour or detect_flavour(mpu)
        self.is_ulysses: bool = _has(mpu, "initialize_sequence_parallel")
        self._table = NAME_TABLES[self.flavour]
        self._aliases = ALIASES[self.flavour]
        self._memo: Optional[Dict[Tuple[str, Tuple[Tuple[str, Any], ...]], Tuple[bool, Any, str]]] = None
        # Inside a snapshot: (dim, query) -> (resolved, (answer, source) or the _Failure).
        self._resolved: Optional[Dict[Tuple[str, str], Tuple[bool, Any]]] = None
        logger.debug("reading MPU %r as flavour %s", mpu, self.flavour)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator["MpuReader"]:
        """Within the block, each MPU getter is called once and each query resolved once,
        and the answers reused.

        For reading many answers from an MPU that does not change meanwhile (the
        bridge's attach). Nests; answers are forgotten when the outermost block ends.
        Example: ``with reader.snapshot(): sizes = reader.sizes()``.
        """
        outer = self._memo
        if outer is None:
            self._memo, self._resolved = {}, {}
        try:
            yield self
        finally:
            if outer is None:
                self._memo = self._resolved = None

    def __repr__(self) -> str:
        return f"MpuReader(flavour={self.flavour!r}, mpu={self.mpu!r})"

    # -- public queries ----------------------------------------------------------

    def has(self, dim: str, query: str = "world_size") -> bool:
        """Whether the MPU answers ``query`` for ``dim`` now (resolvable and initialised)."""
        self._check(dim, query)
        try:
            self._resolve(dim, query, ())
        except _Failure:
            return False
        return True

    def world_size(self, dim: str) -> int:
        """Size of this rank's ``dim`` group. Raises :class:`MpuError` if unanswerable."""
        return self._answer(dim, "world_size")

    def rank(self, dim: str) -> int:
        """This rank's index in its ``dim`` group. Raises :class:`MpuError` if unanswerable."""
        return self._answer(dim, "rank")

    def group(self, dim: str) -> Any:
        """This rank's ``dim`` process group. Raises :class:`MpuError` if unanswerable."""
        return self._answer(dim, "group")

    def group_ranks(self, dim: str) -> List[int]:
        """Global ranks of this rank's ``dim`` group, in the MPU's order.

        From the MPU's ranks getter when it has one, else
        ``torch.distributed.get_process_group_ranks(group)``.
        """
        return list(self._answer(dim, "ranks"))

    def source(self, dim: str, query: str) -> str:
        """Which getter (or derivation) answers ``query`` for ``dim``, e.g.
        ``"get_data_parallel_group(with_context_parallel=True)"``."""
        self._check(dim, query)
        try:
            return self._resolve(dim, query, ())[1]
        except _Failure as failure:
            raise self._error(dim, query, failure) from None

    def tried(self, dim: str, query: str = "world_size") -> List[str]:
        """Every name (and derivation) the reader tries for ``query`` on ``dim``, in order."""
        self._check(dim, query)
        return self._plan(dim, query, ())

    def sizes(self) -> MpuSizes:
        """The MPU's sizes (see :class:`MpuSizes`); raises :class:`MpuError` when the MPU
        has names for a dimension but they do not answer (e.g. uninitialised)."""
        tp = self._size_or_one("tp")
        pp = self._size_or_one("pp")
        cp = self._size_or_one("cp")
        dp = self._optional_size("dp")
        if dp is None:
            sdp = self._optional_size("sdp")
            if sdp is not None:
                if sdp % cp:
                    raise MpuError(
                        f"the MPU's sequence-data-parallel size {sdp} is not divisible by its "
                        f"sequence-parallel size {cp} ({self.flavour})"
                    )
                dp = sdp // cp
        ep = self._optional_size("ep")
        etp = self._optional_size("etp") if ep is not None else None
        gtp = self._size_or_one("gtp")
        egtp = self._size_or_one("egtp") if ep is not None else 1
        return MpuSizes(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, etp=etp, order=self._order(), flavour=self.flavour,
                        gtp=gtp, egtp=egtp)

    def check_against_world(self, world_size: int, rank: int, rank_offset: int = 0) -> None:
        """Raise :class:`MpuError` with the numbers when the MPU contradicts the world, or the
        rank span of ``world_size`` ranks from ``rank_offset`` (see
        :func:`mpu_bridge.mpu.checks.check_against_world`)."""
        checks.check_against_world(self, world_size, rank, rank_offset)

    # -- internals -----------------------------------------------------------------

    def _check(self, dim: str, query: str) -> None:
        if dim not in ALL_DIMENSIONS:
            raise MpuError(
                f"unknown dimension {dim!r}; valid dimensions: {', '.join(ALL_DIMENSIONS)}"
            )
        if query not in QUERIES:
            raise MpuError(f"unknown query {query!r}; valid queries: {', '.join(QUERIES)}")

    def _answer(self, dim: str, query: str) -> Any:
        self._check(dim, query)
        try:
            return self._resolve(dim, query, ())[0]
        except _Failure as failure:
            raise self._error(dim, query, failure) from None

    def _error(self, dim: str, query: str, failure: _Failure) -> MpuError:
        return _failure_error(self.flavour, dim, query, failure)

    def _plan(self, dim: str, query: str, seen: Tuple[str, ...]) -> List[str]:
        names = [getter.render() for getter in self._table.get((dim, query), ())]
        if query != "group":
            names.append(f"derived from the {dim} group")
            names.extend(f"    {name}" for name in self._plan(dim, "group", seen + (dim,)))
        for alias in self._aliases.get(dim, ()):
            if alias.target in seen:
                continue
            names.append(alias.render())
            names.extend(f"    {name}" for name in self._plan(alias.target, query, seen + (dim,)))
        return names

    def _condition(self, when: Optional[Condition]) -> Tuple[bool, str, bool]:
        """(holds, why not, the MPU looked uninitialised while checking)."""
        if when is None:
            return True, "", False
        subject, op, value = when
        if subject == "absent":
            return (not _has(self.mpu, op)), f"{op} is present", False
        try:
            size = self._size_or_one(subject)
        except MpuError as exc:
            return False, f"{subject} size unknown", "uninitialised" in str(exc)
        ok = size == value if op == "==" else size > value
        return ok, f"{subject} = {size}", False

    def _call(self, getter: Getter) -> Tuple[bool, Any, str]:
        """Returns (called, value, note)."""
        memo = self._memo
        if memo is None:
            return self._call_now(getter)
        try:
            key = (getter.name, getter.kwargs)
            hash(key)
        except TypeError:
            return self._call_now(getter)
        if key not in memo:
            memo[key] = self._call_now(getter)
        return memo[key]

    def _call_now(self, getter: Getter) -> Tuple[bool, Any, str]:
        return _call_getter(self.mpu, self.flavour, getter)

    _validate = staticmethod(_validate_answer)

    def _resolve(self, dim: str, query: str, seen: Tuple[str, ...]) -> Tuple[Any, str]:
        """(answer, source) of ``query`` for ``dim``; raises _Failure. Inside a snapshot,
        a top-level resolution is made once (its answer, or its failure, reused)."""
        resolved = self._resolved
        if seen or resolved is None:
            return self._resolve_now(dim, query, seen)
        if (dim, query) not in resolved:
            try:
                resolved[dim, query] = (True, self._resolve_now(dim, query, seen))
            except _Failure as failure:
                resolved[dim, query] = (False, failure)
        ok, result = resolved[dim, query]
        if not ok:
            raise result
        return result

    def _resolve_now(self, dim: str, query: str, seen: Tuple[str, ...]) -> Tuple[Any, str]:
        trail: List[str] = []
        uninitialised = False
        for getter in self._table.get((dim, query), ()):
            ok, why, uninit = self._condition(getter.when)
            uninitialised = uninitialised or uninit
            if not ok:
                trail.append(f"{getter.render()}: skipped ({why})")
                continue
            called, value, note = self._call(getter)
            if called and not note:
                valid, value, note = self._validate(query, value)
                if valid:
                    return value, getter.render()
                if note.startswith("malformed: "):
                    raise MpuError(
                        f"the MPU ({self.flavour}) answered {getter.render()} with a malformed value: "
                        f"{getter.render()}: {note[len('malformed: '):]}"
                    )
                if note.startswith("returned 0") or note == "returned None":
                    uninitialised = True
            elif called and any(word in note.lower() for word in _UNINIT_WORDS):
                uninitialised = True
            trail.append(f"{getter.render()}: {note}")
        if query != "group":
            try:
                group, group_source = self._resolve(dim, "group", seen + (dim,))
            except _Failure as failure:
                trail.append(f"derived from the {dim} group: no group")
                trail.extend(f"    {entry}" for entry in failure.trail)
                uninitialised = uninitialised or failure.uninitialised
            else:
                try:
                    value = self._from_group(query, group)
                except Exception as exc:
                    trail.append(
                        f"derived from the {dim} group ({group_source}): "
                        f"{type(exc).__name__}: {exc}"
                    )
                else:
                    return value, f"{query} of {group_source}"
        for alias in self._aliases.get(dim, ()):
            if alias.target in seen:
                continue
            ok, why, uninit = self._condition(alias.when)
            uninitialised = uninitialised or uninit
            if not ok:
                trail.append(f"{alias.render()}: skipped ({why})")
                continue
            try:
                value, source = self._resolve(alias.target, query, seen + (dim,))
            except _Failure as failure:
                trail.append(f"{alias.render()}: not answered either")
                trail.extend(f"    {entry}" for entry in failure.trail)
                uninitialised = uninitialised or failure.uninitialised
            else:
                return value, f"{source} ({dim} {alias.render()})"
        raise _Failure(trail, uninitialised)

    _from_group = staticmethod(_answer_from_group)

    def names_present(self, dim: str) -> bool:
        """Whether the MPU has any of the names in ``dim``'s own size or group candidates
        (initialised or not, whatever their conditions; aliases do not count).

        Example: True for ``"cp"`` on megatron-core (``get_context_parallel_*``) and on
        Megatron-DeepSpeed (``get_sequence_parallel_*``); False for ``"pp"`` on
        Megatron-LM 1.0.
        """
        self._check(dim, "world_size")
        return self._names_present(dim)

    def _names_present(self, dim: str) -> bool:
        for query in ("world_size", "group"):
            for getter in self._table.get((dim, query), ()):
                if _has(self.mpu, getter.name):
                    return True
        return False

    def _size_or_one(self, dim: str) -> int:
        """The MPU's size for ``dim``; 1 when it has no names for ``dim`` at all."""
        if not self._names_present(dim):
            return 1
        return self.world_size(dim)

    def _optional_size(self, dim: str) -> Optional[int]:
        """The MPU's size for ``dim``; None when it has no names (nor alias) for it."""
        if self._names_present(dim):
            return self.world_size(dim)
        for alias in self._aliases.get(dim, ()):
            ok, _, _ = self._condition(alias.when)
            if ok and self._names_present(alias.target):
                return self.world_size(dim)
        return None

    def _order(self) -> Optional[str]:
        return _layout_order(self.mpu, self.flavour)
