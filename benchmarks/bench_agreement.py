"""What the cross-rank agreement costs: store operations per rank and one round at 16,384 and
131,072 simulated ranks, beside PyTorch's own store-based barrier through the same server.

Every first-time group request agrees through the default store (``verify_plan=True``,
the default on real backends). This measures:

* the store operations of each rank in one round where every rank agrees, and in one
  where a fact differs (the counting round runs too), counted exactly over 8 ranks;
* the wall time of one round of N simulated ranks against a real ``TCPStore`` served by
  this process: ``--clients`` processes each play a slice of the ranks, first joining
  the round for each of its ranks (operations 1-2), then finishing it (3-4; the last to
  arrive first). Every operation goes through the one store server, as in a real job,
  so the time is the server's serialized work plus the clients' round trips;
* the same for PyTorch's ``_store_based_barrier`` operation sequence (add, add, the last
  sets a key, wait), the cheapest thing any rank of a job does through that store;
* targets: one round in at most 1 s at 16,384 ranks and 10 s at 131,072 (PASS/FAIL), with
  the machine's load average printed beside them.

Why a store round cannot be much cheaper: a round must tell every rank, within a bounded
wait, both that every rank arrived and whether they all planned the same. Per rank that is
one write everyone can compare with, one arrival, one bounded wait and one read (a
``TCPStore`` wait returns no value); PyTorch's barrier needs the arrival and the wait
alone. Both are round trips to the one server, so the round costs about 4/3 of a barrier
plus the time the simulated clients spend; a target below the barrier's own time through
the same server is out of reach for any round that keeps the bounded wait.

Run: ``.venv/bin/python benchmarks/bench_agreement.py [--ranks 16384 131072] [--clients 2]``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# What a registry batch with member-only creation publishes (facts; the grouped salt follows from them).
FACTS = {"reuse": "0", "seq": "0", "naming": "1", "apart": "1", "fresh": "1", "salt": "3"}
GROUP_SIZE = 8
TARGETS_S = {16384: 1.0, 131072: 10.0}


def grouped(rank: int) -> Dict[str, Any]:
    """The batch's grouped fact: this rank's group (its smallest rank) and its salt."""
    return {"salt/0": (str(rank - rank % GROUP_SIZE), "3")}


class _Counting:
    """A store proxy that counts calls per thread (each thread plays one rank)."""

    def __init__(self, store: Any) -> None:
        self._store, self.calls, self._lock = store, {}, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                who = threading.current_thread().name
                self.calls[who] = self.calls.get(who, 0) + 1
            return attr(*args, **kwargs)

        return counted


def ops_per_rank(world: int = 8, differ: bool = False) -> List[int]:
    """Store operations of each of ``world`` ranks (threads) in one round, sorted."""
    import torch.distributed as dist

    from mpu_bridge.agreement import agree

    store = _Counting(dist.HashStore())

    def rank_main(rank: int) -> None:
        facts = dict(FACTS, seq=str(rank % 2)) if differ else FACTS
        agree(store, rank=rank, world_size=world, digest="d" * 40, summary="s", facts=facts, timeout=30,
              grouped=grouped(rank))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(store.calls.values())


def _agreement_client(port: int, ranks: List[int], world: int, namespace: str, out: Any) -> None:
    import torch.distributed as dist

    from mpu_bridge.agreement import _finish, _join, _Seat

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=900))
    start = time.perf_counter()
    seats = [_Seat(namespace, r, world, "d" * 40, "summary", FACTS, grouped(r), 900.0) for r in ranks]
    joined = [(seat, _join(store, seat)) for seat in seats]
    deadline = time.monotonic() + 900
    # The last to arrive writes the outcome; in one process it must go first.
    for seat, j in sorted(joined, key=lambda item: -(item[1].arrival % item[1].scale)):
        _finish(store, seat, j, deadline)
    out.put(time.perf_counter() - start)


def _barrier_client(port: int, ranks: List[int], world: int, namespace: str, out: Any) -> None:
    """PyTorch's ``_store_based_barrier`` sequence per rank: add, add (count), the last sets
    the key everyone waits for, wait."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=900))
    key, last = f"{namespace}/barrier", f"{namespace}/barrier:last_worker"
    start = time.perf_counter()
    for _ in ranks:
        store.add(key, 1)
        if int(store.add(key, 0)) == world:
            store.set(last, "1")
    for _ in ranks:
        store.wait([last], datetime.timedelta(seconds=900))
    out.put(time.perf_counter() - start)


def round_seconds(target: Any, world: int, clients: int) -> float:
    """Wall time of one round of ``world`` simulated ranks over ``clients`` processes."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=900))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    slices = [list(range(c, world, clients)) for c in range(clients)]
    namespace = f"bench/{time.time_ns()}"
    procs = [ctx.Process(target=target, args=(server.port, s, world, namespace, out)) for s in slices]
    for p in procs:
        p.start()
    times = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    same, differ = ops_per_rank(), ops_per_rank(differ=True)
    print(f"store operations per rank, one round of 8 ranks: every rank agrees {min(same)}-{max(same)} "
          f"(the last to arrive {min(same)}); a fact differs {min(differ)}-{max(differ)} "
          f"(with verify_plan=False: 0)")
    print(f"machine: {os.cpu_count()} cores, load average before {os.getloadavg()[0]:.2f}; "
          f"{args.clients} client processes playing the ranks, one TCPStore server")
    print(f"{'ranks':>8} {'agreement round':>16} {'store barrier':>14} {'ratio':>6} {'target':>7}  verdict  load")
    for world in args.ranks:
        ours = round_seconds(_agreement_client, world, args.clients)
        barrier = round_seconds(_barrier_client, world, args.clients)
        target = TARGETS_S.get(world)
        verdict = "-" if target is None else ("PASS" if ours <= target else "FAIL")
        print(f"{world:>8} {ours:>14.2f} s {barrier:>12.2f} s {ours / barrier:>6.2f} "
              f"{'-' if target is None else f'{target:g} s':>7}  {verdict:<7}  {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
