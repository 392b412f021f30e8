"""``mpu-bridge selfcheck``: every group created on real gloo ranks, its membership proved.

Four spawned runs (each starts several Python processes that import torch, so each
costs seconds): one over the real megatron-core ``parallel_state``, one standalone
through the installed console script, and two with an injected fault (a wrong
all-reduce contribution; a rank that dies). Several tests read the same run. Bad
options and the planner's expectations are checked in-process, with no ranks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

from mpu_bridge.cli import main
from mpu_bridge.errors import LayoutError
from mpu_bridge.selfcheck import SelfCheckConfig, expected_groups, validate

ROOT = Path(__file__).resolve().parents[1]
#: Seconds a spawned run may take before the self-check kills its ranks (slow shared machines).
RUN_TIMEOUT_S = 600
#: The megatron run of the issue: 4 ranks, tp 2, ep 2, hpZ 2, 2 GPUs per node.
MEGATRON_ARGS = ["--nproc", "4", "--with-megatron", "--tp", "2", "--ep", "2", "--hpz", "2", "--gpus-per-node", "2"]


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)  # no launcher: the self-check spawns its ranks itself
    return env


def _run(command: List[str]) -> Run:
    # gloo even where CUDA is available, so the runs (and reports) are the same everywhere
    args = [*command, "--backend", "gloo", "--timeout", str(RUN_TIMEOUT_S)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60, env=_env())
    return Run(done.returncode, done.stdout, done.stderr)


def _selfcheck_module(*args: str) -> Run:
    return _run([sys.executable, "-m", "mpu_bridge.selfcheck", *args])


def group_table(report: str) -> Dict[str, List[str]]:
    """The report's group table: label -> [size, groups, communicator, all-reduce, broadcast, planner, result]."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("group kind "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def last_line(report: str) -> str:
    return report.rstrip("\n").splitlines()[-1]


# -- over megatron-core ---------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_run() -> Run:
    return _selfcheck_module(*MEGATRON_ARGS)


def test_megatron_run_passes(megatron_run):
    assert megatron_run.returncode == 0, megatron_run.stdout + megatron_run.stderr
    assert last_line(megatron_run.stdout).startswith("PASS: 12 group kinds on 4 ranks")
    assert "Traceback" not in megatron_run.stderr


def test_megatron_run_checks_every_kind_on_every_rank(megatron_run):
    table = group_table(megatron_run.stdout)
    assert list(table) == [
        "tensor_parallel",
        "pipeline_parallel",
        "data_parallel",
        "sequence_parallel",
        "sequence_data_parallel",
        "model_parallel",
        "expert_parallel[ep=2]",
        "expert_data_parallel[ep=2]",
        "zero_param_intra_parallel[hpz=2]",
        "all_to_all_local[gpn=2]",
        "all_to_all_cross_node[gpn=2]",
        "world",
    ]
    for label, cells in table.items():
        assert cells[3:] == ["4/4", "4/4", "4/4", "ok"], label


def test_megatron_run_reports_sizes_and_group_counts(megatron_run):
    table = group_table(megatron_run.stdout)
    sizes = {label: (cells[0], cells[1]) for label, cells in table.items()}
    # 4 ranks, tp 2 (dp 2), ep 2 (etp 2, edp 1), hpZ 2, 2 nodes of 2
    assert sizes == {
        "tensor_parallel": ("2", "2"),
        "pipeline_parallel": ("1", "4"),
        "data_parallel": ("2", "2"),
        "sequence_parallel": ("1", "4"),
        "sequence_data_parallel": ("2", "2"),
        "model_parallel": ("2", "2"),
        "expert_parallel[ep=2]": ("2", "2"),
        "expert_data_parallel[ep=2]": ("1", "4"),
        "zero_param_intra_parallel[hpz=2]": ("2", "2"),
        "all_to_all_local[gpn=2]": ("2", "2"),
        "all_to_all_cross_node[gpn=2]": ("2", "2"),
        "world": ("4", "1"),
    }


def test_megatron_run_borrows_megatrons_groups_and_creates_none(megatron_run):
    table = group_table(megatron_run.stdout)
    for label in ("tensor_parallel", "data_parallel", "model_parallel", "expert_parallel[ep=2]"):
        assert table[label][2].startswith("borrowed"), label
    # hpZ 2 = the data-parallel group; node-local = tp, cross-node = dp; world = megatron's tp-dp
    assert table["zero_param_intra_parallel[hpz=2]"][2] == "reused = data_parallel"
    assert table["all_to_all_local[gpn=2]"][2] == "reused = tensor_parallel"
    assert table["all_to_all_cross_node[gpn=2]"][2] == "reused = data_parallel"
    assert table["world"][2].startswith("reused")
    assert "0 groups created" in megatron_run.stdout


def test_megatron_run_prints_layout_phases_and_backend(megatron_run):
    out = megatron_run.stdout
    assert out.startswith("mpu-bridge selfcheck: 4 ranks (spawned locally), backend gloo, MPU megatron-core")
    assert "dense grid   tp 2 × cp 1 × dp 2 × pp 1" in out
    for phase in ("process start", "init_process_group", "megatron import", "megatron init", "attach",
                  "group creation", "collectives", "wall (whole run)"):
        assert re.search(rf"^{re.escape(phase)}\s+\d+\.\d{{3}}", out, re.M), phase


# -- standalone, through the console script --------------------------------------------


