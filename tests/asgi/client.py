"""A minimal ASGI client: one HTTP request straight into an application, in a task of its own."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    """What the application sent back."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(path: str, method: str = "GET", query: str = "") -> dict[str, Any]:
    """Return the HTTP scope an ASGI server gives the application for one request."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


async def request(app: Any, path: str, method: str = "GET", query: str = "") -> Response:
    """Send one request to ``app`` as an ASGI server would (a new task per request)."""
    scope = http_scope(path, method, query)
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await asyncio.create_task(app(scope, receive, send))
    assert messages, "the application sent nothing"
    assert messages[0]["type"] == "http.response.start", messages
    body = b"".join(m.get("body", b"") for m in messages[1:])
    headers = {k.decode().lower(): v.decode() for k, v in messages[0]["headers"]}
    return Response(messages[0]["status"], body, headers)


class Exchange:
    """One request into an application, with the client's side under the test's control.

    ``receive()`` gives the (empty) request body, then waits until the test
    calls :meth:`disconnect` (or :meth:`send_message` with another message).
    """

    def __init__(self, app: Any, path: str, query: str = "") -> None:
        self.app = app
        self.scope = http_scope(path, query=query)
        self.messages: list[dict[str, Any]] = []
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        #: How the application's receive() calls ended: "message", "cancelled".
        self.receive_calls: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def receive(self) -> dict[str, Any]:
        try:
            message = await self.inbox.get()
        except asyncio.CancelledError:
            self.receive_calls.append("cancelled")
            raise
        self.receive_calls.append("message")
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def start(self) -> asyncio.Task[None]:
        """Start the application in a task of its own, as a server does."""
        self.task = asyncio.create_task(self.app(self.scope, self.receive, self.send))
        return self.task

    def disconnect(self) -> None:
        self.send_message({"type": "http.disconnect"})

    def send_message(self, message: dict[str, Any]) -> None:
        self.inbox.put_nowait(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])
