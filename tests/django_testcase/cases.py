# ruff: noqa: PT009 - unittest-style test cases, run by Django's runner
"""Test cases run by Django's own test runner (``manage.py test``), in a subprocess.

Not collected by pytest (the module name does not start with ``test_``):
``test_django_runner.py`` runs them with ``python -m django test``.
"""

from __future__ import annotations

import asyncio

from django.db import connection
from django.test import TestCase, TransactionTestCase

from django_async_db import async_atomic, async_connections, pool_stats
from django_async_db.test import AsyncioTransactionTestCase, AsyncTestCase
from tests.testapp.models import Author


async def async_pid() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def sync_pid() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


class DjangoTestCaseTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.author = Author.objects.create(name="fixture")

    def setUp(self):
        self.sync_pid = sync_pid()

    async def test_1_creates_a_row(self):
        await Author.objects.acreate(name="test 1")
        self.assertEqual(await Author.objects.acount(), 2)

    async def test_2_sees_only_the_fixture(self):
        self.assertEqual([a.name async for a in Author.objects.all()], ["fixture"])

    async def test_uses_the_test_connection(self):
        results = await asyncio.gather(*(async_pid() for _ in range(5)))
        self.assertEqual(set(results), {self.sync_pid})
        self.assertEqual(pool_stats("default"), {})


class OurTestCaseTests(AsyncTestCase):
    @classmethod
    def setUpTestData(cls):
        cls.author = Author.objects.create(name="fixture")

    async def test_1_creates_a_row(self):
        async with async_atomic():
            await Author.objects.acreate(name="test 1")

    async def test_2_sees_only_the_fixture(self):
        self.assertEqual(await Author.objects.acount(), 1)
        self.assertEqual((await Author.objects.aget(pk=self.author.pk)).name, "fixture")


class OurTransactionTestCaseTests(AsyncioTransactionTestCase):
    async def test_1_commits(self):
        async with async_atomic(durable=True):
            await Author.objects.acreate(name="committed")
        count = await asyncio.create_task(Author.objects.acount())
        self.assertEqual(count, 1)

    async def test_2_flushed(self):
        self.assertEqual(await Author.objects.acount(), 0)


class DjangoTransactionTestCaseTests(TransactionTestCase):
    async def test_1_commits(self):
        async with async_atomic():
            await Author.objects.acreate(name="committed")

    async def test_2_flushed(self):
        self.assertEqual(await Author.objects.acount(), 0)
