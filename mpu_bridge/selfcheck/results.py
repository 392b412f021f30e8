"""What a rank reports: plain data, pickled from the ranks to the process that prints the report.

No torch here.

Example::

    >>> RankResult(rank=0, world_size=2).passed   # no checks, no error
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["BORROWED", "CREATED", "PHASES", "REUSED", "GroupCheck", "RankResult"]

#: The phases timed on every rank, in report order.
PHASES: Tuple[str, ...] = (
    "process start",
    "init_process_group",
    "megatron import",
    "megatron init",
    "attach",
    "group creation",
    "exports",
    "collectives",
    "teardown",
)

# How the communicator of a group came about, per rank.
BORROWED = "borrowed"  # the MPU's own group, answered as is
REUSED = "reused"  # a derived query answered by a communicator that already existed
CREATED = "created"  # a new communicator
OUTSIDE = "outside span"  # a module's kind on a rank outside that module's rank span


@dataclass
class GroupCheck:
    """One rank's checks of its group of one kind.

    ``status`` is :data:`BORROWED`, :data:`REUSED` or :data:`CREATED`; ``planned``
    the expected members; ``same_as`` an earlier kind whose communicator this one
    is, on this rank. ``member`` is False where this rank is in no group of the kind
    (an exported field such as ``pos_embd`` off the first pipeline stage): then it
    runs no collective, and passes when the planner also puts it in none.

    Example: ``GroupCheck("world", (0, 1), CREATED, (0, 1), True).size == 2``.
    """

    label: str
    ranks: Tuple[int, ...]
    status: str
    planned: Tuple[int, ...]
    planner_ok: bool
    allreduce_ok: Optional[bool] = None
    allreduce_got: Optional[int] = None
    broadcast_ok: Optional[bool] = None
    broadcast_got: Optional[int] = None
    error: Optional[str] = None
    same_as: Optional[str] = None
    member: bool = True

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def passed(self) -> bool:
        if not self.member:
            return bool(self.planner_ok and self.error is None)
        return bool(self.planner_ok and self.allreduce_ok and self.broadcast_ok and self.error is None)


@dataclass
class RankResult:
    """Everything one rank reports: its checks, phase times, strategy and any error.

    Example: ``RankResult(rank=1, world_size=2, error="RuntimeError: x").passed is False``.
    """

    rank: int
    world_size: int
    backend: str = ""
    strategy: Optional[str] = None
    mpu: str = "standalone (no MPU)"
    stats: Dict[str, int] = field(default_factory=dict)
    phases: Dict[str, float] = field(default_factory=dict)
    checks: List[GroupCheck] = field(default_factory=list)
    error: Optional[str] = None
    error_phase: Optional[str] = None
    error_traceback: Optional[str] = None
    warnings: List[str] = field(default_factory=list)  # what mpu_bridge logged at WARNING, once each

    @property
    def passed(self) -> bool:
        return self.error is None and all(check.passed for check in self.checks)
