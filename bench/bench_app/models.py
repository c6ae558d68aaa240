"""The benchmark schema (tables are created by the benchmark scripts)."""

from __future__ import annotations

from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)
    bio = models.TextField()

    class Meta:
        app_label = "bench_app"


class Book(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    title = models.CharField(max_length=200)
    pages = models.IntegerField()

    class Meta:
        app_label = "bench_app"
