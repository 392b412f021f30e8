"""The two ways a self-check runs: ranks spawned here, or this process one rank of torchrun.

* :func:`run_spawned` starts the ranks through the package's one local launcher
  (:class:`~mpu_bridge.selfcheck.launch.LocalRanks`) and collects their results;
  a rank that never reports is named with its exit code or its last phase.
* :func:`run_launched` is one rank under ``torchrun`` or any launcher (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` set): it joins the rendezvous store, checks (in a
  thread, so the run can end at ``--timeout`` whatever torch call a missing rank
  leaves it blocked in), puts its result in the store, and rank 0 gathers every
  result from there and prints the report, naming each rank that did not report
  and why (``never joined``: nothing from it ever reached the store).

Example::

    collected, missing = run_spawned(SelfCheckConfig(nproc=4), 4)
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import BridgeError, LayoutError
from .config import SelfCheckConfig, validate
from .launch import Collected, LocalRanks
from .rank import check_rank, destroy_default_group, fault_hook, last_phase, setup_rank_process, spawned_rank
from .report import NEVER_JOINED, format_report, write
from .results import RankResult

__all__ = ["launched", "run_launched", "run_spawned"]

_RESULT_KEY = "mpu_bridge/selfcheck/result"
#: Rank 0 sets it once its report is out; a rank still blocked then leaves.
_REPORTED_KEY = "mpu_bridge/selfcheck/reported"
#: A blocked rank sets ``<key>/<rank>`` as it leaves; rank 0, hosting the store, waits for it.
_LEFT_KEY = "mpu_bridge/selfcheck/left"
#: How long the end of a launched run waits on the other side (the report, the blocked ranks leaving).
_LEAVE_S = 3.0
#: Past --timeout, the process-level watchdog dumps the threads and exits: only if the orderly end hangs.
_WATCHDOG_MARGIN_S = 15.0
#: The check's own timeouts (torch's, the agreement's) run this much past --timeout, so that the
#: run's deadline, not a torch timeout racing it, decides how a blocked rank ends.
_CHECK_TIMEOUT_MARGIN_S = 10.0
_POLL_S = 0.1
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


# -- under torchrun (or any launcher) ---------------------------------------------------------


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


class _Deadline:
    """The end of a launched run: ``--timeout`` after it started, or the launcher's SIGTERM."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.start = time.monotonic()
        self.at = self.start + timeout
        self.signalled = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def passed(self) -> bool:
        return self.signalled or time.monotonic() >= self.at

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def why(self) -> str:
        """What a rank that had not finished missed: ``within --timeout 20 s``, or the launcher's stop."""
        return "before the launcher stopped the run (SIGTERM)" if self.signalled else (
            f"within --timeout {self.timeout:g} s"
        )

    def when(self) -> str:
        """When the run ended: ``at --timeout 20 s``, or on the launcher's stop."""
        return "when the launcher stopped the run (SIGTERM)" if self.signalled else f"at --timeout {self.timeout:g} s"

    def on_sigterm(self) -> Callable[[], None]:
        """Make the launcher's SIGTERM (torchrun stopping the ranks after one died) end the wait,
        so rank 0 still reports; returns what restores the previous handler."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
            return lambda: None

        def stopped(signum: int, frame: Any) -> None:
            del signum, frame
            self.signalled = True

        previous = signal.signal(signal.SIGTERM, stopped)

        def restore() -> None:
            signal.signal(signal.SIGTERM, previous)

        return restore


def _store_address() -> Tuple[str, int]:
    address, port = os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT", "")
    try:
        return address, int(port)
    except ValueError:
        raise LayoutError(
            f"MASTER_PORT must be the rendezvous port (an integer), got {port!r}: set it as the launcher does"
        ) from None


def _hosted_here(rank: int) -> bool:
    """Whether this rank hosts the rendezvous store: rank 0, unless the launcher's agent hosts it
    (torchrun says so in ``TORCHELASTIC_USE_AGENT_STORE``, the same rule as torch's env:// rendezvous)."""
    return rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True)


