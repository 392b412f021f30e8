"""The two ways a self-check runs: ranks spawned here, or this process one rank of torchrun.

* :func:`run_spawned` starts the ranks through the package's one local launcher
  (:class:`~mpu_bridge.selfcheck.launch.LocalRanks`) and collects their results;
  a rank that never reports is named with its exit code or its last phase.
* :func:`run_launched` is one rank under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` set): it checks, puts its result in the default store, and
  rank 0 gathers every result from there and prints the report.

Example::

    collected, missing = run_spawned(SelfCheckConfig(nproc=4), 4)
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from ..errors import BridgeError, LayoutError
from .config import SelfCheckConfig, validate
from .launch import Collected, LocalRanks
from .rank import check_rank, destroy_default_group, fault_hook, last_phase, setup_rank_process, spawned_rank
from .report import format_report, write
from .results import RankResult

__all__ = ["launched", "run_launched", "run_spawned"]

_RESULT_KEY = "mpu_bridge/selfcheck/result"
#: After one rank fails or dies, the others get this long to report before they are killed.
_GRACE_AFTER_FAILURE_S = 10.0

Missing = Dict[int, str]


# -- spawned locally ---------------------------------------------------------------------


def _preload(config: SelfCheckConfig) -> List[str]:
    """What the fork server imports once for every rank."""
    megatron = ["megatron.core.parallel_state"] if config.with_megatron else []
    exports = ["megatron.core.process_groups_config", "torch.distributed.device_mesh"] if config.exports else []
    return ["torch", "torch.distributed", *megatron, *exports]


def _rank_failed(result: RankResult) -> bool:
    return result.error is not None


def _raised(rank: int, world_size: int, summary: str, text: str) -> RankResult:
    """The result of a rank whose entry point raised outside the check (it reports its own errors)."""
    return RankResult(
        rank=rank, world_size=world_size, error=summary, error_phase="start", error_traceback=text
    )


def _missing(got: Collected, store: Any, timeout: float) -> Missing:
    """Why each rank without a result has none: died, killed after another failed, or timed out."""
    missing: Missing = {
        rank: f"died with exit code {code} without reporting" for rank, code in got.died.items()
    }
    failure = None if got.first_failure is None else f"rank {got.first_failure[1]} {got.first_failure[0]}"
    for rank in got.unfinished():
        phase = last_phase(store, rank)
        where = f" (last phase: {phase})" if phase else " (before its first phase)"
        if failure is not None and time.monotonic() < got.deadline:
            missing[rank] = f"killed {_GRACE_AFTER_FAILURE_S:g} s after {failure}{where}"
        else:
            missing[rank] = f"did not finish within --timeout {timeout:g} s{where}; killed"
    return missing


def run_spawned(config: SelfCheckConfig, world_size: int) -> Tuple[Dict[int, RankResult], Missing]:
    """Start ``world_size`` local ranks; return results by rank, and the missing ranks with why.

    Never waits past ``config.timeout``; once a rank fails or dies, the others get
    10 s to report before they are killed.

    Example: ``collected, missing = run_spawned(SelfCheckConfig(), 2)``; ``missing == {}`` when all reported.
    """
    with LocalRanks(
        spawned_rank,
        world_size,
        (config, time.time()),
        timeout=config.timeout,
        backend=None,  # each rank initialises itself (backend choice, device binding, timed phases)
        store=True,
        preload=_preload(config),
        name="selfcheck-rank",
    ) as ranks:
        got = ranks.collect(grace_s=_GRACE_AFTER_FAILURE_S, failed=_rank_failed)
        collected: Dict[int, RankResult] = dict(got.values)
        for rank, (_, summary, text) in got.errors.items():
            collected[rank] = _raised(rank, world_size, summary, text)
        missing = _missing(got, ranks.store, config.timeout)
        ranks.join(sorted(collected))
    return collected, missing


# -- under torchrun ----------------------------------------------------------------------


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _launched_config(config: SelfCheckConfig, rank: int, world_size: int) -> bool:
    """Check the options against the launcher's world; False (message on rank 0) if they do not fit."""
    try:
        if config.nproc is not None and config.nproc != world_size:
            raise LayoutError(
                f"--nproc {config.nproc} was given, but the launcher started WORLD_SIZE={world_size} "
                "ranks; drop --nproc under torchrun (or unset RANK/WORLD_SIZE/MASTER_ADDR to spawn locally)"
            )
        validate(config, world_size)
    except BridgeError as error:
        if rank == 0:
            sys.stderr.write(f"mpu-bridge: error: {error}\n")
        return False
    return True


def run_launched(config: SelfCheckConfig) -> int:
    """This process is one rank of a torchrun job: check, gather on rank 0 through the store.

    Returns the exit status (0 pass, 1 fail, 2 bad options); rank 0 prints the report.

    Example: ``torchrun --nproc-per-node 4 -m mpu_bridge.selfcheck --ep 2`` ends here on every rank.
    """
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if not _launched_config(config, rank, world_size):
        return 2
    setup_rank_process(config.verbose)
    faulthandler.dump_traceback_later(config.timeout, exit=True)  # never hang past --timeout
    start = time.monotonic()
    import torch.distributed  # noqa: F401  (timed as this rank's "process start")

    imported = time.monotonic() - start
    hook = fault_hook(config, rank, world_size)
    result, store = check_rank(config, rank, world_size, local_rank, local_world_size, None, hook)
    result.phases["process start"] = imported
    try:
        return _report_launched(config, result, store, start)
    finally:
        faulthandler.cancel_dump_traceback_later()
        destroy_default_group()


def _report_launched(config: SelfCheckConfig, result: RankResult, store: Optional[Any], start: float) -> int:
    """Publish this rank's result; on rank 0 gather all and print the report. Returns the exit status."""
    if store is None:
        sys.stderr.write(f"mpu-bridge selfcheck: rank {result.rank}: {result.error}\n")
        return 1
    store.set(f"{_RESULT_KEY}/{result.rank}", pickle.dumps(result))
    if result.rank != 0:
        return 0 if result.passed else 1
    collected, missing = _gather_from_store(store, result.world_size, start + config.timeout)
    report, passed = format_report(
        config, result.world_size, collected, missing, time.monotonic() - start, launcher="torchrun"
    )
    write(report)
    return 0 if passed else 1


def _gather_from_store(store: Any, world_size: int, deadline: float) -> Tuple[Dict[int, RankResult], Missing]:
    """Every rank's published result, polling until ``deadline``; the rest with their last phase."""
    collected: Dict[int, RankResult] = {}
    pending = list(range(world_size))
    while pending and time.monotonic() < deadline:
        still = []
        for rank in pending:
            key = f"{_RESULT_KEY}/{rank}"
            if store.check([key]):
                collected[rank] = pickle.loads(store.get(key))
            else:
                still.append(rank)
        pending = still
        if pending:
            time.sleep(0.1)
    missing = {}
    for rank in pending:
        phase = last_phase(store, rank)
        missing[rank] = "did not report before --timeout" + (f" (last phase: {phase})" if phase else "")
    return collected, missing
