"""Money transfers under concurrency, injected cancellations and injected failures.

Invariants checked at the end: the total is unchanged, every committed transfer
is recorded exactly once in the same transaction as its two updates (so each
balance equals its initial value plus the recorded transfers), and every
transfer whose coroutine returned normally is in the database.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import psycopg.errors
import pytest
from django.db import OperationalError
from django.db.models import F, Sum

from django_async_db import async_atomic, pool_stats
from tests.conftest import observer
from tests.reliability.conftest import APPS, SEED, activity, scaled
from tests.testapp.models import Account, Event

pytestmark = [pytest.mark.django_db(transaction=True, available_apps=APPS), pytest.mark.long]

ACCOUNTS = 100
INITIAL = 1_000
TASKS = scaled(40, 200)
TRANSFERS_PER_TASK = scaled(25, 50)
CANCEL_RATE = 0.10  # of transfers, cancelled after a seeded number of loop turns
FAIL_RATE = 0.05  # of transfers, raising inside the block after the first update
LABEL = "transfer"


class InjectedFailure(Exception):
    """Raised inside a transfer's block to roll it back."""


async def transfer(
    transfer_id: int, src: int, dst: int, amount: int, fail: bool, stats: Counter[str]
) -> None:
    """Move ``amount`` from ``src`` to ``dst`` and record it, all in one transaction."""
    while True:
        try:
            async with async_atomic():
                # Lock both rows in primary-key order (no lock-order deadlocks).
                locked = [
                    a
                    async for a in Account.objects.select_for_update()
                    .filter(pk__in=[src, dst])
                    .order_by("pk")
                ]
                assert len(locked) == 2
                await Account.objects.filter(pk=src).aupdate(balance=F("balance") - amount)
                if fail:
                    raise InjectedFailure
                await asyncio.sleep(0)  # let other tasks (and cancellations) in
                await Account.objects.filter(pk=dst).aupdate(balance=F("balance") + amount)
                await Event.objects.acreate(task=transfer_id, label=LABEL, txid=src * 1000 + dst)
            return
        except OperationalError as exc:
            # Not expected with ordered locking; retried if the server says so.
            if isinstance(exc.__cause__, psycopg.errors.DeadlockDetected):
                stats["deadlock_retries"] += 1
                continue
            raise


async def worker(
    task: int,
    rng: random.Random,
    plan: dict[int, int],
    outcome: dict[int, str],
    stats: Counter[str],
) -> None:
    for n in range(TRANSFERS_PER_TASK):
        transfer_id = task * 100_000 + n
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        amount = plan[transfer_id] = rng.randint(1, 50)
        cancel_after = rng.randint(0, 12) if rng.random() < CANCEL_RATE else None
        fail = rng.random() < FAIL_RATE
        job = asyncio.create_task(transfer(transfer_id, src, dst, amount, fail, stats))
        if cancel_after is not None:
            for _ in range(cancel_after):  # loop turns, not wall-clock time
                await asyncio.sleep(0)
            job.cancel()
            stats["cancellations_injected"] += 1
        try:
            await job
        except asyncio.CancelledError:
            if not job.cancelled():
                raise  # this worker itself was cancelled
            outcome[transfer_id] = "cancelled"
        except InjectedFailure:
            outcome[transfer_id] = "failed"
        else:
            outcome[transfer_id] = "committed"


async def test_concurrent_transfers_keep_the_books_balanced(pool_option, figures) -> None:
    pool_option({"min_size": 2, "max_size": 10, "timeout": 60})
    await Account.objects.abulk_create(
        Account(id=i, name=f"acct-{i}", balance=INITIAL) for i in range(1, ACCOUNTS + 1)
    )
    rng = random.Random(SEED)
    rngs = [random.Random(rng.getrandbits(64)) for _ in range(TASKS)]
    plan: dict[int, int] = {}
    outcome: dict[int, str] = {}
    stats: Counter[str] = Counter()

    async with asyncio.timeout(scaled(120, 1200)):  # a hang fails, it does not block CI
        await asyncio.gather(*(worker(t, rngs[t], plan, outcome, stats) for t in range(TASKS)))

    total = await Account.objects.aaggregate(total=Sum("balance"))
    assert total["total"] == ACCOUNTS * INITIAL

    events = [e async for e in Event.objects.filter(label=LABEL).values_list("task", "txid")]
    recorded = Counter(tid for tid, _ in events)
    assert all(n == 1 for n in recorded.values()), "a transfer was recorded twice"

    # Recompute each balance from the recorded transfers: a half-applied
    # transfer (an update without its record, or the reverse) shows up here.
    expected = dict.fromkeys(range(1, ACCOUNTS + 1), INITIAL)
    for tid, pair in events:
        src, dst = divmod(pair, 1000)
        expected[src] -= plan[tid]
        expected[dst] += plan[tid]
    balances = {pk: b async for pk, b in Account.objects.values_list("pk", "balance")}
    assert balances == expected

    committed = {tid for tid, how in outcome.items() if how == "committed"}
    failed = {tid for tid, how in outcome.items() if how == "failed"}
    cancelled = {tid for tid, how in outcome.items() if how == "cancelled"}
    assert len(outcome) == TASKS * TRANSFERS_PER_TASK
    assert committed <= recorded.keys(), "a transfer reported committed is missing"
    assert not failed & recorded.keys(), "a failed transfer was committed"
    # A cancellation may land after COMMIT reached the server: it is then both.
    committed_despite_cancel = len(cancelled & recorded.keys())
    assert recorded.keys() <= committed | cancelled

    watch = await observer()
    try:
        sessions = await activity(watch)
    finally:
        await watch.close()
    assert not [s for s in sessions if s[1] == "idle in transaction"]
    assert pool_stats("default").get("requests_waiting", 0) == 0

    figures(
        tasks=TASKS,
        transfers=len(outcome),
        committed=len(committed),
        cancellations_injected=stats["cancellations_injected"],
        cancelled=len(cancelled),
        committed_despite_cancel=committed_despite_cancel,
        failures_injected=len(failed),
        deadlock_retries=stats["deadlock_retries"],
        rows_recorded=len(recorded),
        total=total["total"],
    )
