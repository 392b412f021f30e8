"""The one local launcher: run a function on several local ranks, each its own process.

``mpu-bridge selfcheck`` (when no torchrun started it), the test suite
(``tests/_multiproc.py``) and the benchmarks all start their ranks here.
:class:`LocalRanks` starts ``world_size`` processes that each call
``fn(rank, world_size, *args)`` and collects what they report;
:func:`run_ranks` is the strict form (results by rank, or the first rank's
exception raised in the caller).

Guarantees:

* Fresh ranks, imports paid once: the processes come from a ``forkserver`` that
  imported ``preload`` (torch, megatron-core, ...) once and never initialised it,
  so module-global state such as megatron-core's ``parallel_state`` starts empty in
  each; ``method="spawn"`` starts every rank from scratch instead. Each rank gets
  the caller's environment as it is at the call, plus ``MASTER_ADDR``,
  ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``.
* Free port, no race: the parent hosts the rendezvous ``TCPStore`` on port 0 (the
  kernel picks a free one) and the ranks connect to it as clients (``MASTER_PORT``).
* Never hangs: every run has a hard deadline (``timeout`` seconds, process start
  included). Ranks still running at the deadline, or ``grace_s`` seconds after
  another rank failed, are killed with the processes they started.
* Failures surface with their cause: a rank exception travels back pickled when it
  can be, with its traceback text; a rank that died without reporting is named
  with its exit code.
* The process group is destroyed in every rank before it exits.

``fn`` must be a module-level function (it is pickled by reference); its
arguments and result must be picklable. torch is imported only when ranks start.

Example::

    def _sum_of_ranks(rank, world_size):
        import torch, torch.distributed as dist
        t = torch.tensor([rank])
        dist.all_reduce(t)
        return int(t)

    run_ranks(_sum_of_ranks, 4)   # -> [6, 6, 6, 6]
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union, cast

if TYPE_CHECKING:  # pragma: no cover
    from multiprocessing.context import ForkServerContext, SpawnContext

__all__ = [
    "DEFAULT_PRELOAD",
    "Collected",
    "LocalRanks",
    "RankFailure",
    "RanksTimeout",
    "RemoteTraceback",
    "context",
    "raise_failure",
    "rank_main",
    "run_ranks",
    "stop",
]

LOCALHOST = "127.0.0.1"
#: Imported once by the fork server, inherited (uninitialised) by every rank.
DEFAULT_PRELOAD: Tuple[str, ...] = ("torch", "torch.distributed", "megatron.core.parallel_state")
#: How long a dead rank's report may still be in flight in the queue.
_LATE_REPORT_S = 1.0
_POLL_S = 0.2

#: What a rank that raised sends back: (pickled exception or None, ``Type: message``, traceback text).
RankError = Tuple[Optional[bytes], str, str]


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a rank process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class RankFailure(RuntimeError):
    """A rank raised an exception that could not be pickled, or its process died."""


class RanksTimeout(TimeoutError):
    """Some ranks had not finished when the deadline passed (they were killed)."""


def context(
    preload: Sequence[str] = DEFAULT_PRELOAD, method: str = "forkserver"
) -> Union["ForkServerContext", "SpawnContext"]:
    """Where ranks come from: a fork server that imported ``preload`` once, else ``spawn``.

    ``method`` other than ``"forkserver"``, or a platform without a fork server,
    gives ``spawn``. The preload list takes effect when the server starts (the first
    rank of this process); later lists are ignored by a running server.

    Example: ``context(("torch",)).Process(target=...)``.
    """
    if method == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


def free_port() -> int:
    """A TCP port that was free a moment ago (for a rank-hosted rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def host_store(timeout: float) -> Any:
    """The parent's rendezvous ``TCPStore`` on a kernel-chosen free port (``.port``)."""
    import torch.distributed as dist

    return dist.TCPStore(
        LOCALHOST,
        0,
        world_size=None,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )


def _rank_environment(rank: int, world_size: int, port: int) -> Dict[str, str]:
    return {
        "MASTER_ADDR": LOCALHOST,
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _init_process_group(backend: str, rank: int, world_size: int, port: int, timeout: float) -> None:
    import torch.distributed as dist

    wait = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(LOCALHOST, port, is_master=False, timeout=wait)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=wait)


def _error_report(exc: BaseException) -> RankError:
    text = traceback.format_exc()
    payload: Optional[bytes]
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)  # an exception that pickles but does not unpickle travels as text
    except Exception:
        payload = None
    return payload, f"{type(exc).__name__}: {exc}", text


