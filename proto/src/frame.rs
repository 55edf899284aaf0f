//! Every frame of the protocol, declared once.
//!
//! The `frames!` table below is the single source of each frame's type byte, field
//! order and field widths; the struct, its constant body length, its encoder and its
//! decoder are all generated from it, so they cannot drift apart. PROTOCOL.md
//! documents the same table and a test checks the two against each other.

use bytes::BufMut;

use crate::types::{
    CancelOnDisconnect, CancelReason, Nonce, OrderStatus, OrderType, ReasonCode, SessionToken,
    Side, Signature, TimeInForce,
};
use crate::wire::WireField;
use crate::DecodeError;

/// One body field of a frame type, for documentation and spec checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Field name.
    pub name: &'static str,
    /// Rust type name, as listed in PROTOCOL.md's type table.
    pub type_name: &'static str,
    /// Width in bytes.
    pub width: usize,
}

/// One frame type's layout, for documentation and spec checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    /// Frame name.
    pub name: &'static str,
    /// Type byte.
    pub frame_type: u8,
    /// Fixed body length.
    pub body_len: usize,
    /// Body fields in wire order.
    pub fields: &'static [FieldSpec],
}

macro_rules! frames {
    (
        $(
            $(#[$meta:meta])*
            $name:ident = $type_byte:literal {
                $( $(#[$fmeta:meta])* $field:ident: $ty:ty, )*
            }
        )*
    ) => {
        $(
            $(#[$meta])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
            pub struct $name {
                $( $(#[$fmeta])* pub $field: $ty, )*
            }

            impl $name {
                /// The frame type byte in the header.
                pub const TYPE: u8 = $type_byte;
                /// The exact body length of this frame type, in bytes.
                pub const BODY_LEN: usize = 0 $(+ <$ty as WireField>::LEN)*;
                /// Body fields in wire order.
                pub const FIELDS: &'static [FieldSpec] = &[
                    $( FieldSpec {
                        name: stringify!($field),
                        type_name: stringify!($ty),
                        width: <$ty as WireField>::LEN,
                    }, )*
                ];

                fn put_body(&self, _dst: &mut impl BufMut) {
                    $( self.$field.put(_dst); )*
                }

                fn take_body(_src: &mut &[u8]) -> Result<Self, DecodeError> {
                    Ok($name {
                        $( $field: <$ty as WireField>::take(_src, stringify!($field))?, )*
                    })
                }
            }

            impl From<$name> for Frame {
                fn from(frame: $name) -> Frame {
                    Frame::$name(frame)
                }
            }
        )*

        /// Any frame of the protocol.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub enum Frame {
            $( $(#[$meta])* $name($name), )*
        }

        /// Every frame type, in table order.
        pub const FRAME_TYPES: &[FrameSpec] = &[
            $( FrameSpec {
                name: stringify!($name),
                frame_type: $type_byte,
                body_len: $name::BODY_LEN,
                fields: $name::FIELDS,
            }, )*
        ];

        impl Frame {
            /// The frame type byte in the header.
            pub const fn frame_type(&self) -> u8 {
                match self { $( Frame::$name(_) => $type_byte, )* }
            }

            /// The frame type's name as used in PROTOCOL.md.
            pub const fn name(&self) -> &'static str {
                match self { $( Frame::$name(_) => stringify!($name), )* }
            }

            /// Body length in bytes (the header's `length` field).
            pub const fn body_len(&self) -> usize {
                match self { $( Frame::$name(_) => $name::BODY_LEN, )* }
            }

            /// Body length for a frame type byte, or `None` for an unknown type.
            pub const fn body_len_of_type(frame_type: u8) -> Option<usize> {
                match frame_type {
                    $( $type_byte => Some($name::BODY_LEN), )*
                    _ => None,
                }
            }

            pub(crate) fn put_body(&self, dst: &mut impl BufMut) {
                match self { $( Frame::$name(f) => f.put_body(dst), )* }
            }

            /// Decodes a body whose length was already checked against the type.
            pub(crate) fn take_body(frame_type: u8, mut body: &[u8]) -> Result<Frame, DecodeError> {
                let frame = match frame_type {
                    $( $type_byte => Frame::$name($name::take_body(&mut body)?), )*
                    other => return Err(DecodeError::UnknownFrameType(other)),
                };
                debug_assert!(body.is_empty(), "body length table and fields disagree");
                Ok(frame)
            }
        }
    };
}

frames! {
    /// Client → gateway, first frame of a new session: full authentication.
    Login = 0x01 {
        /// The API key's id, as registered for the account.
        api_key_id: u64,
        /// Client clock, nanoseconds since the Unix epoch.
        timestamp_ns: u64,
        /// Fresh random bytes; never reuse.
        nonce: Nonce,
        /// Cancel-on-disconnect policy for the life of the session.
        cancel_on_disconnect: CancelOnDisconnect,
        /// Grace period before cancel-on-disconnect fires, in milliseconds.
        cod_grace_ms: u32,
        /// Ed25519 signature over `"SGW1-LOGIN"` followed by the 37 body bytes above.
        signature: Signature,
    }

    /// Client → gateway, first frame of a reconnect: resumes a session with its token.
    Resume = 0x02 {
        /// The latest token the client received.
        token: SessionToken,
        /// Highest server sequence the client has received and processed (0 for none).
        last_acked_server_seq: u64,
        /// The client sequence the client would send next.
        next_client_seq: u64,
    }

    /// Client → gateway: cumulative acknowledgement of server messages.
    Ack = 0x03 {
        /// Every server message up to and including this sequence was received.
        server_seq: u64,
    }

    /// Client → gateway: ends the session for good.
    Logout = 0x04 {}

    /// Client → gateway, sequenced: submit an order.
    NewOrder = 0x10 {
        /// Client sequence number of this message.
        client_seq: u64,
        /// The client's id for the order, unique among the account's working orders.
        client_order_id: u64,
        /// Instrument to trade.
        instrument_id: u32,
        /// Buy or sell.
        side: Side,
        /// Limit or market.
        order_type: OrderType,
        /// GTC, IOC or FOK.
        time_in_force: TimeInForce,
        /// Limit price in price units (0 for market orders).
        price: i64,
        /// Quantity in units of the instrument.
        quantity: u64,
    }

    /// Client → gateway, sequenced: cancel a working order.
    Cancel = 0x11 {
        /// Client sequence number of this message.
        client_seq: u64,
        /// The order to cancel.
        client_order_id: u64,
    }

    /// Client → gateway, sequenced: change price and/or quantity of a working order.
    Replace = 0x12 {
        /// Client sequence number of this message.
        client_seq: u64,
        /// The order to change.
        client_order_id: u64,
        /// New limit price.
        price: i64,
        /// New total quantity (filled quantity included).
        quantity: u64,
    }

    /// Gateway → client: login succeeded; an order-state snapshot follows.
    LoginAccepted = 0x81 {
        /// The new session's id.
        session_id: u64,
        /// Token to present in `Resume`.
        token: SessionToken,
        /// The first client sequence number the gateway expects (1).
        next_client_seq: u64,
        /// The server sequence of the first application message to come (1).
        next_server_seq: u64,
        /// How many unacknowledged server messages the gateway retains for replay.
        replay_window: u32,
        /// Connection idle timeout in milliseconds; keep the connection busier than this.
        idle_timeout_ms: u32,
    }

    /// Gateway → client: login refused; the connection closes.
    LoginRejected = 0x82 {
        /// Why.
        reason: ReasonCode,
        /// For `RateLimited`: how long to wait before trying again (0 otherwise).
        retry_after_ms: u32,
    }

    /// Gateway → client: resume succeeded.
    ResumeAccepted = 0x83 {
        /// The rotated token; the one presented is superseded once this one is used.
        token: SessionToken,
        /// Highest client sequence the gateway processed; re-send everything after it.
        last_processed_client_seq: u64,
        /// Server sequence of the first application message to follow.
        replay_from: u64,
        /// Oldest server sequence the gateway still retained when resuming.
        oldest_available: u64,
        /// True when messages were lost beyond the replay window: an order-state
        /// snapshot as of `replay_from - 1` follows before any application message.
        snapshot_follows: bool,
    }

    /// Gateway → client: resume refused; the connection closes.
    ResumeRejected = 0x84 {
        /// Why.
        reason: ReasonCode,
    }

    /// Gateway → client: the gateway is ending this connection (and says whether the
    /// session survives through the reason).
    Close = 0x85 {
        /// Why.
        reason: ReasonCode,
    }

    /// Gateway → client: a client message with this sequence was already processed and
    /// was not executed again; its outcome is in the server stream.
    Duplicate = 0x86 {
        /// The duplicate's client sequence.
        client_seq: u64,
        /// Highest client sequence processed so far.
        last_processed_client_seq: u64,
    }

    /// Gateway → client: an order-state snapshot starts.
    SnapshotBegin = 0x87 {
        /// The snapshot reflects every server message up to this sequence.
        as_of_server_seq: u64,
        /// Number of `OrderState` frames that follow.
        order_count: u32,
    }

    /// Gateway → client: the authoritative state of one order, inside a snapshot.
    OrderState = 0x88 {
        /// The client's id for the order.
        client_order_id: u64,
        /// The engine's id for the order.
        order_id: u64,
        /// Instrument.
        instrument_id: u32,
        /// Buy or sell.
        side: Side,
        /// Current limit price (0 for market orders).
        price: i64,
        /// Current total quantity.
        quantity: u64,
        /// Quantity filled so far.
        filled_quantity: u64,
        /// Quantity still working (0 once the order is done).
        leaves_quantity: u64,
        /// Working, filled or cancelled.
        status: OrderStatus,
    }

    /// Gateway → client: the snapshot is complete.
    SnapshotEnd = 0x89 {
        /// Same as in `SnapshotBegin`.
        as_of_server_seq: u64,
    }

    /// Gateway → client, sequenced: the order was accepted by the engine.
    OrderAck = 0xA0 {
        /// Server sequence number of this message.
        server_seq: u64,
        /// The `NewOrder` this answers.
        client_seq: u64,
        /// The client's id for the order.
        client_order_id: u64,
        /// The engine's id for the order.
        order_id: u64,
        /// Instrument.
        instrument_id: u32,
        /// Buy or sell.
        side: Side,
        /// Limit price (0 for market orders).
        price: i64,
        /// Quantity.
        quantity: u64,
    }

    /// Gateway → client, sequenced: a `NewOrder`, `Cancel` or `Replace` was refused.
    Reject = 0xA1 {
        /// Server sequence number of this message.
        server_seq: u64,
        /// The request this answers.
        client_seq: u64,
        /// The client order id in that request.
        client_order_id: u64,
        /// Why.
        reason: ReasonCode,
    }

    /// Gateway → client, sequenced: (part of) an order traded.
    Fill = 0xA2 {
        /// Server sequence number of this message.
        server_seq: u64,
        /// The client's id for the order.
        client_order_id: u64,
        /// The engine's id for the order.
        order_id: u64,
        /// Trade id, the same in the fills of both sides.
        trade_id: u64,
        /// Instrument.
        instrument_id: u32,
        /// This order's side.
        side: Side,
        /// Trade price.
        price: i64,
        /// Trade quantity.
        quantity: u64,
        /// Quantity of the order still working after this trade.
        leaves_quantity: u64,
    }

    /// Gateway → client, sequenced: an order stopped working without filling completely.
    Cancelled = 0xA3 {
        /// Server sequence number of this message.
        server_seq: u64,
        /// The `Cancel` this answers, or 0 when unsolicited (see `reason`).
        client_seq: u64,
        /// The client's id for the order.
        client_order_id: u64,
        /// The engine's id for the order.
        order_id: u64,
        /// Quantity that was still working and is now cancelled.
        cancelled_quantity: u64,
        /// Why.
        reason: CancelReason,
    }

    /// Gateway → client, sequenced: a `Replace` was applied.
    Replaced = 0xA4 {
        /// Server sequence number of this message.
        server_seq: u64,
        /// The `Replace` this answers.
        client_seq: u64,
        /// The client's id for the order.
        client_order_id: u64,
        /// The engine's id for the order.
        order_id: u64,
        /// New limit price.
        price: i64,
        /// New total quantity.
        quantity: u64,
        /// Quantity still working after the change.
        leaves_quantity: u64,
    }
}

impl Frame {
    /// The client sequence number of a sequenced client message.
    pub const fn client_seq(&self) -> Option<u64> {
        match self {
            Frame::NewOrder(f) => Some(f.client_seq),
            Frame::Cancel(f) => Some(f.client_seq),
            Frame::Replace(f) => Some(f.client_seq),
            _ => None,
        }
    }

    /// The client sequence number a gateway message answers (section 4, "Who gets an
    /// answer"): `None` for messages that answer nothing, including a `Cancelled` or
    /// `Replaced` told unsolicited (`client_seq` 0).
    pub const fn answered_client_seq(&self) -> Option<u64> {
        match self {
            Frame::OrderAck(f) => Some(f.client_seq),
            Frame::Reject(f) => Some(f.client_seq),
            Frame::Cancelled(f) if f.client_seq != 0 => Some(f.client_seq),
            Frame::Replaced(f) if f.client_seq != 0 => Some(f.client_seq),
            _ => None,
        }
    }

    /// The server sequence number of a sequenced gateway message.
    pub const fn server_seq(&self) -> Option<u64> {
        match self {
            Frame::OrderAck(f) => Some(f.server_seq),
            Frame::Reject(f) => Some(f.server_seq),
            Frame::Fill(f) => Some(f.server_seq),
            Frame::Cancelled(f) => Some(f.server_seq),
            Frame::Replaced(f) => Some(f.server_seq),
            _ => None,
        }
    }

    /// True for frames only a client sends (type bytes below 0x80).
    pub const fn is_from_client(&self) -> bool {
        self.frame_type() < 0x80
    }
}
