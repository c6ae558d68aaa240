"""Helpers for the ORM suite: prove where SQL ran and undo writes with a rollback."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from django_async_db import async_atomic, async_connections


def assert_on_loop(probe: Callable[[], set[int]]) -> None:
    """Assert that SQL ran, and only on this (the event loop's) thread."""
    assert probe() == {threading.get_ident()}


@asynccontextmanager
async def rolled_back(using: str = "default") -> AsyncIterator[None]:
    """Run the block inside ``async_atomic`` and roll it back at the end."""
    async with async_atomic(using):
        yield
        async_connections[using].set_rollback(True)
