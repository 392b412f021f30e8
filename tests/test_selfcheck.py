"""``mpu-bridge selfcheck``: every group created on real gloo ranks, its membership proved.

Five spawned runs (each starts several Python processes that import torch, so each
costs seconds): one over the real megatron-core ``parallel_state`` with ``--exports``
(its ``ProcessGroupCollection`` and ``DeviceMesh`` proven too), one standalone full
layout (``attach(None, tp=2, pp=2, ...)``) with ``--exports``, one standalone through
the installed console script, and two with an injected fault (a wrong all-reduce
contribution; a rank that dies). Several tests read the same run. Bad options, the
planner's expectations and the report's reading of exports are checked in-process,
with no ranks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

from _reports import table_rows
from mpu_bridge.cli import main
from mpu_bridge.errors import LayoutError
from mpu_bridge.optional import is_available
from mpu_bridge.selfcheck import (
    GroupCheck,
    RankResult,
    SelfCheckConfig,
    expected_exports,
    expected_groups,
    format_report,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
#: megatron-core is an extra: where it is not installed (the Python 3.13 line of the release
#: matrix), the tests that need it are skipped.
needs_megatron = pytest.mark.skipif(
    not is_available("megatron.core"), reason="needs megatron-core (pip install 'mpu-bridge[megatron]')"
)
#: Seconds a spawned run may take before the self-check kills its ranks (slow shared machines).
RUN_TIMEOUT_S = 600
#: The megatron run of the issue: 4 ranks, tp 2, ep 2, hpZ 2, 2 GPUs per node; and the exports.
MEGATRON_ARGS = [
    "--nproc", "4", "--with-megatron", "--tp", "2", "--ep", "2", "--hpz", "2", "--gpus-per-node", "2", "--exports",
]
#: A standalone full layout (no MPU): 4 ranks, tp 2, pp 2 (dp 1), experts ep 2 with etp 1.
STANDALONE_ARGS = ["--nproc", "4", "--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1", "--exports"]
#: ProcessGroupCollection fields megatron-core leaves None on every rank here (one
#: distributed-optimizer instance, no hierarchical CP): no row in the report.
NONE_FIELDS = ("hcp", "inter_dist_opt")
#: The all-gather twins (megatron-core >= 0.18): --exports asks for them, so each is a
#: communicator of its own (created), not megatron-core's nor a reuse.
TWIN_FIELDS = ("dp_cp_ag", "expt_dp_ag")
MESH_ROWS = [
    *(f"device_mesh.{dim}" for dim in ("pp", "dp", "cp", "tp")),
    *(f"device_mesh[ep=2].{dim}" for dim in ("pp", "edp", "ep", "etp")),
]


def export_rows() -> List[str]:
    """The report's export rows, in order: every field the installed megatron-core's
    collection declares (20 in 0.15-0.17, 27 in 0.19) but the always-None ones, then the meshes."""
    from mpu_bridge.pg_collection import collection_class, declared_fields

    fields = [f for f in declared_fields(collection_class()) if f not in NONE_FIELDS]
    return [*(f"pg_collection.{field}" for field in fields), *MESH_ROWS]


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
    return table_rows(report, "group kind ")


def last_line(report: str) -> str:
    return report.rstrip("\n").splitlines()[-1]


# -- over megatron-core ---------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_run() -> Run:
    if not is_available("megatron.core"):
        pytest.skip("needs megatron-core (pip install 'mpu-bridge[megatron]')")
    return _selfcheck_module(*MEGATRON_ARGS)


def test_megatron_run_passes(megatron_run):
    assert megatron_run.returncode == 0, megatron_run.stdout + megatron_run.stderr
    rows = len(export_rows())
    assert last_line(megatron_run.stdout).startswith(f"PASS: 12 group kinds and {rows} exported fields/dims on 4 ranks")
    assert "Traceback" not in megatron_run.stderr


def test_megatron_run_checks_every_kind_on_every_rank(megatron_run):
    table = group_table(megatron_run.stdout)
    assert list(table)[:12] == [
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
    sizes = {label: (cells[0], cells[1]) for label, cells in list(table.items())[:12]}
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
    # nothing created but the all-gather twins the exports ask for (megatron-core >= 0.18):
    # communicators of their own by design
    twins = sum(1 for label in export_rows() if label.split(".")[-1] in TWIN_FIELDS)
    assert f"{twins} groups created" in megatron_run.stdout


def test_megatron_run_proves_every_exported_field_and_dim_with_megatrons_own_groups(megatron_run):
    """--exports: one row per non-None collection field and per mesh dim, all-reduce and
    broadcast on every rank; every one is megatron-core's own communicator (nothing created)."""
    table = group_table(megatron_run.stdout)
    assert list(table)[12:] == export_rows()
    for label in export_rows():
        twin = label.split(".")[-1] in TWIN_FIELDS
        assert table[label][2].startswith("created" if twin else "borrowed"), (label, table[label])
        assert table[label][3:] == ["4/4", "4/4", "4/4", "ok"], label
    # the collection's and the meshes' groups are the bridge's (= megatron-core's) group objects
    assert table["pg_collection.tp"][2] == "borrowed = tensor_parallel"
    assert table["pg_collection.dp"][2] == "borrowed = data_parallel"
    assert table["pg_collection.ep"][2] == "borrowed = expert_parallel[ep=2]"
    assert table["device_mesh.dp"][2] == "borrowed = data_parallel"
    assert table["device_mesh[ep=2].ep"][2] == "borrowed = expert_parallel[ep=2]"
    assert table["pg_collection.tp_ep"][:2] == ["4", "1"]  # etp 2 x ep 2
    assert re.search(r"^exports\s+\d+\.\d{3}", megatron_run.stdout, re.M)


