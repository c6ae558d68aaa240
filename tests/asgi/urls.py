"""Views served through ``django_async_db.asgi.ASGIHandler`` in ``tests/asgi``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from django.db import connection, connections
from django.db.models import BooleanField
from django.db.models.expressions import RawSQL
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

from tests.testapp.models import Author

#: What the views saw, for the tests to inspect (the request runs in its own task).
SEEN: dict[str, object] = {}


async def read_write(request: HttpRequest) -> HttpResponse:
    """Write a row, read it back and count: plain Django async ORM calls."""
    author = await Author.objects.acreate(name=request.GET.get("name", "asgi"))
    again = await Author.objects.aget(pk=author.pk)
    count = await Author.objects.filter(name=again.name).acount()
    SEEN["wrapper"] = connections["default"]
    SEEN["view_thread"] = threading.get_ident()
    return JsonResponse({"id": again.pk, "count": count})


async def queries_log(request: HttpRequest) -> HttpResponse:
    """Report how many queries this task's connection logged, then log one more."""
    wrapper = connections["default"]
    before = len(wrapper.queries_log)
    wrapper.force_debug_cursor = True
    await Author.objects.filter(pk=0).aexists()
    return JsonResponse({"before": before, "after": len(wrapper.queries_log)})


async def slow_query(request: HttpRequest) -> HttpResponse:
    """Hold a pooled connection for a while (pg_sleep), to load the pool."""
    sleep = RawSQL("(SELECT true FROM pg_sleep(0.05))", [], output_field=BooleanField())
    count = await Author.objects.filter(sleep).acount()
    return JsonResponse({"count": count})


def sync_view(request: HttpRequest) -> HttpResponse:
    """A sync view: Django runs it in the request's thread, on that thread's connection."""
    SEEN["sync_wrapper"] = connection
    SEEN["sync_view_thread"] = threading.get_ident()
    return JsonResponse({"count": Author.objects.count()})


async def session_write(request: HttpRequest) -> HttpResponse:
    """Put a value in a new session: SessionMiddleware saves it to the database afterwards."""
    request.session["visited"] = True
    return JsonResponse({"ok": True})


async def wait(request: HttpRequest) -> HttpResponse:
    """Query, then wait for ``SEEN["release"]`` (an event the test sets), noting a cancellation.

    With ``?swallow=1`` the view answers even when cancelled.
    """
    await Author.objects.filter(pk=0).aexists()  # the request's task now holds a connection
    SEEN["view_task"] = asyncio.current_task()
    started = SEEN["started"]
    release = SEEN["release"]
    assert isinstance(started, asyncio.Event)
    assert isinstance(release, asyncio.Event)
    started.set()
    try:
        await release.wait()
    except asyncio.CancelledError:
        SEEN["view_cancelled"] = True
        if request.GET.get("swallow"):
            return JsonResponse({"swallowed": True})
        raise
    return JsonResponse({"released": True})


async def stream(request: HttpRequest) -> HttpResponse:
    """Stream two chunks (an ORM query between), waiting for ``SEEN["release"]`` in between."""
    started = SEEN["started"]
    release = SEEN["release"]
    assert isinstance(started, asyncio.Event)
    assert isinstance(release, asyncio.Event)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield b"first\n"
            started.set()
            await release.wait()
            count = await Author.objects.acount()
            yield f"last {count}\n".encode()
        except asyncio.CancelledError:
            SEEN["stream_cancelled"] = True
            raise
        finally:
            SEEN["stream_closed"] = True

    return StreamingHttpResponse(chunks())


async def fail(request: HttpRequest) -> HttpResponse:
    """Raise: Django turns it into a 500 response."""
    raise RuntimeError("the view failed")


urlpatterns = [
    path("wait/", wait),
    path("stream/", stream),
    path("fail/", fail),
    path("session/", session_write),
    path("read-write/", read_write),
    path("queries-log/", queries_log),
    path("slow/", slow_query),
    path("sync/", sync_view),
]
