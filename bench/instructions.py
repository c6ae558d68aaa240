"""Count CPU instructions per ORM call (lookups, writes) with valgrind's callgrind.

Usage (PostgreSQL from DATABASE_URL; ./dev bench-instructions does the setup)::

    python bench/instructions.py            # every contender, a markdown table
    python bench/instructions.py --run MODE N   # internal: one measured process

Each contender runs in its own process twice under callgrind, with a short
and a long loop; (long - short) / (difference in iterations) is the cost of
one lookup with start-up, imports and warm-up cancelled out. Instruction
counts are deterministic, so the figures do not depend on machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
SHORT, LONG = 100, 600
WARMUP = 50

CONTENDERS = {
    "raw_psycopg_sync": "raw psycopg sync Connection",
    "raw_psycopg_async": "raw psycopg AsyncConnection",
    "django_sync": "plain sync Django get() (stock backend)",
    "ours_run_sync": "django-async-db: await run_sync(lambda: get())",
    "ours_aget": "django-async-db: await aget() (compiled SQL cache: repeated shape)",
    "ours_aget_no_cache": "django-async-db: await aget(), OPTIONS['compiled_sql_cache'] = False",
    "django_aget": "Django's aget() (stock backend, thread hop)",
    "django_sync_filter_first": "plain sync Django filter(pk=...).first() (stock backend)",
    "ours_filter_afirst": "django-async-db: await filter(pk=...).afirst() (repeated shape)",
    "django_sync_filter_count": "plain sync Django filter(pk=...).count() (stock backend)",
    "ours_filter_acount": "django-async-db: await filter(pk=...).acount() (repeated shape)",
    "ours_filter_acount_no_cache": "django-async-db: await filter(pk=...).acount(), cache off",
    "raw_psycopg_insert_async": "raw psycopg AsyncConnection: INSERT ... RETURNING id",
    "django_sync_create": "plain sync Django create(name=..., bio=...) (stock backend)",
    "ours_acreate": "django-async-db: await acreate(name=..., bio=...) (repeated shape)",
    "ours_acreate_no_cache": "django-async-db: await acreate(name=..., bio=...), cache off",
    # W2/W3 shapes: 20 books from a start id, without and with their authors.
    "raw_psycopg_async_w2": "raw psycopg AsyncConnection: W2's SQL, 20 rows as tuples",
    "django_sync_w2": "plain sync Django: list(filter(id__gte).order_by('id')[:20])",
    "ours_w2": "django-async-db: [b async for b in filter(id__gte).order_by('id')[:20]]",
    "ours_w2_no_cache": "django-async-db: W2, OPTIONS['compiled_sql_cache'] = False",
    "raw_psycopg_async_w3": "raw psycopg AsyncConnection: W3's SQL (join), 20 rows as tuples",
    "django_sync_w3": "plain sync Django: W3 (select_related('author'), 20 books)",
    "ours_w3": "django-async-db: W3, async for (repeated shape)",
    "ours_w3_no_cache": "django-async-db: W3, OPTIONS['compiled_sql_cache'] = False",
    "raw_psycopg_update_async": "raw psycopg AsyncConnection: UPDATE ... WHERE id = %s",
    "django_sync_save": "plain sync Django save() of a loaded row (stock backend)",
    "ours_asave": "django-async-db: await asave() of a loaded row (repeated shape)",
    "ours_asave_no_cache": "django-async-db: await asave() of a loaded row, cache off",
    "django_sync_update": "plain sync Django filter(pk=...).update(name=...) (stock backend)",
    "ours_aupdate": "django-async-db: await filter(pk=...).aupdate(name=...) (repeated shape)",
    "ours_aupdate_no_cache": "django-async-db: await filter(pk=...).aupdate(name=...), cache off",
    # One request per lookup: a connection checked out of the pool and given back each time.
    "django_sync_pool_request": "plain sync Django get() + close_old_connections(), Django's pool",
    "ours_aget_task": "django-async-db: await aget() in a new task (pool checkout + release)",
}
BASELINE = "django_sync"


def _db() -> dict[str, Any]:
    url = urlsplit(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    return {
        "NAME": os.environ["BENCH_DB"],
        "USER": unquote(url.username or "postgres"),
        "PASSWORD": unquote(url.password or ""),
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 5432),
    }


def _conninfo(dbname: str | None = None) -> str:
    db = _db()
    return (
        f"dbname={dbname or db['NAME']} user={db['USER']} host={db['HOST']} port={db['PORT']}"
        + (f" password={db['PASSWORD']}" if db["PASSWORD"] else "")
    )


def _setup_django(ours: bool, pooled: bool = False, sql_cache: bool = True) -> Any:
    import django
    from django.conf import settings

    engine = "django_async_db.backends.postgresql" if ours else "django.db.backends.postgresql"
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": engine,
                **_db(),
                "OPTIONS": {
                    **({"pool": {"min_size": 1, "max_size": 4}} if pooled else {}),
                    **({} if sql_cache else {"compiled_sql_cache": False}),
                },
            }
        },
        INSTALLED_APPS=["django_async_db", "bench_app"] if ours else ["bench_app"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    sys.path.insert(0, str(HERE))
    django.setup()
    from bench_app.models import Author

    return Author


W2_SQL = (
    'SELECT "bench_app_book"."id", "bench_app_book"."author_id", "bench_app_book"."title", '
    '"bench_app_book"."pages" FROM "bench_app_book" WHERE "bench_app_book"."id" >= %s '
    'ORDER BY "bench_app_book"."id" ASC LIMIT 20'
)
W3_SQL = (
    'SELECT "bench_app_book"."id", "bench_app_book"."author_id", "bench_app_book"."title", '
    '"bench_app_book"."pages", "bench_app_author"."id", "bench_app_author"."name", '
    '"bench_app_author"."bio" FROM "bench_app_book" INNER JOIN "bench_app_author" '
    'ON ("bench_app_book"."author_id" = "bench_app_author"."id") '
    'WHERE "bench_app_book"."id" >= %s ORDER BY "bench_app_book"."id" ASC LIMIT 20'
)


def run(mode: str, n: int) -> None:
    """Do ``WARMUP + n`` lookups of the same row with contender ``mode``."""
    pk = 1
    if mode in ("raw_psycopg_async_w2", "raw_psycopg_async_w3"):
        import psycopg

        sql = W2_SQL if mode.endswith("w2") else W3_SQL

        async def raw_list() -> None:
            async with await psycopg.AsyncConnection.connect(_conninfo(), autocommit=True) as conn:
                for _ in range(WARMUP + n):
                    cur = await conn.execute(sql, [pk])
                    assert len(await cur.fetchall()) == 20

        asyncio.run(raw_list())
        return
    if mode == "raw_psycopg_sync":
        import psycopg

        with psycopg.connect(_conninfo(), autocommit=True) as conn:
            for _ in range(WARMUP + n):
                conn.execute(
                    "SELECT id, name, bio FROM bench_app_author WHERE id = %s", [pk]
                ).fetchone()
        return
    if mode in ("raw_psycopg_insert_async", "raw_psycopg_update_async"):
        import psycopg

        insert = mode == "raw_psycopg_insert_async"
        sql = (
            "INSERT INTO bench_app_author (name, bio) VALUES (%s, %s) RETURNING id"
            if insert
            else "UPDATE bench_app_author SET name = %s WHERE id = %s"
        )
        params = ["new", ""] if insert else ["new", pk]

        async def raw_write() -> None:
            async with await psycopg.AsyncConnection.connect(_conninfo(), autocommit=True) as conn:
                for _ in range(WARMUP + n):
                    cur = await conn.execute(sql, params)
                    if insert:
                        await cur.fetchone()

        asyncio.run(raw_write())
        return
    if mode == "raw_psycopg_async":
        import psycopg

        async def raw() -> None:
            async with await psycopg.AsyncConnection.connect(_conninfo(), autocommit=True) as conn:
                for _ in range(WARMUP + n):
                    cur = await conn.execute(
                        "SELECT id, name, bio FROM bench_app_author WHERE id = %s", [pk]
                    )
                    await cur.fetchone()

        asyncio.run(raw())
        return
    author = _setup_django(
        ours=mode.startswith("ours"),
        pooled=mode == "django_sync_pool_request",
        sql_cache=not mode.endswith("_no_cache"),
    )
    if mode == "django_sync_pool_request":
        from django.db import close_old_connections

        for _ in range(WARMUP + n):
            author.objects.get(pk=pk)
            close_old_connections()  # request_finished: the connection goes back to the pool
        return
    if mode == "django_sync":
        for _ in range(WARMUP + n):
            author.objects.get(pk=pk)
        return
    if mode == "django_sync_filter_first":
        for _ in range(WARMUP + n):
            author.objects.filter(pk=pk).first()
        return
    if mode == "django_sync_filter_count":
        for _ in range(WARMUP + n):
            author.objects.filter(pk=pk).count()
        return
    if mode == "django_sync_w2":
        book = author.books.field.model
        for _ in range(WARMUP + n):
            assert len(list(book.objects.filter(id__gte=pk).order_by("id")[:20])) == 20
        return
    if mode == "django_sync_w3":
        book = author.books.field.model
        for _ in range(WARMUP + n):
            qs = book.objects.select_related("author").filter(id__gte=pk).order_by("id")[:20]
            assert len([b.author.name for b in qs]) == 20
        return
    if mode == "django_sync_create":
        for _ in range(WARMUP + n):
            author.objects.create(name="new", bio="")
        return
    if mode == "django_sync_save":
        row = author.objects.get(pk=pk)
        for _ in range(WARMUP + n):
            row.save()
        return
    if mode == "django_sync_update":
        for _ in range(WARMUP + n):
            author.objects.filter(pk=pk).update(name="new")
        return

    async def main() -> None:
        if mode == "ours_run_sync":
            from django_async_db import async_connections, run_sync

            for _ in range(WARMUP + n):
                await run_sync(lambda: author.objects.get(pk=pk))
            await async_connections.close_all()
        elif mode == "ours_aget_task":
            from django_async_db import async_connections

            async def request() -> None:
                await author.objects.aget(pk=pk)

            for _ in range(WARMUP + n):
                await asyncio.create_task(request())
            await asyncio.sleep(0.01)  # let the last release task finish
            await async_connections.close_all()
        elif mode == "ours_filter_afirst":
            from django_async_db import async_connections

            for _ in range(WARMUP + n):
                await author.objects.filter(pk=pk).afirst()
            await async_connections.close_all()
        elif mode.startswith("ours_filter_acount"):
            from django_async_db import async_connections

            for _ in range(WARMUP + n):
                await author.objects.filter(pk=pk).acount()
            await async_connections.close_all()
        elif mode.startswith(("ours_w2", "ours_w3")):
            from django_async_db import async_connections

            book = author.books.field.model
            for _ in range(WARMUP + n):
                if mode.startswith("ours_w2"):
                    qs = book.objects.filter(id__gte=pk).order_by("id")[:20]
                    assert len([b async for b in qs]) == 20
                else:
                    qs = book.objects.select_related("author").filter(id__gte=pk).order_by("id")
                    assert len([b.author.name async for b in qs[:20]]) == 20
            await async_connections.close_all()
        elif mode.startswith("ours_acreate"):
            from django_async_db import async_connections

            for _ in range(WARMUP + n):
                await author.objects.acreate(name="new", bio="")
            await async_connections.close_all()
        elif mode.startswith("ours_asave"):
            from django_async_db import async_connections

            row = await author.objects.aget(pk=pk)
            for _ in range(WARMUP + n):
                await row.asave()
            await async_connections.close_all()
        elif mode.startswith("ours_aupdate"):
            from django_async_db import async_connections

            for _ in range(WARMUP + n):
                await author.objects.filter(pk=pk).aupdate(name="new")
            await async_connections.close_all()
        else:  # ours_aget, ours_aget_no_cache, django_aget
            for _ in range(WARMUP + n):
                await author.objects.aget(pk=pk)
            if mode.startswith("ours"):
                from django_async_db import async_connections

                await async_connections.close_all()

    asyncio.run(main())


def callgrind(script: str, *args: str) -> int:
    """Return the instructions ``python script args...`` executes under callgrind."""
    label = " ".join(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                script,
                *args,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{label}: callgrind run failed:\n{proc.stderr[-2000:]}")
        match = re.search(r"Collected : (\d+)", proc.stderr)
        if not match:
            raise SystemExit(f"{label}: no instruction total in callgrind's output")
        return int(match.group(1))


def _callgrind(mode: str, n: int) -> int:
    return callgrind(__file__, "--run", mode, str(n))


def _create_db() -> str:
    import psycopg

    name = f"djasync_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(_conninfo(name), autocommit=True) as c:
        c.execute(
            "CREATE TABLE bench_app_author (id bigserial PRIMARY KEY, name varchar(100) NOT NULL,"
            " bio text NOT NULL)"
        )
        c.execute(
            "INSERT INTO bench_app_author (name, bio) SELECT 'author ' || i, 'bio' "
            "FROM generate_series(1, 100) i"
        )
        c.execute(
            "CREATE TABLE bench_app_book (id bigserial PRIMARY KEY, author_id bigint NOT NULL"
            " REFERENCES bench_app_author (id), title varchar(200) NOT NULL,"
            " pages integer NOT NULL)"
        )
        c.execute(
            "INSERT INTO bench_app_book (author_id, title, pages) SELECT 1 + i % 100, "
            "'book ' || i, i FROM generate_series(1, 100) i"
        )
    return name


def _drop_db(name: str) -> None:
    import psycopg

    with psycopg.connect(_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", nargs=2, metavar=("MODE", "N"))
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS))
    args = parser.parse_args()
    if args.run:
        run(args.run[0], int(args.run[1]))
        return
    os.environ.setdefault("BENCH_DB", "postgres")
    name = _create_db()
    os.environ["BENCH_DB"] = name
    try:
        per_op: dict[str, float] = {}
        for mode in args.only or CONTENDERS:
            short, long = _callgrind(mode, SHORT), _callgrind(mode, LONG)
            per_op[mode] = (long - short) / (LONG - SHORT)
            print(f"  {mode}: {per_op[mode] / 1000:,.0f}k instructions", file=sys.stderr)
    finally:
        os.environ["BENCH_DB"] = "postgres"
        _drop_db(name)
    base = per_op.get(BASELINE)
    print("| contender | k instructions per call | vs plain sync Django get() |")
    print("|---|---:|---:|")
    for mode, cost in per_op.items():
        ratio = f"{cost / base:.2f}" if base else "n/a"
        print(f"| {CONTENDERS[mode]} | {cost / 1000:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
