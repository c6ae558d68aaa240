"""Fixtures of the ASGI handler tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import override_settings

from tests.asgi.urls import SEEN


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


@pytest.fixture
def asgi_urls() -> Iterator[None]:
    """Serve ``tests.asgi.urls`` with no middleware; ``SEEN`` starts empty but for two events.

    ``SEEN["started"]`` is set by the views that wait, ``SEEN["release"]`` lets them go on.
    """
    with override_settings(ROOT_URLCONF="tests.asgi.urls", MIDDLEWARE=[]):
        SEEN.clear()
        SEEN["started"] = asyncio.Event()
        SEEN["release"] = asyncio.Event()
        yield
    SEEN.clear()
