# ruff: noqa: PT009, PT027 - unittest-style test cases are what this file tests
"""The test cases of ``django_async_db.test``, and Django's own with async tests.

Isolation checks rely on unittest's method order (alphabetical): ``test_1_*``
writes, ``test_2_*`` checks the write is gone.
"""

from __future__ import annotations

import asyncio
import threading
import unittest

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.test import TestCase, TransactionTestCase
from django.test.testcases import DatabaseOperationForbidden

from django_async_db import async_atomic, async_connections, pool_stats, run_sync
from django_async_db._storage import install as install_storage
from django_async_db.backends.postgresql._psycopg import BridgeConnection
from django_async_db.test import AsyncioTestCase, AsyncioTransactionTestCase, AsyncTestCase
from tests.testapp.models import Author, Event

PID_SQL = "SELECT pg_backend_pid()"


def sync_pid(alias: str = DEFAULT_DB_ALIAS) -> int:
    with connections[alias].cursor() as cur:
        cur.execute(PID_SQL)
        return int(cur.fetchone()[0])


async def async_pid(alias: str = DEFAULT_DB_ALIAS) -> int:
    async with async_connections[alias].cursor() as cur:
        await cur.execute(PID_SQL)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def run_case(case: type[unittest.TestCase], *names: str) -> unittest.TestResult:
    """Run test methods of ``case`` (defined inside a test, so pytest does not collect it)."""
    result = unittest.TestResult()
    unittest.TestSuite([case(name) for name in names]).run(result)
    return result


# --- AsyncioTestCase ------------------------------------------------------------------


class AsyncioTestCaseTests(AsyncioTestCase):
    def setUp(self):
        self.thread = threading.get_ident()

    async def asyncSetUp(self):
        self.setup_loop = asyncio.get_running_loop()
        self.setup_task = asyncio.current_task()

    async def test_runs_on_a_loop_in_the_test_thread(self):
        self.assertEqual(threading.get_ident(), self.thread)
        self.assertIs(asyncio.get_running_loop(), self.setup_loop)
        # asyncSetUp and the test share one task (and its context variables).
        self.assertIs(asyncio.current_task(), self.setup_task)

    async def test_database_access_is_refused(self):
        with self.assertRaises(DatabaseOperationForbidden):
            await Author.objects.acount()

    async def test_async_context_is_exited_as_cleanup(self):
        events = []

        class Ctx:
            async def __aenter__(self):
                events.append("enter")
                return 42

            async def __aexit__(self, *exc):
                events.append("exit")

        self.assertEqual(await self.enterAsyncContext(Ctx()), 42)
        self.addAsyncCleanup(self._check_exit_order, events)

    async def _check_exit_order(self, events):
        # Cleanups run last in, first out: this one before Ctx's __aexit__.
        assert events == ["enter"], events

    def test_sync_tests_still_run(self):
        with self.assertRaises(RuntimeError):
            asyncio.get_running_loop()


def test_asyncio_testcase_hook_order():
    events = []

    class Case(AsyncioTestCase):
        def setUp(self):
            events.append("setUp")

        async def asyncSetUp(self):
            events.append("asyncSetUp")
            self.addAsyncCleanup(self.cleanup, "cleanup1")

        async def test_it(self):
            events.append("test")
            self.addAsyncCleanup(self.cleanup, "cleanup2")

        async def asyncTearDown(self):
            events.append("asyncTearDown")

        def tearDown(self):
            events.append("tearDown")

        async def cleanup(self, name):
            asyncio.get_running_loop()
            events.append(name)

    result = run_case(Case, "test_it")
    assert result.wasSuccessful(), result.errors + result.failures
    assert events == [
        "setUp",
        "asyncSetUp",
        "test",
        "asyncTearDown",
        "cleanup2",
        "cleanup1",
        "tearDown",
    ]


def test_asyncio_testcase_failures_are_reported_and_cleaned_up():
    events = []

    class Case(AsyncioTestCase):
        async def asyncSetUp(self):
            self.addAsyncCleanup(self.cleanup)
            if self._testMethodName == "test_setup_fails":
                raise ValueError("setup")

        async def test_setup_fails(self):
            events.append("not run")

        async def test_fails(self):
            self.assertEqual(1, 2)

        async def asyncTearDown(self):
            events.append(f"asyncTearDown {self._testMethodName}")

        async def cleanup(self):
            events.append(f"cleanup {self._testMethodName}")

    result = run_case(Case, "test_fails", "test_setup_fails")
    assert [t._testMethodName for t, _ in result.failures] == ["test_fails"]
    assert [t._testMethodName for t, _ in result.errors] == ["test_setup_fails"]
    assert "ValueError: setup" in result.errors[0][1]
    # No asyncTearDown after a failed asyncSetUp; cleanups always run.
    assert events == [
        "asyncTearDown test_fails",
        "cleanup test_fails",
        "cleanup test_setup_fails",
    ]


