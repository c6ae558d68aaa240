"""Validation of request input: every problem is a :class:`~blog.errors.BadRequest`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest

from .errors import BadRequest

MAX_TAGS = 10
_COUNTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,50}")


def text(data: dict[str, Any], name: str, max_length: int, *, required: bool = True) -> str:
    """Return ``data[name]`` as a stripped string of at most ``max_length`` characters."""
    value = data.get(name)
    if value is None:
        if required:
            raise BadRequest(f"The field {name!r} is required.")
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"The field {name!r} must be a string, not {_json_type(value)}.")
    value = value.strip()
    if required and not value:
        raise BadRequest(f"The field {name!r} must not be blank.")
    if len(value) > max_length:
        raise BadRequest(f"The field {name!r} is longer than {max_length} characters.")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise BadRequest(f"The field {name!r} must not contain NUL characters.")
    return value


def object_id(data: dict[str, Any], name: str) -> int:
    """Return ``data[name]`` as a positive integer id."""
    value = data.get(name)
    if value is None:
        raise BadRequest(f"The field {name!r} is required.")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"The field {name!r} must be an integer id, not {_json_type(value)}.")
    if value <= 0:
        raise BadRequest(f"The field {name!r} must be a positive integer.")
    return value


def tag_names(data: dict[str, Any]) -> list[str]:
    """Return the ``tags`` field: distinct, lower-cased names (at most ``MAX_TAGS``)."""
    value = data.get("tags", [])
    if not isinstance(value, list):
        raise BadRequest(f"The field 'tags' must be a list of strings, not {_json_type(value)}.")
    if len(value) > MAX_TAGS:
        raise BadRequest(f"A post has at most {MAX_TAGS} tags.")
    names: list[str] = []
    for item in value:
        name = text({"tags": item}, "tags", 50).lower()
        if name not in names:
            names.append(name)
    return names


def query_int(request: HttpRequest, name: str, default: int, low: int, high: int) -> int:
    """Return the query parameter ``name`` as an integer in ``[low, high]``."""
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"The query parameter {name!r} must be an integer, not {raw!r}.") from None
    if not low <= value <= high:
        raise BadRequest(f"The query parameter {name!r} must be between {low} and {high}.")
    return value


def counter_name(name: str) -> str:
    """Return ``name`` if it is a valid counter name (letters, digits, ``-``, ``_``)."""
    if not _COUNTER_NAME.fullmatch(name):
        raise BadRequest("A counter name is 1 to 50 letters, digits, '-' or '_'.")
    return name


@dataclass(frozen=True)
class NewPost:
    """The validated body of ``POST /posts/``."""

    author_id: int
    title: str
    body: str
    tags: list[str]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NewPost:
        """Validate a decoded JSON object."""
        return cls(
            author_id=object_id(data, "author_id"),
            title=text(data, "title", 200),
            body=text(data, "body", 10_000, required=False),
            tags=tag_names(data),
        )


@dataclass(frozen=True)
class NewComment:
    """The validated body of ``POST /posts/<id>/comments/``."""

    author_name: str
    body: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NewComment:
        """Validate a decoded JSON object."""
        return cls(author_name=text(data, "author_name", 100), body=text(data, "body", 2_000))


def _json_type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), "null")
