#!/usr/bin/env python
"""Run mpu-bridge's test suite against every Python / torch / megatron-core / DeepSpeed release line.

Each line of ``compat/matrix/lines.json`` names its Python (``"python": "3.12"``), its
torch (``"torch": "2.15.0"``), a constraints file in ``compat/matrix/`` (exact pins) and
the tests that make up its suite (no ``"suite"`` key: the whole suite, ``tests`` and
``integration_tests``). For each selected line this script

1. builds a virtual environment from the line's Python and constraints file, or reuses
   the one it built before (a stamp holds the hash of the constraints file, the
   interpreter's version and the torch pin): ``pip install -c FILE torch==X`` first, so
   nothing can resolve another torch, then ``pip install -r FILE``, all with
   ``PIP_CONSTRAINT=FILE`` (which also replaces a constraints file of the machine's pip
   configuration), then mpu-bridge itself (``pip install --no-deps -e .``, redone only
   when ``pyproject.toml`` or the checkout's path changed);
2. checks that torch and the line's packages import on CPU (``megatron.core.parallel_state``;
   ``deepspeed`` with ``DS_ACCELERATOR=cpu``) and are the pinned versions;
3. runs the line's suite with pytest and counts passed / failed / skipped (pytest's exit
   status 5, no test collected, is not a failure);

then prints a table (line, installs?, imports?, suite result, time) and the failing tests.
The Python of a line is found as ``python3.X`` on ``PATH`` or in pyenv's
``$PYENV_ROOT/versions/3.X.*`` (each candidate is run once to check it works). Usage::

    python compat/run_matrix.py                         # every line (the nightly job)
    python compat/run_matrix.py --ci --keep-envs --envs-dir ~/.cache/mpu-bridge/matrix   # .ci/run
    python compat/run_matrix.py --only megatron-core-0.9 --only deepspeed-0.16
    python compat/run_matrix.py --only newest --python .venv-new/bin/python   # in an existing interpreter
    python compat/run_matrix.py --write-support         # also regenerate SUPPORT.md and the README tables
    python compat/run_matrix.py --support-only          # only regenerate them from lines.json
    python compat/run_matrix.py --build-only --keep-envs   # only build and import-check

Options: ``--envs-dir DIR`` (default ``$MPU_MATRIX_ENVS`` or ``/tmp/mpu-matrix``),
``--keep-envs`` (keep the environments after the run; by default each one is
removed after its line ran, unless it existed before), ``--python PATH`` (run a
single selected line in an existing interpreter instead of building one),
``--base-python PATH`` (the interpreter for lines that name no Python; default: this
one), ``--timeout S`` (per suite), ``--json FILE`` (results, failing test ids included).
One run at a time per line and envs dir: a second waits for the first (a lock file).

Exit status: 0 when every *supported* line installs, imports and passes its suite;
1 otherwise (an *unsupported* line never fails the run: its failure is expected and
its reason is in ``lines.json``); 2 for bad arguments.

Only the standard library is used here: the script runs under any Python 3.9+.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
MATRIX = REPO / "compat" / "matrix"
LINES_FILE = MATRIX / "lines.json"
SUPPORT_FILE = REPO / "compat" / "SUPPORT.md"
#: What a line with no "suite" key runs: the whole suite.
WHOLE_SUITE = ("tests", "integration_tests")
#: The torch of a line that names none (the local CPU build the older lines were run on).
DEFAULT_TORCH = "2.13.0"
IMPORT_CHECKS = {
    "torch": "import torch; print(torch.__version__)",
    "megatron-core": "import warnings; warnings.simplefilter('ignore'); "
    "from megatron.core import parallel_state; import megatron.core.package_info as p; print(p.__version__)",
    "deepspeed": "import deepspeed; print(deepspeed.__version__)",
}
BUILD_ENV = {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
#: pytest's exit status when it collected no test: not a failure of the line.
NO_TESTS_COLLECTED = 5


@dataclasses.dataclass(frozen=True)
class Line:
    """One release line: what to install, what to run, and whether it is supported."""

    name: str
    constraints: str
    packages: Dict[str, str]
    suite: List[str]
    status: str
    reason: str
    notes: str
    deselect: List[str]
    python: Optional[str] = None
    torch: str = DEFAULT_TORCH
    ci: bool = False
    build_isolation: bool = True

    @classmethod
    def from_json(cls, entry: dict) -> "Line":
        return cls(
            name=entry["name"],
            constraints=entry["constraints"],
            packages=dict(entry["packages"]),
            suite=list(entry.get("suite", WHOLE_SUITE)),
            status=entry["status"],
            reason=entry.get("reason", ""),
            notes=entry.get("notes", ""),
            deselect=list(entry.get("deselect", [])),
            python=entry.get("python"),
            torch=entry.get("torch", DEFAULT_TORCH),
            ci=bool(entry.get("ci", False)),
            build_isolation=bool(entry.get("build_isolation", True)),
        )

    @property
    def whole_suite(self) -> bool:
        return tuple(self.suite) == WHOLE_SUITE and not self.deselect


@dataclasses.dataclass
class Result:
    """What happened to one line in this run."""

    line: str
    status: str
    installs: Optional[bool] = None
    imports: Optional[bool] = None
    versions: str = ""
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    suite_rc: Optional[int] = None
    seconds: float = 0.0
    detail: str = ""
    failing: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(
            self.installs
            and self.imports
            and self.suite_rc in (0, NO_TESTS_COLLECTED)
            and not (self.failed or self.errors)
        )

    def suite_text(self) -> str:
        if self.suite_rc is None:
            return "not run"
        verdict = "PASS" if self.ok else "FAIL"
        if self.suite_rc == NO_TESTS_COLLECTED:
            return f"{verdict} (no test collected)"
        counts = f"{self.passed} passed"
        if self.failed or self.errors:
            counts += f", {self.failed + self.errors} failed"
        if self.skipped:
            counts += f", {self.skipped} skipped"
        if self.suite_rc not in (0, 1):  # interrupted, timed out, usage or internal error
            counts += f", pytest exit {self.suite_rc}"
        return f"{verdict} ({counts})"


def pinned_versions(path: Path) -> Dict[str, str]:
    """``{distribution: version}`` of the ``name==version`` lines of a constraints file."""
    pins = {}
    for match in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#;]+)", path.read_text(), re.M):
        pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def check_line(line: Line) -> List[str]:
    """What is inconsistent between a line and its constraints file (empty: nothing)."""
    path = MATRIX / line.constraints
    if not path.is_file():
        return [f"{line.name}: no constraints file compat/matrix/{line.constraints}"]
    pins = pinned_versions(path)
    problems = []
    for package, version in {"torch": line.torch, **line.packages}.items():
        if pins.get(package) != version:
            problems.append(f"{line.name}: says {package} {version}, {line.constraints} pins {pins.get(package)}")
    if line.python is not None and not re.fullmatch(r"3\.\d+", line.python):
        problems.append(f"{line.name}: python must be a minor version like 3.12, not {line.python!r}")
    return problems


def load_lines(path: Path = LINES_FILE) -> List[Line]:
    data = json.loads(path.read_text())
    lines = [Line.from_json(entry) for entry in data["lines"]]
    names = [line.name for line in lines]
    problems = [f"line {name} appears twice" for name in sorted(set(names)) if names.count(name) > 1]
    for line in lines:
        problems += check_line(line)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return lines


def find_python(minor: str) -> Optional[str]:
    """A working ``python<minor>`` with ``venv``: ``PATH``'s, then pyenv's (newest patch first)."""
    candidates = [p for p in (shutil.which(f"python{minor}"),) if p]  # may be a pyenv shim that fails
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}"))
    def patch_level(path: str) -> List[int]:
        return [int(x) for x in re.findall(r"\d+", Path(path).parents[1].name)]

    candidates += sorted(found, key=patch_level, reverse=True)
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return candidate
    return None


def _interpreter_version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def _stamp(line: Line, interpreter_version: str) -> str:
    """What the line's environment is built from: its constraints, Python and torch (not pyproject.toml)."""
    digest = hashlib.sha256()
    digest.update((MATRIX / line.constraints).read_bytes())
    digest.update(f"\0python {interpreter_version}\0torch {line.torch}\0".encode())
    if not line.build_isolation:
        digest.update(b"--no-build-isolation")
    return digest.hexdigest()


