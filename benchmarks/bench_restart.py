"""Restarts without leaks: PyTorch's live groups over repeated Megatron init/destroy cycles.

In-process restart re-initialises Megatron in a live world; megatron-core's
``destroy_model_parallel`` does not destroy its groups (Megatron-LM #6897: ``pg_map``
24 -> 134 over 6 cycles). Each of ``--ranks`` gloo processes runs ``--cycles`` cycles of

    megatron-core init -> attach -> derived groups + ProcessGroupCollection + DeviceMesh
    -> bridge.close() -> destroy_model_parallel

in one world, and counts ``pg_map`` (PyTorch's live groups) after each step. The table
shows, per cycle, what megatron-core left behind and what the bridge left behind
(groups it created and did not destroy on ``close()``). Target: the bridge's growth is
0 in every cycle, on every rank (PASS/FAIL, exit status 1 on FAIL). megatron-core's
growth is printed beside it; it is not ours to fix.

Run: ``.venv/bin/python benchmarks/bench_restart.py [--ranks 8] [--cycles 6]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIZES = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
             expert_tensor_parallel_size=1, create_gloo_process_groups=False)


def _pg_count() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _cycles(rank: int, world_size: int, cycles: int) -> List[Dict[str, int]]:
    import warnings

    import mpu_bridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as ps

    rows = []
    for _ in range(cycles):
        start = _pg_count()
        ps.initialize_model_parallel(**SIZES)
        after_megatron = _pg_count()
        bridge = mpu_bridge.attach(ps, gpus_per_node=2, agreement_timeout=120)
        bridge.zero_param_groups(2)
        bridge.all_to_all_groups()
        bridge.expert_groups(4, expert_tensor_parallel=False)
        bridge.process_group_collection()
        bridge.device_mesh()
        created = bridge.stats()["created"]
        bridge.close()
        bridge_left = _pg_count() - after_megatron
        ps.destroy_model_parallel()
        rows.append({"start": start, "megatron_created": after_megatron - start, "bridge_created": created,
                     "bridge_left": bridge_left, "megatron_left": _pg_count() - start})
    return rows


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=6)
    args = parser.parse_args(argv)
    from mpu_bridge.selfcheck.launch import run_ranks

    per_rank = run_ranks(_cycles, args.ranks, args.cycles, timeout=600, backend="gloo")
    print(f"{args.ranks} gloo ranks, megatron-core tp2 pp2 ep2 etp1; pg_map = PyTorch's live groups (rank 0)")
    print(f"{'cycle':>5}  {'pg_map at start':>15}  {'megatron made':>13}  {'megatron left':>13}  "
          f"{'bridge made':>11}  {'bridge left':>11}")
    for cycle, row in enumerate(per_rank[0], 1):
        print(f"{cycle:>5}  {row['start']:>15}  {row['megatron_created']:>13}  {row['megatron_left']:>13}  "
              f"{row['bridge_created']:>11}  {row['bridge_left']:>11}")
    worst = max(row["bridge_left"] for rows in per_rank for row in rows)
    grown = per_rank[0][-1]["start"] + per_rank[0][-1]["megatron_left"] - per_rank[0][0]["start"]
    print(f"megatron-core: pg_map grew by {grown} over {args.cycles} cycles on rank 0")
    verdict = "PASS" if worst == 0 else "FAIL"
    print(f"{verdict}: the bridge left {worst} groups behind in the worst cycle on any rank (target 0)")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
