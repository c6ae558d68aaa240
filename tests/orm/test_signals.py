"""Model signals: sync and ``async def`` receivers run on the loop, in the sender's transaction."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.db.models.signals import (
    m2m_changed,
    post_delete,
    post_save,
    pre_delete,
    pre_save,
)

from django_async_db import async_atomic, async_connections
from tests.orm.conftest import assert_on_loop, rolled_back
from tests.testapp.models import Author, Book, Event, Tag

pytestmark = pytest.mark.django_db(transaction=True)

MODEL_SIGNALS = {
    "pre_save": pre_save,
    "post_save": post_save,
    "pre_delete": pre_delete,
    "post_delete": post_delete,
}
TXID = "SELECT pg_backend_pid(), pg_current_xact_id_if_assigned()::text"


class Rollback(Exception):
    pass


async def where_am_i() -> tuple[int, str | None]:
    """Return (backend pid, transaction id or None) of this task's connection."""
    async with async_connections["default"].cursor() as cur:
        await cur.execute(TXID)
        return await cur.fetchone()


def where_am_i_sync() -> tuple[int, str | None]:
    with connection.cursor() as cur:
        cur.execute(TXID)
        return cur.fetchone()


class Recorder:
    """Connect a sync and an async receiver to each signal; record where each one ran."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def sync_receiver(self, name: str):
        def receiver(sender, **kwargs):
            self.calls.append(
                {
                    "kind": "sync",
                    "signal": name,
                    "action": kwargs.get("action"),
                    "thread": threading.get_ident(),
                    "task": asyncio.current_task(),
                    "where": where_am_i_sync(),
                }
            )

        return receiver

    def async_receiver(self, name: str):
        async def receiver(sender, **kwargs):
            await asyncio.sleep(0)  # really awaited, on the loop
            self.calls.append(
                {
                    "kind": "async",
                    "signal": name,
                    "action": kwargs.get("action"),
                    "thread": threading.get_ident(),
                    "task": asyncio.current_task(),
                    "where": await where_am_i(),
                }
            )

        return receiver


@pytest.fixture
def recorder():
    rec = Recorder()
    connected = []
    for name, signal in MODEL_SIGNALS.items():
        for kind, make in (("sync", rec.sync_receiver), ("async", rec.async_receiver)):
            uid = f"orm-test-{name}-{kind}"
            signal.connect(make(name), sender=Author, weak=False, dispatch_uid=uid)
            connected.append((signal, Author, uid))
    for kind, make in (("sync", rec.sync_receiver), ("async", rec.async_receiver)):
        uid = f"orm-test-m2m-{kind}"
        m2m_changed.connect(
            make("m2m_changed"), sender=Book.tags.through, weak=False, dispatch_uid=uid
        )
        connected.append((m2m_changed, Book.tags.through, uid))
    yield rec
    for signal, sender, uid in connected:
        signal.disconnect(sender=sender, dispatch_uid=uid)


async def test_receivers_run_on_the_loop_in_the_senders_transaction(recorder, thread_probe):
    async with rolled_back():
        sender = asyncio.current_task()
        ann = await Author.objects.acreate(name="Ann")
        ann.name = "Anne"
        await ann.asave()
        here = await where_am_i()  # the transaction has written by now
        await ann.adelete()
    assert here[1] is not None
    calls = recorder.calls
    assert [(c["signal"], c["kind"]) for c in calls] == [
        (signal, kind)
        for signal in (
            "pre_save",
            "post_save",
            "pre_save",
            "post_save",
            "pre_delete",
            "post_delete",
        )
        for kind in ("sync", "async")
    ]
    assert {c["thread"] for c in calls} == {threading.get_ident()}
    assert {c["task"] for c in calls} == {sender}  # async receivers awaited in the sending task
    # Same connection; from the first write on, the same transaction.
    assert {c["where"][0] for c in calls} == {here[0]}
    assert {c["where"] for c in calls[2:]} == {here}
    assert_on_loop(thread_probe)


async def test_m2m_changed_receivers_run_in_the_transaction(recorder, thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    book = await Book.objects.acreate(title="A", author=ann)
    recorder.calls.clear()
    async with rolled_back():
        tag = await Tag.objects.acreate(name="t")
        here = await where_am_i()
        await book.tags.aadd(tag)
        await book.tags.aremove(tag)
        await book.tags.aclear()
    assert [(c["action"], c["kind"]) for c in recorder.calls] == [
        (action, kind)
        for action in (
            "pre_add",
            "post_add",
            "pre_remove",
            "post_remove",
            "pre_clear",
            "post_clear",
        )
        for kind in ("sync", "async")
    ]
    assert {c["where"] for c in recorder.calls} == {here}
    assert {c["thread"] for c in recorder.calls} == {threading.get_ident()}
    assert_on_loop(thread_probe)


async def test_receivers_outside_a_transaction_run_on_the_loop(recorder, thread_probe):
    ann = await Author.objects.acreate(name="Ann")
    await ann.adelete()
    assert len(recorder.calls) == 8
    assert {c["thread"] for c in recorder.calls} == {threading.get_ident()}
    assert_on_loop(thread_probe)


async def test_async_receiver_writes_are_rolled_back_with_the_sender(thread_probe):
    async def log_save(sender, instance, created, **kwargs):
        await Event.objects.acreate(task=instance.pk, label="saved")

    post_save.connect(log_save, sender=Author, weak=False, dispatch_uid="orm-test-log")
    try:

        async def create_then_fail() -> None:
            async with async_atomic():
                ann = await Author.objects.acreate(name="Ann")
                assert await Event.objects.filter(task=ann.pk).aexists()  # the receiver's row
                raise Rollback

        with pytest.raises(Rollback):
            await create_then_fail()
        assert not await Event.objects.aexists()
        assert not await Author.objects.aexists()
        kept = await Author.objects.acreate(name="kept")  # outside a transaction: committed
        assert await Event.objects.filter(task=kept.pk).aexists()
    finally:
        post_save.disconnect(sender=Author, dispatch_uid="orm-test-log")
    assert_on_loop(thread_probe)


async def test_sync_receiver_writes_are_rolled_back_with_the_sender(thread_probe):
    def log_delete(sender, instance, **kwargs):
        Event.objects.create(task=instance.pk, label="deleted")

    pre_delete.connect(log_delete, sender=Author, weak=False, dispatch_uid="orm-test-log")
    try:
        ann = await Author.objects.acreate(name="Ann")
        async with rolled_back():
            await ann.adelete()
            assert await Event.objects.acount() == 1
        assert not await Event.objects.aexists()
    finally:
        pre_delete.disconnect(sender=Author, dispatch_uid="orm-test-log")
    assert_on_loop(thread_probe)


async def notify(label: str, pk: int) -> None:
    """Stand-in for a Channels ``group_send``: async code a sync receiver calls."""
    await asyncio.sleep(0)
    await Event.objects.acreate(task=pk, label=label)


async def test_sync_receiver_calling_async_to_sync(thread_probe):
    def on_save(sender, instance, **kwargs):
        async_to_sync(notify)("notified", instance.pk)

    post_save.connect(on_save, sender=Author, weak=False, dispatch_uid="orm-test-a2s")
    try:
        async with asyncio.timeout(10):
            async with rolled_back():
                ann = await Author.objects.acreate(name="Ann")
                assert await Event.objects.filter(task=ann.pk, label="notified").aexists()
            assert not await Event.objects.aexists()
    finally:
        post_save.disconnect(sender=Author, dispatch_uid="orm-test-a2s")
    assert_on_loop(thread_probe)


async def test_failing_async_receiver_propagates_and_rolls_back():
    async def refuse(sender, instance, **kwargs):
        await Event.objects.acreate(task=0, label="before the error")
        raise ValueError("refused")

    pre_save.connect(refuse, sender=Author, weak=False, dispatch_uid="orm-test-refuse")
    try:
        with pytest.raises(ValueError, match="refused"):
            async with async_atomic():
                await Author.objects.acreate(name="Ann")
    finally:
        pre_save.disconnect(sender=Author, dispatch_uid="orm-test-refuse")
    assert not await Event.objects.aexists()
    assert not await Author.objects.aexists()
