#!/usr/bin/env python3
"""Run Django's own test suite on django-async-db's ENGINE and on Django's stock one.

Usage (with the virtual environment's Python and ``DATABASE_URL`` set; ``./dev
django-suite`` does both)::

    python scripts/django_suite.py [--apps LABEL ...] [--quick] [--jobs N] [--docs]
                                   [--backends stock,ours] [--asgi-handler]
                                   [-- RUNTESTS_ARGS...]

``--asgi-handler`` serves the suite's ASGI tests with ``django_async_db.asgi``'s
handler on our ENGINE (``--apps asgi handlers signals requests_tests``).

1. The sdist of the installed Django is downloaded once (``pip download
   --no-binary :all: --no-deps django==X``) into ``.cache/django-sdist/`` and
   extracted there, for its ``tests/`` directory.
2. Per run, settings modules are written to ``.cache/django-suite/runs/<run>/``:
   the suite's own ``test_sqlite`` defaults, with ``default`` and ``other`` on the
   chosen ENGINE (from ``DATABASE_URL``) and test database names unique to the
   run and shard (the server may be shared). For our ENGINE, the settings module
   appends ``"django_async_db"`` to runtests.py's ``ALWAYS_INSTALLED_APPS`` (the
   list runtests.py installs in place of ``INSTALLED_APPS``), and the runner
   checks that the app is installed and the ORM bridged before any test runs.
3. ``tests/runtests.py --parallel=1`` runs the labels, first on Django's stock
   ``django.db.backends.postgresql`` and then on ours, each split into ``--jobs``
   shards that run side by side. A custom test runner writes every outcome as a
   JSON line; a per-test watchdog (``--test-timeout``) stops a hung shard and
   names the test. The script prints a table per app (tests run, failures,
   errors, skips, time) for both backends and every test whose outcome differs.
   Differing tests run once more on both backends; one that does not differ
   again is reported as flaky (a shared server can refuse connections).
4. A probe classifies every ``cursor.execute()``: ``bridge`` (on the event
   loop's thread, inside a django-async-db greenlet), ``thread-hop`` (in a worker
   of asgiref's ``sync_to_async``, named by the file that asked for the hop),
   ``loop-unbridged`` (on a thread with a running loop, outside a bridge),
   ``thread`` or ``sync``. On our ENGINE a call made outside a bridge on the
   loop, or in a thread hop asked for by a Django async API (``aget()``,
   ``asave()`` ...), is a violation, unless documented in ``KNOWN_THREAD_HOPS``.
   Hops asked for by a test's own ``sync_to_async()``, or by Django's handlers
   running sync views and middleware, are counted but allowed.
5. A run of the default labels on both backends is stored in
   ``.cache/django-suite/results-X.Y.json``; ``--docs`` then writes
   ``docs/compatibility.md`` from the stored run of every Django series
   (``--docs-only`` rewrites it without running anything).

Every difference is explained in ``KNOWN_DIFFERENCES`` (limitations by design,
which pass) or ``OPEN_BUGS`` (bugs in django-async-db, which fail the run until
fixed). Exit status: 0 when our ENGINE has no failure or error the stock backend
does not have (other than known limitations and flaky ones), no probe
violation, and no shard crashed or hung; 1 otherwise; 2 on a usage or setup
error. Standard library only; psycopg, when importable, drops the test
databases of a killed shard and reads the server version for the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import heapq
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

PROG = "django-suite"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
SDIST_CACHE = CACHE / "django-sdist"
SUITE_CACHE = CACHE / "django-suite"
DOCS = ROOT / "docs" / "compatibility.md"
KEEP_RUNS = 10  # run directories (logs, JSON lines) kept in .cache/django-suite/runs

OURS = "django_async_db.backends.postgresql"
STOCK = "django.db.backends.postgresql"
BACKENDS = {"stock": STOCK, "ours": OURS}

# The labels run by default: Django's tests for the ORM, transactions, the
# backend and every async API that touches the database (async, asgi, signals,
# sessions, auth, the DB cache, test-case machinery, live servers). Left out:
# pure DDL (migrations, schema, introspection, inspectdb), which runs outside
# any event loop, where this ENGINE *is* the stock one; and slow tests that do
# not touch the database (password hashers, file and memcached caches).
# Values: seconds per label, serial, stock backend, on a shared 2-core machine;
# they only balance the shards (unknown labels count as 10 s).
DEFAULT_APPS: dict[str, float] = {
    "aggregation": 1.5,
    "aggregation_regress": 1,
    "annotations": 1,
    "asgi": 9.5,
    "async": 1,
    "auth_tests.test_auth_backends": 5,
    "auth_tests.test_basic": 0.5,
    "auth_tests.test_decorators": 0.5,
    "auth_tests.test_middleware": 1,
    "auth_tests.test_models": 24,
    "auth_tests.test_remote_user": 5.5,
    "backends": 22,
    "basic": 1,
    "bulk_create": 1.2,
    "cache.tests.DBCacheTests": 24,
    "composite_pk": 3,
    "constraints": 1,
    "contenttypes_tests": 6,
    "custom_lookups": 0.3,
    "custom_managers": 0.3,
    "custom_pk": 0.2,
    "dates": 0.1,
    "datetimes": 0.1,
    "db_functions": 4,
    "defer": 0.5,
    "defer_regress": 0.3,
    "delete": 4.5,
    "delete_regress": 1.8,
    "distinct_on_fields": 0.1,
    "expressions": 1.4,
    "expressions_case": 0.5,
    "expressions_window": 0.5,
    "extra_regress": 0.1,
    "field_defaults": 0.1,
    "filtered_relation": 0.5,
    "fixtures": 2.2,
    "fixtures_regress": 1.2,
    "force_insert_update": 0.2,
    "foreign_object": 1.3,
    "from_db_value": 0.1,
    "generic_relations": 1.4,
    "generic_relations_regress": 0.4,
    "get_earliest_or_latest": 0.1,
    "get_object_or_404": 0.1,
    "get_or_create": 5.2,
    "handlers": 1,
    "known_related_objects": 0.1,
    "lookup": 1.8,
    "m2m_recursive": 0.1,
    "m2m_regress": 0.2,
    "m2m_signals": 0.3,
    "m2m_through": 0.7,
    "many_to_many": 1,
    "many_to_one": 0.6,
    "many_to_one_null": 0.1,
    "model_fields": 4.2,
    "model_forms": 1.8,
    "model_formsets": 1.6,
    "model_inheritance": 0.6,
    "model_inheritance_regress": 0.3,
    "model_regress": 0.3,
    "multiple_database": 1.8,
    "null_fk": 0.1,
    "null_queries": 0.1,
    "one_to_one": 0.4,
    "order_with_respect_to": 0.7,
    "ordering": 0.4,
    "pagination": 0.2,
    "postgres_tests": 13,
    "prefetch_related": 3.5,
    "proxy_models": 0.4,
    "queries": 11,
    "queryset_pickle": 0.2,
    "raw_query": 0.2,
    "select_for_update": 7.6,
    "select_related": 1.4,
    "select_related_onetoone": 0.3,
    "select_related_regress": 0.2,
    "servers": 19,
    "sessions_tests": 4.3,
    "signals": 3.6,
    "test_client": 4,
    "test_utils": 1.4,
    "timezones": 1.8,
    "transaction_hooks": 1.3,
    "transactions": 3.6,
    "update": 0.5,
    "update_only_fields": 0.7,
}
# The apps closest to what the bridge changes: connections, transactions, async.
QUICK_APPS = (
    "asgi",
    "async",
    "backends",
    "basic",
    "select_for_update",
    "signals",
    "test_utils",
    "transaction_hooks",
    "transactions",
)

# Where asgiref's sync_to_async() was called for database work that then ran in a
# worker thread. Django's own code that runs *sync* user code (a sync view or
# middleware under ASGI, a user_passes_test() function) hops to a thread by
# design, on both backends; a hop asked for by a test's own sync_to_async() is
# the test's choice. Any other hop under our ENGINE is a Django async API
# (aget(), asave() ...) that the bridge should serve and did not.
SYNC_CODE_ORIGINS = frozenset(
    {
        "django/contrib/auth/decorators.py",
        "django/contrib/staticfiles/handlers.py",
        "django/core/handlers/asgi.py",
        "django/core/handlers/base.py",
        "django/core/handlers/exception.py",
        "django/http/response.py",
        "django/test/client.py",
        "django/utils/deprecation.py",
    }
)
PROBE_COLUMNS = (
    "bridge",
    "thread-hop (async API)",
    "thread-hop (sync code)",
    "thread-hop (test code)",
    "loop-unbridged",
    "thread",
    "sync",
)
VIOLATION_KINDS = frozenset(
    {"thread-hop (async API)", "thread-hop (django-async-db)", "thread-hop (other)"}
)
# Async APIs known to hop to a thread on our ENGINE too, by origin, with the reason.
KNOWN_THREAD_HOPS: dict[str, str] = {
    "django/core/cache/backends/base.py": (
        "`DatabaseCache`'s async methods (`aget()`, `aset()`, `aget_or_set()`, `ahas_key()`, "
        "`aincr()` ...) are `BaseCache`'s, which call asgiref's `sync_to_async()` from "
        "`django/core/cache/backends/base.py`. The package does not re-point that module: "
        "it serves every cache backend, and bridging it would run Redis, memcached or file "
        "I/O on the event loop. So the database cache's async methods behave as in stock "
        "Django: a worker thread, that thread's connection, outside the calling task's "
        "transaction. Serving them natively needs `DatabaseCache`-specific `a*` methods "
        "that use the bridge when the cache table's alias is on this ENGINE."
    ),
}

# Differences that are bugs in django-async-db: explained here (and in the docs),
# but they still fail the run until they are fixed.
OPEN_BUGS: dict[str, str] = {}

# Differences between the stock backend and ours that are limitations by design,
# each with its reason. A key is a test id or an fnmatch pattern (as in OPEN_BUGS);
# a difference listed here does not fail the run. Bugs go to OPEN_BUGS instead.
KNOWN_DIFFERENCES: dict[str, str] = {}

# How a test outcome sorts when merging several reports for one test.
_SEVERITY = {
    "hang": 6,
    "error": 5,
    "failure": 4,
    "xpass": 3,
    "success": 2,
    "xfail": 1,
    "skip": 0,
}
BAD = frozenset({"error", "failure", "xpass", "hang", "not run"})


def info(message: str) -> None:
    """Print one progress line to stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class SuiteError(Exception):
    """Setup failed; the message is shown to the user (exit status 2)."""