def _project_stamp() -> str:
    """What mpu-bridge's editable install depends on: its metadata and the checkout's path."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update(str(REPO).encode())
    return digest.hexdigest()


def _run(cmd: Sequence[str], log: Path, timeout: float, env: Optional[Dict[str, str]] = None) -> int:
    """Run ``cmd``, appending its output to ``log``; return its exit status (124 on timeout)."""
    full_env = dict(os.environ)
    full_env.update(BUILD_ENV)
    full_env.update(env or {})
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            return subprocess.run(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=full_env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[run_matrix] timed out after {timeout:g} s\n")
            return 124


def _tail(log: Path, lines: int = 3) -> str:
    text = [t for t in log.read_text(errors="replace").splitlines() if t.strip() and "is ignored" not in t]
    return " | ".join(text[-lines:])[-400:]


def _say(message: str) -> None:
    print(f"[run_matrix] {message}", file=sys.stderr, flush=True)


def build_env(line: Line, envs_dir: Path, base_python: str, result: Result) -> Optional[Path]:
    """Create (or reuse) the line's virtual environment; return its python, or None if it fails."""
    venv = envs_dir / line.name
    python = venv / "bin" / "python"
    stamp_file = venv / ".mpu-matrix-stamp"
    project_file = venv / ".mpu-matrix-project"
    log = envs_dir / f"{line.name}.install.log"
    interpreter = find_python(line.python) if line.python else base_python
    if interpreter is None:
        result.installs = False
        result.detail = f"no working Python {line.python} on this machine (python{line.python} on PATH, or pyenv)"
        return None
    want = _stamp(line, _interpreter_version(interpreter))
    constraints = str(MATRIX / line.constraints)
    # PIP_CONSTRAINT also reaches the isolated build environments of sdists (DeepSpeed),
    # so not even a build dependency can resolve another torch; it also replaces the
    # constraints file of this machine's pip configuration (an empty value would not).
    env = {"PIP_CONSTRAINT": constraints}
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == want:
        _say(f"{line.name}: reusing {venv}")
        steps = []
    else:
        if venv.exists():
            shutil.rmtree(venv)
        _say(f"{line.name}: building {venv} (Python {line.python or interpreter}, torch {line.torch})")
        log.write_text(f"[run_matrix] building {venv} from compat/matrix/{line.constraints} with {interpreter}\n")
        # "build_isolation": false in lines.json builds sdists in the line's own environment
        # (torch and setuptools from step 2): DeepSpeed 0.14's setup.py imports torch when
        # DS_ACCELERATOR=cpu, which an isolated build environment does not have.
        torch_pin = f"torch=={line.torch}"
        first = [torch_pin] if line.build_isolation else [torch_pin, "setuptools"]
        no_isolation = [] if line.build_isolation else ["--no-build-isolation"]
        steps = [
            [interpreter, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "-c", constraints, *first],
            [str(python), "-m", "pip", "install", "-q", *no_isolation, "-c", constraints, "-r", constraints],
        ]
    for cmd in steps:
        if _run(cmd, log, timeout=1800, env=env) != 0:
            result.installs = False
            result.detail = f"install failed: {_tail(log)} (log: {log})"
            return None
    if steps:
        stamp_file.write_text(want)
        project_file.unlink(missing_ok=True)
    project = _project_stamp()
    if not (project_file.exists() and project_file.read_text() == project):
        cmd = [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)]
        if _run(cmd, log, timeout=1800, env=env) != 0:
            result.installs = False
            result.detail = f"installing mpu-bridge failed: {_tail(log)} (log: {log})"
            return None
        project_file.write_text(project)
    result.installs = True
    return python


