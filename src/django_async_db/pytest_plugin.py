"""pytest plugin (registered as ``django_async_db``): fixtures for async tests.

Works with pytest-django (which creates the test databases) and
pytest-asyncio (which runs ``async def`` tests)::

    async def test_create(async_db):
        author = await Author.objects.acreate(name="Ann")   # rolled back after the test

    async def test_commit(async_transactional_db):
        async with async_atomic():                          # really commits
            await Author.objects.acreate(name="Ann")
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def async_db(db: None) -> Iterator[None]:
    """Give async code the test's transaction, rolled back after the test (like ``db``).

    Every task of the test, on any loop, uses the test's connection, so rows
    created by sync fixtures are visible and nested ``async_atomic`` blocks
    are savepoints.
    """
    yield


@pytest.fixture
def async_transactional_db(transactional_db: None) -> Iterator[None]:
    """Real commits for async code; tables flushed after the test (like ``transactional_db``).

    Each task uses its own pooled connection, as in production.
    """
    yield
