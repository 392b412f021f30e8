"""A legacy ``mpu`` object over a :class:`~mpu_bridge.bridge.Bridge`, for DeepSpeed.

DeepSpeed's ``deepspeed.initialize(mpu=...)`` calls Megatron-LM-style getters
(``get_model_parallel_*`` meaning tensor × pipeline, ``get_data_parallel_*``,
``get_tensor_model_parallel_*`` …) and *probes* others with ``hasattr``:
``get_sequence_*`` names replace the data-parallel group ZeRO uses, and
``initialize_sequence_parallel`` switches it into Ulysses mode. So this adapter
offers exactly the names whose meaning the bridge can back *now*:

* always: model, tensor, pipeline (both spellings), slice and data getters;
* ``get_sequence_parallel_*`` / ``get_sequence_data_parallel_*`` while context
  parallelism is on (cp > 1, over an MPU or a standalone layout) or the MPU itself
  has those getters (Megatron-DeepSpeed, DeepSpeed's Ulysses MPU);
* ``initialize_sequence_parallel`` while the MPU is DeepSpeed's slim Ulysses MPU.

The surface is never decided at construction: every attribute lookup reads the
bridge's current state (:attr:`Bridge.state`, rebuilt when the MPU was
re-initialised), so an adapter taken before ``initialize_model_parallel(cp=2)``
grows the sequence getters afterwards, and loses them again at cp 1. Any other
name raises ``AttributeError``, as a plain module would.

Example::

    engine, *_ = deepspeed.initialize(model=model, mpu=bridge.as_legacy_mpu(), config=cfg)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from .errors import BridgeError
from .kinds import KIND_TABLE, KINDS, Kind

if TYPE_CHECKING:  # pragma: no cover
    from .state import State

__all__ = ["LegacyMpu", "legacy_names"]


class Bridge(Protocol):
    """What this adapter reads of a :class:`mpu_bridge.bridge.Bridge`; it never imports
    that module (the bridge imports this one), and it calls group methods by name."""

    rank: int

    @property
    def state(self) -> "State": ...

    def ranks(self, name: str, *, ep_size: Optional[int] = None) -> Tuple[int, ...]: ...


def _prefixes(kinds: Sequence[Kind]) -> Dict[str, str]:
    """Legacy getter prefix -> bridge method, from the kind table."""
    return {prefix: k.method for k in kinds for prefix in k.legacy if k.method}


# Prefix of the getter family -> the bridge method giving that group.
_ALWAYS = _prefixes([k for k in KIND_TABLE if k.method and k.name not in ("cp", "dp-cp")])
_SEQUENCE = _prefixes([KINDS["cp"], KINDS["dp-cp"]])
_ULYSSES_INIT = "initialize_sequence_parallel"
# The MPU's own DeepSpeed sequence getters: with them, the sequence names are offered at cp 1 too.
_OWN_SEQUENCE_GETTERS = ("get_sequence_parallel_group", "get_sequence_data_parallel_group")


# Each getter family: get_<prefix>_<part>.
_PARTS = ("world_size", "rank", "group", "group_ranks", "src_rank")


def _family(bridge: "Bridge", method: str, prefix: str) -> Dict[str, Callable[..., Any]]:
    """Sizes, ranks and rank lists are arithmetic (local); only ``get_*_group`` may be collective."""

    def ranks() -> Tuple[int, ...]:
        return bridge.ranks(method)

    answers: Dict[str, Callable[..., Any]] = {
        "world_size": lambda: len(ranks()),
        "rank": lambda: ranks().index(bridge.rank),
        "group": lambda: getattr(bridge, method)().group,
        "group_ranks": lambda: list(ranks()),
        "src_rank": lambda: ranks()[0],
    }
    return {f"get_{prefix}_{part}": answers[part] for part in _PARTS}


def _families(bridge: "Bridge", table: Dict[str, str]) -> Dict[str, Callable[..., Any]]:
    return {name: fn for prefix, method in table.items() for name, fn in _family(bridge, method, prefix).items()}


#: Every name whose presence depends on the bridge's state (the others are always there).
_CONDITIONAL = frozenset({f"get_{prefix}_{part}" for prefix in _SEQUENCE for part in _PARTS} | {_ULYSSES_INIT})


def _offers_sequence(state: "State") -> bool:
    """Context parallelism is on, or the MPU itself offers DeepSpeed's sequence getters."""
    if state.layout.config.cp > 1:
        return True
    return state.reader is not None and any(hasattr(state.reader.mpu, name) for name in _OWN_SEQUENCE_GETTERS)


