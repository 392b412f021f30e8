"""The ``mpu-bridge`` command: ``plan`` as text, JSON and SVG, its errors, and its import cost.

Most tests call ``main([...])`` in-process; a few run the installed console script
and ``python -m mpu_bridge`` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _reports import run, table_rows
from mpu_bridge.cli import main
from mpu_bridge.layout import KINDS, plan
from mpu_bridge.render import abbreviate_ranks, layout_report, render_svg

#: The kinds a layout without GTP lists (the planner's rows).
LISTED = plan(8).kinds

SVG = "{http://www.w3.org/2000/svg}"

#: 16 ranks, 4 nodes of 4 GPUs: tp 2, pp 2, ep 2 (dp 4, edp 2).
PLAN16 = ["plan", "--world-size", "16", "--tp", "2", "--pp", "2", "--ep", "2", "--gpus-per-node", "4"]
#: The main job's layout: 64 ranks, 8 nodes of 8 GPUs, tp 2, pp 2, ep 4.
PLAN64 = ["plan", "--world-size", "64", "--tp", "2", "--pp", "2", "--ep", "4", "--gpus-per-node", "8"]
#: A million ranks.
PLAN1M = ["plan", "--world-size", "1048576", "--tp", "8", "--pp", "4", "--ep", "8", "--gpus-per-node", "8"]




def svg_cells(text: str) -> Dict[int, Tuple[int, str]]:
    """rank -> (group index, fill of the cell's first rect) for every drawn cell."""
    root = ET.fromstring(text)
    cells = {}
    for element in root.iter(f"{SVG}g"):
        if "data-rank" in element.attrib:
            fill = element.find(f"{SVG}rect").get("fill")
            cells[int(element.get("data-rank"))] = (int(element.get("data-group")), fill)
    return cells


# -- text ------------------------------------------------------------------------


def test_text_header_states_every_size(capsys):
    status, out, _ = run(capsys, *PLAN16)
    assert status == 0
    header = "\n".join(out.splitlines()[:3])
    assert "16 ranks = 4 nodes × 4 GPUs" in header
    assert "order tp-cp-ep-dp-pp" in header
    assert "dense grid   tp 2 × cp 1 × dp 4 × pp 2" in header
    assert "expert grid  etp 2 × ep 2 × edp 2 × pp 2" in header


def test_text_has_one_row_per_kind_with_size_and_count(capsys):
    _, out, _ = run(capsys, *PLAN16)
    rows = table_rows(out, "kind ")
    layout = plan(16, tp=2, pp=2, ep=2, gpus_per_node=4)
    assert list(rows) == list(LISTED)
    for kind, cells in rows.items():
        assert cells[0] == KINDS[kind].description
        assert int(cells[1]) == layout.size(kind)
        assert int(cells[2]) == layout.num_groups(kind)


def test_text_lists_the_first_groups(capsys):
    _, out, _ = run(capsys, *PLAN16)
    first = {kind: cells[-1] for kind, cells in table_rows(out, "kind ").items()}
    assert first["tp"] == "[0,1] [2,3] [4,5] [6,7] …"
    assert first["pp"] == "[0,8] [1,9] [2,10] [3,11] …"
    assert first["ep"] == "[0,2] [1,3] [4,6] [5,7] …"
    assert first["edp"] == "[0,4] [1,5] [2,6] [3,7] …"
    assert first["tp-dp"] == "[0,1,2,3,4,5,6,7] [8,9,10,11,12,13,14,15]"  # all groups: no "…"


def test_text_says_which_kinds_cross_nodes(capsys):
    _, out, _ = run(capsys, *PLAN16)
    column = {kind: cells[3] for kind, cells in table_rows(out, "kind ").items()}
    inside = {"tp", "cp", "tp-cp", "ep", "etp", "etp-ep"}
    for kind in LISTED:
        assert column[kind] == ("yes" if kind in inside else "no — crosses nodes"), kind


def test_text_without_gpus_per_node_has_no_node_column(capsys):
    _, out, _ = run(capsys, "plan", "--world-size", "16", "--tp", "2", "--pp", "2", "--ep", "2")
    assert "in one node?" not in out
    assert "crosses nodes" not in out
    assert "pass --gpus-per-node" in out
    assert "16 ranks (GPUs per node not given)" in out


def test_text_shortens_long_groups(capsys):
    _, out, _ = run(capsys, "plan", "--world-size", "128", "--tp", "8")
    first = {kind: cells[-1] for kind, cells in table_rows(out, "kind ").items()}
    assert first["dp"].startswith("[0,8,…,120] (16) [1,9,…,121] (16)")


def test_text_rank_shows_its_group_of_every_kind(capsys):
    _, out, _ = run(capsys, *PLAN16, "--rank", "5")
    assert "rank 5 on node 1 (ranks 4..7)" in out
    rows = table_rows(out, "kind       group")
    # cells: group index, position in group, members, nodes spanned
    assert rows == {
        "tp": ["2", "1", "[4,5]", "node 1"],
        "cp": ["5", "0", "[5]", "node 1"],
        "dp": ["1", "2", "[1,3,5,7]", "2 nodes [0,1]"],
        "pp": ["5", "0", "[5,13]", "2 nodes [1,3]"],
        "dp-cp": ["1", "2", "[1,3,5,7]", "2 nodes [0,1]"],
        "tp-cp": ["2", "1", "[4,5]", "node 1"],
        "tp-dp": ["0", "5", "[0,1,2,3,4,5,6,7]", "2 nodes [0,1]"],
        "tp-dp-cp": ["0", "5", "[0,1,2,3,4,5,6,7]", "2 nodes [0,1]"],
        "mp": ["2", "1", "[4,5,12,13]", "2 nodes [1,3]"],
        "ep": ["3", "0", "[5,7]", "node 1"],
        "etp": ["2", "1", "[4,5]", "node 1"],
        "edp": ["1", "1", "[1,5]", "2 nodes [0,1]"],
        "etp-ep": ["1", "1", "[4,5,6,7]", "node 1"],
        "etp-ep-pp": ["1", "1", "[4,5,6,7,12,13,14,15]", "2 nodes [1,3]"],
    }


def test_text_max_groups_bounds_the_groups_listed(capsys):
    _, out, _ = run(capsys, *PLAN16, "--max-groups", "2")
    first = {kind: cells[-1] for kind, cells in table_rows(out, "kind ").items()}
    assert first["tp"] == "[0,1] [2,3] …"
    _, out, _ = run(capsys, *PLAN16, "--max-groups", "all")
    first = {kind: cells[-1] for kind, cells in table_rows(out, "kind ").items()}
    assert first["tp"] == "[0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]"


def test_text_at_a_million_ranks_answers_for_one_rank(capsys):
    status, out, _ = run(capsys, *PLAN1M, "--rank", "777777")
    assert status == 0
    assert "1048576 ranks = 131072 nodes × 8 GPUs" in out
    rows = table_rows(out, "kind ")
    assert rows["ep"][1:4] == ["8", "131072", "no — crosses nodes"]
    assert rows["tp"][1:4] == ["8", "131072", "yes"]
    mine = table_rows(out, "kind        group")
    assert mine["ep"][:3] == ["97217", "6", "[777729,777737,777745,777753,777761,777769,777777,777785]"]
    assert mine["tp-dp"][2] == "[524288,524289,…,786431] (262144)"


@pytest.mark.parametrize(
    "ranks, text",
    [
        ([0, 1], "[0,1]"),
        (list(range(0, 128, 8)), "[0,8,…,120] (16)"),
        ([0, 1, 4, 5, 8, 9, 12, 13, 16, 17], "[0,1,4,5,…,17] (10)"),
        (list(range(8)), "[0,1,2,3,4,5,6,7]"),
    ],
)
def test_abbreviate_ranks(ranks, text):
    assert abbreviate_ranks(ranks) == text


# -- JSON ------------------------------------------------------------------------


def test_json_equals_the_layout_description(capsys):
    status, out, _ = run(capsys, *PLAN16, "--format", "json")
    assert status == 0
    data = json.loads(out)
    expected = plan(16, tp=2, pp=2, ep=2, gpus_per_node=4).to_dict(max_groups=8)
    assert data["kinds"] == expected["kinds"]
    assert data["config"] == {**expected["config"], "nodes": 4}
    assert "rank" not in data


def test_json_rank_lists_its_groups(capsys):
    _, out, _ = run(capsys, *PLAN16, "--format", "json", "--rank", "5")
    mine = json.loads(out)["rank"]
    assert (mine["rank"], mine["node"]) == (5, 1)
    assert mine["groups"]["dp"] == {"index": 1, "position": 2, "ranks": [1, 3, 5, 7], "nodes": [0, 1]}
    assert mine["groups"]["ep"] == {"index": 3, "position": 0, "ranks": [5, 7], "nodes": [1]}
    assert mine["groups"]["edp"] == {"index": 1, "position": 1, "ranks": [1, 5], "nodes": [0, 1]}
    assert mine["groups"]["mp"]["ranks"] == [4, 5, 12, 13]
    assert list(mine["groups"]) == list(LISTED)


def test_json_max_groups_all_lists_every_group(capsys):
    _, out, _ = run(capsys, *PLAN16, "--format", "json", "--max-groups", "all")
    data = json.loads(out)
    layout = plan(16, tp=2, pp=2, ep=2, gpus_per_node=4)
    for kind in LISTED:
        assert data["kinds"][kind]["groups"] == layout.groups(kind)
        assert data["kinds"][kind]["truncated"] is False


def test_json_without_gpus_per_node_has_no_nodes(capsys):
    _, out, _ = run(capsys, "plan", "--world-size", "8", "--tp", "2", "--format", "json", "--rank", "3")
    data = json.loads(out)
    assert data["config"]["nodes"] is None
    assert data["rank"]["node"] is None
    assert data["rank"]["groups"]["tp"] == {"index": 1, "position": 1, "ranks": [2, 3]}
    assert "intra_node" not in data["kinds"]["tp"]


# -- SVG -------------------------------------------------------------------------


def test_svg_draws_one_cell_per_rank(capsys):
    status, out, _ = run(capsys, *PLAN64, "--format", "svg", "--color-by", "ep")
    assert status == 0
    assert sorted(svg_cells(out)) == list(range(64))


def test_svg_ranks_of_one_ep_group_share_a_fill(capsys):
    _, out, _ = run(capsys, *PLAN64, "--format", "svg", "--color-by", "ep")
    cells = svg_cells(out)
    layout = plan(64, tp=2, pp=2, ep=4, gpus_per_node=8)
    fills = []
    for index, group in enumerate(layout.groups("ep")):
        assert {cells[r][0] for r in group} == {index}
        group_fills = {cells[r][1] for r in group}
        assert len(group_fills) == 1
        fills.extend(group_fills)
    assert len(set(fills[:12])) == 12  # neighbouring groups get different colours


def test_svg_defaults_to_ep_colouring_and_says_groups_stay_in_node(capsys):
    _, out, _ = run(capsys, *PLAN64, "--format", "svg")
    stays = "coloured by ep (expert parallel): 16 groups of 4 ranks — every group stays inside one node"
    assert stays in out
    _, out, _ = run(capsys, *PLAN64, "--format", "svg", "--color-by", "dp")
    assert "coloured by dp (data parallel): 4 groups of 16 ranks — groups cross nodes" in out


def test_svg_tells_groups_beyond_the_palette_apart(capsys):
    _, out, _ = run(capsys, *PLAN64, "--format", "svg", "--color-by", "ep")
    root = ET.fromstring(out)
    hatched = set()
    for element in root.iter(f"{SVG}g"):
        if "data-rank" in element.attrib:
            rects = element.findall(f"{SVG}rect")
            if len(rects) > 1:
                hatched.add(int(element.get("data-group")))
    assert hatched == {12, 13, 14, 15}  # the palette has 12 colours; 16 ep groups


def test_svg_outlines_the_rank_and_its_group(capsys):
    _, out, _ = run(capsys, *PLAN64, "--format", "svg", "--color-by", "ep", "--rank", "13")
    assert "rank 13 (node 1) is in ep group #3 [9,11,13,15] (outlined)" in out
    root = ET.fromstring(out)
    widths = {}
    for element in root.iter(f"{SVG}g"):
        if "data-rank" in element.attrib:
            widths[int(element.get("data-rank"))] = element.find(f"{SVG}rect").get("stroke-width")
    assert widths[13] == "3"
    assert {r for r, w in widths.items() if w == "2"} == {9, 11, 15}


def test_svg_is_deterministic(capsys):
    _, first, _ = run(capsys, *PLAN64, "--format", "svg")
    _, second, _ = run(capsys, *PLAN64, "--format", "svg")
    assert first == second


def test_svg_summarises_a_million_ranks(capsys):
    status, out, _ = run(capsys, *PLAN1M, "--format", "svg", "--rank", "777777")
    assert status == 0
    root = ET.fromstring(out)
    assert sum(1 for _ in root.iter()) < 2000
    cells = svg_cells(out)
    assert sorted(cells) == list(range(64))  # nodes 0..7: the first 8 ep groups, whole
    assert "showing nodes 0..7 of 131072 (ranks 0..63 of 1048576)" in out
    assert "rank 777777 (node 97222) is in ep group #97217" in out
    assert "(not drawn)" in out


def test_svg_of_groups_spanning_the_world_stays_small(capsys):
    _, out, _ = run(capsys, *PLAN1M, "--format", "svg", "--color-by", "tp-dp")
    cells = svg_cells(out)
    assert 0 < len(cells) <= 512
    assert "showing nodes 0.." in out


def test_svg_without_gpus_per_node_draws_rows(capsys):
    _, out, _ = run(capsys, "plan", "--world-size", "48", "--tp", "3", "--format", "svg")
    cells = svg_cells(out)
    assert sorted(cells) == list(range(48))
    assert "rows of 12 ranks" in out  # tp·cp = 3, widened to the first multiple ≥ 8 dividing 48


small_configs = st.builds(
    lambda tp, cp, pp, dp, ep_pick, gpn_pick, kind: (tp, cp, pp, dp, ep_pick, gpn_pick, kind),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 6),
    st.integers(0, 10),
    st.integers(0, 10),
    st.sampled_from(list(LISTED)),
)


