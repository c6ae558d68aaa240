"""Models the test suite runs the ORM against."""

from __future__ import annotations

from django.db import models

from django_async_db.models import AsyncModelMixin


class Author(models.Model):
    name = models.CharField(max_length=100)
    bio = models.TextField(blank=True, default="")

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, related_name="books", on_delete=models.CASCADE)
    tags = models.ManyToManyField(Tag, related_name="books", blank=True)
    pages = models.IntegerField(default=100)
    published = models.DateTimeField(null=True, blank=True)


class Review(models.Model):
    book = models.ForeignKey(Book, related_name="reviews", on_delete=models.CASCADE)
    stars = models.IntegerField()


class Account(models.Model):
    name = models.CharField(max_length=50)
    balance = models.BigIntegerField(default=0)


class Event(models.Model):
    """A row per observed event: what the concurrency tests write and count."""

    task = models.IntegerField()
    label = models.CharField(max_length=50)
    txid = models.BigIntegerField(null=True)


class Chapter(AsyncModelMixin, models.Model):
    """Awaitable relations: ``await chapter.abook``, ``chapter.acites.aadd(...)``.

    ``book`` is nullable, so ``book.chapters`` also has ``remove()``/``clear()``.
    """

    title = models.CharField(max_length=100)
    book = models.ForeignKey(
        Book, null=True, blank=True, related_name="chapters", on_delete=models.SET_NULL
    )
    cites = models.ManyToManyField(Book, related_name="cited_in", blank=True)


class ChapterNote(AsyncModelMixin, models.Model):
    """Reverse FK ``chapter.anotes``; one-to-one ``note.aprevious``, reverse ``note.afollower``."""

    chapter = models.ForeignKey(Chapter, related_name="notes", on_delete=models.CASCADE)
    text = models.TextField(default="")
    previous = models.OneToOneField(
        "self", null=True, blank=True, related_name="follower", on_delete=models.SET_NULL
    )


class LowerCaseField(models.CharField):  # type: ignore[type-arg]
    """A field with a ``from_db_value`` converter (the compiled SQL cache must apply it)."""

    def from_db_value(self, value: str | None, expression: object, connection: object) -> object:
        return value if value is None else value.lower()


class Gadget(models.Model):
    """Every common value type: what the compiled SQL cache's harness looks rows up by."""

    uid = models.UUIDField(unique=True)
    code = LowerCaseField(max_length=20, unique=True)
    active = models.BooleanField(default=True)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    ratio = models.FloatField(default=0.5)
    data = models.JSONField(default=dict)
    made = models.DateField(null=True)
    opens = models.TimeField(null=True)
    seen = models.DateTimeField(null=True)
    blob = models.BinaryField(default=b"")
    owner = models.ForeignKey(Author, null=True, on_delete=models.SET_NULL)


class Person(models.Model):
    """A plain model with a reverse one-to-one (``person.passport``)."""

    name = models.CharField(max_length=50)


class Passport(models.Model):
    """A plain one-to-one (``select_related()`` sets both sides' caches) and a second relation."""

    number = models.CharField(max_length=20)
    holder = models.OneToOneField(
        Person, null=True, related_name="passport", on_delete=models.SET_NULL
    )
    issuer = models.ForeignKey(Person, null=True, related_name="issued", on_delete=models.SET_NULL)
