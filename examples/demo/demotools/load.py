"""Drive a running demo with concurrent requests for a while; print the figures as JSON.

Run as a separate process (``python -m demotools.load --url URL``) so the
load generator does not share the server's event loop or CPU time. It shows
a progress bar on stderr and prints one JSON object on stdout: requests per
second and latency percentiles, overall and per endpoint.

The mix (weights): list posts 30, post detail 30, stats 10, counter increment
15, create post 10, add comment 5. The first ``--warmup`` seconds are not
counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .client import HttpClient

COUNTERS = 4


@dataclass
class Target:
    """What the requests refer to: existing posts, authors and tags."""

    post_ids: list[int]
    author_ids: list[int]
    tags: list[str]

    def request(self, rng: random.Random, seq: int) -> tuple[str, str, str, Any]:
        """Return (endpoint name, method, path, JSON body) for the next request."""
        kind = rng.choices(
            ["list", "detail", "stats", "counter", "create", "comment"], [30, 30, 10, 15, 10, 5]
        )[0]
        if kind == "list":
            return kind, "GET", "/posts/?limit=20", None
        if kind == "detail":
            return kind, "GET", f"/posts/{rng.choice(self.post_ids)}/", None
        if kind == "stats":
            return kind, "GET", "/stats/", None
        if kind == "counter":
            return kind, "POST", f"/counter/load-{rng.randrange(COUNTERS)}/increment", None
        if kind == "create":
            body = {
                "author_id": rng.choice(self.author_ids),
                "title": f"Load post {seq}",
                "body": "Written by the load generator.",
                "tags": rng.sample(self.tags, k=min(2, len(self.tags))),
            }
            return kind, "POST", "/posts/", body
        body = {"author_name": "Demo load", "body": f"Comment {seq}."}
        return kind, "POST", f"/posts/{rng.choice(self.post_ids)}/comments/", body


async def discover(url: str) -> Target:
    """Read post ids, author ids and tags from the first 100 posts."""
    client = HttpClient(url)
    try:
        response = await client.request("GET", "/posts/?limit=100")
    finally:
        await client.close()
    if response.status != 200:
        raise SystemExit(f"load: GET /posts/ answered {response.status}: {response.text[:200]}")
    posts = response.json()["results"]
    if not posts:
        raise SystemExit("load: the demo has no posts; run `manage.py seed_demo` first.")
    return Target(
        post_ids=[p["id"] for p in posts],
        author_ids=sorted({p["author"]["id"] for p in posts}),
        tags=sorted({t for p in posts for t in p["tags"]}) or ["load"],
    )


@dataclass
class Tally:
    """Latencies (seconds) and errors per endpoint."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    done: int = 0  # every finished request, warmup included (for the progress bar)

    def total(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def percentile(values: list[float], p: float) -> float:
    """Return the ``p`` quantile (nearest rank) of ``values``, in milliseconds."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000


async def worker(
    n: int, url: str, target: Target, start: float, warm_until: float, end: float, tally: Tally
) -> None:
    rng = random.Random(n)
    client = HttpClient(url)
    seq = n * 1_000_000
    try:
        while (now := time.monotonic()) < end:
            seq += 1
            name, method, path, body = target.request(rng, seq)
            try:
                response = await client.request(method, path, json_body=body)
                status = response.status
            except (OSError, TimeoutError, ValueError):
                await client.close()
                status = 0
            elapsed = time.monotonic() - now
            tally.done += 1
            if now >= warm_until:
                tally.latencies[name].append(elapsed)
                tally.statuses[status] += 1
                if not 200 <= status < 300:
                    tally.errors[name] += 1
    finally:
        await client.close()


async def progress(label: str, start: float, end: float, tally: Tally) -> None:
    """Draw a progress bar on stderr until ``end``."""
    tty = sys.stderr.isatty()
    width = 30
    while True:
        now = time.monotonic()
        frac = min(1.0, (now - start) / (end - start))
        rate = tally.done / max(now - start, 1e-9)
        bar = "#" * round(frac * width) + "-" * (width - round(frac * width))
        shown = min(now, end) - start
        line = f"{label:<16} [{bar}] {shown:4.1f}/{end - start:.1f} s {tally.done:7d} req"
        line += f" {rate:7.0f} req/s"
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        if now >= end:
            print(("" if tty else line), file=sys.stderr, flush=True)
            return
        await asyncio.sleep(0.1)


async def run(
    url: str, seconds: float, concurrency: int, warmup: float, label: str
) -> dict[str, Any]:
    """Run the load and return the figures."""
    target = await discover(url)
    tally = Tally()
    start = time.monotonic()
    warm_until = start + warmup
    end = warm_until + seconds
    bar = asyncio.create_task(progress(label, start, end, tally))
    await asyncio.gather(
        *(worker(n, url, target, start, warm_until, end, tally) for n in range(concurrency))
    )
    measured = time.monotonic() - warm_until
    await bar
    everything = [v for values in tally.latencies.values() for v in values]
    return {
        "label": label,
        "url": url,
        "seconds": round(measured, 2),
        "concurrency": concurrency,
        "requests": len(everything),
        "errors": sum(tally.errors.values()),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "rps": round(len(everything) / measured, 1),
        "p50_ms": round(percentile(everything, 0.50), 2),
        "p99_ms": round(percentile(everything, 0.99), 2),
        "endpoints": {
            name: {
                "requests": len(values),
                "errors": tally.errors.get(name, 0),
                "p50_ms": round(percentile(values, 0.50), 2),
                "p99_ms": round(percentile(values, 0.99), 2),
            }
            for name, values in sorted(tally.latencies.items())
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demotools.load", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="the demo's base URL, http://127.0.0.1:PORT")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default 32)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="uncounted seconds first (default 1)"
    )
    parser.add_argument("--label", default="load", help="name shown on the progress bar")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.seconds > 600:
        parser.error("--seconds must be in (0, 600] and --concurrency at least 1")
    result = asyncio.run(run(args.url, args.seconds, args.concurrency, args.warmup, args.label))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
