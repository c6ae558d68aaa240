"""Settings of the demo project, read from the environment.

* ``DEMO_DATABASE_URL``: the demo's own database (``run.py`` creates it);
  without it, the server of ``DATABASE_URL`` with the database ``djasync_demo``.
* ``DEMO_ORM``: ``async_db`` (default: ENGINE ``django_async_db.backends.postgresql``
  and the ``django_async_db`` app) or ``stock`` (Django's own postgresql
  backend and async API; the views take their stock code paths).
* ``DEMO_POOL_MAX``: connections in the pool (default 10); ``DEMO_POOL_MAX_IDLE``:
  seconds an idle connection above the pool's minimum is kept (default 600);
  ``DEMO_DEBUG=1``.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

DEFAULT_DATABASE_NAME = "djasync_demo"


def database_url() -> str:
    """Return the URL of the demo's database."""
    if url := os.environ.get("DEMO_DATABASE_URL"):
        return url
    server = urlsplit(
        os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    return server._replace(path=f"/{DEFAULT_DATABASE_NAME}").geturl()


DEMO_ORM = os.environ.get("DEMO_ORM", "async_db")
if DEMO_ORM not in ("async_db", "stock"):
    raise ValueError(f"DEMO_ORM must be 'async_db' or 'stock', not {DEMO_ORM!r}.")

_url = urlsplit(database_url())
DATABASES = {
    "default": {
        "ENGINE": (
            "django_async_db.backends.postgresql"
            if DEMO_ORM == "async_db"
            else "django.db.backends.postgresql"
        ),
        "NAME": unquote(_url.path.lstrip("/")),
        "USER": unquote(_url.username or "postgres"),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "127.0.0.1",
        "PORT": str(_url.port or 5432),
        # The same pool size for both variants, so the load comparison is fair.
        "OPTIONS": {
            "pool": {
                "min_size": 2,
                "max_size": int(os.environ.get("DEMO_POOL_MAX", "10")),
                "max_idle": float(os.environ.get("DEMO_POOL_MAX_IDLE", "600")),
            }
        },
    }
}

INSTALLED_APPS = [
    *(["django_async_db"] if DEMO_ORM == "async_db" else []),
    "blog",
]
MIDDLEWARE: list[str] = []  # a JSON API: no sessions, no CSRF cookies
ROOT_URLCONF = "demosite.urls"
ASGI_APPLICATION = "demosite.asgi.application"

DEBUG = os.environ.get("DEMO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
SECRET_KEY = "django-async-db-demo-not-secret"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "blog": {"handlers": ["console"], "level": "INFO"},
        "django_async_db": {"handlers": ["console"], "level": "WARNING"},
    },
}
