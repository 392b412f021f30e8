"""The README's generated parts stay true to the data they come from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_every_recorded_surface_has_a_row_in_the_flavour_table():
    module = _support_table()
    rows = module.flavour_rows()
    assert len(rows) == len(list((ROOT / "compat" / "surfaces").glob("*.json")))
    assert all(row[3] for row in rows), "a record from which mpu-bridge reads no dimension"


def test_the_readme_main_job_is_the_megatron_selfcheck_on_8_processes():
    job = (ROOT / "scripts" / "main_job.sh").read_text()
    assert "mpu-bridge selfcheck --nproc 8 --with-megatron" in job
    assert "scripts/run.sh main" in (ROOT / "README.md").read_text()
