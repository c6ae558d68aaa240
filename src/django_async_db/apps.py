"""Django app config: task-owned connections and the native async ORM, installed at startup."""

from __future__ import annotations

from django.apps import AppConfig


class DjangoAsyncDbConfig(AppConfig):
    """Add ``"django_async_db"`` to ``INSTALLED_APPS`` to enable the package."""

    name = "django_async_db"
    verbose_name = "Django async DB"

    def ready(self) -> None:
        from . import _orm, _storage, test

        _storage.install()
        _orm.install()
        test.install_testcase_pinning()
