"""What ``pip install mpu-bridge`` gets: the sdist and wheel, their metadata, and the planner-only install.

The sdist and the wheel are built once per run, in a copy of the working tree, by the
build backend ``pyproject.toml`` names (``setuptools.build_meta``, the installed
setuptools, no download: a few seconds). On them:

* the license: ``License-Expression: Apache-2.0`` and the LICENSE file, with no
  deprecation warning from the build;
* the sdist ships no tests (the suite needs the repository: ``compat/`` records,
  ``integration_tests/``, multi-process worlds; run it from a checkout);
* the dependencies fit into a user's stack and say what the release matrix
  (``compat/matrix/lines.json``) shows: lower bounds only (the oldest release a supported
  line runs), every newer release admitted, exclusions only for lines that ran and
  failed; and pip's own plan for installing the wheel into the running environment
  (every matrix line runs the suite in its own) installs mpu-bridge and nothing else;
* ``requires-python`` and the classifiers name the Pythons of the matrix, and the
  torch-free planner installs from the wheel (``--no-deps``) and runs on the oldest
  Python claimed, where this machine has it; there ``mpu-bridge selfcheck`` stops with
  one line naming torch.
"""

from __future__ import annotations

import email.parser
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

packaging_version = pytest.importorskip("packaging.version")
packaging_specifiers = pytest.importorskip("packaging.specifiers")
packaging_requirements = pytest.importorskip("packaging.requirements")
Version = packaging_version.Version
SpecifierSet = packaging_specifiers.SpecifierSet
Requirement = packaging_requirements.Requirement

ROOT = Path(__file__).resolve().parents[1]
LINES_FILE = ROOT / "compat" / "matrix" / "lines.json"
_NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out"
)


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- building ---------------------------------------------------------------------------


class Built:
    def __init__(self, sdist: Path, wheel: Path, log: str) -> None:
        self.sdist, self.wheel, self.log = sdist, wheel, log

    def sdist_members(self) -> List[str]:
        with tarfile.open(self.sdist) as tar:
            top = self.sdist.name[: -len(".tar.gz")]
            return sorted(m.name[len(top) + 1 :] for m in tar.getmembers() if m.isfile())

    def sdist_text(self, member: str) -> str:
        with tarfile.open(self.sdist) as tar:
            top = self.sdist.name[: -len(".tar.gz")]
            return tar.extractfile(f"{top}/{member}").read().decode()

    def wheel_members(self) -> List[str]:
        with zipfile.ZipFile(self.wheel) as wheel:
            return sorted(wheel.namelist())

    def wheel_text(self, member: str) -> str:
        with zipfile.ZipFile(self.wheel) as wheel:
            return wheel.read(member).decode()

    def wheel_metadata(self):
        (name,) = [m for m in self.wheel_members() if m.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(self.wheel_text(name))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    requires = _pyproject()["build-system"]["requires"]
    try:
        have = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs setuptools (the test extra installs it)")
    for requirement in map(Requirement, requires):
        if requirement.name == "setuptools" and not requirement.specifier.contains(have, prereleases=True):
            pytest.skip(f"build-system.requires says {requirement}, this environment has setuptools {have}")
    tmp = tmp_path_factory.mktemp("build")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=_NOT_COPIED)
    names = tmp / "built.txt"  # the backend prints its progress to stdout: the names go here
    code = (
        "import sys, pathlib; from setuptools import build_meta as backend; "
        "dist, names = sys.argv[1:3]; "  # the backend rewrites sys.argv
        "sdist = backend.build_sdist(dist); wheel = backend.build_wheel(dist); "
        "pathlib.Path(names).write_text(sdist + '\\n' + wheel)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "dist"), str(names)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sdist_name, wheel_name = names.read_text().split("\n")
    return Built(tmp / "dist" / sdist_name, tmp / "dist" / wheel_name, result.stdout + result.stderr)


# -- license ----------------------------------------------------------------------------


def test_license_is_an_spdx_expression_with_its_file_in_sdist_and_wheel(built):
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    pkg_info = email.parser.Parser().parsestr(built.sdist_text("PKG-INFO"))
    metadata = built.wheel_metadata()
    for meta in (pkg_info, metadata):
        assert meta["License-Expression"] == "Apache-2.0"
        assert meta.get_all("License-File") == ["LICENSE"]
        assert meta["License"] is None  # the deprecated free-text form
        assert not [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    assert built.sdist_text("LICENSE") == license_text
    (licenses,) = [m for m in built.wheel_members() if m.endswith(".dist-info/licenses/LICENSE")]
    assert built.wheel_text(licenses) == license_text


def test_the_build_warns_about_nothing_deprecated(built):
    assert "deprecat" not in built.log.lower(), built.log


# -- contents ---------------------------------------------------------------------------


def _package_files() -> List[str]:
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "mpu_bridge").rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts
    )