def test_asyncio_testcase_closes_its_loop_and_cancels_leftover_tasks():
    seen = {}

    class Case(AsyncioTestCase):
        async def test_leaves_a_task(self):
            seen["loop"] = asyncio.get_running_loop()
            seen["task"] = asyncio.create_task(asyncio.sleep(3600))

    result = run_case(Case, "test_leaves_a_task")
    assert result.wasSuccessful(), result.errors
    assert seen["loop"].is_closed()
    assert seen["task"].cancelled()


def test_add_async_cleanup_needs_an_async_test():
    class Case(AsyncioTestCase):
        def test_sync(self):
            self.addAsyncCleanup(asyncio.sleep, 0)

    result = run_case(Case, "test_sync")
    assert len(result.errors) == 1
    assert "needs an async test" in result.errors[0][1]


def test_asyncio_testcase_leaves_the_thread_event_loop_alone():
    class Case(AsyncioTestCase):
        async def test_it(self):
            pass

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        assert run_case(Case, "test_it").wasSuccessful()
        assert asyncio.get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# --- AsyncioTransactionTestCase --------------------------------------------------------


class AsyncioTransactionTestCaseTests(AsyncioTransactionTestCase):
    async def test_1_durable_block_commits(self):
        async with async_atomic(durable=True):
            await Author.objects.acreate(name="committed")

        # Another task has its own connection: it sees the committed row.
        async def other_task():
            return await Author.objects.filter(name="committed").acount(), await async_pid()

        count, other = await asyncio.create_task(other_task())
        self.assertEqual(count, 1)
        self.assertNotEqual(other, await async_pid())

    async def test_2_tables_were_flushed(self):
        self.assertFalse(await Author.objects.filter(name="committed").aexists())

    async def test_durable_block_refuses_to_nest(self):
        async with async_atomic():
            with self.assertRaises(RuntimeError):
                async with async_atomic(durable=True):
                    pass

    async def test_on_commit_callbacks_run_after_commit(self):
        ran = []

        async def async_callback():
            ran.append("async")
            await Event.objects.acreate(task=1, label="from callback")

        async with async_atomic():
            await run_sync(transaction.on_commit, lambda: ran.append("sync"))
            await async_connections["default"].on_commit(async_callback)
            self.assertEqual(ran, [])
        self.assertEqual(ran, ["sync", "async"])
        self.assertEqual(await Event.objects.filter(label="from callback").acount(), 1)

    async def test_rollback_drops_on_commit_callbacks(self):
        ran = []
        with self.assertRaises(ValueError):
            async with async_atomic():
                await async_connections["default"].on_commit(lambda: ran.append(1))
                raise ValueError
        self.assertEqual(ran, [])

    async def test_assert_num_queries(self):
        async with self.assertNumQueries(2):
            await Author.objects.acreate(name="x")
            await Author.objects.acount()

    async def test_tasks_see_each_others_commits(self):
        async def writer(i):
            async with async_atomic():
                await Event.objects.acreate(task=i, label="w")

        await asyncio.gather(*(writer(i) for i in range(5)))
        self.assertEqual(await Event.objects.filter(label="w").acount(), 5)


# --- AsyncTestCase ---------------------------------------------------------------------


