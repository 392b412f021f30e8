"""The integration suite under ``torchrun``: the part that runs anywhere (4 local ranks).

The programs are the nightly GPU job's (``rank_checks.py``, ``python -m
mpu_bridge.selfcheck``), launched here with ``torchrun --standalone
--nproc-per-node 4``. On a machine without GPUs the ranks use gloo (CI runs this
part); with 4 or more CUDA GPUs they use NCCL bound to their GPU, and the
NCCL-only cases run too (on other machines they are skipped: they run nightly,
see ``run_nightly.sh``).

Two launches hold the work (starting ranks and importing megatron-core is most of
the cost): one ``rank_checks.py`` job (megatron-core equality over several
layouts, the same layouts as standalone full layouts with their
``ProcessGroupCollection`` and ``DeviceMesh``, the DeepSpeed client step, and on
GPUs the NCCL options and ``split_group`` paths) whose report every case test
reads, and one self-check job with ``--exports``. A third, small launch makes sure
a failing rank fails the whole job. With 4 GPUs a fourth runs the self-check over a
standalone full layout on NCCL (groups from ``split_group``, the mesh on cuda).
Besides, the layouts, the launch script and the workflow are checked without
launching anything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from _launch import NEEDS_GPUS, NPROC, REPO_ROOT, Launch, cuda_gpus
from mpu_bridge.errors import LayoutError
from mpu_bridge.optional import is_available
from nightly_layouts import (
    CPU_EXTRA_EP,
    CPU_MEGATRON_LAYOUTS,
    CPU_SELFCHECK_ARGS,
    STANDALONE_SELFCHECK_ARGS,
    megatron_layouts,
    parse_spec,
    selfcheck_layouts,
)

ON_GPUS = cuda_gpus() >= NPROC
RANK_CHECKS = "integration_tests/rank_checks.py"
RUN_NIGHTLY = REPO_ROOT / "integration_tests" / "run_nightly.sh"
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "nightly-gpu.yml"
LAUNCH_TIMEOUT_S = 600.0


# ---------------------------------------------------------------------------------------
# The launches (module scope: each runs once, the tests below read it)
# ---------------------------------------------------------------------------------------


def _skip_without_megatron() -> None:
    """Every launch below needs megatron-core (megatron-core equality; DeepSpeed over megatron-core;
    the exports' ProcessGroupCollection): where it is not installed, their tests are skipped."""
    if not is_available("megatron.core"):
        pytest.skip("needs megatron-core (pip install 'mpu-bridge[megatron]')")


@pytest.fixture(scope="module")
def rank_checks(launch_torchrun, tmp_path_factory) -> Dict[str, Any]:
    """One ``rank_checks.py`` job: megatron, standalone, deepspeed (and nccl on GPUs); its report by case."""
    _skip_without_megatron()
    report = tmp_path_factory.mktemp("rank_checks") / "report.json"
    programs = ["megatron", "standalone", "deepspeed"] + (["nccl"] if ON_GPUS else [])
    launch = launch_torchrun(
        [
            RANK_CHECKS,
            *programs,
            "--layout",
            " ".join(CPU_MEGATRON_LAYOUTS),
            "--extra-ep",
            *map(str, CPU_EXTRA_EP),
            "--timeout",
            str(LAUNCH_TIMEOUT_S - 60),
            "--report",
            str(report),
        ],
        timeout=LAUNCH_TIMEOUT_S,
    )
    if not report.exists():
        pytest.fail(f"rank_checks.py wrote no report:\n{launch.describe()}", pytrace=False)
    data = json.loads(report.read_text())
    data["launch"] = launch
    data["by_case"] = {(c["program"], c["layout"]): c for c in data["cases"]}
    return data


def _case(rank_checks: Dict[str, Any], program: str, layout: str) -> Dict[str, Any]:
    case = rank_checks["by_case"].get((program, layout))
    if case is None:
        pytest.fail(
            f"no {program}[{layout}] case in the report:\n{rank_checks['launch'].describe()}", pytrace=False
        )
    return case


def _assert_passed(case: Dict[str, Any]) -> None:
    failures = "\n".join(case["failures"][:40])
    assert case["passed"], f"{case['program']}[{case['layout']}]: {len(case['failures'])} failures\n{failures}"
    assert case["checks"] > 0


@pytest.fixture(scope="module")
def selfcheck(launch_torchrun) -> Launch:
    _skip_without_megatron()
    return launch_torchrun(
        ["-m", "mpu_bridge.selfcheck", *shlex.split(CPU_SELFCHECK_ARGS), "--timeout", str(LAUNCH_TIMEOUT_S - 60)],
        timeout=LAUNCH_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def standalone_selfcheck(launch_torchrun) -> Launch:
    """GPU machines only (the tests that use it are skipped elsewhere)."""
    _skip_without_megatron()
    return launch_torchrun(
        ["-m", "mpu_bridge.selfcheck", *shlex.split(STANDALONE_SELFCHECK_ARGS), "--timeout",
         str(LAUNCH_TIMEOUT_S - 60)],
        timeout=LAUNCH_TIMEOUT_S,
    )


def _report_rows(output: str) -> Dict[str, List[str]]:
    """The self-check report's group table: label -> its other cells."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("group kind ")), None)
    rows: Dict[str, List[str]] = {}
    if start is None:
        return rows
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def _export_rows(output: str) -> Dict[str, List[str]]:
    return {k: v for k, v in _report_rows(output).items() if k.startswith(("pg_collection.", "device_mesh"))}


# ---------------------------------------------------------------------------------------
# rank_checks.py: megatron-core equality, standalone layouts, DeepSpeed, NCCL
# ---------------------------------------------------------------------------------------


def test_the_rank_checks_job_passes_as_a_whole(rank_checks):
    launch: Launch = rank_checks["launch"]
    assert launch.returncode == 0, launch.describe()
    assert f"PASS: {len(rank_checks['cases'])} cases on {NPROC} ranks" in launch.output


def test_the_ranks_use_nccl_on_gpus_and_gloo_elsewhere(rank_checks):
    assert rank_checks["world_size"] == NPROC
    assert rank_checks["backend"] == ("nccl" if ON_GPUS else "gloo")


@pytest.mark.parametrize("layout", CPU_MEGATRON_LAYOUTS)
def test_bridge_answers_equal_megatron_core_and_expert_groups_sum_right(rank_checks, layout):
    """Dense queries are parallel_state's groups (nothing created), expert groups equal its
    RankGenerator, all-reduces sum the members' ranks, the strategy is split_group / local_new_group."""
    _assert_passed(_case(rank_checks, "megatron", layout))


def test_other_expert_sizes_were_checked_in_some_layout(rank_checks):
    notes = " ".join(n for layout in CPU_MEGATRON_LAYOUTS for n in _case(rank_checks, "megatron", layout)["notes"])
    assert "[2, 4]" in notes and "[4]" in notes, notes


@pytest.mark.parametrize("layout", CPU_MEGATRON_LAYOUTS)
def test_standalone_full_layouts_and_their_exports_prove_every_group(rank_checks, layout):
    """attach(None, tp=..., ...): every kind and collection field has the planner's ranks and
    sums right; the DeviceMesh on this world's device creates nothing, holds the bridge's
    groups, and DTensor round trips along its dims; split_group is counted per partition."""
    case = _case(rank_checks, "standalone", layout)
    _assert_passed(case)
    assert any("split_group calls per rank" in note for note in case["notes"]), case["notes"]


@pytest.mark.gpu
@NEEDS_GPUS
@pytest.mark.parametrize("layout", CPU_MEGATRON_LAYOUTS)
def test_standalone_layouts_on_nccl_are_created_by_split_group(rank_checks, layout):
    """On a device-bound NCCL default group the strategy is split_group and groups were split
    (one call per created partition, checked on every rank in the case)."""
    notes = " ".join(_case(rank_checks, "standalone", layout)["notes"])
    match = re.search(r"split_group calls per rank: (\d+) \(strategy (\w+)\)", notes)
    assert match is not None, notes
    assert match.group(2) == "split_group", notes
    assert int(match.group(1)) > 0, notes


def test_deepspeed_trains_over_the_bridge_like_plain_torch(rank_checks):
    _assert_passed(_case(rank_checks, "deepspeed", "tp=2,zero=2"))


@pytest.mark.gpu
@NEEDS_GPUS
@pytest.mark.parametrize("layout", CPU_MEGATRON_LAYOUTS)
def test_nccl_groups_keep_their_options_and_split_group_creates_with_pg_options(rank_checks, layout):
    _assert_passed(_case(rank_checks, "nccl", layout))


# ---------------------------------------------------------------------------------------
# The self-check under torchrun
# ---------------------------------------------------------------------------------------


def test_selfcheck_under_torchrun_passes(selfcheck):
    assert selfcheck.returncode == 0, selfcheck.describe()
    assert "PASS:" in selfcheck.output, selfcheck.describe()


def test_selfcheck_under_torchrun_reports_the_launch_and_strategy(selfcheck):
    header = next((line for line in selfcheck.output.splitlines() if line.startswith("mpu-bridge selfcheck:")), "")
    assert f"{NPROC} ranks (torchrun)" in header, selfcheck.describe()
    expected = "backend nccl" if ON_GPUS else "backend gloo"
    assert expected in header, header


@pytest.mark.gpu
@NEEDS_GPUS
def test_selfcheck_on_nccl_creates_groups_with_split_group(selfcheck):
    assert "group creation split_group" in selfcheck.output, selfcheck.describe()


def test_selfcheck_exports_are_proven_on_every_rank(selfcheck):
    """--exports under torchrun: every non-None collection field and every mesh dim (the mesh
    on cuda with NCCL) is a row, megatron-core's own communicator, all-reduce and broadcast on 4 ranks."""
    rows = _export_rows(selfcheck.output)
    assert "pg_collection.tp" in rows and "device_mesh.dp" in rows and "device_mesh[ep=2].ep" in rows, (
        selfcheck.describe()
    )
    twins = [label for label in rows if label.split(".")[-1] in ("dp_cp_ag", "expt_dp_ag")]
    for label, cells in rows.items():
        # megatron-core's own communicators, but the all-gather twins (>= 0.18): their own, created
        assert cells[2].startswith("created" if label in twins else "borrowed"), (label, cells)
        assert cells[3:] == [f"{NPROC}/{NPROC}"] * 3 + ["ok"], (label, cells)
    assert f"{len(twins)} groups created" in selfcheck.output, selfcheck.describe()


@pytest.mark.gpu
@NEEDS_GPUS
def test_standalone_selfcheck_on_nccl_splits_groups_and_proves_the_exports(standalone_selfcheck):
    launch = standalone_selfcheck
    assert launch.returncode == 0, launch.describe()
    header = next((line for line in launch.output.splitlines() if line.startswith("mpu-bridge selfcheck:")), "")
    assert "backend nccl" in header and "MPU standalone (no MPU)" in header, header
    assert "group creation split_group" in header, header
    assert "fell back" not in launch.output or "0 creation batch(es) fell back" in launch.output, launch.describe()
    rows = _export_rows(launch.output)
    assert "device_mesh.tp" in rows and "device_mesh[ep=2].etp" in rows, launch.describe()
    assert all(cells[-1] == "ok" for cells in rows.values()), rows


def test_a_rank_with_a_wrong_sum_fails_the_torchrun_job(launch_torchrun):
    """The launch path can fail: the self-check's last rank contributes a wrong value."""
    launch = launch_torchrun(
        ["-m", "mpu_bridge.selfcheck", "--ep", "2", "--inject-fault", "wrong-sum", "--timeout", "300"],
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert launch.returncode != 0, launch.describe()
    assert "FAIL" in launch.output, launch.describe()


# ---------------------------------------------------------------------------------------
# Layouts, launch script and workflow (no processes)
# ---------------------------------------------------------------------------------------


def test_the_cpu_layouts_fit_four_ranks():
    assert megatron_layouts(NPROC, CPU_MEGATRON_LAYOUTS) == list(CPU_MEGATRON_LAYOUTS)
    assert selfcheck_layouts(NPROC, pool=[CPU_SELFCHECK_ARGS]) == [CPU_SELFCHECK_ARGS]


@pytest.mark.parametrize("world_size, at_least_megatron, at_least_selfcheck", [(8, 8, 5), (16, 10, 6)])
def test_the_nightly_layouts_fit_one_and_two_nodes_of_eight(world_size, at_least_megatron, at_least_selfcheck):
    assert len(megatron_layouts(world_size)) >= at_least_megatron
    lines = selfcheck_layouts(world_size, gpus_per_node=8)
    assert len(lines) >= at_least_selfcheck
    assert all(line.endswith("--gpus-per-node 8") for line in lines)


def test_a_layout_spec_reads_sizes_and_order():
    assert parse_spec("tp=2,ep=4,order=tp-cp-dp-ep-pp") == {
        "tp": 2, "pp": 1, "cp": 1, "ep": 4, "etp": None, "order": "tp-cp-dp-ep-pp"
    }
    with pytest.raises(LayoutError, match="'xp=2'"):
        parse_spec("xp=2")


def _nightly(*args: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    settings = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE", "RDZV_ID", "DRY_RUN",
                "PROGRAMS", "LOG_DIR", "STEP_TIMEOUT")
    full_env = {k: v for k, v in os.environ.items() if k not in settings}
    full_env.update({"PYTHON": sys.executable, "GITHUB_RUN_ID": "", "BACKEND": "nccl", **env})
    return subprocess.run(
        ["bash", str(RUN_NIGHTLY), *args], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_the_nightly_script_prints_usage():
    done = _nightly("--help", env={})
    assert done.returncode == 0
    assert "single" in done.stdout and "multi" in done.stdout and "NODE_RANK" in done.stdout


def test_the_nightly_script_refuses_an_unknown_mode():
    done = _nightly("everything", env={})
    assert done.returncode == 2
    assert "usage" in done.stderr.lower()


def test_multi_node_mode_needs_the_rendezvous_variables():
    done = _nightly("multi", env={})
    assert done.returncode == 2
    assert "NODE_RANK" in done.stderr and "MASTER_ADDR" in done.stderr


def test_single_node_dry_run_launches_every_layout_on_eight_ranks():
    done = _nightly("single", env={"DRY_RUN": "1", "NPROC_PER_NODE": "8"})
    assert done.returncode == 0, done.stderr
    launches = [line for line in done.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(launches) == 1 + len(selfcheck_layouts(8, gpus_per_node=8))
    assert all("--standalone" in line and "--nproc-per-node 8" in line for line in launches)
    assert sum("rank_checks.py megatron standalone nccl deepspeed" in line for line in launches) == 1


def test_multi_node_dry_run_uses_torchruns_rendezvous_flags():
    done = _nightly(
        "multi",
        env={"DRY_RUN": "1", "NPROC_PER_NODE": "8", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"},
    )
    assert done.returncode == 0, done.stderr
    launches = [line for line in done.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(launches) == 1 + len(selfcheck_layouts(16, gpus_per_node=8))
    for index, line in enumerate(launches):
        # every launch its own rendezvous: the next port, an id of its own
        assert (
            "--nnodes 2 --nproc-per-node 8 --node-rank 1 --rdzv-backend c10d "
            f"--rdzv-endpoint node0:{29400 + index} --rdzv-id mpu-bridge-nightly-{index} "
        ) in line
        assert "--standalone" not in line


def test_a_failing_launch_fails_the_nightly_run_with_a_summary(tmp_path):
    """Every launch runs even after one fails; the summary names each, and the exit status is 1."""
    failing_python = tmp_path / "python"
    failing_python.write_text(
        "#!/usr/bin/env bash\n"
        'for arg in "$@"; do [ "$arg" = torch.distributed.run ] && { echo "launch failed"; exit 3; }; done\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    failing_python.chmod(0o755)
    done = _nightly(
        "single", env={"NPROC_PER_NODE": "4", "PYTHON": str(failing_python), "LOG_DIR": str(tmp_path / "logs")}
    )
    assert done.returncode == 1, done.stdout + done.stderr
    summary = done.stdout.split("=== mpu-bridge nightly summary")[1].splitlines()
    rows = [line for line in summary if "FAIL (exit 3)" in line]
    assert len(rows) == 1 + len(selfcheck_layouts(4, gpus_per_node=4)), summary
    assert summary[-1] == "FAIL"


def test_the_workflow_is_scheduled_on_a_self_hosted_gpu_runner():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    jobs: Dict[str, Any] = workflow["jobs"]
    runners: List[Any] = [job["runs-on"] for job in jobs.values()]
    assert all("self-hosted" in r and "gpu" in r for r in runners), runners
    steps = " ".join(str(step.get("run", "")) for job in jobs.values() for step in job["steps"])
    assert "integration_tests/run_nightly.sh single" in steps
    assert "integration_tests/run_nightly.sh multi" in steps
    assert "compat/run_matrix.py" in steps
