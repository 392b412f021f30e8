"""Reading the command's text output in tests: run ``mpu-bridge`` in-process, split a table.

Example::

    status, out, err = run(capsys, "plan", "--world-size", "16", "--tp", "2")
    table_rows(out, "kind ")["tp"]          # ["tensor parallel", "2", "8", ...]
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import pytest

from mpu_bridge.cli import main


def run(capsys: pytest.CaptureFixture, *args: str) -> Tuple[int, str, str]:
    """``mpu-bridge ARGS`` in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def table_rows(text: str, first_line: str) -> Dict[str, List[str]]:
    """The table whose header starts with ``first_line``, as first cell -> the other cells
    (cells split on 2+ spaces), up to the first blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_line))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows
