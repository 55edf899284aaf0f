//! Wire format of the session gateway.
//!
//! Clients and the gateway exchange fixed-layout, little-endian frames on one QUIC
//! stream. `PROTOCOL.md` beside this crate is the byte-exact specification; this
//! crate implements it with no IO at all: encode into a [`bytes::BufMut`], decode from
//! a byte slice, and tell "need more bytes" apart from a typed [`DecodeError`].
//!
//! ```
//! use proto::{decode, Frame, NewOrder, OrderType, Side, TimeInForce};
//!
//! let order = Frame::from(NewOrder {
//!     client_seq: 1,
//!     client_order_id: 42,
//!     instrument_id: 7,
//!     side: Side::Buy,
//!     order_type: OrderType::Limit,
//!     time_in_force: TimeInForce::Gtc,
//!     price: 10_050,
//!     quantity: 100,
//! });
//! let bytes = order.to_bytes();
//! assert_eq!(decode(&bytes), Ok(Some((order, bytes.len()))));
//! assert_eq!(decode(&bytes[..10]), Ok(None)); // wait for more
//! ```
//!
//! # Layout
//!
//! - [`codec`]: header, limits, [`decode`], [`Frame::encode`], [`DecodeError`].
//! - [`frame`]: the table of every frame type, from which structs and their
//!   encoders and decoders are generated.
//! - [`types`]: closed enums (side, reason codes, ...) and byte strings (token,
//!   nonce, signature).
//! - [`wire`]: fixed-width field encoding.

pub mod codec;
pub mod frame;
pub mod types;
pub mod wire;

pub use codec::{
    decode, decode_buf, decode_header, DecodeError, FrameEncoder, Header, ENCODE_CHUNK, HEADER_LEN,
    MAX_BODY_LEN, MAX_FRAME_LEN, VERSION,
};
pub use frame::*;
pub use types::*;

/// ALPN protocol id of this version, offered in the TLS handshake.
pub const ALPN: &[u8] = b"sgw/1";

/// Bytes the client signs before the Login body fields, so a login signature can
/// never be mistaken for a signature of anything else.
pub const LOGIN_SIGNING_CONTEXT: &[u8] = b"SGW1-LOGIN";

/// The venue id of a development gateway, and clients' default.
pub const DEFAULT_VENUE: &str = "dev";

/// Longest venue id, in bytes.
pub const MAX_VENUE_LEN: usize = 64;

impl Login {
    /// Body bytes covered by the signature: every field before `signature`.
    pub const SIGNED_FIELDS_LEN: usize = Login::BODY_LEN - Signature::LEN;

    /// The exact message an API key signs for this login at `venue` (section 5.1):
    /// [`LOGIN_SIGNING_CONTEXT`], the venue id's length as one byte, the venue id's
    /// bytes, then the first [`Self::SIGNED_FIELDS_LEN`] body bytes. A venue id longer
    /// than [`MAX_VENUE_LEN`] is cut there (gateways refuse to be configured with one).
    pub fn signing_message(&self, venue: &str) -> Vec<u8> {
        let frame = Frame::from(*self);
        let mut encoded = Vec::with_capacity(frame.encoded_len());
        frame.encode(&mut encoded);
        let fields = &encoded[HEADER_LEN..HEADER_LEN + Self::SIGNED_FIELDS_LEN];
        let venue = &venue.as_bytes()[..venue.len().min(MAX_VENUE_LEN)];
        let venue_len = [u8::try_from(venue.len()).unwrap_or(u8::MAX)];
        [LOGIN_SIGNING_CONTEXT, &venue_len, venue, fields].concat()
    }
}
