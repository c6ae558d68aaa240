#!/usr/bin/env python
"""Set up and run the demo: ``./dev demo [--check | --load] [options]``.

Every mode first makes sure the demo's own database exists on the server of
``DATABASE_URL`` (``djasync_demo`` unless ``--database`` says otherwise; no
other database is touched), applies the migrations and adds the sample data
that is missing. Then:

* no option: serve the demo with uvicorn on 127.0.0.1 (port 8000, or a free
  one if it is taken) until Ctrl-C;
* ``--check``: serve it in a subprocess, once with django-async-db and once
  on Django's stock backend, hit every endpoint over HTTP, print a summary
  and exit 0 if everything passed, 1 otherwise;
* ``--load``: for both variants, drive the server with concurrent requests
  from a second process for ``--seconds`` and print requests/s and latency
  percentiles side by side (``--url`` drives an already running demo instead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEMO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO_DIR))

from demotools.server import DemoServer, free_port, port_is_free  # noqa: E402

VARIANTS = {"async_db": "django-async-db", "stock": "stock Django"}


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


# --- setup -------------------------------------------------------------------------------


def ensure_database(server_url: str, name: str) -> str:
    """Create the database ``name`` on the server of ``server_url`` if missing; return its URL."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists is None:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                say(f"created database {name!r}")
            except errors.DuplicateDatabase:
                pass  # created meanwhile by another run
    return urlsplit(server_url)._replace(path=f"/{name}").geturl()


def setup(database_url: str, orm: str) -> None:
    """Configure Django for the demo, migrate and seed (sync, before any server runs)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "demosite.settings"
    os.environ["DEMO_DATABASE_URL"] = database_url
    os.environ["DEMO_ORM"] = orm
    import django
    from django.core.management import call_command

    django.setup()
    from blog.management.commands.seed_demo import seed

    call_command("migrate", interactive=False, verbosity=0)
    created = seed()
    say(f"database {urlsplit(database_url).path[1:]!r} migrated; {created} sample posts added")
    release_connections()


def release_connections() -> None:
    """Close this process's (sync) connections and pool: the servers open their own."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        conn.close()
        if close_pool := getattr(conn, "close_pool", None):  # PostgreSQL's pool (Django 5.1+)
            close_pool()


def remove_generated() -> None:
    from blog.management.commands.seed_demo import remove_generated

    removed = remove_generated()
    release_connections()
    say(f"removed {removed} posts written by checks or load runs")


# --- modes ---------------------------------------------------------------------------------


