"""``django_async_db.asgi.ASGIHandler``: no thread hop per request, receivers still run."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler as DjangoASGIHandler
from django.core.signals import request_finished, request_started
from django.test import override_settings

from django_async_db import pool_stats
from django_async_db.asgi import ASGIHandler, get_asgi_application
from tests.asgi.client import request
from tests.asgi.urls import SEEN
from tests.conftest import wait_until

APPS = ["django_async_db", "tests.testapp"]
pytestmark = [
    pytest.mark.django_db(transaction=True, available_apps=APPS),
    pytest.mark.usefixtures("asgi_urls"),
]


async def test_async_view_reading_and_writing_makes_no_thread_hop(hop_probe, thread_probe):
    app = ASGIHandler()
    await request(app, "/read-write/")  # warm: URL resolver, pool
    before = len(hop_probe())
    response = await request(app, "/read-write/", query="name=probe")
    assert response.status == 200, response.body
    assert response.json()["count"] == 1
    assert hop_probe()[before:] == []
    assert thread_probe() == {threading.get_ident()}  # every statement ran on the loop


async def test_djangos_handler_hops_for_the_same_view(hop_probe):
    """The baseline the handler removes: Django's own handler hops twice per request."""
    app = DjangoASGIHandler()
    await request(app, "/read-write/")
    before = len(hop_probe())
    assert (await request(app, "/read-write/")).status == 200
    assert len(hop_probe()[before:]) >= 2


async def test_connection_returned_to_the_pool_at_request_end():
    app = ASGIHandler()
    assert (await request(app, "/read-write/")).status == 200
    await asyncio.sleep(0)  # the request task's done callbacks
    assert SEEN["view_thread"] == threading.get_ident()
    # No task holds it: it waits, parked with its wrapper, for the next request.
    assert pool_stats("default")["in_use"] == 0
    first = SEEN["wrapper"]
    assert (await request(app, "/read-write/")).status == 200
    assert SEEN["wrapper"] is first


async def test_a_connection_broken_during_the_request_is_not_kept_for_the_next():
    app = ASGIHandler()

    def break_connection(sender: Any, **kwargs: Any) -> None:
        wrapper = SEEN["wrapper"]
        wrapper.errors_occurred = True  # type: ignore[attr-defined]
        wrapper.connection.pgconn.finish()  # type: ignore[attr-defined]

    request_finished.connect(break_connection)
    try:
        assert (await request(app, "/read-write/")).status == 200
    finally:
        request_finished.disconnect(break_connection)

    async def released() -> bool:
        return pool_stats("default")["in_use"] == 0  # type: ignore[no-any-return]

    assert await wait_until(released)
    broken = SEEN["wrapper"]
    assert (await request(app, "/read-write/")).status == 200  # on a sound connection
    assert SEEN["wrapper"] is not broken


async def test_users_receivers_still_run():
    calls: list[tuple[str, str, int]] = []

    def sync_started(sender: Any, **kwargs: Any) -> None:
        calls.append(("sync", "started", threading.get_ident()))

    def sync_finished(sender: Any, **kwargs: Any) -> None:
        calls.append(("sync", "finished", threading.get_ident()))

    async def async_started(sender: Any, **kwargs: Any) -> None:
        calls.append(("async", "started", threading.get_ident()))

    async def async_finished(sender: Any, **kwargs: Any) -> None:
        calls.append(("async", "finished", threading.get_ident()))

    request_started.connect(sync_started)
    request_started.connect(async_started)
    request_finished.connect(sync_finished)
    request_finished.connect(async_finished)
    try:
        assert (await request(ASGIHandler(), "/read-write/")).status == 200
    finally:
        request_started.disconnect(sync_started)
        request_started.disconnect(async_started)
        request_finished.disconnect(sync_finished)
        request_finished.disconnect(async_finished)
    loop_thread = threading.get_ident()
    kinds = sorted((kind, signal) for kind, signal, _ in calls)
    assert kinds == [
        ("async", "finished"),
        ("async", "started"),
        ("sync", "finished"),
        ("sync", "started"),
    ]
    threads = {(kind, signal): ident for kind, signal, ident in calls}
    # As with Django: sync receivers in the request's thread, async ones on the loop.
    assert threads["async", "started"] == threads["async", "finished"] == loop_thread
    assert threads["sync", "started"] == threads["sync", "finished"] != loop_thread


class UnhashableReceiver:
    """A receiver object with its own ``__eq__`` (so no ``__hash__``), as Django allows."""

    def __init__(self) -> None:
        self.calls = 0

    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = None  # type: ignore[assignment]

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.calls += 1