@settings(max_examples=40)
@given(small_configs)
def test_svg_cells_follow_the_layout(config):
    tp, cp, pp, dp, ep_pick, gpn_pick, kind = config
    world = tp * cp * pp * dp
    ep_choices = [e for e in range(1, dp * cp + 1) if (dp * cp) % e == 0]
    ep = ep_choices[ep_pick % len(ep_choices)]
    gpn_choices = [None] + [g for g in range(1, world + 1) if world % g == 0]
    gpn = gpn_choices[gpn_pick % len(gpn_choices)]
    layout = plan(world, tp=tp, cp=cp, pp=pp, ep=ep, gpus_per_node=gpn)
    cells = svg_cells(render_svg(layout, color_by=kind))
    assert sorted(cells) == list(range(world))
    fill_of_group = {}
    for rank, (index, fill) in cells.items():
        assert index == layout.group_index(kind, rank)
        assert fill_of_group.setdefault(index, fill) == fill


@settings(max_examples=30)
@given(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.integers(1, 8), st.integers(0, 40))
def test_json_report_equals_to_dict(tp, pp, dp, rank_pick):
    world = tp * pp * dp
    layout = plan(world, tp=tp, pp=pp)
    rank = rank_pick % world
    report = json.loads(json.dumps(layout_report(layout, rank=rank, max_groups=3)))
    assert report["kinds"] == json.loads(json.dumps(layout.to_dict(max_groups=3)["kinds"]))
    for kind in LISTED:
        assert report["rank"]["groups"][kind]["ranks"] == layout.group_of(kind, rank)


