"""Hit every endpoint of a running demo over HTTP and check status codes and JSON.

Needs sample data (``manage.py seed_demo``). What the checks create is named
so that :func:`blog.management.commands.seed_demo.remove_generated` can
delete it: posts titled ``Check post ...``, counters ``check-...``, comments
by ``Demo check``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .client import HttpClient, Response

CHECK_AUTHOR = "Demo check"


class CheckFailed(AssertionError):
    """One expectation of a check was not met."""


@dataclass
class Report:
    """The outcome of every check."""

    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return True if every check passed."""
        return not self.failed and bool(self.passed)


def expect(condition: bool, message: str) -> None:
    """Fail the current check with ``message`` unless ``condition``."""
    if not condition:
        raise CheckFailed(message)


def expect_status(response: Response, status: int) -> Any:
    """Check the status (and, for JSON, return the decoded body)."""
    is_json = response.headers.get("content-type", "").startswith("application/json")
    expect(
        response.status == status,
        f"expected HTTP {status}, got {response.status}: {response.text[:300]}",
    )
    if status >= 400:
        expect(is_json, f"an error must be JSON, got {response.headers.get('content-type')!r}")
        data = response.json()
        expect(isinstance(data.get("error"), str) and data["error"], f"no 'error' message: {data}")
        return data
    return response.json() if is_json else None