def _destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from .. import _torch

            _torch.let_workers_retire()  # torch <= 2.7 can deadlock destroying gloo groups otherwise
            dist.destroy_process_group()
    except Exception:
        pass


def rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: Tuple[Any, ...],
    port: int,
    backend: Optional[str],
    env: Mapping[str, str],
    timeout: float,
    results: Any,
    caller_env: Mapping[str, str],
) -> None:
    """Entry point of one rank process: initialise, call ``fn``, report, tear down.

    Sets the environment (``caller_env``, the rank's variables, then ``env``);
    with a ``backend`` joins the store at ``port`` and initialises
    ``torch.distributed``; puts ``("ok", rank, value)`` or ``("error", rank,
    RankError)`` on ``results``; destroys the process group in any case.

    Example: ``ctx.Process(target=rank_main, args=(fn, 0, 2, (), port, "gloo", {}, 60.0, q, dict(os.environ)))``.
    """
    try:
        os.setpgid(0, 0)  # own process group, so the parent can stop helpers it spawns too
    except (AttributeError, OSError):
        pass
    os.environ.clear()  # the fork server's environment is the one it started with
    os.environ.update(caller_env)
    os.environ.update(_rank_environment(rank, world_size, port))
    os.environ.update(env)
    try:
        if backend is not None:
            _init_process_group(backend, rank, world_size, port, timeout)
        results.put(("ok", rank, fn(rank, world_size, *args)))
    except BaseException as exc:  # report everything, including SystemExit
        results.put(("error", rank, _error_report(exc)))
    finally:
        _destroy_process_group()


def _signal_group(proc: BaseProcess, sig: int) -> None:
    """Signal the process group a rank created for itself (pgid = its pid), if any."""
    pid = proc.pid
    if pid is None or not hasattr(os, "killpg"):
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def stop(processes: Sequence[BaseProcess]) -> None:
    """Terminate, then kill, every rank still alive (and the helpers it started).

    Example: ``stop(processes)`` in a ``finally`` after collecting results.
    """
    started = [proc for proc in processes if proc.pid is not None]
    for proc in started:
        if proc.is_alive():
            _signal_group(proc, signal.SIGTERM)
            proc.terminate()
    deadline = time.monotonic() + 3.0
    for proc in started:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in started:
        if proc.is_alive():
            _signal_group(proc, signal.SIGKILL)
            proc.kill()
            proc.join(2.0)


def raise_failure(rank: int, report: RankError, others: List[int]) -> None:
    """Raise ``rank``'s exception in the caller: its own type when it unpickles, else
    :class:`RankFailure`; the traceback text is chained as ``__cause__``.

    Example: ``raise_failure(1, report, [3])`` raises, noting "raised on rank 1 (ranks [3] also failed)".
    """
    payload, summary, text = report
    suffix = f" (ranks {others} also failed)" if others else ""
    exc: BaseException
    if payload is not None:
        exc = pickle.loads(payload)
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised on rank {rank}{suffix}")
    else:
        exc = RankFailure(f"rank {rank} raised {summary}{suffix}")
    raise exc from RemoteTraceback(f"rank {rank}:\n{text}")


