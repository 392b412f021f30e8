"""Which Megatron rank order an MPU used, inferred from its own groups. Pure, no torch.

megatron-core's ``RankGenerator`` gives the group of a single dimension (tp, cp,
dp, pp in the dense grid; etp, ep, edp, pp in the expert grid) as an arithmetic
progression whose step is the product of the sizes of the dimensions before it
in the order string. So the steps of one rank's own groups sort the dimensions
of each grid; the two grids share one order string, and a topological merge of
the two sortings (ties broken by megatron-core's default order) is an order that
gives exactly those groups. Dimensions of size 1 do not change any group and go
where the default order puts them. The caller checks the result against every
group the MPU answers.

Example::

    >>> infer_order(8, {"tp": 2, "cp": 1, "dp": 2, "pp": 2}, {"tp": [0, 4], "dp": [0, 1]})
    'cp-ep-dp-tp-pp'
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..errors import MpuError
from ..layout import DEFAULT_ORDER, TOKENS

__all__ = ["infer_order", "step_of"]

#: Per grid: MPU dimension -> the grid's token. megatron-core requires both grids to
#: give the same pipeline groups, so the MPU's pp group places pp in both.
_GRID_TOKENS: Mapping[str, Mapping[str, str]] = {
    "dense": {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp"},
    "expert": {"etp": "tp", "ep": "ep", "edp": "dp", "pp": "pp"},
}
_DEFAULT_RANK = {token: i for i, token in enumerate(DEFAULT_ORDER.split("-"))}


def step_of(dim: str, ranks: Sequence[int]) -> int:
    """The common difference of ``ranks`` (sorted), or MpuError if they are not evenly spaced.

    Example: ``step_of("dp", [1, 3, 5, 7]) == 2``.
    """
    ordered = sorted(ranks)
    if len(ordered) < 2:
        raise MpuError(f"the MPU's {dim} group {list(ranks)} has fewer than 2 ranks; no step to read")
    step = ordered[1] - ordered[0]
    if step <= 0 or any(b - a != step for a, b in zip(ordered, ordered[1:])):
        raise MpuError(
            f"the MPU's {dim} group {list(ranks)} is not evenly spaced, so no Megatron rank order "
            "gives it; pass attach(mpu, order=...) if the MPU follows one, or check the MPU"
        )
    return step


def _grid_order(grid: str, groups: Mapping[str, Sequence[int]]) -> List[str]:
    """The tokens of one grid whose groups are known (size > 1), fastest first."""
    steps: Dict[str, Tuple[int, str]] = {}
    for dim, ranks in groups.items():
        token = _GRID_TOKENS[grid].get(dim)
        if token is None or len(ranks) < 2:
            continue
        steps[token] = (step_of(dim, ranks), dim)
    by_step: Dict[int, str] = {}
    for step, dim in steps.values():
        if step in by_step:
            raise MpuError(
                f"the MPU's {by_step[step]} and {dim} groups advance by the same step {step}, "
                "which no Megatron rank order does"
            )
        by_step[step] = dim
    return sorted(steps, key=lambda token: steps[token][0])


def infer_order(
    world_size: int, sizes: Mapping[str, Optional[int]], groups: Mapping[str, Sequence[int]]
) -> str:
    """The order string (``"tp-cp-ep-dp-pp"`` style) that gives this rank's ``groups``.

    ``sizes`` holds the MPU's sizes by dimension (tp, cp, dp, pp, and ep/etp when it
    has experts); ``groups`` this rank's group ranks by MPU dimension (tp, cp, dp,
    pp, ep, etp, edp -- any subset). Raises MpuError when the dense and expert
    groups need contradicting orders.
    """
    del world_size, sizes  # the groups carry everything; kept for the caller's clarity
    before: Dict[str, Set[str]] = {token: set() for token in TOKENS}
    for grid in ("dense", "expert"):
        chain = _grid_order(grid, groups)
        for a, b in zip(chain, chain[1:]):
            before[b].add(a)
    placed: List[str] = []
    left = set(TOKENS)
    while left:
        ready = [t for t in left if not (before[t] & left)]
        if not ready:
            raise MpuError(
                "the MPU's dense groups and expert groups need contradicting rank orders ("
                + "; ".join(f"{t} after {', '.join(sorted(before[t] & left))}" for t in sorted(left))
                + "); pass attach(mpu, order=...) if you know it"
            )
        token = min(ready, key=lambda t: _DEFAULT_RANK[t])
        placed.append(token)
        left.remove(token)
    return "-".join(placed)