# -- hpZ and all-to-all rows ------------------------------------------------------


def test_text_shows_hpz_and_all_to_all_rows_in_their_own_table(capsys):
    status, out, _ = run(capsys, *PLAN16, "--hpz", "2", "--rank", "5")
    assert status == 0
    rows = table_rows(out, "family ")
    assert rows["hpz"] == [
        "ZeRO++ hpZ: blocks of 2 of each dp x cp group", "2", "8", "yes", "[0,2] [4,6] [1,3] [5,7] …"
    ]
    assert rows["a2a-local"][1:4] == ["4", "4", "yes"]
    assert rows["a2a-global"][1:] == ["4", "4", "no — crosses nodes", "[0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]"]
    assert list(table_rows(out, "kind ")) == list(LISTED)  # the kinds' table is unchanged
    mine = table_rows(out, "family      group")
    assert mine == {
        "hpz": ["3", "0", "[5,7]", "node 1"],
        "a2a-local": ["1", "1", "[4,5,6,7]", "node 1"],
        "a2a-global": ["1", "1", "[1,5,9,13]", "4 nodes [0,1,2,3]"],
    }


def test_all_to_all_rows_need_gpus_per_node_and_hpz_needs_the_option(capsys):
    _, out, _ = run(capsys, "plan", "--world-size", "16", "--tp", "2")
    assert "family" not in out and "a2a-" not in out and "hpz" not in out
    _, out, _ = run(capsys, "plan", "--world-size", "16", "--tp", "2", "--hpz", "4")
    assert list(table_rows(out, "family ")) == ["hpz"]
    _, out, _ = run(capsys, "plan", "--help")
    assert "--hpz" in out and "all-to-all" in out