@dataclass
class Collected:
    """What the ranks reported before collection ended.

    ``values``: rank -> what ``fn`` returned; ``errors``: rank -> its exception
    report; ``died``: rank -> exit code of a process that ended without reporting.
    ``first_failure`` is ``(what, rank)`` of the first failure (``"raised"``,
    ``"failed"`` for a value the ``failed`` predicate flags, ``"died"``).
    """

    world_size: int
    deadline: float
    values: Dict[int, Any] = field(default_factory=dict)
    errors: Dict[int, RankError] = field(default_factory=dict)
    died: Dict[int, Optional[int]] = field(default_factory=dict)
    first_failure: Optional[Tuple[str, int]] = None
    failed_at: Optional[float] = None

    def settled(self, rank: int) -> bool:
        """Whether ``rank`` reported or died."""
        return rank in self.values or rank in self.errors or rank in self.died

    def unfinished(self) -> List[int]:
        """Ranks that neither reported nor died (still running when collection ended)."""
        return [rank for rank in range(self.world_size) if not self.settled(rank)]

    def _fail(self, what: str, rank: int) -> None:
        if self.first_failure is None:
            self.first_failure = (what, rank)
            self.failed_at = time.monotonic()

    def record(self, message: Tuple[str, int, Any], failed: Callable[[Any], bool]) -> None:
        """Take one queue message ``(status, rank, value)``."""
        status, rank, value = message
        if status == "ok":
            self.values[rank] = value
            if failed(value):
                self._fail("failed", rank)
        else:
            self.errors[rank] = value
            self._fail("raised", rank)

    def record_death(self, rank: int, exitcode: Optional[int]) -> None:
        self.died[rank] = exitcode
        self._fail("died", rank)


def _never_failed(value: Any) -> bool:
    return False


