#!/usr/bin/env python3
"""A matching engine in Python on the session gateways' log, written from ENGINE.md.

It reads the batches of requests the gateways publish to ``<log>_requests``, handles
each request with a price-time book, and appends one answer per batch to the log on
``<log>.answers`` (everything handled while the previous answer was being stored goes
out as one message). With ``--checkpoint FILE`` it writes its state now and then (once
the log has stored the answers up to it) and a restart reads on from there. Run two
for hot-hot: the gateways apply the first answer to each batch.

    python3 engine.py --nats nats://127.0.0.1:4222 --stream GATEWAY_IN --name py-1

Needs nats-py (``pip install nats-py``). Section numbers below are ENGINE.md's.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import os
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import nats
from nats.js import api

log = logging.getLogger("engine")

VERSION = 1
MAX_MESSAGE = 1 << 20  # section 4: at most 1 MiB

# Section 3: sides, order types, times in force, mass cancel scopes.
BUY, SELL = 1, 2
LIMIT, MARKET = 1, 2
GTC, IOC, FOK = 1, 2, 3
SCOPE_ACCOUNT, SCOPE_SESSION = 1, 2
# CancelReason
REQUESTED, IMMEDIATE_REMAINDER, FILL_OR_KILL = 1, 2, 3
# OrderStatus (section 4)
NEW, PARTIALLY_FILLED, FILLED, CANCELLED = 1, 2, 3, 4
# RejectReason (section 4)
UNKNOWN_INSTRUMENT, PRICE_OFF_TICK, INVALID_PRICE, INVALID_QUANTITY = 1, 2, 3, 4
TOO_MANY_OPEN_ORDERS, UNKNOWN_ORDER, DUPLICATE_CLIENT_ORDER_ID = 5, 6, 7
INVALID_TIME_IN_FORCE = 8

Owner = Tuple[int, int]  # (account, session)


# ---------------------------------------------------------------- encodings


class Reader:
    """Reads little-endian fields off a message, refusing one that ends early."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str) -> Tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError("message ends early")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def owner(self) -> Owner:
        account, session = self.take("<QQ")
        return (account, session)


@dataclass
class Request:
    kind: int
    owner: Owner = (0, 0)
    tag: int = 0
    client_order_id: int = 0
    instrument: int = 0
    side: int = 0
    order_type: int = 0
    time_in_force: int = 0
    price: int = 0
    quantity: int = 0
    scope: int = 0
    reason: int = 0
    account: int = 0


def decode_batch(data: bytes) -> Tuple[int, List[Request]]:
    """Section 3: the requests message, as (first request, requests)."""
    r = Reader(data)
    version, first, count = r.take("<BQI")
    if version != VERSION:
        raise ValueError(f"protocol version {version}")
    requests = []
    for _ in range(count):
        (kind,) = r.take("<B")
        if kind == 1:
            owner = r.owner()
            tag, coid, instrument, side, order_type, tif, price, quantity = r.take("<QQIBBBqQ")
            requests.append(Request(kind, owner, tag, coid, instrument, side, order_type, tif, price, quantity))
        elif kind == 2:
            owner = r.owner()
            tag, coid = r.take("<QQ")
            requests.append(Request(kind, owner, tag, coid))
        elif kind == 3:
            owner = r.owner()
            tag, coid, price, quantity = r.take("<QQqQ")
            requests.append(Request(kind, owner, tag, coid, price=price, quantity=quantity))
        elif kind == 4:
            (scope,) = r.take("<B")
            owner = r.owner()
            (reason,) = r.take("<B")
            requests.append(Request(kind, owner, scope=scope, reason=reason))
        elif kind == 5:
            account, tag = r.take("<QQ")
            requests.append(Request(kind, tag=tag, account=account))
        else:
            raise ValueError(f"unknown request type {kind}")
    if r.at != len(data):
        raise ValueError("bytes after the last request")
    return first, requests


@dataclass
class Order:
    order_id: int
    client_order_id: int
    owner: Owner
    instrument: int
    side: int
    price: int
    quantity: int
    filled: int = 0
    status: int = NEW

    @property
    def leaves(self) -> int:
        return 0 if self.status in (FILLED, CANCELLED) else self.quantity - self.filled

    def view(self) -> bytes:
        """Section 4: OrderView, 70 bytes."""
        return struct.pack(
            "<QQQQIBqQQQB", self.order_id, self.client_order_id, self.owner[0], self.owner[1],
            self.instrument, self.side, self.price, self.quantity, self.filled, self.leaves, self.status,
        )


