"""Local getters never wait behind another thread's collective request (issue 17, case 4).

A bridge's state is one immutable snapshot, swapped whole; sizes, rank lists and
answers already made are read from it without the bridge's lock. So while one thread
of a rank is inside ``expert_groups(2)`` waiting for a late rank (holding the lock for
the whole agreement round and creation), another thread of the same rank gets
``bridge.ranks(...)``, the legacy MPU's sizes and a data-parallel group it already
asked for at once -- the README promises they can be called on one rank for logging.

The scenario is ordered by events, not timed: rank 1 joins the collective only after
rank 0's reader thread says it has its answers (through a store client of the test's
own: a TCPStore client runs one request at a time, so the default store's client is
busy for as long as the collective thread waits on it, on every PyTorch). Had the
reader waited for the lock, rank 1 would wait for it until its store wait expires
(60 s), and rank 0 would see its collective finish *before* its reads.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict

from _multiproc import run_ranks

READERS_DONE = "test_getters_never_wait/readers_done"
STORE_WAIT_S = 60


def _lock_taken_by_another_thread(lock: Any, deadline_s: float = 30.0) -> bool:
    """Poll until ``lock`` is held by some other thread (a non-blocking acquire fails)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if lock.acquire(blocking=False):
            lock.release()
            time.sleep(0.01)
            continue
        return True
    return False


def _signals() -> Any:
    """A store client of the test's own on the launcher's rendezvous store."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_WAIT_S))


def _reader_and_collective(rank: int, world_size: int) -> Dict[str, Any]:
    from datetime import timedelta

    import mpu_bridge

    bridge = mpu_bridge.attach(None, agreement_timeout=STORE_WAIT_S * 2)  # dp = the world
    data_parallel = bridge.data_parallel()  # made once, collectively, before the test
    legacy = bridge.as_legacy_mpu()
    store = _signals()
    if rank == 1:  # the late rank: joins the collective only once rank 0's reads are done
        try:
            store.wait([READERS_DONE], timedelta(seconds=STORE_WAIT_S))
            told = True
        except Exception:
            told = False
        bridge.expert_groups(2)
        return {"told": told}

    collective_done = threading.Event()

    def collective() -> None:
        bridge.expert_groups(2)
        collective_done.set()

    worker = threading.Thread(target=collective)
    worker.start()
    inside = _lock_taken_by_another_thread(bridge._lock)
    reads = {
        "tp": bridge.ranks("tp"),
        "dp_size": legacy.get_data_parallel_world_size(),
        "dp_rank": legacy.get_data_parallel_rank(),
        "dp_group_same": bridge.data_parallel() is data_parallel,
        "layout_tp": bridge.layout.config.tp,
    }
    finished_first = not collective_done.is_set()
    store.set(READERS_DONE, "1")
    worker.join(timeout=STORE_WAIT_S * 3)
    return {"inside": inside, "reads": reads, "reads_before_collective": finished_first,
            "collective_done": collective_done.is_set()}


def test_local_getters_answer_while_another_thread_waits_in_a_collective():
    rank0, rank1 = run_ranks(_reader_and_collective, 2, timeout=STORE_WAIT_S * 4)
    assert rank0["inside"], "the collective thread never took the bridge's lock"
    assert rank0["reads"] == {
        "tp": (0,), "dp_size": 2, "dp_rank": 0, "dp_group_same": True, "layout_tp": 1,
    }
    assert rank0["reads_before_collective"], "a local getter waited for the other thread's collective"
    assert rank1["told"], "rank 0's reads never finished while its collective was waiting"
    assert rank0["collective_done"]
