#!/usr/bin/env python
"""Run mpu-bridge's integration suite against every megatron-core / DeepSpeed release line.

Each line of ``compat/matrix/lines.json`` names a constraints file in
``compat/matrix/`` (exact pins, torch = the local CPU build) and the test files
that make up its suite. For each selected line this script

1. builds a virtual environment from the constraints file, or reuses the one it
   built before (a stamp holds the hash of the constraints file and
   ``pyproject.toml``): ``pip install -c FILE torch==2.13.0`` first, so nothing
   can resolve another torch, then ``pip install -r FILE``, then mpu-bridge
   itself (``pip install --no-deps -e .``);
2. checks that the release imports on CPU (``megatron.core.parallel_state``;
   ``deepspeed`` with ``DS_ACCELERATOR=cpu``);
3. runs the line's suite with pytest and counts passed / failed / skipped;

then prints a table (line, installs?, imports?, suite result, time). Usage::

    python compat/run_matrix.py                         # every line (the nightly job)
    python compat/run_matrix.py --only megatron-core-0.16 --python .venv/bin/python   # CI
    python compat/run_matrix.py --only megatron-core-0.9 --only deepspeed-0.16
    python compat/run_matrix.py --write-support         # also regenerate compat/SUPPORT.md
    python compat/run_matrix.py --support-only          # regenerate SUPPORT.md from lines.json
    python compat/run_matrix.py --build-only --keep-envs   # only build and import-check

Options: ``--envs-dir DIR`` (default ``$MPU_MATRIX_ENVS`` or ``/tmp/mpu-matrix``),
``--keep-envs`` (keep the environments after the run; by default each one is
removed after its line ran, unless it existed before), ``--python PATH`` (run a
single selected line in an existing interpreter instead of building one: CI uses
the project's ``.venv``), ``--timeout S`` (per suite), ``--json FILE`` (results).

Exit status: 0 when every *supported* line installs, imports and passes its suite;
1 otherwise (an *unsupported* line never fails the run: its failure is expected and
its reason is in ``lines.json``); 2 for bad arguments.

Only the standard library is used here: the script runs under any Python 3.9+.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
MATRIX = REPO / "compat" / "matrix"
LINES_FILE = MATRIX / "lines.json"
SUPPORT_FILE = REPO / "compat" / "SUPPORT.md"
TORCH_PIN = "torch==2.13.0"
IMPORT_CHECKS = {
    "megatron-core": "import warnings; warnings.simplefilter('ignore'); "
    "from megatron.core import parallel_state; import megatron.core.package_info as p; print(p.__version__)",
    "deepspeed": "import deepspeed; print(deepspeed.__version__)",
}
BUILD_ENV = {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


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
    build_isolation: bool = True

    @classmethod
    def from_json(cls, entry: dict) -> "Line":
        return cls(
            name=entry["name"],
            constraints=entry["constraints"],
            packages=dict(entry["packages"]),
            suite=list(entry["suite"]),
            status=entry["status"],
            reason=entry.get("reason", ""),
            notes=entry.get("notes", ""),
            deselect=list(entry.get("deselect", [])),
            build_isolation=bool(entry.get("build_isolation", True)),
        )


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

    @property
    def ok(self) -> bool:
        return bool(self.installs and self.imports and self.suite_rc == 0 and not (self.failed or self.errors))

    def suite_text(self) -> str:
        if self.suite_rc is None:
            return "not run"
        verdict = "PASS" if self.ok else "FAIL"
        counts = f"{self.passed} passed"
        if self.failed or self.errors:
            counts += f", {self.failed + self.errors} failed"
        if self.skipped:
            counts += f", {self.skipped} skipped"
        return f"{verdict} ({counts})"


def load_lines(path: Path = LINES_FILE) -> List[Line]:
    data = json.loads(path.read_text())
    return [Line.from_json(entry) for entry in data["lines"]]


def _stamp(line: Line) -> str:
    digest = hashlib.sha256()
    for path in (MATRIX / line.constraints, REPO / "pyproject.toml"):
        digest.update(path.read_bytes())
    if not line.build_isolation:
        digest.update(b"--no-build-isolation")
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


def build_env(line: Line, envs_dir: Path, base_python: str, result: Result) -> Optional[Path]:
    """Create (or reuse) the line's virtual environment; return its python, or None if it fails."""
    venv = envs_dir / line.name
    python = venv / "bin" / "python"
    stamp_file = venv / ".mpu-matrix-stamp"
    log = envs_dir / f"{line.name}.install.log"
    want = _stamp(line)
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == want:
        result.installs = True
        return python
    if venv.exists():
        shutil.rmtree(venv)
    log.write_text(f"[run_matrix] building {venv} from compat/matrix/{line.constraints}\n")
    constraints = str(MATRIX / line.constraints)
    # "build_isolation": false in lines.json builds sdists in the line's own environment
    # (torch and setuptools from step 2): DeepSpeed 0.14's setup.py imports torch when
    # DS_ACCELERATOR=cpu, which an isolated build environment does not have.
    first = [TORCH_PIN] if line.build_isolation else [TORCH_PIN, "setuptools"]
    no_isolation = [] if line.build_isolation else ["--no-build-isolation"]
    steps = [
        [base_python, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "-c", constraints, *first],
        [str(python), "-m", "pip", "install", "-q", *no_isolation, "-c", constraints, "-r", constraints],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)],
    ]
    # PIP_CONSTRAINT also reaches the isolated build environments of sdists (DeepSpeed),
    # so not even a build dependency can resolve another torch.
    for cmd in steps:
        if _run(cmd, log, timeout=1800, env={"PIP_CONSTRAINT": constraints}) != 0:
            result.installs = False
            result.detail = f"install failed: {_tail(log)} (log: {log})"
            return None
    stamp_file.write_text(want)
    result.installs = True
    return python


