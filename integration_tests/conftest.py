"""pytest setup of the integration suite (see README.md): the ``gpu`` marker and the launcher fixture.

Helpers live in ``_launch.py`` (importable from the test files: pytest puts this
directory on ``sys.path``); this file only registers them with pytest.
"""

from __future__ import annotations

from typing import Callable

import pytest

from _launch import Launch, run_torchrun


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs NCCL and CUDA GPUs (skipped elsewhere; runs nightly)")


@pytest.fixture(scope="session")
def launch_torchrun() -> Callable[..., Launch]:
    """:func:`_launch.run_torchrun`: ``torchrun --standalone`` with a hard timeout, output captured."""
    return run_torchrun
