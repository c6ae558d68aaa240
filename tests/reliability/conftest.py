"""Shared helpers for the reliability tests: scale, figures, server-side observation.

``DJASYNC_RELIABILITY_SCALE=long`` scales the load up (see docs/reliability.md);
the default ("ci") keeps the whole directory well under a minute.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from django.db import connections

SCALE = os.environ.get("DJASYNC_RELIABILITY_SCALE", "ci")
LONG = SCALE == "long"
#: Every random choice in these tests comes from a generator seeded with this.
SEED = int(os.environ.get("DJASYNC_RELIABILITY_SEED", "20240601"))
APPS = ["django_async_db", "tests.testapp"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "long: reliability test scaled up by DJASYNC_RELIABILITY_SCALE=long "
        "(tests that are slow even at CI scale are skipped unless it is set)",
    )


def scaled(ci: int, long: int) -> int:
    """Return the CI figure, or the long one under ``DJASYNC_RELIABILITY_SCALE=long``."""
    return long if LONG else ci


def test_db_name() -> str:
    """Return the name of this run's test database (the only one these tests touch)."""
    return str(connections.settings["default"]["NAME"])


test_db_name.__test__ = False  # type: ignore[attr-defined]  # not a test


@pytest.fixture
def figures(
    request: pytest.FixtureRequest, record_property: Callable[[str, Any], None]
) -> Callable[..., None]:
    """Print a one-line summary of a test's figures (also kept as junit properties)."""

    def report(**values: Any) -> None:
        for key, value in values.items():
            record_property(key, value)
        line = " ".join(f"{k}={v}" for k, v in values.items())
        capman = request.config.pluginmanager.getplugin("capturemanager")
        text = f"\nRELIABILITY[{SCALE}] {request.node.name}: {line}\n"
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(text, end="", flush=True)
        else:
            print(text, end="", flush=True)

    return report


async def activity(watch: psycopg.AsyncConnection[Any]) -> list[tuple[int, str | None, str]]:
    """Return (pid, state, query) of every session on the test database but ``watch``."""
    cur = await watch.execute(
        "SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
        [test_db_name(), watch.info.backend_pid],
    )
    return list(await cur.fetchall())
