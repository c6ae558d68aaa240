"""The benchmark schema (tables are created by the benchmark scripts)."""

from __future__ import annotations

from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)
    bio = models.TextField()

    class Meta:
        app_label = "bench_app"