def check_imports(line: Line, python: Path, log: Path, result: Result) -> bool:
    versions = []
    for package in line.packages:
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
        versions.append(f"{package} {rc.stdout.strip().splitlines()[-1]}")
    result.versions = ", ".join(versions)
    result.imports = True
    return True


def run_suite(line: Line, python: Path, log: Path, timeout: float, result: Result) -> None:
    files = [f for f in line.suite if (REPO / f).exists()]
    missing = [f for f in line.suite if not (REPO / f).exists()]
    if missing:
        result.detail = f"suite files not in this checkout (skipped): {', '.join(missing)}"
    junit = log.with_suffix(".junit.xml")
    if junit.exists():
        junit.unlink()
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
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
    if not result.ok and not result.detail:
        result.detail = _tail(log, 2)


def run_line(line: Line, args: argparse.Namespace) -> Result:
    result = Result(line=line.name, status=line.status)
    start = time.monotonic()
    envs_dir: Path = args.envs_dir
    envs_dir.mkdir(parents=True, exist_ok=True)
    log = envs_dir / f"{line.name}.log"
    log.write_text("")
    existed = (envs_dir / line.name).exists()
    try:
        if args.python:
            python: Optional[Path] = Path(args.python)
            result.installs = True
        else:
            python = build_env(line, envs_dir, args.base_python, result)
        if python is not None and check_imports(line, python, log, result) and not args.build_only:
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


def support_markdown(lines: List[Line]) -> str:
    """compat/SUPPORT.md, generated from lines.json (the recorded outcome of the last full run)."""
    out = [
        "# Supported upstream releases",
        "",
        "Generated by `python compat/run_matrix.py --write-support` from `compat/matrix/lines.json`;",
        "do not edit by hand. Every line is its own environment built from",
        "`compat/matrix/<constraints>` (torch 2.13.0 CPU, Python 3.11) and runs the listed suite",
        "in gloo worlds of local processes. CI runs the newest line (the project's own",
        "environment); the nightly job runs them all: `python compat/run_matrix.py`.",
        "",
        "| line | packages | status | last result | suite | notes / reason |",
        "|---|---|---|---|---|---|",
    ]
    for line in lines:
        packages = ", ".join(f"{k} {v}" for k, v in line.packages.items())
        data = _LAST.get(line.name, {})
        text = line.reason if line.status != "supported" else line.notes
        suite = "<br>".join(f"`{Path(s).name}`" for s in line.suite)
        out.append(
            f"| {line.name} | {packages} | **{line.status}** | {data.get('result', '')} | {suite} | {text} |"
        )
    out += [
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


_LAST: Dict[str, Dict[str, str]] = {}


def _load_last(path: Path) -> None:
    data = json.loads(path.read_text())
    for entry in data["lines"]:
        if "last_result" in entry:
            _LAST[entry["name"]] = {"result": entry["last_result"]}


def _record_results(path: Path, results: List[Result]) -> None:
    """Store each line's latest result in lines.json (the source of SUPPORT.md)."""
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this line (repeatable)")
    parser.add_argument("--keep-envs", action="store_true", help="keep the environments built in this run")
    parser.add_argument(
        "--envs-dir",
        type=Path,
        default=Path(os.environ.get("MPU_MATRIX_ENVS", "/tmp/mpu-matrix")),
        help="where the environments live (default: $MPU_MATRIX_ENVS or /tmp/mpu-matrix)",
    )
    parser.add_argument("--python", help="run the (single) selected line in this interpreter; build nothing")
    parser.add_argument("--base-python", default=sys.executable, help="interpreter the environments are made from")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per suite (default 1800)")
    parser.add_argument("--build-only", action="store_true", help="build and import-check; run no suite")
    parser.add_argument("--write-support", action="store_true", help="record results in lines.json, write SUPPORT.md")
    parser.add_argument("--support-only", action="store_true", help="only regenerate SUPPORT.md from lines.json")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--list", action="store_true", help="list the lines and exit")
    args = parser.parse_args(argv)

    lines = load_lines()
    if args.list:
        for line in lines:
            print(f"{line.name:22} {line.status:12} {line.constraints}")
        return 0
    if args.support_only:
        _load_last(LINES_FILE)
        SUPPORT_FILE.write_text(support_markdown(lines))
        print(f"wrote {SUPPORT_FILE.relative_to(REPO)}")
        return 0
    known = {line.name for line in lines}
    unknown = [name for name in args.only if name not in known]
    if unknown:
        parser.error(f"unknown line(s) {unknown}; known: {sorted(known)}")
    selected = [line for line in lines if not args.only or line.name in args.only]
    if args.python and len(selected) != 1:
        parser.error("--python runs exactly one line: add --only NAME")

    results = []
    for line in selected:
        print(f"[run_matrix] {line.name} ({line.status}) ...", file=sys.stderr, flush=True)
        results.append(run_line(line, args))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
    if args.write_support:
        _record_results(LINES_FILE, results)
        _load_last(LINES_FILE)
        SUPPORT_FILE.write_text(support_markdown(lines))
        print(f"\nwrote {SUPPORT_FILE.relative_to(REPO)}")
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
