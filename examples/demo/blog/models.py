"""The demo's models: a blog with authors, posts, tags (M2M) and comments, plus counters."""

from __future__ import annotations

from django.db import models


class Author(models.Model):
    """Someone who writes posts."""

    name = models.CharField(max_length=100, unique=True)
    email = models.EmailField(blank=True)

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    """A label on posts; created on first use."""

    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Post(models.Model):
    """A blog post, by one author, with any number of tags."""

    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="posts")
    title = models.CharField(max_length=200)
    slug = models.SlugField(max_length=80, unique=True)
    body = models.TextField(blank=True)
    tags = models.ManyToManyField(Tag, related_name="posts", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["-created_at", "-id"], name="post_newest_first")]

    def __str__(self) -> str:
        return self.title


class Comment(models.Model):
    """A reader's comment on a post."""

    post = models.ForeignKey(Post, on_delete=models.CASCADE, related_name="comments")
    author_name = models.CharField(max_length=100)
    body = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]


class Counter(models.Model):
    """A named counter, incremented under a row lock (``select_for_update``)."""

    name = models.CharField(max_length=50, unique=True)
    value = models.BigIntegerField(default=0)


class AuditEntry(models.Model):
    """A record written by an ``on_commit`` callback after a transaction commits."""

    action = models.CharField(max_length=50)
    object_id = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