def owner_bytes(owner: Owner) -> bytes:
    return struct.pack("<QQ", owner[0], owner[1])


def scope_bytes(scope: int, owner: Owner) -> bytes:
    account, session = owner
    return struct.pack("<BQQ", scope, account, session if scope == SCOPE_SESSION else 0)


# ---------------------------------------------------------------- the book


@dataclass
class Instrument:
    id: int
    tick_size: int
    lot_size: int


@dataclass
class Book:
    """One instrument's resting orders: price levels, oldest order first."""

    bids: Dict[int, Deque[int]] = field(default_factory=dict)
    asks: Dict[int, Deque[int]] = field(default_factory=dict)
    bid_prices: List[int] = field(default_factory=list)  # ascending; best is last
    ask_prices: List[int] = field(default_factory=list)  # ascending; best is first


class Engine:
    """Price-time matching, deterministic: the same requests give the same events."""

    def __init__(self, instruments: List[Instrument], finished_per_account: int, max_working: int) -> None:
        self.instruments = {i.id: i for i in instruments}
        self.books = {i.id: Book() for i in instruments}
        self.orders: Dict[int, Order] = {}  # working orders by order id
        self.by_client: Dict[Tuple[int, int], int] = {}  # (account, client order id) -> order id
        self.finished: Dict[int, Deque[Order]] = {}
        self.finished_per_account = finished_per_account
        self.max_working = max_working
        self.working_count: Dict[int, int] = {}
        self.next_order_id = 1
        self.next_trade_id = 1

    # -- the requests (section 6: every request answered)

    def handle(self, request: Request) -> bytes:
        """The events of one request, encoded (section 4)."""
        events: List[bytes] = []
        if request.kind == 1:
            self.new_order(request, events)
        elif request.kind == 2:
            self.cancel(request, events)
        elif request.kind == 3:
            self.replace(request, events)
        elif request.kind == 4:
            self.mass_cancel(request, events)
        else:
            self.query(request, events)
        return struct.pack("<I", len(events)) + b"".join(events)

    def reject(self, request: Request, reason: int, events: List[bytes]) -> None:
        events.append(b"\x02" + owner_bytes(request.owner) + struct.pack("<QQB", request.tag, request.client_order_id, reason))

    def validate(self, instrument: Instrument, order_type: int, price: int, quantity: int) -> Optional[int]:
        if order_type == LIMIT and price <= 0 or order_type == MARKET and price != 0:
            return INVALID_PRICE
        if order_type == LIMIT and price % instrument.tick_size != 0:
            return PRICE_OFF_TICK
        if quantity == 0 or quantity % instrument.lot_size != 0:
            return INVALID_QUANTITY
        return None

    def new_order(self, request: Request, events: List[bytes]) -> None:
        instrument = self.instruments.get(request.instrument)
        if instrument is None:
            return self.reject(request, UNKNOWN_INSTRUMENT, events)
        reason = self.validate(instrument, request.order_type, request.price, request.quantity)
        if reason is None and request.order_type == MARKET and request.time_in_force == GTC:
            reason = INVALID_TIME_IN_FORCE
        account = request.owner[0]
        if reason is None and (account, request.client_order_id) in self.by_client:
            reason = DUPLICATE_CLIENT_ORDER_ID
        if reason is None and self.working_count.get(account, 0) >= self.max_working:
            reason = TOO_MANY_OPEN_ORDERS
        if reason is not None:
            return self.reject(request, reason, events)
        order = Order(self.next_order_id, request.client_order_id, request.owner, request.instrument,
                      request.side, request.price, request.quantity)
        self.next_order_id += 1
        events.append(b"\x01" + owner_bytes(order.owner) + struct.pack("<Q", request.tag) + order.view())
        limit = request.price if request.order_type == LIMIT else None
        if request.time_in_force == FOK and self.crossing(order, limit) < order.quantity:
            return self.finish(order, None, None, FILL_OR_KILL, events)
        self.execute(order, limit, events)
        if order.leaves == 0:
            return
        if request.time_in_force == GTC:
            self.rest(order)
        else:
            self.finish(order, None, None, IMMEDIATE_REMAINDER, events)

    def cancel(self, request: Request, events: List[bytes]) -> None:
        order = self.working(request.owner[0], request.client_order_id)
        if order is None:
            return self.reject(request, UNKNOWN_ORDER, events)
        self.unrest(order)
        self.finish(order, request.owner, request.tag, REQUESTED, events)

    def replace(self, request: Request, events: List[bytes]) -> None:
        order = self.working(request.owner[0], request.client_order_id)
        if order is None:
            return self.reject(request, UNKNOWN_ORDER, events)
        instrument = self.instruments[order.instrument]
        reason = self.validate(instrument, LIMIT, request.price, request.quantity)
        if reason is None and request.quantity <= order.filled:
            reason = INVALID_QUANTITY
        if reason is not None:
            return self.reject(request, reason, events)
        keeps_priority = request.price == order.price and request.quantity <= order.quantity
        if not keeps_priority:
            self.unrest(order)
        order.price, order.quantity = request.price, request.quantity
        events.append(b"\x05" + owner_bytes(order.owner) + owner_bytes(request.owner)
                      + struct.pack("<Q", request.tag) + order.view())
        if keeps_priority:
            return
        self.execute(order, order.price, events)
        if order.leaves > 0:
            self.rest(order)

    def mass_cancel(self, request: Request, events: List[bytes]) -> None:
        account, session = request.owner
        in_scope = sorted(
            order_id for order_id, order in self.orders.items()
            if order.owner[0] == account and (request.scope == SCOPE_ACCOUNT or order.owner[1] == session)
        )
        for order_id in in_scope:
            order = self.orders[order_id]
            self.unrest(order)
            self.finish(order, None, None, request.reason, events)
        events.append(b"\x06" + scope_bytes(request.scope, request.owner))

    def query(self, request: Request, events: List[bytes]) -> None:
        working = sorted((o for o in self.orders.values() if o.owner[0] == request.account), key=lambda o: o.order_id)
        orders = working + list(self.finished.get(request.account, ()))
        events.append(b"\x07" + struct.pack("<QQI", request.account, request.tag, len(orders))
                      + b"".join(o.view() for o in orders))

    # -- matching

    def working(self, account: int, client_order_id: int) -> Optional[Order]:
        order_id = self.by_client.get((account, client_order_id))
        return None if order_id is None else self.orders[order_id]

    def opposite(self, order: Order) -> Tuple[Dict[int, Deque[int]], List[int]]:
        book = self.books[order.instrument]
        return (book.asks, book.ask_prices) if order.side == BUY else (book.bids, book.bid_prices)

    def best_first(self, order: Order) -> List[int]:
        _, prices = self.opposite(order)
        return list(prices) if order.side == BUY else list(reversed(prices))

    def crosses(self, order: Order, limit: Optional[int], price: int) -> bool:
        return limit is None or (price <= limit if order.side == BUY else price >= limit)

    def crossing(self, order: Order, limit: Optional[int]) -> int:
        levels, _ = self.opposite(order)
        available = 0
        for price in self.best_first(order):
            if not self.crosses(order, limit, price):
                break
            available += sum(self.orders[i].leaves for i in levels[price])
        return available

    def execute(self, order: Order, limit: Optional[int], events: List[bytes]) -> None:
        levels, prices = self.opposite(order)
        for price in self.best_first(order):
            if order.leaves == 0 or not self.crosses(order, limit, price):
                break
            level = levels[price]
            while level and order.leaves > 0:
                resting = self.orders[level[0]]
                quantity = min(order.leaves, resting.leaves)
                trade_id = self.next_trade_id
                self.next_trade_id += 1
                for side in (order, resting):  # the aggressor's fill first
                    side.filled += quantity
                    side.status = FILLED if side.filled == side.quantity else PARTIALLY_FILLED
                    events.append(b"\x03" + owner_bytes(side.owner) + struct.pack(
                        "<QQQIBqQQ", side.order_id, side.client_order_id, trade_id, side.instrument,
                        side.side, price, quantity, side.leaves))
                if resting.leaves == 0:
                    level.popleft()
                    self.done(resting)
            if not level:
                del levels[price]
                prices.remove(price)
        if order.leaves == 0:
            self.done(order)

    def rest(self, order: Order) -> None:
        book = self.books[order.instrument]
        levels, prices = (book.bids, book.bid_prices) if order.side == BUY else (book.asks, book.ask_prices)
        if order.price not in levels:
            levels[order.price] = deque()
            bisect.insort(prices, order.price)
        levels[order.price].append(order.order_id)
        if order.order_id not in self.orders:
            self.orders[order.order_id] = order
            self.by_client[(order.owner[0], order.client_order_id)] = order.order_id
            self.working_count[order.owner[0]] = self.working_count.get(order.owner[0], 0) + 1

    def unrest(self, order: Order) -> None:
        book = self.books[order.instrument]
        levels, prices = (book.bids, book.bid_prices) if order.side == BUY else (book.asks, book.ask_prices)
        level = levels.get(order.price)
        if level is not None and order.order_id in level:
            level.remove(order.order_id)
            if not level:
                del levels[order.price]
                prices.remove(order.price)

    def done(self, order: Order) -> None:
        """The order stopped working: it goes to the account's finished orders."""
        if self.orders.pop(order.order_id, None) is not None:
            del self.by_client[(order.owner[0], order.client_order_id)]
            self.working_count[order.owner[0]] -= 1
        finished = self.finished.setdefault(order.owner[0], deque())
        finished.append(order)
        while len(finished) > self.finished_per_account:
            finished.popleft()

    def finish(self, order: Order, requester: Optional[Owner], tag: Optional[int], reason: int,
               events: List[bytes]) -> None:
        cancelled = order.leaves
        order.status = CANCELLED
        events.append(b"\x04" + owner_bytes(order.owner) + owner_bytes(requester or order.owner) + struct.pack(
            "<BQQQQB", 0 if tag is None else 1, tag or 0, order.order_id, order.client_order_id, cancelled, reason))
        self.done(order)

    # -- checkpoints (section 8)

    def state(self) -> dict:
        def orders(items) -> list:
            return [[o.order_id, o.client_order_id, list(o.owner), o.instrument, o.side, o.price,
                     o.quantity, o.filled, o.status] for o in items]

        return {
            "next_order_id": self.next_order_id,
            "next_trade_id": self.next_trade_id,
            "working": orders(self.orders.values()),
            "books": {str(i): {"bids": {str(p): list(q) for p, q in b.bids.items()},
                                "asks": {str(p): list(q) for p, q in b.asks.items()}}
                      for i, b in self.books.items()},
            "finished": {str(a): orders(f) for a, f in self.finished.items()},
        }

    def restore(self, state: dict) -> None:
        def order(row: list) -> Order:
            return Order(row[0], row[1], (row[2][0], row[2][1]), row[3], row[4], row[5], row[6], row[7], row[8])

        self.next_order_id, self.next_trade_id = state["next_order_id"], state["next_trade_id"]
        for row in state["working"]:
            o = order(row)
            self.orders[o.order_id] = o
            self.by_client[(o.owner[0], o.client_order_id)] = o.order_id
            self.working_count[o.owner[0]] = self.working_count.get(o.owner[0], 0) + 1
        for instrument, sides in state["books"].items():
            book = self.books[int(instrument)]
            for levels, prices, saved in ((book.bids, book.bid_prices, sides["bids"]),
                                          (book.asks, book.ask_prices, sides["asks"])):
                for price, ids in saved.items():
                    levels[int(price)] = deque(ids)
                prices.extend(sorted(levels))
        for account, rows in state["finished"].items():
            self.finished[int(account)] = deque(order(r) for r in rows)


