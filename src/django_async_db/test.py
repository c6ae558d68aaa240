"""Test cases for async code on this package, with Django's test isolation.

* :class:`AsyncioTestCase`: async test methods (and ``asyncSetUp`` /
  ``asyncTearDown``) on a real event loop in the test's own thread; no
  database (like ``SimpleTestCase``).
* :class:`AsyncioTransactionTestCase`: the same on ``TransactionTestCase``:
  real commits, tables flushed after each test.
* :class:`AsyncTestCase`: the same on ``TestCase``: each test runs in a
  transaction rolled back at the end; async code (the ORM's ``a*`` methods,
  ``run_sync``, ``async_atomic``, ``async_connections``) runs on the test's
  connection, so it sees ``setUpTestData`` rows and nested ``async_atomic``
  blocks are savepoints.

Django's own ``TestCase`` keeps working for ``async def`` tests too: while a
test runs, its connections are *pinned*, so bridge calls made on the loop
Django starts in another thread use the test's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS, connections
from django.test import SimpleTestCase, TestCase, TransactionTestCase
from django.test.testcases import _AssertNumQueriesContext

from ._bridge import _loop_running, in_bridge, run_sync
from ._storage import install as install_storage

__all__ = [
    "AsyncTestCase",
    "AsyncioTestCase",
    "AsyncioTransactionTestCase",
    "install_testcase_pinning",
    "pin_connections",
    "unpin_connections",
]

T = TypeVar("T")


def _ours(wrapper: Any) -> bool:
    from .backends.postgresql.base import DatabaseWrapper

    return isinstance(wrapper, DatabaseWrapper)


def pin_connections(aliases: Iterable[str]) -> dict[str, Any]:
    """Make async code on any loop use this thread's connections for ``aliases``.

    Return what was pinned before, for :func:`unpin_connections`: pins nest
    (a ``TestCase``'s per-test transaction inside its per-class one).
    """
    storage = install_storage()
    previous: dict[str, Any] = {}
    for alias in aliases:
        wrapper = connections[alias]
        if _ours(wrapper):
            previous[alias] = storage.pinned(alias)
            storage.pin(alias, wrapper)
    return previous


def unpin_connections(previous: dict[str, Any]) -> None:
    """Undo :func:`pin_connections`, given what it returned."""
    storage = install_storage()
    for alias, wrapper in previous.items():
        if wrapper is None:
            storage.unpin(alias)
        else:
            storage.pin(alias, wrapper)


# What each open set of TestCase atomics replaced, by id() of the atomics dict.
_pinned_by_atomics: dict[int, dict[str, Any]] = {}
_pinning_installed = False


def install_testcase_pinning() -> None:
    """Pin a ``TestCase``'s connections while its test transaction is open (idempotent).

    Applied to ``django.test.TestCase`` (and so to pytest-django's ``db``
    fixture and ``django_db`` mark) when the app is ready: async code of the
    test, on any loop and in any task, runs on the test's connection and
    inside its transaction instead of taking a new connection.
    """
    global _pinning_installed
    if _pinning_installed:
        return
    _pinning_installed = True
    install_storage()
    enter = TestCase._enter_atomics.__func__  # type: ignore[attr-defined]
    rollback = TestCase._rollback_atomics.__func__  # type: ignore[attr-defined]

    def _enter_atomics(cls: type[TestCase]) -> dict[str, Any]:
        atomics: dict[str, Any] = enter(cls)
        _pinned_by_atomics[id(atomics)] = pin_connections(atomics)
        return atomics

    def _rollback_atomics(cls: type[TestCase], atomics: dict[str, Any]) -> None:
        unpin_connections(_pinned_by_atomics.pop(id(atomics), {}))
        rollback(cls, atomics)

    TestCase._enter_atomics = classmethod(_enter_atomics)  # type: ignore[attr-defined]
    TestCase._rollback_atomics = classmethod(_rollback_atomics)  # type: ignore[attr-defined]


class _AsyncioMixin:
    """Run ``async def`` tests on a loop in the test's thread (not Django's loop thread).

    ``asyncSetUp``, the test, ``asyncTearDown`` and the async cleanups run in
    one task on one loop, so they share context variables and, in
    transactional tests, the task's connection. The loop is closed after the
    test, with every task it still runs cancelled and its connections closed.
    """

    _testMethodName: str
    #: Callable returning the event loop for each test (``asyncio.new_event_loop``
    #: when None); for example ``uvloop.new_event_loop``.
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None

    async def asyncSetUp(self) -> None:
        """Run before each test, on the test's event loop, after ``setUp()``."""

    async def asyncTearDown(self) -> None:
        """Run after each test, on the test's event loop, before ``tearDown()``."""

    def addAsyncCleanup(
        self, func: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
    ) -> None:
        """Await ``func(*args, **kwargs)`` on the test's loop after ``asyncTearDown()``.

        Cleanups run last in, first out, even when ``asyncSetUp()`` or the
        test failed. Only for ``async def`` tests.
        """
        cleanups = getattr(self, "_async_cleanups", None)
        if cleanups is None:
            raise TypeError(
                f"addAsyncCleanup() needs an async test; {self._testMethodName!r} is not "
                f"an `async def` method. Use addCleanup() in sync tests."
            )
        cleanups.append((func, args, kwargs))

    async def enterAsyncContext(self, cm: contextlib.AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager, exiting it as an async cleanup."""
        cls = type(cm)
        try:
            enter, exit_ = cls.__aenter__, cls.__aexit__
        except AttributeError:
            raise TypeError(
                f"'{cls.__module__}.{cls.__qualname__}' object does not support "
                f"the asynchronous context manager protocol."
            ) from None
        result: T = await enter(cm)
        self.addAsyncCleanup(exit_, cm, None, None, None)
        return result

    def _setup_and_call(self, result: Any, debug: bool = False) -> None:
        method = getattr(self, self._testMethodName)
        if inspect.iscoroutinefunction(method):
            self._async_cleanups: list[tuple[Callable[..., Awaitable[Any]], Any, Any]] = []
            # Replaced before Django's _setup_and_call() would wrap it in
            # async_to_sync(), which runs the loop in another thread.
            setattr(self, self._testMethodName, self._on_loop(method))
        super()._setup_and_call(result, debug)  # type: ignore[misc]

    def _on_loop(self, method: Callable[[], Coroutine[Any, Any, Any]]) -> Callable[[], None]:
        def run() -> None:
            # With a loop factory the Runner leaves the thread's current loop
            # alone (pytest-asyncio may own it).
            factory = self.loop_factory or asyncio.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self._run_async(method))

        return run

    async def _run_async(self, method: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        from .connection import async_connections

        try:
            await self.asyncSetUp()
            try:
                await method()
            finally:
                await self.asyncTearDown()
        finally:
            try:
                await self._do_async_cleanups()
            finally:
                # The test's task-owned connections and this loop's pools;
                # pinned connections (AsyncTestCase) are not the task's own.
                await async_connections.close_all()

    async def _do_async_cleanups(self) -> None:
        error: BaseException | None = None
        while self._async_cleanups:
            func, args, kwargs = self._async_cleanups.pop()
            try:
                await func(*args, **kwargs)
            except BaseException as exc:  # run every cleanup, raise the first error
                error = error or exc
        if error is not None:
            raise error


class _QueriesMixin:
    """``assertNumQueries`` usable with ``async with`` (the count includes bridge queries)."""

    def assertNumQueries(  # type: ignore[override]
        self,
        num: int,
        func: Callable[..., Any] | None = None,
        *args: Any,
        using: str = DEFAULT_DB_ALIAS,
        **kwargs: Any,
    ) -> Any:
        """Assert ``num`` queries run on ``using``: ``with``, ``async with``, or a callable.

        Example::

            async with self.assertNumQueries(1):
                await Author.objects.aget(pk=1)
            await self.assertNumQueries(2, create_two)   # an async function
        """
        context = _AsyncAssertNumQueriesContext(self, num, connections[using])
        if func is None:
            return context
        if inspect.iscoroutinefunction(func):
            return _awaited_in(context, func(*args, **kwargs))
        with context:
            func(*args, **kwargs)
        return None


async def _awaited_in(context: _AsyncAssertNumQueriesContext, coro: Awaitable[Any]) -> None:
    async with context:
        await coro


class _AsyncAssertNumQueriesContext(_AssertNumQueriesContext):  # type: ignore[misc]
    """Django's query-count context, also usable with ``async with``."""

    def __enter__(self) -> _AsyncAssertNumQueriesContext:
        if _loop_running() and not in_bridge():
            raise SynchronousOnlyOperation(
                "assertNumQueries() cannot be entered with `with` in async code: it "
                "touches the connection. Use `async with self.assertNumQueries(...)`."
            )
        return super().__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> _AsyncAssertNumQueriesContext:
        # __enter__ may connect (ensure_connection): do it through the bridge.
        return await run_sync(self.__enter__)  # type: ignore[no-any-return]

    async def __aexit__(self, *exc: Any) -> None:
        self.__exit__(*exc)  # no I/O: counts the queries and compares


class AsyncioTestCase(_AsyncioMixin, SimpleTestCase):
    """Async tests on a real event loop in the test's thread; no database access.

    Example::

        class SlugTests(AsyncioTestCase):
            async def asyncSetUp(self):
                self.client = await make_client()

            async def test_slug(self):
                self.assertEqual(await make_slug("A b"), "a-b")
    """


class AsyncioTransactionTestCase(_QueriesMixin, _AsyncioMixin, TransactionTestCase):
    """Async tests with real commits; tables are flushed after each test.

    For code whose behaviour depends on commits: ``on_commit`` callbacks,
    ``durable=True`` blocks, several tasks seeing each other's writes. Each
    task uses its own pooled connection, as in production. Example::

        class TransferTests(AsyncioTransactionTestCase):
            async def test_commit(self):
                async with async_atomic(durable=True):
                    await Account.objects.acreate(name="a")
                self.assertEqual(await Account.objects.acount(), 1)
    """


class AsyncTestCase(_QueriesMixin, _AsyncioMixin, TestCase):
    """Async tests in a transaction rolled back after each test, like ``TestCase``.

    Async code runs on the test's connection: it sees ``setUpTestData`` rows,
    ``async_atomic`` blocks nest as savepoints, ``assertNumQueries`` counts
    bridge queries. Example::

        class BookTests(AsyncTestCase):
            @classmethod
            def setUpTestData(cls):
                cls.author = Author.objects.create(name="Ann")

            async def test_lookup(self):
                author = await Author.objects.aget(pk=self.author.pk)
                async with self.captureOnCommitCallbacks(execute=True) as callbacks:
                    async with async_atomic():
                        await async_connections["default"].on_commit(notify)
                self.assertEqual(len(callbacks), 1)
    """

    @classmethod
    def captureOnCommitCallbacks(  # type: ignore[override]
        cls, *, using: str = DEFAULT_DB_ALIAS, execute: bool = False
    ) -> _CaptureOnCommit:
        """Capture ``on_commit`` callbacks; use ``async with`` to run async ones."""
        return _CaptureOnCommit(using, execute)


def _unwrapped(callbacks: list[Callable[[], Any]]) -> None:
    # Async callbacks are registered wrapped for the bridge: show the user's.
    callbacks[:] = [getattr(cb, "__wrapped__", cb) for cb in callbacks]


class _CaptureOnCommit:
    """``captureOnCommitCallbacks`` usable with ``with`` or ``async with``."""

    def __init__(self, using: str, execute: bool) -> None:
        self.using = using
        self.execute = execute

    def _sync(self) -> contextlib.AbstractContextManager[list[Callable[[], Any]]]:
        return TestCase.captureOnCommitCallbacks.__func__(  # type: ignore[attr-defined,no-any-return]
            TestCase, using=self.using, execute=self.execute
        )

    def __enter__(self) -> list[Callable[[], Any]]:
        self._cm = self._sync()
        self._callbacks = self._cm.__enter__()
        return self._callbacks

    def __exit__(self, *exc: Any) -> None:
        try:
            self._cm.__exit__(*exc)
        except SynchronousOnlyOperation as error:
            if in_bridge() or not _loop_running():
                raise
            raise SynchronousOnlyOperation(
                "An on_commit callback captured by captureOnCommitCallbacks(execute=True) "
                "needs the database or is async: in async code use "
                "`async with self.captureOnCommitCallbacks(...)`."
            ) from error
        finally:
            _unwrapped(self._callbacks)

    async def __aenter__(self) -> list[Callable[[], Any]]:
        self._acm = self._acapture()
        return await self._acm.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        await self._acm.__aexit__(*exc)

    @contextlib.asynccontextmanager
    async def _acapture(self) -> AsyncIterator[list[Callable[[], Any]]]:
        cm = self._sync()
        callbacks = cm.__enter__()  # no I/O: counts the registered callbacks
        try:
            yield callbacks
        finally:
            try:
                # Django runs the callbacks in __exit__: do it through the
                # bridge so async callbacks (and their queries) work.
                await run_sync(cm.__exit__, None, None, None)
            finally:
                _unwrapped(callbacks)
