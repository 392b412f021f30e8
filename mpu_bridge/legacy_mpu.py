"""A legacy ``mpu`` object over a :class:`~mpu_bridge.bridge.Bridge`, for DeepSpeed.

DeepSpeed's ``deepspeed.initialize(mpu=...)`` calls Megatron-LM-style getters
(``get_model_parallel_*`` meaning tensor × pipeline, ``get_data_parallel_*``,
``get_tensor_model_parallel_*`` …) and *probes* others with ``hasattr``:
``get_sequence_*`` names replace the data-parallel group ZeRO uses, and
``initialize_sequence_parallel`` switches it into Ulysses mode. So this adapter
offers exactly the names whose meaning the bridge can back:

* always: model, tensor, pipeline (both spellings), slice and data getters;
* ``get_sequence_parallel_*`` / ``get_sequence_data_parallel_*`` only when
  context parallelism is on (cp > 1) or the MPU itself has those getters
  (Megatron-DeepSpeed, DeepSpeed's Ulysses MPU);
* ``initialize_sequence_parallel`` only when the MPU is DeepSpeed's slim Ulysses MPU.

Any other name raises ``AttributeError``, as a plain module would.

Example::

    engine, *_ = deepspeed.initialize(model=model, mpu=bridge.as_legacy_mpu(), config=cfg)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from .kinds import KIND_TABLE, KINDS, Kind
from .mpu import MpuReader

__all__ = ["LegacyMpu", "legacy_names"]


class Bridge(Protocol):
    """What this adapter reads of a :class:`mpu_bridge.bridge.Bridge`; it never imports
    that module (the bridge imports this one), and it calls group methods by name."""

    rank: int

    @property
    def reader(self) -> Optional[MpuReader]: ...

    def ranks(self, name: str, *, ep_size: Optional[int] = None) -> Tuple[int, ...]: ...


def _prefixes(kinds: Sequence[Kind]) -> Dict[str, str]:
    """Legacy getter prefix -> bridge method, from the kind table."""
    return {prefix: k.method for k in kinds for prefix in k.legacy if k.method}


# Prefix of the getter family -> the bridge method giving that group.
_ALWAYS = _prefixes([k for k in KIND_TABLE if k.method and k.name not in ("cp", "dp-cp")])
_SEQUENCE = _prefixes([KINDS["cp"], KINDS["dp-cp"]])


def _family(bridge: "Bridge", method: str, prefix: str) -> Dict[str, Callable[..., Any]]:
    """Sizes, ranks and rank lists are arithmetic (local); only ``get_*_group`` may be collective."""

    def ranks() -> Tuple[int, ...]:
        return bridge.ranks(method)

    return {
        f"get_{prefix}_world_size": lambda: len(ranks()),
        f"get_{prefix}_rank": lambda: ranks().index(bridge.rank),
        f"get_{prefix}_group": lambda: getattr(bridge, method)().group,
        f"get_{prefix}_group_ranks": lambda: list(ranks()),
        f"get_{prefix}_src_rank": lambda: ranks()[0],
    }


def _has_sequence_parallelism(reader: "MpuReader") -> bool:
    """Context parallelism is on, or the MPU itself offers DeepSpeed's sequence getters."""
    own = ("get_sequence_parallel_group", "get_sequence_data_parallel_group")
    return reader.sizes().cp > 1 or any(hasattr(reader.mpu, name) for name in own)


def legacy_names(bridge: "Bridge") -> List[str]:
    """The names :class:`LegacyMpu` offers for ``bridge``, sorted."""
    return sorted(LegacyMpu(bridge)._functions)


class LegacyMpu:
    """The Megatron-LM / DeepSpeed ``mpu`` surface, answered by a bridge.

    Every getter reads the bridge when called, so a bridge that creates a group
    lazily does so on DeepSpeed's first call (on every rank, in the same order).
    """

    def __init__(self, bridge: "Bridge") -> None:
        functions: Dict[str, Callable[..., Any]] = {}
        for prefix, method in _ALWAYS.items():
            functions.update(_family(bridge, method, prefix))
        reader = bridge.reader
        if reader is not None and _has_sequence_parallelism(reader):
            for prefix, method in _SEQUENCE.items():
                functions.update(_family(bridge, method, prefix))
        if reader is not None and reader.is_ulysses:
            functions["initialize_sequence_parallel"] = reader.mpu.initialize_sequence_parallel
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_functions", functions)

    def __getattr__(self, name: str) -> Any:
        functions = object.__getattribute__(self, "_functions")
        try:
            return functions[name]
        except KeyError:
            raise AttributeError(
                f"{type(self).__name__} has no {name!r}; it offers {', '.join(sorted(functions))}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    @property
    def bridge(self) -> "Bridge":
        """The bridge answering this adapter."""
        return object.__getattribute__(self, "_bridge")

    def __dir__(self) -> List[str]:
        return sorted(set(object.__dir__(self)) | set(self._functions))

    def __repr__(self) -> str:
        return f"<LegacyMpu over {self._bridge!r}>"
