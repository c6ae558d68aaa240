"""Run one query on the event loop through django-async-db.

Run it with ``./dev demo``, which provides ``DATABASE_URL``. It configures
Django in code, opens this task's connection from ``async_connections`` and
runs a parameterised query on it: no thread pool is involved.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import unquote, urlsplit

import django
from django.conf import settings


def configure() -> None:
    """Configure Django from ``DATABASE_URL`` with the async PostgreSQL backend."""
    url = urlsplit(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django_async_db.backends.postgresql",
                "NAME": unquote(url.path.lstrip("/")) or "postgres",
                "USER": unquote(url.username or "postgres"),
                "PASSWORD": unquote(url.password or ""),
                "HOST": url.hostname or "127.0.0.1",
                "PORT": str(url.port or 5432),
                "OPTIONS": {"pool": {"min_size": 1, "max_size": 4}},
            }
        },
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django_async_db"],
        USE_TZ=True,
    )
    django.setup()


async def main() -> None:
    """Run one query on this task's connection, then close every connection."""
    from django_async_db import async_connections

    try:
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT version(), %s", ["hello"])
            print(await cur.fetchone())
    finally:
        await async_connections.close_all()


if __name__ == "__main__":
    configure()
    asyncio.run(main())