def _join_store(rank: int, world_size: int, deadline: _Deadline) -> Tuple[Any, Any]:
    """Two connections to the launcher's rendezvous store (``MASTER_ADDR:MASTER_PORT``): one for
    this rank's check, one for the run's own bookkeeping (a TCPStore connection serves one call at
    a time, and the check's may sit in a wait that only its timeout ends). Joined without waiting
    for the other ranks: who is missing is for the run to find out, not for the store to hang on.
    Raises LayoutError with one line when the store cannot be reached in time."""
    import torch.distributed as dist

    address, port = _store_address()
    host = _hosted_here(rank)
    try:
        if not host:
            _wait_for_listener(address, port, deadline)
        own = dist.TCPStore(
            address, port, world_size, host, timeout=datetime.timedelta(seconds=max(deadline.left(), 1.0)),
            wait_for_workers=False,
        )
        check = dist.TCPStore(address, port, world_size, False,
                              timeout=datetime.timedelta(seconds=deadline.timeout + _CHECK_TIMEOUT_MARGIN_S))
    except Exception as exc:
        who = "rank 0 hosts it: was rank 0 started?" if not host and _hosted_here(0) else "the launcher hosts it"
        doing = "open" if host else "reach"
        first = (str(exc).splitlines() or [""])[0]
        raise LayoutError(
            f"rank {rank} could not {doing} the rendezvous store at {address}:{port} within --timeout "
            f"{deadline.timeout:g} s ({who}): {type(exc).__name__}: {first}"
        ) from None
    return own, check


def _wait_for_listener(address: str, port: int, deadline: _Deadline) -> None:
    """Until something listens at ``address:port`` (or the deadline: ConnectionError), with plain
    sockets: torch's own store client logs every failed try with a C++ stack on stderr."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(1.0, deadline.left()))):
                return
        except OSError as exc:
            if deadline.passed():
                raise ConnectionError(f"nothing listens there ({exc})") from None
            time.sleep(min(_POLL_S * 5, deadline.left()))


def _check_in_background(
    config: SelfCheckConfig, rank: int, world_size: int, stores: Tuple[Any, Any], deadline: _Deadline
) -> Optional[RankResult]:
    """Run this rank's check in a thread, so that the wait can end: the result, or None when the
    check had not finished by the deadline (a missing rank leaves the others blocked in torch
    calls that only their own timeouts end) or, on a rank but 0, when rank 0 has reported."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    hook = fault_hook(config, rank, world_size)
    store, check_store = stores
    later = replace(config, timeout=config.timeout + _CHECK_TIMEOUT_MARGIN_S)
    box: Dict[str, RankResult] = {}

    def check() -> None:
        box["result"], _ = check_rank(later, rank, world_size, local_rank, local_world_size, check_store, hook)

    worker = threading.Thread(target=check, name=f"mpu-bridge-selfcheck-rank-{rank}", daemon=True)
    worker.start()
    while worker.is_alive() and not deadline.passed() and not (rank != 0 and _has(store, _REPORTED_KEY)):
        worker.join(_POLL_S)
    return None if worker.is_alive() else box.get("result")


