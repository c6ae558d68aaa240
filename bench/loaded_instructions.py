"""Count CPU instructions per request under contention (callgrind), contender by contender.

Usage (PostgreSQL from DATABASE_URL)::

    python bench/loaded_instructions.py [--workloads W1,W2,W3] [--concurrency 64]
                                        [--contenders ours,raw_psycopg]

``bench/compare.py`` measures requests per second, which moves with the
machine's load; this counts what one request costs the client process when
``concurrency`` closed-loop clients share a pool of ``BENCH_POOL_MAX`` (20)
connections, as in ``compare.py``: every request is a new task, most of them
wait for a connection. Each contender runs the same workloads as in
``compare.py`` (``bench/worker.py``) in its own process under callgrind,
twice, with 200 and 1,000 requests after a warm-up; the difference divided
by 800 is the cost of one request with start-up and warm-up cancelled out.
Instruction counts are deterministic for a given build, whatever the load;
system calls and page faults are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHORT, LONG = 200, 1000


def run(contender: str, workload: str, concurrency: int, n: int) -> None:
    """Do a warm-up, then ``n`` requests of ``workload`` from ``concurrency`` clients."""
    sys.path.insert(0, str(HERE))
    import worker

    c = worker.CLASSES[contender]()

    async def requests(total: int) -> None:
        await c.prefill()
        body = c.workload(workload)
        loop = asyncio.get_running_loop()
        left = total

        async def client(i: int) -> None:
            nonlocal left
            rng = random.Random(i)
            while left > 0:
                left -= 1
                await loop.create_task(c.request(body, rng))

        await asyncio.gather(*(client(i) for i in range(concurrency)))
        await c.release()

    c.loop.run_until_complete(requests(200))
    c.loop.run_until_complete(requests(n))


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        contender, workload, concurrency, n = sys.argv[2:6]
        run(contender, workload, int(concurrency), int(n))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--contenders", default="ours,raw_psycopg")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import compare
    from instructions import callgrind

    name = compare.create_database()
    os.environ["BENCH_DATABASE_URL"] = compare.db_url(name)
    try:
        contenders = args.contenders.split(",")
        head = " | ".join([f"workload (C={args.concurrency})", *contenders])
        print(f"| {head} | {contenders[-1]} / {contenders[0]} |")
        print("|---|" + "---:|" * (len(contenders) + 1))
        for workload in args.workloads.split(","):
            costs = []
            for contender in contenders:
                cell = (__file__, "--run", contender, workload, str(args.concurrency))
                short, long = callgrind(*cell, str(SHORT)), callgrind(*cell, str(LONG))
                costs.append((long - short) / (LONG - SHORT))
            ratio = f"{costs[-1] / costs[0]:.2f}" if len(costs) > 1 else ""
            cells = " | ".join(f"{cost / 1000:,.0f}k" for cost in costs)
            print(f"| {workload} | {cells} | {ratio} |", flush=True)
    finally:
        compare.drop_database(name)


if __name__ == "__main__":
    main()
