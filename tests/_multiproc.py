"""Run a function on several local ranks, each in its own process, and collect the results.

A thin front of the package's one local launcher, :mod:`mpu_bridge.selfcheck.launch`
(the self-check and the benchmarks start their ranks there too), with the test
suite's defaults.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh Python processes,
initialises ``torch.distributed`` in each with the given backend, calls
``fn(rank, world_size, *args)`` and returns the per-rank results as a list indexed
by rank. Module-global state such as megatron-core's ``parallel_state`` starts empty
in each: the processes come from a ``forkserver`` that imported torch and
megatron-core once (and never initialised them), so a rank does not pay those
imports again (``MPU_BRIDGE_TEST_START_METHOD=spawn`` starts every rank from
scratch instead). Each rank gets the caller's environment as it is at the call.

Guarantees:

* Free port, no race: the parent hosts the rendezvous ``TCPStore`` on port 0 (the
  kernel picks a free one) and the ranks connect to it as clients.
* Never hangs: every run has a hard deadline (``timeout`` seconds). Ranks still
  running at the deadline, or a few seconds after another rank failed, are killed.
* Failures surface with their cause: the first rank exception that arrives is
  re-raised in the parent with its original type when it can be pickled (so
  ``pytest.raises(MpuError)`` works across processes); its traceback text is chained
  as the ``__cause__`` and the message notes which rank raised it.
* The process group is destroyed in every rank before it exits.

``fn`` must be a module-level function (it is pickled by reference), and its
arguments and result must be picklable.

``backend=None`` skips the initialisation: each rank then finds ``MASTER_ADDR``,
``MASTER_PORT`` (a port that was free a moment ago), ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in its environment and sets up
``torch.distributed`` itself (e.g. through ``deepspeed.init_distributed``).

Example::

    def _sum_of_ranks(rank, world_size):
        import torch, torch.distributed as dist
        t = torch.tensor([rank])
        dist.all_reduce(t)
        return int(t)

    assert run_ranks(_sum_of_ranks, 4) == [6, 6, 6, 6]
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from mpu_bridge.selfcheck import launch
from mpu_bridge.selfcheck.launch import RankFailure, RanksTimeout, RemoteTraceback

__all__ = ["run_ranks", "RankFailure", "RanksTimeout", "RemoteTraceback"]

# Imported once by the fork server, inherited (uninitialised) by every rank.
_PRELOAD = launch.DEFAULT_PRELOAD

# The launcher's parts, under the names tests/test_faults.py builds its own world from.
_rank_main = launch.rank_main
_stop = launch.stop
_raise_failure = launch.raise_failure


def _start_method() -> str:
    return os.environ.get("MPU_BRIDGE_TEST_START_METHOD", "forkserver")


def _context() -> Any:
    """The multiprocessing context ranks start from (see the module docstring)."""
    return launch.context(_PRELOAD, _start_method())


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: Optional[str] = "gloo",
    env: Optional[Mapping[str, str]] = None,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank.

    ``timeout`` bounds the whole run (process start included); ``backend`` is the
    ``torch.distributed`` backend each rank initialises (``None``: the rank does it);
    ``env`` adds environment variables in every rank. Raises the first rank's
    exception (original type when picklable, traceback chained), ``RankFailure`` for a
    rank that died without reporting, ``RanksTimeout`` when the deadline passes.

    Example: ``run_ranks(_my_rank_fn, 4, "tp=2")`` -> ``[r0, r1, r2, r3]``.
    """
    return launch.run_ranks(
        fn, world_size, *args, timeout=timeout, backend=backend, env=env, preload=_PRELOAD, method=_start_method()
    )