def _has(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:  # the store went with the rank that hosted it
        return False


def run_launched(config: SelfCheckConfig) -> int:
    """This process is one rank of a torchrun job: check, gather on rank 0 through the store.

    Returns the exit status (0 pass, 1 fail, 2 bad options); rank 0 prints the report. The
    check runs in a thread, and the run ends at ``--timeout`` (or the launcher's SIGTERM)
    whatever it is blocked in: rank 0 then reports what it has, naming every rank that did
    not report and why (``never joined`` for a rank that never reached the store), and a
    rank stuck in a torch call leaves with one line on stderr.

    Example: ``torchrun --nproc-per-node 4 -m mpu_bridge.selfcheck --ep 2`` ends here on every rank.
    """
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if not _launched_config(config, rank, world_size):
        return 2
    setup_rank_process(config.verbose)
    deadline = _Deadline(config.timeout)
    restore = deadline.on_sigterm()
    try:
        import torch.distributed  # noqa: F401  (timed as this rank's "process start")

        imported = deadline.elapsed()
        if deadline.passed():
            sys.stderr.write(f"mpu-bridge selfcheck: rank {rank} stopped {deadline.when()}: importing torch "
                             f"took {imported:.1f} s; give a longer --timeout\n")
            return 1
        # the last resort, should the orderly end itself hang: a thread dump, never a silent hang
        faulthandler.dump_traceback_later(deadline.left() + _WATCHDOG_MARGIN_S, exit=True)
        try:
            stores = _join_store(rank, world_size, deadline)
        except BridgeError as error:
            sys.stderr.write(f"mpu-bridge selfcheck: {error}\n")
            return 1
        store = stores[0]
        result = _check_in_background(config, rank, world_size, stores, deadline)
        if result is not None:
            result.phases["process start"] = imported
            store.set(f"{_RESULT_KEY}/{rank}", pickle.dumps(result))
        if rank == 0:
            status = _report_launched(config, store, world_size, deadline)
        elif result is None:
            _leave_stuck(store, rank, deadline)
            status = 1
        else:
            status = 0 if result.passed else 1
        if result is None:  # its check is blocked in torch: nothing can end that thread
            _exit_now(status)
        _end_rank(status)
        return status  # not reached: _end_rank leaves the process
    finally:
        faulthandler.cancel_dump_traceback_later()
        restore()


def _leave_stuck(store: Any, rank: int, deadline: _Deadline) -> None:
    """A rank whose check is still blocked: wait (a little past the deadline) for rank 0's report,
    then say so in one line and mark it left, so rank 0 can close the store."""
    wait_until = time.monotonic() + _LEAVE_S
    while not deadline.signalled and not _has(store, _REPORTED_KEY) and time.monotonic() < wait_until:
        time.sleep(_POLL_S)
    phase = last_phase(store, rank)
    sys.stderr.write(
        f"mpu-bridge selfcheck: rank {rank} stopped {deadline.when()}, still in "
        f"{phase or 'its first phase'} (rank 0's report says which rank held it up)\n"
    )
    try:
        store.set(f"{_LEFT_KEY}/{rank}", "1")
    except Exception:
        pass


def _end_rank(status: int) -> None:
    """Destroy the default group, then leave with ``status`` and no group destructor run.

    PyTorch up to 2.7 can deadlock when a gloo group's last reference goes while one of
    its worker threads still retires a collective and needs the GIL (pytorch/pytorch#154976;
    seen here on torch 2.6 under load, in ``destroy_process_group``'s own clean-up). Every
    group stays referenced until :func:`_exit_now`, which skips interpreter finalization:
    nothing is left to run after the report but PyTorch's clean-up, and the process ends anyway.
    """
    from .. import _torch

    groups = _torch.live_groups() if _torch.default_group() is not None else []
    _torch.let_workers_retire()
    destroy_default_group()
    _exit_now(status, keep_alive=groups)


def _exit_now(status: int, keep_alive: Sequence[Any] = ()) -> None:
    """Leave now, with stdout and stderr flushed: a thread blocked in a torch call cannot be
    stopped, and interpreter shutdown (torch's own exit handlers) could wait on it.
    ``keep_alive``: objects referenced until the process is gone (their destructors never run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _report_launched(config: SelfCheckConfig, store: Any, world_size: int, deadline: _Deadline) -> int:
    """Rank 0: gather every published result until the deadline, print the report, let the
    ranks still blocked leave. Returns the exit status."""
    collected, missing = _gather_from_store(store, world_size, deadline)
    report, passed = format_report(
        config, world_size, collected, missing, deadline.elapsed(), launcher="torchrun"
    )
    write(report)
    try:
        store.set(_REPORTED_KEY, "1")
    except Exception:
        pass
    stuck = [r for r, why in missing.items() if r != 0 and not why.startswith(NEVER_JOINED)]
    wait_until = time.monotonic() + _LEAVE_S
    while stuck and time.monotonic() < wait_until:  # they hold clients of the store this rank hosts
        stuck = [r for r in stuck if not _has(store, f"{_LEFT_KEY}/{r}")]
        time.sleep(_POLL_S)
    return 0 if passed else 1


def _gather_from_store(store: Any, world_size: int, deadline: _Deadline) -> Tuple[Dict[int, RankResult], Missing]:
    """Every rank's published result, polling until ``deadline`` -- or, once a rank reported a
    failure, 10 s after it, as the spawned run does; the rest with their last phase, or, for a rank
    with none, that it never joined."""
    collected: Dict[int, RankResult] = {}
    pending = list(range(world_size))
    failed: Optional[Tuple[int, float]] = None  # (rank, when)
    while pending:
        still = []
        for rank in pending:
            key = f"{_RESULT_KEY}/{rank}"
            if _has(store, key):
                collected[rank] = pickle.loads(store.get(key))
                if failed is None and collected[rank].error is not None:
                    failed = (rank, time.monotonic())
            else:
                still.append(rank)
        pending = still
        cut = failed is not None and time.monotonic() >= failed[1] + _GRACE_AFTER_FAILURE_S
        if not pending or deadline.passed() or cut:
            break
        time.sleep(_POLL_S)
    cut = failed is not None and not deadline.passed()
    why = f"within {_GRACE_AFTER_FAILURE_S:g} s after rank {failed[0]} failed" if cut and failed else deadline.why()
    missing = {}
    for rank in pending:
        phase = last_phase(store, rank)
        if phase is None:
            missing[rank] = (
                f"{NEVER_JOINED}: nothing from it reached the rendezvous store {why}; was it "
                f"started (RANK={rank}, WORLD_SIZE={world_size}, the same MASTER_ADDR and MASTER_PORT)?"
            )
        else:
            missing[rank] = f"did not finish {why} (last phase: {phase})"
    return collected, missing