def test_console_script_standalone_run_creates_and_checks_every_group():
    script = Path(sys.executable).with_name("mpu-bridge")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    run = _run([str(script), "selfcheck", "--nproc", "4", "--ep", "2", "4", "--hpz", "2", "--gpus-per-node", "2"])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MPU standalone (no MPU)" in run.stdout
    table = group_table(run.stdout)
    assert table["data_parallel"][:3] == ["4", "1", "created"]  # the world, cloned
    assert table["expert_parallel[ep=2]"][:3] == ["2", "2", "created"]
    assert table["expert_data_parallel[ep=2]"][:3] == ["2", "2", "created"]
    assert table["expert_parallel[ep=4]"][:3] == ["4", "1", "reused = data_parallel"]
    assert table["zero_param_intra_parallel[hpz=2]"][:3] == ["2", "2", "reused = expert_parallel[ep=2]"]
    assert all(cells[3:] == ["4/4", "4/4", "4/4", "ok"] for cells in table.values())
    assert last_line(run.stdout) == "PASS: 14 group kinds on 4 ranks, every check passed"


# -- failures ----------------------------------------------------------------------------


def test_a_wrong_all_reduce_fails_the_kind_and_exits_1():
    # rank 1 of 2 adds 2 to its contribution in the first multi-rank kind (data_parallel)
    run = _selfcheck_module("--nproc", "2", "--inject-fault", "wrong-sum")
    assert run.returncode == 1, run.stdout + run.stderr
    table = group_table(run.stdout)
    assert table["data_parallel"][3:] == ["0/2", "2/2", "2/2", "FAIL"]
    assert table["world"][3:] == ["2/2", "2/2", "2/2", "ok"]
    assert "data_parallel: rank 0: all-reduce gave 3, expected 1 (the sum of ranks [0,1])" in run.stdout
    assert last_line(run.stdout) == "FAIL: failed kinds: data_parallel"


def test_a_rank_that_dies_is_named_and_the_run_ends():
    run = _selfcheck_module("--nproc", "2", "--inject-fault", "exit")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "rank 1 died with exit code 3 without reporting" in run.stdout
    assert "ranks [1] did not report" in last_line(run.stdout)
    assert last_line(run.stdout).startswith("FAIL: ")


# -- bad input (no ranks start) ----------------------------------------------------------


def test_sizes_that_do_not_fit_the_world_exit_2_with_the_layout_error(capsys):
    status = main(["selfcheck", "--nproc", "4", "--with-megatron", "--tp", "3"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err == (
        "mpu-bridge: error: world size 4 is not divisible by tp·pp·cp = 3 (tp=3, pp=1, cp=1); "
        "choose sizes whose product divides the world\n"
    )


def test_model_parallel_sizes_without_megatron_exit_2(capsys):
    status = main(["selfcheck", "--nproc", "4", "--tp", "2", "--cp", "2"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("mpu-bridge: error: tp=2, cp=2 needs --with-megatron")


@pytest.mark.parametrize(
    "config, world, message",
    [
        (SelfCheckConfig(hpz=3), 4, "hpZ partition size 3 does not divide the data-parallel size 4"),
        (SelfCheckConfig(gpus_per_node=4), 6, "world size 6 does not divide into nodes of 4 GPUs"),
        (SelfCheckConfig(ep=(2, 3)), 4, "world size 4 is not divisible by etp·ep·pp = 3"),
        (SelfCheckConfig(inject_fault="exit"), 1, "--inject-fault needs at least 2 ranks"),
    ],
)
def test_validate_rejects_options_the_world_cannot_hold(config, world, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        validate(config, world)


def test_running_under_a_launcher_with_another_nproc_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(["selfcheck", "--nproc", "4"]) == 2
    assert "--nproc 4 was given, but the launcher started WORLD_SIZE=8 ranks" in capsys.readouterr().err


# -- what the planner expects -------------------------------------------------------------


def test_expected_groups_of_one_rank_written_out():
    config = SelfCheckConfig(tp=2, ep=(2, 4), etp=1, hpz=2, gpus_per_node=2, with_megatron=True)
    # 8 ranks: tp 2, dp 4; experts with etp 1: ep 2 -> edp 4, ep 4 -> edp 2
    assert expected_groups(config, 8, 5) == {
        "tensor_parallel": (4, 5),
        "pipeline_parallel": (5,),
        "data_parallel": (1, 3, 5, 7),
        "sequence_parallel": (5,),
        "sequence_data_parallel": (1, 3, 5, 7),
        "model_parallel": (4, 5),
        "expert_parallel[ep=2]": (4, 5),
        "expert_data_parallel[ep=2]": (1, 3, 5, 7),
        "expert_parallel[ep=4]": (4, 5, 6, 7),
        "expert_data_parallel[ep=4]": (1, 5),
        "zero_param_intra_parallel[hpz=2]": (5, 7),
        "all_to_all_local[gpn=2]": (4, 5),
        "all_to_all_cross_node[gpn=2]": (1, 3, 5, 7),
        "world": (0, 1, 2, 3, 4, 5, 6, 7),
    }


def test_expected_groups_follow_the_order_string():
    config = SelfCheckConfig(tp=2, ep=(2,), order="tp-cp-dp-ep-pp", with_megatron=True)
    # D+E: data parallel varies before expert parallel
    groups = expected_groups(config, 8, 0)
    assert groups["expert_parallel[ep=2]"] == (0, 4)
    assert groups["expert_data_parallel[ep=2]"] == (0, 2)


def test_importing_the_selfcheck_does_not_import_torch():
    code = "import sys, mpu_bridge.selfcheck; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