def test_megatron_run_prints_layout_phases_and_backend(megatron_run):
    out = megatron_run.stdout
    assert out.startswith("mpu-bridge selfcheck: 4 ranks (spawned locally), backend gloo, MPU megatron-core")
    assert "dense grid   tp 2 × cp 1 × dp 2 × pp 1" in out
    for phase in ("process start", "init_process_group", "megatron import", "megatron init", "attach",
                  "group creation", "collectives", "wall (whole run)"):
        assert re.search(rf"^{re.escape(phase)}\s+\d+\.\d{{3}}", out, re.M), phase


# -- megatron-core 0.19's Generalized Tensor Parallelism -------------------------------

GTP_ARGS = [
    "--nproc", "4", "--with-megatron", "--tp", "2", "--gtp-remat", "2", "--ep", "2", "--etp", "1",
    "--expert-gtp-remat", "2", "--exports",
]


@needs_megatron
def test_gtp_layout_over_megatron_core_passes_with_exports():
    """initialize_model_parallel(gtp_remat_size=2, expert_gtp_remat_size=2) on gloo, attach,
    and every group and export proven on the wire (megatron-core >= 0.19)."""
    from _megatron import megatron_parallel_state, supports_gtp

    if not supports_gtp(megatron_parallel_state()):
        pytest.skip("this megatron-core has no Generalized Tensor Parallelism (gtp_remat_size)")
    run = _selfcheck_module(*GTP_ARGS)
    assert run.returncode == 0, run.stdout + run.stderr
    table = group_table(run.stdout)
    assert table["data_parallel"][:2] == ["1", "4"]  # the replicate group: dp = 4 / (tp·gtp)
    assert table["pg_collection.gtp_remat"][:3] == ["2", "2", "borrowed"]
    assert table["pg_collection.dp_cp_gtp_remat"][:2] == ["2", "2"]  # the distribution group
    assert table["pg_collection.expt_gtp_remat"][:3] == ["2", "2", "borrowed"]
    assert table["pg_collection.mp"][:2] == ["4", "1"]  # tp x gtp_remat x pp
    assert last_line(run.stdout).startswith("PASS: ")


# -- a standalone full layout with --exports --------------------------------------------


@pytest.fixture(scope="module")
def standalone_run() -> Run:
    if not is_available("megatron.core"):  # --exports: megatron-core's ProcessGroupCollection
        pytest.skip("--exports needs megatron-core (pip install 'mpu-bridge[megatron]')")
    return _selfcheck_module(*STANDALONE_ARGS)