class AsyncTestCaseTests(AsyncTestCase):
    @classmethod
    def setUpTestData(cls):
        cls.author = Author.objects.create(name="fixture")

    def setUp(self):
        self.sync_pid = sync_pid()
        self.thread = threading.get_ident()

    async def test_1_creates_a_row(self):
        await Author.objects.acreate(name="test 1")
        self.assertEqual(await Author.objects.acount(), 2)

    async def test_2_row_of_previous_test_is_gone(self):
        self.assertFalse(await Author.objects.filter(name="test 1").aexists())
        self.assertEqual(await Author.objects.acount(), 1)

    async def test_fixture_rows_are_visible(self):
        author = await Author.objects.aget(pk=self.author.pk)
        self.assertEqual(author.name, "fixture")
        self.assertEqual(
            await run_sync(lambda: Author.objects.get(pk=self.author.pk).name), "fixture"
        )
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT name FROM testapp_author WHERE id = %s", [self.author.pk])
            self.assertEqual(await cur.fetchone(), ("fixture",))

    async def test_async_code_uses_the_test_connection(self):
        self.assertEqual(threading.get_ident(), self.thread)
        self.assertEqual(await async_pid(), self.sync_pid)
        self.assertEqual(await run_sync(sync_pid), self.sync_pid)
        self.assertIs(async_connections["default"].wrapper, install_storage().pinned("default"))
        # A child task too: every task of the test shares the test's connection.
        self.assertEqual(await asyncio.create_task(async_pid()), self.sync_pid)
        self.assertTrue(async_connections["default"].in_atomic_block)
        self.assertEqual(pool_stats("default"), {})  # no pool, no other connection

    async def test_async_atomic_nests_as_savepoints(self):
        wrapper = async_connections["default"].wrapper
        depth = len(wrapper.savepoint_ids)
        async with async_atomic():
            self.assertEqual(len(wrapper.savepoint_ids), depth + 1)
            await Author.objects.acreate(name="outer")
            with self.assertRaises(ValueError):
                async with async_atomic():
                    await Author.objects.acreate(name="inner")
                    raise ValueError
        names = [a.name async for a in Author.objects.order_by("name")]
        self.assertEqual(names, ["fixture", "outer"])
        self.assertTrue(wrapper.in_atomic_block)  # the test's transaction is still open

    async def test_durable_block_is_allowed_like_testcase(self):
        async with async_atomic(durable=True):
            await Author.objects.acreate(name="durable")
        self.assertTrue(await Author.objects.filter(name="durable").aexists())

    async def test_capture_on_commit_callbacks_runs_async_callbacks(self):
        ran = []

        async def async_callback():
            ran.append("async")
            await Event.objects.acreate(task=1, label="callback")

        def sync_callback():
            ran.append("sync")

        async with self.captureOnCommitCallbacks(execute=True) as callbacks:
            async with async_atomic():
                await run_sync(transaction.on_commit, sync_callback)
                await async_connections["default"].on_commit(async_callback)
            self.assertEqual(ran, [])
        self.assertEqual(ran, ["sync", "async"])
        self.assertEqual(len(callbacks), 2)
        self.assertIs(callbacks[0], sync_callback)
        self.assertEqual(await Event.objects.filter(label="callback").acount(), 1)

    async def test_capture_on_commit_callbacks_without_execute(self):
        ran = []
        async with self.captureOnCommitCallbacks() as callbacks:
            await async_connections["default"].on_commit(lambda: ran.append(1))
        self.assertEqual(len(callbacks), 1)
        self.assertEqual(ran, [])

    async def test_sync_capture_needing_the_bridge_names_the_fix(self):
        from django.core.exceptions import SynchronousOnlyOperation

        async def async_callback():
            pass

        with (
            self.assertRaisesMessage(SynchronousOnlyOperation, "async with self.capture"),
            self.captureOnCommitCallbacks(execute=True),
        ):
            await async_connections["default"].on_commit(async_callback)

    def test_capture_on_commit_callbacks_sync_test(self):
        ran = []
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            transaction.on_commit(lambda: ran.append(1))
        self.assertEqual((len(callbacks), ran), (1, [1]))

    async def test_assert_num_queries_counts_bridge_queries(self):
        async with self.assertNumQueries(3):
            await Author.objects.aget(pk=self.author.pk)
            await run_sync(lambda: Author.objects.count())
            await async_pid()

        async def two():
            await Author.objects.acreate(name="a")
            await Author.objects.acount()

        await self.assertNumQueries(2, two)
        with self.assertRaisesMessage(AssertionError, "1 queries executed, 2 expected"):
            async with self.assertNumQueries(2):
                await Author.objects.acount()

    async def test_sync_assert_num_queries_in_async_code_names_the_fix(self):
        from django.core.exceptions import SynchronousOnlyOperation

        with (
            self.assertRaisesMessage(SynchronousOnlyOperation, "async with self.assertNum"),
            self.assertNumQueries(1),
        ):
            pass

    def test_assert_num_queries_sync(self):
        with self.assertNumQueries(1):
            Author.objects.count()
        self.assertNumQueries(1, Author.objects.count)

    async def test_gather_shares_the_test_connection(self):
        async def work(i):
            await Event.objects.acreate(task=i, label="gather")
            return await async_pid(), await Event.objects.filter(label="gather").acount()

        results = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(10))), 30)
        self.assertEqual({pid for pid, _ in results}, {self.sync_pid})
        self.assertEqual(await Event.objects.filter(label="gather").acount(), 10)

    async def test_queries_on_the_test_connection_do_not_block_the_loop(self):
        # Django's sync pool hands out bridge-aware connections too.
        self.assertIsInstance(connection.connection, BridgeConnection)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT pg_sleep(0.3)")
        task.cancel()
        self.assertGreater(ticks, 5)

    async def test_other_database_is_refused(self):
        with self.assertRaises(DatabaseOperationForbidden):
            await Author.objects.using("other").acount()


