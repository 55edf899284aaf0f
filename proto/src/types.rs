//! Field types that are more than a plain integer: closed enums and byte strings.

use crate::wire::{byte_array, wire_enum, WireField};

wire_enum! {
    /// Which side of the book an order is on.
    pub enum Side: u8 {
        /// Bid.
        Buy = 1,
        /// Offer.
        Sell = 2,
    }
}

wire_enum! {
    /// How an order is priced.
    pub enum OrderType: u8 {
        /// Executes at its limit price or better.
        Limit = 1,
        /// Executes at any price against resting liquidity; `price` must be 0 and the
        /// time in force IOC or FOK.
        Market = 2,
    }
}

wire_enum! {
    /// How long an order stays working.
    pub enum TimeInForce: u8 {
        /// Good till cancelled: rests on the book until filled or cancelled.
        Gtc = 1,
        /// Immediate or cancel: whatever does not fill at once is cancelled.
        Ioc = 2,
        /// Fill or kill: fills completely at once or not at all.
        Fok = 3,
    }
}

wire_enum! {
    /// The state of an order in an order-state snapshot.
    pub enum OrderStatus: u8 {
        /// Working, nothing filled yet.
        New = 1,
        /// Working, partly filled.
        PartiallyFilled = 2,
        /// Completely filled; no longer working.
        Filled = 3,
        /// Cancelled (by request, IOC/FOK remainder, or cancel-on-disconnect).
        Cancelled = 4,
    }
}

wire_enum! {
    /// Why an order was cancelled, in a `Cancelled` frame.
    pub enum CancelReason: u8 {
        /// The client asked for it with `Cancel`.
        Requested = 1,
        /// The unfilled part of an IOC or market order.
        ImmediateRemainder = 2,
        /// A FOK order that could not fill completely.
        FillOrKill = 3,
        /// The session's cancel-on-disconnect grace period ran out.
        CancelOnDisconnect = 4,
        /// The session ended (logout, expiry, revocation) with cancel-on-disconnect on.
        SessionEnded = 5,
        /// The venue's kill switch cancelled every working order of the account.
        KillSwitch = 6,
    }
}

wire_enum! {
    /// Cancel-on-disconnect policy, chosen at login for the life of the session.
    pub enum CancelOnDisconnect: u8 {
        /// Orders keep working while the session is detached.
        Off = 0,
        /// Cancel every open order of the session if it is not resumed within the
        /// grace period given in `Login`.
        CancelAll = 1,
    }
}

wire_enum! {
    /// Every reason a request, handshake or connection is refused or ended.
    ///
    /// The same number is used as the QUIC application close code when the gateway
    /// closes a connection. PROTOCOL.md lists each code with what the client should do.
    pub enum ReasonCode: u16 {
        /// Body length does not match the frame type, or a field has an invalid value.
        MalformedFrame = 1,
        /// The frame type byte is not defined in this protocol version.
        UnknownFrameType = 2,
        /// The header's version byte is not one this gateway speaks.
        UnsupportedVersion = 3,
        /// The header announces a body longer than the protocol maximum.
        FrameTooLarge = 4,
        /// A valid frame that is not allowed in the current state.
        UnexpectedFrame = 5,
        /// A client sequence number skipped ahead of the next expected one.
        ClientSeqGap = 6,
        /// No `Login` or `Resume` arrived in time after the stream opened.
        HandshakeTimeout = 7,
        /// The API key id is not known.
        UnknownApiKey = 100,
        /// The login signature does not verify under the key.
        BadSignature = 101,
        /// The login timestamp is too far from the gateway's clock.
        ClockSkew = 102,
        /// The login nonce was already used within the replay window.
        NonceReused = 103,
        /// Too many failed attempts from this address; retry after the given delay.
        RateLimited = 104,
        /// The gateway holds its maximum number of sessions.
        TooManySessions = 105,
        /// The account holds its maximum number of sessions.
        TooManyAccountSessions = 106,
        /// A login parameter is out of range (for example the grace period).
        InvalidLoginParameter = 107,
        /// The token is not a token of this gateway (wrong length or layout version).
        TokenMalformed = 200,
        /// The token was signed with a key the gateway no longer holds.
        TokenUnknownKey = 201,
        /// The token's authentication tag does not verify.
        TokenForged = 202,
        /// The token is past its expiry.
        TokenExpired = 203,
        /// The token was superseded by a newer one that has been used: treated as theft,
        /// the session is ended.
        TokenSuperseded = 204,
        /// The session is closed, expired or unknown.
        SessionNotFound = 205,
        /// `last_acked_server_seq` is beyond what the gateway ever sent.
        AckBeyondSent = 206,
        /// The instrument id is not listed.
        UnknownInstrument = 300,
        /// The price is not a multiple of the instrument's tick size.
        PriceOffTick = 301,
        /// The price is not valid for the order type (limit price not positive, or a
        /// market order with a price).
        InvalidPrice = 302,
        /// The quantity is zero or not a multiple of the lot size.
        InvalidQuantity = 303,
        /// No working order with that client order id in this account.
        UnknownOrder = 304,
        /// A working order of this account already has that client order id.
        DuplicateClientOrderId = 305,
        /// The session holds its maximum number of open orders.
        TooManyOpenOrders = 306,
        /// The session exceeded its message rate.
        RateExceeded = 307,
        /// The matching engine's input queue is full; retry.
        EngineBusy = 308,
        /// The time in force is not valid for the order type (market orders are IOC or FOK).
        InvalidTimeInForce = 309,
        /// The gateway is shutting down; resume on another gateway or later.
        ShuttingDown = 400,
        /// The session was resumed on another connection; this one is closed.
        TakenOver = 401,
        /// The client fell too far behind reading or acknowledging; resume to continue.
        SlowConsumer = 402,
        /// The session reached its expiry and is closed.
        SessionExpired = 403,
        /// The client logged out.
        LoggedOut = 404,
        /// An operator revoked the session.
        Revoked = 405,
        /// The gateway failed internally; the session is kept and may be resumed.
        InternalError = 406,
    }
}

byte_array!(
    /// An opaque session token: 80 bytes the client stores and presents in `Resume`.
    ///
    /// It is a bearer credential, so `Debug` never prints it.
    SessionToken,
    80,
    debug = redacted
);

byte_array!(
    /// A fresh random login nonce; the gateway rejects a nonce it has seen recently.
    Nonce,
    16,
    debug = hex
);

byte_array!(
    /// An Ed25519 signature.
    Signature,
    64,
    debug = hex
);

/// Compile-time check that wire widths are what PROTOCOL.md says.
const _: () = {
    assert!(<Side as WireField>::LEN == 1);
    assert!(<ReasonCode as WireField>::LEN == 2);
};
