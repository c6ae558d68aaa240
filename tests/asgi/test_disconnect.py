"""``ASGIHandler.handle()``: the view in the request's task, one listener for a disconnect."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.core.handlers.asgi import ASGIHandler as DjangoASGIHandler
from django.core.signals import request_finished

from django_async_db import pool_stats
from django_async_db.asgi import ASGIHandler
from tests.asgi.client import Exchange, request
from tests.asgi.urls import SEEN
from tests.conftest import wait_until

APPS = ["django_async_db", "tests.testapp"]
pytestmark = [
    pytest.mark.django_db(transaction=True, available_apps=APPS),
    pytest.mark.usefixtures("asgi_urls"),
]


@pytest.fixture
def finished() -> Iterator[list[str]]:
    """Record ``request_finished``: a sync and an async receiver append their kind."""
    calls: list[str] = []

    def sync_receiver(sender: Any, **kwargs: Any) -> None:
        calls.append("sync")

    async def async_receiver(sender: Any, **kwargs: Any) -> None:
        calls.append("async")

    request_finished.connect(sync_receiver)
    request_finished.connect(async_receiver)
    try:
        yield calls
    finally:
        request_finished.disconnect(sync_receiver)
        request_finished.disconnect(async_receiver)


async def started() -> None:
    event = SEEN["started"]
    assert isinstance(event, asyncio.Event)
    await asyncio.wait_for(event.wait(), 10)


def release() -> None:
    event = SEEN["release"]
    assert isinstance(event, asyncio.Event)
    event.set()


async def test_the_view_runs_in_the_requests_task_next_to_one_listener():
    app = ASGIHandler()
    await request(app, "/read-write/")  # warm: the pool's own tasks are running
    exchange = Exchange(app, "/wait/")
    before = asyncio.all_tasks()
    task = exchange.start()
    try:
        await started()
        assert SEEN["view_task"] is task
        new = {t.get_coro().__qualname__ for t in asyncio.all_tasks() - before}  # type: ignore[union-attr]
        # The request's task (where the view runs) and the disconnect listener, no other.
        assert new == {"ASGIHandler.__call__", "ASGIHandler._cancel_on_disconnect"}
    finally:
        release()
        await task
    assert exchange.messages[0]["status"] == 200


async def test_a_disconnect_cancels_the_view_and_request_finished_runs(finished, hop_probe):
    exchange = Exchange(ASGIHandler(), "/wait/")
    task = exchange.start()
    await started()
    hops = len(hop_probe())
    exchange.disconnect()
    await asyncio.wait_for(task, 10)  # no error: a disconnect is not one
    assert SEEN["view_cancelled"] is True
    assert exchange.messages == []  # nothing sent to a client that is gone
    assert sorted(finished) == ["async", "sync"]  # once each
    assert len(hop_probe()) - hops == 1  # only the sync receiver's, as with Django

    async def released() -> bool:
        return pool_stats("default")["in_use"] == 0  # type: ignore[no-any-return]

    assert await wait_until(released)


async def test_a_disconnect_while_streaming_stops_the_stream_and_closes_the_response(finished):
    exchange = Exchange(ASGIHandler(), "/stream/")
    task = exchange.start()
    await started()  # the first chunk is sent, the stream waits
    exchange.disconnect()
    await asyncio.wait_for(task, 10)
    assert SEEN["stream_cancelled"] is True
    assert SEEN["stream_closed"] is True  # aclose() ran
    assert exchange.messages[0]["status"] == 200
    assert exchange.body() == b"first\n"
    assert sorted(finished) == ["async", "sync"]  # from response.close()


async def test_a_streaming_response_is_sent_whole_on_the_loop(finished, hop_probe, thread_probe):
    exchange = Exchange(ASGIHandler(), "/stream/")
    task = exchange.start()
    await started()
    release()
    await asyncio.wait_for(task, 10)
    assert exchange.body() == b"first\nlast 0\n"
    assert exchange.messages[-1] == {"type": "http.response.body"}  # the closing message
    assert "stream_cancelled" not in SEEN
    assert SEEN["stream_closed"] is True
    assert sorted(finished) == ["async", "sync"]
    assert thread_probe() == {threading.get_ident()}  # the stream's query ran on the loop
    await asyncio.sleep(0)
    assert exchange.receive_calls[-1] == "cancelled"  # the listener is stopped once served


async def test_streaming_makes_no_thread_hop(hop_probe):
    app = ASGIHandler()
    release()
    await request(app, "/stream/")  # warm
    before = len(hop_probe())
    response = await request(app, "/stream/")
    assert response.body == b"first\nlast 0\n"
    assert hop_probe()[before:] == []


async def test_a_view_that_answers_when_cancelled_is_sent_and_its_task_not_left_cancelled(finished):
    exchange = Exchange(ASGIHandler(), "/wait/", query="swallow=1")

    async def serve() -> int:
        await exchange.app(exchange.scope, exchange.receive, exchange.send)
        await asyncio.sleep(0)  # a pending cancellation would be raised here
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    task = asyncio.create_task(serve())
    await started()
    exchange.disconnect()
    assert await asyncio.wait_for(task, 10) == 0
    assert SEEN["view_cancelled"] is True
    assert exchange.body() == b'{"swallowed": true}'
    assert sorted(finished) == ["async", "sync"]


async def test_another_message_from_the_listener_is_raised_after_cancelling_the_view():
    exchange = Exchange(ASGIHandler(), "/wait/")
    task = exchange.start()
    await started()
    exchange.send_message({"type": "http.not_a_real_message"})
    with pytest.raises(AssertionError, match="Invalid ASGI message after request body"):
        await asyncio.wait_for(task, 10)
    assert SEEN["view_cancelled"] is True


async def test_a_cancellation_from_outside_propagates(finished):
    exchange = Exchange(ASGIHandler(), "/wait/")
    task = exchange.start()
    await started()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert SEEN["view_cancelled"] is True
    await asyncio.sleep(0)
    assert exchange.receive_calls[-1] == "cancelled"  # the listener did not outlive it


async def test_a_cancellation_from_outside_wins_over_a_simultaneous_disconnect():
    exchange = Exchange(ASGIHandler(), "/wait/")
    task = exchange.start()
    await started()
    exchange.disconnect()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert SEEN["view_cancelled"] is True


async def test_an_exception_in_the_view_is_a_500_and_request_finished_runs(finished):
    response = await request(ASGIHandler(), "/fail/")
    assert response.status == 500
    assert sorted(finished) == ["async", "sync"]


async def test_an_error_sending_the_response_propagates():
    exchange = Exchange(ASGIHandler(), "/read-write/")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the connection was reset")
        exchange.messages.append(message)

    exchange.send = send  # type: ignore[method-assign]
    with pytest.raises(OSError, match="reset"):
        await asyncio.wait_for(exchange.start(), 10)
    await asyncio.sleep(0)
    assert exchange.receive_calls[-1] == "cancelled"


async def test_the_handler_matches_djangos_on_the_same_disconnects(finished):
    """The same three exchanges through Django's handler and ours: the same outcomes."""
    outcomes: dict[str, list[Any]] = {}
    for name, app in [("django", DjangoASGIHandler()), ("ours", ASGIHandler())]:
        outcomes[name] = []
        for path, query in [("/wait/", ""), ("/wait/", "swallow=1"), ("/stream/", "")]:
            SEEN["started"], SEEN["release"] = asyncio.Event(), asyncio.Event()
            SEEN.pop("view_cancelled", None)
            finished.clear()
            exchange = Exchange(app, path, query)
            task = exchange.start()
            await started()
            exchange.disconnect()
            await asyncio.wait_for(task, 10)
            outcomes[name].append((exchange.body(), SEEN.get("view_cancelled"), sorted(finished)))
    assert outcomes["ours"] == outcomes["django"]


# Django's handle() as reviewed for ASGIHandler.handle() (sha256 of its source, first 16 hex
# digits): a Django release that changes it fails here, to be compared again.
REVIEWED_HANDLE = {
    "5.2": "98faeb5bef800331",
    "6.1": "c91f27c7fcdc3fff",
}


def test_djangos_handle_is_a_version_the_handler_was_compared_with():
    source = inspect.getsource(DjangoASGIHandler.handle)
    series = "{}.{}".format(*django.VERSION[:2])
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == REVIEWED_HANDLE.get(series)
