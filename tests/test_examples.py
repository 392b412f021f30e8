"""The programs in ``examples/`` run as their docstrings say, and the README quotes them verbatim.

Each example is started the way a user starts it: ``torchrun --standalone
--nproc-per-node 4`` (as ``python -m torch.distributed.run``, on gloo: no GPU is made
visible) or plain ``python``. The tests read what rank 0 prints and check every
rank's groups and collective results against the layout megatron-core builds for
those sizes. The 4-rank examples take 15–40 s each on a shared 2-core machine.

One difference from a user's run: DeepSpeed on CPU compiles a shared-memory op the
first time it starts (30–70 s, cached per environment). The DeepSpeed example runs
with a ``sitecustomize`` that replaces ``deepspeed.comm.torch.build_shm_op`` by a
no-op (as ``tests/_deepspeed_env.py`` does in-process); nothing else changes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from mpu_bridge.optional import is_available

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RUN_TIMEOUT_S = 300.0

needs_megatron = pytest.mark.skipif(
    not is_available("megatron.core"),
    reason="needs megatron-core (pip install 'mpu-bridge[megatron]')",
)


def _megatron_has_pg_collection() -> bool:
    """megatron-core >= 0.15 (the first with ``ProcessGroupCollection``), by its version only."""
    if not is_available("megatron.core"):
        return False
    try:
        release = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return True  # a checkout: let the example say what is missing
    parts = [int(p) for p in re.findall(r"\d+", release)[:2]]
    return parts >= [0, 15]


needs_pg_collection = pytest.mark.skipif(
    not _megatron_has_pg_collection(),
    reason="needs megatron-core >= 0.15, the first with ProcessGroupCollection (pip install 'mpu-bridge[megatron]')",
)
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not is_available("megatron.core"),
    reason="needs deepspeed and megatron-core (pip install 'mpu-bridge[megatron,deepspeed]')",
)

# Replaces DeepSpeed's CPU shared-memory op build (see the module docstring) in every
# process that imports deepspeed.comm.torch: torchrun's workers inherit PYTHONPATH.
_NO_SHM_OP_SITECUSTOMIZE = """
import importlib.abc
import importlib.machinery
import sys


