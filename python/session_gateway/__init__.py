"""Python client for the session gateway: the Rust client library behind asyncio.

It logs in once and keeps the session across connection losses: requests the
gateway did not process are sent again exactly once, messages the client did not
acknowledge are replayed, and `Client.events()` yields each server message once, in
order. Prices are integers in ticks and quantities integers in lots.

    import asyncio, session_gateway as sg

    async def main() -> None:
        certificate = sg.load_certificate(".gateway-dev/cert.der")
        (_account, credentials), *_ = sg.load_dev_keys(".gateway-dev/client-keys.toml")
        async with await sg.Client.connect("127.0.0.1:4433", certificate, credentials) as client:
            client.new_order(1, 42, sg.Side.BUY, 100, 10)
            async for event in client.events():
                print(event)

    asyncio.run(main())
"""

from ._client import DEFAULT_ADDRESS, DEV_VENUE, Client, Event, load_certificate, load_dev_keys
from ._native import (
    Accepted,
    Cancelled,
    Credentials,
    Ended,
    Fill,
    OrderState,
    Reconnecting,
    Rejected,
    Replaced,
    Resumed,
    Snapshot,
)
from .enums import CancelReason, OrderStatus, OrderType, Reason, Side, TimeInForce
from .errors import (
    BackpressureError,
    BadSignatureError,
    ConfigError,
    GatewayConnectionError,
    GatewayError,
    ProtocolViolationError,
    RefusedError,
    SessionEndedError,
)

__all__ = [
    "Client",
    "Event",
    "Credentials",
    "DEV_VENUE",
    "DEFAULT_ADDRESS",
    "load_certificate",
    "load_dev_keys",
    "Accepted",
    "Rejected",
    "Fill",
    "Cancelled",
    "Replaced",
    "Snapshot",
    "OrderState",
    "Reconnecting",
    "Resumed",
    "Ended",
    "Side",
    "OrderType",
    "TimeInForce",
    "OrderStatus",
    "CancelReason",
    "Reason",
    "GatewayError",
    "RefusedError",
    "BadSignatureError",
    "GatewayConnectionError",
    "ProtocolViolationError",
    "BackpressureError",
    "SessionEndedError",
    "ConfigError",
]
