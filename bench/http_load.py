"""The Python load generator of ``bench/http_bench.py``, used when ``wrk`` is not installed.

Run as a separate process: ``python bench/http_load.py URL --concurrency C
--seconds S`` keeps C keep-alive connections busy (standard library only,
the demo's ``demotools.client``) and prints one JSON object: requests,
requests/s, p50/p99 latency in ms and errors. It is much slower than wrk,
so it caps the throughput it can show; the report says which one ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "demo"))

from demotools.client import HttpClient


async def drive(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """Keep ``concurrency`` connections sending GET ``url`` for ``seconds``."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        client = HttpClient(base)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.request("GET", path)
                except (TimeoutError, OSError):
                    errors += 1
                    continue
                if response.status != 200:
                    errors += 1
                latencies.append(time.perf_counter() - started)
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(drive(args.url, args.concurrency, args.seconds))))


if __name__ == "__main__":
    main()
