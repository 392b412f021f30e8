"""Run a function on several local ranks, each in its own process, and collect the results.

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

import datetime
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional

__all__ = ["run_ranks", "RankFailure", "RanksTimeout"]

_LOCALHOST = "127.0.0.1"
# After one rank fails, the others get this long to report before they are killed
# (they are often blocked in a collective the failed rank will never join).
_GRACE_AFTER_FAILURE_S = 5.0
# Imported once by the fork server, inherited (uninitialised) by every rank.
_PRELOAD = ("torch", "torch.distributed", "megatron.core.parallel_state")


def _context() -> Any:
    method = os.environ.get("MPU_BRIDGE_TEST_START_METHOD", "forkserver")
    if method == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))  # takes effect when the server starts
        return ctx
    return multiprocessing.get_context("spawn")


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    port: int,
    backend: Optional[str],
    env: Mapping[str, str],
    timeout: float,
    results: "multiprocessing.Queue[Any]",
    caller_env: Mapping[str, str],
) -> None:
    """Entry point of one rank process: initialise, call ``fn``, report, tear down."""
    try:
        os.setpgid(0, 0)  # own process group, so the parent can stop helpers it spawns too
    except (AttributeError, OSError):
        pass
    os.environ.clear()  # the fork server's environment is the one it started with
    os.environ.update(caller_env)
    os.environ.update(
        {
            "MASTER_ADDR": _LOCALHOST,
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    os.environ.update(env)
    dist = None
    try:
        if backend is not None:
            import torch.distributed as dist

            store = dist.TCPStore(
                _LOCALHOST,
                port,
                is_master=False,
                timeout=datetime.timedelta(seconds=timeout),
            )
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        value = fn(rank, world_size, *args)
        results.put(("ok", rank, value))
    except BaseException as exc:  # report everything, including SystemExit
        text = traceback.format_exc()
        try:
            payload: Optional[bytes] = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = None
        results.put(("error", rank, (payload, f"{type(exc).__name__}: {exc}", text)))
    finally:
        try:
            if dist is None:
                import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _signal_group(proc: multiprocessing.process.BaseProcess, sig: int) -> None:
    """Signal the process group a rank created for itself (pgid = its pid), if any."""
    pid = proc.pid
    if pid is None or not hasattr(os, "killpg"):
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _stop(processes: List[multiprocessing.process.BaseProcess]) -> None:
    """Terminate, then kill, every rank still alive (and the helpers it started)."""
    for proc in processes:
        if proc.is_alive():
            _signal_group(proc, signal.SIGTERM)
            proc.terminate()
    deadline = time.monotonic() + 3.0
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            _signal_group(proc, signal.SIGKILL)
            proc.kill()
            proc.join(2.0)


def _raise_failure(rank: int, report: tuple, others: List[int]) -> None:
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
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    ctx = _context()
    results = ctx.Queue()
    store = None
    if backend is not None:
        import torch.distributed as dist

        # The parent hosts the rendezvous store on a kernel-chosen free port.
        store = dist.TCPStore(
            _LOCALHOST,
            0,
            world_size=None,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )
        port = int(store.port)
    else:
        port = _free_port()
    env_vars: Dict[str, str] = {str(k): str(v) for k, v in (env or {}).items()}
    processes = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, args, port, backend, env_vars, timeout, results, dict(os.environ)),
            name=f"rank-{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    values: Dict[int, Any] = {}
    failures: Dict[int, tuple] = {}
    first_failure: Optional[int] = None
    try:
        for proc in processes:
            proc.start()
        failure_deadline = None
        while len(values) + len(failures) < world_size:
            now = time.monotonic()
            limit = deadline if failure_deadline is None else min(deadline, failure_deadline)
            if now >= limit:
                break
            try:
                status, rank, value = results.get(timeout=min(0.2, limit - now))
            except queue_module.Empty:
                reported = set(values) | set(failures)
                dead = [
                    r for r, p in enumerate(processes)
                    if r not in reported and not p.is_alive()
                ]
                if dead:
                    # A dead process may still have a report in flight in the queue.
                    try:
                        status, rank, value = results.get(timeout=1.0)
                    except queue_module.Empty:
                        code = processes[dead[0]].exitcode
                        raise RankFailure(
                            f"rank {dead[0]} of {world_size} exited with code {code} "
                            "without reporting a result (crashed, was killed, or could not "
                            "unpickle fn: see its traceback on stderr)"
                        ) from None
                else:
                    continue
            if status == "ok":
                values[rank] = value
            else:
                failures[rank] = value
                if first_failure is None:
                    first_failure = rank
                    failure_deadline = time.monotonic() + _GRACE_AFTER_FAILURE_S
        if first_failure is not None:
            others = sorted(r for r in failures if r != first_failure)
            _raise_failure(first_failure, failures[first_failure], others)
        if len(values) < world_size:
            missing = [r for r in range(world_size) if r not in values]
            raise RanksTimeout(
                f"ranks {missing} of {world_size} did not finish within {timeout:g} s; "
                "they were killed (a collective that not every rank joined?)"
            )
        for proc in processes:
            proc.join(max(0.1, min(5.0, deadline - time.monotonic())))
        return [values[rank] for rank in range(world_size)]
    finally:
        _stop(processes)
        results.close()
        results.join_thread()
        del store