def test_the_sdist_ships_the_package_and_no_tests(built):
    members = built.sdist_members()
    assert not [m for m in members if m.startswith(("tests/", "integration_tests/", "compat/", "benchmarks/"))]
    shipped = [m for m in members if m.startswith("mpu_bridge/")]
    assert shipped == _package_files()
    for member in ("pyproject.toml", "README.md", "LICENSE", "PKG-INFO"):
        assert member in members


def test_the_wheel_holds_the_package_only(built):
    members = built.wheel_members()
    assert [m for m in members if not m.startswith("mpu_bridge-")] == _package_files()
    assert "mpu-bridge = mpu_bridge.cli:main" in built.wheel_text(
        next(m for m in members if m.endswith(".dist-info/entry_points.txt"))
    )


# -- dependencies against the release matrix -----------------------------------------------


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(built: Built) -> Dict[Optional[str], Dict[str, Requirement]]:
    """{extra or None: {distribution: requirement}} from the wheel's metadata."""
    out: Dict[Optional[str], Dict[str, Requirement]] = {}
    for text in built.wheel_metadata().get_all("Requires-Dist", []):
        requirement = Requirement(text)
        extra = None
        if requirement.marker is not None:
            match = re.search(r'extra == "([^"]+)"', str(requirement.marker))
            assert match, f"a marker other than an extra: {text}"
            extra = match.group(1)
        out.setdefault(extra, {})[_canonical(requirement.name)] = requirement
    return out


def _matrix_lines() -> List[dict]:
    return json.loads(LINES_FILE.read_text())["lines"]


def _line_packages(line: dict) -> Dict[str, str]:
    """Every upstream release a line installs, torch included (a line without "torch" runs 2.13.0)."""
    return {"torch": line.get("torch", "2.13.0"), **line["packages"]}


def _tested_versions(package: str) -> List[Version]:
    """The releases of ``package`` that the supported lines of the matrix install."""
    return sorted(
        {
            Version(_line_packages(line)[package])
            for line in _matrix_lines()
            if line["status"] == "supported" and package in _line_packages(line)
        }
    )


def _failed_versions(package: str) -> List[Version]:
    """The releases of ``package`` that an unsupported line, named after it, ran and failed with."""
    return [
        Version(line["packages"][package])
        for line in _matrix_lines()
        if line["status"] == "unsupported" and line["name"].startswith(f"{package}-") and package in line["packages"]
    ]


def _is_excluded_line(version: Version, failed: List[Version]) -> bool:
    return any((version.major, version.minor) == (f.major, f.minor) for f in failed)


def _check_against_the_matrix(package: str, spec: SpecifierSet) -> None:
    """``spec`` admits every tested release and everything newer; it excludes only the releases
    below the oldest tested one and the lines that ran and failed."""
    tested, failed = _tested_versions(package), _failed_versions(package)
    assert tested, f"no supported line of {LINES_FILE.name} installs {package}"
    floor = tested[0]
    for version in tested:
        assert spec.contains(version, prereleases=True), f"{package} {version} is run by the matrix but not admitted"
    for version in failed:
        assert not spec.contains(version), f"{package} {version} fails in the matrix but is admitted"
    majors = range(floor.major, floor.major + 2)
    for candidate in (Version(f"{a}.{b}.{c}") for a in majors for b in range(0, 40) for c in (0, 99)):
        expected = candidate >= Version(f"{floor.major}.{floor.minor}") and not _is_excluded_line(candidate, failed)
        assert spec.contains(candidate) == expected, f"{package} {candidate}: admitted={not expected}, {spec}"
    for far in ("9.0", "99.0"):
        assert spec.contains(far), f"{package} {far} is capped: only lines that ran and failed may be excluded"


