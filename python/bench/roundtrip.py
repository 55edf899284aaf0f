"""Order round trips from Python: closed loop (one order in flight) and a window of
64, against a running gateway; prints one JSON line. `scripts/bench-python.sh` runs
it beside the Rust client's twin (`client/examples/roundtrip.rs`) on one gateway.

Each order is an IOC limit buy with nothing to trade against: `Accepted`, then
`Cancelled`, so no order stays open. The round trip is `new_order` to its `Accepted`.
"""

import argparse
import asyncio
import json
import time
from typing import Dict, List

import session_gateway as sg


def percentile(samples: List[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(client: sg.Client, orders: int, window: int, first_id: int) -> Dict[str, float]:
    sent_at: Dict[int, float] = {}
    samples: List[float] = []
    next_id = first_id
    started = time.perf_counter()
    events = client.events()
    while len(samples) < orders:
        while len(sent_at) < window and next_id < first_id + orders:
            sent_at[next_id] = time.perf_counter()
            client.new_order(1, next_id, sg.Side.BUY, 1, 1, time_in_force=sg.TimeInForce.IOC)
            next_id += 1
        event = await events.__anext__()
        if isinstance(event, sg.Accepted):
            samples.append(time.perf_counter() - sent_at.pop(event.client_order_id))
        elif isinstance(event, sg.Rejected):
            raise SystemExit(f"order rejected: {event.reason!r}")
    elapsed = time.perf_counter() - started
    return {
        "p50_us": round(percentile(samples, 0.50) * 1e6, 1),
        "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
        "orders_per_s": round(orders / elapsed),
    }


async def main(gateway: str, orders: int) -> None:
    certificate = sg.load_certificate(".gateway-dev/cert.der")
    (_account, credentials), *_ = sg.load_dev_keys(".gateway-dev/client-keys.toml")
    async with await sg.Client.connect(gateway, certificate, credentials) as client:
        base = time.time_ns() // 1000
        await run(client, 1000, 1, base)  # warm-up
        closed = await run(client, orders, 1, base + 1_000_000)
        windowed = await run(client, orders * 4, 64, base + 2_000_000)
    print(json.dumps({"client": "python", "closed_loop": closed, "window_64": windowed}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default=sg.DEFAULT_ADDRESS, help="HOST:PORT")
    parser.add_argument("--orders", type=int, default=5000, help="closed-loop orders (4x in the window run)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.gateway, arguments.orders))
