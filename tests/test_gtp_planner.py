"""The planner with megatron-core 0.19's Generalized Tensor Parallelism and all-gather twins.

``mpu-bridge plan --gtp-remat N --expert-gtp-remat N``: the header shows the GTP axis where
megatron-core puts it, the kinds' table lists the GTP kinds only when their size is above 1
(never the all-gather twins), JSON and SVG follow, and ``--budget --megatron 0.19
[--all-gather]`` counts the 0.19 groups. Expected rows are written out for small worlds.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from _reports import run, table_rows
from mpu_bridge.budget import budget
from mpu_bridge.layout import plan
from mpu_bridge.render import default_color_kind, render_text, row_width

#: 8 ranks, 2 nodes of 4 GPUs: tp 2, gtp_remat 2 (dense order tp-gtp_remat-cp-ep-dp-pp, dp 2).
GTP8 = ["plan", "--world-size", "8", "--tp", "2", "--gtp-remat", "2", "--gpus-per-node", "4"]
#: 16 ranks: tp 2, ep 2, expert_gtp_remat 2 (expert order tp-cp-ep-gtp_remat-dp-pp, edp 2).
EGTP16 = ["plan", "--world-size", "16", "--tp", "2", "--ep", "2", "--expert-gtp-remat", "2"]




def test_header_shows_the_gtp_axis_where_megatron_core_puts_it(capsys):
    _, out, _ = run(capsys, *GTP8)
    assert out.splitlines()[1:3] == [
        "  dense grid   tp 2 × gtp 2 × cp 1 × dp 2 × pp 1",
        "  expert grid  etp 2 × ep 1 × edp 4 × pp 1",
    ]
    _, out, _ = run(capsys, *EGTP16)
    assert out.splitlines()[1:3] == [
        "  dense grid   tp 2 × cp 1 × dp 8 × pp 1",
        "  expert grid  etp 2 × ep 2 × egtp 2 × edp 2 × pp 1",
    ]
    _, out, _ = run(capsys, *GTP8, "--order", "gtp_remat-tp-cp-ep-dp-pp")
    assert out.splitlines()[1] == "  dense grid   gtp 2 × tp 2 × cp 1 × dp 2 × pp 1"


def test_without_gtp_the_header_and_table_are_unchanged(capsys):
    _, out, _ = run(capsys, "plan", "--world-size", "8", "--tp", "2", "--gtp-remat", "1")
    assert "gtp" not in out


def test_kinds_table_lists_the_gtp_kinds_written_out(capsys):
    _, out, _ = run(capsys, *GTP8, "--max-groups", "all")
    rows = table_rows(out, "kind ")
    expected = {
        "tp": ["2", "4", "yes", "[0,1] [2,3] [4,5] [6,7]"],
        "dp": ["2", "4", "no — crosses nodes", "[0,4] [1,5] [2,6] [3,7]"],
        "mp": ["4", "2", "yes", "[0,1,2,3] [4,5,6,7]"],
        "tp-dp": ["8", "1", "no — crosses nodes", "[0,1,2,3,4,5,6,7]"],
        "edp": ["4", "2", "no — crosses nodes", "[0,2,4,6] [1,3,5,7]"],
        "gtp": ["2", "4", "yes", "[0,2] [1,3] [4,6] [5,7]"],
        "gtp-dp": ["4", "2", "no — crosses nodes", "[0,2,4,6] [1,3,5,7]"],
        "gtp-dp-cp": ["4", "2", "no — crosses nodes", "[0,2,4,6] [1,3,5,7]"],
    }
    assert {kind: rows[kind][1:] for kind in expected} == expected
    assert list(rows) == list(plan(8, tp=2, gtp_remat=2).kinds)
    assert "egtp" not in rows and "dp-cp-ag" not in rows and "edp-ag" not in rows


def test_expert_gtp_rows_written_out(capsys):
    _, out, _ = run(capsys, *EGTP16, "--max-groups", "2", "--rank", "5")
    rows = table_rows(out, "kind ")
    assert rows["egtp"][1:] == ["2", "8", "[0,4] [1,5] …"]
    assert rows["egtp-edp"][1:] == ["4", "4", "[0,4,8,12] [1,5,9,13] …"]
    assert rows["etp-ep-egtp-pp"][1:] == ["8", "2", "[0,1,2,3,4,5,6,7] [8,9,10,11,12,13,14,15]"]
    assert rows["edp"][1:] == ["2", "8", "[0,8] [1,9] …"]
    assert "gtp" not in rows  # the dense GTP size is 1
    mine = table_rows(out, "kind            group")
    assert mine["egtp"] == ["1", "1", "[1,5]"]
    assert mine["edp"] == ["5", "0", "[5,13]"]


def test_json_lists_the_gtp_kinds_and_sizes(capsys):
    _, out, _ = run(capsys, *GTP8, "--format", "json", "--rank", "5")
    data = json.loads(out)
    assert (data["config"]["gtp_remat"], data["config"]["expert_gtp_remat"], data["config"]["dp"]) == (2, 1, 2)
    assert list(data["kinds"]) == list(plan(8, tp=2, gtp_remat=2).kinds)
    assert data["kinds"]["gtp"]["groups"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert data["rank"]["groups"]["gtp"] == {"index": 3, "position": 0, "ranks": [5, 7], "nodes": [1]}
    assert data["rank"]["groups"]["gtp-dp-cp"]["ranks"] == [1, 3, 5, 7]


def test_svg_can_colour_by_a_gtp_kind_but_not_by_a_twin(capsys):
    status, out, _ = run(capsys, *GTP8, "--format", "svg", "--color-by", "gtp")
    assert status == 0
    root = ET.fromstring(out)
    groups = {
        int(g.get("data-rank")): int(g.get("data-group"))
        for g in root.iter("{http://www.w3.org/2000/svg}g")
        if "data-rank" in g.attrib
    }
    assert groups == {0: 0, 2: 0, 1: 1, 3: 1, 4: 2, 6: 2, 5: 3, 7: 3}
    assert "tp 2 × gtp 2 × cp 1 × dp 2 × pp 1" in out
    status, _, err = run(capsys, *GTP8, "--format", "svg", "--color-by", "dp-cp-ag")
    assert status == 2 and "invalid choice" in err


def test_default_colour_and_row_width_see_gtp():
    assert default_color_kind(plan(8, gtp_remat=2)) == "gtp"
    assert row_width(plan(48, tp=2, gtp_remat=3)) == 12  # a multiple of tp·gtp_remat·cp = 6


def test_budget_shows_the_0_19_kinds(capsys):
    status, out, _ = run(capsys, *GTP8, "--budget", "--megatron", "0.19")
    assert status == 0
    assert "megatron-core 0.19 line (megatron='0.19'; --megatron)" in out
    assert (
        "by kind (NCCL+gloo): gtp 1, dp-cp 1, dp 1, gtp-dp 1, gtp-dp-cp 1, cp 1, mp 1, tp 1, pp 1, embd 1, "
        "pos-embd 1, tp-dp-cp 1, tp-dp 1, tp-cp 1, egtp 1, ep 1, etp 1, etp-ep 1, etp-ep-pp 1, "
        "etp-ep-egtp-pp 1, edp 1, intra-dist-opt 1"
    ) in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("communicator budget"))
    rows = {line[:28].strip(): line[28:].split() for line in lines[start + 3 : start + 13]}
    assert rows["groups on rank 0 (NCCL)"] == ["22", "6"]
    assert rows["gloo twins (gloo on)"] == ["0", "0"]
    assert rows["new_group calls, world"] == ["760", "48"]
    assert "note:" not in out


def test_budget_all_gather_counts_the_twins_and_says_so(capsys):
    args = ["plan", "--world-size", "16", "--tp", "2", "--pp", "2", "--ep", "2", "--budget", "--megatron", "0.19"]
    _, plain, _ = run(capsys, *args)
    status, out, _ = run(capsys, *args, "--all-gather")
    assert status == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("communicator budget"))
    rows = {line[:28].strip(): line[28:].split() for line in lines[start + 3 : start + 14]}
    assert rows["of which all-gather twins"] == ["2", "2"]
    assert "note: all-gather twins (dp-cp-ag, edp-ag): 2 extra communicator(s) per rank" in out
    assert "the one exception to one communicator per rank set" in out
    assert "all-gather twins" not in plain
    status, out, _ = run(capsys, *args, "--all-gather", "--format", "json")
    report = json.loads(out)["budget"]
    layout = plan(16, tp=2, pp=2, ep=2)
    assert report == json.loads(json.dumps(budget(layout, megatron="0.19", all_gather=True)))
    assert report["per_rank"]["bridge"]["twins"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gtp-remat", "3"], "not divisible by tp·pp·cp·gtp_remat = 6"),
        (["--gtp-remat", "0"], "gtp_remat must be a positive integer"),
        (["--expert-gtp-remat", "3"], "etp·ep·pp·expert_gtp_remat = 6"),
        (["--all-gather"], "--all-gather applies to the communicator budget; add --budget"),
        (["--megatron", "0.19"], "--megatron applies to the communicator budget; add --budget"),
        (["--budget", "--megatron", "0.18"], "needs megatron-core 0.19 or newer, but the budget models the 0.18"),
        (["--budget", "--megatron", "0.12.1"], "older than the oldest line the budget models (0.16)"),
        (["--budget", "--megatron", "new"], "version such as '0.19'"),
    ],
)
def test_bad_gtp_and_budget_options_exit_2_with_one_line(capsys, args, message):
    status, out, err = run(capsys, *GTP8, *args)
    assert (status, out) == (2, "")
    assert err.startswith("mpu-bridge: error: ") and message in err and err.count("\n") == 1


def test_render_text_of_a_gtp_layout_lists_each_kind_once():
    layout = plan(16, tp=2, gtp_remat=2, ep=2, expert_gtp_remat=2)
    rows = table_rows(render_text(layout, max_groups=1), "kind ")
    assert list(rows) == list(layout.kinds)
    assert [k for k in rows if "gtp" in k] == ["gtp", "gtp-dp", "gtp-dp-cp", "egtp", "egtp-edp", "etp-ep-egtp-pp"]
