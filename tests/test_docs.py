"""The README's generated parts stay true to the data they come from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mpu_bridge.mpu.names import FLAVOURS

ROOT = Path(__file__).resolve().parents[1]


def _support_table():
    spec = importlib.util.spec_from_file_location("support_table", ROOT / "compat" / "support_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_support_tables_are_generated_from_compat():
    module = _support_table()
    readme = (ROOT / "README.md").read_text()
    assert module.START in readme and module.END in readme
    assert module.render() in readme, "run: python compat/support_table.py --write"


def _unrecorded():
    return json.loads((ROOT / "compat" / "unrecorded.json").read_text())["flavours"]


def test_every_recorded_surface_has_a_row_in_the_flavour_table():
    module = _support_table()
    rows = module.flavour_rows()
    records = list((ROOT / "compat" / "surfaces").glob("*.json"))
    assert len(rows) == len(records) + len(_unrecorded())
    assert all(row[3] for row in rows), "a record from which mpu-bridge reads no dimension"


def test_every_flavour_has_a_record_or_says_why_it_has_none():
    recorded = {json.loads(p.read_text())["flavour"] for p in (ROOT / "compat" / "surfaces").glob("*.json")}
    unrecorded = {entry["flavour"] for entry in _unrecorded()}
    assert not recorded & unrecorded, "a flavour both recorded and listed as having no record"
    # "custom" is whatever object a user hands in: there is nothing to record
    assert recorded | unrecorded == set(FLAVOURS) - {"custom"}
    readme = (ROOT / "compat" / "README.md").read_text()
    for entry in _unrecorded():
        assert entry["why"] and entry["evidence"]
        assert f"## Flavours without a record: `{entry['flavour']}`" in readme
    rows = _support_table().unrecorded_rows()
    assert all(row[2].startswith("**no record**") for row in rows)


def test_the_readme_main_job_is_the_megatron_selfcheck_on_8_processes():
    job = (ROOT / "scripts" / "main_job.sh").read_text()
    assert "mpu-bridge selfcheck --nproc 8 --with-megatron" in job
    assert "mpu-bridge selfcheck --nproc 8 --module encoder:ranks=2 --module llm:tp=2,pp=3" in job
    assert "scripts/run.sh main" in (ROOT / "README.md").read_text()
