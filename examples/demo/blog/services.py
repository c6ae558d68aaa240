"""The demo's transactional writes, each in two variants selected by a setting.

* ``async_db`` (ENGINE ``django_async_db.backends.postgresql``): a transaction
  spans awaits with ``async_atomic``, related managers' ``aadd`` and
  ``select_for_update().aget_or_create()`` run inside it on the loop, and the
  ``on_commit`` callback may be async.
* ``stock`` (Django's own backend): Django cannot run a transaction across
  awaits (``async with transaction.atomic()`` is a ``TypeError``), so the same
  work is a sync function in ``transaction.atomic`` run by ``sync_to_async``.

The variant is ``settings.DEMO_ORM`` (``"async_db"`` or ``"stock"``); when it
is not set, the default database's ENGINE decides. Reads need no variant:
Django's async API (``async for``, ``aget``, ``acount``, ``aiterator``) runs on
both, natively with django-async-db, through thread hops on stock Django.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter as Tally
from functools import partial

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils.text import slugify

from .errors import NotFound
from .inputs import NewPost
from .models import AuditEntry, Author, Counter, Post, Tag

logger = logging.getLogger("blog")

ASYNC_DB_ENGINE = "django_async_db.backends.postgresql"

#: In-memory metrics of this server process (``GET /metrics/``).
METRICS: Tally[str] = Tally()


def orm_variant() -> str:
    """Return ``"async_db"`` or ``"stock"``: which code paths the views take."""
    variant = getattr(settings, "DEMO_ORM", None)
    if variant is None:
        engine = connections.settings[DEFAULT_DB_ALIAS]["ENGINE"]
        variant = "async_db" if engine == ASYNC_DB_ENGINE else "stock"
    return str(variant)


def _slug(title: str) -> str:
    return f"{slugify(title)[:60] or 'post'}-{secrets.token_hex(4)}"


# --- POST /posts/ ----------------------------------------------------------------------


async def create_post(new: NewPost) -> Post:
    """Create a post with its tags in one transaction; audit it once committed."""
    if orm_variant() == "async_db":
        return await _create_post_async_db(new)
    return await sync_to_async(_create_post_stock)(new)


async def _create_post_async_db(new: NewPost) -> Post:
    from django_async_db import async_atomic, async_connections

    async with async_atomic():
        author = await Author.objects.filter(pk=new.author_id).afirst()
        if author is None:
            raise NotFound(f"Author {new.author_id} does not exist.")
        post = await Post.objects.acreate(
            author=author, title=new.title, body=new.body, slug=_slug(new.title)
        )
        tags = [(await Tag.objects.aget_or_create(name=name))[0] for name in new.tags]
        await post.tags.aadd(*tags)
        # Runs after COMMIT (never on rollback); robust: a failing audit write
        # is logged and does not turn the committed request into an error.
        # A sync callback runs inside the bridge, in this task and on its
        # connection (an async one would run in another task and take a
        # second pooled connection, see examples/demo/README.md).
        await async_connections[DEFAULT_DB_ALIAS].on_commit(
            partial(_post_committed, post.pk), robust=True
        )
    return post


def _post_committed(post_id: int) -> None:
    """Count and audit a committed post (sync: works in both variants)."""
    METRICS["posts_committed"] += 1
    AuditEntry.objects.create(action="post.created", object_id=post_id)


@transaction.atomic
def _create_post_stock(new: NewPost) -> Post:
    author = Author.objects.filter(pk=new.author_id).first()
    if author is None:
        raise NotFound(f"Author {new.author_id} does not exist.")
    post = Post.objects.create(author=author, title=new.title, body=new.body, slug=_slug(new.title))
    post.tags.add(*(Tag.objects.get_or_create(name=name)[0] for name in new.tags))
    transaction.on_commit(partial(_post_committed, post.pk), robust=True)
    return post


# --- POST /counter/<name>/increment ----------------------------------------------------


async def increment_counter(name: str) -> int:
    """Add one to the counter ``name`` (created at 0) under a row lock; return the value."""
    if orm_variant() == "async_db":
        return await _increment_async_db(name)
    return await sync_to_async(_increment_stock)(name)


async def _increment_async_db(name: str) -> int:
    from django_async_db import async_atomic

    async with async_atomic():
        # FOR UPDATE: concurrent increments of one counter wait for each other,
        # so none is lost; the lock is held across the awaits until COMMIT.
        counter, _ = await Counter.objects.select_for_update().aget_or_create(name=name)
        counter.value += 1
        await counter.asave(update_fields=["value"])
    return counter.value


@transaction.atomic
def _increment_stock(name: str) -> int:
    counter, _ = Counter.objects.select_for_update().get_or_create(name=name)
    counter.value += 1
    counter.save(update_fields=["value"])
    return counter.value


# --- GET /metrics/ ---------------------------------------------------------------------


def pool_stats() -> dict[str, int] | None:
    """Return the connection pool's counters (django-async-db only; needs the loop)."""
    if orm_variant() != "async_db":
        return None
    from django_async_db import pool_stats as stats

    return stats(DEFAULT_DB_ALIAS)
