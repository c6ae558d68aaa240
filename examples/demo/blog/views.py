"""The demo's async JSON views.

Reads use Django's async ORM API directly (``async for``, ``aget_object_or_404``,
``acount``, ``aiterator``): with django-async-db it runs on the event loop in
the request's own task and connection; on stock Django the same code hops to
a thread. Writes that need a transaction go through :mod:`blog.services`,
which has a variant for each.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator
from typing import Any

from django.db.models import BooleanField, Model, Prefetch
from django.db.models.expressions import RawSQL
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import aget_object_or_404

from . import services
from .errors import NotFound, api_view, parse_json
from .inputs import NewComment, NewPost, counter_name, query_int
from .models import AuditEntry, Author, Comment, Counter, Post, Tag

ENDPOINTS = {
    "GET /posts/?limit=&offset=&tag=": "posts with author and tags (async for, prefetch)",
    "POST /posts/": 'create: {"author_id": 1, "title": "...", "body": "...", "tags": ["x"]}',
    "GET /posts/<id>/": "one post with its comments (aget_object_or_404)",
    "POST /posts/<id>/comments/": 'add a comment: {"author_name": "...", "body": "..."}',
    "GET /counter/<name>/": "a counter's value",
    "POST /counter/<name>/increment": "add one under select_for_update",
    "GET /stats/?delay_ms=": "counts, run in parallel with asyncio.gather",
    "GET /export/posts.csv": "every post, streamed with aiterator()",
    "GET /metrics/": "on_commit metrics and pool counters of this process",
}


def _post_json(post: Post, *, comments: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": post.pk,
        "title": post.title,
        "slug": post.slug,
        "author": {"id": post.author.pk, "name": post.author.name},  # select_related
        "tags": [tag.name for tag in post.tags.all()],  # prefetched: no query
        "created_at": post.created_at.isoformat(),
    }
    if comments:
        data["body"] = post.body
        data["comments"] = [_comment_json(c) for c in post.comments.all()]  # prefetched
    return data


def _comment_json(comment: Comment) -> dict[str, Any]:
    return {
        "id": comment.pk,
        "author_name": comment.author_name,
        "body": comment.body,
        "created_at": comment.created_at.isoformat(),
    }


@api_view("GET")
async def index(request: HttpRequest) -> HttpResponse:
    """List the endpoints."""
    return JsonResponse({"orm": services.orm_variant(), "endpoints": ENDPOINTS})


@api_view("GET", "POST")
async def posts(request: HttpRequest) -> HttpResponse:
    """``GET``: a page of posts with author and tags; ``POST``: create one."""
    if request.method == "POST":
        return await _create_post(request)
    limit = query_int(request, "limit", 20, 1, 100)
    offset = query_int(request, "offset", 0, 0, 1_000_000)
    queryset = Post.objects.select_related("author").prefetch_related("tags")
    if tag := request.GET.get("tag"):
        queryset = queryset.filter(tags__name=tag.lower())
    results = [_post_json(post) async for post in queryset[offset : offset + limit]]
    return JsonResponse({"count": len(results), "results": results})


async def _create_post(request: HttpRequest) -> HttpResponse:
    new = NewPost.from_json(parse_json(request))
    post = await services.create_post(new)
    return JsonResponse(
        {"id": post.pk, "slug": post.slug, "title": post.title, "tags": new.tags}, status=201
    )


@api_view("GET")
async def post_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """One post with its author, tags and comments."""
    post = await aget_object_or_404(
        Post.objects.select_related("author").prefetch_related(
            "tags", Prefetch("comments", queryset=Comment.objects.order_by("created_at", "id"))
        ),
        pk=pk,
    )
    return JsonResponse(_post_json(post, comments=True))


@api_view("POST")
async def add_comment(request: HttpRequest, pk: int) -> HttpResponse:
    """Add a comment to a post (the reverse foreign key's ``acreate``)."""
    new = NewComment.from_json(parse_json(request))
    post = await aget_object_or_404(Post, pk=pk)
    comment = await post.comments.acreate(author_name=new.author_name, body=new.body)
    return JsonResponse(_comment_json(comment), status=201)


@api_view("GET")
async def counter_detail(request: HttpRequest, name: str) -> HttpResponse:
    """A counter's current value."""
    counter = await Counter.objects.filter(name=counter_name(name)).afirst()
    if counter is None:
        raise NotFound(f"No counter named {name!r}; POST /counter/{name}/increment creates it.")
    return JsonResponse({"name": counter.name, "value": counter.value})


@api_view("POST")
async def counter_increment(request: HttpRequest, name: str) -> HttpResponse:
    """Add one to a counter in a transaction holding its row lock."""
    value = await services.increment_counter(counter_name(name))
    return JsonResponse({"name": name, "value": value})


def _count(model: type[Model], delay: float) -> Any:
    queryset = model._default_manager.all()
    if delay:
        # Make each count take `delay` seconds on the server, to show that
        # gather() runs them at the same time (one connection per task).
        sleep = RawSQL("(SELECT true FROM pg_sleep(%s))", [delay], output_field=BooleanField())
        queryset = queryset.filter(sleep)
    return queryset.acount()


@api_view("GET")
async def stats(request: HttpRequest) -> HttpResponse:
    """Row counts, queried concurrently with ``asyncio.gather``."""
    delay = query_int(request, "delay_ms", 0, 0, 2_000) / 1000
    models = {
        "posts": Post,
        "authors": Author,
        "tags": Tag,
        "comments": Comment,
        "audit_entries": AuditEntry,
    }
    started = time.perf_counter()
    counts = await asyncio.gather(*(_count(model, delay) for model in models.values()))
    elapsed_ms = (time.perf_counter() - started) * 1000
    return JsonResponse(
        {
            **dict(zip(models, counts, strict=True)),
            "orm": services.orm_variant(),
            "elapsed_ms": round(elapsed_ms, 1),
        }
    )


@api_view("GET")
async def metrics(request: HttpRequest) -> HttpResponse:
    """In-memory metrics of this process, and the connection pool's counters."""
    return JsonResponse(
        {
            "orm": services.orm_variant(),
            "metrics": dict(services.METRICS),
            "pool": services.pool_stats(),
        }
    )


class _Line:
    """A file-like object whose ``write`` returns what was written (for csv.writer)."""

    def write(self, value: str) -> str:
        return value


async def _csv_rows() -> AsyncIterator[str]:
    writer = csv.writer(_Line())
    yield writer.writerow(["id", "title", "author", "tags", "created_at"])
    queryset = Post.objects.select_related("author").prefetch_related("tags").order_by("id")
    # A server-side cursor, 500 rows per fetch: memory stays flat however many posts.
    async for post in queryset.aiterator(chunk_size=500):
        tags = ";".join(tag.name for tag in post.tags.all())
        yield writer.writerow(
            [post.pk, post.title, post.author.name, tags, post.created_at.isoformat()]
        )


@api_view("GET")
async def export_posts_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Every post as CSV, streamed while it is read from the database."""
    return StreamingHttpResponse(
        _csv_rows(),
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="posts.csv"'},
    )


__all__ = [
    "add_comment",
    "counter_detail",
    "counter_increment",
    "export_posts_csv",
    "index",
    "metrics",
    "post_detail",
    "posts",
    "stats",
]
