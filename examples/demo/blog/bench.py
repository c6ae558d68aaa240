"""Views for the HTTP benchmark (``bench/http_bench.py``): one query, five queries, read + write.

Each has an ``async def`` version (served over ASGI, by django-async-db or by
stock Django) and a plain sync twin (served by a WSGI server); both run the
same ORM calls. ``probe`` reports what :mod:`blog.probe` counted in this process.
"""

from __future__ import annotations

from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse

from . import probe
from .errors import api_view
from .inputs import query_int
from .models import Author, Comment, Counter, Post

PROBE_COUNTER = "bench-probe"


async def no_query(request: HttpRequest) -> HttpResponse:
    """No database work: the cost of the request path alone."""
    return JsonResponse({"ok": True})


def no_query_sync(request: HttpRequest) -> HttpResponse:
    """``no_query`` as a sync view."""
    return JsonResponse({"ok": True})


@api_view("GET")
async def one_query(request: HttpRequest) -> HttpResponse:
    """One primary-key lookup."""
    post = await Post.objects.aget(pk=query_int(request, "id", 1, 1, 2**62))
    return JsonResponse({"id": post.pk, "title": post.title})


@api_view("GET")
async def five_queries(request: HttpRequest) -> HttpResponse:
    """Five queries one after another: post, author, comment count, tags, author's posts."""
    post = await Post.objects.aget(pk=query_int(request, "id", 1, 1, 2**62))
    author = await Author.objects.aget(pk=post.author_id)
    comments = await Comment.objects.filter(post_id=post.pk).acount()
    tags = [tag.name async for tag in post.tags.order_by("name")]
    posts = await Post.objects.filter(author_id=author.pk).acount()
    return JsonResponse(
        {"id": post.pk, "author": author.name, "comments": comments, "tags": tags, "posts": posts}
    )


def one_query_sync(request: HttpRequest) -> HttpResponse:
    """``one_query`` as a sync view."""
    post = Post.objects.get(pk=query_int(request, "id", 1, 1, 2**62))
    return JsonResponse({"id": post.pk, "title": post.title})


def five_queries_sync(request: HttpRequest) -> HttpResponse:
    """``five_queries`` as a sync view."""
    post = Post.objects.get(pk=query_int(request, "id", 1, 1, 2**62))
    author = Author.objects.get(pk=post.author_id)
    comments = Comment.objects.filter(post_id=post.pk).count()
    tags = [tag.name for tag in post.tags.order_by("name")]
    posts = Post.objects.filter(author_id=author.pk).count()
    return JsonResponse(
        {"id": post.pk, "author": author.name, "comments": comments, "tags": tags, "posts": posts}
    )


@api_view("POST")
async def read_write(request: HttpRequest) -> HttpResponse:
    """Write (increment a counter row) and read it back: the thread-probe view."""
    await Counter.objects.aget_or_create(name=PROBE_COUNTER)
    await Counter.objects.filter(name=PROBE_COUNTER).aupdate(value=F("value") + 1)
    counter = await Counter.objects.aget(name=PROBE_COUNTER)
    return JsonResponse({"name": counter.name, "value": counter.value})


@api_view("GET")
async def probe_counts(request: HttpRequest) -> HttpResponse:
    """What :mod:`blog.probe` counted (``DEMO_THREAD_PROBE=1``), then reset it."""
    return JsonResponse(probe.snapshot(reset=True))
