"""compat/run_matrix.py: how it reads lines, finds their Python, counts a suite, and what CI runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mpu_bridge import support

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def matrix() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_matrix", ROOT / "compat" / "run_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_line_without_a_suite_runs_the_whole_suite(matrix):
    line = matrix.Line.from_json(
        {
            "name": "x",
            "constraints": "x.txt",
            "packages": {},
            "status": "supported",
            "python": "3.12",
            "torch": "2.15.0",
        }
    )
    assert line.suite == ["tests", "integration_tests"] and line.whole_suite
    assert (line.python, line.torch, line.ci) == ("3.12", "2.15.0", False)


def test_pytest_exit_5_is_not_a_failure_and_other_statuses_are(matrix):
    def result(rc, **counts):
        return matrix.Result(line="x", status="supported", installs=True, imports=True, suite_rc=rc, **counts)

    assert result(5).ok and result(5).suite_text() == "PASS (no test collected)"
    assert result(0, passed=3, skipped=1).suite_text() == "PASS (3 passed, 1 skipped)"
    assert not result(1, passed=3, failed=1).ok
    assert result(1, passed=3, failed=1, errors=1).suite_text() == "FAIL (3 passed, 2 failed)"
    assert not result(124, passed=3).ok and "pytest exit 124" in result(124, passed=3).suite_text()
    assert not result(2).ok


def test_failing_test_ids_are_read_from_the_junit_report(matrix):
    from xml.etree import ElementTree

    xml = """<testsuites><testsuite tests="5" failures="2" errors="2" skipped="0">
      <testcase classname="tests.test_matrix" name="test_ok"/>
      <testcase classname="tests.test_matrix" name="test_bad[a-b]"><failure message="x"/></testcase>
      <testcase classname="tests.test_matrix.TestThing" name="test_method"><failure message="x"/></testcase>
      <testcase classname="integration_tests.test_torchrun_suite" name="test_job"><error message="x"/></testcase>
      <testcase classname="" name="tests.test_matrix"><error message="collection"/></testcase>
    </testsuite></testsuites>"""
    assert matrix._failing_ids(ElementTree.fromstring(xml)) == [
        "tests/test_matrix.py::test_bad[a-b]",
        "tests/test_matrix.py::TestThing::test_method",
        "integration_tests/test_torchrun_suite.py::test_job",
        "tests/test_matrix.py",
    ]


def test_a_lines_python_is_found_on_path_or_in_pyenv_and_a_broken_shim_is_passed_over(matrix, tmp_path, monkeypatch):
    here = "%d.%d" % sys.version_info[:2]
    real = getattr(sys, "_base_executable", sys.executable)
    shims, pyenv = tmp_path / "shims", tmp_path / "pyenv"
    shims.mkdir()
    shim = shims / f"python{here}"
    shim.write_text("#!/bin/sh\necho 'pyenv: command not found' >&2\nexit 127\n")  # what pyenv's shim does
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", str(shims))
    monkeypatch.setenv("PYENV_ROOT", str(pyenv))
    assert matrix.find_python(here) is None
    installed = pyenv / "versions" / f"{here}.7" / "bin"
    installed.mkdir(parents=True)
    (installed / f"python{here}").symlink_to(real)
    assert matrix.find_python(here) == str(installed / f"python{here}")
    shim.unlink()
    shim.symlink_to(real)  # a working python3.X on PATH comes first
    assert matrix.find_python(here) == str(shim)
    assert matrix.find_python("3.99") is None


def test_a_line_that_disagrees_with_its_constraints_file_is_refused(matrix, tmp_path, monkeypatch):
    monkeypatch.setattr(matrix, "MATRIX", tmp_path)
    (tmp_path / "x.txt").write_text("# pins\ntorch==2.15.0\nmegatron-core==0.19.2\nDeepSpeed==0.19.8\n")
    entry = {
        "name": "x",
        "constraints": "x.txt",
        "status": "supported",
        "python": "3.12",
        "torch": "2.15.0",
        "packages": {"megatron-core": "0.19.2", "deepspeed": "0.19.8"},
    }
    assert matrix.check_line(matrix.Line.from_json(entry)) == []
    wrong = matrix.Line.from_json({**entry, "torch": "2.14.1", "python": "3.12.1"})
    problems = matrix.check_line(wrong)
    assert any("torch 2.14.1" in p for p in problems) and any("3.12.1" in p for p in problems)


def test_ci_runs_the_lines_marked_ci_and_the_newest_is_one_of_them(matrix):
    lines = matrix.load_lines()
    ci = [line for line in lines if line.ci]
    assert [line.name for line in ci] == ["newest"]
    (newest,) = ci
    assert newest.whole_suite and newest.status == "supported"
    for package, line in support.NEWEST_TESTED.items():
        version = newest.torch if package == "torch" else newest.packages[package]
        assert version.startswith(line + "."), (package, version, line)
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "scripts/run.sh test" in ci_script and "compat/run_matrix.py --ci" in ci_script


def test_support_md_is_generated_from_lines_json(matrix):
    assert (ROOT / "compat" / "SUPPORT.md").read_text() == matrix.support_markdown(), (
        "run: python compat/run_matrix.py --support-only"
    )
    rows = matrix._support_table().line_rows()
    names = [entry["name"] for entry in json.loads((ROOT / "compat" / "matrix" / "lines.json").read_text())["lines"]]
    assert [row[0] for row in rows] == names
