"""Hostile values go through parameters: they round-trip intact or fail with Django's errors."""

from __future__ import annotations

import asyncio

import pytest
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError

from django_async_db import async_atomic, async_connections
from tests.reliability.conftest import APPS
from tests.testapp.models import Account, Author

pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)

TRICKY = [
    "O'Brien",
    "'; DROP TABLE testapp_author; --",
    '"double" \\backslash\\ %s %(name)s {0}',
    "emoji \U0001f600 and \u202e right-to-left",
    "\t\r\n control characters \x01\x1f",
    "",
]


async def select_one() -> int:
    async with async_connections["default"].cursor() as cur:
        await cur.execute("SELECT 1")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_quotes_and_odd_characters_round_trip() -> None:
    for value in TRICKY:
        author = await Author.objects.acreate(name=value[:100], bio=value)
        back = await Author.objects.aget(pk=author.pk)
        assert (back.name, back.bio) == (value[:100], value)
        assert await Author.objects.filter(bio=value).acount() == 1
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT %s::text", [value])
            assert await cur.fetchone() == (value,)


async def test_nul_byte_is_rejected_and_the_connection_stays_usable() -> None:
    with pytest.raises((DataError, ValueError)):
        await Author.objects.acreate(name="nul", bio="a\x00b")

    async def block() -> None:
        async with async_atomic():
            await Author.objects.acreate(name="nul in block", bio="before")
            await Author.objects.acreate(name="nul in block", bio="a\x00b")

    with pytest.raises((DataError, ValueError)):
        await block()
    assert not async_connections["default"].in_atomic_block
    assert await Author.objects.acount() == 0
    assert await select_one() == 1


async def test_ten_megabyte_string_round_trips(figures) -> None:
    big = ("0123456789abcdef\u00e9" * (10 * 1024 * 1024 // 17 + 1))[: 10 * 1024 * 1024]
    async with asyncio.timeout(60):
        author = await Author.objects.acreate(name="big", bio=big)
        back = await Author.objects.aget(pk=author.pk)
    assert back.bio == big
    figures(chars=len(big), utf8_bytes=len(big.encode()))
    assert await select_one() == 1


async def test_wrong_types_fail_with_djangos_errors() -> None:
    with pytest.raises((ValueError, TypeError, ValidationError)):
        await Account.objects.acreate(name="x", balance="not a number")
    with pytest.raises((ValueError, TypeError)):
        await Account.objects.filter(balance="abc").acount()
    with pytest.raises(DataError):
        async with async_connections["default"].cursor() as cur:
            await cur.execute("SELECT %s::int", ["abc"])
    with pytest.raises(DataError):  # out of range for bigint
        await Account.objects.acreate(name="huge", balance=2**70)
    with pytest.raises(IntegrityError):
        await Account.objects.acreate(name=None)
    assert await select_one() == 1
    assert await Account.objects.acount() == 0
