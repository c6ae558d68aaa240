"""Django app config: installs task-owned connection storage when Django starts."""

from __future__ import annotations

from django.apps import AppConfig


class DjangoAsyncDbConfig(AppConfig):
    """Add ``"django_async_db"`` to ``INSTALLED_APPS`` to enable the package."""

    name = "django_async_db"
    verbose_name = "Django async DB"

    def ready(self) -> None:
        from ._storage import install

        install()
