"""Fixtures of the ASGI handler tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def hop_probe() -> Iterator[Callable[[], list[str]]]:
    """Record every hop to a thread made on the running loop (``run_in_executor``)."""
    loop = asyncio.get_event_loop()
    hops: list[str] = []
    original = loop.run_in_executor

    def run_in_executor(executor: Any, func: Any, *args: Any) -> Any:
        hops.append(getattr(func, "__qualname__", repr(func)))
        return original(executor, func, *args)

    loop.run_in_executor = run_in_executor  # type: ignore[method-assign]
    try:
        yield lambda: list(hops)
    finally:
        del loop.run_in_executor