def check_imports(line: Line, python: Path, log: Path, result: Result) -> bool:
    versions = []
    for package in ["torch", *line.packages]:
        rc = subprocess.run(
            [str(python), "-c", IMPORT_CHECKS[package]],
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, **BUILD_ENV},
            timeout=600,
        )
        with log.open("a") as out:
            out.write(f"\n[import {package}] rc={rc.returncode}\n{rc.stdout}{rc.stderr}")
        if rc.returncode != 0:
            result.imports = False
            result.detail = f"import {package} failed: {(rc.stderr.strip().splitlines() or ['?'])[-1]}"
            return False
        version = (rc.stdout.strip().splitlines() or ["?"])[-1]
        wanted = line.torch if package == "torch" else line.packages[package]
        if version.split("+")[0] != wanted:  # "2.13.0+cpu": the local CPU build of torch 2.13.0
            result.imports = False
            result.detail = f"{package} imports as {version}, the line pins {wanted}"
            return False
        versions.append(f"{package} {version}")
    result.versions = ", ".join(versions)
    result.imports = True
    return True


def _failing_ids(root: ElementTree.Element) -> List[str]:
    """pytest ids (``path::name``) of the test cases with a failure or an error in a JUnit XML tree."""
    ids = []
    for case in root.iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        classname, name = case.get("classname", ""), case.get("name", "")
        if not classname:  # a module that failed to import: name is "tests.test_x"
            classname, name = name, ""
        parts = classname.split(".")
        # pytest writes "tests.test_x" or "tests.test_x.TestClass": the module is the longest
        # prefix that is a file of the checkout.
        for cut in range(len(parts), 0, -1):
            path = "/".join(parts[:cut]) + ".py"
            if (REPO / path).is_file():
                ids.append("::".join([path, *parts[cut:], *([name] if name else [])]))
                break
        else:
            ids.append(f"{classname}::{name}" if classname else name)
    return ids


