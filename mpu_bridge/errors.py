"""Exception types of mpu-bridge.

Every error the library raises on bad input derives from :class:`BridgeError`,
and every message names the numbers involved and what would fix them. None of
the validation uses ``assert``, so it holds under ``python -O``.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "LayoutError",
    "MpuError",
    "PlanMismatchError",
    "GroupCreationError",
    "OutsideSpanError",
]


class BridgeError(Exception):
    """Base class of every error raised by mpu-bridge."""


class LayoutError(BridgeError, ValueError):
    """Parallel sizes, an order string, a rank or a group kind that cannot form a layout.

    Example: ``plan(12, tp=2, pp=4)`` raises ``LayoutError("world size 12 is not
    divisible by tp·pp·cp = 8 (tp=2, pp=4, cp=1) ...")``.
    """


class MpuError(BridgeError):
    """An MPU that lacks a needed query, or whose answers contradict the world."""


class PlanMismatchError(BridgeError):
    """Ranks disagree about which process groups to create (raised on every rank)."""


class GroupCreationError(BridgeError):
    """A process group could not be created, or the ranks did not all arrive in time."""


class OutsideSpanError(BridgeError):
    """This rank is outside the rank span of a bridge's layout (one module of a
    multi-module trainer), so that bridge holds no group for it."""
