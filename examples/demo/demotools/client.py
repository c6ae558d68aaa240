"""A small asyncio HTTP/1.1 client with keep-alive (standard library only).

Enough for the demo's checks and load generator: ``Content-Length`` and
chunked responses, one request at a time per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Response:
    """A complete HTTP response."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    chunked: bool = False

    def json(self) -> Any:
        """Return the body decoded as JSON."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """Return the body decoded as UTF-8."""
        return self.body.decode("utf-8", errors="replace")


class HttpClient:
    """One keep-alive connection to ``base_url`` (``http://host:port``).

    Example::

        client = HttpClient("http://127.0.0.1:8000")
        response = await client.request("GET", "/posts/")
        await client.close()
    """

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Only http://host:port URLs are supported, not {base_url!r}.")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send one request and return the whole response."""
        extra = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            extra.setdefault("Content-Type", "application/json")
        payload = body or b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in extra.items()]
        lines.append(f"Content-Length: {len(payload)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
        reused = self._writer is not None
        try:
            return await asyncio.wait_for(self._send(raw), self.timeout)
        except (ConnectionError, asyncio.IncompleteReadError, EmptyResponse):
            await self.close()
            if not reused:
                raise
            # The server closed the idle keep-alive connection: retry on a new one.
            return await asyncio.wait_for(self._send(raw), self.timeout)

    async def _send(self, raw: bytes) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(raw)
        await self._writer.drain()
        response = await _read_response(self._reader)
        if response.headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    async def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class EmptyResponse(ConnectionError):
    """The server closed the connection before answering."""


async def _read_response(reader: asyncio.StreamReader) -> Response:
    status_line = await reader.readline()
    if not status_line:
        raise EmptyResponse("The server closed the connection without a response.")
    parts = status_line.decode("latin-1").split(" ", 2)
    response = Response(status=int(parts[1]))
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        response.headers[name.strip().lower()] = value.strip()
    if response.headers.get("transfer-encoding", "").lower() == "chunked":
        response.chunked = True
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)  # CRLF
        response.body = b"".join(chunks)
    elif "content-length" in response.headers:
        response.body = await reader.readexactly(int(response.headers["content-length"]))
    else:
        response.body = await reader.read()
        response.headers["connection"] = "close"
    return response