class LocalRanks:
    """``world_size`` local processes running ``fn(rank, world_size, *args)``.

    A context manager: entering starts the parent's rendezvous store (``store``:
    default when ``backend`` is set; ``MASTER_PORT`` is then its port) and the
    processes; :meth:`collect` waits for their reports; leaving stops whatever still
    runs. ``backend`` None leaves ``torch.distributed`` to ``fn``. ``timeout``
    bounds everything from entering on.

    Example::

        with LocalRanks(fn, 4, (spec,), timeout=60, backend=None, store=True) as ranks:
            got = ranks.collect(grace_s=10)   # got.values, got.died, got.unfinished()
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        world_size: int,
        args: Tuple[Any, ...] = (),
        *,
        timeout: float,
        backend: Optional[str] = "gloo",
        store: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        method: str = "forkserver",
        name: str = "rank",
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.fn, self.world_size, self.args, self.timeout = fn, world_size, tuple(args), float(timeout)
        self.backend = backend
        self.hosts_store = backend is not None if store is None else bool(store)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.ctx = context(preload, method)
        self.name = name
        self.store: Any = None
        self.processes: List[BaseProcess] = []
        self.deadline = 0.0
        self._results: Any = None

    def __enter__(self) -> "LocalRanks":
        self.deadline = time.monotonic() + self.timeout
        self._results = self.ctx.Queue()
        try:
            if self.hosts_store:
                self.store = host_store(self.timeout)
                port = int(self.store.port)
            else:
                port = free_port()
            caller_env = dict(os.environ)
            self.processes = [
                self.ctx.Process(
                    target=rank_main,
                    args=(self.fn, rank, self.world_size, self.args, port, self.backend, self.env,
                          self.timeout, self._results, caller_env),
                    name=f"{self.name}-{rank}",
                    daemon=True,
                )
                for rank in range(self.world_size)
            ]
            for proc in self.processes:
                proc.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        stop(self.processes)
        if self._results is not None:
            self._results.close()
            self._results.join_thread()
        self.store = None

    def _next(self, wait: float) -> Optional[Tuple[str, int, Any]]:
        try:
            return cast(Tuple[str, int, Any], self._results.get(timeout=max(0.0, wait)))
        except queue_module.Empty:
            return None

    def _check_dead(self, got: Collected, failed: Callable[[Any], bool]) -> bool:
        """Record ranks that ended without reporting; True when one died."""
        died = False
        for rank, proc in enumerate(self.processes):
            if got.settled(rank) or proc.is_alive():
                continue
            late = self._next(_LATE_REPORT_S)  # a report may still be in flight from a process that just ended
            if late is not None:
                got.record(late, failed)
                continue
            got.record_death(rank, proc.exitcode)
            died = True
        return died

    def collect(
        self, *, grace_s: float, failed: Callable[[Any], bool] = _never_failed, stop_on_death: bool = False
    ) -> Collected:
        """Wait for every rank's report, at most until the deadline, or ``grace_s`` after
        the first failure (a rank raised, died, or returned a value ``failed`` flags);
        with ``stop_on_death``, return as soon as a rank died without reporting.

        Example: ``got = ranks.collect(grace_s=5.0)``; ``got.unfinished()`` were still running.
        """
        got = Collected(world_size=self.world_size, deadline=self.deadline)
        give_up_at = self.deadline
        while got.unfinished():
            now = time.monotonic()
            if now >= give_up_at:
                break
            message = self._next(min(_POLL_S, give_up_at - now))
            if message is not None:
                got.record(message, failed)
            elif self._check_dead(got, failed) and stop_on_death:
                break
            if got.failed_at is not None:
                give_up_at = min(self.deadline, got.failed_at + grace_s)
        return got

    def join(self, ranks: Sequence[int], most_s: float = 5.0) -> None:
        """Let ``ranks`` (which reported) exit on their own, up to ``most_s`` each and the deadline."""
        for rank in ranks:
            self.processes[rank].join(max(0.1, min(most_s, self.deadline - time.monotonic())))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: Optional[str] = "gloo",
    env: Optional[Mapping[str, str]] = None,
    preload: Sequence[str] = DEFAULT_PRELOAD,
    method: str = "forkserver",
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return results by rank.

    ``timeout`` bounds the whole run (process start included); ``backend`` is the
    ``torch.distributed`` backend each rank initialises through the parent's store
    (``None``: the rank does it, finding a free ``MASTER_PORT``); ``env`` adds
    environment variables in every rank. Raises the first rank's exception
    (original type when picklable, traceback chained) after the others had 5 s to
    report, :class:`RankFailure` for a rank that died without reporting,
    :class:`RanksTimeout` when the deadline passes. ``ValueError`` for a bad
    ``world_size`` or ``timeout``.

    Example: ``run_ranks(_my_rank_fn, 4, "tp=2")`` -> ``[r0, r1, r2, r3]``.
    """
    with LocalRanks(
        fn, world_size, args, timeout=timeout, backend=backend, env=env, preload=preload, method=method
    ) as ranks:
        got = ranks.collect(grace_s=5.0, stop_on_death=True)
        _raise_for(got, timeout)
        ranks.join(range(world_size))
        return [got.values[rank] for rank in range(world_size)]


def _raise_for(got: Collected, timeout: float) -> None:
    """The strict reading of ``got``: the first failure or the missing ranks, raised."""
    if got.first_failure is not None:
        what, rank = got.first_failure
        if what == "died":
            raise RankFailure(
                f"rank {rank} of {got.world_size} exited with code {got.died[rank]} "
                "without reporting a result (crashed, was killed, or could not "
                "unpickle fn: see its traceback on stderr)"
            )
        others = sorted(r for r in got.errors if r != rank)
        raise_failure(rank, got.errors[rank], others)
    missing = got.unfinished()
    if missing:
        raise RanksTimeout(
            f"ranks {missing} of {got.world_size} did not finish within {timeout:g} s; "
            "they were killed (a collective that not every rank joined?)"
        )
