"""Multi-module trainers: megatron-core's ``MultiModuleProcessGroupCollection`` from several
bridges, and one module of it read back as an MPU.

A multi-module trainer (a vision encoder and a language model, colocated or on rank
spans of their own) gives each module a ``ProcessGroupCollection`` and hands the model a
``MultiModuleProcessGroupCollection`` (megatron-core >= 0.17): module name -> the
collection of the modules *this rank* runs, and which of them is the language model.

* :func:`multi_module_collection` builds it from one bridge per module, e.g. two rank
  spans (``attach(None, tp=1, local_world_size=8)`` and ``attach(None, tp=4, pp=2,
  rank_offset=8, local_world_size=56)``). Collective over the world: every rank passes
  the same modules in the same order (as every rank builds every module's grid in
  megatron-core); each rank gets the modules whose span holds it.
* :func:`module_collection` is what ``attach(multi, module="llm")`` reads: the module's
  collection, read like any collection (its span found from its groups, every group
  borrowed, nothing created).

Example (every rank)::

    encoder = mpu_bridge.attach(None, tp=1, local_world_size=8)
    llm = mpu_bridge.attach(None, tp=4, pp=2, rank_offset=8, local_world_size=56)
    multi = multi_module_collection({"encoder": encoder, "llm": llm}, language_model="llm")
    bridge = mpu_bridge.attach(multi, module="llm")      # on ranks 8..63
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

from .errors import BridgeError, MpuError, OutsideSpanError
from .optional import MissingDependencyError, require
from .validate import boolean

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["FIRST_RELEASE", "multi_collection_class", "is_multi_collection", "multi_module_collection",
           "module_collection"]

#: The first megatron-core release with ``MultiModuleProcessGroupCollection``.
FIRST_RELEASE = "0.17.0"


def multi_collection_class() -> Any:
    """megatron-core's ``MultiModuleProcessGroupCollection`` class; MissingDependencyError
    (a BridgeError) when megatron-core is missing or older than :data:`FIRST_RELEASE`."""
    require("megatron.core", package="megatron-core", extra="megatron", needed_for="multi_module_collection()")
    module = importlib.import_module("megatron.core.process_groups_config")
    cls = getattr(module, "MultiModuleProcessGroupCollection", None)
    if not isinstance(cls, type):
        raise MissingDependencyError(
            "this megatron-core has no MultiModuleProcessGroupCollection; it is first in megatron-core "
            f"{FIRST_RELEASE}: pip install 'megatron-core>={FIRST_RELEASE}'"
        )
    return cls


def is_multi_collection(obj: Any) -> bool:
    """Whether ``obj`` is megatron-core's ``MultiModuleProcessGroupCollection`` (by class,
    without importing megatron-core)."""
    cls = type(obj)
    return (
        cls.__name__ == "MultiModuleProcessGroupCollection"
        and cls.__module__.startswith("megatron.core")
        and dataclasses.is_dataclass(obj)
    )


def multi_module_collection(
    bridges: Mapping[str, "Bridge"], *, language_model: Optional[str] = None, all_gather: bool = False
) -> Any:
    """megatron-core's ``MultiModuleProcessGroupCollection`` of the modules this rank runs.

    ``bridges``: module name -> its bridge (a rank span, or the whole world for a
    colocated module), the same names in the same order on every rank. Collective:
    every rank makes every module's :meth:`~mpu_bridge.bridge.Bridge.process_group_collection`
    requests, and keeps the modules whose span holds it. ``language_model`` names the
    language model's module; None on ranks outside it, as megatron-core expects. Raises
    BridgeError for an empty mapping, an unknown ``language_model`` (on every rank, before
    any round), or a rank that runs none of the modules (after the rounds).

    Example: on rank 3 of an encoder on ranks 0..7 and an LLM on 8..63,
    ``multi_module_collection({"encoder": enc, "llm": llm}, language_model="llm").module_pgs``
    holds ``"encoder"`` only, and its ``language_model_module_name`` is None.
    """
    cls = multi_collection_class()
    if not isinstance(bridges, Mapping) or not bridges:
        raise BridgeError(f"bridges must be a non-empty mapping of module name -> bridge, got {bridges!r}")
    names = list(bridges)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise BridgeError(f"module names must be non-empty strings, got {bad!r}")
    if language_model is not None and language_model not in bridges:
        raise BridgeError(f"language_model {language_model!r} is not one of the modules {names}")
    with_ag = boolean("all_gather", all_gather, BridgeError)
    mine: Dict[str, Any] = {}
    for name in names:
        try:
            mine[name] = bridges[name].process_group_collection(all_gather=with_ag)
        except OutsideSpanError:
            continue  # took part in the module's rounds; runs none of its groups
    if not mine:
        rank = next(iter(bridges.values())).rank
        raise BridgeError(f"rank {rank} runs none of the modules {names}: every rank must be in some module's span")
    return cls(module_pgs=mine, language_model_module_name=language_model if language_model in mine else None)


def module_collection(multi: Any, module: Optional[str]) -> Any:
    """The ``ProcessGroupCollection`` of ``module`` in ``multi`` (what ``attach(multi,
    module=...)`` reads); MpuError naming the modules this rank runs when ``module`` is
    missing or not one of them."""
    held = vars(multi).get("module_pgs") or {}
    if module is None:
        raise MpuError(
            f"a MultiModuleProcessGroupCollection holds one collection per module ({', '.join(held)} on "
            "this rank): attach(multi, module=NAME) reads one of them"
        )
    if module not in held:
        raise MpuError(
            f"this rank runs no module {module!r}: its MultiModuleProcessGroupCollection holds "
            f"{', '.join(map(repr, held)) or 'none'}; attach the module this rank runs"
        )
    return held[module]
