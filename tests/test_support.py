"""mpu_bridge.support: the newest tested release lines, and the one log line about newer ones.

The installed versions come from distribution metadata: the tests put stand-in
``<name>-<version>.dist-info`` folders first on the path of a fresh interpreter, so
that process sees the versions they name (the real packages still import from where
they are installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from mpu_bridge import support

ROOT = Path(__file__).resolve().parents[1]
Version = pytest.importorskip("packaging.version").Version


def test_the_newest_tested_lines_are_the_newest_lines_of_the_matrix():
    newest: Dict[str, Version] = {}
    for line in json.loads((ROOT / "compat" / "matrix" / "lines.json").read_text())["lines"]:
        if line["status"] != "supported":
            continue
        for package, text in {"torch": line.get("torch", "2.13.0"), **line["packages"]}.items():
            version = Version(text)
            release_line = Version(f"{version.major}.{version.minor}")
            newest[package] = max(newest.get(package, release_line), release_line)
    assert {package: Version(line) for package, line in support.NEWEST_TESTED.items()} == newest


@pytest.mark.parametrize(
    "installed, expected",
    [
        ({"torch": "2.15.9"}, []),
        ({"torch": "2.16.0"}, ["torch 2.16.0 (tested up to 2.15)"]),
        ({"torch": "2.16.0.dev20270101+cpu"}, ["torch 2.16.0.dev20270101+cpu (tested up to 2.15)"]),
        ({"torch": "3.0.0"}, ["torch 3.0.0 (tested up to 2.15)"]),
        # Compared as versions: as strings, "2.9" > "2.15" and "0.100" < "0.19".
        ({"torch": "2.9.1"}, []),
        ({"megatron-core": "0.100.0"}, ["megatron-core 0.100.0 (tested up to 0.19)"]),
        ({"megatron-core": "0.20.0rc1", "deepspeed": "0.19.99"}, ["megatron-core 0.20.0rc1 (tested up to 0.19)"]),
        (
            {"deepspeed": "1.0.0", "torch": "2.17.1+cu130"},
            [
                "torch 2.17.1+cu130 (tested up to 2.15)",
                "deepspeed 1.0.0 (tested up to 0.19)",
            ],
        ),
        ({"torch": "not a version", "numpy": "99.0"}, []),
        ({}, []),
    ],
)
def test_newer_than_tested_compares_release_lines(installed, expected):
    assert support.newer_than_tested(installed) == expected


def _stand_ins(where: Path, versions: Dict[str, str]) -> Path:
    for name, version in versions.items():
        info = where / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return where


def _run(code: str, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


_LOGGING = (
    "import logging, sys\n"
    "logging.basicConfig(stream=sys.stderr, level=logging.INFO, format='LOG %(name)s %(levelname)s %(message)s')\n"
)


def _log_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("LOG mpu_bridge.support ")]


def test_one_line_once_per_process_read_from_metadata_without_importing(tmp_path):
    path = _stand_ins(tmp_path, {"torch": "2.16.1", "megatron-core": "0.21.0", "deepspeed": "0.19.3"})
    code = _LOGGING + (
        "from mpu_bridge import support\n"
        "first = support.note_untested_releases()\n"
        "again = [support.note_untested_releases() for _ in range(3)]\n"
        "print(repr(first)); print(again)\n"
        "print(sorted(m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules))\n"
    )
    done = _run(code, path)
    assert done.returncode == 0, done.stderr
    first, again, imported = done.stdout.splitlines()
    message = (
        "mpu-bridge: newer than the newest release line it was tested with: torch 2.16.1 (tested up to 2.15), "
        "megatron-core 0.21.0 (tested up to 0.19); please report problems with these versions"
    )
    assert first == repr(message)
    assert again == "[None, None, None]"
    assert imported == "[]", "a package was imported to read its version"
    assert _log_lines(done.stderr) == [f"LOG mpu_bridge.support WARNING {message}"]


def test_nothing_is_logged_within_the_tested_lines(tmp_path):
    path = _stand_ins(tmp_path, {"torch": "2.15.7", "megatron-core": "0.19.0", "deepspeed": "0.19.99"})
    done = _run(_LOGGING + "from mpu_bridge import support\nprint(support.note_untested_releases())\n", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert _log_lines(done.stderr) == []


_ATTACH_THREE_TIMES = _LOGGING + (
    "import torch.distributed as dist\n"
    "from torch.testing._internal.distributed.fake_pg import FakeStore\n"
    "import mpu_bridge\n"
    "dist.init_process_group('fake', store=FakeStore(), rank=1, world_size=2)\n"
    "for _ in range(3):\n"
    "    mpu_bridge.attach().close()\n"
    "dist.destroy_process_group()\n"
)


def test_attach_says_it_once_where_torch_is_newer_than_tested(tmp_path):
    pytest.importorskip("torch")
    path = _stand_ins(tmp_path, {"torch": "9.1.0", "megatron-core": "0.16.1", "deepspeed": "0.19.8"})
    done = _run(_ATTACH_THREE_TIMES, path)
    assert done.returncode == 0, done.stderr
    assert _log_lines(done.stderr) == [
        "LOG mpu_bridge.support WARNING mpu-bridge: newer than the newest release line it was tested with: "
        "torch 9.1.0 (tested up to 2.15); please report problems with these versions"
    ]


def test_attach_says_nothing_where_torch_is_a_tested_release(tmp_path):
    pytest.importorskip("torch")
    path = _stand_ins(tmp_path, {"torch": "2.15.0", "megatron-core": "0.19.2", "deepspeed": "0.19.8"})
    done = _run(_ATTACH_THREE_TIMES, path)
    assert done.returncode == 0, done.stderr
    assert _log_lines(done.stderr) == []
