"""Benchmark: a HyperCommGrid's groups for a full dense layout at one rank of a large world:
megatron-core's ``grid.create_pg`` against ``mpu_bridge.attach(grid)`` + ``bridge.prepare``.

``HyperCommGrid.create_pg`` creates each group with ``new_subgroups_by_enumeration``: every
rank enters every group of the family (world / group size ``new_group`` calls per family).
The bridge plans the same layout from the grid's shape and dim names and creates only this
rank's group of each family (member-only, one communicator per rank set).

Both contenders make the groups over the same dims: tp, cp, dp, pp, dp-cp, tp-cp, tp-pp
(model parallel) and tp-dp-cp, for the grid ``[tp 8, cp 2, dp, pp 8]`` (dims in megatron-core's
default order), on the simulated rank ``world // 2 + 5`` of 16,384 and 131,072 ranks (PyTorch's
``fake`` backend: real group objects, simulated communication). Each (contender, size) runs
in a fresh process; imports, the bridge's once-per-process release check and the grid's
construction happen before the clock.
Columns: seconds (``time.perf_counter``, garbage collection paused), process groups created
on this rank. Target (PASS/FAIL): the bridge at least 100x faster at 131,072 ranks.

Usage: ``.venv/bin/python benchmarks/bench_grid.py [--ranks 16384 131072]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DIMS = [["tp"], ["cp"], ["dp"], ["pp"], ["cp", "dp"], ["tp", "cp"], ["tp", "pp"], ["tp", "cp", "dp"]]
KINDS = ["tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "mp", "tp-dp-cp"]
TP, CP, PP = 8, 2, 8
TARGET_X = 100.0


def _measure(contender: str, world: int) -> Dict[str, Any]:
    import torch.distributed as dist
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import mpu_bridge
    import mpu_bridge.support
    from mpu_bridge import bridge as _bridge_module  # noqa: F401 - imported before the clock

    rank = world // 2 + 5
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    grid = HyperCommGrid([TP, CP, world // (TP * CP * PP), PP], ["tp", "cp", "dp", "pp"])
    mpu_bridge.support.note_untested_releases()  # once per process, like the imports: before the clock
    before = len(dist.distributed_c10d._world.pg_map)
    gc.disable()
    start = time.perf_counter()
    if contender == "create_pg":
        for dims in DIMS:
            grid.create_pg(dims)
    else:
        bridge = mpu_bridge.attach(grid)
        bridge.prepare(KINDS)
    seconds = time.perf_counter() - start
    gc.enable()
    return {"seconds": seconds, "groups": len(dist.distributed_c10d._world.pg_map) - before}


def _run(contender: str, world: int) -> Dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--worker", contender, str(world)],
                         capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker[0], int(args.worker[1]))))
        return 0
    print(f"one simulated rank (fake backend); load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'ranks':>8} {'create_pg':>12} {'groups':>7} {'bridge':>10} {'groups':>7} {'speed-up':>9}  target")
    failed = False
    for world in args.ranks:
        grid, bridge = _run("create_pg", world), _run("bridge", world)
        ratio = grid["seconds"] / bridge["seconds"]
        verdict = ""
        if world >= 131072:
            verdict = f"{'PASS' if ratio >= TARGET_X else 'FAIL'} (>= {TARGET_X:g}x)"
            failed |= ratio < TARGET_X
        print(f"{world:>8} {grid['seconds']:>10.3f} s {grid['groups']:>7} {bridge['seconds']:>8.4f} s "
              f"{bridge['groups']:>7} {ratio:>8.0f}x  {verdict}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
