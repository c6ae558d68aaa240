"""Django settings for the project's own test suite.

The database comes from ``DATABASE_URL`` (set by ``scripts/provision_pg.py``,
which the ``./dev`` commands run first). Every run gets its own database
names from ``DJASYNC_RUN_ID`` so several runs can share one server.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
_run_id = os.environ.setdefault("DJASYNC_RUN_ID", uuid.uuid4().hex[:10])
_engine = os.environ.get("DJASYNC_TEST_ENGINE", "django_async_db.backends.postgresql")
# The demo project (examples/demo: apps "blog", "demosite"), tested in tests/demo.
sys.path.append(str(Path(__file__).resolve().parent.parent / "examples" / "demo"))


def _alias(suffix: str) -> dict[str, object]:
    return {
        "ENGINE": _engine,
        "NAME": unquote(_url.path.lstrip("/")) or "postgres",
        "USER": unquote(_url.username or "postgres"),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "127.0.0.1",
        "PORT": str(_url.port or 5432),
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 20, "timeout": 10}},
        "TEST": {"NAME": f"test_djasync_{_run_id}{suffix}"},
    }


DATABASES = {"default": _alias(""), "other": _alias("_other")}
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_async_db",
    "tests.testapp",
    "blog",
]
SECRET_KEY = "django-async-db-tests"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
