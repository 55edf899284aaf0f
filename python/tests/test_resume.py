"""Connection losses with requests in flight: an abrupt cut of the network path,
a slow Python consumer, back-pressure. Every request is answered once, every fill
arrives once, in order."""

from __future__ import annotations

import asyncio
from typing import Dict, List, Set

import session_gateway as sg

from conftest import Gateway, Relay

# A client behind the relay notices a dead path within a second.
FAST_LOSS = dict(idle_timeout=1.0, keep_alive=0.2, reconnect_backoff=0.05)


class Ledger:
    """What one client received: answers by client sequence, fills by trade, and the
    server sequences in order of arrival."""

    def __init__(self) -> None:
        self.answers: Dict[int, List[str]] = {}
        self.trades: Dict[int, int] = {}
        self.server_seqs: List[int] = []
        self.resumed = 0

    def take(self, event: sg.Event) -> None:
        if isinstance(event, sg.Resumed):
            self.resumed += 1
        elif isinstance(event, sg.Snapshot):
            self.server_seqs.append(event.as_of_server_seq)
        elif isinstance(event, sg.Fill):
            self.server_seqs.append(event.server_seq)
            assert event.trade_id not in self.trades, f"fill {event.trade_id} twice"
            self.trades[event.trade_id] = event.quantity
        elif isinstance(event, (sg.Accepted, sg.Rejected, sg.Cancelled, sg.Replaced)):
            self.server_seqs.append(event.server_seq)
            self.answers.setdefault(event.client_seq, []).append(type(event).__name__)
        elif isinstance(event, sg.Ended):
            raise AssertionError(f"session ended: {event.reason!r}")

    def assert_in_order(self) -> None:
        gaps = [(a, b) for a, b in zip(self.server_seqs, self.server_seqs[1:]) if b != a + 1]
        assert not gaps, f"server sequences not consecutive: {gaps[:5]}"


async def read_until(client: sg.Client, ledger: Ledger, done: "asyncio.Future[None]", check: object) -> None:
    async for event in client.events():
        ledger.take(event)
        if callable(check) and check():
            done.set_result(None)
            return


async def test_an_abrupt_cut_with_orders_in_flight_then_resume_loses_and_repeats_nothing(
    gateway: Gateway,
) -> None:
    relay = await Relay.start(gateway.address)
    orders = 400
    maker = await gateway.connect(0, relay.address, **FAST_LOSS)
    taker = await gateway.connect(1, relay.address, **FAST_LOSS)
    maker_ledger, taker_ledger = Ledger(), Ledger()

    def complete(ledger: Ledger) -> bool:
        return len(ledger.answers) == orders and sum(ledger.trades.values()) == orders

    loop = asyncio.get_running_loop()
    maker_done: asyncio.Future[None] = loop.create_future()
    taker_done: asyncio.Future[None] = loop.create_future()
    readers = [
        asyncio.ensure_future(read_until(maker, maker_ledger, maker_done, lambda: complete(maker_ledger))),
        asyncio.ensure_future(read_until(taker, taker_ledger, taker_done, lambda: complete(taker_ledger))),
    ]
    try:
        for order in range(1, orders + 1):
            maker.new_order(1, order, sg.Side.SELL, price=100, quantity=1)
            taker.new_order(1, order, sg.Side.BUY, price=100, quantity=1)
            if order == orders // 2:
                # The path dies in the middle of the flow: what is in flight is lost
                # with it, and the rest waits in the client.
                relay.cut()
            if order % 50 == 0:
                await asyncio.sleep(0.01)
        assert maker.unprocessed > 0 and taker.unprocessed > 0
        await asyncio.sleep(1.5)  # both clients' connections time out
        relay.mend()
        await asyncio.wait_for(asyncio.gather(maker_done, taker_done), 30)
        # Through the relay still: the gateway must hear the logouts.
        assert await maker.close() is sg.Reason.LOGGED_OUT
        assert await taker.close() is sg.Reason.LOGGED_OUT
    finally:
        for reader in readers:
            reader.cancel()
        relay.close()

    for ledger in (maker_ledger, taker_ledger):
        assert ledger.resumed >= 1, "the cut went unnoticed"
        assert sorted(ledger.answers) == list(range(1, orders + 1))
        twice = {seq: kinds for seq, kinds in ledger.answers.items() if kinds != ["Accepted"]}
        assert not twice, f"answers not exactly one Accepted: {list(twice.items())[:5]}"
        ledger.assert_in_order()
    # Every trade reached both sides, once.
    assert maker_ledger.trades == taker_ledger.trades
    assert maker.unprocessed == 0 and taker.unprocessed == 0


async def test_a_slow_consumer_delays_events_and_never_drops_or_repeats_one(gateway: Gateway) -> None:
    requests = 5_000
    async with await gateway.connect(2, event_capacity=16) as client:
        for order in range(1, requests + 1):
            # Cancels of orders that do not exist: one Rejected each.
            client.cancel(order)
            if order % 2_000 == 0:
                await asyncio.sleep(0.3)  # within the session's message rate
        await asyncio.sleep(1.0)  # read nothing while the answers arrive
        ledger = Ledger()
        answered: Set[int] = set()
        async for event in client.events():
            ledger.take(event)
            if isinstance(event, sg.Rejected):
                assert event.client_order_id == event.client_seq
                answered.add(event.client_seq)
                if len(answered) % 500 == 0:
                    await asyncio.sleep(0.05)  # and read slowly
                if len(answered) == requests:
                    break
        assert sorted(ledger.answers) == list(range(1, requests + 1))
        assert all(kinds == ["Rejected"] for kinds in ledger.answers.values())
        ledger.assert_in_order()


async def test_requests_beyond_max_unprocessed_are_refused_and_not_sent(gateway: Gateway) -> None:
    relay = await Relay.start(gateway.address)
    try:
        client = await gateway.connect(3, relay.address, max_unprocessed=3, **FAST_LOSS)
        relay.cut()  # no answer can come back
        sequences = [client.cancel(order) for order in (1, 2, 3)]
        try:
            client.cancel(4)
        except sg.BackpressureError as error:
            assert "unprocessed" in str(error)
        else:
            raise AssertionError("a fourth request was taken")
        assert client.unprocessed == 3
        relay.mend()
        ledger = Ledger()
        while len(ledger.answers) < 3:
            ledger.take(await asyncio.wait_for(client.next_event(), 30))
        assert sorted(ledger.answers) == sequences
        # Room again: the next request takes the next sequence.
        assert client.cancel(4) == 4
        assert await client.close() is sg.Reason.LOGGED_OUT
    finally:
        relay.close()
