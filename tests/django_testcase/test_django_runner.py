"""Django's own test runner with this ENGINE: async tests pass, the test database is dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from django.db import connections

ROOT = Path(__file__).resolve().parents[2]


def database_exists(name: str) -> bool:
    params = connections["default"].get_connection_params()
    with psycopg.connect(
        dbname="postgres",
        **{k: params[k] for k in ("user", "password", "host", "port") if k in params},
        autocommit=True,
    ) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
    return row is not None


def test_manage_py_test_runs_async_tests_and_drops_the_database():
    run_id = f"{os.environ['DJASYNC_RUN_ID']}r"  # never the names of this run
    env = {
        **os.environ,
        "DJASYNC_RUN_ID": run_id,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONWARNINGS": "error::ResourceWarning",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "test",
            "tests.django_testcase.cases",
            "--settings=tests.settings",
            "--noinput",
            "-v",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Ran 9 tests" in output, output
    assert "OK" in output
    assert "Destroying test database for alias 'default'" in output
    assert "Traceback" not in output, output
    assert not database_exists(f"test_djasync_{run_id}")