def run_suite(line: Line, python: Path, log: Path, timeout: float, result: Result) -> None:
    files = [f for f in line.suite if (REPO / f).exists()]
    missing = [f for f in line.suite if not (REPO / f).exists()]
    if missing:
        result.detail = f"suite files not in this checkout (skipped): {', '.join(missing)}"
    junit = log.with_suffix(".junit.xml")
    if junit.exists():
        junit.unlink()
    # A module that fails to import counts as a failure, and the rest of the suite still runs.
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    cmd += [f"--junitxml={junit}", *files]
    for test_id in line.deselect:
        cmd += ["--deselect", test_id]
    result.suite_rc = _run(cmd, log, timeout=timeout)
    if junit.exists():
        root = ElementTree.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            tests = int(suite.get("tests", 0))
            failed, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
            result.failed += failed
            result.errors += errors
            result.skipped += skipped
            result.passed += tests - failed - errors - skipped
        result.failing = _failing_ids(root)
    if not result.ok and not result.detail:
        result.detail = _tail(log, 2)


def run_line(line: Line, args: argparse.Namespace) -> Result:
    result = Result(line=line.name, status=line.status)
    start = time.monotonic()
    envs_dir: Path = args.envs_dir
    envs_dir.mkdir(parents=True, exist_ok=True)
    log = envs_dir / f"{line.name}.log"
    with (envs_dir / f"{line.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this line in this envs dir waits here
        log.write_text("")
        existed = (envs_dir / line.name).exists()
        try:
            if args.python:
                python: Optional[Path] = Path(args.python)
                result.installs = True
            else:
                python = build_env(line, envs_dir, args.base_python, result)
            if python is not None and check_imports(line, python, log, result) and not args.build_only:
                _say(f"{line.name}: running {' '.join(line.suite)} (log: {log})")
                run_suite(line, python, log, args.timeout, result)
        finally:
            result.seconds = time.monotonic() - start
            if not args.python and not args.keep_envs and not existed:
                shutil.rmtree(envs_dir / line.name, ignore_errors=True)
    return result


def _yes_no(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def print_table(results: List[Result]) -> None:
    header = ("line", "status", "installs", "imports", "suite", "time")
    rows = [
        (r.line, r.status, _yes_no(r.installs), _yes_no(r.imports), r.suite_text(), f"{r.seconds:.0f} s")
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    for r in results:
        if r.detail and not r.ok:
            print(f"\n{r.line}: {r.detail}")
        if r.failing:
            print(f"\n{r.line}: failing tests ({len(r.failing)}):")
            for test_id in r.failing:
                print(f"  {test_id}")


def _support_table() -> ModuleType:
    """compat/support_table.py (the tables of SUPPORT.md and the README come from one place)."""
    spec = importlib.util.spec_from_file_location("support_table", REPO / "compat" / "support_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def support_markdown() -> str:
    """compat/SUPPORT.md, generated from lines.json (the recorded outcome of the last run of each line)."""
    out = [
        "# Supported upstream releases",
        "",
        "Generated by `python compat/run_matrix.py --write-support` from `compat/matrix/lines.json`;",
        "do not edit by hand. Every line is its own virtual environment of its Python, built from",
        "`compat/matrix/<constraints>` (exact pins), and runs its suite in gloo worlds of local",
        "processes; \"whole\" is the whole suite (`tests integration_tests`), and the last result",
        "counts its tests. CI (`.ci/run`) runs the project's own environment (`scripts/run.sh test`:",
        "Python 3.11, torch 2.13.0, megatron-core 0.16.1, DeepSpeed 0.19.8) and the lines marked",
        "`ci`; the nightly job runs them all: `python compat/run_matrix.py`.",
        "",
        *_support_table().line_table(with_suite_files=True),
        "",
        "`unsupported` lines are still run by the nightly job (their failure does not fail it),",
        "so a line that starts to pass is noticed. Constraints: `compat/matrix/<line>.txt`.",
        "",
        "(1) Portable suite: `integration_tests/test_megatron_versions.py` (initialises each",
        "release with the keyword arguments its signature has and reads its groups through",
        "the names it uses) plus the in-process tests of `tests/test_mpu_megatron_core.py`.",
        "Deselected there: the two multi-process tests, which call 0.12+'s API",
        "(`create_gloo_process_groups`, `expert_tensor_parallel_size`, the 0.10+ expert getters);",
        "`tests/test_bridge_megatron.py` is not run for the same reason. From 0.12 on every line",
        "runs the full suite, as 0.16 does.",
        "",
    ]
    return "\n".join(out)


def _record_results(path: Path, results: List[Result]) -> None:
    """Store each line's latest result in lines.json (the source of SUPPORT.md and the README)."""
    data = json.loads(path.read_text())
    by_name = {r.line: r for r in results}
    for entry in data["lines"]:
        r = by_name.get(entry["name"])
        if r is None:
            continue
        if not r.installs:
            text = "does not install"
        elif not r.imports:
            text = "does not import"
        else:
            text = r.suite_text()
        entry["last_result"] = f"{text}, {datetime.date.today().isoformat()}, {r.seconds:.0f} s"
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_support() -> None:
    SUPPORT_FILE.write_text(support_markdown())
    print(f"wrote {SUPPORT_FILE.relative_to(REPO)}")
    if _support_table().main(["--write"]) != 0:
        raise SystemExit("README.md: could not update its support tables")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this line (repeatable)")
    parser.add_argument("--ci", action="store_true", help="run the lines lines.json marks \"ci\" (.ci/run)")
    parser.add_argument("--keep-envs", action="store_true", help="keep the environments built in this run")
    parser.add_argument(
        "--envs-dir",
        type=Path,
        default=Path(os.environ.get("MPU_MATRIX_ENVS", "/tmp/mpu-matrix")),
        help="where the environments live (default: $MPU_MATRIX_ENVS or /tmp/mpu-matrix)",
    )
    parser.add_argument("--python", help="run the (single) selected line in this interpreter; build nothing")
    parser.add_argument(
        "--base-python", default=sys.executable, help="interpreter for the lines that name no Python (default: this)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per suite (default 3600)")
    parser.add_argument("--build-only", action="store_true", help="build and import-check; run no suite")
    parser.add_argument(
        "--write-support", action="store_true", help="record results in lines.json, write SUPPORT.md and the README"
    )
    parser.add_argument("--support-only", action="store_true", help="only regenerate SUPPORT.md and the README")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--list", action="store_true", help="list the lines and exit")
    args = parser.parse_args(argv)

    try:
        lines = load_lines()
    except ValueError as error:
        parser.error(str(error))
    if args.list:
        for line in lines:
            python = line.python or "-"
            print(f"{line.name:22} {line.status:12} python {python:5} torch {line.torch:7} {line.constraints}")
        return 0
    if args.support_only:
        write_support()
        return 0
    known = {line.name for line in lines}
    unknown = [name for name in args.only if name not in known]
    if unknown:
        parser.error(f"unknown line(s) {unknown}; known: {sorted(known)}")
    everything = not args.only and not args.ci
    selected = [line for line in lines if everything or line.name in args.only or (args.ci and line.ci)]
    if args.python and len(selected) != 1:
        parser.error("--python runs exactly one line: add --only NAME")

    results = []
    for line in selected:
        _say(f"{line.name} ({line.status}) ...")
        results.append(run_line(line, args))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
    if args.write_support:
        _record_results(LINES_FILE, results)
        write_support()
    if args.build_only:
        failing = [r.line for r in results if r.status == "supported" and not (r.installs and r.imports)]
    else:
        failing = [r.line for r in results if r.status == "supported" and not r.ok]
    if failing:
        print(f"\nsupported lines failing: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