class AsyncTestCaseMultiDbTests(AsyncTestCase):
    databases = {"default", "other"}

    @classmethod
    def setUpTestData(cls):
        Author.objects.using("other").create(name="other fixture")

    async def test_each_alias_uses_its_test_connection(self):
        self.assertEqual(await async_pid("other"), await run_sync(sync_pid, "other"))
        self.assertNotEqual(await async_pid("other"), await async_pid("default"))
        names = [a.name async for a in Author.objects.using("other").all()]
        self.assertEqual(names, ["other fixture"])


# --- Django's own TestCase / TransactionTestCase with async tests ------------------------


class DjangoTestCaseAsyncTests(TestCase):
    """Django runs these on a loop in another thread (async_to_sync): pinning applies."""

    @classmethod
    def setUpTestData(cls):
        cls.author = Author.objects.create(name="fixture")

    def setUp(self):
        self.sync_pid = sync_pid()
        self.thread = threading.get_ident()

    async def test_1_creates_a_row(self):
        await Author.objects.acreate(name="test 1")

    async def test_2_row_of_previous_test_is_gone(self):
        self.assertFalse(await Author.objects.filter(name="test 1").aexists())

    async def test_fixture_rows_seen_through_aget(self):
        self.assertNotEqual(threading.get_ident(), self.thread)  # Django's loop thread
        author = await Author.objects.aget(pk=self.author.pk)
        self.assertEqual(author.name, "fixture")

    async def test_fixture_rows_seen_through_async_connections(self):
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT name, pg_backend_pid() FROM testapp_author")
            self.assertEqual(await cur.fetchall(), [("fixture", self.sync_pid)])

    async def test_no_new_connection_is_opened(self):
        await Author.objects.aget(pk=self.author.pk)
        async with async_atomic():
            await Author.objects.acreate(name="in savepoint")
        self.assertEqual(await async_pid(), self.sync_pid)
        self.assertEqual(await asyncio.create_task(async_pid()), self.sync_pid)
        self.assertEqual(pool_stats("default"), {})

    async def test_gather_shares_the_test_connection(self):
        async def work(i):
            await Author.objects.acreate(name=f"g{i}")
            return await async_pid()

        pids = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(8))), 30)
        self.assertEqual(set(pids), {self.sync_pid})
        self.assertEqual(await Author.objects.filter(name__startswith="g").acount(), 8)


class DjangoTransactionTestCaseAsyncTests(TransactionTestCase):
    async def test_1_commits(self):
        async with async_atomic():
            await Author.objects.acreate(name="committed")
        self.assertEqual(await Author.objects.acount(), 1)

    async def test_2_tables_were_flushed(self):
        self.assertEqual(await Author.objects.acount(), 0)


# --- Pinning -------------------------------------------------------------------------


def test_pins_follow_the_testcase_transactions(django_db_setup, django_db_blocker):
    storage = install_storage()
    seen = {}

    class Case(TestCase):
        @classmethod
        def setUpTestData(cls):
            seen["class"] = storage.pinned("default")

        def test_a(self):
            seen["test"] = storage.pinned("default")

        @classmethod
        def tearDownClass(cls):
            seen["between"] = storage.pinned("default")  # class transaction still open
            super().tearDownClass()

    with django_db_blocker.unblock():
        result = run_case(Case, "test_a")
        wrapper = connections["default"]
    assert result.wasSuccessful(), result.errors + result.failures
    assert seen == {"class": wrapper, "test": wrapper, "between": wrapper}
    assert storage.pinned("default") is None
