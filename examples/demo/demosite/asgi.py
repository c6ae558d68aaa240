"""ASGI entry point: a Django handler, plus the lifespan events it does not handle.

With ``DEMO_ORM=async_db`` the handler is django-async-db's
(``django_async_db.asgi.get_asgi_application()``: no thread hop per request);
``DEMO_HANDLER=django`` serves the same project with Django's own handler.
``DEMO_THREAD_PROBE=1`` counts thread hops and where SQL runs (``blog.probe``).
On shutdown the pools of the server's event loop are closed, so stopping
the server (Ctrl-C) leaves no session open on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.apps import apps
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demosite.settings")
PROBE = os.environ.get("DEMO_THREAD_PROBE") == "1"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]

if os.environ.get("DEMO_ORM", "async_db") == "async_db" and (
    os.environ.get("DEMO_HANDLER", "django_async_db") == "django_async_db"
):
    from django_async_db.asgi import get_asgi_application as get_async_db_application

    django_application: Any = get_async_db_application()
else:
    django_application = get_asgi_application()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if PROBE:
                from blog import probe

                probe.install(asyncio.get_running_loop())
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if apps.is_installed("django_async_db"):
                from django_async_db import async_connections

                await async_connections.close_all()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """Serve HTTP with Django; answer lifespan events (closing the pools at shutdown)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        if PROBE:
            from blog import probe

            probe.count_request()
        await django_application(scope, receive, send)
