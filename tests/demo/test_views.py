"""The demo's views through Django's ``AsyncClient``, each test rolled back (``AsyncTestCase``).

The views run in the test's task, on the test's connection and inside its
transaction: ``async_atomic`` blocks are savepoints and ``on_commit``
callbacks are captured with ``captureOnCommitCallbacks``.
"""

from __future__ import annotations

import csv
import io
import json

from blog import services
from blog.management.commands.seed_demo import TAGS, seed
from blog.models import AuditEntry, Author, Comment, Counter, Post, Tag
from django.test import TestCase, override_settings

from django_async_db.test import AsyncTestCase

JSON = "application/json"


@override_settings(ROOT_URLCONF="demosite.urls")
class DemoViewTests(AsyncTestCase):
    @classmethod
    def setUpTestData(cls):
        seed(posts=12)
        cls.author = Author.objects.order_by("id").first()
        cls.post = Post.objects.get(slug="seed-0003")  # three comments

    async def get_json(self, path, status=200):
        response = await self.async_client.get(path)
        assert response.status_code == status, response.content
        assert response["Content-Type"] == JSON
        return response.json()

    async def post_json(self, path, data=None, status=200, raw=None):
        body = raw if raw is not None else json.dumps(data)
        response = await self.async_client.post(path, body, content_type=JSON)
        assert response.status_code == status, response.content
        assert response["Content-Type"] == JSON
        return response.json()

    # --- GET /posts/ -----------------------------------------------------------------

    async def test_list_loads_authors_and_tags_in_two_queries(self):
        async with self.assertNumQueries(2):  # posts JOIN author, then every tag at once
            data = await self.get_json("/posts/?limit=10")
        assert data["count"] == 10
        newest = await Post.objects.select_related("author").afirst()
        first = data["results"][0]
        assert first["id"] == newest.pk
        assert first["author"] == {"id": newest.author.pk, "name": newest.author.name}
        tags = [t.name async for t in newest.tags.order_by("id")]
        assert sorted(first["tags"]) == sorted(tags)

    async def test_list_pages_and_filters_by_tag(self):
        page = await self.get_json("/posts/?limit=5&offset=10")
        assert page["count"] == 2  # 12 posts
        tagged = await self.get_json("/posts/?tag=PYTHON&limit=100")
        expected = await Post.objects.filter(tags__name="python").acount()
        assert tagged["count"] == expected
        assert all("python" in p["tags"] for p in tagged["results"])

    async def test_list_rejects_bad_query_parameters(self):
        for query in ("limit=abc", "limit=0", "limit=101", "offset=-1", "offset=1.5"):
            with self.subTest(query=query):
                data = await self.get_json(f"/posts/?{query}", status=400)
                assert "query parameter" in data["error"]

    # --- GET /posts/<id>/ --------------------------------------------------------------

    async def test_detail_has_comments_in_order(self):
        async with self.assertNumQueries(3):  # post JOIN author, tags, comments
            data = await self.get_json(f"/posts/{self.post.pk}/")
        assert data["title"] == self.post.title
        comments = [c.pk async for c in Comment.objects.filter(post=self.post).order_by("id")]
        assert [c["id"] for c in data["comments"]] == comments
        assert len(comments) == 3

    async def test_unknown_post_is_404(self):
        for pk in ("999999999", "99999999999999999999999"):  # the second is beyond bigint
            with self.subTest(pk=pk):
                data = await self.get_json(f"/posts/{pk}/", status=404)
                assert data["error"] == "No Post matches the given query."

    # --- POST /posts/ --------------------------------------------------------------------

    async def test_create_post_adds_tags_and_audits_on_commit(self):
        before = services.METRICS["posts_committed"]
        body = {"author_id": self.author.pk, "title": " Hello ", "tags": ["New-Tag", "python"]}
        async with self.captureOnCommitCallbacks(execute=True) as callbacks:
            data = await self.post_json("/posts/", body, status=201)
            # Not run yet: the block was a savepoint of the test's transaction.
            assert not await AuditEntry.objects.filter(object_id=data["id"]).aexists()
            assert services.METRICS["posts_committed"] == before
        assert len(callbacks) == 1
        post = await Post.objects.select_related("author").aget(pk=data["id"])
        assert (post.title, post.author_id) == ("Hello", self.author.pk)
        assert sorted([t.name async for t in post.tags.all()]) == ["new-tag", "python"]
        assert await Tag.objects.filter(name="python").acount() == 1  # reused
        audit = await AuditEntry.objects.aget(object_id=post.pk)
        assert audit.action == "post.created"
        assert services.METRICS["posts_committed"] == before + 1

    async def test_create_post_for_unknown_author_is_404_and_writes_nothing(self):
        posts = await Post.objects.acount()
        async with self.captureOnCommitCallbacks() as callbacks:
            data = await self.post_json(
                "/posts/", {"author_id": 10**30, "title": "x", "tags": ["brand-new"]}, status=404
            )
        assert "does not exist" in data["error"]
        assert callbacks == []
        assert await Post.objects.acount() == posts
        assert not await Tag.objects.filter(name="brand-new").aexists()

    async def test_create_post_rejects_bad_bodies(self):
        good = {"author_id": self.author.pk, "title": "Title", "tags": []}
        cases = [
            ("{not json", "not valid JSON"),
            ("", "empty"),
            ("[1]", "must be a JSON object"),
            ("null", "must be a JSON object"),
            (json.dumps({"author_id": self.author.pk}), "'title' is required"),
            (json.dumps({**good, "title": ["x"]}), "must be a string"),
            (json.dumps({**good, "title": "\u0000"}), "NUL"),
            (json.dumps({**good, "body": 1}), "'body' must be a string"),
            (json.dumps({**good, "tags": {"a": 1}}), "list of strings"),
            (json.dumps({**good, "tags": [None]}), "'tags' is required"),
            (json.dumps({**good, "tags": ["x" * 51]}), "longer than 50"),
            (json.dumps({**good, "author_id": 1.5}), "integer id"),
            (json.dumps({**good, "author_id": False}), "integer id"),
            (json.dumps({**good, "author_id": 0}), "positive"),
        ]
        for raw, words in cases:
            with self.subTest(body=raw):
                data = await self.post_json("/posts/", raw=raw, status=400)
                assert words in data["error"]
        response = await self.async_client.post("/posts/", b"\xff", content_type=JSON)
        assert response.status_code == 400
        assert "UTF-8" in response.json()["error"]
        assert not await Post.objects.filter(title="Title").aexists()

    # --- POST /posts/<id>/comments/ --------------------------------------------------------

    async def test_add_comment(self):
        body = {"author_name": "Reader", "body": "Thanks!"}
        data = await self.post_json(f"/posts/{self.post.pk}/comments/", body, status=201)
        comment = await Comment.objects.aget(pk=data["id"])
        assert (comment.post_id, comment.body) == (self.post.pk, "Thanks!")
        await self.post_json("/posts/999999999/comments/", body, status=404)
        missing = await self.post_json(
            f"/posts/{self.post.pk}/comments/", {"body": "x"}, status=400
        )
        assert "'author_name' is required" in missing["error"]

    # --- counters ----------------------------------------------------------------------------

    async def test_counter_increments_and_reads(self):
        await self.get_json("/counter/hits/", status=404)
        for expected in (1, 2, 3):
            data = await self.post_json("/counter/hits/increment")
            assert data == {"name": "hits", "value": expected}
        assert await self.get_json("/counter/hits/") == {"name": "hits", "value": 3}
        assert (await Counter.objects.aget(name="hits")).value == 3

    async def test_counter_increment_locks_the_row(self):
        async with self.assertNumQueries(4) as captured:
            await self.post_json("/counter/visits/increment")
        sql = [q["sql"] for q in captured.captured_queries]
        # A savepoint here (the test's transaction is outside); COMMIT in production.
        assert sql[0].startswith("SAVEPOINT"), sql
        assert sql[1].startswith("SELECT"), sql
        assert sql[1].endswith("FOR UPDATE"), sql
        assert sql[2].startswith('UPDATE "blog_counter" SET "value" = 1'), sql
        assert sql[3].startswith("RELEASE SAVEPOINT"), sql

    async def test_counter_bad_names_and_methods(self):
        data = await self.post_json("/counter/bad%20name/increment", status=400)
        assert "counter name" in data["error"]
        response = await self.async_client.get("/counter/hits/increment")
        assert response.status_code == 405
        assert response["Allow"] == "POST"

    # --- stats, metrics, export, errors ----------------------------------------------------

    async def test_stats_counts_every_table(self):
        data = await self.get_json("/stats/")
        expected = {
            "posts": 12,
            "authors": await Author.objects.acount(),
            "tags": len(TAGS),
            "comments": await Comment.objects.acount(),
            "audit_entries": 0,
        }
        assert {k: data[k] for k in expected} == expected
        assert data["orm"] == services.orm_variant()

    async def test_metrics(self):
        data = await self.get_json("/metrics/")
        assert "posts_committed" in data["metrics"] | {"posts_committed": 0}
        assert data["orm"] == "async_db"
        assert isinstance(data["pool"], dict)

    async def test_export_streams_every_post_as_csv(self):
        response = await self.async_client.get("/export/posts.csv")
        assert response.status_code == 200
        assert response.streaming
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        content = b"".join([chunk async for chunk in response.streaming_content])
        rows = list(csv.reader(io.StringIO(content.decode())))
        assert rows[0] == ["id", "title", "author", "tags", "created_at"]
        ids = [pk async for pk in Post.objects.order_by("id").values_list("id", flat=True)]
        assert [int(r[0]) for r in rows[1:]] == ids
        post = await Post.objects.select_related("author").aget(pk=self.post.pk)
        row = next(r for r in rows if r[0] == str(post.pk))
        tags = sorted([t.name async for t in post.tags.all()])
        assert (row[1], row[2], sorted(row[3].split(";"))) == (post.title, post.author.name, tags)

    async def test_unknown_urls_and_methods_are_json(self):
        data = await self.get_json("/nowhere/", status=404)
        assert "/nowhere/" in data["error"]
        response = await self.async_client.delete("/posts/")
        assert response.status_code == 405
        assert response["Allow"] == "GET, POST"
        assert "not allowed" in response.json()["error"]


class SeedTests(TestCase):
    def test_seed_is_idempotent(self):
        assert seed(posts=5) == 5
        counts = [m.objects.count() for m in (Author, Tag, Post, Comment, Counter)]
        assert seed(posts=5) == 0
        assert [m.objects.count() for m in (Author, Tag, Post, Comment, Counter)] == counts
        assert seed(posts=7) == 2