def serve(port: int | None) -> int:
    """Serve the demo in this process until Ctrl-C."""
    import uvicorn
    from blog.models import Post
    from django.conf import settings

    if port is None:
        port = 8000 if port_is_free(8000) else free_port()
    elif port == 0:
        port = free_port()
    post = Post.objects.select_related("author").order_by("id").first()
    release_connections()
    url = f"http://127.0.0.1:{port}"
    post_id, author_id = (post.pk, post.author_id) if post else (1, 1)
    new_post = json.dumps({"author_id": author_id, "title": "Hello", "tags": ["django", "asyncio"]})
    comment = json.dumps({"author_name": "Me", "body": "Nice post"})
    print(
        f"\nThe demo ({VARIANTS[settings.DEMO_ORM]}) is at {url}/ - try:\n\n"
        f"  curl -s {url}/\n"
        f"  curl -s '{url}/posts/?limit=3&tag=django'\n"
        f"  curl -s {url}/posts/{post_id}/\n"
        f"  curl -s -X POST {url}/posts/ -H 'Content-Type: application/json' -d '{new_post}'\n"
        f"  curl -s -X POST {url}/posts/{post_id}/comments/ -d '{comment}'\n"
        f"  curl -s -X POST {url}/counter/visits/increment\n"
        f"  curl -s '{url}/stats/?delay_ms=200'\n"
        f"  curl -s {url}/export/posts.csv | head\n"
        f"  curl -s {url}/metrics/\n\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )
    config = uvicorn.Config(
        "demosite.asgi:application",
        host="127.0.0.1",
        port=port,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    say("stopped")
    return 0


def check(database_url: str) -> int:
    """Check every endpoint on both variants; return 0 if all passed."""
    from demotools.checks import run_checks

    results: list[tuple[str, int, int, list[str]]] = []
    for orm, title in VARIANTS.items():
        print(f"\n== {title} (DEMO_ORM={orm}) ==", flush=True)
        server = DemoServer(database_url=database_url, orm=orm)
        try:
            server.start()
            print(f"serving at {server.url}", flush=True)
            report = asyncio.run(run_checks(server.url, say=lambda line: print(line, flush=True)))
        finally:
            status = server.stop()
            errors = server.errors()
            server.close()
        problems = [f"the server logged: {line}" for line in errors]
        if status not in (0, None):
            problems.append(f"the server exited with status {status}")
        for problem in problems:
            print(f"FAIL {problem}")
        results.append((title, len(report.passed), len(report.failed) + len(problems), problems))
        remove_generated()
    print("\ndemo --check summary:")
    for title, passed, failed, _ in results:
        verdict = "PASS" if failed == 0 else "FAIL"
        print(f"  {verdict} {title}: {passed} checks passed, {failed} failed")
    passed = sum(r[1] for r in results)
    failed = sum(r[2] for r in results)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


def run_load(url: str, seconds: float, concurrency: int, label: str) -> dict[str, Any]:
    """Run the load generator in a second process against ``url``; return its figures."""
    command = [sys.executable, "-m", "demotools.load", "--url", url, "--label", label]
    command += ["--seconds", str(seconds), "--concurrency", str(concurrency)]
    done = subprocess.run(command, cwd=DEMO_DIR, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"demo: the load generator failed with status {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def gather_latency(url: str, delay_ms: int = 100, times: int = 3) -> float:
    """Return the median ``elapsed_ms`` of ``/stats/?delay_ms=`` (five counts of ``delay_ms``)."""
    from demotools.client import HttpClient

    async def measure() -> float:
        client = HttpClient(url)
        try:
            values = []
            for _ in range(times):
                response = await client.request("GET", f"/stats/?delay_ms={delay_ms}")
                values.append(float(response.json()["elapsed_ms"]))
            return statistics.median(values)
        finally:
            await client.close()

    return asyncio.run(measure())


def load(database_url: str, seconds: float, concurrency: int) -> int:
    """Load both variants one after the other and print the comparison."""
    results: dict[str, dict[str, Any]] = {}
    gathered: dict[str, float] = {}
    for orm, title in VARIANTS.items():
        remove_generated()  # each variant starts from the same rows
        with DemoServer(database_url=database_url, orm=orm) as server:
            results[orm] = run_load(server.url, seconds, concurrency, title)
            gathered[orm] = gather_latency(server.url)
        errors = server.errors()
        server.close()
        for line in errors[:5]:
            say(f"{title} server logged: {line}")
    remove_generated()
    print_comparison(results, gathered, seconds, concurrency)
    return 0 if not any(r["errors"] for r in results.values()) else 1


def print_comparison(
    results: dict[str, dict[str, Any]], gathered: dict[str, float], seconds: float, concurrency: int
) -> None:
    ours, stock = results["async_db"], results["stock"]
    print(f"\nLoad: {concurrency} connections for {seconds:g} s per variant (after 1 s warm-up);")
    print("one uvicorn worker each, the same database, the same pool size (10).\n")
    print(f"{'':18}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for orm, title in VARIANTS.items():
        r = results[orm]
        print(
            f"{title:18}{r['requests']:>10}{r['rps']:>10.1f}{r['p50_ms']:>10.1f}"
            f"{r['p99_ms']:>10.1f}{r['errors']:>8}"
        )
    if stock["rps"] and ours["p99_ms"]:
        print(
            f"\ndjango-async-db / stock: {ours['rps'] / stock['rps']:.2f}x the requests/s, "
            f"{ours['p99_ms'] / stock['p99_ms']:.2f}x the p99 latency"
        )
    print(f"\n{'p99 ms by endpoint':18}" + "".join(f"{t:>18}" for t in VARIANTS.values()))
    for name in ours["endpoints"]:
        row = [results[orm]["endpoints"].get(name, {}).get("p99_ms", 0.0) for orm in VARIANTS]
        print(f"{name:18}" + "".join(f"{v:>18.1f}" for v in row))
    print(
        "\nGET /stats/?delay_ms=100 (asyncio.gather of five counts that take 100 ms each): "
        f"{gathered['async_db']:.0f} ms with django-async-db, "
        f"{gathered['stock']:.0f} ms on stock Django"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev demo", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="check every endpoint, exit 0/1")
    mode.add_argument("--load", action="store_true", help="compare throughput with stock Django")
    parser.add_argument(
        "--port", type=int, help="port to serve on (default 8000 or a free one; 0: free)"
    )
    parser.add_argument("--orm", choices=list(VARIANTS), default="async_db", help="what to serve")
    parser.add_argument("--database", default="djasync_demo", help="the demo's database name")
    parser.add_argument("--seconds", type=float, default=5.0, help="--load: seconds per variant")
    parser.add_argument("--concurrency", type=int, default=32, help="--load: connections")
    parser.add_argument("--url", help="--load: drive this running demo instead of starting one")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or args.concurrency < 1:
        parser.error("--seconds must be in (0, 600] and --concurrency at least 1")
    if args.url:
        if not args.load:
            parser.error("--url goes with --load")
        result = run_load(args.url, args.seconds, args.concurrency, "demo")
        print(json.dumps(result, indent=2))
        return 0 if not result["errors"] else 1

    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database_url = ensure_database(server_url, args.database)
    setup(database_url, args.orm)
    if args.check:
        return check(database_url)
    if args.load:
        return load(database_url, args.seconds, args.concurrency)
    return serve(args.port)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