def test_standalone_full_layout_run_passes_with_exports(standalone_run):
    assert standalone_run.returncode == 0, standalone_run.stdout + standalone_run.stderr
    assert "MPU standalone (no MPU)" in standalone_run.stdout
    assert "dense grid   tp 2 × cp 1 × dp 1 × pp 2" in standalone_run.stdout
    assert last_line(standalone_run.stdout) == (
        f"PASS: 9 group kinds and {len(export_rows())} exported fields/dims on 4 ranks, every check passed"
    )


def test_standalone_full_layout_groups_follow_the_sizes(standalone_run):
    table = group_table(standalone_run.stdout)
    assert table["tensor_parallel"][:3] == ["2", "2", "created"]
    assert table["pipeline_parallel"][:3] == ["2", "2", "created"]
    assert table["model_parallel"][:3] == ["4", "1", "reused"]  # the world: the default group
    assert table["expert_parallel[ep=2]"][:3] == ["2", "2", "reused = tensor_parallel"]  # etp 1: ep = tp's ranks


def test_standalone_exports_reuse_the_bridges_groups_and_prove_each_one(standalone_run):
    table = group_table(standalone_run.stdout)
    assert list(table)[9:] == export_rows()
    for label in export_rows():
        twin = label.split(".")[-1] in TWIN_FIELDS
        # a twin is a communicator of its own; the two twins share one where their ranks are equal
        # (dp 1 and edp 1 here: one all-gather channel, one communicator per rank set in it)
        expected = ("created", "reused = pg_collection.dp_cp_ag") if twin else ("reused = ",)
        assert table[label][2].startswith(expected), (label, table[label])
        assert table[label][-1] == "ok", label
    assert table["pg_collection.pp"][2] == "reused = pipeline_parallel"
    assert table["device_mesh.tp"][2] == "reused = tensor_parallel"
    # pp 2: word embeddings on the first and last stage (every rank); position embeddings on
    # the first stage only: ranks 2 and 3 are in no group, so 2 ranks run its collectives
    assert table["pg_collection.embd"][:2] == ["2", "2"]
    assert table["pg_collection.pos_embd"][:2] == ["1", "2"]
    assert table["pg_collection.pos_embd"][3:] == ["2/2", "2/2", "4/4", "ok"]
    assert table["pg_collection.tp"][3:] == ["4/4", "4/4", "4/4", "ok"]


# -- a trainer without parallel_state: every check over attach(collection) --------------------


def test_a_collection_only_run_passes_with_every_group_borrowed_from_the_collection():
    if not is_available("megatron.core.process_groups_config"):
        pytest.skip("--via-collection needs megatron-core >= 0.15 (ProcessGroupCollection)")
    run = _selfcheck_module(*STANDALONE_ARGS, "--via-collection")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MPU ProcessGroupCollection of a standalone layout" in run.stdout.splitlines()[0]
    table = group_table(run.stdout)
    for label in ("tensor_parallel", "pipeline_parallel", "data_parallel", "model_parallel"):
        assert table[label][2] == "borrowed", label
    assert table["expert_parallel[ep=2]"][2] == "borrowed = tensor_parallel"  # etp 1: ep = tp's ranks
    assert "rank 0: 0 groups created" in run.stdout
    assert last_line(run.stdout) == (
        f"PASS: 9 group kinds and {len(export_rows())} exported fields/dims on 4 ranks, every check passed"
    )


# -- standalone, through the console script --------------------------------------------


def test_console_script_standalone_run_creates_and_checks_every_group():
    script = Path(sys.executable).with_name("mpu-bridge")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    run = _run([str(script), "selfcheck", "--nproc", "4", "--ep", "2", "4", "--hpz", "2", "--gpus-per-node", "2"])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MPU standalone (no MPU)" in run.stdout
    table = group_table(run.stdout)
    assert table["data_parallel"][:3] == ["4", "1", "reused"]  # the world: the default group
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