def test_json_lists_hpz_and_all_to_all_under_derived(capsys):
    _, out, _ = run(capsys, *PLAN16, "--hpz", "2", "--rank", "5", "--format", "json")
    data = json.loads(out)
    assert list(data["kinds"]) == list(LISTED)
    assert list(data["derived"]) == ["hpz", "a2a-local", "a2a-global"]
    assert data["derived"]["hpz"]["groups"] == [[0, 2], [4, 6], [1, 3], [5, 7], [8, 10], [12, 14], [9, 11], [13, 15]]
    assert data["derived"]["a2a-global"]["intra_node"] is False
    assert data["rank"]["derived"]["hpz"] == {"index": 3, "position": 0, "ranks": [5, 7], "nodes": [1]}


@pytest.mark.parametrize(
    "args, message",
    [
        (PLAN16 + ["--hpz", "3"], "mpu-bridge: error: hpZ partition size 3 does not divide the data-parallel size 4"),
        (PLAN16 + ["--hpz", "0"], "mpu-bridge: error: partition_size must be a positive integer, got 0"),
        (
            ["plan", "--world-size", "24", "--tp", "2", "--cp", "2", "--order", "cp-tp-ep-dp-pp", "--hpz", "3"],
            "mpu-bridge: error: chunks of 3 ranks of a group shaped",
        ),
    ],
)
def test_bad_hpz_exits_2_with_one_line(capsys, args, message):
    status, out, err = run(capsys, *args)
    assert (status, out) == (2, "")
    assert err.startswith(message)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["plan", "--world-size", 8], "plan --world-size 8", [b"plan"]])
