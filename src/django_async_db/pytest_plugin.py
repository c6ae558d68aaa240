"""pytest plugin (registered as ``django_async_db``): fixtures for async tests.

Works with pytest-django (which creates the test databases) and
pytest-asyncio (which runs ``async def`` tests), with function- or
session-scoped event loops::

    async def test_create(async_db):
        author = await Author.objects.acreate(name="Ann")   # rolled back after the test

    async def test_commit(async_transactional_db):
        async with async_atomic():                          # really commits
            await Author.objects.acreate(name="Ann")

    async def test_queries(async_db, async_assert_num_queries):
        async with async_assert_num_queries(1):
            await Author.objects.acount()
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

__all__ = ["async_assert_num_queries", "async_db", "async_transactional_db"]


@pytest.fixture(scope="session")
def _django_async_db_pinning() -> None:
    """Pin ``TestCase`` connections for async code, even without the app installed."""
    from .test import install_testcase_pinning

    install_testcase_pinning()


@pytest.fixture
def async_db(_django_async_db_pinning: None, db: None) -> None:
    """Give async code the test's transaction, rolled back after the test (like ``db``).

    Every task of the test and of its async fixtures, on any loop, uses the
    test's connection: rows created by sync fixtures are visible and
    ``async_atomic`` blocks are savepoints. Requesting ``async_transactional_db``
    (or ``transactional_db``) too wins, as with pytest-django's fixtures.
    """


@pytest.fixture
def async_transactional_db(_django_async_db_pinning: None, transactional_db: None) -> None:
    """Real commits for async code; tables flushed after the test (like ``transactional_db``).

    Each task uses its own pooled connection, as in production: use it for
    ``on_commit`` callbacks, ``durable=True`` blocks and tasks that must see
    each other's committed writes.
    """


@pytest.fixture
def async_assert_num_queries() -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """Assert the number of queries an async block runs (``django_assert_num_queries``).

    Example::

        async def test_one_query(async_db, async_assert_num_queries):
            async with async_assert_num_queries(1) as captured:
                await Author.objects.aget(pk=1)
            assert "SELECT" in captured[0]["sql"]
    """
    from django.db import DEFAULT_DB_ALIAS, connections
    from django.test.utils import CaptureQueriesContext

    from ._bridge import run_sync

    @contextlib.asynccontextmanager
    async def assert_num_queries(
        num: int, *, using: str = DEFAULT_DB_ALIAS, exact: bool = True
    ) -> AsyncIterator[CaptureQueriesContext]:
        context = CaptureQueriesContext(connections[using])
        await run_sync(context.__enter__)  # may connect: through the bridge
        try:
            yield context
        except BaseException as exc:
            context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        context.__exit__(None, None, None)
        done = len(context)
        if (done != num) if exact else (done > num):
            expected = f"{num}" if exact else f"at most {num}"
            queries = "\n".join(f"{i}. {q['sql']}" for i, q in enumerate(context, start=1))
            pytest.fail(
                f"Expected to perform {expected} queries on {using!r} but {done} were done:\n"
                f"{queries}",
                pytrace=False,
            )

    return assert_num_queries
