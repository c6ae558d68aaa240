"""The greenlet bridge: sync code runs in the calling task, its waits become awaits."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading

import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connection, transaction

from django_async_db import async_connections, await_only, in_bridge, run_sync
from tests.testapp.models import Author, Book

# Real commits, each task on its own pooled connection. Only the test app's
# tables are flushed afterwards (available_apps), which keeps the teardown fast.
db = pytest.mark.django_db(transaction=True, available_apps=["django_async_db", "tests.testapp"])

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class Boom(Exception):
    """Raised by sync code to check propagation."""


# The bridge alone (no database)


async def test_run_sync_returns_the_result_and_passes_arguments():
    def add(a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    assert await run_sync(add, 1, 2, scale=10) == 30


async def test_run_sync_propagates_exceptions():
    def fail() -> None:
        raise Boom("from sync code")

    with pytest.raises(Boom, match="from sync code"):
        await run_sync(fail)


async def test_run_sync_runs_in_the_calling_task_on_the_loop_thread():
    task = asyncio.current_task()

    def where() -> tuple[int, asyncio.Task | None, asyncio.AbstractEventLoop]:
        return threading.get_ident(), asyncio.current_task(), asyncio.get_running_loop()

    ident, inner_task, loop = await run_sync(where)
    assert ident == threading.get_ident()
    assert inner_task is task
    assert loop is asyncio.get_running_loop()


async def test_run_sync_sees_the_tasks_context_variables():
    token = request_id.set("req-1")
    try:
        assert await run_sync(request_id.get) == "req-1"

        async def other_task() -> str:
            request_id.set("req-2")
            return await run_sync(request_id.get)

        assert await asyncio.create_task(other_task()) == "req-2"
        assert await run_sync(request_id.get) == "req-1"
    finally:
        request_id.reset(token)


async def test_in_bridge_is_true_only_inside_run_sync():
    assert in_bridge() is False
    assert await run_sync(in_bridge) is True


async def test_await_only_waits_on_the_loop_and_returns_the_result():
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert await run_sync(lambda: await_only(double(21))) == 42


async def test_await_only_raises_the_awaitables_exception_into_sync_code():
    async def fail() -> None:
        await asyncio.sleep(0)
        raise Boom("async failure")

    def catch() -> str:
        try:
            await_only(fail())
        except Boom as exc:
            return f"caught {exc}"
        return "not raised"

    assert await run_sync(catch) == "caught async failure"


async def test_await_only_outside_a_bridge_is_refused_and_closes_the_coroutine():
    coro = asyncio.sleep(0)
    with pytest.raises(SynchronousOnlyOperation, match="run_sync"):
        await_only(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


async def test_bridges_interleave_on_one_thread():
    events: list[str] = []

    def worker(name: str) -> str:
        events.append(f"{name} start")
        await_only(asyncio.sleep(0.05))
        events.append(f"{name} end")
        return name

    assert await asyncio.gather(run_sync(worker, "a"), run_sync(worker, "b")) == ["a", "b"]
    assert events[:2] == ["a start", "b start"]  # b started while a was waiting
    assert sorted(events[2:]) == ["a end", "b end"]


async def test_bridges_nest():
    def inner() -> bool:
        return in_bridge()

    def outer() -> bool:
        return await_only(run_sync(inner))

    assert await run_sync(outer) is True


async def test_cancellation_reaches_the_sync_code_and_propagates():
    cleanup: list[str] = []
    started = asyncio.Event()

    def wait_forever() -> None:
        started.set()
        try:
            await_only(asyncio.sleep(10))
        except asyncio.CancelledError:
            cleanup.append("cancelled")
            raise
        finally:
            cleanup.append("finally")

    task = asyncio.create_task(run_sync(wait_forever))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleanup == ["cancelled", "finally"]


async def test_bridge_greenlets_are_reused_after_results_errors_and_cancellations():
    from greenlet import getcurrent

    def me() -> object:
        return getcurrent()

    first = await run_sync(me)
    assert await run_sync(me) is first  # a call's greenlet serves the next call

    def fail() -> None:
        raise Boom("again")

    with pytest.raises(Boom) as info:
        await run_sync(fail)
    # The traceback starts at the caller's code: no frame of the bridge's loop.
    frames = [entry.name for entry in info.traceback]
    assert "_serve" not in frames
    assert frames[-1] == "fail"
    assert await run_sync(me) is first

    def sleep_then_return() -> object:
        await_only(asyncio.sleep(10))
        return getcurrent()

    task = asyncio.create_task(run_sync(sleep_then_return))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await run_sync(me) is first

    # Concurrent calls each get their own greenlet; both are kept afterwards.
    def hold() -> object:
        await_only(asyncio.sleep(0.01))
        return getcurrent()

    a, b = await asyncio.gather(run_sync(hold), run_sync(hold))
    assert a is not b
    assert {await run_sync(me), await run_sync(me)} <= {first, a, b}


async def test_an_idle_bridge_greenlet_keeps_no_context_or_result_alive():
    import gc
    import weakref

    from greenlet import getcurrent

    class Result:
        pass

    seen: list[object] = []

    def make() -> Result:
        seen.append(getcurrent())
        return Result()

    token = request_id.set("held")
    try:
        ref = weakref.ref(await run_sync(make))
    finally:
        request_id.reset(token)
    glet = seen.pop()
    assert glet.gr_context is None  # type: ignore[attr-defined]
    gc.collect()
    assert ref() is None


# Misuse: sync database access in async code outside the bridge


def assert_names_the_fix(exc: BaseException) -> None:
    message = str(exc)
    assert "run_sync" in message
    assert "select_related" in message
    assert "prefetch_related" in message


@db
async def test_sync_orm_call_in_async_code_raises_a_helpful_error():
    await Author.objects.acreate(name="Ann")
    with pytest.raises(SynchronousOnlyOperation) as info:
        Author.objects.get(name="Ann")
    assert_names_the_fix(info.value)
    with pytest.raises(SynchronousOnlyOperation) as info:
        Author.objects.count()
    assert_names_the_fix(info.value)


@db
async def test_lazy_foreign_key_access_raises_and_run_sync_fixes_it():
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="B", author=ann)
    book = await Book.objects.aget(pk=book.pk)

    with pytest.raises(SynchronousOnlyOperation) as info:
        book.author  # noqa: B018 - the lazy access is the point
    assert_names_the_fix(info.value)

    author = await run_sync(lambda: book.author)
    assert author == ann
    assert book.author.name == "Ann"  # cached now: no query, no error

    prefetched = await Book.objects.select_related("author").aget(pk=book.pk)
    assert prefetched.author.name == "Ann"


@db
async def test_deferred_field_access_raises_and_run_sync_fixes_it():
    ann = await Author.objects.acreate(name="Ann", bio="writes")
    author = await Author.objects.only("name").aget(pk=ann.pk)
    with pytest.raises(SynchronousOnlyOperation) as info:
        author.bio  # noqa: B018
    assert_names_the_fix(info.value)
    assert await run_sync(lambda: author.bio) == "writes"


@db
async def test_sync_cursor_and_atomic_in_async_code_raise():
    with pytest.raises(SynchronousOnlyOperation) as info:
        connection.cursor()
    assert_names_the_fix(info.value)
    with pytest.raises(SynchronousOnlyOperation), transaction.atomic():
        pass
    # The task's connection is unharmed.
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


@db
async def test_sync_orm_code_works_unchanged_inside_run_sync():
    def sync_view() -> list[str]:
        ann = Author.objects.create(name="Ann")
        Book.objects.create(title="B1", author=ann)
        Book.objects.create(title="B2", author=ann)
        return [f"{b.title} by {b.author.name}" for b in Book.objects.order_by("title")]

    assert await run_sync(sync_view) == ["B1 by Ann", "B2 by Ann"]
