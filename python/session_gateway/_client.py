"""The client: `Client.connect`, the requests, and the events."""

from __future__ import annotations

import asyncio
import collections
import os
from pathlib import Path
from types import TracebackType
from typing import AsyncIterator, Deque, List, Optional, Tuple, Type, Union

from . import _native
from ._native import (
    Accepted,
    Cancelled,
    Credentials,
    Ended,
    Fill,
    Reconnecting,
    Rejected,
    Replaced,
    Resumed,
    Snapshot,
)
from .enums import OrderType, Reason, Side, TimeInForce
from .errors import ConfigError, SessionEndedError

__all__ = [
    "Client",
    "Event",
    "DEV_VENUE",
    "DEFAULT_ADDRESS",
    "load_certificate",
    "load_dev_keys",
]

Event = Union[Accepted, Rejected, Fill, Cancelled, Replaced, Snapshot, Reconnecting, Resumed, Ended]
"""Everything `Client.events()` yields."""

DEV_VENUE: str = _native.DEV_VENUE
"""The venue id of a development gateway (`auth.venue` of its defaults)."""

DEFAULT_ADDRESS = "127.0.0.1:4433"
"""Where a development gateway listens."""

PathLike = Union[str, "os.PathLike[str]"]

# Most events taken from the native inbox at once.
_BATCH = 1024


