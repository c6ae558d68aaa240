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

    def __init__(
        self, alias: str, max_size: int, timeout: float, in_use: int | None = None
    ) -> None:
        if in_use is not None and in_use < max_size:
            why = (
                f"only {in_use} of its {max_size} connections are in use and no new one "
                f"could be opened. Is the server reachable?"
            )
        else:
            why = (
                f"all {max_size} connections of its pool are in use. Raise "
                f"OPTIONS['pool']['max_size'] or ['timeout'], or hold connections for less time."
            )
        super().__init__(
            f"Could not get a connection for database alias {alias!r} within {timeout:g} s: {why}"
        )
        self.alias = alias
        self.max_size = max_size
        self.timeout = timeout