class Checks:
    """The checks, run in order against ``base_url``."""

    def __init__(self, base_url: str, say: Callable[[str], None] = print) -> None:
        self.base_url = base_url
        self.client = HttpClient(base_url)
        self.say = say
        self.report = Report()
        self.tag = "check-" + secrets.token_hex(3)
        self.orm = "?"

    async def get(self, path: str) -> Response:
        return await self.client.request("GET", path)

    async def post(self, path: str, json_body: Any = None, body: bytes | None = None) -> Response:
        return await self.client.request("POST", path, json_body=json_body, body=body)

    async def check(self, name: str, step: Callable[[], Awaitable[str | None]]) -> None:
        """Run one check; record and print PASS or FAIL."""
        try:
            detail = await step()
        except Exception as exc:  # a check's failure is reported, not raised
            message = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            self.report.failed.append((name, message))
            self.say(f"FAIL {name}: {message}")
        else:
            self.report.passed.append(name)
            self.say(f"PASS {name}" + (f" ({detail})" if detail else ""))

    async def run(self) -> Report:
        """Run every check; return the report."""
        try:
            for name, step in self.steps():
                await self.check(name, step)
        finally:
            await self.client.close()
        return self.report

    def steps(self) -> list[tuple[str, Callable[[], Awaitable[str | None]]]]:
        return [
            ("GET / lists the endpoints", self.index),
            ("GET /posts/ lists posts with author and tags", self.list_posts),
            ("GET /posts/?limit=&offset= pages", self.paging),
            ("GET /posts/?tag= filters by tag", self.tag_filter),
            ("GET /posts/ rejects bad query parameters (400)", self.bad_query),
            ("GET /posts/<id>/ returns a post with comments", self.detail),
            ("GET /posts/<unknown id>/ is 404", self.detail_unknown),
            ("POST /posts/ creates a post with tags, audited on commit", self.create_post),
            ("POST /posts/ rejects bad input (400) and unknown authors (404)", self.create_bad),
            ("POST /posts/<id>/comments/ adds a comment", self.add_comment),
            ("POST /posts/<id>/comments/ rejects bad input and unknown posts", self.comment_bad),
            ("POST /counter/<name>/increment counts under a row lock", self.counter),
            ("counter: 20 concurrent increments lose no update", self.counter_concurrent),
            ("counter: unknown is 404, bad name is 400", self.counter_bad),
            ("GET /stats/ counts rows with asyncio.gather", self.stats),
            ("GET /stats/?delay_ms= times five gathered counts", self.stats_parallel),
            ("GET /export/posts.csv streams every post", self.export_csv),
            ("GET /metrics/ reports on_commit metrics", self.metrics),
            ("unknown URL and wrong method are JSON 404/405", self.routing_errors),
        ]

    # --- the checks ---------------------------------------------------------------------

    async def index(self) -> str | None:
        data = expect_status(await self.get("/"), 200)
        expect("endpoints" in data, f"no 'endpoints' in {data}")
        self.orm = data["orm"]
        return f"orm={self.orm}"

    async def list_posts(self) -> str | None:
        data = expect_status(await self.get("/posts/"), 200)
        results = data["results"]
        expect(data["count"] == len(results) > 0, f"expected some posts, got {data['count']}")
        expect(len(results) <= 20, f"the default page is 20 posts, got {len(results)}")
        for post in results:
            expect(isinstance(post["author"]["name"], str), f"no author name in {post}")
            expect(isinstance(post["tags"], list), f"no tag list in {post}")
        expect(any(post["tags"] for post in results), "no post on the first page has tags")
        self.first_page = results
        return f"{len(results)} posts"

    async def paging(self) -> str | None:
        first = expect_status(await self.get("/posts/?limit=5"), 200)["results"]
        second = expect_status(await self.get("/posts/?limit=5&offset=5"), 200)["results"]
        expect(len(first) == 5 and len(second) == 5, "expected two pages of 5 posts")
        ids = {p["id"] for p in first} | {p["id"] for p in second}
        expect(len(ids) == 10, "the two pages overlap")
        return None

    async def tag_filter(self) -> str | None:
        tag = next(t for post in self.first_page for t in post["tags"])
        results = expect_status(await self.get(f"/posts/?tag={tag}&limit=50"), 200)["results"]
        expect(results, f"no post tagged {tag!r}")
        expect(all(tag in post["tags"] for post in results), f"a post without tag {tag!r}")
        return f"{len(results)} posts tagged {tag!r}"

    async def bad_query(self) -> str | None:
        for query in ("limit=abc", "limit=0", "limit=101", "offset=-1", "offset=1e3"):
            data = expect_status(await self.get(f"/posts/?{query}"), 400)
        return f"e.g. {data['error']!r}"

    async def detail(self) -> str | None:
        post = self.first_page[0]
        data = expect_status(await self.get(f"/posts/{post['id']}/"), 200)
        expect(data["id"] == post["id"] and data["title"] == post["title"], f"wrong post: {data}")
        expect(isinstance(data["comments"], list), "no comment list")
        expect(data["author"] == post["author"], "author differs from the list's")
        return f"post {post['id']}, {len(data['comments'])} comments"

    async def detail_unknown(self) -> str | None:
        expect_status(await self.get("/posts/999999999/"), 404)
        # Beyond bigint: Django answers "no such row" instead of a database error.
        data = expect_status(await self.get("/posts/99999999999999999999999/"), 404)
        return f"{data['error']!r}"

    async def create_post(self) -> str | None:
        before = expect_status(await self.get("/metrics/"), 200)["metrics"].get(
            "posts_committed", 0
        )
        audits = expect_status(await self.get("/stats/"), 200)["audit_entries"]
        author = self.first_page[0]["author"]
        body = {
            "author_id": author["id"],
            "title": f"Check post {secrets.token_hex(2)}",
            "body": "Written by the demo's checks.",
            "tags": [self.tag, "Python", self.tag],
        }
        created = expect_status(await self.post("/posts/", body), 201)
        expect(created["tags"] == [self.tag, "python"], f"tags not normalised: {created}")
        data = expect_status(await self.get(f"/posts/{created['id']}/"), 200)
        expect(sorted(data["tags"]) == sorted([self.tag, "python"]), f"tags: {data['tags']}")
        expect(data["author"]["id"] == author["id"], "wrong author")
        after = expect_status(await self.get("/metrics/"), 200)["metrics"]["posts_committed"]
        expect(after == before + 1, f"on_commit metric went {before} -> {after}, expected +1")
        audits_after = expect_status(await self.get("/stats/"), 200)["audit_entries"]
        expect(audits_after == audits + 1, f"audit rows {audits} -> {audits_after}, expected +1")
        self.created_id = created["id"]
        return f"post {created['id']}"

    async def create_bad(self) -> str | None:
        posts_before = expect_status(await self.get("/stats/"), 200)["posts"]
        author_id = self.first_page[0]["author"]["id"]
        good = {"author_id": author_id, "title": "Check post bad", "tags": []}
        cases: list[tuple[bytes | dict[str, Any], int, str]] = [
            (b"{not json", 400, "not valid JSON"),
            (b"", 400, "empty"),
            (b"[1, 2]", 400, "JSON object"),
            (b"\xff\xfe", 400, "UTF-8"),
            ({**good, "title": None}, 400, "'title'"),
            ({"author_id": author_id}, 400, "'title'"),
            ({**good, "title": "   "}, 400, "blank"),
            ({**good, "title": 42}, 400, "must be a string"),
            ({**good, "title": "x" * 201}, 400, "longer than"),
            ({**good, "title": "nul\u0000"}, 400, "NUL"),
            ({**good, "tags": "python"}, 400, "list of strings"),
            ({**good, "tags": [1]}, 400, "must be a string"),
            ({**good, "tags": [f"t{i}" for i in range(11)]}, 400, "at most"),
            ({**good, "author_id": "1"}, 400, "integer id"),
            ({**good, "author_id": True}, 400, "integer id"),
            ({**good, "author_id": -3}, 400, "positive"),
            ({**good, "author_id": 999999999}, 404, "does not exist"),
            ({**good, "author_id": 10**30}, 404, "does not exist"),
        ]
        for payload, status, words in cases:
            if isinstance(payload, bytes):
                response = await self.post("/posts/", body=payload)
            else:
                response = await self.post("/posts/", json_body=payload)
            data = expect_status(response, status)
            expect(words in data["error"], f"{payload!r}: {data['error']!r} lacks {words!r}")
        posts_after = expect_status(await self.get("/stats/"), 200)["posts"]
        expect(
            posts_after == posts_before,
            f"bad requests created posts: {posts_before} -> {posts_after}",
        )
        return f"{len(cases)} bad bodies refused, nothing written"

    async def add_comment(self) -> str | None:
        post_id = self.created_id
        body = {"author_name": CHECK_AUTHOR, "body": "Nice post."}
        comment = expect_status(await self.post(f"/posts/{post_id}/comments/", body), 201)
        data = expect_status(await self.get(f"/posts/{post_id}/"), 200)
        expect(
            [c["id"] for c in data["comments"]] == [comment["id"]], f"comments: {data['comments']}"
        )
        return f"comment {comment['id']}"

    async def comment_bad(self) -> str | None:
        ok = {"author_name": CHECK_AUTHOR, "body": "x"}
        expect_status(await self.post("/posts/999999999/comments/", ok), 404)
        expect_status(
            await self.post(f"/posts/{self.created_id}/comments/", {"author_name": "x"}), 400
        )
        expect_status(await self.post(f"/posts/{self.created_id}/comments/", body=b"nope"), 400)
        expect_status(await self.get(f"/posts/{self.created_id}/comments/"), 405)
        return None

    async def counter(self) -> str | None:
        self.counter_name = "check-" + secrets.token_hex(4)
        path = f"/counter/{self.counter_name}"
        expect_status(await self.get(path + "/"), 404)
        data = expect_status(await self.post(path + "/increment"), 200)
        expect(data == {"name": self.counter_name, "value": 1}, f"first increment: {data}")
        data = expect_status(await self.post(path + "/increment"), 200)
        expect(data["value"] == 2, f"second increment: {data}")
        expect(expect_status(await self.get(path + "/"), 200)["value"] == 2, "GET disagrees")
        return None

    async def counter_concurrent(self) -> str | None:
        path = f"/counter/{self.counter_name}/increment"
        clients = [HttpClient(self.base_url) for _ in range(20)]
        try:
            responses = await asyncio.gather(*(c.request("POST", path) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        values = sorted(expect_status(r, 200)["value"] for r in responses)
        expect(values == list(range(3, 23)), f"values seen: {values}")
        final = expect_status(await self.get(f"/counter/{self.counter_name}/"), 200)["value"]
        expect(final == 22, f"final value {final}, expected 22")
        return "values 3..22, each seen once"

    async def counter_bad(self) -> str | None:
        expect_status(await self.get("/counter/no-such-counter-here/"), 404)
        data = expect_status(await self.post("/counter/bad%20name!/increment"), 400)
        expect_status(await self.post("/counter/" + "x" * 51 + "/increment"), 400)
        expect_status(await self.get("/counter/x/increment"), 405)
        return f"{data['error']!r}"

    async def stats(self) -> str | None:
        data = expect_status(await self.get("/stats/"), 200)
        keys = ("posts", "authors", "tags", "comments", "audit_entries")
        expect(all(isinstance(data[k], int) and data[k] >= 0 for k in keys), f"counts: {data}")
        expect(data["posts"] > 0 and data["authors"] > 0, f"counts: {data}")
        self.post_count = data["posts"]
        return ", ".join(f"{k}={data[k]}" for k in keys)

    async def stats_parallel(self) -> str | None:
        expect_status(await self.get("/stats/?delay_ms=abc"), 400)
        expect_status(await self.get("/stats/?delay_ms=5000"), 400)
        data = expect_status(await self.get("/stats/?delay_ms=200"), 200)
        elapsed = data["elapsed_ms"]
        expect(elapsed >= 190, f"the delay was not applied: {elapsed} ms")
        if self.orm == "async_db":
            # Five 200 ms counts take ~1000 ms one after another.
            expect(elapsed < 600, f"the five counts did not overlap: {elapsed} ms")
        return f"five counts of 200 ms each took {elapsed:.0f} ms"

    async def export_csv(self) -> str | None:
        response = await self.get("/export/posts.csv")
        expect_status(response, 200)
        expect(response.headers["content-type"].startswith("text/csv"), "not text/csv")
        expect(response.chunked, "the export was not streamed (no chunked encoding)")
        rows = list(csv.reader(io.StringIO(response.text)))
        expect(rows[0] == ["id", "title", "author", "tags", "created_at"], f"header: {rows[0]}")
        ids = [int(row[0]) for row in rows[1:]]
        expect(ids == sorted(set(ids)), "ids are not unique and ascending")
        expect(len(ids) == self.post_count, f"{len(ids)} rows for {self.post_count} posts")
        created = next(row for row in rows[1:] if int(row[0]) == self.created_id)
        expect(sorted(created[3].split(";")) == sorted([self.tag, "python"]), f"tags: {created}")
        return f"{len(ids)} rows, {len(response.body)} bytes"

    async def metrics(self) -> str | None:
        data = expect_status(await self.get("/metrics/"), 200)
        expect(data["metrics"].get("posts_committed", 0) >= 1, f"metrics: {data}")
        if self.orm == "async_db":
            expect(data["pool"] and data["pool"]["pool_size"] >= 1, f"pool: {data['pool']}")
        return f"pool={data['pool']}"

    async def routing_errors(self) -> str | None:
        data = expect_status(await self.get("/no/such/page/"), 404)
        response = await self.client.request("DELETE", "/posts/")
        expect_status(response, 405)
        expect(response.headers.get("allow") == "GET, POST", f"Allow: {response.headers}")
        expect_status(await self.client.request("PUT", f"/posts/{self.created_id}/"), 405)
        return f"{data['error']!r}"


async def run_checks(base_url: str, say: Callable[[str], None] = print) -> Report:
    """Run every check against the demo at ``base_url``; return the report."""
    return await Checks(base_url, say).run()
