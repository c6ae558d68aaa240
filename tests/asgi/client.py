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


async def request(app: Any, path: str, method: str = "GET", query: str = "") -> Response:
    """Send one request to ``app`` as an ASGI server would (a new task per request)."""
    scope = {
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
