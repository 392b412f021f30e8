"""mpu-bridge: the process groups of large-model training, derived from any Megatron MPU.

The planner (:func:`plan`) is pure arithmetic and imports no torch.
"""

from __future__ import annotations

from .errors import BridgeError, GroupCreationError, LayoutError, MpuError, PlanMismatchError
from .layout import DEFAULT_ORDER, KINDS, Layout, ParallelConfig, RankGrid, plan

__version__ = "0.1.0"

__all__ = [
    "BridgeError",
    "GroupCreationError",
    "LayoutError",
    "MpuError",
    "PlanMismatchError",
    "DEFAULT_ORDER",
    "KINDS",
    "Layout",
    "ParallelConfig",
    "RankGrid",
    "plan",
    "__version__",
]
