"""``mpu-bridge plan --module ...``: a multi-module layout planned module by module (issue 18).

Pure (no processes) except the last test, which holds the planner's per-module budget
against the groups a real span bridge makes on gloo.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest

from _multiproc import run_ranks
from mpu_bridge.budget import budget
from mpu_bridge.cli import main
from mpu_bridge.errors import LayoutError
from mpu_bridge.layout import plan
from mpu_bridge.module_plan import module_budget, modules_report, render_modules_text
from mpu_bridge.optional import is_available
from mpu_bridge.spans import parse_modules

MODULES = parse_modules(["encoder:ranks=8", "llm:tp=4,pp=2"])


def test_the_text_plan_lists_each_modules_span_and_sizes():
    text = render_modules_text(MODULES, 64)
    assert text.splitlines()[:3] == [
        "mpu-bridge plan: 64 ranks, 2 module(s)",
        "  encoder: ranks 0..7 (8), tp 1 pp 1 cp 1 ep 1 etp 1 dp 8",
        "  llm: ranks 8..63 (56), tp 4 pp 2 cp 1 ep 1 etp 4 dp 7",
    ]


def test_each_modules_plan_lists_its_groups_in_global_ranks():
    text = render_modules_text(MODULES, 64)
    assert "module llm (ranks [8,9,…,63] (56))" in text
    assert "56 ranks (8..63, rank_offset 8)" in text
    assert "[8,9,10,11] [12,13,14,15]" in text  # llm's first tensor-parallel groups


def test_the_json_plan_has_one_entry_per_module_with_its_groups():
    report = modules_report(MODULES, 64, max_groups=2)
    llm = report["modules"][1]
    assert (llm["name"], llm["rank_offset"], llm["ranks"]) == ("llm", 8, 56)
    assert llm["kinds"]["pp"]["groups"] == [[8, 36], [9, 37]]
    assert report["idle_ranks"] == []


def test_ranks_no_module_holds_are_named():
    report = modules_report(parse_modules(["a:ranks=4", "b:ranks=4,offset=8"]), 16)
    assert report["idle_ranks"] == [[4, 7], [12, 15]]
    assert "no module: ranks 4..7, 12..15" in render_modules_text(parse_modules(["a:ranks=4", "b:ranks=4,offset=8"]),
                                                                   16)


def test_a_rank_is_shown_in_the_modules_that_hold_it():
    report = modules_report(MODULES, 64, rank=9)
    assert report["rank"]["modules"] == [{"name": "llm"}]
    assert "rank" not in report["modules"][0]  # the encoder does not hold rank 9
    assert report["modules"][1]["rank"]["groups"]["tp"]["ranks"] == [8, 9, 10, 11]


def test_a_spans_budget_is_its_sizes_budget_plus_the_spans_own_group():
    world = budget(plan(56, tp=4, pp=2), 1, megatron="0.19")
    span = module_budget(plan(56, tp=4, pp=2, rank_offset=8), 9, 64, megatron="0.19")
    assert span["rank"] == 9
    assert span["per_rank"]["megatron"] == world["per_rank"]["megatron"]
    assert span["per_rank"]["bridge"]["communicators"] == world["per_rank"]["bridge"]["communicators"] + 1
    # megatron-core's rank_offset init: every rank of the world enters every new_group of the module
    assert span["world"]["megatron_new_group"]["gloo_on"] == world["world"]["megatron_new_group"]["gloo_on"] // 56 * 64
    assert span["world"]["bridge_split_group"] is None


def test_a_layout_over_the_whole_world_has_the_plain_budget():
    whole = module_budget(plan(16, tp=2), 3, 16, megatron="0.19")
    assert whole == {**budget(plan(16, tp=2), 3, megatron="0.19")}


def test_the_budget_of_a_rank_sums_its_colocated_modules():
    modules = parse_modules(["vision:tp=2,ranks=8", "llm:tp=4,offset=0,ranks=8"])
    report = modules_report(modules, 8, rank=3, budget_options={"megatron": "0.19"})
    per = [m["budget"]["per_rank"]["bridge"]["communicators"] for m in report["modules"]]
    assert report["rank"]["modules"] == [{"name": "vision"}, {"name": "llm"}]
    assert report["rank"]["bridge_communicators"] == sum(per)


def test_a_module_past_the_end_of_the_world_is_refused():
    with pytest.raises(LayoutError, match="module b would span ranks 4..11"):
        modules_report(parse_modules(["a:ranks=4", "b:ranks=8"]), 8)


def test_plan_with_modules_from_the_command_line(capsys):
    assert main(["plan", "--world-size", "64", "--module", "encoder:ranks=8", "--module", "llm:tp=4,pp=2",
                 "--budget", "--megatron", "0.19", "--rank", "9"]) == 0
    out = capsys.readouterr().out
    assert "rank 9 runs llm" in out
    assert "communicators on rank 9, all its modules: megatron-core 20 NCCL" in out


def test_plan_with_modules_as_json(capsys):
    assert main(["plan", "--world-size", "8", "--module", "a:ranks=2", "--module", "b:tp=2", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["rank_offset"], m["ranks"]) for m in report["modules"]] == [("a", 0, 2), ("b", 2, 6)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tp", "2"], "with --module, --tp cannot be given"),
        (["--format", "svg"], "not svg"),
        (["--megatron", "0.19"], "--megatron applies to the communicator budget; add --budget"),
    ],
)
def test_plan_with_modules_refuses_what_does_not_apply(extra, message, capsys):
    assert main(["plan", "--world-size", "8", "--module", "a:ranks=2", "--module", "b", *extra]) == 2
    assert message in capsys.readouterr().err


# -- the budget against a real span bridge ---------------------------------------------------------


def _distinct_sets(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import mpu_bridge

    encoder = mpu_bridge.attach(None, tp=1, local_world_size=2)
    llm = mpu_bridge.attach(None, tp=2, pp=2, rank_offset=2, local_world_size=4)
    sets: List[Any] = []
    for bridge in (encoder, llm):
        try:
            collection = bridge.process_group_collection()
        except mpu_bridge.OutsideSpanError:
            continue
        sets = sorted({tuple(dist.get_process_group_ranks(g)) for g in vars(collection).values()
                       if g is not None and not isinstance(g, list)})
    out = {"sets": sets}
    encoder.close()
    llm.close()
    return out


def test_the_per_module_budget_counts_the_rank_sets_a_span_bridge_holds():
    if not is_available("megatron.core.process_groups_config"):
        pytest.skip("needs megatron-core >= 0.15 (ProcessGroupCollection)")
    from mpu_bridge.budget import megatron_line

    observed = run_ranks(_distinct_sets, 6, timeout=180)
    for rank in (0, 3):
        layout = plan(2, tp=1) if rank < 2 else plan(4, tp=2, pp=2, rank_offset=2)
        counted = module_budget(layout, rank, 6, megatron=megatron_line())["per_rank"]["bridge"]["communicators"]
        assert len(observed[rank]["sets"]) == counted, (rank, observed[rank]["sets"])
