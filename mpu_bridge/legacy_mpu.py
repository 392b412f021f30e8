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

from typing import TYPE_CHECKING, Any, Callable, Dict, List

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge, GroupInfo
    from .mpu import MpuReader

__all__ = ["LegacyMpu", "legacy_names"]

# Prefix of the getter family -> the bridge method giving that group.
_ALWAYS = {
    "model_parallel": "model_parallel",
    "tensor_model_parallel": "tensor_parallel",
    "pipeline_model_parallel": "pipeline_parallel",
    "pipe_parallel": "pipeline_parallel",
    "slice_parallel": "tensor_parallel",
    "data_parallel": "data_parallel",
}
_SEQUENCE = {
    "sequence_parallel": "sequence_parallel",
    "sequence_data_parallel": "sequence_data_parallel",
}


def _family(info: Callable[[], "GroupInfo"], prefix: str) -> Dict[str, Callable[..., Any]]:
    return {
        f"get_{prefix}_world_size": lambda: info().world_size,
        f"get_{prefix}_rank": lambda: info().rank,
        f"get_{prefix}_group": lambda: info().group,
        f"get_{prefix}_group_ranks": lambda: list(info().ranks),
        f"get_{prefix}_src_rank": lambda: info().src_rank,
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
            functions.update(_family(getattr(bridge, method), prefix))
        reader = bridge.reader
        if reader is not None and _has_sequence_parallelism(reader):
            for prefix, method in _SEQUENCE.items():
                functions.update(_family(getattr(bridge, method), prefix))
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

    def __dir__(self) -> List[str]:
        return sorted(set(object.__dir__(self)) | set(self._functions))

    def __repr__(self) -> str:
        return f"<LegacyMpu over {self._bridge!r}>"