# --------------------------------------------------------------------------
# The Django sdist


def django_version() -> str:
    """Return the version of the Django installed for this interpreter."""
    try:
        return importlib.metadata.version("django")
    except importlib.metadata.PackageNotFoundError:
        raise SuiteError(
            f"Django is not installed for {sys.executable}; run this script with the "
            f"virtual environment's Python (./dev django-suite does)."
        ) from None


def ensure_sdist(version: str) -> Path:
    """Return Django's ``tests/`` directory for ``version``, downloading it once."""
    tests = SDIST_CACHE / f"django-{version}" / "tests"
    if (tests / "runtests.py").is_file():
        return tests
    SDIST_CACHE.mkdir(parents=True, exist_ok=True)
    archive = next(iter(sorted(SDIST_CACHE.glob(f"[dD]jango-{version}.tar.gz"))), None)
    if archive is None:
        info(f"downloading the Django {version} sdist into {SDIST_CACHE.relative_to(ROOT)}/")
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        cmd += ["--quiet", "--dest", str(SDIST_CACHE), f"django=={version}"]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise SuiteError(f"`{' '.join(cmd)}` failed (see pip's output above).")
        archive = next(iter(sorted(SDIST_CACHE.glob(f"[dD]jango-{version}.tar.gz"))), None)
        if archive is None:
            raise SuiteError(f"pip downloaded no django-{version}.tar.gz into {SDIST_CACHE}.")
    info(f"extracting {archive.name}")
    with tempfile.TemporaryDirectory(dir=SDIST_CACHE) as tmp, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(tmp)
        (top,) = Path(tmp).iterdir()
        if not (top / "tests" / "runtests.py").is_file():
            raise SuiteError(f"{archive.name} has no tests/runtests.py.")
        try:
            top.rename(tests.parent)
        except OSError:  # another run extracted it meanwhile
            if not (tests / "runtests.py").is_file():
                raise
    return tests


# --------------------------------------------------------------------------
# Generated modules: settings per shard, and the runner they name


def database_settings(url: str) -> dict[str, str]:
    """Return Django connection settings for a ``postgresql://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise SuiteError(f"DATABASE_URL must be a postgresql:// URL, not {url!r}.")
    return {
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


SETTINGS_TEMPLATE = '''\
"""Settings for Django's runtests.py, written by scripts/django_suite.py.

Run {run_id}, {backend} backend ({engine}), shard {shard}.
"""

import sys

# runtests.py replaces INSTALLED_APPS with its ALWAYS_INSTALLED_APPS plus the
# test apps, after this module is imported: add the package's app there.
_runtests = sys.modules.get("__main__")
_always = getattr(_runtests, "ALWAYS_INSTALLED_APPS", None)
EXTRA_APPS = {extra_apps!r}
if isinstance(_always, list):
    _always.extend(app for app in EXTRA_APPS if app not in _always)

# The suite's own defaults for this Django version (SECRET_KEY, PASSWORD_HASHERS,
# USE_TZ, DEFAULT_AUTO_FIELD ...), with only the databases and the runner changed.
from test_sqlite import *  # noqa: E402, F403

DATABASES = {databases!r}
TEST_RUNNER = "djsuite_support.Runner"
'''

SUPPORT_MODULE = '''\
"""Test runner for Django's runtests.py, written by scripts/django_suite.py.

