"""Two transactions locking rows in opposite orders: one gets a Django error, one commits."""

from __future__ import annotations

import asyncio

import psycopg.errors
import pytest
from django.db import OperationalError
from django.db.models import F

from django_async_db import async_atomic, async_connections
from tests.reliability.conftest import APPS
from tests.testapp.models import Account

pytestmark = pytest.mark.django_db(transaction=True, available_apps=APPS)


async def test_deadlock_surfaces_as_operational_error_in_one_task(figures) -> None:
    await Account.objects.abulk_create([Account(id=1, name="a"), Account(id=2, name="b")])
    both_locked = asyncio.Barrier(2)

    async def move(first: int, second: int) -> str:
        async with async_atomic():
            async with async_connections["default"].cursor() as cur:
                # Detect the deadlock quickly (superuser-settable; default 1 s).
                await cur.execute("SET LOCAL deadlock_timeout = '100ms'")
            await Account.objects.filter(pk=first).aupdate(balance=F("balance") + 1)
            await both_locked.wait()
            await Account.objects.filter(pk=second).aupdate(balance=F("balance") + 10)
        return "committed"

    async with asyncio.timeout(30):
        results = await asyncio.gather(move(1, 2), move(2, 1), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert results.count("committed") == 1, results
    assert len(errors) == 1
    assert isinstance(errors[0], OperationalError)
    assert isinstance(errors[0].__cause__, psycopg.errors.DeadlockDetected)
    winner = results.index("committed")
    balances = {pk: b async for pk, b in Account.objects.values_list("pk", "balance")}
    first, second = (1, 2) if winner == 0 else (2, 1)
    assert balances == {first: 1, second: 10}
    figures(deadlocks=1, committed=1, error=type(errors[0]).__name__)