def load_checkpoint(path: str, engine: Engine) -> int:
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    engine.restore(saved["engine"])
    return int(saved["batch"])


def save_checkpoint(path: str, batch: int, state: dict) -> None:
    """Beside its place, synced, then moved there: a crash leaves the old or the new."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump({"batch": batch, "engine": state}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    log.info("checkpoint written after batch %d", batch)


# ---------------------------------------------------------------- on the log


async def publish_answers(js, subject: str, name: str, queue: "asyncio.Queue[Tuple[int, bytes]]",
                          confirmed: List[int]) -> None:
    """Section 2: answers in order, one message of what queued, sent again until stored."""
    header_len = 1 + 1 + len(name) + 4
    carried: Optional[Tuple[int, bytes]] = None
    while True:
        first = carried or await queue.get()
        carried = None
        batches = [first]
        size = header_len + len(first[1])
        while not queue.empty():
            item = queue.get_nowait()
            if size + len(item[1]) > MAX_MESSAGE:
                carried = item
                break
            batches.append(item)
            size += len(item[1])
        message = (struct.pack("<BB", VERSION, len(name)) + name.encode() + struct.pack("<I", len(batches))
                   + b"".join(answer for _, answer in batches))
        msg_id = f"{name}:{batches[0][0]}:{batches[-1][0]}"
        attempts = 0
        while True:
            attempts += 1
            try:
                await js.publish(subject, message, timeout=2.0, headers={"Nats-Msg-Id": msg_id})
                break
            except Exception as error:  # a timeout, NATS away: the same bytes again
                if attempts % 20 == 1:
                    log.warning("the log did not take answers %s yet (%s); sending again", msg_id, error)
                await asyncio.sleep(0.1)
        confirmed[0] = batches[-1][0]


async def run(args: argparse.Namespace) -> None:
    instruments = [Instrument(*map(int, text.split(":"))) for text in args.instrument] or [
        Instrument(1, 1, 1), Instrument(2, 5, 10)]
    engine = Engine(instruments, args.finished_orders_per_account, args.max_working_orders_per_account)
    answered = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        answered = load_checkpoint(args.checkpoint, engine)
        log.info("checkpoint read: after batch %d", answered)

    nc = await nats.connect(servers=args.nats.split(","), max_reconnect_attempts=-1)
    js = nc.jetstream(timeout=2.0)
    requests_stream = f"{args.stream}_requests"
    while True:
        try:
            await js.stream_info(requests_stream)
            break
        except Exception:
            await asyncio.sleep(0.2)  # the gateways make it
    log.info("engine %s reading %s after batch %d", args.name, requests_stream, answered)

    queue: "asyncio.Queue[Tuple[int, bytes]]" = asyncio.Queue(maxsize=4096)
    confirmed = [answered]
    publisher = asyncio.create_task(publish_answers(js, f"{args.stream}.answers", args.name, queue, confirmed))
    pending: Optional[Tuple[int, dict]] = None
    since_checkpoint = 0
    while True:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if answered else api.DeliverPolicy.ALL,
            opt_start_seq=answered + 1 if answered else None,
        )
        try:
            sub = await js.subscribe(f"{args.stream}.requests", stream=requests_stream, ordered_consumer=True,
                                     config=config, idle_heartbeat=1.0)
        except Exception as error:
            log.warning("cannot read %s (%s); trying again", requests_stream, error)
            await asyncio.sleep(0.2)
            continue
        while True:
            if pending and confirmed[0] >= pending[0] and args.checkpoint:
                save_checkpoint(args.checkpoint, *pending)
                pending = None
            if publisher.done():
                raise RuntimeError(f"the answers publisher stopped: {publisher.exception()}")
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                try:
                    info = await js.stream_info(requests_stream)
                    if info.state.last_seq > answered:
                        log.warning("the read stalled after batch %d; reading again", answered)
                        break
                except Exception:
                    pass
                continue
            number = msg.metadata.sequence.stream
            if number <= answered:
                continue
            if number != answered + 1:
                raise RuntimeError(f"batches {answered + 1} to {number - 1} are gone from {requests_stream}")
            first, requests = decode_batch(msg.data)
            answer = [struct.pack("<QQI", number, first, len(requests))]
            for index, request in enumerate(requests):
                answer.append(struct.pack("<Q", first + index) + engine.handle(request))
            await queue.put((number, b"".join(answer)))
            answered = number
            since_checkpoint += 1
            if args.checkpoint and since_checkpoint >= args.checkpoint_every and pending is None:
                pending = (number, engine.state())
                since_checkpoint = 0
        try:
            await sub.unsubscribe()
        except Exception:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS servers, comma-separated")
    parser.add_argument("--stream", default="GATEWAY_IN", help="the gateways' log (sequencer.stream)")
    parser.add_argument("--name", default="python-engine", help="this engine's name in its answers")
    parser.add_argument("--checkpoint", help="checkpoint file, read at the start and written now and then")
    parser.add_argument("--checkpoint-every", type=int, default=10_000, help="batches between checkpoints")
    parser.add_argument("--instrument", action="append", default=[], help="ID:TICK_SIZE:LOT_SIZE, repeatable")
    parser.add_argument("--finished-orders-per-account", type=int, default=1_024)
    parser.add_argument("--max-working-orders-per-account", type=int, default=50_000)
    args = parser.parse_args()
    if not (1 <= len(args.name) <= 64 and args.name.isascii() and args.name.isprintable() and " " not in args.name):
        parser.error("--name must be 1 to 64 printable ASCII characters, no spaces")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
