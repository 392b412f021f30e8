"""Every invalid input to the layout engine and the planner on it raises LayoutError naming the numbers.

A LayoutError is also a ValueError (what callers catching bad arguments expect)
and a BridgeError (the library's base class). The checks are not ``assert``
statements: the last test runs the whole battery again under ``python -O``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List, NamedTuple

import pytest

from mpu_bridge import BridgeError, LayoutError, ParallelConfig, RankGrid, plan
from mpu_bridge.groupview import GroupView
from mpu_bridge.layout import Layout, expert_order
from mpu_bridge.planrows import all_to_all_rows, hpz_row, kind_row
from mpu_bridge.render import (
    abbreviate_ranks,
    default_color_kind,
    layout_report,
    render_json,
    render_svg,
    render_text,
    row_width,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

ALL_KINDS_LISTED = (
    "known kinds: tp, cp, dp, pp, dp-cp, tp-cp, tp-dp, tp-dp-cp, mp, "
    "ep, etp, edp, etp-ep, etp-ep-pp, gtp, gtp-dp, gtp-dp-cp, egtp, egtp-edp, etp-ep-egtp-pp, "
    "dp-cp-ag, edp-ag"
)


class Case(NamedTuple):
    call: Callable[[], Any]
    message_parts: List[str]


CASES = {
    # -- sizes that are not positive integers ------------------------------------
    "world size zero": Case(lambda: plan(0), ["world_size must be a positive integer", "got 0"]),
    "world size negative": Case(lambda: plan(-8), ["world_size", "got -8"]),
    "world size float": Case(lambda: plan(8.0), ["world_size", "8.0", "float"]),
    "tp zero": Case(lambda: plan(8, tp=0), ["tp must be a positive integer", "got 0"]),
    "pp negative": Case(lambda: plan(8, pp=-2), ["pp must be a positive integer", "got -2"]),
    "cp zero": Case(lambda: plan(8, cp=0), ["cp must be a positive integer", "got 0"]),
    "ep zero": Case(lambda: plan(8, ep=0), ["ep must be a positive integer", "got 0"]),
    "etp zero": Case(lambda: plan(8, etp=0), ["etp must be a positive integer", "got 0"]),
    "tp float": Case(lambda: plan(8, tp=2.0), ["tp", "2.0", "float"]),
    "etp float": Case(lambda: plan(8, etp=1.5), ["etp", "1.5", "float"]),
    "tp string": Case(lambda: plan(8, tp="2"), ["tp", "'2'", "str"]),
    "tp bool": Case(lambda: plan(8, tp=True), ["tp", "True", "bool"]),
    "pp bool": Case(lambda: plan(8, pp=False), ["pp", "False", "bool"]),
    "ep None": Case(lambda: plan(8, ep=None), ["ep", "None", "NoneType"]),
    "gpus_per_node zero": Case(
        lambda: plan(8, gpus_per_node=0), ["gpus_per_node must be a positive integer", "got 0"]
    ),
    "gpus_per_node bool": Case(lambda: plan(8, gpus_per_node=True), ["gpus_per_node", "bool"]),
    "parallel config tp zero": Case(
        lambda: ParallelConfig(8, tp=0), ["tp must be a positive integer", "got 0"]
    ),
    # -- divisibility -------------------------------------------------------------
    "world not divisible by tp pp": Case(
        lambda: plan(12, tp=2, pp=4),
        ["world size 12", "tp·pp·cp = 8", "tp=2, pp=4, cp=1"],
    ),
    "world not divisible by tp cp": Case(
        lambda: plan(24, tp=4, cp=4),
        ["world size 24", "tp·pp·cp = 16", "tp=4, pp=1, cp=4"],
    ),
    "world not divisible by etp ep": Case(
        lambda: plan(12, tp=2, ep=4),
        ["world size 12", "etp·ep·pp = 8", "etp=2, ep=4, pp=1", "dp·cp = 6", "ep = 4"],
    ),
    "dp cp not divisible by ep": Case(
        lambda: plan(24, tp=2, cp=3, ep=8),
        ["world size 24", "etp·ep·pp = 16", "dp·cp = 12", "ep = 8"],
    ),
    "world not divisible by a separate etp": Case(
        lambda: plan(12, tp=3, ep=2, etp=4),
        ["world size 12", "etp·ep·pp = 8", "etp=4, ep=2, pp=1"],
    ),
    "world not divisible by gpus_per_node": Case(
        lambda: plan(24, gpus_per_node=16), ["world size 24", "gpus_per_node = 16"]
    ),
    # -- order strings -------------------------------------------------------------
    "unknown order token": Case(
        lambda: plan(8, order="tp-cp-xp-dp-pp"),
        ["'tp-cp-xp-dp-pp'", "unknown token 'xp'", "tp, cp, ep, dp, pp"],
    ),
    "order with underscores": Case(
        lambda: plan(8, order="tp_dp_pp"), ["unknown token 'tp_dp_pp'", "joined by '-'"]
    ),
    "empty order": Case(lambda: plan(8, order=""), ["unknown token ''"]),
    "order not a string": Case(
        lambda: plan(8, order=("tp", "dp")), ["order must be a string", "tuple"]
    ),
    "order None": Case(lambda: plan(8, order=None), ["order must be a string", "None"]),
    "repeated order token": Case(
        lambda: plan(8, order="tp-dp-tp-pp"), ["'tp-dp-tp-pp'", "'tp' twice"]
    ),
    "order missing ep": Case(
        lambda: plan(16, tp=2, ep=4, order="tp-dp-pp"),
        ["'tp-dp-pp'", "does not name 'ep'", "ep = 4", "add 'ep' to the order"],
    ),
    "order missing dp": Case(
        lambda: plan(8, tp=2, order="tp-pp"), ["does not name 'dp'", "dp = 4"]
    ),
    "order missing cp": Case(
        lambda: plan(8, cp=2, order="tp-ep-dp-pp"), ["does not name 'cp'", "cp = 2"]
    ),
    "order missing pp": Case(
        lambda: plan(8, pp=2, order="tp-cp-ep-dp"), ["does not name 'pp'", "pp = 2"]
    ),
    "order missing tp with etp above one": Case(
        lambda: plan(8, ep=2, etp=2, order="cp-ep-dp-pp"), ["does not name 'tp'", "etp = 2"]
    ),
    "order missing dp with edp above one": Case(
        lambda: plan(8, tp=2, cp=4, etp=1, order="tp-cp-ep-pp"),
        ["does not name 'dp'", "edp = 8"],
    ),
    # -- where pp may stand ------------------------------------------------------------
    "pp not last with edp != dp": Case(
        lambda: plan(16, tp=2, pp=2, ep=4, order="tp-cp-ep-pp-dp"),
        ["'tp-cp-ep-pp-dp'", "pp last", "pp = 2", "edp = 1", "dp = 4"],
    ),
    "pp not last with different pipeline strides": Case(
        lambda: plan(16, tp=2, pp=2, ep=2, etp=1, order="tp-pp-ep-dp-cp"),
        ["'tp-pp-ep-dp-cp'", "stride 2", "stride 1", "etp=1, tp=2", "put 'pp' last"],
    ),
    # -- ranks ---------------------------------------------------------------------------
    "rank equal to world size": Case(
        lambda: plan(8, tp=2).group_of("tp", 8), ["rank 8", "world of 8 ranks", "0..7"]
    ),
    "negative rank": Case(lambda: plan(8, tp=2).group_of("tp", -1), ["rank -1", "0..7"]),
    "rank outside world in group_index": Case(
        lambda: plan(8, tp=2).group_index("dp", 100), ["rank 100", "0..7"]
    ),
    "rank outside world in rank_in_group": Case(
        lambda: plan(8, tp=2).rank_in_group("dp", 9), ["rank 9", "0..7"]
    ),
    "rank outside world in node_of": Case(
        lambda: plan(16, gpus_per_node=8).node_of(16), ["rank 16", "0..15"]
    ),
    "float rank": Case(
        lambda: plan(8).group_of("tp", 1.0), ["rank must be an integer", "1.0", "float"]
    ),
    "bool rank": Case(lambda: plan(8).group_of("tp", True), ["rank must be an integer", "bool"]),
    "string rank": Case(lambda: plan(8).group_of("tp", "0"), ["rank must be an integer", "str"]),
    # -- kinds ----------------------------------------------------------------------------
    "unknown kind in group_of": Case(
        lambda: plan(8).group_of("tensor", 0), ["'tensor'", ALL_KINDS_LISTED]
    ),
    "unknown kind in groups": Case(lambda: plan(8).groups("dp_cp"), ["'dp_cp'", ALL_KINDS_LISTED]),
    "unknown kind in iter_groups": Case(
        lambda: list(plan(8).iter_groups("expert")), ["'expert'", ALL_KINDS_LISTED]
    ),
    "unknown kind in size": Case(lambda: plan(8).size(""), ["''", ALL_KINDS_LISTED]),
    "unknown kind in num_groups": Case(
        lambda: plan(8).num_groups("pipeline"), ["'pipeline'", ALL_KINDS_LISTED]
    ),
    "unknown kind in group": Case(lambda: plan(8).group("zero", 0), ["'zero'", ALL_KINDS_LISTED]),
    "unknown kind in intra_node": Case(
        lambda: plan(8, gpus_per_node=8).intra_node("node"), ["'node'", ALL_KINDS_LISTED]
    ),
    "unhashable kind": Case(lambda: plan(8).groups(["tp"]), ["['tp']", ALL_KINDS_LISTED]),
    # -- group indices ---------------------------------------------------------------------
    "group index past the end": Case(
        lambda: plan(8, tp=2).group("tp", 4), ["group index 4", "0..3", "'tp'"]
    ),
    "negative group index": Case(lambda: plan(8, tp=2).group("tp", -1), ["group index -1", "0..3"]),
    "bool group index": Case(lambda: plan(8, tp=2).group("tp", True), ["group index True"]),
    "float group index": Case(lambda: plan(8, tp=2).group("dp", 1.0), ["group index 1.0", "0..1"]),
    # -- nodes -------------------------------------------------------------------------------
    "intra_node without gpus_per_node": Case(
        lambda: plan(8, tp=2).intra_node("tp"), ["intra_node needs gpus_per_node"]
    ),
    "node_of without gpus_per_node": Case(
        lambda: plan(8).node_of(0), ["node_of needs gpus_per_node"]
    ),
    # -- one rank grid ---------------------------------------------------------------------------
    "rank grid with ep and cp": Case(
        lambda: RankGrid.build(ep=2, cp=4), ["ep = 2 and cp = 4", "plan("]
    ),
    "rank grid size zero": Case(lambda: RankGrid.build(dp=0), ["dp must be a positive integer"]),
    "rank grid missing token": Case(
        lambda: RankGrid.build(tp=2, order="cp-dp-pp"), ["does not name 'tp'", "tp = 2"]
    ),
    "rank grid unknown token": Case(
        lambda: RankGrid.build(tp=2).groups(("tp", "xp")), ["unknown dimension token 'xp'", "tp, cp"]
    ),
    "rank grid tokens as one string": Case(
        lambda: RankGrid.build(tp=2).groups("tp"), ["tuple of dimension tokens", "the string 'tp'"]
    ),
    "rank grid tokens not iterable": Case(
        lambda: RankGrid.build(tp=2).geometry(3), ["tuple of dimension tokens", "int"]
    ),
    "rank grid rank outside": Case(
        lambda: RankGrid.build(tp=2, dp=2).group_of(("tp",), 4), ["rank 4", "world of 4 ranks", "0..3"]
    ),
    "rank grid bool rank": Case(
        lambda: RankGrid.build(tp=2).group_of(("tp",), True), ["rank must be an integer", "bool"]
    ),
    "rank grid size of unknown token": Case(
        lambda: RankGrid.build(tp=2).size_of("xx"), ["unknown dimension token 'xx'"]
    ),
    "layout of a non-config": Case(lambda: Layout("8"), ["Layout needs a ParallelConfig", "str", "plan("]),
    # -- export limits -----------------------------------------------------------------------
    "to_dict negative max_groups": Case(
        lambda: plan(8).to_dict(max_groups=-1), ["max_groups must be None (no limit) or an integer >= 0", "-1"]
    ),
    "to_dict bool max_groups": Case(lambda: plan(8).to_dict(max_groups=True), ["max_groups", "bool"]),
    "to_dict float max_groups": Case(lambda: plan(8).to_dict(max_groups=2.0), ["max_groups", "2.0", "float"]),
    "to_dict string max_groups": Case(lambda: plan(8).to_dict(max_groups="all"), ["max_groups", "'all'", "str"]),
    "to_dict zero max_members": Case(
        lambda: plan(8).to_dict(max_members=0), ["max_members must be a positive integer", "got 0"]
    ),
    "to_dict negative max_ranks": Case(lambda: plan(8).to_dict(max_ranks=-5), ["max_ranks", "-5"]),
    # -- expert orders ---------------------------------------------------------------------------
    "expert order None": Case(lambda: expert_order(None), ["order must be a string", "None"]),
    "expert order unknown token": Case(lambda: expert_order("tp-xp"), ["unknown token 'xp'"]),
    "expert order repeated token": Case(lambda: expert_order("tp-dp-dp"), ["'dp' twice"]),
    "expert order truthy string flag": Case(
        lambda: expert_order("tp-dp", "no"), ["data_before_expert must be True, False or None", "'no'", "str"]
    ),
    "expert order int flag": Case(
        lambda: expert_order("tp-dp", 1), ["data_before_expert must be True, False or None", "int"]
    ),
    # -- group views -----------------------------------------------------------------------------
    "group view index past the end": Case(
        lambda: plan(8, tp=2).group_view("tp", 4), ["group index 4", "0..3", "'tp'"]
    ),
    "group view bool index": Case(lambda: plan(8, tp=2).group_view("tp", False), ["group index False"]),
    "group view of a float rank": Case(
        lambda: plan(8).group_view_of("dp", 2.0), ["rank must be an integer", "float"]
    ),
    "group view of a rank outside": Case(lambda: plan(8).group_view_of("dp", 8), ["rank 8", "0..7"]),
    "group view of an unknown kind": Case(lambda: plan(8).group_view_of("dpx", 0), ["'dpx'", ALL_KINDS_LISTED]),
    "view with a negative start": Case(lambda: GroupView(-1, ((2, 1),)), ["first rank must be >= 0", "-1"]),
    "view with a zero step": Case(lambda: GroupView(0, ((2, 0),)), ["step must be a positive integer", "got 0"]),
    "view with a float count": Case(lambda: GroupView(0, ((2.0, 1),)), ["count", "2.0", "float"]),
    "view with overlapping dims": Case(
        lambda: GroupView(0, ((4, 1), (2, 2))), ["(count 2, step 2) overlaps", "span 3"]
    ),
    "view with a bad dim": Case(lambda: GroupView(0, ((2, 1, 3),)), ["(count, step) pair", "(2, 1, 3)"]),
    "view chunk not dividing": Case(
        lambda: GroupView(0, ((6, 1),)).chunk(0, 4), ["chunks of 4 ranks do not divide a group of 6"]
    ),
    "view chunks shaped unalike": Case(
        lambda: GroupView(0, ((2, 1), (3, 4))).chunk(0, 3), ["not all shaped alike"]
    ),
    "view chunk index outside": Case(lambda: GroupView(0, ((6, 1),)).chunk(3, 2), ["chunk index 3", "0..2"]),
    "view first negative": Case(lambda: GroupView(0, ((6, 1),)).first(-1), ["first(n) needs n >= 0", "-1"]),
    "view nodes of zero GPUs": Case(
        lambda: GroupView(0, ((6, 1),)).nodes(0), ["gpus_per_node must be a positive integer", "got 0"]
    ),
    # -- the planner's renderers and rows -----------------------------------------------------------
    "render text of a non-layout": Case(lambda: render_text("plan"), ["expected a Layout", "str"]),
    "render text negative max_groups": Case(
        lambda: render_text(plan(8), max_groups=-1), ["max_groups must be None (no limit) or an integer >= 0"]
    ),
    "render text bool max_groups": Case(lambda: render_text(plan(8), max_groups=True), ["max_groups", "bool"]),
    "render text zero fit_width": Case(
        lambda: render_text(plan(8), fit_width=0), ["fit_width must be a positive integer", "got 0"]
    ),
    "render text float fit_width": Case(lambda: render_text(plan(8), fit_width=56.0), ["fit_width", "float"]),
    "render text bool rank": Case(lambda: render_text(plan(8), rank=True), ["rank must be an integer", "bool"]),
    "render text rank outside": Case(lambda: render_text(plan(8), rank=8), ["rank 8", "0..7"]),
    "render text extra not a row": Case(lambda: render_text(plan(8), extra=["hpz"]), ["PlanRow", "'hpz'"]),
    "render json negative max_groups": Case(lambda: render_json(plan(8), max_groups=-2), ["max_groups", "-2"]),
    "render json zero max_members": Case(
        lambda: render_json(plan(8), max_members=0), ["max_members must be a positive integer"]
    ),
    "render json string rank": Case(lambda: render_json(plan(8), rank="3"), ["rank must be an integer", "str"]),
    "layout report of None": Case(lambda: layout_report(None), ["expected a Layout", "NoneType"]),
    "render svg negative max_groups": Case(lambda: render_svg(plan(8), max_groups=-1), ["max_groups", "-1"]),
    "render svg unknown kind": Case(lambda: render_svg(plan(8), color_by="xp"), ["'xp'", ALL_KINDS_LISTED]),
    "render svg float rank": Case(lambda: render_svg(plan(8), rank=1.5), ["rank must be an integer", "float"]),
    "default colour of a non-layout": Case(lambda: default_color_kind(8), ["expected a Layout", "int"]),
    "row width of a non-layout": Case(lambda: row_width({}), ["expected a Layout", "dict"]),
    "abbreviate negative limit": Case(
        lambda: abbreviate_ranks([1, 2], limit=-1), ["limit must be a positive integer", "-1"]
    ),
    "abbreviate truthy string flag": Case(
        lambda: abbreviate_ranks([1, 2], show_count="no"), ["show_count must be True or False", "'no'"]
    ),
    "kind row of an unknown kind": Case(lambda: kind_row(plan(8), "zz"), ["'zz'", ALL_KINDS_LISTED]),
    "hpz size not dividing dp": Case(
        lambda: hpz_row(plan(8, tp=2), 3), ["hpZ partition size 3", "data-parallel size 4"]
    ),
    "hpz size bool": Case(lambda: hpz_row(plan(8), True), ["partition_size", "bool"]),
    "hpz size zero": Case(lambda: hpz_row(plan(8), 0), ["partition_size must be a positive integer", "got 0"]),
    "hpz of a non-layout": Case(lambda: hpz_row("8", 2), ["expected a Layout", "str"]),
    "all-to-all without gpus_per_node": Case(
        lambda: all_to_all_rows(plan(8)), ["all-to-all groups need gpus_per_node"]
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_input_raises_layout_error_naming_the_numbers(name):
    case = CASES[name]
    with pytest.raises(LayoutError) as raised:
        case.call()
    message = str(raised.value)
    for part in case.message_parts:
        assert part in message


@pytest.mark.parametrize("name", list(CASES))
def test_layout_error_is_a_value_error_and_a_bridge_error(name):
    with pytest.raises(LayoutError) as raised:
        CASES[name].call()
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, BridgeError)


def test_the_etp_ep_divisibility_hint_is_only_given_when_etp_is_tp():
    with pytest.raises(LayoutError) as raised:
        plan(12, tp=3, ep=2, etp=4)
    assert "dp·cp" not in str(raised.value)


def test_type_errors_do_not_leak_from_the_validation():
    # a size of the wrong type is a LayoutError, never a bare TypeError
    with pytest.raises(LayoutError) as raised:
        plan(8, tp=object())
    assert not isinstance(raised.value, TypeError)


_OPTIMIZED_RUNNER = r"""
import json, sys
assert False, "this line only runs without -O"
sys.path.insert(0, sys.argv[1])
import test_layout_errors
from mpu_bridge import LayoutError
results = {}
for name, case in test_layout_errors.CASES.items():
    try:
        case.call()
    except LayoutError as exc:
        results[name] = ["LayoutError", str(exc)]
    except Exception as exc:
        results[name] = [type(exc).__name__, str(exc)]
    else:
        results[name] = ["no error", ""]
json.dump({"optimize": sys.flags.optimize, "results": results}, sys.stdout)
"""


def test_the_same_errors_come_out_under_python_dash_o():
    completed = subprocess.run(
        [sys.executable, "-O", "-c", _OPTIMIZED_RUNNER, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)
    assert report["optimize"] == 1
    expected = {}
    for name, case in CASES.items():
        with pytest.raises(LayoutError) as raised:
            case.call()
        expected[name] = ["LayoutError", str(raised.value)]
    assert report["results"] == expected
