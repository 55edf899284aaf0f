"""The protocol's enums (PROTOCOL.md sections 2.2 and 7), as `enum.IntEnum`s.

Each member compares equal to its wire value. Names are PROTOCOL.md's in
UPPER_SNAKE_CASE: `ReasonCode::BadSignature` is `Reason.BAD_SIGNATURE`.
"""

from __future__ import annotations

import enum

__all__ = ["Side", "OrderType", "TimeInForce", "OrderStatus", "CancelReason", "Reason"]


class Side(enum.IntEnum):
    """Which side of the book an order is on."""

    BUY = 1
    """Bid."""

    SELL = 2
    """Offer."""


class OrderType(enum.IntEnum):
    """How an order is priced."""

    LIMIT = 1
    """Executes at its limit price or better."""

    MARKET = 2
    """Executes at any price against resting liquidity; `price` must be 0 and the time in force IOC or FOK."""


class TimeInForce(enum.IntEnum):
    """How long an order stays working."""

    GTC = 1
    """Good till cancelled: rests on the book until filled or cancelled."""

    IOC = 2
    """Immediate or cancel: whatever does not fill at once is cancelled."""

    FOK = 3
    """Fill or kill: fills completely at once or not at all."""


class OrderStatus(enum.IntEnum):
    """The state of an order in an order-state snapshot."""

    NEW = 1
    """Working, nothing filled yet."""

    PARTIALLY_FILLED = 2
    """Working, partly filled."""

    FILLED = 3
    """Completely filled; no longer working."""

    CANCELLED = 4
    """Cancelled (by request, IOC/FOK remainder, or cancel-on-disconnect)."""


class CancelReason(enum.IntEnum):
    """Why an order was cancelled, in a `Cancelled` frame."""

    REQUESTED = 1
    """The client asked for it with `Cancel`."""

    IMMEDIATE_REMAINDER = 2
    """The unfilled part of an IOC or market order."""

    FILL_OR_KILL = 3
    """A FOK order that could not fill completely."""

    CANCEL_ON_DISCONNECT = 4
    """The session's cancel-on-disconnect grace period ran out."""

    SESSION_ENDED = 5
    """The session ended (logout, expiry, revocation) with cancel-on-disconnect on."""

    KILL_SWITCH = 6
    """The venue's kill switch cancelled every working order of the account."""


class Reason(enum.IntEnum):
    """Every reason a request, handshake or connection is refused or ended. The same number is used as the QUIC application close code when the gateway closes a connection. PROTOCOL.md lists each code with what the client should do."""

    MALFORMED_FRAME = 1
    """Body length does not match the frame type, or a field has an invalid value."""

    UNKNOWN_FRAME_TYPE = 2
    """The frame type byte is not defined in this protocol version."""

    UNSUPPORTED_VERSION = 3
    """The header's version byte is not one this gateway speaks."""

    FRAME_TOO_LARGE = 4
    """The header announces a body longer than the protocol maximum."""

    UNEXPECTED_FRAME = 5
    """A valid frame that is not allowed in the current state."""

    CLIENT_SEQ_GAP = 6
    """A client sequence number skipped ahead of the next expected one."""

    HANDSHAKE_TIMEOUT = 7
    """No `Login` or `Resume` arrived in time after the stream opened."""

    UNKNOWN_API_KEY = 100
    """The API key id is not known."""

    BAD_SIGNATURE = 101
    """The login signature does not verify under the key."""

    CLOCK_SKEW = 102
    """The login timestamp is too far from the gateway's clock."""

    NONCE_REUSED = 103
    """The login nonce was already used within the replay window."""

    RATE_LIMITED = 104
    """Too many failed attempts from this address; retry after the given delay."""

    TOO_MANY_SESSIONS = 105
    """The gateway holds its maximum number of sessions."""

    TOO_MANY_ACCOUNT_SESSIONS = 106
    """The account holds its maximum number of sessions."""

    INVALID_LOGIN_PARAMETER = 107
    """A login parameter is out of range (for example the grace period)."""

    TOKEN_MALFORMED = 200
    """The token is not a token of this gateway (wrong length or layout version)."""

    TOKEN_UNKNOWN_KEY = 201
    """The token was signed with a key the gateway no longer holds."""

    TOKEN_FORGED = 202
    """The token's authentication tag does not verify."""

    TOKEN_EXPIRED = 203
    """The token is past its expiry."""

    TOKEN_SUPERSEDED = 204
    """The token was superseded by a newer one that has been used: treated as theft, the session is ended."""

    SESSION_NOT_FOUND = 205
    """The session is closed, expired or unknown."""

    ACK_BEYOND_SENT = 206
    """`last_acked_server_seq` is beyond what the gateway ever sent."""

    UNKNOWN_INSTRUMENT = 300
    """The instrument id is not listed."""

    PRICE_OFF_TICK = 301
    """The price is not a multiple of the instrument's tick size."""

    INVALID_PRICE = 302
    """The price is not valid for the order type (limit price not positive, or a market order with a price)."""

    INVALID_QUANTITY = 303
    """The quantity is zero or not a multiple of the lot size."""

    UNKNOWN_ORDER = 304
    """No working order with that client order id in this account."""

    DUPLICATE_CLIENT_ORDER_ID = 305
    """A working order of this account already has that client order id."""

    TOO_MANY_OPEN_ORDERS = 306
    """The session holds its maximum number of open orders."""

    RATE_EXCEEDED = 307
    """The session exceeded its message rate."""

    ENGINE_BUSY = 308
    """The matching engine's input queue is full; retry."""

    INVALID_TIME_IN_FORCE = 309
    """The time in force is not valid for the order type (market orders are IOC or FOK)."""

    SHUTTING_DOWN = 400
    """The gateway is shutting down; resume on another gateway or later."""

    TAKEN_OVER = 401
    """The session was resumed on another connection; this one is closed."""

    SLOW_CONSUMER = 402
    """The client fell too far behind reading or acknowledging; resume to continue."""

    SESSION_EXPIRED = 403
    """The session reached its expiry and is closed."""

    LOGGED_OUT = 404
    """The client logged out."""

    REVOKED = 405
    """An operator revoked the session."""

    INTERNAL_ERROR = 406
    """The gateway failed internally; the session is kept and may be resumed."""
