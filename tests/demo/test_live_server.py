"""The demo served by a real uvicorn process on the test database, checked over HTTP.

The same checks as ``./dev demo --check`` (``demotools.checks``), against a
server started on a free port of 127.0.0.1; the test's data is committed
(``transactional_db``) so the server's connections see it.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from blog.management.commands.seed_demo import seed
from demotools.checks import run_checks
from demotools.server import DemoServer
from django.db import connections


def database_url(alias: str = "default") -> str:
    """Return a URL for the alias's (test) database."""
    s = connections[alias].settings_dict
    password = f":{quote(s['PASSWORD'], safe='')}" if s["PASSWORD"] else ""
    user = quote(s["USER"], safe="")
    return f"postgresql://{user}{password}@{s['HOST']}:{s['PORT']}/{quote(s['NAME'], safe='')}"


def test_every_endpoint_over_http(transactional_db):
    seed(posts=30)
    lines: list[str] = []
    server = DemoServer(database_url=database_url(), orm="async_db", pool_max=8)
    try:
        server.start()
        # A loop of our own: the session's pytest-asyncio loop stays untouched.
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            report = runner.run(run_checks(server.url, say=lines.append))
        status = server.stop()
        assert server.errors() == [], server.log()
    finally:
        server.close()
    assert report.failed == [], "\n".join(lines)
    assert len(report.passed) >= 19, "\n".join(lines)
    assert status == 0, f"uvicorn exited with status {status}"
