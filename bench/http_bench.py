"""HTTP benchmark: the demo app served for real, load from a second process.

Usage (``./dev bench --http [--quick]`` provisions PostgreSQL and runs this)::

    python bench/http_bench.py [--quick] [--rounds N] [--seconds S] [--concurrency C]
                         [--output MD]

Four servers of the demo project (``examples/demo``) on one database of its
own (``djasync_http_bench``, created, migrated and seeded if missing), each
one process (the same worker budget), each with a pool of at most
``POOL_MAX`` connections:

* ``ours``: ``async def`` views, ENGINE ``django_async_db.backends.postgresql``
  and ``django_async_db.asgi.get_asgi_application()``, under uvicorn;
* ``ours_django_handler``: the same with Django's own ``ASGIHandler`` (what
  the handler alone changes);
* ``stock_async``: the same ``async def`` views on Django's postgresql backend
  with its built-in pool (``OPTIONS["pool"]``) and Django's handler, under uvicorn;
* ``wsgi_sync``: the sync twins of the views on Django's backend with its
  pool, under gunicorn (``gthread`` worker, ``POOL_MAX`` threads).

uvicorn uses httptools when it is installed (the ``bench`` extra installs it).
The load comes from ``wrk`` (one thread, ``--concurrency`` keep-alive
connections) in a second process; without wrk, from ``bench/http_load.py``
(a slower Python client: the report says so). For each round, each view
(``/bench/one/``: one primary-key query; ``/bench/five/``: five queries one
after another) and each contender in turn (the starting contender rotates),
the server is driven for ``--seconds``. Reported: medians over the rounds of
requests/s, p50/p99 latency and the server process's CPU time per request
(``/proc``: less sensitive than requests/s to other load on the machine), the
ratio to ``stock_async`` computed within each round, and the most server
connections (``pg_stat_activity`` by ``application_name``) each contender held.

Before the load, each ASGI contender is started once more with the demo's
thread probe (``DEMO_THREAD_PROBE=1``: every ``loop.run_in_executor`` and the
thread of every SQL statement) and sent ``PROBE_REQUESTS`` requests to the
read + write view (``POST /bench/read-write/``): thread hops per request.

The results go into ``docs/benchmarks.md`` between ``<!-- http-bench:start -->``
and ``<!-- http-bench:end -->`` (added at the end if missing); the rest of the
file is left as it is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
sys.path.insert(0, str(DEMO))

from demotools.server import free_port  # noqa: E402

DATABASE = "djasync_http_bench"
POOL_MAX = 10
POOL_MAX_IDLE = 1.0  # seconds: pools shrink back to min_size (2) soon after the load
IDLE_WAIT = 15.0
PROBE_REQUESTS = 100
START = "<!-- http-bench:start -->"
END = "<!-- http-bench:end -->"


@dataclass(frozen=True)
class Contender:
    """One way of serving the demo."""

    key: str
    title: str
    wsgi: bool
    env: dict[str, str]


CONTENDERS = [
    Contender(
        "ours", "django-async-db, its ASGI handler (uvicorn)", False, {"DEMO_ORM": "async_db"}
    ),
    Contender(
        "ours_django_handler",
        "django-async-db, Django's ASGI handler (uvicorn)",
        False,
        {"DEMO_ORM": "async_db", "DEMO_HANDLER": "django"},
    ),
    Contender(
        "stock_async", "stock Django async view + pool (uvicorn)", False, {"DEMO_ORM": "stock"}
    ),
    Contender(
        "wsgi_sync",
        f"stock Django sync view + pool (gunicorn gthread, {POOL_MAX} threads)",
        True,
        {"DEMO_ORM": "stock"},
    ),
]
BASELINE = "stock_async"
VIEWS = {
    "one": ("one query", "/bench/one/", "/bench/one-sync/"),
    "five": ("five queries", "/bench/five/", "/bench/five-sync/"),
}


def say(message: str) -> None:
    print(f"bench-http: {message}", file=sys.stderr, flush=True)


def server_url() -> str:
    return os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url() -> str:
    return urlsplit(server_url())._replace(path=f"/{DATABASE}").geturl()


# --- setup -------------------------------------------------------------------------------


def prepare_database() -> int:
    """Create, migrate and seed the benchmark's database; return a post id to read."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(server_url(), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]).fetchone():
            pass
        else:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
                say(f"created database {DATABASE!r}")
            except errors.DuplicateDatabase:
                pass
    env = server_env(Contender("setup", "", True, {"DEMO_ORM": "stock"}))
    for command in (["migrate", "--verbosity", "0"], ["seed_demo"]):
        subprocess.run(
            [sys.executable, "manage.py", *command],
            cwd=DEMO,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    with psycopg.connect(database_url(), autocommit=True) as conn:
        row = conn.execute("SELECT min(id) FROM blog_post").fetchone()
        tags = conn.execute(
            "SELECT count(*) FROM blog_post_tags WHERE post_id = %s", [row[0] if row else 0]
        ).fetchone()
    if row is None or row[0] is None:
        raise SystemExit("bench-http: the demo database has no posts after seeding.")
    say(f"database {DATABASE!r} ready; reading post {row[0]} ({tags[0] if tags else 0} tags)")
    return int(row[0])


def server_env(contender: Contender, *, probe: bool = False) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "demosite.settings",
        "DEMO_DATABASE_URL": database_url(),
        "DEMO_POOL_MAX": str(POOL_MAX),
        "DEMO_POOL_MAX_IDLE": str(POOL_MAX_IDLE),
        "PGAPPNAME": f"bench-{contender.key}",
        "PYTHONUNBUFFERED": "1",
        **contender.env,
    }
    env.pop("DEMO_THREAD_PROBE", None)
    if probe:
        env["DEMO_THREAD_PROBE"] = "1"
    return env


