"""Plan a layout with no processes: which ranks share which group, and what crosses nodes.

Run it anywhere, with no torch and no GPU (``pip install --no-deps mpu-bridge`` is enough)::

    python examples/plan_session.py

The planner answers with megatron-core's rank arithmetic (the same lists, in the same
order, as its ``RankGenerator``) at any world size, without starting a process.
"""

from __future__ import annotations

import mpu_bridge

# 64 ranks on 8 nodes of 8 GPUs: tensor parallel 2, pipeline parallel 2, expert parallel 4.
layout = mpu_bridge.plan(64, tp=2, pp=2, ep=4, gpus_per_node=8)
print(f"64 ranks, tp 2, pp 2, ep 4: dp {layout.config.dp}, expert dp {layout.config.edp}")
for kind in ("tp", "pp", "dp", "ep", "edp"):
    where = "inside one node" if layout.intra_node(kind) else "across nodes"
    print(
        f"  {kind:>3}: {layout.num_groups(kind):2} groups of {layout.size(kind):2} ranks, {where}; "
        f"rank 37's: {layout.group_of(kind, 37)}"
    )

# The same questions at 65,536 ranks: arithmetic, nothing is enumerated.
big = mpu_bridge.plan(65536, tp=8, pp=4, ep=8, gpus_per_node=8)
ep_group = big.group_of("ep", 40_000)
print(
    f"65,536 ranks, tp 8, pp 4, ep 8: rank 40000's expert-parallel group is {ep_group} "
    f"({'inside one node' if big.intra_node('ep') else 'across nodes'}); "
    f"its data-parallel group has {big.size('dp')} ranks, from {big.group_of('dp', 40_000)[:3]} on"
)

# A layout that cannot exist says why, before any job is launched.
try:
    mpu_bridge.plan(4, tp=2, pp=2, ep=4)
except mpu_bridge.LayoutError as error:
    print(f"4 ranks, tp 2, pp 2, ep 4: LayoutError: {error}")
