"""``mpu-bridge selfcheck --module ...``: a two-module layout proved by the same collectives (issue 18).

An encoder on ranks 0..1 and a language model on ranks 2..5: every rank builds both
modules' span bridges (as every rank builds every module's grid in megatron-core), each
proves its own module's groups with an all-reduce and a broadcast, and checks that the
other module's bridge refuses it. Two spawned runs (standalone spans; and over
``attach(multi-module collection, module=...)``, megatron-core >= 0.17), then the
options and the spans, in-process.
"""

from __future__ import annotations

import re
import sys

import pytest
from test_selfcheck import _run, group_table, last_line

from mpu_bridge.errors import LayoutError
from mpu_bridge.optional import is_available
from mpu_bridge.selfcheck import SelfCheckConfig, expected_groups, validate
from mpu_bridge.selfcheck.config import module_configs
from mpu_bridge.spans import ModuleSpec, parse_module, parse_modules, spans

MODULES = ["--nproc", "6", "--module", "encoder:ranks=2", "--module", "llm:tp=2,pp=2"]
KINDS = ["tensor_parallel", "pipeline_parallel", "data_parallel", "sequence_parallel", "sequence_data_parallel",
         "model_parallel", "expert_parallel[ep=1]", "expert_data_parallel[ep=1]", "world"]


def _selfcheck(*args: str):
    return _run([sys.executable, "-m", "mpu_bridge.selfcheck", *args])


@pytest.fixture(scope="module")
def two_modules():
    return _selfcheck(*MODULES)


def test_a_two_module_run_passes(two_modules):
    assert two_modules.returncode == 0, two_modules.stdout + two_modules.stderr
    assert last_line(two_modules.stdout) == "PASS: 18 group kinds on 6 ranks, every check passed"


def test_a_two_module_run_has_a_row_per_module_and_kind(two_modules):
    table = group_table(two_modules.stdout)
    assert list(table) == [f"{module}/{kind}" for module in ("encoder", "llm") for kind in KINDS]


def test_each_module_is_proved_by_its_own_ranks_and_checked_refused_by_the_others(two_modules):
    table = group_table(two_modules.stdout)
    # [size, groups, communicator, all-reduce, broadcast, planner, result]
    assert table["encoder/data_parallel"][:2] == ["2", "1"]
    assert table["encoder/data_parallel"][3:] == ["2/2", "2/2", "6/6", "ok"]
    assert table["llm/tensor_parallel"][:2] == ["2", "2"]
    assert table["llm/pipeline_parallel"][3:] == ["4/4", "4/4", "6/6", "ok"]
    assert table["llm/world"][:2] == ["4", "1"]


def test_a_two_module_run_names_the_spans_and_prints_each_modules_plan(two_modules):
    first = two_modules.stdout.splitlines()[0]
    assert "MPU standalone rank spans (encoder 0..1, llm 2..5)" in first
    assert "module encoder:" in two_modules.stdout and "module llm:" in two_modules.stdout


def test_a_two_module_run_over_the_multi_module_collection_borrows_each_modules_groups():
    if not _has_multi_module():
        pytest.skip("--module with --via-collection needs megatron-core >= 0.17")
    run = _selfcheck("--nproc", "6", "--module", "encoder:ranks=2", "--module", "llm:ep=2", "--via-collection")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MultiModuleProcessGroupCollection of standalone rank spans" in run.stdout.splitlines()[0]
    table = group_table(run.stdout)
    assert table["llm/expert_parallel[ep=2]"][2] == "borrowed"
    assert table["encoder/tensor_parallel"][2] == "borrowed"
    assert last_line(run.stdout) == "PASS: 18 group kinds on 6 ranks, every check passed"


def _has_multi_module() -> bool:
    if not is_available("megatron.core"):
        return False
    from megatron.core import process_groups_config

    return hasattr(process_groups_config, "MultiModuleProcessGroupCollection")


# -- the options and the spans (no ranks) ----------------------------------------------------


def test_a_module_spec_is_a_name_and_sizes():
    assert parse_module("llm:tp=2,pp=2,ranks=4") == ModuleSpec("llm", (("tp", 2), ("pp", 2)), 4)
    assert parse_module("encoder") == ModuleSpec("encoder")


@pytest.mark.parametrize(
    "text, message",
    [
        (":tp=2", "a module needs a name"),
        ("llm:tq=2", "'tq=2' is not KEY=N"),
        ("llm:tp=0", "tp must be a positive integer, got '0'"),
        ("llm:tp=2,tp=4", "tp is given twice"),
    ],
)
def test_a_malformed_module_spec_says_what_is_wrong(text, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        parse_module(text)


def test_module_names_must_differ():
    with pytest.raises(LayoutError, match="llm is given more than once"):
        parse_modules(["llm", "llm:tp=2"])


def test_modules_take_consecutive_spans_and_the_last_takes_the_rest():
    modules = parse_modules(["a:ranks=2", "b:ranks=3", "c"])
    assert [(m.name, offset, size) for m, offset, size in spans(modules, 8)] == [("a", 0, 2), ("b", 2, 3),
                                                                                 ("c", 5, 3)]


@pytest.mark.parametrize(
    "texts, world, message",
    [
        (["a", "b"], 4, "--module a needs ranks=N"),
        (["a:ranks=6"], 4, "module a would span ranks 0..5"),
        (["a:ranks=2"], 4, "cover ranks 0..1 of a world of 4"),
    ],
)
def test_spans_that_do_not_tile_the_world_are_refused(texts, world, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        spans(parse_modules(texts), world)


def test_with_modules_the_top_level_sizes_are_refused():
    config = SelfCheckConfig(tp=2, modules=parse_modules(["a:ranks=2", "b"]))
    with pytest.raises(LayoutError, match=re.escape("with --module, --tp cannot be given")):
        validate(config, 4)


def test_a_module_that_does_not_fit_its_span_is_refused_naming_its_sizes():
    config = SelfCheckConfig(modules=parse_modules(["a:ranks=2", "b:tp=3"]))
    with pytest.raises(LayoutError, match=re.escape("world size 4 is not divisible by tp·pp·cp = 3")):
        validate(config, 6)


def test_each_modules_expected_groups_are_its_spans_and_none_elsewhere():
    config = SelfCheckConfig(modules=parse_modules(["encoder:ranks=2", "llm:tp=2,pp=2"]))
    (_, encoder), (_, llm) = module_configs(config, 6)
    assert expected_groups(llm, 6, 5)["pipeline_parallel"] == (3, 5)
    assert expected_groups(llm, 6, 5)["world"] == (2, 3, 4, 5)
    assert expected_groups(llm, 6, 1)["tensor_parallel"] == ()
    assert expected_groups(encoder, 6, 1)["data_parallel"] == (0, 1)
