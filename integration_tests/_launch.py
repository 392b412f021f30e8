"""Launching torchrun jobs from the integration tests, and GPU detection.

:func:`run_torchrun` runs ``torchrun --standalone --nproc-per-node N``
(torch's own launcher, ``python -m torch.distributed.run``, so it is the one of
the interpreter running pytest) in its own session, with a hard timeout after
which the whole process tree is killed, and returns the exit status and the
combined output. ``--standalone`` makes torchrun pick a free port itself.

Tests that need NCCL and CUDA GPUs carry ``@pytest.mark.gpu`` and
:data:`NEEDS_GPUS` (skipped with a reason pointing at the nightly job); without
GPUs the same programs run on gloo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Ranks of every CPU launch (and of the GPU cases when a machine has enough GPUs).
NPROC = 4

#: Variables a surrounding launcher may have set; a nested torchrun must not inherit them.
_LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
)


def cuda_gpus() -> int:
    """How many CUDA devices this machine shows (0 without CUDA or without torch's CUDA build)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


#: For the NCCL-only cases: skipped on machines with fewer GPUs than ranks.
NEEDS_GPUS = pytest.mark.skipif(
    cuda_gpus() < NPROC,
    reason=f"needs NCCL and {NPROC} CUDA GPUs; runs nightly on the GPU runner "
    "(integration_tests/run_nightly.sh, .github/workflows/nightly-gpu.yml)",
)


@dataclass(frozen=True)
class Launch:
    """What one torchrun job did: its command, exit status and combined stdout/stderr."""

    command: Sequence[str]
    returncode: int
    output: str

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def describe(self) -> str:
        return f"$ {' '.join(self.command)}\nexit status {self.returncode}; last lines of its output:\n{self.tail()}"


def _clean_environment(extra: Optional[Mapping[str, str]]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the machine's cores
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the launch's whole session (torchrun and every rank)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_torchrun(
    target: Sequence[str],
    *,
    nproc: int = NPROC,
    timeout: float = 600.0,
    env: Optional[Mapping[str, str]] = None,
) -> Launch:
    """``torchrun --standalone --nproc-per-node nproc TARGET...`` from the repository root.

    ``target`` is a script and its arguments, or ``["-m", module, ...]``. Never runs
    past ``timeout`` seconds: the job is killed and the test fails with its output.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        *target,
    ]
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=_clean_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_session(proc)
        output, _ = proc.communicate()
        pytest.fail(
            f"torchrun did not finish within {timeout:g} s and was killed:\n"
            + Launch(command, proc.returncode, output or "").describe(),
            pytrace=False,
        )
    return Launch(command, proc.returncode, output)
