"""The planner is bounded by what it prints (issue 8, G7): geometry instead of rank lists.

* :class:`GroupView` / :class:`NodeSet` answer what a listed group would, checked
  against brute force on random rank grids;
* ``Layout.intra_node`` (now O(dims)) and the new ``group_view*`` / ``to_dict`` limits
  agree with the listed groups;
* the hpZ and all-to-all rows equal :mod:`mpu_bridge.partitions`' families;
* ``mpu-bridge plan`` at 2**24 and 2**62 ranks: every format answers, in bounded CPU
  time and memory, measured in a subprocess.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpu_bridge import groupview, partitions, planrows, render, text
from mpu_bridge.errors import LayoutError
from mpu_bridge.groupview import NODE_WALK_LIMIT, GroupView, partition_fits_nodes
from mpu_bridge.layout import KINDS, plan
from mpu_bridge.planrows import all_to_all_rows, hpz_row, kind_row
from mpu_bridge.render import MAX_LISTED_GROUPS, layout_report, render_text
from mpu_bridge.text import abbreviate_ranks

REPO_ROOT = Path(__file__).resolve().parents[1]

#: A rank grid: sizes of its dimensions (first fastest) and which ones vary inside a group.
grids = st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=4)


def _lattice(dims: List[Tuple[int, int]]) -> List[int]:
    offsets = [0]
    for count, step in dims:
        offsets = [o + i * step for i in range(count) for o in offsets]
    return offsets


def _grid_groups(grid: List[Tuple[int, bool]]) -> Tuple[int, List[Tuple[int, int]], List[List[int]]]:
    """World size, the varying dims (count, stride) and every group, by brute force."""
    strides, running = [], 1
    for size, _ in grid:
        strides.append(running)
        running *= size
    masked = [(size, stride) for (size, vary), stride in zip(grid, strides) if vary]
    fixed = [(size, stride) for (size, vary), stride in zip(grid, strides) if not vary]
    offsets = _lattice(masked)
    return running, masked, [[base + o for o in offsets] for base in _lattice(fixed)]


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- GroupView and NodeSet against brute force -----------------------------------------


@settings(max_examples=150, deadline=None)
@given(grids, st.integers(0, 1000))
def test_group_view_answers_like_the_listed_group(grid, pick):
    world, masked, groups = _grid_groups(grid)
    members = groups[pick % len(groups)]
    view = GroupView(members[0], tuple(masked))
    assert list(view) == members
    assert (view.size, len(view), view.last) == (len(members), len(members), members[-1])
    assert view.first(3) == members[:3]
    assert [view.index(r) for r in members] == list(range(len(members)))
    assert view[-1] == members[-1] and view[len(members) // 2] == members[len(members) // 2]
    gaps = {b - a for a, b in zip(members, members[1:])}
    assert view.stride == (gaps.pop() if len(gaps) == 1 else None)
    for rank in range(world + 1):
        assert (rank in view) == (rank in members)
        later = [m for m in members if m >= rank]
        assert view.next_at_or_after(rank) == (later[0] if later else None)
    assert abbreviate_ranks(view) == abbreviate_ranks(members)
    assert abbreviate_ranks(view, limit=2, show_count=False) == abbreviate_ranks(members, limit=2, show_count=False)


@settings(max_examples=150, deadline=None)
@given(grids, st.integers(0, 1000))
def test_node_set_equals_the_nodes_of_the_listed_group(grid, pick):
    world, masked, groups = _grid_groups(grid)
    members = groups[pick % len(groups)]
    view = GroupView(members[0], tuple(masked))
    for gpn in _divisors(world):
        nodes = sorted({r // gpn for r in members})
        found = view.nodes(gpn)
        assert found.count == len(nodes)
        assert found.first(len(nodes) + 1) == nodes
        assert found.last == nodes[-1]
        listed_view = found.as_view()
        if listed_view is not None:
            assert list(listed_view) == nodes
        if found.stride is not None:  # known strides are right; unknown ones only cost a longer head
            assert nodes == list(range(nodes[0], nodes[-1] + 1, found.stride))


@settings(max_examples=150, deadline=None)
@given(grids)
def test_partition_fits_nodes_is_exact(grid):
    world, masked, groups = _grid_groups(grid)
    for gpn in _divisors(world):
        brute = all(group[0] // gpn == group[-1] // gpn for group in groups)
        assert partition_fits_nodes(tuple(masked), gpn) is brute


@settings(max_examples=150, deadline=None)
@given(grids, st.integers(0, 1000))
def test_chunks_are_the_blocks_of_the_listed_group_or_refused(grid, pick):
    _, masked, groups = _grid_groups(grid)
    members = groups[pick % len(groups)]
    view = GroupView(members[0], tuple(masked))
    for size in _divisors(len(members)):
        blocks = [members[i : i + size] for i in range(0, len(members), size)]
        shapes = {tuple(r - block[0] for r in block) for block in blocks}
        if len(shapes) == 1:
            assert [list(view.chunk(i, size)) for i in range(len(blocks))] == blocks
        else:
            with pytest.raises(LayoutError, match="not all shaped alike"):
                view.chunk(0, size)


def test_a_node_set_too_irregular_to_walk_says_so():
    # steps of 3 and 5·3 ranks in nodes of 2: no closed form, more nodes than the walk allows
    view = GroupView(0, ((3, 1), (NODE_WALK_LIMIT, 5)))
    nodes = view.nodes(2)
    assert nodes.count is None
    assert nodes.first(4) == [0, 1, 2, 3]
    assert nodes.last == view.last // 2
    assert abbreviate_ranks(nodes).endswith("(count not worked out)")


@pytest.mark.parametrize("module", [groupview, text, planrows, render])
def test_docstring_examples_hold(module):
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


# -- Layout: geometry equals the listed groups -------------------------------------------

small_layouts = st.builds(
    lambda tp, cp, pp, dp, ep_pick, gpn_pick, order_pick, gtp, egtp_pick: (
        tp, cp, pp, dp, ep_pick, gpn_pick, order_pick, gtp, egtp_pick
    ),
    st.sampled_from([1, 2, 3, 4]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 6),
    st.integers(0, 10),
    st.integers(0, 20),
    st.sampled_from([
        "tp-cp-ep-dp-pp", "tp-cp-dp-ep-pp", "cp-tp-ep-dp-pp", "tp-dp-cp-ep-pp", "dp-tp-cp-ep-pp",
        "gtp_remat-tp-cp-ep-dp-pp",
    ]),
    st.sampled_from([1, 1, 2, 3]),  # megatron-core 0.19's gtp_remat (mostly off)
    st.integers(0, 10),
)


def _build(config):
    tp, cp, pp, dp, ep_pick, gpn_pick, order, gtp, egtp_pick = config
    world = tp * cp * pp * dp * gtp
    eps = _divisors(dp * cp * gtp)
    ep = eps[ep_pick % len(eps)]
    egtps = _divisors(dp * cp * gtp // ep)
    gpns = _divisors(world)
    sizes = dict(tp=tp, cp=cp, pp=pp, ep=ep, gtp_remat=gtp, expert_gtp_remat=egtps[egtp_pick % len(egtps)],
                 gpus_per_node=gpns[gpn_pick % len(gpns)])
    try:
        return plan(world, order=order, **sizes)
    except LayoutError:  # an order megatron-core refuses for these sizes
        return plan(world, **sizes)


@settings(max_examples=60, deadline=None)
@given(small_layouts)
def test_views_intra_node_and_to_dict_agree_with_the_listed_groups(config):
    layout = _build(config)
    gpn = layout.config.gpus_per_node
    for kind in KINDS:
        groups = layout.groups(kind)
        assert layout.intra_node(kind) is all(g[0] // gpn == g[-1] // gpn for g in groups)
        for index, group in enumerate(groups):
            assert list(layout.group_view(kind, index)) == group
        for rank in range(0, layout.world_size, 3):
            assert list(layout.group_view_of(kind, rank)) == layout.group_of(kind, rank)
    bounded = layout.to_dict(max_groups=3, max_members=2, max_ranks=4)
    full = layout.to_dict(max_groups=None)
    for kind, entry in bounded["kinds"].items():
        listed = entry["groups"]
        assert len(listed) == min(entry["num_groups"], 3, max(1, 4 // min(2, entry["size"])))
        assert all(group == real[: len(group)] for group, real in zip(listed, full["kinds"][kind]["groups"]))
        assert entry["truncated"] is (len(listed) < entry["num_groups"])
        if entry["size"] > 2:
            assert entry["members_truncated"] is True
            assert list(GroupView(0, entry["shape"])) == [r - listed[0][0] for r in full["kinds"][kind]["groups"][0]]
        else:
            assert "members_truncated" not in entry


def test_to_dict_without_limits_is_unchanged():
    layout = plan(16, tp=2, pp=2, ep=2, gpus_per_node=4)
    for kind, entry in layout.to_dict(max_groups=None)["kinds"].items():
        assert entry["groups"] == layout.groups(kind)
        assert set(entry) == {"description", "size", "num_groups", "groups", "truncated", "intra_node"}


def test_numpy_integers_are_accepted_everywhere():
    np = pytest.importorskip("numpy")
    layout = plan(np.int64(16), tp=np.int32(2), ep=np.int64(2), gpus_per_node=np.int64(4))
    assert layout.group_of("dp", np.int64(3)) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert list(layout.group_view("dp", np.int64(1))) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert len(layout.to_dict(max_groups=np.int64(1), max_members=np.int16(2))["kinds"]["dp"]["groups"]) == 1
    assert render_text(layout, rank=np.int64(3), max_groups=np.int64(1), fit_width=np.int64(40))
    assert list(GroupView(np.int64(1), ((np.int64(2), np.int64(4)),))) == [1, 5]
    assert hpz_row(layout, np.int64(2)).size == 2


# -- hpZ and all-to-all rows equal the partitions families --------------------------------


@pytest.mark.parametrize(
    "sizes",
    [dict(tp=2), dict(tp=2, pp=2), dict(cp=2), dict(tp=2, cp=2, ep=2), dict(pp=2, ep=4), dict()],
)
@pytest.mark.parametrize("partition_size", [1, 2, 4, 64])
def test_hpz_row_equals_the_hpz_family(sizes, partition_size):
    layout = plan(32, **sizes)
    row = hpz_row(layout, partition_size)
    block = partitions.hpz_block(layout, partition_size)
    family = partitions.hpz(layout, block, rank=0)
    assert (row.size, row.count) == (family.group_size, family.num_groups)
    assert [list(row.group(i)) for i in range(row.count)] == [list(g) for g in family.groups()]
    for rank in range(32):
        index, position, view = row.locate(rank)
        own = partitions.hpz(layout, block, rank).own
        assert tuple(view) == own and view[position] == rank and list(row.group(index)) == list(own)


def test_hpz_row_refuses_what_the_family_refuses():
    layout = plan(12, tp=2, order="cp-tp-ep-dp-pp")  # dp 6 after tp 2: any divisor works
    assert hpz_row(layout, 3).size == 3
    odd = plan(24, tp=2, cp=2, order="cp-tp-ep-dp-pp")  # dp·cp = 6 over strides 1 and 4
    with pytest.raises(LayoutError) as ours:
        hpz_row(odd, 3)
    with pytest.raises(LayoutError):
        partitions.hpz(odd, 3, rank=0)
    assert "shaped alike" in str(ours.value)
    with pytest.raises(LayoutError, match="does not divide the data-parallel size 4"):
        hpz_row(plan(8, tp=2), 3)


@pytest.mark.parametrize("world, gpn", [(16, 4), (8, 8), (24, 6), (32, 1)])
def test_all_to_all_rows_equal_the_all_to_all_family(world, gpn):
    layout = plan(world, gpus_per_node=gpn)
    rows = all_to_all_rows(layout)
    for rank in range(world):
        family = partitions.all_to_all(world, gpn, rank)
        assert [tuple(row.locate(rank)[2]) for row in rows] == [p.own for p in family]
        assert [(row.size, row.count) for row in rows] == [(p.group_size, p.num_groups) for p in family]
    assert rows[0].fits_nodes(gpn) is True
    if len(rows) > 1:
        assert rows[1].fits_nodes(gpn) is False


def test_kind_rows_mirror_the_layout():
    layout = plan(64, tp=2, pp=2, ep=4, gpus_per_node=8)
    for kind in KINDS:
        row = kind_row(layout, kind)
        assert (row.size, row.count, row.fits_nodes(8)) == (
            layout.size(kind), layout.num_groups(kind), layout.intra_node(kind)
        )
        assert row.locate(13) == (
            layout.group_index(kind, 13), layout.rank_in_group(kind, 13), layout.group_view_of(kind, 13)
        )


# -- what is cut is said ---------------------------------------------------------------------


def test_text_says_when_the_listing_is_capped():
    layout = plan(4 * MAX_LISTED_GROUPS, tp=2)
    out = render_text(layout, max_groups=None, fit_width=None)
    tp_line = next(line for line in out.splitlines() if line.startswith("tp "))
    assert tp_line.count("[") == MAX_LISTED_GROUPS and tp_line.endswith("…")
    assert f"(at most {MAX_LISTED_GROUPS} groups are listed per kind)" in out
    assert "at most" not in render_text(plan(16, tp=2), max_groups=None, fit_width=None)


def test_json_cuts_long_groups_and_says_so():
    layout = plan(2**20, tp=8, gpus_per_node=8)
    report = layout_report(layout, rank=777777, max_members=16, max_ranks=64)
    dp = report["kinds"]["dp"]
    assert dp["members_truncated"] is True and dp["shape"] == [[2**17, 8]]
    assert [len(g) for g in dp["groups"]] == [16, 16, 16, 16] and dp["truncated"] is True
    mine = report["rank"]["groups"]["dp"]
    assert mine["ranks"] == list(range(1, 8 * 16, 8)) and mine["ranks_truncated"] is True
    assert (mine["size"], mine["shape"]) == (2**17, [[2**17, 8]])
    assert mine["nodes"] == list(range(16)) and (mine["nodes_truncated"], mine["node_count"]) == (True, 2**17)
    tp = report["rank"]["groups"]["tp"]
    assert set(tp) == {"index", "position", "ranks", "nodes"}  # short groups: as before


# -- the command at 2**24 and 2**62 ranks, measured in a subprocess --------------------------

_MEASURE = r"""
import io, json, resource, sys, time, contextlib
start = time.process_time()
from mpu_bridge.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main(sys.argv[1:])
cpu = time.process_time() - start
try:  # this process's own peak (ru_maxrss can carry the forking parent's peak over exec)
    with open("/proc/self/status") as status_file:
        peak = next(int(line.split()[1]) for line in status_file if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
json.dump({"status": status, "cpu_s": cpu, "torch": "torch" in sys.modules, "maxrss_kb": peak,
           "out_chars": len(out.getvalue()), "tail": out.getvalue()[-2000:], "err": err.getvalue()},
          sys.stdout)
"""

#: issue 8 point 9: 3 s and 370 MB before (2**24), MemoryError at 2**62.
BIG = ["plan", "--world-size", str(2**24), "--tp", "8", "--pp", "8", "--ep", "16"]
HUGE = ["plan", "--world-size", str(2**62), "--tp", "8", "--pp", "8", "--ep", "16"]


def _measure(args: List[str]) -> Dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_plan_at_2_24_ranks_with_rank_is_fast_and_small():
    report = _measure([*BIG, "--rank", "9999999"])
    assert report["status"] == 0 and report["err"] == ""
    assert not report["torch"]
    # CPU time (the machine may be shared: wall time would measure the neighbours), imports included
    assert report["cpu_s"] < 1.0, report
    assert report["maxrss_kb"] < 150 * 1024, report
    mine = plan(2**24, tp=8, pp=8, ep=16).group_view_of("etp-ep-pp", 9999999)
    assert f"etp-ep-pp    12588       639  {abbreviate_ranks(mine, limit=16)}" in report["tail"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--rank", "4611686018427387000", "--gpus-per-node", "8", "--hpz", "64"],
        ["--rank", "12345678912345", "--format", "json", "--gpus-per-node", "8", "--hpz", "8"],
        ["--rank", "5", "--format", "svg", "--gpus-per-node", str(2**40)],
        ["--max-groups", "all", "--format", "json"],
        ["--max-groups", "all", "--gpus-per-node", "72057594037927936"],
        ["--max-groups", "1000000000000", "--format", "svg", "--color-by", "dp"],
        ["--gtp-remat", "4", "--expert-gtp-remat", "2", "--rank", "4611686018427387000", "--gpus-per-node", "8",
         "--budget", "--megatron", "0.19", "--all-gather"],
        ["--gtp-remat", "2", "--format", "json", "--rank", "12345678912345", "--budget", "--megatron", "0.19"],
        ["--expert-gtp-remat", "4", "--format", "svg", "--color-by", "egtp", "--rank", "3"],
    ],
)
def test_plan_at_2_62_ranks_answers_every_format_in_bounded_memory(extra):
    report = _measure([*HUGE, *extra])
    assert report["status"] == 0, report["err"]
    assert report["err"] == ""
    assert report["maxrss_kb"] < 150 * 1024, report
    assert report["cpu_s"] < 10, report
    assert report["out_chars"] < 20_000_000


def test_plan_json_at_2_62_ranks_parses_and_marks_what_is_cut():
    report = _measure([*HUGE, "--rank", "7", "--format", "json", "--gpus-per-node", "8"])
    assert report["status"] == 0
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "mpu_bridge", *HUGE, "--rank", "7", "--format", "json", "--gpus-per-node", "8"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    data = json.loads(out.stdout)
    dp = data["rank"]["groups"]["dp"]
    assert dp["ranks_truncated"] is True and dp["size"] == 2**62 // 64
    assert dp["node_count"] == dp["size"] and dp["nodes_truncated"] is True  # stride 8: a node each
    assert data["derived"]["a2a-global"]["members_truncated"] is True



# -- past sys.maxsize: views are read by size, never by len() -----------------------------------

#: A group of 2**63 ranks: one more than Python's len() can count.
PAST_MAXSIZE = GroupView(5, ((2**62, 1), (2, 2**62)))


def test_a_view_past_sys_maxsize_has_a_size_a_truth_and_a_reverse():
    view = PAST_MAXSIZE
    assert view.size == 2**63 == sys.maxsize + 1
    assert bool(view) is True  # truth must not ask len()
    assert list(zip(reversed(view), range(2))) == [(view.last, 0), (view.last - 1, 1)]
    assert view[-1] == view.last and view.index(view.last) == 2**63 - 1


def test_len_of_a_view_past_sys_maxsize_says_to_read_size():
    with pytest.raises(LayoutError, match=r"a group of 9223372036854775808 ranks is larger than len\(\) can "
                       r"count \(at most sys.maxsize = 9223372036854775807\); read view.size"):
        len(PAST_MAXSIZE)
    assert len(GroupView(0, ((sys.maxsize, 1),))) == sys.maxsize  # up to the limit it answers


#: Planner invocations of every format and option that reads views (small worlds: quick).
_PLANNER_ARGS = [
    ["--tp", "2", "--pp", "2", "--ep", "2"],
    ["--tp", "2", "--pp", "4", "--ep", "2", "--budget", "--all-gather"],
    ["--tp", "2", "--pp", "3", "--cp", "2", "--budget", "--format", "json", "--rank", "7", "--megatron", "0.16"],
    ["--tp", "2", "--gtp-remat", "2", "--ep", "2", "--expert-gtp-remat", "2", "--budget", "--megatron", "0.19",
     "--all-gather", "--format", "json"],
    ["--tp", "2", "--pp", "2", "--gpus-per-node", "4", "--hpz", "2", "--rank", "5"],
    ["--tp", "2", "--pp", "2", "--gpus-per-node", "4", "--hpz", "3", "--format", "json", "--max-groups", "all"],
    ["--tp", "2", "--ep", "2", "--gpus-per-node", "8", "--format", "svg", "--rank", "3", "--color-by", "dp"],
    ["--pp", "2", "--format", "svg"],
]


@pytest.mark.parametrize("extra", _PLANNER_ARGS)
def test_the_planner_never_calls_len_on_a_view(monkeypatch, capsys, extra):
    # len() of a view fails past sys.maxsize (2**63 - 1 ranks), so the planner reads .size; this
    # trips on any len() (or truth test through len()) of a view, at any size
    from mpu_bridge.cli import main

    def tripwire(view: GroupView) -> int:
        raise AssertionError(f"len() of a view {view!r}: read view.size")

    monkeypatch.setattr(GroupView, "__len__", tripwire)
    assert main(["plan", "--world-size", "48", *extra]) == 0, capsys.readouterr().err
    layout = plan(48, tp=2, pp=2, ep=2, gpus_per_node=4)
    layout.to_dict(max_groups=2, max_members=3)
    from mpu_bridge.budget import budget

    for megatron in ("0.16", "0.19"):
        budget(layout, 5, megatron=megatron, all_gather=True, hierarchical_cp=())


#: World sizes past sys.maxsize: 2**63 (the first), 2**64 + a multiple of 64, 10**38.
PAST_MAXSIZE_WORLDS = [2**63, 2**64 + 64 * 3, 10**38]


@pytest.mark.parametrize("world", PAST_MAXSIZE_WORLDS)
@pytest.mark.parametrize("extra", [
    ["--tp", "8"],
    ["--tp", "8", "--budget"],  # pp 1: tp-dp-cp spans the whole world, past sys.maxsize
    ["--tp", "8", "--pp", "2", "--budget", "--format", "json", "--rank", "12345"],
    ["--tp", "8", "--pp", "2", "--budget", "--all-gather", "--megatron", "0.19", "--gpus-per-node", "8"],
])
def test_plan_past_sys_maxsize_ranks_answers_with_and_without_budget(world, extra):
    # was: `plan --budget` at 2**63 ranks, tp 8: OverflowError from len() of a view, exit 1
    report = _measure(["plan", "--world-size", str(world), *extra])
    assert report["status"] == 0, report["err"]
    assert report["err"] == ""
    assert report["maxrss_kb"] < 150 * 1024, report
    if "--budget" in extra and "json" not in extra:
        assert "megatron-core groups on rank" in report["tail"]
