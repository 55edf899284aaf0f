"""The exceptions the client raises; every one is a `GatewayError`."""

from __future__ import annotations

from .enums import Reason

__all__ = [
    "GatewayError",
    "RefusedError",
    "BadSignatureError",
    "GatewayConnectionError",
    "ProtocolViolationError",
    "BackpressureError",
    "SessionEndedError",
    "ConfigError",
]


class GatewayError(Exception):
    """Something the client could not do; `str()` says what and why."""


class RefusedError(GatewayError):
    """The gateway refused the login, or ended the session before it was established.

    `reason` is the gateway's reason code (PROTOCOL.md section 7), for example
    `Reason.UNKNOWN_API_KEY`, `Reason.RATE_LIMITED` or `Reason.SHUTTING_DOWN`.
    """

    reason: Reason

    def __init__(self, message: str, reason: int) -> None:
        super().__init__(message)
        self.reason = Reason(reason)


class BadSignatureError(RefusedError):
    """The gateway refused the login's signature (`Reason.BAD_SIGNATURE`).

    Either the API key is not the one the gateway holds for `api_key_id`, or the login
    was signed for another venue id than the gateway's (`venue`; the two look the
    same to the gateway): check the venue id first.
    """

    api_key_id: int
    venue: str

    def __init__(self, message: str, reason: int, api_key_id: int, venue: str) -> None:
        super().__init__(message, reason)
        self.api_key_id = api_key_id
        self.venue = venue


class GatewayConnectionError(GatewayError, ConnectionError):
    """The connection could not be made (no gateway at the address, a certificate
    that is not trusted, a wrong server name) or broke during the login."""


class ProtocolViolationError(GatewayError):
    """The gateway broke the protocol during the login."""


class BackpressureError(GatewayError):
    """Too many requests are waiting for answers (`max_unprocessed`): read events
    until some are answered, then send again. Nothing was sent."""


class SessionEndedError(GatewayError):
    """The session is over (logged out, revoked, expired, or the client gave up
    reconnecting); nothing more can be sent. Log in again for a new session."""


class ConfigError(GatewayError, ValueError):
    """Keys, certificates or an address could not be loaded or understood."""
