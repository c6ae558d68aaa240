"""Test settings for running suites through PgBouncer in transaction pooling mode.

``scripts/scaleout.py pgbouncer -- ...`` points ``DATABASE_URL`` at a
PgBouncer (``./dev test`` runs the concurrency and transaction suites so).
Every alias gives its connection back between transactions and bridge calls
(``OPTIONS["release"] = "idle"``), which is what transaction pooling needs.
"""

from __future__ import annotations

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

for _settings in DATABASES.values():
    _settings["OPTIONS"]["release"] = "idle"  # type: ignore[index]
    _settings["DISABLE_SERVER_SIDE_CURSORS"] = True
