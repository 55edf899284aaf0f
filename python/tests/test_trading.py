"""Login and trade between two sessions of a real gateway; every request type's
answer; the event and enum types; the end of a session."""

from __future__ import annotations

import asyncio
from typing import Dict, List, Type, TypeVar, Union

import session_gateway as sg
from session_gateway import _native

from conftest import Gateway

E = TypeVar("E")


async def next_of(client: sg.Client, kind: Type[E], timeout: float = 10.0) -> E:
    """The next event of type `kind`; events of other types pass."""

    async def wait() -> E:
        while True:
            event = await client.next_event()
            if isinstance(event, kind):
                return event

    return await asyncio.wait_for(wait(), timeout)


async def test_two_sessions_trade_and_each_side_gets_its_fill_once(gateway: Gateway) -> None:
    async with await gateway.connect(0) as seller, await gateway.connect(1) as buyer:
        assert seller.session_id is not None and seller.session_id != buyer.session_id
        snapshot = await next_of(buyer, sg.Snapshot)
        assert snapshot.orders == [] and snapshot.as_of_server_seq == 0

        sell_seq = seller.new_order(1, 7, sg.Side.SELL, price=100, quantity=10)
        buy_seq = buyer.new_order(1, 8, sg.Side.BUY, price=100, quantity=4)
        assert (sell_seq, buy_seq) == (1, 1)

        accepted = await next_of(seller, sg.Accepted)
        assert (accepted.client_seq, accepted.client_order_id, accepted.side) == (1, 7, sg.Side.SELL)
        assert accepted.side is sg.Side.SELL and accepted.quantity == 10
        buyer_fill = await next_of(buyer, sg.Fill)
        seller_fill = await next_of(seller, sg.Fill)
        assert buyer_fill.trade_id == seller_fill.trade_id
        assert (buyer_fill.quantity, buyer_fill.price, buyer_fill.leaves_quantity) == (4, 100, 0)
        assert (seller_fill.client_order_id, seller_fill.leaves_quantity) == (7, 6)
        assert repr(seller_fill).startswith("Fill(server_seq=")
        assert "side=Side.SELL" in repr(seller_fill)

        # The rest of the sell order: replace it, then cancel it.
        replace_seq = seller.replace(7, 101, 8)
        replaced = await next_of(seller, sg.Replaced)
        assert (replaced.client_seq, replaced.price, replaced.quantity, replaced.leaves_quantity) == (
            replace_seq,
            101,
            8,
            4,
        )
        cancel_seq = seller.cancel(7)
        cancelled = await next_of(seller, sg.Cancelled)
        assert (cancelled.client_seq, cancelled.cancelled_quantity) == (cancel_seq, 4)
        assert cancelled.reason is sg.CancelReason.REQUESTED

        # A cancel of nothing is refused with the protocol's reason.
        unknown_seq = seller.cancel(999)
        rejected = await next_of(seller, sg.Rejected)
        assert (rejected.client_seq, rejected.client_order_id) == (unknown_seq, 999)
        assert rejected.reason is sg.Reason.UNKNOWN_ORDER
        assert rejected.reason == 304 and "Reason.UNKNOWN_ORDER" in repr(rejected)
        assert seller.unprocessed == 0
        assert seller.last_server_seq == rejected.server_seq

    # Leaving the block logged both out.
    assert seller.ended is sg.Reason.LOGGED_OUT and buyer.ended is sg.Reason.LOGGED_OUT
    try:
        seller.new_order(1, 9, sg.Side.SELL, price=100, quantity=1)
    except sg.SessionEndedError:
        pass
    else:
        raise AssertionError("a request after the end was taken")


async def test_mass_cancel_cancels_every_open_order_once_even_before_its_accepted(
    gateway: Gateway,
) -> None:
    async with await gateway.connect(0) as seller, await gateway.connect(1) as buyer:
        for client_order_id in range(1, 6):
            seller.new_order(1, client_order_id, sg.Side.SELL, price=200, quantity=10)
        buyer.new_order(1, 50, sg.Side.BUY, price=200, quantity=10)
        fill = await next_of(buyer, sg.Fill)
        assert fill.leaves_quantity == 0  # sell order 1 is done
        seller.new_order(1, 6, sg.Side.SELL, price=200, quantity=10)  # in flight
        sequences = seller.mass_cancel()
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)

        answers: Dict[int, Union[sg.Cancelled, sg.Rejected]] = {}

        async def answer_all() -> None:
            while len(answers) < len(sequences):
                event = await seller.next_event()
                if isinstance(event, (sg.Cancelled, sg.Rejected)) and event.client_seq in sequences:
                    assert event.client_seq not in answers, f"answered twice: {event!r}"
                    answers[event.client_seq] = event

        await asyncio.wait_for(answer_all(), 10)
        cancelled = {a.client_order_id for a in answers.values() if isinstance(a, sg.Cancelled)}
        refused = [a for a in answers.values() if isinstance(a, sg.Rejected)]
        assert cancelled == {2, 3, 4, 5, 6}
        assert all(r.client_order_id == 1 and r.reason is sg.Reason.UNKNOWN_ORDER for r in refused)
        assert seller.open_orders() == [] and seller.mass_cancel() == []
        assert seller.unprocessed == 0


async def test_logout_ends_the_events_with_ended(gateway: Gateway) -> None:
    client = await gateway.connect(2)
    client.logout()
    kinds: List[str] = [type(event).__name__ async for event in client.events()]
    assert kinds == ["Snapshot", "Ended"]
    assert client.ended is sg.Reason.LOGGED_OUT
    # Nothing more comes, and asking says why.
    try:
        await client.next_event()
    except sg.SessionEndedError as error:
        assert "LOGGED_OUT" in str(error)
    else:
        raise AssertionError("an event after Ended")


async def test_a_market_order_with_its_time_in_force_is_sent_as_given(gateway: Gateway) -> None:
    async with await gateway.connect(3) as client:
        client.new_order(
            1, 1, sg.Side.BUY, price=0, quantity=1, order_type=sg.OrderType.MARKET, time_in_force=sg.TimeInForce.IOC
        )
        # Nothing rests to trade against: accepted, then its remainder cancelled.
        await next_of(client, sg.Accepted)
        cancelled = await next_of(client, sg.Cancelled)
        assert cancelled.reason is sg.CancelReason.IMMEDIATE_REMAINDER


async def test_breaking_out_of_the_events_loses_no_event(gateway: Gateway) -> None:
    async with await gateway.connect(4) as client:
        for order in range(1, 21):
            client.new_order(2, order, sg.Side.BUY, price=5 * order, quantity=10)
        seen: List[int] = []
        while len(seen) < 20:
            async for event in client.events():
                if isinstance(event, sg.Accepted):
                    seen.append(event.client_order_id)
                    break  # one at a time: the rest must still come
        assert seen == list(range(1, 21))


def test_the_python_enums_are_the_protocols() -> None:
    tables = _native.protocol_enums()
    python = {
        "Side": sg.Side,
        "OrderType": sg.OrderType,
        "TimeInForce": sg.TimeInForce,
        "OrderStatus": sg.OrderStatus,
        "CancelReason": sg.CancelReason,
        "Reason": sg.Reason,
    }
    assert set(tables) == set(python)
    for name, members in tables.items():
        expected = [(upper_snake(member), value) for member, value in members]
        assert [(member.name, member.value) for member in python[name]] == expected, name


def upper_snake(name: str) -> str:
    return "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper()