Writes one JSON line per event to $DJSUITE_RESULTS: each test's start and
outcome, and, per test, where its database work ran (see probe_mode()).
"""

import asyncio
import faulthandler
import inspect
import json
import os
import resource
import sys
import threading
import time
import unittest

import asgiref.sync
import django
from django.test.runner import DiscoverRunner

RESULTS = os.environ["DJSUITE_RESULTS"]
BACKEND = os.environ["DJSUITE_BACKEND"]
TEST_TIMEOUT = float(os.environ.get("DJSUITE_TEST_TIMEOUT", "300"))
OURS = "django_async_db.backends.postgresql"
RUNTESTS_DIR = os.path.dirname(os.path.abspath(sys.modules["__main__"].__file__))
DJANGO_DIR = os.path.dirname(os.path.abspath(django.__file__))
ASGIREF_SYNC = asgiref.sync.__file__
# bridged_sync_to_async() creates asgiref's SyncToAsync for its fallback: skip it.
ORM_MODULE = os.path.join("django_async_db", "_orm.py")

_out = open(RESULTS, "a", encoding="utf-8")  # noqa: SIM115 - for the process' life
_current = None  # id of the running test
_counts = {}  # probe counts of the running test, or outside tests
_outside = {}


def emit(event, **data):
    data["e"] = event
    data["t"] = time.time()
    _out.write(json.dumps(data, default=str) + "\\n")
    _out.flush()


def _origin(filename):
    """Name the file that created a SyncToAsync: tests/..., django/..., django_async_db/..."""
    for marker, prefix in (
        (RUNTESTS_DIR + os.sep, "tests/"),
        (DJANGO_DIR + os.sep, "django/"),
        (os.sep + "django_async_db" + os.sep, "django_async_db/"),
    ):
        if marker in filename:
            return prefix + filename.split(marker, 1)[1].replace(os.sep, "/")
    return filename


def probe_mode():
    """Say where the current database call runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        bridge = sys.modules.get("django_async_db._bridge")
        return "bridge" if bridge is not None and bridge.in_bridge() else "loop-unbridged"
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "thread_handler" and code.co_filename == ASGIREF_SYNC:
            # asgiref's SyncToAsync runs the function here: who asked for the hop?
            origin = getattr(frame.f_locals.get("self"), "djsuite_origin", "?")
            return "thread-hop " + origin
        frame = frame.f_back
    if threading.current_thread() is not threading.main_thread():
        return "thread"
    return "sync"


def install_probe():
    from asgiref import sync

    init = sync.SyncToAsync.__init__
    if not getattr(init, "djsuite_probe", False):

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename == ASGIREF_SYNC
                or frame.f_code.co_filename.endswith(ORM_MODULE)
            ):
                frame = frame.f_back
            self.djsuite_origin = _origin(frame.f_code.co_filename) if frame else "?"

        __init__.djsuite_probe = True
        sync.SyncToAsync.__init__ = __init__

    from django.db.backends import utils

    original = utils.CursorWrapper._execute_with_wrappers
    if getattr(original, "djsuite_probe", False):
        return

    def _execute_with_wrappers(self, sql, params, many, executor):
        counts = _counts if _current is not None else _outside
        mode = probe_mode()
        counts[mode] = counts.get(mode, 0) + 1
        return original(self, sql, params, many, executor)

    _execute_with_wrappers.djsuite_probe = True
    utils.CursorWrapper._execute_with_wrappers = _execute_with_wrappers


def check_setup():
    """Fail the run at once if our ENGINE's run is not what it claims to be."""
    from django.apps import apps
    from django.conf import settings
    from django.db.models import query

    engines = sorted({db["ENGINE"] for db in settings.DATABASES.values()})
    bridged = getattr(query.sync_to_async, "__name__", "") == "bridged_sync_to_async"
    installed = apps.is_installed("django_async_db")
    if BACKEND == "ours" and not (engines == [OURS] and installed and bridged):
        raise RuntimeError(
            f"django-suite: the run is not on django-async-db: ENGINEs {engines}, "
            f"app installed {installed}, ORM bridged {bridged}."
        )
    if BACKEND == "stock" and (OURS in engines or installed or bridged):
        raise RuntimeError("django-suite: the stock run has django-async-db in it.")
    return {"engines": engines, "app_installed": installed, "orm_bridged": bridged}


def _is_async(test):
    method = getattr(type(test), getattr(test, "_testMethodName", ""), None)
    if method is None:
        return False
    return inspect.iscoroutinefunction(method) or hasattr(method, "awaitable")


class Result(unittest.TextTestResult):
    """unittest's text result, also recording every outcome as JSON lines."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._records = {}

    def _arm(self):
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=sys.stderr)

    def _record(self, test, outcome, err=None, detail=None):
        test_id = test.id()
        if err is not None:
            detail = self._exc_info_to_string(err, test)
            if len(detail) > 6000:
                detail = detail[:2000] + "\\n[...]\\n" + detail[-4000:]
        record = self._records.get(test_id)
        if record is None:  # not started: a class or module fixture, or _pre_setup
            emit("stop", id=test_id, outcome=outcome, detail=detail, probe={}, started=False)
            return
        old = record.get("outcome")
        order = ["skip", "xfail", "success", "xpass", "failure", "error"]
        if old is None or order.index(outcome) >= order.index(old):
            record["outcome"] = outcome
            if detail is not None:
                record["detail"] = detail

    def startTest(self, test):
        global _current, _counts
        self._arm()
        _current, _counts = test.id(), {}
        self._records[test.id()] = {}
        emit("start", id=test.id())
        super().startTest(test)

    def stopTest(self, test):
        global _current
        super().stopTest(test)
        record = self._records.pop(test.id(), {})
        emit(
            "stop",
            id=test.id(),
            outcome=record.get("outcome") or "success",
            detail=record.get("detail"),
            probe=_counts,
            is_async=_is_async(test),
        )
        _current = None
        self._arm()

    def stopTestRun(self):
        faulthandler.cancel_dump_traceback_later()
        super().stopTestRun()

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "success")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "failure", err)

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skip", detail=reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "xfail")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "xpass")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(test, "failure" if failed else "error", err)


class Runner(DiscoverRunner):
    """Django's runner with the JSON result, the probe and a per-test watchdog."""

    def get_resultclass(self):
        return Result

    def setup_test_environment(self, **kwargs):
        super().setup_test_environment(**kwargs)
        emit(
            "begin",
            backend=BACKEND,
            django=django.get_version(),
            django_path=os.path.dirname(django.__file__),
            python=sys.version.split()[0],
            **check_setup(),
        )
        install_probe()

    def setup_databases(self, **kwargs):
        faulthandler.dump_traceback_later(TEST_TIMEOUT * 2, exit=True, file=sys.stderr)
        try:
            return super().setup_databases(**kwargs)
        finally:
            faulthandler.cancel_dump_traceback_later()
            emit("dbready")

    def teardown_databases(self, old_config, **kwargs):
        emit("tests_done", outside_probe=_outside)
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=sys.stderr)
        try:
            super().teardown_databases(old_config, **kwargs)
        finally:
            faulthandler.cancel_dump_traceback_later()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        emit(
            "end",
            cpu=usage.ru_utime + usage.ru_stime,
            threads=sorted(t.name for t in threading.enumerate()),
        )
