"""Test database creation: close the async pools' sessions before the drop."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import creation

from ..._pool import terminate_pools

__all__ = ["DatabaseCreation"]


class DatabaseCreation(creation.DatabaseCreation):  # type: ignore[misc]
    """Django's postgresql ``DatabaseCreation``, aware of the per-loop async pools."""

    def _destroy_test_db(self, test_database_name: str, verbosity: Any) -> None:
        # Pools live on event loops that may already be gone (a test's loop,
        # pytest-asyncio's session loop): close their connections to the test
        # database now, or the DROP DATABASE fails while they are open.
        terminate_pools(self.connection.alias)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]