def test_main_refuses_arguments_that_are_not_strings(capsys, argv):
    status = main(argv)
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err.startswith("mpu-bridge: error: arguments must be a list of strings")


# -- output and errors -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json", "svg"])
def test_output_writes_the_file_and_nothing_to_stdout(capsys, tmp_path, fmt):
    target = tmp_path / f"plan.{fmt}"
    status, out, err = run(capsys, *PLAN64, "--format", fmt, "--output", str(target))
    assert (status, out, err) == (0, "", "")
    _, expected, _ = run(capsys, *PLAN64, "--format", fmt)
    assert target.read_text(encoding="utf-8") == expected


def test_unwritable_output_is_an_error(capsys, tmp_path):
    status, out, err = run(capsys, *PLAN16, "--output", str(tmp_path / "missing" / "plan.txt"))
    assert status == 1
    assert err.startswith("mpu-bridge: error: cannot write")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["plan", "--world-size", "12", "--tp", "2", "--pp", "4"],
            "mpu-bridge: error: world size 12 is not divisible by tp·pp·cp = 8",
        ),
        (PLAN16 + ["--rank", "16"], "mpu-bridge: error: rank 16 is outside the world of 16 ranks"),
        (PLAN16 + ["--rank", "-1"], "mpu-bridge: error: rank -1 is outside the world of 16 ranks"),
        (PLAN16[:3] + ["--tp", "0"], "mpu-bridge: error: tp must be a positive integer, got 0"),
        (
            ["plan", "--world-size", "16", "--order", "tp-xx"],
            "mpu-bridge: error: order 'tp-xx' has unknown token 'xx'",
        ),
        (
            ["plan", "--world-size", "16", "--gpus-per-node", "3"],
            "mpu-bridge: error: world size 16 is not divisible by gpus_per_node = 3",
        ),
    ],
)
def test_bad_sizes_exit_2_with_one_line(capsys, args, message):
    status, out, err = run(capsys, *args)
    assert status == 2
    assert out == ""
    assert err.startswith(message)
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (PLAN16 + ["--format", "svg", "--color-by", "xp"], "argument --color-by: invalid choice: 'xp'"),
        (PLAN16 + ["--max-groups", "0"], "argument --max-groups: expected a positive integer or 'all'"),
        (PLAN16 + ["--format", "png"], "argument --format: invalid choice: 'png'"),
        (["plan", "--tp", "2"], "the following arguments are required: --world-size"),
        (["plan", "--world-size", "eight"], "argument --world-size: invalid int value: 'eight'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(capsys, args, message):
    status, out, err = run(capsys, *args)
    assert status == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err


def test_help_lists_plan_and_exits_0(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "plan" in out
    status, out, _ = run(capsys, "plan", "--help")
    assert status == 0
    assert "--gpus-per-node" in out and "--color-by" in out


class _ClosedPipe:
    """A stdout whose reader has gone away, as under ``mpu-bridge plan ... | head -1``."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(PLAN16) == 1
    assert capsys.readouterr().err == ""


# -- as a user runs it -------------------------------------------------------------


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_console_script_prints_the_plan():
    script = Path(sys.executable).with_name("mpu-bridge")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    result = subprocess.run(
        [str(script), *PLAN64, "--rank", "13"], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert result.returncode == 0, result.stderr
    assert "rank 13 on node 1 (ranks 8..15)" in result.stdout
    assert table_rows(result.stdout, "kind ")["ep"][1:4] == ["4", "16", "yes"]


@pytest.mark.parametrize(
    "args",
    [
        ["--world-size", "16", "--hpz", "3"],
        ["--world-size", "16", "--rank", "-1", "--format", "json"],
        ["--world-size", "0", "--format", "svg"],
        ["--world-size", "16", "--tp", "2", "--ep", "16"],
    ],
)
def test_bad_input_is_one_line_under_python_dash_o(args):
    result = subprocess.run(
        [sys.executable, "-O", "-m", "mpu_bridge", "plan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("mpu-bridge: error: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_python_m_reports_bad_sizes_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "mpu_bridge", "plan", "--world-size", "12", "--tp", "2", "--pp", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("mpu-bridge: error: world size 12 is not divisible")
    assert "Traceback" not in result.stderr


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, mpu_bridge.cli, mpu_bridge.__main__; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"



# -- --budget --------------------------------------------------------------------

#: The budget of 16 ranks, tp 2, pp 2, modelled on the megatron-core 0.16 line (whatever is installed).
BUDGET16 = ("plan", "--world-size", "16", "--tp", "2", "--pp", "2", "--budget", "--megatron", "0.16")


def test_budget_text_compares_megatron_and_the_bridge(capsys):
    status, out, _ = run(capsys, *BUDGET16, "--comm-mb", "600")
    assert status == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("communicator budget"))
    assert "600 MiB per NCCL communicator" in lines[start]
    assert lines[start + 1] == "megatron-core 0.16 line (megatron='0.16'; --megatron)"
    rows = {line[:28].strip(): line[28:].split() for line in lines[start + 3 : start + 13]}
    assert rows["groups on rank 0 (NCCL)"] == ["17", "6"]
    assert rows["gloo twins (gloo on)"] == ["3", "0"]
    assert rows["new_group calls, world"] == ["2000", "96"]
    assert rows["with gloo off"] == ["1808", "96"]
    assert rows["comm memory, rank 0"] == ["10.0", "GiB", "3.5", "GiB"]
    assert "by kind (NCCL+gloo): dp-cp 1+1g, dp 1+1g" in out


def test_budget_json_matches_the_budget_module(capsys):
    from mpu_bridge.budget import DEFAULT_COMM_MB, budget

    status, out, _ = run(capsys, *BUDGET16, "--format", "json", "--rank", "9")
    assert status == 0
    report = json.loads(out)["budget"]
    assert report == json.loads(json.dumps(budget(plan(16, tp=2, pp=2), 9, megatron="0.16")))
    assert report["comm_mb"] == DEFAULT_COMM_MB
    assert report["per_rank"]["megatron"]["nccl"] == 16  # last stage: no position-embedding group
    assert report["world"]["megatron_new_group"] == {"gloo_on": 2000, "gloo_off": 1808}


def test_without_budget_there_is_no_budget(capsys):
    _, out, _ = run(capsys, *BUDGET16[:-3], "--format", "json")
    assert "budget" not in json.loads(out)
    _, out, _ = run(capsys, *BUDGET16[:-3])
    assert "communicator budget" not in out


@pytest.mark.parametrize("extra", [("--format", "svg"), ("--comm-mb", "-1"), ("--comm-mb", "inf"), ("--rank", "16")])
def test_budget_refuses_svg_and_negative_memory(capsys, extra):
    status, out, err = run(capsys, *BUDGET16, *extra)
    assert (status, out) == (2, "")
    assert err.startswith("mpu-bridge: error: ")


def test_budget_help_states_the_default_source(capsys):
    status, out, _ = run(capsys, "plan", "--help")
    assert status == 0
    assert "#2363" in out and "#964" in out
