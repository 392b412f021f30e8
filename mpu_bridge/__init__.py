"""mpu-bridge: the process groups of large-model training, derived from any Megatron MPU.

The planner (:func:`plan`) is pure arithmetic and imports no torch; ``attach`` and
``Bridge`` import torch on first use.

Example::

    layout = mpu_bridge.plan(64, tp=2, pp=2, ep=4)      # no processes needed
    bridge = mpu_bridge.attach(parallel_state)          # on every rank of a real job
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge, attach
    from .multi_module import multi_module_collection

from .errors import BridgeError, GroupCreationError, LayoutError, MpuError, OutsideSpanError, PlanMismatchError
from .layout import DEFAULT_ORDER, KINDS, Layout, ParallelConfig, RankGrid, plan

__version__ = "0.1.0"

__all__ = [
    "BridgeError",
    "GroupCreationError",
    "LayoutError",
    "MpuError",
    "OutsideSpanError",
    "PlanMismatchError",
    "DEFAULT_ORDER",
    "KINDS",
    "Layout",
    "ParallelConfig",
    "RankGrid",
    "plan",
    "__version__",
    "attach",
    "Bridge",
    "multi_module_collection",
]

_LAZY = {"attach": "bridge", "Bridge": "bridge", "multi_module_collection": "multi_module"}


def __getattr__(name: str) -> Any:
    """Import the torch-dependent parts only when they are asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpu_bridge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
