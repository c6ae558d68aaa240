"""URLs of the blog API."""

from __future__ import annotations

from django.urls import path

from . import bench, views

urlpatterns = [
    path("", views.index, name="index"),
    path("posts/", views.posts, name="posts"),
    path("posts/<int:pk>/", views.post_detail, name="post-detail"),
    path("posts/<int:pk>/comments/", views.add_comment, name="add-comment"),
    path("counter/<str:name>/", views.counter_detail, name="counter"),
    path("counter/<str:name>/increment", views.counter_increment, name="counter-increment"),
    path("stats/", views.stats, name="stats"),
    path("metrics/", views.metrics, name="metrics"),
    path("export/posts.csv", views.export_posts_csv, name="export-posts"),
    # The HTTP benchmark's views (bench/http_bench.py).
    path("bench/none/", bench.no_query),
    path("bench/none-sync/", bench.no_query_sync),
    path("bench/one/", bench.one_query),
    path("bench/five/", bench.five_queries),
    path("bench/one-sync/", bench.one_query_sync),
    path("bench/five-sync/", bench.five_queries_sync),
    path("bench/read-write/", bench.read_write),
    path("bench/probe/", bench.probe_counts),
]
