"""The demo's transactional views with real commits (``AsyncioTransactionTestCase``).

Each request made from its own task gets its own pooled connection, as under
uvicorn: concurrent increments really contend for the counter's row lock,
``on_commit`` callbacks run after a real COMMIT, and the counts of ``/stats/``
really run at the same time.
"""

from __future__ import annotations

import asyncio
import json

from asgiref.sync import sync_to_async
from blog import services
from blog.models import AuditEntry, Author, Counter, Post
from django.db import connections
from django.test import override_settings

from django_async_db.test import AsyncioTransactionTestCase

JSON = "application/json"


@override_settings(ROOT_URLCONF="demosite.urls")
class DemoTransactionTests(AsyncioTransactionTestCase):
    async def asyncSetUp(self):
        self.author = await Author.objects.acreate(name="Ann")

    async def increment_concurrently(self, name, times):
        async def one():
            response = await self.async_client.post(f"/counter/{name}/increment")
            assert response.status_code == 200, response.content
            return response.json()["value"]

        return sorted(await asyncio.gather(*(one() for _ in range(times))))

    async def create_post(self, title):
        body = {"author_id": self.author.pk, "title": title, "tags": ["a", "b"]}
        response = await self.async_client.post("/posts/", json.dumps(body), content_type=JSON)
        assert response.status_code == 201, response.content
        return response.json()["id"]

    async def test_on_commit_writes_the_audit_row_after_commit(self):
        before = services.METRICS["posts_committed"]
        post_id = await self.create_post("Committed")
        assert services.METRICS["posts_committed"] == before + 1

        async def seen_elsewhere():  # another task: another connection
            return await AuditEntry.objects.filter(object_id=post_id).aexists()

        assert await asyncio.create_task(seen_elsewhere())
        post = await Post.objects.aget(pk=post_id)
        assert sorted([t.name async for t in post.tags.all()]) == ["a", "b"]

    async def test_failed_create_rolls_back_and_runs_no_callback(self):
        before = services.METRICS["posts_committed"]
        body = {"author_id": self.author.pk + 1000, "title": "Nope", "tags": ["only-here"]}
        response = await self.async_client.post("/posts/", json.dumps(body), content_type=JSON)
        assert response.status_code == 404
        assert await Post.objects.acount() == 0
        assert await AuditEntry.objects.acount() == 0
        assert services.METRICS["posts_committed"] == before

    async def test_concurrent_increments_lose_no_update(self):
        # Sixteen tasks, sixteen connections: select_for_update makes them take turns.
        values = await self.increment_concurrently("race", 16)
        assert values == list(range(1, 17))
        assert (await Counter.objects.aget(name="race")).value == 16

    async def test_stats_runs_its_counts_in_parallel(self):
        response = await self.async_client.get("/stats/?delay_ms=300")
        data = response.json()
        assert data["authors"] == 1
        # Five counts of 300 ms each take ~1500 ms one after another.
        assert data["elapsed_ms"] >= 290
        assert data["elapsed_ms"] < 900


@override_settings(ROOT_URLCONF="demosite.urls", DEMO_ORM="stock")
class StockFallbackTests(AsyncioTransactionTestCase):
    """The stock code paths: ``sync_to_async`` of a function in ``transaction.atomic``."""

    async def asyncSetUp(self):
        self.author = await Author.objects.acreate(name="Bob")

    async def asyncTearDown(self):
        # The stock paths ran in asgiref's worker thread, on that thread's connection.
        await sync_to_async(connections.close_all)()

    async def test_create_post_and_audit(self):
        assert services.orm_variant() == "stock"
        before = services.METRICS["posts_committed"]
        body = {"author_id": self.author.pk, "title": "Stock", "tags": ["x"]}
        response = await self.async_client.post("/posts/", json.dumps(body), content_type=JSON)
        assert response.status_code == 201, response.content
        post_id = response.json()["id"]
        assert await AuditEntry.objects.filter(object_id=post_id).aexists()
        assert services.METRICS["posts_committed"] == before + 1
        body["author_id"] = self.author.pk + 1000
        response = await self.async_client.post("/posts/", json.dumps(body), content_type=JSON)
        assert response.status_code == 404
        assert await Post.objects.acount() == 1

    async def test_concurrent_increments_lose_no_update(self):
        async def one():
            response = await self.async_client.post("/counter/stock/increment")
            return response.json()["value"]

        values = sorted(await asyncio.gather(*(one() for _ in range(8))))
        assert values == list(range(1, 9))