'''


# --------------------------------------------------------------------------
# Running the shards


@dataclass
class Shard:
    """One runtests.py process: a backend and part of the app list."""

    backend: str
    index: int | str
    labels: list[str]
    run_dir: Path
    db_names: tuple[str, str] = ("", "")
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    finished: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    read_offset: int = 0
    done_tests: int = 0
    bad_tests: int = 0

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.index}"

    @property
    def results(self) -> Path:
        return self.run_dir / f"{self.name}.jsonl"

    @property
    def log(self) -> Path:
        return self.run_dir / f"{self.name}.log"


def label_weight(label: str) -> float:
    """Return the expected seconds of a label (for balancing shards)."""
    if label in DEFAULT_APPS:
        return DEFAULT_APPS[label]
    return DEFAULT_APPS.get(label.split(".")[0], 10.0)


def split_labels(labels: list[str], shards: int) -> list[list[str]]:
    """Split ``labels`` into ``shards`` lists of about equal expected time."""
    shards = max(1, min(shards, len(labels)))
    heap = [(0.0, i, []) for i in range(shards)]
    for label in sorted(labels, key=lambda label: -label_weight(label)):
        total, i, group = heapq.heappop(heap)
        group.append(label)
        heapq.heappush(heap, (total + label_weight(label), i, group))
    return [sorted(group) for _, _, group in sorted(heap, key=lambda item: item[1]) if group]


# --asgi-handler: every ASGIHandler the suite builds is django_async_db.asgi's.
ASGI_HANDLER_SETTINGS = """
import django.core.asgi
import django.core.handlers.asgi
import django_async_db.asgi

django.core.handlers.asgi.ASGIHandler = django_async_db.asgi.ASGIHandler
django.core.asgi.ASGIHandler = django_async_db.asgi.ASGIHandler
django.core.asgi.get_asgi_application = django_async_db.asgi.get_asgi_application
"""


def write_shard_modules(
    shard: Shard, run_id: str, db: dict[str, str], *, asgi_handler: bool = False
) -> None:
    """Write the settings module of ``shard`` (and the shared runner once)."""
    support = shard.run_dir / "djsuite_support.py"
    if not support.exists():
        support.write_text(SUPPORT_MODULE, encoding="utf-8")
    engine = BACKENDS[shard.backend]
    base = f"test_djsuite_{run_id}_{shard.backend[0]}{shard.index}"
    shard.db_names = (base, f"{base}_other")
    databases = {
        alias: {**db, "ENGINE": engine, "TEST": {"NAME": name}}
        for alias, name in zip(("default", "other"), shard.db_names, strict=True)
    }
    extra_apps = ["django_async_db"] if shard.backend == "ours" else []
    text = SETTINGS_TEMPLATE.format(
        run_id=run_id,
        backend=shard.backend,
        engine=engine,
        shard=shard.index,
        extra_apps=extra_apps,
        databases=databases,
    )
    if asgi_handler and shard.backend == "ours":
        text += ASGI_HANDLER_SETTINGS
    (shard.run_dir / f"djsuite_settings_{shard.name.replace('-', '_')}.py").write_text(
        text, encoding="utf-8"
    )


def start_shard(shard: Shard, tests_dir: Path, extra_args: list[str], timeout: float) -> None:
    """Start ``runtests.py`` for ``shard`` in the background."""
    settings = f"djsuite_settings_{shard.name.replace('-', '_')}"
    cmd = [sys.executable, "-X", "faulthandler", "runtests.py", f"--settings={settings}"]
    cmd += ["--parallel=1", "--noinput", "--verbosity=1", *extra_args, *shard.labels]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shard.run_dir), env.get("PYTHONPATH")]))
    env["DJSUITE_RESULTS"] = str(shard.results)
    env["DJSUITE_BACKEND"] = shard.backend
    env["DJSUITE_TEST_TIMEOUT"] = str(timeout)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    shard.results.write_text("", encoding="utf-8")
    with shard.log.open("wb") as log:
        log.write(f"$ cd {tests_dir} && {' '.join(cmd)}\n".encode())
        log.flush()
        shard.proc = subprocess.Popen(
            cmd, cwd=tests_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    shard.started = time.monotonic()


def poll_progress(shard: Shard) -> str | None:
    """Read new result lines of ``shard``; return the id of the last finished test."""
    last = None
    try:
        with shard.results.open("rb") as fh:
            fh.seek(shard.read_offset)
            data = fh.read()
    except FileNotFoundError:
        return None
    end = data.rfind(b"\n") + 1
    shard.read_offset += end
    for line in data[:end].splitlines():
        event = json.loads(line)
        if event["e"] == "stop":
            shard.done_tests += 1
            shard.bad_tests += event["outcome"] in BAD
            last = event["id"]
    return last


def finished_cleanly(shard: Shard) -> bool:
    """Return True if the shard's runner got to the end (its test databases are gone)."""
    try:
        return b'"e": "end"' in shard.results.read_bytes()
    except FileNotFoundError:
        return False


def drop_databases(names: list[str], url: str) -> None:
    """Drop test databases a killed shard left behind (needs psycopg)."""
    try:
        import psycopg
    except ImportError:
        info(f"psycopg is not importable: drop these databases by hand: {', '.join(names)}")
        return
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error as exc:
        info(f"could not drop {', '.join(names)}: {exc}")


def run_shards(
    shards: list[Shard],
    tests_dir: Path,
    extra_args: list[str],
    *,
    jobs: int,
    test_timeout: float,
    shard_timeout: float,
    url: str,
) -> None:
    """Run ``shards``, ``jobs`` at a time, in order; print progress every minute."""
    pending = list(shards)
    running: list[Shard] = []
    last_report = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                shard = pending.pop(0)
                info(f"[{shard.name}] runtests.py {' '.join(shard.labels)}")
                start_shard(shard, tests_dir, extra_args, test_timeout)
                running.append(shard)
            time.sleep(0.5)
            now = time.monotonic()
            report = now - last_report >= 60
            for shard in list(running):
                assert shard.proc is not None
                last = poll_progress(shard)
                if report:
                    info(
                        f"[{shard.name}] {shard.done_tests} tests done, {shard.bad_tests} "
                        f"failed, {now - shard.started:.0f} s; last: {last or '-'}"
                    )
                if shard.proc.poll() is None and now - shard.started > shard_timeout:
                    info(f"[{shard.name}] still running after {shard_timeout:.0f} s: killing it")
                    shard.timed_out = True
                    os.killpg(shard.proc.pid, signal.SIGKILL)
                    shard.proc.wait()
                if shard.proc.poll() is not None:
                    shard.returncode = shard.proc.returncode
                    shard.finished = now
                    poll_progress(shard)
                    running.remove(shard)
                    info(
                        f"[{shard.name}] exit {shard.returncode} after "
                        f"{shard.finished - shard.started:.0f} s: {shard.done_tests} tests, "
                        f"{shard.bad_tests} failed"
                    )
                    if shard.timed_out or not finished_cleanly(shard):
                        drop_databases(list(shard.db_names), url)
            if report:
                last_report = now
    finally:
        for shard in running:
            if shard.proc is not None and shard.proc.poll() is None:
                os.killpg(shard.proc.pid, signal.SIGKILL)
                shard.proc.wait()
                drop_databases(list(shard.db_names), url)


# --------------------------------------------------------------------------
# Results


def app_of(test_id: str) -> str:
    """Return the test app of a test id (also of 'setUpClass (app.tests.Class)')."""
    if test_id.endswith(")") and " (" in test_id:
        test_id = test_id[test_id.index(" (") + 2 : -1]
    return test_id.split(".")[0]


@dataclass
class BackendResult:
    """Every test's outcome for one backend, merged over its shards."""

    backend: str
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    app_time: dict[str, float] = field(default_factory=dict)
    setup_time: float = 0.0
    wall_time: float = 0.0
    cpu_time: float = 0.0
    probe_outside: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackendResult:
        return cls(**data)


def collect(backend: str, shards: list[Shard]) -> BackendResult:
    """Merge the JSON lines of ``backend``'s shards into one result."""
    result = BackendResult(backend)
    for shard in shards:
        if shard.backend != backend:
            continue
        result.wall_time = max(result.wall_time, shard.finished - shard.started)
        events = []
        if shard.results.exists():
            for line in shard.results.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                    events.append(json.loads(line))
        kinds = {e["e"] for e in events}
        prev = begin = None
        running = None
        for event in events:
            kind = event["e"]
            if kind == "begin":
                result.meta = {k: v for k, v in event.items() if k not in {"e", "t"}}
                prev = event["t"]
                begin = event["t"]
            elif kind == "dbready":
                if begin is not None:
                    result.setup_time = max(result.setup_time, event["t"] - begin)
                prev = event["t"]
            elif kind == "start":
                running = event["id"]
            elif kind == "stop":
                running = None
                record = dict(event)
                record.pop("e")
                record["time"] = round(event["t"] - prev, 3) if prev else 0.0
                if event.get("started", True):
                    prev = event["t"]
                app = app_of(event["id"])
                result.app_time[app] = result.app_time.get(app, 0.0) + record["time"]
                old = result.tests.get(event["id"])
                if old is None or _SEVERITY[record["outcome"]] > _SEVERITY[old["outcome"]]:
                    result.tests[event["id"]] = record
            elif kind == "end":
                result.cpu_time += event.get("cpu", 0.0)
            elif kind == "tests_done":
                for mode, n in event["outside_probe"].items():
                    result.probe_outside[mode] = result.probe_outside.get(mode, 0) + n
        tail = _log_tail(shard.log)
        if running is not None:
            reason = (
                f"killed after {shard.finished - shard.started:.0f} s"
                if shard.timed_out
                else "no outcome within the per-test timeout"
            )
            result.tests[running] = {
                "id": running,
                "outcome": "hang",
                "detail": f"{reason}; the rest of shard {shard.name} did not run.\n{tail}",
                "probe": {},
                "time": 0.0,
            }
            result.problems.append(f"shard {shard.name} hung in {running} (log: {shard.log})")
        elif "end" not in kinds:
            result.problems.append(
                f"shard {shard.name} ended early with exit status {shard.returncode} "
                f"(log: {shard.log}):\n{tail}"
            )
    return result


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def app_rows(result: BackendResult) -> dict[str, dict[str, float]]:
    """Return per-app counts: run, failures, errors, skips, time."""
    rows: dict[str, dict[str, float]] = {}
    for test_id, record in result.tests.items():
        row = rows.setdefault(
            app_of(test_id), {"run": 0, "failures": 0, "errors": 0, "skips": 0, "time": 0.0}
        )
        outcome = record["outcome"]
        if record.get("started", True):
            row["run"] += 1
        if outcome in {"failure", "xpass"}:
            row["failures"] += 1
        elif outcome in {"error", "hang"}:
            row["errors"] += 1
        elif outcome == "skip":
            row["skips"] += 1
    for app, seconds in result.app_time.items():
        rows.setdefault(app, {"run": 0, "failures": 0, "errors": 0, "skips": 0, "time": 0.0})
        rows[app]["time"] = seconds
    return rows


def probe_kind(mode: str) -> str:
    """Group a probe mode: 'thread-hop django/db/models/query.py' -> 'thread-hop (async API)'."""
    if not mode.startswith("thread-hop "):
        return mode
    origin = mode.split(" ", 1)[1]
    if origin.startswith("tests/"):
        return "thread-hop (test code)"
    if origin in SYNC_CODE_ORIGINS:
        return "thread-hop (sync code)"
    if origin.startswith("django/"):
        return "thread-hop (async API)"
    if origin.startswith("django_async_db/"):
        return "thread-hop (django-async-db)"
    return "thread-hop (other)"


def probe_totals(result: BackendResult) -> dict[str, dict[str, int]]:
    """Return database calls per kind: in async tests, in sync tests, outside tests."""
    totals: dict[str, dict[str, int]] = {"async tests": {}, "sync tests": {}, "outside tests": {}}
    for record in result.tests.values():
        probe = record.get("probe") or {}
        in_async = record.get("is_async") or any(m not in {"sync", "thread"} for m in probe)
        bucket = totals["async tests" if in_async else "sync tests"]
        for mode, n in probe.items():
            kind = probe_kind(mode)
            bucket[kind] = bucket.get(kind, 0) + n
    for mode, n in result.probe_outside.items():
        kind = probe_kind(mode)
        totals["outside tests"][kind] = totals["outside tests"].get(kind, 0) + n
    return totals


def probe_violations(result: BackendResult) -> list[tuple[str, dict[str, int], str | None]]:
    """Return tests with database work that left the loop thread, or ran on it unbridged.

    Each entry is (test id, {mode: calls}, documented reason or None).
    """
    found = []
    for test_id, record in sorted(result.tests.items()):
        bad = {
            mode: n
            for mode, n in (record.get("probe") or {}).items()
            if mode == "loop-unbridged" or probe_kind(mode) in VIOLATION_KINDS
        }
        if bad:
            reasons = {KNOWN_THREAD_HOPS.get(m.split(" ", 1)[-1]) for m in bad}
            reason = None if None in reasons else "; ".join(sorted(r for r in reasons if r))
            found.append((test_id, bad, reason))
    return found


def known_reason(test_id: str) -> str | None:
    """Return the documented reason for a difference in ``test_id``, if any."""
    for pattern, reason in KNOWN_DIFFERENCES.items():
        if _matches(pattern, test_id):
            return reason
    return None


def open_bug(test_id: str) -> str | None:
    """Return the explanation of an open bug that makes ``test_id`` differ, if any."""
    for pattern, reason in OPEN_BUGS.items():
        if _matches(pattern, test_id):
            return reason
    return None


def differences(stock: BackendResult, ours: BackendResult) -> list[dict[str, Any]]:
    """Return every test whose outcome differs between the two backends."""
    found = []
    for test_id in sorted(set(stock.tests) | set(ours.tests)):
        a = stock.tests.get(test_id, {"outcome": "not run"})
        b = ours.tests.get(test_id, {"outcome": "not run"})
        if a["outcome"] == b["outcome"]:
            continue
        regression = b["outcome"] in BAD and a["outcome"] not in BAD
        found.append(
            {
                "id": test_id,
                "stock": a["outcome"],
                "ours": b["outcome"],
                "regression": regression,
                "detail": b.get("detail") if b["outcome"] in BAD else a.get("detail"),
                "reason": known_reason(test_id),
                "bug": open_bug(test_id),
            }
        )
    return found


def fmt_time(seconds: float) -> str:
    """Format a duration as '42.1 s' or '3 min 05 s'."""
    if seconds < 100:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def text_table(results: dict[str, BackendResult]) -> str:
    """Return the side-by-side plain-text table of the backends' per-app results."""
    rows = {name: app_rows(r) for name, r in results.items()}
    apps = sorted(set().union(*(r.keys() for r in rows.values())))
    names = list(results)
    head = f"{'app':<22}" + "".join(
        f" | {name + ': run':>10} {'fail':>5} {'err':>4} {'skip':>5} {'time':>8}" for name in names
    )
    lines = [head, "-" * len(head)]
    empty = {"run": 0, "failures": 0, "errors": 0, "skips": 0, "time": 0.0}
    totals = {name: dict(empty) for name in names}
    for app in apps:
        line = f"{app:<22}"
        for name in names:
            row = rows[name].get(app, empty)
            for key in empty:
                totals[name][key] += row[key]
            line += (
                f" | {row['run']:>10} {row['failures']:>5} {row['errors']:>4} {row['skips']:>5}"
                f" {row['time']:>7.1f}s"
            )
        lines.append(line)
    lines.append("-" * len(head))
    line = f"{'total':<22}"
    for name in names:
        t = totals[name]
        line += (
            f" | {t['run']:>10} {t['failures']:>5} {t['errors']:>4} {t['skips']:>5}"
            f" {t['time']:>7.1f}s"
        )
    lines.append(line)
    for label, attr in (
        ("db setup", "setup_time"),
        ("wall clock", "wall_time"),
        ("runtests.py CPU", "cpu_time"),
    ):
        line = f"{label:<22}"
        for name in names:
            line += f" | {fmt_time(getattr(results[name], attr)):>35}"
        lines.append(line)
    return "\n".join(lines)


def report(
    results: dict[str, BackendResult], diffs: list[dict[str, Any]] | None, *, full: bool
) -> int:
    """Print tables, differences and probe counts; return the exit status."""
    status = 0
    print()
    print(text_table(results))
    print()
    print("Database calls by where they ran (probe on cursor.execute):")
    for name, result in results.items():
        for bucket, counts in probe_totals(result).items():
            shown = ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) or "none"
            print(f"  {name:<6} {bucket:<14} {shown}")
    if results:
        print("  (thread-hop: a sync_to_async() worker; its origin is the code that asked for it)")
    if "ours" in results:
        violations = probe_violations(results["ours"])
        for test_id, bad, why in violations:
            shown = ", ".join(f"{m} {n}" for m, n in bad.items())
            if why:
                print(f"  known (ours): {test_id}: {shown}")
            else:
                print(f"  PROBE VIOLATION (ours): {test_id}: {shown}")
                status = 1
        bridged = probe_totals(results["ours"])["async tests"].get("bridge", 0)
        ran_async = "async" in {app_of(t) for t in results["ours"].tests}
        if ran_async and bridged == 0:
            print("  PROBE VIOLATION (ours): no database call of an async test ran in a bridge")
            status = 1
    for result in results.values():
        for problem in result.problems:
            print(f"\nPROBLEM ({result.backend}): {problem}")
            status = 1
    if diffs is not None:
        print(f"\nTests whose outcome differs (stock -> ours): {len(diffs)}")
        for diff in diffs:
            if diff.get("confirmed") is False:
                rerun = diff["rerun"]
                print(
                    f"  [flaky] {diff['id']}: {diff['stock']} -> {diff['ours']}; "
                    f"rerun: {rerun['stock']} -> {rerun['ours']}"
                )
                detail = (diff.get("detail") or "").strip().splitlines()
                if detail:
                    print(f"      {detail[-1][:200]}")
                continue
            if diff["reason"]:
                tag = "known limitation"
            elif diff.get("bug"):
                tag = "OPEN BUG" if diff["regression"] else "open bug"
            else:
                tag = "REGRESSION" if diff["regression"] else "differs"
            print(f"  [{tag}] {diff['id']}: {diff['stock']} -> {diff['ours']}")
            if diff["regression"] and not diff["reason"]:
                status = 1
                detail = (diff.get("detail") or "").strip()
                if diff.get("bug"):
                    print(textwrap.indent(textwrap.fill(diff["bug"], 92), "      "))
                elif detail:
                    print(textwrap.indent(detail, "      "))
        listed = [*KNOWN_DIFFERENCES, *OPEN_BUGS]
        stale = [p for p in listed if not any(_matches(p, d["id"]) for d in diffs)]
        if stale and full:
            print("\nListed differences that did not occur (fixed, or not run):")
            for pattern in stale:
                print(f"  {pattern}")
    else:
        failing = [
            (name, t) for name, r in results.items() for t, rec in r.tests.items()
            if rec["outcome"] in BAD
        ]  # fmt: skip
        for name, test_id in failing:
            print(f"  [{name}] {test_id}: {results[name].tests[test_id]['outcome']}")
        status = status or int(bool(failing))
    return status


def _matches(pattern: str, test_id: str) -> bool:
    return test_id == pattern or fnmatch.fnmatchcase(test_id, pattern)


# --------------------------------------------------------------------------
# docs/compatibility.md


def series_of(version: str) -> str:
    """Return 'X.Y' for a Django version string."""
    return ".".join(version.split(".")[:2])


def markdown_tables(run: dict[str, Any]) -> str:
    """Return the markdown section of one stored run."""
    results = {name: BackendResult.from_json(data) for name, data in run["results"].items()}
    stock, ours = results["stock"], results["ours"]
    rows = {name: app_rows(r) for name, r in results.items()}
    apps = sorted(set(rows["stock"]) | set(rows["ours"]))
    empty = {"run": 0, "failures": 0, "errors": 0, "skips": 0, "time": 0.0}
    out = [
        f"Django {run['django']}, Python {run['python']}, PostgreSQL {run['postgresql']}, "
        f"psycopg {run['psycopg']}; run on {run['date']} with `--jobs {run['jobs']}` "
        f"({run['jobs']} serial runtests.py processes side by side per backend) on "
        f"{run.get('cpus', '?')} CPUs, load average {run.get('load', '?')} at the start "
        f"(the machine is shared); {fmt_time(run['total_time'])} in all.",
        "",
        "| app | stock: run | fail | err | skip | time | ours: run | fail | err | skip | time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = {name: dict(empty) for name in rows}
    for app in apps:
        cells = [app]
        for name in ("stock", "ours"):
            row = rows[name].get(app, empty)
            for key in empty:
                totals[name][key] += row[key]
            cells += [str(int(row[k])) for k in ("run", "failures", "errors", "skips")]
            cells.append(f"{row['time']:.1f} s")
        out.append("| " + " | ".join(cells) + " |")
    cells = ["**total**"]
    for name in ("stock", "ours"):
        t = totals[name]
        cells += [f"**{int(t[k])}**" for k in ("run", "failures", "errors", "skips")]
        cells.append(f"**{fmt_time(t['time'])}**")
    out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "| | stock | ours |",
        "|---|---:|---:|",
        f"| test database setup (per shard) | {fmt_time(stock.setup_time)} "
        f"| {fmt_time(ours.setup_time)} |",
        f"| wall clock (slowest shard) | {fmt_time(stock.wall_time)} "
        f"| {fmt_time(ours.wall_time)} |",
        f"| CPU of the runtests.py processes (all shards) | {fmt_time(stock.cpu_time)} "
        f"| {fmt_time(ours.cpu_time)} |",
        "",
        "Where database work ran (`cursor.execute()` calls counted by the probe):",
        "",
        "| backend | calls made in | " + " | ".join(PROBE_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(PROBE_COLUMNS),
    ]
    for name, result in (("stock", stock), ("ours", ours)):
        for bucket, counts in probe_totals(result).items():
            cells = [name, bucket] + [str(counts.get(m, 0)) for m in PROBE_COLUMNS]
            out.append("| " + " | ".join(cells) + " |")
    hops = probe_violations(ours)
    if hops:
        by_origin: dict[str, list[str]] = {}
        for test_id, bad, _why in hops:
            for mode, n in bad.items():
                by_origin.setdefault(mode.removeprefix("thread-hop "), []).append(
                    f"`{test_id}` ({n})"
                )
        out += [
            "",
            "Database calls that, on our ENGINE, left the loop thread through a Django async "
            "API, by the file that called `sync_to_async()` (calls per test in brackets):",
            "",
        ]
        for origin, tests in sorted(by_origin.items()):
            known = (
                "known limitation, see [Known limitations](#known-limitations)"
                if origin in KNOWN_THREAD_HOPS
                else "**not expected**"
            )
            out.append(f"- `{origin}`: {known}; {', '.join(tests)}.")
    diffs = run["differences"]
    out += ["", f"Tests whose outcome differs: {len(diffs)}."]
    if diffs:
        out += ["", "| test | stock | ours | reason |", "|---|---|---|---|"]
        for diff in diffs:
            # Explanations come from this script as it is now, not as it was when run.
            diff = {**diff, "reason": known_reason(diff["id"]), "bug": open_bug(diff["id"])}
            if diff.get("confirmed") is False:
                last = ((diff.get("detail") or "").strip().splitlines() or [""])[-1][:160]
                reason = (
                    f"flaky: not repeated when rerun ({diff['rerun']['stock']} / "
                    f"{diff['rerun']['ours']})" + (f"; first run: `{last}`" if last else "")
                )
            elif diff["reason"]:
                reason = "known limitation: " + diff["reason"]
            elif diff.get("bug"):
                reason = "**open bug**, see [Open bugs](#open-bugs)"
            else:
                reason = "**not explained yet**"
            out.append(
                f"| `{diff['id']}` | {diff['stock']} | {diff['ours']} | "
                f"{reason.replace('|', '/')} |"
            )
    return "\n".join(out)


def write_docs(runs: dict[str, dict[str, Any]]) -> None:
    """Write docs/compatibility.md from the stored run of each Django series."""
    parts = [
        "# Compatibility with Django's own test suite",
        "",
        "<!-- Generated by `scripts/django_suite.py --docs`; edit the script, not this file. -->",
        "",
        "Django's own tests for the ORM, transactions, the backend and every async API that",
        "touches the database run on this package's ENGINE",
        "(`django_async_db.backends.postgresql`, with `django_async_db` in `INSTALLED_APPS`)",
        "and, for comparison, on Django's stock `django.db.backends.postgresql`, against the",
        "same PostgreSQL server:",
        "",
        "```console",
        "./dev django-suite                  # newest target (Django 6.1), both backends",
        "./dev django-suite --lts            # LTS target (Django 5.2)",
        "./dev django-suite --quick          # asgi async backends basic select_for_update",
        "                                    # signals test_utils transaction_hooks transactions",
        "./dev django-suite --apps basic queries.test_q",
        "./dev django-suite --docs           # also rewrite this page",
        "```",
        "",
        "`scripts/django_suite.py` downloads the sdist of the installed Django for its",
        "`tests/` directory and runs `tests/runtests.py --parallel=1` with generated settings",
        "(the suite's own defaults, test database names unique to the run), split into",
        "`--jobs` shards per backend (2 by default). A custom test runner records each",
        "test's outcome; differing tests run once more on both backends, and a difference",
        "that does not repeat is reported as flaky. The run fails when a test fails or",
        "errors on our ENGINE but not on the stock one, unless it is a known limitation",
        "below, and when a shard crashes or hangs.",
        "",
        "**Where the database work runs.** A probe classifies every `cursor.execute()`:",
        "",
        "- `bridge`: on the event loop's thread, inside a django-async-db greenlet (the",
        "  async path);",
        "- `thread-hop`: in a worker of asgiref's `sync_to_async()` (stock Django's async",
        "  path), grouped by the code that asked for the hop: a Django async API (`aget()`,",
        "  `asave()`, `aauthenticate()` ...), Django running *sync* code under ASGI (sync",
        "  views and middleware, `user_passes_test()` functions), or the test itself;",
        "- `loop-unbridged`: on a thread with a running loop, outside a bridge (it would",
        "  block the loop);",
        "- `thread`: in another thread (the tests' own threads, live servers); `sync`:",
        "  plain sync code.",
        "",
        "On our ENGINE a `loop-unbridged` call, or a thread hop asked for by a Django async",
        "API, fails the run unless it is a known limitation.",
        "",
        "**Apps.** Everything the backend or the ORM integration touches: queries,",
        "relations, expressions, transactions, `select_for_update`, the backend tests,",
        "`postgres_tests`, async, ASGI and signals, sessions, the async parts of auth, the",
        "database cache, multiple databases, fixtures, the test-case machinery and live",
        "servers. Left out: DDL (`migrations`, `schema`, `introspection`, `inspectdb`),",
        "which runs outside any event loop, where this ENGINE *is* the stock backend; and",
        "slow tests that never reach the database (password hashers, file and memcached",
        "caches). The labels:",
        "",
        ", ".join(f"`{app}`" for app in DEFAULT_APPS) + ".",
        "",
        "Times per app are the time from the end of the previous test to the end of the",
        "app's test, so class-level setup is included; shards run side by side on a",
        "shared machine, so compare them between backends within one run only.",
        "",
    ]
    for series in sorted(runs, key=lambda s: [int(x) for x in s.split(".")], reverse=True):
        parts += [f"## Django {series}", "", markdown_tables(runs[series]), ""]
    parts += [
        "## Known limitations",
        "",
        "Differences by design; they do not fail the run.",
        "",
    ]
    for pattern, reason in KNOWN_DIFFERENCES.items():
        parts += [f"- `{pattern}`: {reason}", ""]
    for origin, reason in KNOWN_THREAD_HOPS.items():
        parts += [f"- Thread hops from `{origin}`: {reason}", ""]
    if not KNOWN_DIFFERENCES and not KNOWN_THREAD_HOPS:
        parts += ["None.", ""]
    parts += [
        "## Open bugs",
        "",
        "Differences that are bugs in django-async-db. They fail the run until fixed.",
        "",
    ]
    for pattern, reason in OPEN_BUGS.items():
        parts += [f"- `{pattern}`: {reason}", ""]
    if not OPEN_BUGS:
        parts += ["None.", ""]
    parts += [
        "## Bugs this comparison found (fixed)",
        "",
        "- `backends.postgresql.tests.Tests.test_nodb_cursor*`: the backend copied Django's "
        "`@async_unsafe` methods onto its subclass at import time, so later patches of "
        "`BaseDatabaseWrapper` (these tests' mocks, error trackers wrapping `connect`/`cursor`) "
        "never reached it. Django's guards are now left in place and only the "
        "`get_running_loop` they consult is bridge-aware (docs/design.md).",
        "- `test_utils.tests.AssertNumQueriesUponConnectionTests."
        "test_ignores_connection_configuration_queries`: an `ensure_connection` override broke "
        "a `MagicMock` patch of the base method; the override is gone (same fix).",
        "- `asgi.tests.ASGITest.test_asyncio_cancel_error`, `test_request_lifecycle_signals_"
        "dispatched_with_thread_sensitive`, `test_cancel_post_request_with_sync_processing`: "
        "`Signal.asend()` ran `request_started`/`request_finished` receivers on the loop; they "
        "run in Django's thread-sensitive worker again (other signals' sync receivers stay in "
        "the bridge, in the sender's task).",
        "",
    ]
    DOCS.write_text("\n".join(parts).rstrip() + "\n", encoding="utf-8")
    info(f"wrote {DOCS.relative_to(ROOT)}")


def server_version(url: str) -> str:
    """Return the PostgreSQL server version, or '?'."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=10) as conn:
            return conn.execute("SHOW server_version").fetchone()[0].split()[0]  # type: ignore[index]
    except Exception:
        return "?"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="django_suite.py",
        description="Run Django's own test suite on django-async-db's ENGINE and on the "
        "stock one, and compare.",
        epilog="Arguments after -- go to runtests.py (e.g. -- -k savepoint).",
    )
    parser.add_argument(
        "--apps",
        nargs="+",
        metavar="LABEL",
        help="test apps or labels (app.module.Class.test); default: the built-in DB list",
    )
    parser.add_argument("--quick", action="store_true", help="only " + ", ".join(QUICK_APPS))
    parser.add_argument(
        "--backends",
        default="stock,ours",
        help="comma-separated: stock, ours (default: both, stock first)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="runtests.py processes side by side (default 2)"
    )
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=300,
        help="seconds one test may take before its shard is stopped (default 300)",
    )
    parser.add_argument(
        "--shard-timeout",
        type=float,
        default=3600,
        help="seconds one runtests.py process may take (default 3600)",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="write docs/compatibility.md from this run and the stored one of the other "
        "Django series",
    )
    parser.add_argument(
        "--no-rerun",
        action="store_true",
        help="do not run differing tests a second time to filter out flaky ones",
    )
    parser.add_argument(
        "--asgi-handler",
        action="store_true",
        help="on our ENGINE, replace Django's ASGIHandler with django_async_db.asgi's",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="only rewrite docs/compatibility.md from the stored results",
    )
    args = parser.parse_args(argv)
    if args.apps and args.quick:
        parser.error("--apps and --quick are mutually exclusive")
    args.apps = [a for item in (args.apps or []) for a in item.replace(",", " ").split()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        parser.error("--backends takes stock, ours or stock,ours")
    args.backends = backends
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args, extra


def rerun_differences(
    diffs: list[dict[str, Any]],
    run_dir: Path,
    run_id: str,
    db: dict[str, str],
    tests_dir: Path,
    extra: list[str],
    args: argparse.Namespace,
    url: str,
) -> None:
    """Run the differing tests again on both backends; mark the ones that do not repeat.

    The server is shared: a test can fail once for reasons of its own (``too many
    clients already`` while someone else's benchmark holds the connections). A
    difference counts when the rerun shows it again; one that does not is reported
    as flaky and does not fail the run.
    """
    labels = sorted(
        {
            d["id"][d["id"].index(" (") + 2 : -1] if d["id"].endswith(")") else d["id"]
            for d in diffs
            if "not run" not in (d["stock"], d["ours"])
        }
    )
    if not labels or len(labels) > 300:
        return
    info(f"running the {len(labels)} differing tests again on both backends")
    shards = [Shard(backend, "rerun", labels, run_dir) for backend in ("stock", "ours")]
    for shard in shards:
        write_shard_modules(shard, run_id, db, asgi_handler=args.asgi_handler)
    run_shards(
        shards,
        tests_dir,
        extra,
        jobs=2,
        test_timeout=args.test_timeout,
        shard_timeout=args.shard_timeout,
        url=url,
    )
    again = {backend: collect(backend, shards) for backend in ("stock", "ours")}
    for diff in diffs:
        outcomes = {
            b: again[b].tests.get(diff["id"], {"outcome": "not run"})["outcome"] for b in again
        }
        if "not run" in outcomes.values():
            continue
        diff["rerun"] = outcomes
        diff["confirmed"] = (outcomes["ours"] in BAD) == (diff["ours"] in BAD) and (
            outcomes["stock"] in BAD
        ) == (diff["stock"] in BAD)


def stored_runs() -> dict[str, dict[str, Any]]:
    runs = {}
    for path in sorted(SUITE_CACHE.glob("results-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        runs[data["series"]] = data
    return runs


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    if args.docs_only:
        runs = stored_runs()
        if not runs:
            raise SuiteError(f"no stored results in {SUITE_CACHE}: run the suite first.")
        write_docs(runs)
        return 0
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SuiteError("DATABASE_URL is not set (./dev django-suite sets it).")
    db = database_settings(url)
    version = django_version()
    tests_dir = ensure_sdist(version)
    labels = args.apps or (list(QUICK_APPS) if args.quick else list(DEFAULT_APPS))
    missing = [label for label in labels if not (tests_dir / label.split(".")[0]).is_dir()]
    if missing and args.apps:
        raise SuiteError(f"Django {version}'s tests have no {', '.join(missing)}.")
    if missing:
        info(f"Django {version}'s tests have no {', '.join(missing)}: skipped")
        labels = [label for label in labels if label not in missing]
    full_run = not args.apps and not args.quick and not extra and len(args.backends) == 2
    run_id = secrets.token_hex(4)
    run_dir = SUITE_CACHE / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    run_dir.mkdir(parents=True)
    for old in sorted((SUITE_CACHE / "runs").iterdir())[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)  # logs of older runs
    info(
        f"Django {version} (Python {platform.python_version()}), run {run_id}, "
        f"{len(labels)} labels, {args.jobs} jobs; logs in {run_dir.relative_to(ROOT)}/"
    )
    groups = split_labels(labels, args.jobs)
    shards = [
        Shard(backend, i + 1, group, run_dir)
        for backend in args.backends
        for i, group in enumerate(groups)
    ]
    for shard in shards:
        write_shard_modules(shard, run_id, db, asgi_handler=args.asgi_handler)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    run_shards(
        shards,
        tests_dir,
        extra,
        jobs=args.jobs,
        test_timeout=args.test_timeout,
        shard_timeout=args.shard_timeout,
        url=url,
    )
    total = time.monotonic() - started
    results = {backend: collect(backend, shards) for backend in args.backends}
    diffs = differences(results["stock"], results["ours"]) if len(results) == 2 else None
    if diffs and not args.no_rerun:
        rerun_differences(diffs, run_dir, run_id, db, tests_dir, extra, args, url)
    status = report(results, diffs, full=full_run)
    print(f"\nTotal time: {fmt_time(total)} (Django {version}, logs in {run_dir})")
    (run_dir / "summary.json").write_text(
        json.dumps({"results": {k: v.to_json() for k, v in results.items()}}, default=str),
        encoding="utf-8",
    )
    if full_run:
        series = series_of(version)
        run = {
            "series": series,
            "django": version,
            "python": platform.python_version(),
            "postgresql": server_version(url),
            "psycopg": package_version("psycopg"),
            "date": time.strftime("%Y-%m-%d"),
            "jobs": args.jobs,
            "labels": labels,
            "cpus": os.cpu_count(),
            "load": f"{load_at_start:.1f}",
            "total_time": total,
            "results": {k: v.to_json() for k, v in results.items()},
            "differences": diffs,
        }
        path = SUITE_CACHE / f"results-{series}.json"
        path.write_text(json.dumps(run, default=str), encoding="utf-8")
        if args.docs:
            write_docs(stored_runs())
    elif args.docs:
        info("--docs needs a full run (default apps, both backends): docs not written")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SuiteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
