"""contrib.auth and contrib.sessions async APIs run on the loop, in the task's transaction."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    SESSION_KEY,
    aauthenticate,
    aget_user,
    alogin,
    alogout,
)
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import AnonymousUser, User
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.http import HttpRequest
from django.utils import timezone

from tests.orm.conftest import assert_on_loop, rolled_back

pytestmark = pytest.mark.django_db(transaction=True)


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1000


def request_with_session(session: SessionStore | None = None) -> HttpRequest:
    request = HttpRequest()
    request.session = session if session is not None else SessionStore()
    request.META["CSRF_COOKIE"] = "x" * 32  # rotate_token() needs a CSRF cookie slot
    return request


# --- users and passwords ------------------------------------------------------------


async def test_acreate_user(thread_probe):
    async with rolled_back():
        user = await User.objects.acreate_user("ann", "ann@example.com", "s3cret")
        assert await User.objects.filter(username="ann").aexists()
        assert user.password.startswith("md5$")
    assert not await User.objects.aexists()
    assert_on_loop(thread_probe)


async def test_acheck_password(thread_probe):
    user = await User.objects.acreate_user("ann", password="s3cret")
    fresh = await User.objects.aget(pk=user.pk)
    assert await fresh.acheck_password("s3cret")
    assert not await fresh.acheck_password("wrong")
    assert_on_loop(thread_probe)


async def test_acheck_password_saves_a_hash_upgrade_in_the_task(thread_probe, settings):
    user = await User.objects.acreate_user("ann", password="s3cret")
    old_hash = user.password
    settings.PASSWORD_HASHERS = [
        f"{__name__}.FastPBKDF2PasswordHasher",  # preferred now: an upgrade is due
        "django.contrib.auth.hashers.MD5PasswordHasher",
    ]
    async with rolled_back():
        assert await user.acheck_password("s3cret")
        saved = await User.objects.aget(pk=user.pk)
        assert saved.password.startswith("pbkdf2_sha256$1000$")
    assert (await User.objects.aget(pk=user.pk)).password == old_hash
    assert_on_loop(thread_probe)


# --- aauthenticate / alogin / aget_user / alogout -------------------------------------


async def test_aauthenticate(thread_probe):
    await User.objects.acreate_user("ann", password="s3cret")
    failures = []

    async def on_failure(sender, credentials, **kwargs):
        failures.append(credentials["username"])

    user_login_failed.connect(on_failure, dispatch_uid="orm-test-failed")
    try:
        user = await aauthenticate(username="ann", password="s3cret")
        assert user is not None
        assert user.username == "ann"
        assert user.backend == "django.contrib.auth.backends.ModelBackend"
        assert await aauthenticate(username="ann", password="wrong") is None
        assert await aauthenticate(username="nobody", password="x") is None
    finally:
        user_login_failed.disconnect(dispatch_uid="orm-test-failed")
    assert failures == ["ann", "nobody"]
    assert_on_loop(thread_probe)


async def test_aauthenticate_sees_a_user_of_the_open_transaction(thread_probe):
    async with rolled_back():
        await User.objects.acreate_user("tx", password="pw")
        assert (await aauthenticate(username="tx", password="pw")).username == "tx"
    assert await aauthenticate(username="tx", password="pw") is None
    assert_on_loop(thread_probe)


async def test_alogin_persists_the_session(thread_probe):
    user = await User.objects.acreate_user("ann", password="s3cret")
    logged_in = []

    async def on_login(sender, user, **kwargs):
        logged_in.append(user.username)
        await User.objects.filter(pk=user.pk).aupdate(first_name="seen")

    user_logged_in.connect(on_login, dispatch_uid="orm-test-login")
    try:
        request = request_with_session()
        authed = await aauthenticate(request, username="ann", password="s3cret")
        await alogin(request, authed)
        await request.session.asave()  # what SessionMiddleware does after the view
    finally:
        user_logged_in.disconnect(dispatch_uid="orm-test-login")
    assert logged_in == ["ann"]
    stored = await SessionStore(request.session.session_key).aload()
    assert stored[SESSION_KEY] == str(user.pk)
    assert stored[BACKEND_SESSION_KEY] == "django.contrib.auth.backends.ModelBackend"
    # update_last_login (a sync receiver) and ours both ran.
    fresh = await User.objects.aget(pk=user.pk)
    assert fresh.last_login is not None
    assert fresh.first_name == "seen"

    # A later request carrying the session key gets the user back.
    next_request = request_with_session(SessionStore(request.session.session_key))
    assert (await aget_user(next_request)).pk == user.pk
    await alogout(next_request)
    assert isinstance(await aget_user(next_request), AnonymousUser)
    assert not await Session.objects.filter(session_key=request.session.session_key).aexists()
    assert_on_loop(thread_probe)


async def test_alogin_is_rolled_back_with_the_transaction(thread_probe):
    user = await User.objects.acreate_user("ann", password="s3cret")
    async with rolled_back():
        request = request_with_session()
        await alogin(request, user)
        await request.session.asave()
        key = request.session.session_key
        assert await Session.objects.filter(session_key=key).aexists()
        assert (await User.objects.aget(pk=user.pk)).last_login is not None
    assert not await Session.objects.filter(session_key=key).aexists()
    assert (await User.objects.aget(pk=user.pk)).last_login is None
    assert_on_loop(thread_probe)


# --- SessionStore's async methods -----------------------------------------------------


async def test_session_store_lifecycle(thread_probe):
    session = SessionStore()
    await session.acreate()
    key = session.session_key
    assert await session.aexists(key)
    await session.aset("cart", [1, 2])
    await session.asave()
    loaded = SessionStore(key)
    assert await loaded.aload() == {"cart": [1, 2]}
    assert await loaded.aget("cart") == [1, 2]
    await loaded.acycle_key()
    assert loaded.session_key != key
    assert not await session.aexists(key)
    assert await loaded.aexists(loaded.session_key)
    await loaded.adelete()
    assert not await loaded.aexists(loaded.session_key)
    assert_on_loop(thread_probe)


async def test_session_store_aflush_and_aclear_expired(thread_probe):
    session = SessionStore()
    await session.aset("a", 1)
    await session.asave()
    old_key = session.session_key
    await session.aflush()
    assert session.session_key is None
    assert not await session.aexists(old_key)

    stale = SessionStore()
    await stale.aset_expiry(timezone.now() - dt.timedelta(days=1))
    await stale.asave()
    fresh = SessionStore()
    await fresh.asave()
    assert await Session.objects.acount() == 2
    await SessionStore.aclear_expired()
    assert [s.session_key async for s in Session.objects.all()] == [fresh.session_key]
    assert_on_loop(thread_probe)


async def test_session_store_writes_are_rolled_back(thread_probe):
    kept = SessionStore()
    await kept.aset("v", "before")
    await kept.asave()
    async with rolled_back():
        new = SessionStore()
        await new.acreate()
        await kept.aset("v", "after")
        await kept.asave()
        assert await SessionStore(kept.session_key).aget("v") == "after"
        await SessionStore().adelete(kept.session_key)
        assert not await kept.aexists(kept.session_key)
    assert not await new.aexists(new.session_key)
    assert await SessionStore(kept.session_key).aget("v") == "before"
    assert_on_loop(thread_probe)