def has_httptools() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


class Server:
    """The demo served by uvicorn or gunicorn in a subprocess."""

    def __init__(self, contender: Contender, *, probe: bool = False) -> None:
        self.contender = contender
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-http-{contender.key}-", delete=False)  # noqa: SIM115
        if contender.wsgi:
            command = [sys.executable, "-m", "gunicorn", "demosite.wsgi:application"]
            command += ["--chdir", str(DEMO), "--bind", f"127.0.0.1:{self.port}"]
            command += ["--workers", "1", "--worker-class", "gthread", "--threads", str(POOL_MAX)]
            command += ["--log-level", "warning", "--graceful-timeout", "10"]
        else:
            command = [sys.executable, "-m", "uvicorn", "demosite.asgi:application"]
            command += ["--app-dir", str(DEMO), "--host", "127.0.0.1", "--port", str(self.port)]
            command += ["--lifespan", "on", "--log-level", "warning", "--no-access-log"]
            if has_httptools():
                command += ["--http", "httptools"]
        self.process = subprocess.Popen(
            command,
            env=server_env(contender, probe=probe),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                status, _ = request(self.port, "GET", path)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        log = self.output()[-3000:]
        raise SystemExit(f"bench-http: {self.contender.key} did not start:\n{log}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if not self.contender.wsgi else signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) of process ``pid`` and its live children."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path: Path) -> list[str]:
        text = path.read_text()
        return text[text.rindex(")") + 2 :].split()  # the fields after "(comm)"

    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = stat(proc / "stat")
        except (OSError, ValueError):
            continue
        if int(proc.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def request(port: int, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- the thread probe ----------------------------------------------------------------------


def probe(contender: Contender, post_id: int) -> dict[str, Any]:
    """Serve with the thread probe; return hops and off-loop SQL per read + write request."""
    server = Server(contender, probe=True)
    try:
        server.wait_ready(f"/bench/one/?id={post_id}")
        request(server.port, "GET", "/bench/probe/")  # reset: start-up and readiness checks
        for _ in range(PROBE_REQUESTS):
            status, body = request(server.port, "POST", "/bench/read-write/")
            if status != 200:
                raise SystemExit(f"bench-http: POST /bench/read-write/ answered {status}: {body!r}")
        status, body = request(server.port, "GET", "/bench/probe/")
        counts: dict[str, Any] = json.loads(body)
    finally:
        server.stop()
    if not counts["installed"]:
        raise SystemExit("bench-http: the thread probe was not installed in the server.")
    requests = PROBE_REQUESTS + 1  # the probe request itself is counted too
    return {
        "hops_per_request": counts["thread_hops"] / requests,
        "sql_per_request": (counts["statements_on_loop"] + counts["statements_off_loop"])
        / PROBE_REQUESTS,
        "sql_off_loop": counts["statements_off_loop"],
        "hops_by_function": counts["hops_by_function"],
    }


# --- load ----------------------------------------------------------------------------------


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"Unexpected wrk latency {text!r}.")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def run_python_load(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "http_load.py"),
            url,
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


class ConnectionSampler:
    """Sample the server sessions of each contender (``application_name``) in a thread."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sessions(self) -> dict[str, int]:
        import psycopg

        with psycopg.connect(server_url(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name LIKE 'bench-%%' GROUP BY 1",
                [DATABASE],
            ).fetchall()
        return {name.removeprefix("bench-"): int(n) for name, n in rows}

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                for key, n in self.sessions().items():
                    self.peak[key] = max(self.peak.get(key, 0), n)
            except Exception:  # a sample lost to a busy server is no reason to stop
                continue

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Results:
    """Every measured cell: results[view][contender] is one dict per round."""

    cells: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)

    def add(self, view: str, contender: str, figures: dict[str, float]) -> None:
        self.cells.setdefault(view, {}).setdefault(contender, []).append(figures)


def measure(
    args: argparse.Namespace, post_id: int
) -> tuple[Results, dict[str, int], dict[str, int]]:
    """Run every round; return the results, peak and idle server connections per contender."""
    load = run_wrk if shutil.which("wrk") else run_python_load
    servers = {c.key: Server(c) for c in CONTENDERS}
    results = Results()
    try:
        for c in CONTENDERS:
            servers[c.key].wait_ready(view_path(c, "one", post_id))
        with ConnectionSampler() as sampler:
            for c in CONTENDERS:  # warm up: URL resolver, pools, code paths
                for view in VIEWS:
                    load(servers[c.key].base + view_path(c, view, post_id), args.concurrency, 1)
            for rnd in range(args.rounds):
                for view in VIEWS:
                    order = (
                        CONTENDERS[rnd % len(CONTENDERS) :] + CONTENDERS[: rnd % len(CONTENDERS)]
                    )
                    for c in order:
                        url = servers[c.key].base + view_path(c, view, post_id)
                        cpu = cpu_seconds(servers[c.key].process.pid)
                        figures = load(url, args.concurrency, args.seconds)
                        cpu = cpu_seconds(servers[c.key].process.pid) - cpu
                        figures["cpu_ms"] = cpu * 1000 / max(1.0, figures["rps"] * args.seconds)
                        results.add(view, c.key, figures)
                        say(
                            f"round {rnd + 1}/{args.rounds} {view:>4} {c.key:<20} "
                            f"{figures['rps']:8.0f} req/s  p99 {figures['p99_ms']:7.1f} ms"
                        )
            time.sleep(IDLE_WAIT)  # idle: the pools shrink back to min_size (one per max_idle)
            idle = sampler.sessions()
        peak = dict(sampler.peak)
    finally:
        for server in servers.values():
            server.stop()
    return results, peak, idle


def view_path(contender: Contender, view: str, post_id: int) -> str:
    _, async_path, sync_path = VIEWS[view]
    return f"{sync_path if contender.wsgi else async_path}?id={post_id}"


# --- instructions per request (callgrind) ---------------------------------------------------

CALLGRIND_VIEWS = {
    "none": ("no query", "/bench/none/", "/bench/none-sync/"),
    **VIEWS,
}


def run_in_process(key: str, view: str, n: int, post_id: int) -> None:
    """Internal (``--callgrind-run``): serve ``n`` requests in this process, no HTTP server.

    The ASGI contenders get a scope straight into the application, one task
    per request, as a server makes; the WSGI contender a WSGI environ.
    """
    contender = next(c for c in CONTENDERS if c.key == key)
    os.environ.update(server_env(contender))
    sys.path.insert(0, str(DEMO))
    _, async_path, sync_path = CALLGRIND_VIEWS[view]
    target, query = (sync_path if contender.wsgi else async_path), f"id={post_id}"
    if contender.wsgi:
        from demosite.wsgi import application as wsgi_app

        def wsgi_request() -> None:
            environ = {
                "REQUEST_METHOD": "GET",
                "PATH_INFO": target,
                "QUERY_STRING": query,
                "SERVER_NAME": "127.0.0.1",
                "SERVER_PORT": "80",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "wsgi.input": __import__("io").BytesIO(),
                "wsgi.url_scheme": "http",
            }
            status: list[str] = []
            body = wsgi_app(environ, lambda s, h, *a: status.append(s))
            b"".join(body)
            body.close()
            assert status[0].startswith("200"), status

        for _ in range(WARMUP_REQUESTS):
            wsgi_request()
        os.getppid()  # callgrind dumps here (--dump-before=getppid) ...
        for _ in range(n):
            wsgi_request()
        os.getppid()  # ... and here: the second dump holds exactly the n requests
        return

    import asyncio

    from demosite.asgi import application

    async def asgi_request() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": target,
            "raw_path": target.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 80),
        }
        sent: list[dict[str, Any]] = []
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b""}
            await asyncio.Event().wait()
            return {}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asyncio.create_task(application(scope, receive, send))
        assert sent[0]["status"] == 200, sent

    async def main() -> None:
        for _ in range(WARMUP_REQUESTS):
            await asgi_request()
        os.getppid()
        for _ in range(n):
            await asgi_request()
        os.getppid()
        if contender.env["DEMO_ORM"] == "async_db":
            from django_async_db import async_connections

            await async_connections.close_all()

    asyncio.run(main())


WARMUP_REQUESTS = 30
CALLGRIND_REQUESTS = 50


def callgrind(key: str, view: str, n: int, post_id: int) -> subprocess.Popen[str]:
    """Start a process serving ``n`` measured requests under callgrind."""
    out = Path(tempfile.mkdtemp(prefix="bench-http-cg-")) / "cg.out"
    command = ["valgrind", "--tool=callgrind", "--dump-before=getppid"]
    command += [f"--callgrind-out-file={out}", sys.executable, __file__]
    command += ["--callgrind-run", key, view, str(n), str(post_id)]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def measured_instructions(proc: subprocess.Popen[str], what: str) -> int:
    """Wait for a :func:`callgrind` process; return the instructions of its measured part.

    ``--dump-before=getppid`` dumps the counters at each ``os.getppid()`` of the
    runner: ``cg.out.1`` is start-up and warm-up, ``cg.out.2`` the measured requests.
    """
    _, stderr = proc.communicate()
    out = Path(str(proc.args[3]).split("=", 1)[1])  # type: ignore[index]
    try:
        dumps = sorted(out.parent.glob("cg.out.*"))
        if proc.returncode != 0 or len(dumps) != 2:
            raise SystemExit(f"bench-http: callgrind {what} failed:\n{stderr[-2000:]}")
        match = re.search(r"^totals: (\d+)", (out.parent / "cg.out.2").read_text(), re.M)
        if match is None:
            raise SystemExit(f"bench-http: callgrind {what}: no totals in its second dump")
        return int(match.group(1))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def instructions(post_id: int, requests: int) -> dict[str, dict[str, float]]:
    """Return k instructions per request, by view and contender (two processes at a time)."""
    cells = [(view, c.key) for view in CALLGRIND_VIEWS for c in CONTENDERS]
    results: dict[str, dict[str, float]] = {}
    for i in range(0, len(cells), 2):
        batch = [
            (view, key, callgrind(key, view, requests, post_id)) for view, key in cells[i : i + 2]
        ]
        for view, key, proc in batch:
            per_request = measured_instructions(proc, f"{key} {view}") / requests / 1000
            results.setdefault(view, {})[key] = per_request
            say(f"callgrind {view:>4} {key:<20} {per_request:8,.0f} k instructions per request")
    return results


# --- report --------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    results: Results,
    probes: dict[str, dict[str, Any]],
    peak: dict[str, int],
    idle: dict[str, int],
    counts: dict[str, dict[str, float]] | None,
) -> str:
    import django

    loader = "wrk 1 thread" if shutil.which("wrk") else "bench/http_load.py (Python; wrk missing)"
    lines = [
        START,
        "## HTTP: the demo app under a real server",
        "",
        f"Generated by `{os.environ.get('BENCH_COMMAND', 'python bench/http_bench.py')}` on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: Python {platform.python_version()}, "
        f"Django {django.get_version()}, {os.cpu_count()} CPUs shared by the servers, the load "
        f"generator ({loader}, {args.concurrency} keep-alive connections) and PostgreSQL. "
        f"{args.rounds} round(s) of {args.seconds:g} s per cell, contenders interleaved; "
        f"medians over the rounds; ratios to `{BASELINE}` taken within each round. "
        f"Every server is one process with a pool of at most {POOL_MAX} connections; "
        "see `bench/http_bench.py` for the setup.",
        "",
    ]
    for view, (title, _, _) in VIEWS.items():
        lines += [
            f"### {title} per request (`/bench/{view}/`)",
            "",
            "| contender | requests/s | vs stock async | p50 ms | p99 ms "
            "| server CPU ms per request | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        base_rounds = results.cells[view][BASELINE]
        for c in CONTENDERS:
            rounds = results.cells[view][c.key]
            ratio = statistics.median(
                r["rps"] / b["rps"] for r, b in zip(rounds, base_rounds, strict=True) if b["rps"]
            )
            lines.append(
                f"| {c.title} | {statistics.median(r['rps'] for r in rounds):,.0f} | "
                f"{ratio:.2f}x | {statistics.median(r['p50_ms'] for r in rounds):.1f} | "
                f"{statistics.median(r['p99_ms'] for r in rounds):.1f} | "
                f"{statistics.median(r['cpu_ms'] for r in rounds):.2f} | "
                f"{sum(int(r['errors']) for r in rounds)} |"
            )
        lines.append("")
    if counts:
        lines += [
            "### Instructions per request (callgrind, deterministic)",
            "",
            "The application called in-process (no HTTP server: the same for every ASGI "
            f"contender), one request at a time, under valgrind's callgrind: {CALLGRIND_REQUESTS} "
            f"requests after {WARMUP_REQUESTS} of warm-up, every thread's instructions "
            "counted. Unlike requests/s, these do not depend on the machine's load.",
            "",
            "| contender | "
            + " | ".join(f"{CALLGRIND_VIEWS[v][0]}: k instructions" for v in counts)
            + " |",
            "|---|" + "---:|" * len(counts),
        ]
        for c in CONTENDERS:
            cells = []
            for view in counts:
                value, base = counts[view][c.key], counts[view][BASELINE]
                cells.append(f"{value:,.0f} ({value / base:.2f}x)")
            lines.append(f"| {c.title} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Views: `/bench/none/`, `/bench/one/`, `/bench/five/` (the `-sync/` twins for "
            f"WSGI); ratios are to `{BASELINE}`.",
            "",
        ]
    lines += [
        "### Thread hops and server connections",
        "",
        f"Thread probe: {PROBE_REQUESTS} sequential `POST /bench/read-write/` (a write and "
        "two reads through the ORM) to a server started with `DEMO_THREAD_PROBE=1`. "
        "Connections: the most server sessions seen during the load, and after "
        f"{IDLE_WAIT:g} s idle (`pg_stat_activity` by `application_name`; pools: min_size 2, "
        f"max_idle {POOL_MAX_IDLE:g} s).",
        "",
        "| contender | thread hops per request | SQL statements off the loop | hops in | "
        "peak connections | idle connections |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for c in CONTENDERS:
        p = probes.get(c.key)
        if p is None:
            hops, off, where = "n/a (WSGI: every request in a thread)", "n/a", ""
        else:
            hops = f"{p['hops_per_request']:.2f}"
            off = f"{p['sql_off_loop']} of {round(p['sql_per_request'] * PROBE_REQUESTS)}"
            where = ", ".join(f"`{name}` x{n}" for name, n in p["hops_by_function"].items()) or "-"
        lines.append(
            f"| {c.title} | {hops} | {off} | {where} | {peak.get(c.key, 0)} | "
            f"{idle.get(c.key, 0)} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def write_report(path: Path, section: str) -> None:
    """Put ``section`` between the markers of ``path`` (appended if missing)."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(START), text.find(END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s per cell")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--no-callgrind", action="store_true", help="skip the instruction counts (valgrind)"
    )
    parser.add_argument("--callgrind-run", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind_run:
        key, view, n, post = args.callgrind_run
        run_in_process(key, view, int(n), int(post))
        return 0
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    if not shutil.which("wrk"):
        say(
            "wrk is not installed: using bench/http_load.py (Python, much slower; it caps "
            "the requests/s it can show). Install wrk (apt-get install wrk) for real figures."
        )
    post_id = prepare_database()
    probes = {}
    for c in CONTENDERS:
        if not c.wsgi:
            probes[c.key] = probe(c, post_id)
            say(f"probe {c.key}: {probes[c.key]['hops_per_request']:.2f} thread hops per request")
    results, peak, idle = measure(args, post_id)
    counts = None
    if args.quick or args.no_callgrind:
        say("no instruction counts (--quick or --no-callgrind)")
    elif shutil.which("valgrind") is None:
        say("valgrind is not installed: no instruction counts (apt-get install valgrind)")
    else:
        counts = instructions(post_id, CALLGRIND_REQUESTS)
    section = report(args, results, probes, peak, idle, counts)
    write_report(args.output, section)
    print(section)
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
