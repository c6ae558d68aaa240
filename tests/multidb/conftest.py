"""Helpers for the multiple-database tests: routers and a look at each alias's rows."""

from __future__ import annotations

from typing import Any

from django_async_db import async_connections
from tests.testapp.models import Author

APPS = ["django_async_db", "tests.testapp"]
ALIASES = ["default", "other"]


class TestappOnOther:
    """Send every read and write of the test app's models to the ``other`` alias."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return "other" if model._meta.app_label == "testapp" else None  # type: ignore[attr-defined]

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return "other" if model._meta.app_label == "testapp" else None  # type: ignore[attr-defined]


class ReadOtherWriteDefault:
    """Read ``Author`` from ``other``, write it to ``default`` (to tell the two apart)."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return "other" if model is Author else None

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return "default" if model is Author else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True


async def names_on(alias: str) -> list[str]:
    """Return the author names stored on ``alias``, read with raw SQL (no router)."""
    async with async_connections[alias].cursor() as cur:
        await cur.execute("SELECT name FROM testapp_author ORDER BY name")
        return [row[0] for row in await cur.fetchall()]