def _conditional(state: "State", sequence: Dict[str, Callable[..., Any]]) -> Dict[str, Callable[..., Any]]:
    """The state-dependent part of the surface, for ``state``."""
    offered: Dict[str, Callable[..., Any]] = dict(sequence) if _offers_sequence(state) else {}
    if state.reader is not None and state.reader.is_ulysses:
        offered[_ULYSSES_INIT] = state.reader.mpu.initialize_sequence_parallel
    return offered


def _why_absent(name: str, state: "State") -> str:
    if name == _ULYSSES_INIT:
        return " (offered only while the MPU is DeepSpeed's Ulysses MPU)"
    return (
        f" (offered only while context parallelism is on or the MPU has its own sequence getters; "
        f"now cp={state.layout.config.cp})"
    )


def legacy_names(bridge: "Bridge") -> List[str]:
    """The names :class:`LegacyMpu` offers for ``bridge`` now (its current state), sorted."""
    return LegacyMpu(bridge)._names()


class LegacyMpu:
    """The Megatron-LM / DeepSpeed ``mpu`` surface, answered by a bridge.

    Every getter reads the bridge when called, so a bridge that creates a group
    lazily does so on DeepSpeed's first call (on every rank, in the same order);
    and which getters exist is read from the bridge's current state at each lookup
    (see the module docstring), never fixed when the adapter is made.
    """

    def __init__(self, bridge: "Bridge") -> None:
        # The getter functions read the bridge when called; which of them exist is not decided here.
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_always", _families(bridge, _ALWAYS))
        object.__setattr__(self, "_sequence", _families(bridge, _SEQUENCE))

    def _current(self) -> Dict[str, Callable[..., Any]]:
        """Every name offered now, from the bridge's current state (may rebuild it; local)."""
        state = object.__getattribute__(self, "_bridge").state
        return {**object.__getattribute__(self, "_always"),
                **_conditional(state, object.__getattribute__(self, "_sequence"))}

    def _names(self) -> List[str]:
        return sorted(self._current())

    def __getattr__(self, name: str) -> Any:
        always = object.__getattribute__(self, "_always")
        if name in always:
            return always[name]
        if name in _CONDITIONAL:  # only these read the state (a broken one raises its reason)
            state = object.__getattribute__(self, "_bridge").state
            offered = _conditional(state, object.__getattribute__(self, "_sequence"))
            if name in offered:
                return offered[name]
            raise AttributeError(
                f"{type(self).__name__} has no {name!r}{_why_absent(name, state)}; it offers "
                f"{', '.join(sorted({**always, **offered}))}"
            )
        raise AttributeError(f"{type(self).__name__} has no {name!r}; it offers {', '.join(self._listing())}")

    def _listing(self) -> List[str]:
        """The names for a message or ``dir()``: the current ones, or the fixed ones while the
        bridge cannot be read (its own error says why when a getter is called)."""
        try:
            return self._names()
        except BridgeError:
            return sorted(object.__getattribute__(self, "_always"))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    @property
    def bridge(self) -> "Bridge":
        """The bridge answering this adapter."""
        return object.__getattribute__(self, "_bridge")

    def __dir__(self) -> List[str]:
        return sorted(set(object.__dir__(self)) | set(self._listing()))

    def __repr__(self) -> str:
        return f"<LegacyMpu over {self.bridge!r}>"
