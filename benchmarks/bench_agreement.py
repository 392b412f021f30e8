"""What the cross-rank agreement costs: store operations per rank and one round at 16,384 ranks.

Every first-time group request agrees through the default store (``verify_plan=True``,
the default on real backends); ``verify_plan=False`` is the opt-out. This measures
what the opt-out saves:

* the store operations one rank makes in one successful round (counted, exact);
* the wall time of one round for 16,384 simulated ranks against a real ``TCPStore``
  served by this process: ``--clients`` processes each play a slice of the ranks,
  joining the round one rank after another, then settling and concluding it. All
  ranks' operations go through the one store server, as in a real job, so the time
  is the server's serialized work for a round (a real job's ranks do not wait for
  each other's client round trips, so this is an upper bound for the same server).

Run: ``.venv/bin/python benchmarks/bench_agreement.py [--ranks 16384] [--clients 2]``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# What a registry batch of one partition (groups of 8 ranks) publishes with member-only creation.
FACTS = {"reuse": "0", "seq": "0", "fresh": "1"}
GROUP_SIZE = 8


def grouped(rank: int) -> Dict[str, Any]:
    """The batch's grouped fact: this rank's group (its smallest rank) and its group count."""
    return {"held/0": (str(rank - rank % GROUP_SIZE), "3")}


class _Counting:
    """A store proxy that counts calls (for the per-rank operation count)."""

    def __init__(self, store: Any) -> None:
        self._store, self.calls = store, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


def ops_per_rank() -> int:
    """Store operations of one rank in a successful 1-rank round with the registry's facts."""
    import torch.distributed as dist

    from mpu_bridge.agreement import agree

    store = _Counting(dist.HashStore())
    agree(store, rank=0, world_size=1, digest="d" * 40, summary="s", facts=FACTS, timeout=10,
          grouped=grouped(0))
    return store.calls


def _client(port: int, ranks: List[int], world: int, namespace: str, out: Any) -> None:
    import torch.distributed as dist

    from mpu_bridge.agreement import _conclude, _join, _settle

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=600))
    start = time.perf_counter()
    seats = [_join(store, namespace, r, world, "d" * 40, "summary", FACTS, grouped(r)) for r in ranks]
    deadline = time.monotonic() + 600
    # The last to arrive settles the round; in one process it must go first.
    for seat, arrived in sorted(seats, key=lambda item: -item[1]):
        _conclude(store, seat, _settle(store, seat, arrived, deadline), 600.0)
    out.put(time.perf_counter() - start)


def round_seconds(world: int, clients: int) -> Dict[str, float]:
    """Wall time of one agreement round of ``world`` simulated ranks over ``clients`` processes."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=600))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    slices = [list(range(c, world, clients)) for c in range(clients)]
    namespace = f"bench/{time.time_ns()}"
    procs = [ctx.Process(target=_client, args=(server.port, s, world, namespace, out)) for s in slices]
    start = time.perf_counter()
    for p in procs:
        p.start()
    times = [out.get(timeout=900) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    return {"wall_s": wall, "slowest_client_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=16384)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    ops = ops_per_rank()
    print(f"store operations per rank in one successful round: {ops} for the group's first member, "
          f"{ops - 1} for the others (with verify_plan=False: 0)")
    result = round_seconds(args.ranks, args.clients)
    total = ops * args.ranks - args.ranks + args.ranks // GROUP_SIZE
    print(
        f"one round, {args.ranks} simulated ranks over {args.clients} client processes: "
        f"{result['wall_s']:.2f} s wall (slowest client {result['slowest_client_s']:.2f} s), "
        f"{total} store operations, {total / result['slowest_client_s']:.0f} ops/s through one TCPStore; "
        f"per first-time request (with verify_plan=False: 0 s)"
    )


if __name__ == "__main__":
    main()