async def test_unhashable_receiver_runs():
    receiver = UnhashableReceiver()
    request_finished.connect(receiver)
    try:
        assert (await request(ASGIHandler(), "/read-write/")).status == 200
    finally:
        request_finished.disconnect(receiver)
    assert receiver.calls == 1


async def test_reset_queries_runs_at_request_started():
    """Two requests in one task: the second starts with an empty queries_log."""
    app = ASGIHandler()

    async def both() -> tuple[Any, Any]:
        first = await request(app, "/queries-log/")
        second = await request(app, "/queries-log/")
        return first.json(), second.json()

    first, second = await asyncio.create_task(both())
    assert first["after"] >= 1
    assert second["before"] == 0


async def test_sync_view_keeps_djangos_housekeeping_in_its_thread(hop_probe):
    """A sync view's thread-local connection is closed in that thread at request end."""
    response = await request(ASGIHandler(), "/sync/")
    assert response.status == 200
    assert SEEN["sync_wrapper"].connection is None  # type: ignore[attr-defined]
    assert hop_probe()  # the sync view itself runs in a thread, as with Django


async def test_sync_receivers_share_the_sync_views_thread():
    """As with Django's handler: lifecycle receivers and a sync view share one thread."""
    seen: list[int] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(threading.get_ident())

    request_started.connect(receiver)
    request_finished.connect(receiver)
    try:
        assert (await request(ASGIHandler(), "/sync/")).status == 200
    finally:
        request_started.disconnect(receiver)
        request_finished.disconnect(receiver)
    assert seen == [SEEN["sync_view_thread"]] * 2


async def test_get_asgi_application_returns_the_handler():
    assert isinstance(get_asgi_application(), ASGIHandler)


async def test_stock_handler_unchanged_after_ours_is_installed(hop_probe):
    ASGIHandler()
    app = DjangoASGIHandler()
    calls: list[int] = []

    def sync_finished(sender: Any, **kwargs: Any) -> None:
        calls.append(threading.get_ident())

    request_finished.connect(sync_finished)
    try:
        assert (await request(app, "/read-write/")).status == 200
    finally:
        request_finished.disconnect(sync_finished)
    assert calls
    assert calls[0] != threading.get_ident()


MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


@override_settings(MIDDLEWARE=MIDDLEWARE)
async def test_middleware_hooks_hop_unless_listed_in_loop_middleware(hop_probe, thread_probe):
    hops = {}
    for name, app in [("stock", ASGIHandler()), ("loop", ASGIHandler(MIDDLEWARE))]:
        await request(app, "/read-write/")
        before = len(hop_probe())
        response = await request(app, "/read-write/")
        hops[name] = hop_probe()[before:]
        assert response.status == 200
        assert response.headers["x-frame-options"] == "DENY"  # the middleware did run
        assert response.headers["x-content-type-options"] == "nosniff"
    assert len(hops["stock"]) >= len(MIDDLEWARE)  # process_request/response in threads
    assert hops["loop"] == []
    assert thread_probe() == {threading.get_ident()}


SESSION = "django.contrib.sessions.middleware.SessionMiddleware"


@pytest.mark.django_db(transaction=True, available_apps=[*APPS, "django.contrib.sessions"])
@override_settings(MIDDLEWARE=[SESSION], SESSION_ENGINE="django.contrib.sessions.backends.db")
async def test_session_middleware_saves_on_the_loop_when_listed(hop_probe, thread_probe):
    from django.contrib.sessions.models import Session

    app = ASGIHandler([SESSION])
    await request(app, "/session/")  # warm
    before = len(hop_probe())
    response = await request(app, "/session/")
    assert response.status == 200
    assert "sessionid" in response.headers["set-cookie"]
    assert hop_probe()[before:] == []
    assert thread_probe() == {threading.get_ident()}  # the session was saved on the loop
    assert await Session.objects.acount() == 2


async def test_served_from_inside_async_to_sync_the_outer_thread_is_cleaned_too():
    """As with Django: the outer sync thread runs the request's sync receivers and housekeeping."""
    from asgiref.sync import async_to_sync, sync_to_async
    from django.db import connections

    app = ASGIHandler()
    seen: list[int] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(threading.get_ident())

    def outer() -> tuple[int, int]:
        wrapper = connections["default"]  # this thread's own (sync) wrapper
        wrapper.queries_log.append({"sql": "SELECT 1", "time": "0.000"})
        async_to_sync(request)(app, "/read-write/")
        return threading.get_ident(), len(wrapper.queries_log)

    request_started.connect(receiver)
    try:
        thread, logged = await sync_to_async(outer)()
    finally:
        request_started.disconnect(receiver)
    assert seen == [thread]
    assert logged == 0  # reset_queries ran there too