class _NoShmOp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "deepspeed.comm.torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.build_shm_op = lambda: None

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoShmOp())
"""


def _run(args: List[str], *, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``args`` in the repository root; kill its whole process group if it outlives the limit."""
    full_env = dict(os.environ)
    full_env.update(
        {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    )
    full_env.update(env or {})
    # Output goes to files, not pipes: a worker that outlives torchrun (torch 2.6 left one
    # waiting in a collective) would hold a pipe open and make reading it wait forever.
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=full_env, stdout=out_file, stderr=err_file, text=True,
            start_new_session=True,  # torchrun's workers too, so one kill stops them all
        )
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the run is left, finished or not
        except ProcessLookupError:
            pass
        proc.wait()
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if timed_out:
        pytest.fail(f"{' '.join(args)} did not finish in {RUN_TIMEOUT_S:g} s\n{out}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _torchrun(example: str, nproc: int, env: Optional[Dict[str, str]] = None) -> str:
    """``torchrun --standalone --nproc-per-node N examples/<example>``; its stdout, once it exited 0."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = _run([*args, str(EXAMPLES / example)], env=env)
    assert result.returncode == 0, f"{example} exited {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def _rank_lines(stdout: str, world_size: int) -> Dict[int, str]:
    lines = {int(m.group(1)): m.group(2) for m in re.finditer(r"^rank (\d+): (.*)$", stdout, re.M)}
    assert sorted(lines) == list(range(world_size)), stdout
    return lines


# -- examples/megatron_trainer.py ---------------------------------------------------------

# megatron-core with tp 2, ep 2, expert-TP 1 on 4 ranks (order tp-cp-ep-dp-pp): the dense
# grid is tp x dp, the expert grid ep x edp.
_TP = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
_DP = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
_EP = _TP
_EDP = _DP


@needs_megatron
def test_megatron_trainer_example_uses_megatrons_groups_for_the_moe_collectives():
    out = _torchrun("megatron_trainer.py", 4)
    lines = _rank_lines(out, 4)
    for rank, line in lines.items():
        # Token i goes to expert-parallel peer i, comes back scaled by (i + 1).
        tokens = [10.0 * rank, 10.0 * rank + 1]
        combined = [tokens[0] * 1, tokens[1] * 2]
        expected = (
            f"tp {_TP[rank]} dp {_DP[rank]} ep {_EP[rank]} (borrowed) edp {_EDP[rank]} hpz {_DP[rank]} "
            f"| tokens {tokens} -> {combined} | expert grad summed over edp {sum(_EDP[rank])}"
        )
        assert line == expected, f"rank {rank}"
    # Every group asked for already existed in megatron-core: the bridge created none.
    assert re.search(r"^the bridge on rank 0: 0 groups created, [1-9]\d* borrowed from the MPU$", out, re.M), out


# -- examples/deepspeed_megatron.py -------------------------------------------------------


@needs_deepspeed
def test_deepspeed_example_trains_with_megatrons_groups_through_the_legacy_mpu(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_NO_SHM_OP_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    out = _torchrun("deepspeed_megatron.py", 4, env={"PYTHONPATH": path})
    lines = _rank_lines(out, 4)
    for rank, line in lines.items():
        assert line == f"DeepSpeed data parallel {_DP[rank]}, ZeRO's model parallel {_TP[rank]}", f"rank {rank}"
    match = re.search(r"^loss before each step: (.*)$", out, re.M)
    assert match, out
    losses = [float(value) for value in match.group(1).split(" -> ")]
    assert len(losses) == 3
    assert losses[0] > losses[1] > losses[2] > 0, losses


# -- examples/standalone_layout.py ----------------------------------------------------------


def test_standalone_layout_example_builds_megatrons_groups_without_megatron():
    out = _torchrun("standalone_layout.py", 4)
    lines = _rank_lines(out, 4)
    for rank, line in lines.items():
        expected = (
            f"tp {_TP[rank]} dp {_DP[rank]} ep {_EP[rank]} edp {_EDP[rank]} | ep is tp's communicator: True "
            f"| dp sum {sum(_DP[rank])}"
        )
        assert line == expected, f"rank {rank}"
    # tp (= ep) and dp (= edp): two rank sets, two communicators.
    assert re.search(r"^the bridge on rank 0: 2 groups created$", out, re.M), out


# -- examples/pg_collection.py --------------------------------------------------------------


@needs_pg_collection
def test_pg_collection_example_runs_a_gpt_model_over_the_bridges_collection_without_parallel_state():
    out = _torchrun("pg_collection.py", 4)
    lines = _rank_lines(out, 4)
    losses = {}
    for rank, line in lines.items():
        match = re.fullmatch(r"(.*) \| loss (\d+\.\d{6})", line)
        assert match, f"rank {rank}: {line}"
        expected = (
            f"tp {_TP[rank]} (rank {_TP[rank].index(rank)}) dp {_DP[rank]} (rank {_DP[rank].index(rank)}) "
            f"| pgc.tp is the bridge's: True"
        )
        assert match.group(1) == expected, f"rank {rank}"
        losses[rank] = float(match.group(2))
    # vocab-parallel cross entropy over pgc.tp: one loss per tensor-parallel pair; the
    # data-parallel replicas saw other tokens
    assert losses[0] == losses[1] and losses[2] == losses[3], losses
    assert losses[0] != losses[2] and all(0 < loss < 10 for loss in losses.values()), losses
    assert re.search(r"^parallel_state initialised: False$", out, re.M), out


# -- examples/grid_trainer.py ------------------------------------------------------------------


@needs_pg_collection
@pytest.mark.skipif(not is_available("megatron.core.hyper_comm_grid") or not is_available("einops"),
                    reason="needs megatron-core's HyperCommGrid and einops")
def test_grid_trainer_example_runs_a_gpt_model_over_the_grids_own_groups():
    out = _torchrun("grid_trainer.py", 4)
    lines = _rank_lines(out, 4)
    losses = {}
    for rank, line in lines.items():
        match = re.fullmatch(r"(.*) \| loss (\d+\.\d{6})", line)
        assert match, f"rank {rank}: {line}"
        assert match.group(1) == f"tp {_TP[rank]} dp {_DP[rank]} | the grid's groups: True", f"rank {rank}"
        losses[rank] = float(match.group(2))
    assert losses[0] == losses[1] and losses[2] == losses[3] and losses[0] != losses[2], losses


# -- examples/multi_module.py ------------------------------------------------------------------


def _megatron_has_multi_module() -> bool:
    if not is_available("megatron.core"):
        return False
    from megatron.core import process_groups_config

    return hasattr(process_groups_config, "MultiModuleProcessGroupCollection")


@pytest.mark.skipif(not _megatron_has_multi_module(),
                    reason="needs megatron-core >= 0.17 (MultiModuleProcessGroupCollection)")
def test_multi_module_example_runs_each_module_on_its_own_span_over_its_own_groups():
    out = _torchrun("multi_module.py", 4)
    lines = _rank_lines(out, 4)
    for rank in (0, 1):
        assert lines[rank] == (
            f"encoder on ranks [0, 1] | tp [{rank}] dp [0, 1] | language model: None "
            "| the module's own groups: True, created 0 | dp sum 2"
        )
    losses = set()
    for rank in (2, 3):
        match = re.fullmatch(r"(.*) \| loss (\d+\.\d{6})", lines[rank])
        assert match, lines[rank]
        assert match.group(1) == (
            f"llm on ranks [2, 3] | tp [2, 3] dp [{rank}] | language model: llm "
            "| the module's own groups: True, created 0"
        )
        losses.add(match.group(2))
    assert len(losses) == 1  # tensor parallel: both ranks compute the same loss


# -- examples/device_mesh.py -------------------------------------------------------------------


def _fsdp2_word() -> str:
    """What the example says of FSDP2: it runs on CPU where torch's CPU stream has record_event (2.7+)."""
    import torch

    return "True" if hasattr(torch.cpu.Stream, "record_event") else "skipped"


def test_device_mesh_example_runs_dtensor_and_fsdp2_over_the_bridges_groups_and_attaches_the_mesh():
    out = _torchrun("device_mesh.py", 4)
    fsdp2 = _fsdp2_word()
    assert re.search(r"^mesh \[\[0, 1\], \[2, 3\]\], dims \('dp', 'tp'\)$", out, re.M), out
    lines = _rank_lines(out, 4)
    for rank, line in lines.items():
        dp_rank, tp_rank = _DP[rank].index(rank), _TP[rank].index(rank)
        rows = [[4.0 * dp_rank, 4.0 * dp_rank + 1], [4.0 * dp_rank + 2, 4.0 * dp_rank + 3]]
        expected = (
            f"coordinate ({dp_rank}, {tp_rank}) | mesh['tp'] is the bridge's tp group: True "
            f"| rows {rows} | gathered over dp: True | tp sum {sum(_TP[rank])} "
            f"| fsdp2 2 steps equal to one process: {fsdp2} | attach(mesh): device-mesh, the same groups: True"
        )
        assert line == expected, f"rank {rank}"
    # the mesh's dims are the bridge's tp and dp groups; attach(mesh) borrows them
    assert re.search(r"^groups created on rank 0: attach\(None\) 2, attach\(mesh\) 0$", out, re.M), out


# -- examples/plan_session.py ---------------------------------------------------------------


def test_plan_session_example_answers_without_torch():
    code = (
        "import runpy, sys; runpy.run_path('examples/plan_session.py', run_name='__main__'); "
        "print('torch imported:', 'torch' in sys.modules)"
    )
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch imported: False" in out
    assert "64 ranks, tp 2, pp 2, ep 4: dp 16, expert dp 4" in out
    assert "   ep: 16 groups of  4 ranks, inside one node; rank 37's: [33, 35, 37, 39]" in out
    assert "  edp: 16 groups of  4 ranks, across nodes; rank 37's: [37, 45, 53, 61]" in out
    assert "rank 40000's expert-parallel group is [40000, 40008, 40016, 40024, 40032, 40040, 40048, 40056]" in out
    assert "4 ranks, tp 2, pp 2, ep 4: LayoutError: world size 4 is not divisible by etp·ep·pp = 16" in out


# -- the README quotes the examples -----------------------------------------------------------


def _readme_excerpts() -> List[Tuple[str, List[str]]]:
    """Each README python block that starts with ``# examples/<file>``: (file, its other lines)."""
    readme = (ROOT / "README.md").read_text()
    excerpts = []
    for block in re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S):
        lines = block.rstrip("\n").split("\n")
        match = re.match(r"# (examples/[\w.]+\.py)\b", lines[0])
        if match:
            excerpts.append((match.group(1), lines[1:]))
    return excerpts


def _is_excerpt(lines: List[str], source: str) -> bool:
    """Whether ``lines`` are consecutive lines of ``source``, all with the same indentation removed."""
    source_lines = source.split("\n")
    for start, first in enumerate(source_lines):
        if first.strip() != lines[0].strip():
            continue
        window = source_lines[start : start + len(lines)]
        if len(window) == len(lines) and textwrap.dedent("\n".join(window)) == "\n".join(lines):
            return True
    return False


def test_readme_quotes_every_example_verbatim():
    excerpts = _readme_excerpts()
    quoted = sorted({name for name, _ in excerpts})
    assert quoted == sorted(f"examples/{p.name}" for p in EXAMPLES.glob("*.py")), quoted
    for name, lines in excerpts:
        assert len(lines) >= 5, f"the README's excerpt of {name} is too short to show anything"
        assert _is_excerpt(lines, (ROOT / name).read_text()), f"the README's excerpt of {name} is not in {name}"


def test_the_readme_has_no_other_python_snippet():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("```python") == len(_readme_excerpts()), "a README python block that no test runs"
