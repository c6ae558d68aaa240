"""One contender of ``bench/compare.py``, in a long-lived process of its own.

Django's settings are process-global, so each contender gets its own worker,
started once; the driver then sends it commands, one JSON object per line on
stdin, and reads one JSON object per line from stdout::

    {"cmd": "run", "workload": "W1", "concurrency": 16, "warmup": 0.3, "seconds": 1.0}
    {"cmd": "quit"}

A run starts ``concurrency`` closed-loop clients that issue requests back to
back for ``warmup + seconds``. Only requests that *finish* inside the measured
window (after the warm-up) count; the process CPU time (every thread of this
process, ``time.process_time``), the OS thread count and the pool's connection
counter are sampled at both ends of the window. After each run the worker gives
every connection back to the server, so that only the running contender holds
connections on the shared PostgreSQL server (its pool refills during the next
warm-up, which is not measured).

One request (what an ASGI server does per HTTP request: a new task):

* ``ours``: a new task inside asgiref's ``ThreadSensitiveContext`` (as Django's
  ASGI handler does); the workload uses Django's own ``a*`` API and
  ``async_atomic``; the task's connection goes back to the pool when it ends.
* ``stock_async`` / ``stock_async_pool``: the same, on Django's stock backend;
  the request ends with ``close_old_connections`` in the request's sync thread,
  as Django's ``request_finished`` signal does (closing the connection, or giving
  it back to Django's pool). W5 is ``sync_to_async(<atomic function>)``.
* ``sync_threads``: a ``ThreadPoolExecutor`` with ``concurrency`` workers, each
  running the sync ORM in a loop, ``close_old_connections`` after each request
  (a WSGI server's ``request_finished``), with Django's pool.
* ``raw_psycopg``: ``psycopg_pool.AsyncConnectionPool``, the SQL Django sends,
  rows as tuples: the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import resource
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
N_AUTHORS = int(os.environ.get("BENCH_AUTHORS", "10000"))
N_BOOKS = int(os.environ.get("BENCH_BOOKS", "50000"))
POOL_MAX = int(os.environ.get("BENCH_POOL_MAX", "20"))
# Fixed-size pools, filled before each run's warm-up: the measured window sees a warm pool.
POOL = {"min_size": POOL_MAX, "max_size": POOL_MAX, "timeout": 30.0}

CONTENDERS = ("ours", "stock_async", "stock_async_pool", "sync_threads", "raw_psycopg")

# --- measurement ------------------------------------------------------------------------


def os_threads() -> int:
    """Return the number of OS threads of this process."""
    return len(os.listdir("/proc/self/task"))


def rss_kb() -> int:
    """Return the current resident set size in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Recorder:
    """Finish time, latency and process CPU time at the finish of each request; errors.

    The measured window is fixed in advance; throughput counts the requests that
    finish inside it, and CPU per request is the process CPU time between the first
    and the last of them. Nothing depends on a sampler being scheduled on time (with
    64 busy threads, a thread waiting for the GIL can wait longer than the window).
    """

    def __init__(self) -> None:
        self.records: list[tuple[float, float, float]] = []
        self.errors = 0
        self.first_error: str | None = None

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exception(exc, file=sys.stderr)

    def add(self, t0: float) -> None:
        t1 = time.perf_counter()
        self.records.append((t1, t1 - t0, time.process_time()))

    def result(
        self, window: tuple[float, float], new_conns: int, threads_max: int
    ) -> dict[str, Any]:
        done = sorted(r for r in self.records if window[0] <= r[0] <= window[1])
        n = len(done)
        lats = sorted(r[1] for r in done)
        seconds = window[1] - window[0]
        cpu = done[-1][2] - done[0][2] if n > 1 else 0.0
        span = done[-1][0] - done[0][0] if n > 1 else 0.0
        return {
            "ops": n,
            "seconds": seconds,
            "ops_per_s": n / seconds,
            "p50_ms": lats[n // 2] * 1e3 if n else None,
            "p99_ms": lats[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
            "cpu_us_per_op": cpu / (n - 1) * 1e6 if n > 1 else None,
            "cpu_util": cpu / span if span > 0 else None,
            "span": span,
            "new_conns": new_conns,
            "errors": self.errors,
            "first_error": self.first_error,
            "threads_max": threads_max,
            "rss_kb": rss_kb(),
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


# --- contenders -------------------------------------------------------------------------


def _db_settings() -> dict[str, Any]:
    url = urlsplit(os.environ["BENCH_DATABASE_URL"])
    return {
        "NAME": unquote(url.path.lstrip("/")),
        "USER": unquote(url.username or "postgres"),
        "PASSWORD": unquote(url.password or ""),
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 5432),
    }


def setup_django(contender: str) -> None:
    import django
    from django.conf import settings

    ours = contender == "ours"
    pooled = contender in ("ours", "stock_async_pool", "sync_threads")
    settings.configure(
        DEBUG=False,
        DATABASES={
            "default": {
                "ENGINE": (
                    "django_async_db.backends.postgresql"
                    if ours
                    else "django.db.backends.postgresql"
                ),
                **_db_settings(),
                # CONN_MAX_AGE stays at Django's default (0); Django's pool requires it.
                "OPTIONS": {"pool": dict(POOL)} if pooled else {},
            }
        },
        INSTALLED_APPS=["django_async_db", "bench_app"] if ours else ["bench_app"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    sys.path.insert(0, str(HERE))
    django.setup()


class Contender:
    """Requests for one contender; ``run`` measures one workload at one concurrency."""

    name = ""
    threaded = False

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

    def workload(self, name: str) -> Callable[[random.Random], Any]:
        return getattr(self, name.lower())  # type: ignore[no-any-return]

    async def request(
        self, body: Callable[[random.Random], Awaitable[Any]], rng: random.Random
    ) -> None:
        await body(rng)

    def new_conns(self) -> int:
        return 0

    async def prefill(self) -> None:
        """Open the contender's pool and wait until it is full (before the warm-up)."""

    async def release(self) -> None:
        """Give every connection back to the server (end of a run)."""

    def run(self, workload: str, c: int, warmup: float, seconds: float) -> dict[str, Any]:
        return self.loop.run_until_complete(self._run(workload, c, warmup, seconds))

    async def _run(self, workload: str, c: int, warmup: float, seconds: float) -> dict[str, Any]:
        body = self.workload(workload)
        rec = Recorder()
        loop = asyncio.get_running_loop()
        await self.prefill()
        start = time.perf_counter()
        window = (start + warmup, start + warmup + seconds)
        stop_at = window[1]

        async def client(i: int) -> None:
            rng = random.Random(hash((workload, c, i, time.time())))
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    await loop.create_task(self.request(body, rng))
                except Exception as exc:
                    rec.error(exc)
                    await asyncio.sleep(0.01)
                    continue
                rec.add(t0)

        async def sampler() -> tuple[int, int]:
            await asyncio.sleep(warmup)
            conns, threads = self.new_conns(), os_threads()
            while (now := time.perf_counter()) < stop_at:
                await asyncio.sleep(min(0.05, stop_at - now))
                threads = max(threads, os_threads())
            return self.new_conns() - conns, threads

        clients = [loop.create_task(client(i)) for i in range(c)]
        new_conns, threads = await sampler()
        await asyncio.gather(*clients)
        await self.release()
        return rec.result(window, new_conns, threads)


class DjangoAsync(Contender):
    """Django's async ORM API (shared by ours and the stock backend)."""

    def __init__(self) -> None:
        setup_django(self.name)
        super().__init__()
        from bench_app.models import Author, Book

        self.Author, self.Book = Author, Book

    async def request(
        self, body: Callable[[random.Random], Awaitable[Any]], rng: random.Random
    ) -> None:
        from asgiref.sync import ThreadSensitiveContext

        async with ThreadSensitiveContext():
            await body(rng)

    async def w1(self, rng: random.Random) -> None:
        await self.Author.objects.aget(pk=rng.randint(1, N_AUTHORS))

    async def w2(self, rng: random.Random) -> None:
        start = rng.randint(1, N_BOOKS - 20)
        rows = [b async for b in self.Book.objects.filter(id__gte=start).order_by("id")[:20]]
        assert len(rows) == 20

    async def w3(self, rng: random.Random) -> None:
        start = rng.randint(1, N_BOOKS - 20)
        qs = self.Book.objects.select_related("author").filter(id__gte=start).order_by("id")[:20]
        rows = [b.author.name async for b in qs]
        assert len(rows) == 20

    async def w4(self, rng: random.Random) -> None:
        await self.Book.objects.acreate(
            author_id=rng.randint(1, N_AUTHORS), title="a new book", pages=rng.randint(50, 500)
        )

    async def w6(self, rng: random.Random) -> None:
        from django.db.models import Avg, Count

        await self.Book.objects.filter(author_id=rng.randint(1, N_AUTHORS)).aaggregate(
            n=Count("id"), avg=Avg("pages")
        )


class Ours(DjangoAsync):
    name = "ours"

    async def w5(self, rng: random.Random) -> None:
        from django_async_db import async_atomic

        pk = rng.randint(1, N_AUTHORS)
        async with async_atomic():
            await self.Author.objects.filter(pk=pk).aupdate(name=f"author {pk}")
            await self.Book.objects.acreate(author_id=pk, title="in a transaction", pages=100)
            await self.Book.objects.filter(author_id=pk).acount()

    async def prefill(self) -> None:
        async def fill() -> None:
            from django.db import connections

            pool = connections["default"].async_pool
            await pool.aopen()
            await pool._pool.wait(timeout=30)  # private: psycopg_pool's "wait until full"

        await asyncio.create_task(fill())  # a task of its own: it holds no connection

    def new_conns(self) -> int:
        from django_async_db import pool_stats

        return pool_stats("default").get("connections_num", 0)

    async def release(self) -> None:
        from django_async_db import _storage, async_connections

        # Requests' connections go back to the pool in tasks started when they end.
        for _ in range(100):
            pending = list(getattr(_storage, "_releases", ()))
            if not pending:
                break
            await asyncio.gather(*pending, return_exceptions=True)
        await async_connections.close_all()


def _sync_transaction(author: Any, book: Any) -> Callable[[int], int]:
    from django.db import transaction

    @transaction.atomic
    def txn(pk: int) -> int:
        author.objects.filter(pk=pk).update(name=f"author {pk}")
        book.objects.create(author_id=pk, title="in a transaction", pages=100)
        return book.objects.filter(author_id=pk).count()  # type: ignore[no-any-return]

    return txn


class StockAsync(DjangoAsync):
    name = "stock_async"

    def __init__(self) -> None:
        super().__init__()
        from django.db.backends.signals import connection_created

        self.created = 0
        self.txn = _sync_transaction(self.Author, self.Book)

        def count(**kwargs: Any) -> None:
            self.created += 1

        self._count = count
        connection_created.connect(count, weak=False)

    async def request(
        self, body: Callable[[random.Random], Awaitable[Any]], rng: random.Random
    ) -> None:
        from asgiref.sync import ThreadSensitiveContext, sync_to_async
        from django.db import close_old_connections

        async with ThreadSensitiveContext():
            try:
                await body(rng)
            finally:
                await sync_to_async(close_old_connections)()

    async def w5(self, rng: random.Random) -> None:
        from asgiref.sync import sync_to_async

        await sync_to_async(self.txn)(rng.randint(1, N_AUTHORS))

    def new_conns(self) -> int:
        return self.created  # without a pool, every connection_created is a new connection


def _django_pool_conns() -> int:
    from django.db.backends.postgresql.base import DatabaseWrapper

    pool = DatabaseWrapper._connection_pools.get("default")
    return pool.get_stats().get("connections_num", 0) if pool is not None else 0


def _fill_django_pool() -> None:
    from django.db import connections

    connections["default"].pool.open(wait=True, timeout=30)


def _close_django_pool() -> None:
    from django.db import connections

    connections["default"].close()
    connections["default"].close_pool()


class StockAsyncPool(StockAsync):
    name = "stock_async_pool"

    def new_conns(self) -> int:
        return _django_pool_conns()

    def run(self, workload: str, c: int, warmup: float, seconds: float) -> dict[str, Any]:
        _fill_django_pool()
        result = super().run(workload, c, warmup, seconds)
        _close_django_pool()
        return result


class SyncThreads(Contender):
    name = "sync_threads"

    def __init__(self) -> None:
        setup_django(self.name)
        super().__init__()
        from bench_app.models import Author, Book

        self.Author, self.Book = Author, Book
        self.txn = _sync_transaction(Author, Book)

    def w1(self, rng: random.Random) -> None:
        self.Author.objects.get(pk=rng.randint(1, N_AUTHORS))

    def w2(self, rng: random.Random) -> None:
        start = rng.randint(1, N_BOOKS - 20)
        assert len(list(self.Book.objects.filter(id__gte=start).order_by("id")[:20])) == 20

    def w3(self, rng: random.Random) -> None:
        start = rng.randint(1, N_BOOKS - 20)
        qs = self.Book.objects.select_related("author").filter(id__gte=start).order_by("id")[:20]
        assert len([b.author.name for b in qs]) == 20

    def w4(self, rng: random.Random) -> None:
        self.Book.objects.create(
            author_id=rng.randint(1, N_AUTHORS), title="a new book", pages=rng.randint(50, 500)
        )

    def w5(self, rng: random.Random) -> None:
        self.txn(rng.randint(1, N_AUTHORS))

    def w6(self, rng: random.Random) -> None:
        from django.db.models import Avg, Count

        self.Book.objects.filter(author_id=rng.randint(1, N_AUTHORS)).aggregate(
            n=Count("id"), avg=Avg("pages")
        )

    def new_conns(self) -> int:
        return _django_pool_conns()

    def run(self, workload: str, c: int, warmup: float, seconds: float) -> dict[str, Any]:
        from django.db import close_old_connections

        body = self.workload(workload)
        rec = Recorder()
        _fill_django_pool()
        start = time.perf_counter()
        window = (start + warmup, start + warmup + seconds)
        stop_at = window[1]

        def client(i: int) -> None:
            rng = random.Random(hash((workload, c, i, time.time())))
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    try:
                        body(rng)
                    finally:
                        close_old_connections()  # request_finished: back to the pool
                except Exception as exc:
                    rec.error(exc)
                    time.sleep(0.01)
                    continue
                rec.add(t0)

        with ThreadPoolExecutor(max_workers=c) as executor:
            futures = [executor.submit(client, i) for i in range(c)]
            time.sleep(warmup)
            conns, threads = self.new_conns(), os_threads()
            while (now := time.perf_counter()) < stop_at:
                time.sleep(min(0.05, stop_at - now))
                threads = max(threads, os_threads())
            new_conns = self.new_conns() - conns
            for future in futures:
                future.result()
        result = rec.result(window, new_conns, threads)
        _close_django_pool()
        return result


# The SQL Django sends for each workload (checked with connection.queries).
A_COLS = '"bench_app_author"."id", "bench_app_author"."name", "bench_app_author"."bio"'
B_COLS = (
    '"bench_app_book"."id", "bench_app_book"."author_id", "bench_app_book"."title", '
    '"bench_app_book"."pages"'
)
SQL = {
    "W1": f'SELECT {A_COLS} FROM "bench_app_author" WHERE "bench_app_author"."id" = %s LIMIT 21',
    "W2": (
        f'SELECT {B_COLS} FROM "bench_app_book" WHERE "bench_app_book"."id" >= %s '
        'ORDER BY "bench_app_book"."id" ASC LIMIT 20'
    ),
    "W3": (
        f'SELECT {B_COLS}, {A_COLS} FROM "bench_app_book" INNER JOIN "bench_app_author" '
        'ON ("bench_app_book"."author_id" = "bench_app_author"."id") '
        'WHERE "bench_app_book"."id" >= %s ORDER BY "bench_app_book"."id" ASC LIMIT 20'
    ),
    "INSERT": (
        'INSERT INTO "bench_app_book" ("author_id", "title", "pages") VALUES (%s, %s, %s) '
        'RETURNING "bench_app_book"."id"'
    ),
    "UPDATE": 'UPDATE "bench_app_author" SET "name" = %s WHERE "bench_app_author"."id" = %s',
    "COUNT": (
        'SELECT COUNT(*) AS "__count" FROM "bench_app_book" WHERE "bench_app_book"."author_id" = %s'
    ),
    "W6": (
        'SELECT COUNT("bench_app_book"."id") AS "n", AVG("bench_app_book"."pages") AS "avg" '
        'FROM "bench_app_book" WHERE "bench_app_book"."author_id" = %s'
    ),
}


class RawPsycopg(Contender):
    name = "raw_psycopg"

    def __init__(self) -> None:
        super().__init__()
        self.pool: Any = None

    def _conninfo(self) -> str:
        import psycopg.conninfo

        db = _db_settings()
        return psycopg.conninfo.make_conninfo(
            dbname=db["NAME"],
            user=db["USER"],
            password=db["PASSWORD"] or None,
            host=db["HOST"],
            port=db["PORT"],
        )

    async def request(
        self, body: Callable[[random.Random], Awaitable[Any]], rng: random.Random
    ) -> None:
        if self.pool is None:
            from psycopg_pool import AsyncConnectionPool

            self.pool = AsyncConnectionPool(
                self._conninfo(), kwargs={"autocommit": True}, open=False, **POOL
            )
            await self.pool.open(wait=True, timeout=30)
        await body(rng)

    async def _fetch(self, sql: str, params: list[Any], many: bool) -> Any:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await (cur.fetchall() if many else cur.fetchone())

    async def w1(self, rng: random.Random) -> None:
        await self._fetch(SQL["W1"], [rng.randint(1, N_AUTHORS)], many=False)

    async def w2(self, rng: random.Random) -> None:
        assert len(await self._fetch(SQL["W2"], [rng.randint(1, N_BOOKS - 20)], True)) == 20

    async def w3(self, rng: random.Random) -> None:
        assert len(await self._fetch(SQL["W3"], [rng.randint(1, N_BOOKS - 20)], True)) == 20

    async def w4(self, rng: random.Random) -> None:
        params = [rng.randint(1, N_AUTHORS), "a new book", rng.randint(50, 500)]
        await self._fetch(SQL["INSERT"], params, many=False)

    async def w5(self, rng: random.Random) -> None:
        pk = rng.randint(1, N_AUTHORS)
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(SQL["UPDATE"], [f"author {pk}", pk])
            await conn.execute(SQL["INSERT"], [pk, "in a transaction", 100])
            await (await conn.execute(SQL["COUNT"], [pk])).fetchone()

    async def w6(self, rng: random.Random) -> None:
        await self._fetch(SQL["W6"], [rng.randint(1, N_AUTHORS)], many=False)

    async def prefill(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        if self.pool is None:
            self.pool = AsyncConnectionPool(
                self._conninfo(), kwargs={"autocommit": True}, open=False, **POOL
            )
            await self.pool.open(wait=True, timeout=30)

    def new_conns(self) -> int:
        return self.pool.get_stats().get("connections_num", 0) if self.pool is not None else 0

    async def release(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


CLASSES: dict[str, type[Contender]] = {
    cls.name: cls for cls in (Ours, StockAsync, StockAsyncPool, SyncThreads, RawPsycopg)
}


def main() -> None:
    name = sys.argv[1]
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything printed by accident must not break the protocol
    contender = CLASSES[name]()
    protocol.write(json.dumps({"ready": name, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        args = (msg["workload"], msg["concurrency"], msg["warmup"], msg["seconds"])
        # CPU time, not wall time: a send() that wakes the server must not count as ours.
        profiler = cProfile.Profile(time.process_time) if msg.get("profile") else None
        try:
            with profiler or contextlib.nullcontext():
                result = contender.run(*args)
        except Exception as exc:
            traceback.print_exc()
            result = {"fatal": f"{type(exc).__name__}: {exc}"[:500]}
        if profiler is not None:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).strip_dirs()
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(45)
            result["profile"] = out.getvalue()
        protocol.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