@needs_megatron
def test_sizes_that_do_not_fit_the_world_exit_2_with_the_layout_error(capsys):
    status = main(["selfcheck", "--nproc", "4", "--with-megatron", "--tp", "3"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err == (
        "mpu-bridge: error: world size 4 is not divisible by tp·pp·cp = 3 (tp=3, pp=1, cp=1); "
        "choose sizes whose product divides the world\n"
    )


def test_standalone_sizes_are_a_full_layout_and_are_validated_like_megatrons():
    # no MPU needed for model-parallel sizes any more: attach(None, tp=..., cp=...)
    assert validate(SelfCheckConfig(tp=2, cp=2), 4).size("dp") == 1
    with pytest.raises(LayoutError, match=re.escape("world size 4 is not divisible by tp·pp·cp = 3")):
        validate(SelfCheckConfig(tp=3), 4)


@needs_megatron
def test_exports_without_a_collection_class_exit_2_before_any_rank(monkeypatch, capsys):
    import mpu_bridge.pg_collection as pg_collection
    from mpu_bridge.optional import MissingDependencyError

    def missing() -> None:
        raise MissingDependencyError("megatron-core 0.14.0 has no ProcessGroupCollection; first in 0.15.0")

    monkeypatch.setattr(pg_collection, "collection_class", missing)
    assert main(["selfcheck", "--nproc", "2", "--exports"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "mpu-bridge: error: megatron-core 0.14.0 has no ProcessGroupCollection; first in 0.15.0\n"


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


def test_expected_exports_of_one_rank_written_out():
    config = SelfCheckConfig(tp=2, pp=2, ep=(2,), etp=1)
    fields = ("tp", "pp", "embd", "pos_embd", "hcp", "intra_dp_cp", "intra_dist_opt", "tp_ep")
    # 8 ranks: tp 2, pp 2, dp 2; rank 6 is on the last stage (no position embedding)
    assert expected_exports(config, 8, 6, fields) == {
        "pg_collection.tp": (6, 7),
        "pg_collection.pp": (2, 6),
        "pg_collection.embd": (2, 6),
        "pg_collection.pos_embd": (),
        "pg_collection.intra_dp_cp": (4, 6),
        "pg_collection.intra_dist_opt": tuple(range(8)),
        "pg_collection.tp_ep": (6, 7),
        "device_mesh.pp": (2, 6),
        "device_mesh.dp": (4, 6),
        "device_mesh.cp": (6,),
        "device_mesh.tp": (6, 7),
        "device_mesh[ep=2].pp": (2, 6),
        "device_mesh[ep=2].edp": (4, 6),
        "device_mesh[ep=2].ep": (6, 7),
        "device_mesh[ep=2].etp": (6,),
    }
    with pytest.raises(LayoutError, match="no expectation for ProcessGroupCollection field 'new_field'"):
        expected_exports(config, 8, 6, ("new_field",))


def _export_result(rank: int, check: GroupCheck) -> RankResult:
    return RankResult(rank=rank, world_size=2, backend="gloo", checks=[check])


def test_the_report_fails_an_export_a_rank_misses_and_counts_members_only():
    member = GroupCheck("pg_collection.pos_embd", (0,), "reused", (0,), True, True, 0, True, 0)
    outside = GroupCheck("pg_collection.pos_embd", (), "none", (), True, member=False)
    text, passed = format_report(
        SelfCheckConfig(tp=2), 2, {0: _export_result(0, member), 1: _export_result(1, outside)}, {}, 1.0,
        launcher="spawned locally",
    )
    assert passed, text
    assert group_table(text)["pg_collection.pos_embd"] == ["1", "1", "reused", "1/1", "1/1", "2/2", "ok"]
    assert last_line(text) == "PASS: 0 group kinds and 1 exported fields/dims on 2 ranks, every check passed"
    wrong = GroupCheck("pg_collection.pos_embd", (), "none", (1,), False, member=False)
    text, passed = format_report(
        SelfCheckConfig(tp=2), 2, {0: _export_result(0, member), 1: _export_result(1, wrong)}, {}, 1.0,
        launcher="spawned locally",
    )
    assert not passed
    assert "pg_collection.pos_embd: rank 1 is in no group, the planner says [1]" in text
    assert last_line(text) == "FAIL: failed kinds: pg_collection.pos_embd"


def test_importing_the_selfcheck_does_not_import_torch():
    code = "import sys, mpu_bridge.selfcheck; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