def load_certificate(path: PathLike) -> bytes:
    """The certificate file at `path` (DER or PEM), to trust in `Client.connect`:
    a development gateway's `.gateway-dev/cert.der`, or the one a venue publishes
    (its own certificate, pinned, or its certificate authority's)."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None


def load_dev_keys(path: PathLike) -> List[Tuple[int, Credentials]]:
    """The demo accounts of a development gateway's `client-keys.toml`, as
    `[(account, credentials)]`. A real venue gives each firm its API key id and
    key instead: `Credentials.from_seed(api_key_id, seed)`."""
    return _native.load_dev_keys(os.fspath(path))


class Client:
    """A session with the gateway, kept across connection losses.

    Log in with `await Client.connect(...)`. The client reconnects and resumes by
    itself: requests the gateway did not process are sent again, exactly once;
    messages the client did not acknowledge are replayed; `events()` yields each
    server message once, in order, whatever happened to the connection.

    Requests (`new_order`, `cancel`, `replace`) do not wait: each returns its client
    sequence number at once, and its answer arrives as an event carrying that number
    (`client_seq`). At most `max_unprocessed` requests may wait for answers; beyond
    that a request raises `BackpressureError` and is not sent.

    The client's network work runs on Rust threads of its own, so it never blocks
    the event loop and keeps the connection alive while Python is busy. Events wait
    in a bounded queue (`event_capacity`); while it is full the client stops reading
    from the gateway, and the gateway holds the rest (it may close a connection that
    stays behind, `SlowConsumer`, and the client resumes and receives the rest): a slow
    consumer delays events, it never loses or repeats one.
    """

    def __init__(self, native: _native.NativeClient) -> None:
        """Use `await Client.connect(...)`."""
        self._native = native
        self._pending: Deque[Event] = collections.deque()
        self._ended: Optional[Reason] = None
        self._exhausted = False

    @classmethod
    async def connect(
        cls,
        address: str,
        certificate: Union[bytes, PathLike],
        credentials: Credentials,
        *,
        venue: str = DEV_VENUE,
        server_name: str = "localhost",
        cancel_on_disconnect: bool = False,
        cod_grace: float = 0.0,
        idle_timeout: float = 5.0,
        keep_alive: float = 1.0,
        reconnect_attempts: int = 20,
        reconnect_backoff: float = 0.01,
        max_unprocessed: int = 10_000,
        event_capacity: int = 65_536,
    ) -> "Client":
        """Connects to the gateway at `address` ("host:port") and logs in.

        - `certificate`: the certificate to trust, DER or PEM bytes or a file's path
          (`load_certificate`).
        - `credentials`: the API key (`Credentials.from_seed`, `load_dev_keys`).
        - `venue`: the gateway's venue id, part of the signed login; the venue
          publishes it. The default is a development gateway's.
        - `server_name`: the name the gateway's certificate must carry.
        - `cancel_on_disconnect`: cancel every open order of the session if it is not
          resumed within `cod_grace` seconds of a connection loss.
        - `idle_timeout`: a silent connection is considered dead after this many
          seconds; `keep_alive`: how often the client shows it is alive.
        - `reconnect_attempts`, `reconnect_backoff`: after a loss, attempts before the
          session ends with `Ended(INTERNAL_ERROR)`, and the delay after a failed one
          (seconds, doubling up to 1).
        - `max_unprocessed`: requests that may wait for answers (`BackpressureError`
          beyond); `event_capacity`: events that may wait for `events()`.

        Raises `RefusedError` (or `BadSignatureError`) with the gateway's reason,
        `GatewayConnectionError` when no connection could be made, `ConfigError` for
        a bad address or certificate.
        """
        if not isinstance(certificate, bytes):
            certificate = load_certificate(certificate)
        native = await _native.connect(
            address,
            [certificate],
            credentials,
            venue=venue,
            server_name=server_name,
            cancel_on_disconnect=cancel_on_disconnect,
            cod_grace=cod_grace,
            idle_timeout=idle_timeout,
            keep_alive=keep_alive,
            reconnect_attempts=reconnect_attempts,
            reconnect_backoff=reconnect_backoff,
            max_unprocessed=max_unprocessed,
            event_capacity=event_capacity,
        )
        return cls(native)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        await self.close()

    def new_order(
        self,
        instrument_id: int,
        client_order_id: int,
        side: Side,
        price: int,
        quantity: int,
        *,
        order_type: OrderType = OrderType.LIMIT,
        time_in_force: TimeInForce = TimeInForce.GTC,
    ) -> int:
        """Sends an order; returns its client sequence number.

        `price` is in ticks of the instrument's currency unit as the venue lists it
        (a multiple of its tick size; 0 for a market order), `quantity` in lots (a
        multiple of its lot size). `client_order_id` is the firm's own id, unique
        among the account's working orders. The answer is `Accepted` or `Rejected`;
        then `Fill`s, and `Cancelled` if it stops working unfilled.
        """
        return self._native.new_order(
            instrument_id, client_order_id, side, price, quantity, order_type, time_in_force
        )

    def cancel(self, client_order_id: int) -> int:
        """Cancels a working order; returns the request's client sequence number.
        The answer is `Cancelled` or `Rejected`."""
        return self._native.cancel(client_order_id)

    def mass_cancel(self) -> List[int]:
        """Cancels every order that may still be working (`open_orders()`): one
        cancel each, sent at once; returns their client sequence numbers, in order
        (empty when nothing is open). Each gets its own answer: `Cancelled`, or
        `Rejected` with `Reason.UNKNOWN_ORDER` if the order finished first.

        Protocol version 1 has no single mass-cancel request, so the client sends
        the cancels itself. The gateway processes a session's requests in order, so
        an order sent before the call is covered even before its `Accepted` comes
        back. Raises `BackpressureError`, sending nothing, when the cancels would
        take the client past `max_unprocessed`."""
        return self._native.mass_cancel()

    def open_orders(self) -> List[int]:
        """The client order ids of every order that may still be working, in
        order: those this session sent and has not seen fill completely, cancelled
        or refused, and the working orders of the latest `Snapshot` (which include
        orders of the account's ended sessions, whose news this session gets)."""
        return self._native.open_orders()

    def replace(self, client_order_id: int, price: int, quantity: int) -> int:
        """Changes a working order's price and total quantity (filled quantity
        included); returns the request's client sequence number. The answer is
        `Replaced` or `Rejected`."""
        return self._native.replace(client_order_id, price, quantity)

    def logout(self) -> None:
        """Ends the session for good; `Ended(LOGGED_OUT)` follows in `events()`.
        While the client is reconnecting the logout goes after the resume. Raises
        `SessionEndedError` once the session is over."""
        self._native.logout()

    def drop_connection(self) -> None:
        """Drops the current connection as a network failure would; the client
        reconnects and resumes by itself (`Resumed` follows). For failover drills."""
        self._native.drop_connection()

    @property
    def session_id(self) -> Optional[int]:
        """The session's id, as the gateway's admin listener shows it."""
        return self._native.session_id

    @property
    def last_server_seq(self) -> int:
        """The highest server sequence received."""
        return self._native.last_server_seq

    @property
    def unprocessed(self) -> int:
        """Requests sent and not yet known to be processed."""
        return self._native.unprocessed

    @property
    def ended(self) -> Optional[Reason]:
        """Why the session ended, once `events()` has yielded `Ended`."""
        return self._ended

    async def next_event(self) -> Event:
        """The next event; raises `SessionEndedError` once `Ended` was yielded and
        nothing more will come."""
        event = await self._next()
        if event is None:
            raise SessionEndedError(f"the session has ended ({self._ended!r})")
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, until and including `Ended`.

        Leaving the loop early loses nothing: the next `events()` or `next_event()`
        goes on with the event after the last one yielded.
        """
        while True:
            event = await self._next()
            if event is None:
                return
            yield event

    async def close(self, timeout: float = 5.0) -> Optional[Reason]:
        """Logs out and waits up to `timeout` seconds for the gateway's goodbye,
        discarding the events before it; returns why the session ended (None if the
        goodbye did not come in time: the session then ends at the gateway when its
        detached lifetime runs out). Does nothing once the session has ended."""
        if self._ended is not None or self._exhausted:
            return self._ended
        try:
            self.logout()
        except SessionEndedError:
            pass

        async def goodbye() -> None:
            while await self._next() is not None:
                pass

        try:
            await asyncio.wait_for(goodbye(), timeout)
        except asyncio.TimeoutError:
            pass
        return self._ended

    async def _next(self) -> Optional[Event]:
        """The next event, or None once the session is over and all were yielded."""
        while not self._pending:
            if self._exhausted:
                return None
            batch = self._native.take_events(_BATCH)
            if batch:
                self._pending.extend(batch)
            elif not await self._native.wait_events():
                # No more will come; the inbox may still hold the last.
                self._pending.extend(self._native.take_events(_BATCH))
                self._exhausted = not self._pending
        event = self._pending.popleft()
        if isinstance(event, Ended):
            self._ended = event.reason
            self._exhausted = True
        return event