def test_the_base_dependencies_are_torch_and_packaging(built):
    base = _requirements(built)[None]
    assert sorted(base) == ["packaging", "torch"], "the package imports nothing else (the planner needs nothing at all)"
    assert base["packaging"].specifier.contains("99.0"), "packaging is capped"


def test_torch_has_the_oldest_tested_torch_as_its_only_bound(built):
    spec = _requirements(built)[None]["torch"].specifier
    assert [s.operator for s in spec] == [">="], f"torch: a lower bound only, not {spec}"
    _check_against_the_matrix("torch", spec)


@pytest.mark.parametrize("package, extra", [("megatron-core", "megatron"), ("deepspeed", "deepspeed")])
def test_each_extra_admits_every_tested_release_and_excludes_only_failed_lines(built, package, extra):
    spec = _requirements(built)[extra][package].specifier
    assert {s.operator for s in spec} <= {">=", "!="}, f"{package}: a lower bound and exclusions only, not {spec}"
    _check_against_the_matrix(package, spec)


def test_the_matrix_lines_agree_with_their_constraints_files():
    spec = importlib.util.spec_from_file_location("run_matrix", ROOT / "compat" / "run_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    lines = module.load_lines()  # raises where a line's torch or packages differ from its constraints
    assert len(lines) == len(_matrix_lines())
    for line in _matrix_lines():
        pins = module.pinned_versions(ROOT / "compat" / "matrix" / line["constraints"])
        assert pins["torch"] == _line_packages(line)["torch"], line["name"]


def test_the_test_extra_installs_what_the_suite_is_built_around(built):
    test = _requirements(built)["test"]
    assert {"pytest", "hypothesis", "setuptools"} <= set(test)
    assert test["mpu-bridge"].extras == {"megatron", "deepspeed"}


# -- installing into a user's stack changes nothing but mpu-bridge ------------------------------


def _installed() -> Dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def _extras_installed(built: Built) -> List[str]:
    """The extras of the wheel whose every requirement names an installed distribution."""
    requirements = _requirements(built)
    have = set(_installed())
    extras: List[str] = []
    changed = True
    while changed:  # an extra may name others ("test" needs "megatron" and "deepspeed")
        changed = False
        for extra, needs in requirements.items():
            if extra is None or extra in extras:
                continue
            own = needs.get("mpu-bridge")
            if set(needs) - {"mpu-bridge"} <= have and (own is None or own.extras <= set(extras)):
                extras.append(extra)
                changed = True
    return sorted(extras)


def _without_mpu_bridge(where: Path) -> Path:
    """A virtual environment of this Python holding what this one holds except mpu-bridge.

    Each entry of this environment's site-packages is linked into the new one's, except
    the files the installed mpu-bridge distribution (editable or not) owns: the state of a
    user who has the same stack and has not installed mpu-bridge yet.
    """
    base = getattr(sys, "_base_executable", sys.executable)
    python = _venv(base, where)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    target = Path(purelib)
    ours = set()
    for dist in importlib.metadata.distributions():
        if _canonical(dist.metadata["Name"] or "") == "mpu-bridge":
            ours |= {Path(str(f)).parts[0] for f in dist.files or []}
    for site_dir in map(Path, site.getsitepackages()):
        if not site_dir.is_dir():
            continue
        for entry in site_dir.iterdir():
            if entry.name in ours or entry.name == "__pycache__" or _canonical(entry.name).startswith("mpu-bridge-"):
                continue
            link = target / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    return python


def _pip_supports_dry_run_reports() -> bool:
    try:
        return Version(importlib.metadata.version("pip")) >= Version("22.3")  # --python (22.3), --report (22.2)
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("with_extras", [False, True], ids=["no-extras", "installed-extras"])
def test_installing_the_wheel_into_this_environment_changes_nothing_but_mpu_bridge(built, tmp_path, with_extras):
    """pip's own plan (``--dry-run --report``) for ``pip install 'mpu-bridge[EXTRAS]'`` from the
    wheel, in this environment's stack without mpu-bridge: install mpu-bridge, and nothing else.

    Every matrix line runs this in its own environment (its Python, torch, megatron-core and
    DeepSpeed). ``--no-index`` offers pip nothing but the wheel: a requirement the installed
    stack does not meet could not be resolved at all. The machine's pip configuration is not
    read (a constraints file there would be a second, foreign set of requirements).
    """
    if not _pip_supports_dry_run_reports():
        pytest.skip("needs pip >= 22.3 (install --dry-run --report, --python)")
    extras = _extras_installed(built) if with_extras else []
    if with_extras and not extras:
        pytest.skip("no extra of mpu-bridge has its packages installed here")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(built.wheel, wheels)
    python = _without_mpu_bridge(tmp_path / "user-env")
    report = tmp_path / "report.json"
    requirement = f"mpu-bridge[{','.join(extras)}]" if extras else "mpu-bridge"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index"]
    cmd += ["--find-links", str(wheels), "--report", str(report), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, f"{requirement}: pip cannot install it here\n{result.stdout}\n{result.stderr}"
    planned = json.loads(report.read_text())["install"]
    names = {_canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in planned}
    assert names == {"mpu-bridge": built.wheel_metadata()["Version"]}, (requirement, names)
    (item,) = planned
    assert item["download_info"]["url"].endswith("/" + built.wheel.name)
    if extras:
        assert set(item["requested_extras"]) == set(extras)


# -- Python versions --------------------------------------------------------------------------


def _minors(spec: SpecifierSet) -> List[str]:
    return [f"3.{m}" for m in range(6, 20) if spec.contains(f"3.{m}.0") or spec.contains(f"3.{m}.99")]


def _matrix_pythons() -> List[str]:
    """The Pythons the matrix lines run on (a line without "python" runs on 3.11, the default)."""
    return sorted({line.get("python", "3.11") for line in _matrix_lines()}, key=Version)


def test_requires_python_and_the_classifiers_follow_the_matrix(built):
    metadata = built.wheel_metadata()
    ours = SpecifierSet(metadata["Requires-Python"])
    pythons = _matrix_pythons()
    assert _minors(ours)[0] == pythons[0], f"requires-python {ours}: the oldest line runs Python {pythons[0]}"
    assert ours.contains("3.99.0"), f"requires-python {ours} is capped"
    classified = sorted(
        (c.rsplit(" :: ", 1)[1] for c in metadata.get_all("Classifier", []) if re.fullmatch(r".* :: 3\.\d+", c)),
        key=Version,
    )
    assert classified == pythons, "the Python classifiers are not the Pythons of compat/matrix/lines.json"


def test_the_running_python_is_claimed(built):
    ours = SpecifierSet(built.wheel_metadata()["Requires-Python"])
    assert ours.contains(f"{sys.version_info.major}.{sys.version_info.minor}.0")


def _find_python(minor: str) -> Optional[str]:
    """A working interpreter of Python ``minor`` (e.g. "3.10") with ``venv``: pyenv's, then PATH's."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{minor}.*", "bin", f"python{minor}")))
    candidates += [p for p in (shutil.which(f"python{minor}"),) if p]  # may be a shim that fails
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return candidate
    return None


def _oldest_claimed_python(built: Built) -> str:
    return _minors(SpecifierSet(built.wheel_metadata()["Requires-Python"]))[0]


def _venv(python: str, where: Path) -> Path:
    subprocess.run([python, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    return where / "bin" / "python"


def _pip_install(target: Path, *args: str) -> subprocess.CompletedProcess:
    """pip (this environment's) installing into the interpreter ``target``, from local files only."""
    cmd = [sys.executable, "-m", "pip", "--python", str(target), "install", "--no-index", "--no-deps", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_the_planner_installs_and_runs_on_the_oldest_python_claimed(built, tmp_path):
    minor = _oldest_claimed_python(built)
    python = _find_python(minor)
    if python is None:
        pytest.skip(f"no Python {minor} on this machine (PATH or pyenv)")
    venv_python = _venv(python, tmp_path / f"venv-{minor}")
    installed = _pip_install(venv_python, str(built.wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bin_dir = venv_python.parent

    def run(*args: str) -> subprocess.CompletedProcess:
        return _run_all(list(args), env=env, cwd=tmp_path, timeout=300)

    version = run(str(venv_python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    assert version.stdout.strip() == minor
    api = run(
        str(venv_python),
        "-c",
        "import sys, mpu_bridge; layout = mpu_bridge.plan(64, tp=2, pp=2, ep=4); "
        "print(layout.group_of('ep', 37), 'torch' in sys.modules, mpu_bridge.__file__)",
    )
    assert api.returncode == 0, api.stderr
    ep_group, torch_loaded, location = api.stdout.rsplit(" ", 2)  # "[33, 35, 37, 39] False /…/__init__.py"
    assert ep_group == "[33, 35, 37, 39]" and torch_loaded == "False"
    assert location.strip().startswith(str(tmp_path)), "imported from somewhere else than the venv"

    plan = run(str(bin_dir / "mpu-bridge"), "plan", "--world-size", "64", "--tp", "2", "--pp", "2", "--ep", "4")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"^ep\s+expert parallel\s+4\s+16\b", plan.stdout, re.M), plan.stdout

    # No torch here: the self-check says so in one line (exit 2) instead of a traceback.
    (torch_requirement,) = [r for r in built.wheel_metadata().get_all("Requires-Dist") if r.startswith("torch")]
    for extra_args in ([], ["--with-megatron", "--tp", "2"]):
        check = run(str(bin_dir / "mpu-bridge"), "selfcheck", "--nproc", "2", *extra_args)
        assert check.returncode == 2, check.stdout + check.stderr
        assert check.stdout == ""
        assert check.stderr.splitlines() == [
            "mpu-bridge: error: mpu-bridge selfcheck needs torch, which is not installed (cannot import torch); "
            f"install it with: pip install '{torch_requirement.replace(' ', '')}'"
        ]


def test_pip_refuses_the_wheel_on_the_python_just_below(built, tmp_path):
    oldest = _oldest_claimed_python(built)
    below = f"3.{int(oldest.split('.')[1]) - 1}"
    python = _find_python(below)
    if python is None:
        pytest.skip(f"no Python {below} on this machine (PATH or pyenv)")
    result = _pip_install(_venv(python, tmp_path / f"venv-{below}"), str(built.wheel))
    assert result.returncode != 0
    assert "requires a different python" in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


# -- a base install: torch, no extras, no numpy --------------------------------------------------


def _run_all(args: List[str], *, env: Dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``args`` in a session of its own; on timeout kill it with every process it started."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the self-check's fork server and ranks too
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {timeout:g} s\n{out}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _shadowing(tmp_path: Path, package: str, init: str) -> Dict[str, str]:
    """An environment whose PYTHONPATH puts a stand-in ``package`` (with ``init``) before the real one."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(init)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_selfcheck_with_megatron_but_no_megatron_core_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("torch")
    env = _shadowing(tmp_path, "megatron", "# a megatron without megatron.core\n")
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('megatron.core'))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert probe.stdout.strip() == "None", "the stand-in did not hide megatron-core"
    check = _run_all(
        [sys.executable, "-m", "mpu_bridge", "selfcheck", "--nproc", "4", "--with-megatron", "--tp", "2"],
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert check.returncode == 2, check.stdout + check.stderr
    assert check.stdout == "", "the layout or a report was printed: ranks were started"
    assert check.stderr.splitlines() == [
        "mpu-bridge: error: --with-megatron needs megatron-core, which is not installed "
        "(cannot import megatron.core); install it with: pip install 'mpu-bridge[megatron]'"
    ]


def test_selfcheck_without_numpy_prints_no_numpy_warning(tmp_path):
    pytest.importorskip("torch")
    env = _shadowing(tmp_path, "numpy", "raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    control = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env, timeout=120
    )
    assert "Failed to initialize NumPy" in control.stderr, "the stand-in did not hide numpy from torch"
    check = _run_all(
        [sys.executable, "-m", "mpu_bridge", "selfcheck", "--nproc", "2", "--timeout", "240"],
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "PASS" in check.stdout
    assert "NumPy" not in check.stderr, check.stderr


def test_require_names_the_package_and_the_pip_command():
    from mpu_bridge.errors import BridgeError
    from mpu_bridge.optional import MissingDependencyError, install_hint, require

    require("json", package="json")  # present: nothing happens
    with pytest.raises(MissingDependencyError) as raised:
        require("mpu_bridge_no_such.module", package="no-such", extra="deepspeed", needed_for="this")
    assert isinstance(raised.value, BridgeError) and isinstance(raised.value, ImportError)
    assert str(raised.value) == (
        "this needs no-such, which is not installed (cannot import mpu_bridge_no_such.module); "
        "install it with: pip install 'mpu-bridge[deepspeed]'"
    )
    assert install_hint("no-such") == "pip install 'no-such'"
