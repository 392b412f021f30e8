"""``mpu-bridge selfcheck`` under a launcher, with a rank missing: a report, never a thread dump.

Under a launcher (torchrun, srun, mpirun, or ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
set by hand) each process is one rank and rank 0 prints the report. A rank that never starts
used to leave the others blocked in torch's rendezvous until the watchdog killed them with a
raw ``faulthandler`` dump ("Timeout (0:00:10)!" and torch's rendezvous stack), no report and no
word of which rank was missing; a rank that died made torchrun stop rank 0 before it reported.
Now the run ends like the spawned one: rank 0's report names the rank ("rank 3 never joined")
and ends with one FAIL line, every rank exits non-zero, and no rank prints a traceback.

The missing-rank runs start 3 of 4 ranks by hand, as a launcher would, each a
``python -m mpu_bridge.selfcheck``-equivalent process (torch imported before the run starts,
so ``--timeout`` measures the run, not a loaded machine's imports); the launcher runs use
``python -m torch.distributed.run`` itself.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

import pytest

from mpu_bridge.selfcheck import RankResult, SelfCheckConfig, format_report

ROOT = Path(__file__).resolve().parents[1]
#: The run's --timeout for the runs that must wait it out (a rank that never comes).
SHORT_TIMEOUT_S = 20
#: The run's --timeout where the run should end well before it.
LONG_TIMEOUT_S = 300
#: What a rank process runs: the self-check's command, with torch imported first.
_RANK_MAIN = "import torch.distributed; from mpu_bridge.selfcheck import main; raise SystemExit(main())"
#: What no rank may print: the watchdog's thread dump, a Python traceback, torch's C++ stack.
_RAW = ("Timeout (", "Thread 0x", "Traceback (most recent call last)", "frame #", "Current thread 0x")


class Rank(NamedTuple):
    rank: int
    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(name, None)
    env.update(extra)
    return env


def _by_hand(ranks: Sequence[int], world_size: int, *args: str) -> List[Rank]:
    """Start ``ranks`` of a ``world_size`` world as a launcher would (env), wait for all."""
    port = str(_free_port())
    procs = []
    for rank in ranks:
        env = _env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_MAIN, "--backend", "gloo", *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    out = []
    for rank, proc in zip(ranks, procs):
        try:
            stdout, stderr = proc.communicate(timeout=SHORT_TIMEOUT_S + 180)
        finally:
            proc.kill()
        out.append(Rank(rank, proc.returncode, stdout, stderr))
    return out


def _last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1] if text.strip() else ""


def _no_raw_output(ranks: Sequence[Rank], allow: Sequence[str] = ()) -> None:
    for r in ranks:
        for marker in _RAW:
            if marker in allow:
                continue
            assert marker not in r.stdout + r.stderr, (r.rank, marker, r.stdout[-2000:], r.stderr[-3000:])


def test_a_rank_missing_under_a_launcher_is_named_and_every_rank_exits_non_zero():
    start = time.monotonic()
    ranks = _by_hand([0, 1, 2], 4, "--timeout", str(SHORT_TIMEOUT_S))
    took = time.monotonic() - start
    zero = ranks[0]
    assert zero.returncode == 1, (zero.stdout[-3000:], zero.stderr[-3000:])
    assert zero.stdout.startswith("mpu-bridge selfcheck: 4 ranks (torchrun)"), zero.stdout[:500]
    assert "  rank 3 never joined: nothing from it reached the rendezvous store within --timeout 20 s; " \
           "was it started (RANK=3, WORLD_SIZE=4" in zero.stdout, zero.stdout[-3000:]
    assert _last_line(zero.stdout).startswith("FAIL: ranks [3] never joined"), zero.stdout[-1000:]
    for other in ranks[1:]:
        assert other.returncode == 1, other
        assert other.stdout == ""
        assert len(other.stderr.strip().splitlines()) == 1, other.stderr[-3000:]
        assert f"rank {other.rank} stopped at --timeout 20 s" in other.stderr, other.stderr
    _no_raw_output(ranks)
    assert took < SHORT_TIMEOUT_S + 60, took  # ends at --timeout, not at torch's own timeouts after it


def test_rank_0_missing_under_a_launcher_is_one_line_on_every_other_rank():
    ranks = _by_hand([1, 2], 3, "--timeout", "8")
    for r in ranks:
        assert r.returncode == 1, r
        assert r.stdout == ""
        # the one line of ours, last; torch's own C++ store warnings (torch 2.15 logs a failed
        # connection with a native stack) may come before it, never a Python traceback or dump
        ours = [line for line in r.stderr.strip().splitlines() if line.startswith("mpu-bridge selfcheck:")]
        assert len(ours) == 1, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == ours[0], r.stderr[-3000:]
        assert ours[0].startswith(f"mpu-bridge selfcheck: rank {r.rank} could not reach the rendezvous "
                                  "store at 127.0.0.1:"), ours
        assert "within --timeout 8 s (rank 0 hosts it: was rank 0 started?)" in ours[0]
        assert "Traceback" not in r.stderr
    _no_raw_output(ranks, allow=("frame #",))  # torch 2.15's C++ warning of a reset connection has a stack


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "mpu_bridge.selfcheck", "--backend", "gloo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=LONG_TIMEOUT_S + 120, env=_env())


def test_under_torchrun_a_rank_that_dies_is_named_in_rank_0s_report():
    # torchrun stops the other ranks (SIGTERM) once one died: rank 0 still reports, naming it
    done = _torchrun(4, "--timeout", str(LONG_TIMEOUT_S), "--inject-fault", "exit")
    assert done.returncode != 0
    assert "  rank 3 did not finish before the launcher stopped the run (SIGTERM) (last phase: " in done.stdout \
        or "  rank 3 did not finish within 10 s after rank " in done.stdout, (done.stdout[-3000:], done.stderr[-3000:])
    # rank 3 is named; ranks whose collective broke when it died may be named beside it
    missing = re.search(r"ranks \[([0-9, ]+)\] did not report", _last_line(done.stdout))
    assert missing and "3" in missing.group(1).split(", "), done.stdout[-1000:]
    assert _last_line(done.stdout).startswith("FAIL: "), done.stdout[-1000:]
    assert "Timeout (" not in done.stderr and "Thread 0x" not in done.stderr


def test_under_torchrun_the_run_passes():
    # the launcher's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): every rank is its client
    done = _torchrun(2, "--timeout", str(LONG_TIMEOUT_S), "--tp", "2")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert done.stdout.startswith("mpu-bridge selfcheck: 2 ranks (torchrun)")
    assert _last_line(done.stdout) == "PASS: 9 group kinds on 2 ranks, every check passed"


# -- the report (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "missing, verdict",
    [
        ({3: "never joined: nothing from it reached the rendezvous store within --timeout 20 s",
          1: "did not finish within --timeout 20 s (last phase: init_process_group)"},
         "FAIL: ranks [3] never joined; ranks [1] did not report"),
        ({1: "did not finish within --timeout 20 s (last phase: collectives)"}, "FAIL: ranks [1] did not report"),
    ],
)
def test_the_verdict_names_ranks_that_never_joined_apart(missing, verdict):
    results = {r: RankResult(rank=r, world_size=4) for r in range(4) if r not in missing}
    text, passed = format_report(SelfCheckConfig(), 4, results, missing, 20.0, launcher="torchrun")
    assert not passed
    assert _last_line(text) == verdict
    for rank, why in missing.items():
        assert f"  rank {rank} {why}" in text
