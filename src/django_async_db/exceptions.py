"""Errors raised by django-async-db, subclassing Django's database errors where they fit."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError

__all__ = ["ImproperlyConfigured", "PoolTimeout"]


class PoolTimeout(OperationalError):
    """No pooled connection became free within the pool's ``timeout``.

    Raised by every async database access that needs a connection while all
    ``max_size`` connections of the alias's pool are held by other tasks.
    """

    def __init__(self, alias: str, max_size: int, timeout: float) -> None:
        super().__init__(
            f"Could not get a connection for database alias {alias!r} within "
            f"{timeout:g} s: all {max_size} connections of its pool are in use. "
            f"Raise OPTIONS['pool']['max_size'] or ['timeout'], or hold "
            f"connections for less time."
        )
        self.alias = alias
        self.max_size = max_size
        self.timeout = timeout
