"""``manage.py seed_demo``: fill the demo database with sample data (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction
from django.db.models import Q

from blog.models import AuditEntry, Author, Comment, Counter, Post, Tag

AUTHORS = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Barbara Liskov", "Edsger Dijkstra"]
TAGS = ["python", "django", "asyncio", "postgresql", "greenlet", "testing", "performance", "orm"]
POSTS = 200
COUNTERS = ["visits", "likes"]
# What the checks (demotools.checks) and load runs (demotools.load) write.
GENERATED_TITLES = ("Check post ", "Load post ")
GENERATED_COMMENTERS = ("Demo check", "Demo load")


def seed(posts: int = POSTS) -> int:
    """Create whatever sample rows are missing; return how many posts were created."""
    with transaction.atomic():
        authors = [
            Author.objects.get_or_create(
                name=name, defaults={"email": name.split()[0].lower() + "@example.com"}
            )[0]
            for name in AUTHORS
        ]
        tags = [Tag.objects.get_or_create(name=name)[0] for name in TAGS]
        for name in COUNTERS:
            Counter.objects.get_or_create(name=name)
        existing = set(Post.objects.filter(slug__startswith="seed-").values_list("slug", flat=True))
        missing = [i for i in range(1, posts + 1) if f"seed-{i:04d}" not in existing]
        created = Post.objects.bulk_create(
            Post(
                author=authors[i % len(authors)],
                title=f"{TAGS[i % len(TAGS)].capitalize()} notes, part {i}",
                slug=f"seed-{i:04d}",
                body=f"Sample post number {i}. " * 5,
            )
            for i in missing
        )
        Post.tags.through.objects.bulk_create(
            [
                Post.tags.through(post=post, tag=tags[j % len(tags)])
                for i, post in zip(missing, created, strict=True)
                for j in {i, i * 3 + 1, i * 5 + 2}
            ],
            ignore_conflicts=True,
        )
        Comment.objects.bulk_create(
            Comment(
                post=post, author_name=AUTHORS[(i + k) % len(AUTHORS)], body=f"Comment {k + 1}."
            )
            for i, post in zip(missing, created, strict=True)
            for k in range(i % 4)
        )
    return len(created)


def remove_generated() -> int:
    """Delete what the demo's checks and load runs wrote; return how many posts went."""
    with transaction.atomic():
        generated = Q()
        for prefix in GENERATED_TITLES:
            generated |= Q(title__startswith=prefix)
        posts = Post.objects.filter(generated)
        post_ids = list(posts.values_list("pk", flat=True))
        AuditEntry.objects.filter(object_id__in=post_ids).delete()
        posts.delete()  # their comments and tag links too
        Comment.objects.filter(author_name__in=GENERATED_COMMENTERS).delete()
        Tag.objects.filter(name__startswith="check-", posts=None).delete()
        Counter.objects.filter(name__regex=r"^(check|load)-").delete()
    return len(post_ids)


class Command(BaseCommand):
    help = "Fill the demo database with sample authors, tags, posts, comments and counters."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--posts", type=int, default=POSTS, help="sample posts to have")

    def handle(self, *args: Any, posts: int, **options: Any) -> None:
        created = seed(posts)
        total = Post.objects.count()
        self.stdout.write(f"seed: {created} sample posts created; {total} posts in the database.")
