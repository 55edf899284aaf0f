//! The engine protocol's encodings (ENGINE.md): a batch of sequenced requests, as
//! the gateways publish it to the requests stream, and an engine's answers to
//! consecutive batches, as the engine appends them to the gateways' stream.
//!
//! Fixed little-endian layouts, no padding; every length is checked against the
//! bytes left before anything is allocated, so a hostile message costs an error,
//! never a panic or a large allocation.

use crate::api::{
    CancelReason, Event, Fill, MassCancelScope, NewOrder, OrderStatus, OrderType, OrderView, Owner,
    RejectReason, Request, Side, TimeInForce,
};

/// The protocol version both messages start with.
pub const VERSION: u8 = 1;

/// Largest message of either kind (NATS's default largest payload).
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// Longest engine name in an answer.
pub const MAX_ENGINE_NAME_LEN: usize = 64;

/// Bytes of a requests message before its first request.
pub const REQUESTS_HEADER_LEN: usize = 1 + 8 + 4;

/// Bytes of the largest encoded request (a `New`).
pub const MAX_REQUEST_LEN: usize = 1 + 16 + 8 + 8 + 4 + 3 + 8 + 8;

/// Bytes of one order's state (`OrderView`).
const ORDER_VIEW_LEN: usize = 8 + 8 + 16 + 4 + 1 + 8 + 8 + 8 + 8 + 1;

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Another protocol version.
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u8),
    /// Ends inside a field, or a count promises more than the message holds.
    #[error("message ends early")]
    Truncated,
    /// Bytes left after the last field.
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
    /// A type or enumeration byte with no meaning.
    #[error("unknown {what} {value}")]
    Unknown {
        /// The field.
        what: &'static str,
        /// Its byte.
        value: u8,
    },
    /// An engine name that is empty, too long, or not printable ASCII.
    #[error("engine name must be 1 to 64 printable ASCII characters")]
    EngineName,
    /// A field that must be 0 is not: the `tag` of a `Cancelled` without one, the
    /// `session` of an account's scope. Every byte means something, so equal
    /// answers are equal bytes.
    #[error("{0} must be 0")]
    NotZero(&'static str),
    /// An answer's request sequences are not its batch's, one after another.
    #[error("answer for request {found}, expected {expected}")]
    RequestSequence {
        /// The sequence the answer should have named.
        expected: u64,
        /// The one it named.
        found: u64,
    },
}

/// A batch of requests as the requests stream holds it: the batch's number is its
/// message's sequence in that stream; its requests are numbered on from
/// `first_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBatch {
    /// The sequence number of the batch's first request.
    pub first_request: u64,
    /// The requests, in the order the engine handles them.
    pub requests: Vec<Request>,
}

impl RequestBatch {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(REQUESTS_HEADER_LEN + self.requests.len() * MAX_REQUEST_LEN);
        out.push(VERSION);
        put_u64(&mut out, self.first_request);
        put_u32(&mut out, len_u32(self.requests.len()));
        for request in &self.requests {
            encode_request(request, &mut out);
        }
        out
    }

    /// Reads a requests message.
    pub fn decode(bytes: &[u8]) -> Result<RequestBatch, WireError> {
        let mut r = Reader::new(bytes)?;
        let first_request = r.u64()?;
        let count = r.count(1)?;
        let mut requests = Vec::with_capacity(count);
        for _ in 0..count {
            requests.push(decode_request(&mut r)?);
        }
        r.end()?;
        Ok(RequestBatch {
            first_request,
            requests,
        })
    }
}

/// Encoded length of `request` (for a gateway sizing its batches).
pub fn request_len(request: &Request) -> usize {
    let mut out = Vec::with_capacity(MAX_REQUEST_LEN);
    encode_request(request, &mut out);
    out.len()
}

/// An engine's answer to one batch: for each of its requests, in order, the events
/// it caused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchAnswer {
    /// The batch answered: its sequence in the requests stream.
    pub batch: u64,
    /// The sequence number of the batch's first request.
    pub first_request: u64,
    /// Each request's events, in the batch's order.
    pub events: Vec<Vec<Event>>,
}

impl BatchAnswer {
    /// The batch answer's bytes as an answers message holds them: what hot-hot
    /// engines must agree on, byte for byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.events.len() * 128);
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        put_u64(out, self.batch);
        put_u64(out, self.first_request);
        put_u32(out, len_u32(self.events.len()));
        for (index, events) in self.events.iter().enumerate() {
            // Wrapping, as the decoder reads it: an answer decoded from any bytes
            // encodes again (to digest it) without overflowing.
            put_u64(out, self.first_request.wrapping_add(index as u64));
            put_u32(out, len_u32(events.len()));
            for event in events {
                encode_event(event, out);
            }
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<BatchAnswer, WireError> {
        let batch = r.u64()?;
        let first_request = r.u64()?;
        let count = r.count(12)?;
        let mut events = Vec::with_capacity(count);
        for index in 0..count {
            let expected = first_request.wrapping_add(index as u64);
            let found = r.u64()?;
            if found != expected {
                return Err(WireError::RequestSequence { expected, found });
            }
            let n = r.count(1)?;
            let mut request_events = Vec::with_capacity(n);
            for _ in 0..n {
                request_events.push(decode_event(r)?);
            }
            events.push(request_events);
        }
        Ok(BatchAnswer {
            batch,
            first_request,
            events,
        })
    }
}

/// An answers message: one engine's answers to consecutive batches, in order (an
/// engine answers whatever it handled while its previous message was being
/// stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    /// Who answers (for the gateways' logs and metrics; not part of the
    /// comparison between engines).
    pub engine: String,
    /// The batches' answers, in batch order.
    pub batches: Vec<BatchAnswer>,
}

/// An answers message of `engine`'s batch answers, each encoded already
/// ([`BatchAnswer::encode`]).
pub fn encode_answers(engine: &str, batches: &[Vec<u8>]) -> Vec<u8> {
    let name = engine.as_bytes();
    let name = &name[..name.len().min(MAX_ENGINE_NAME_LEN)];
    let len = answers_header_len(engine) + batches.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.push(VERSION);
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(name);
    put_u32(&mut out, len_u32(batches.len()));
    for batch in batches {
        out.extend_from_slice(batch);
    }
    out
}

/// Bytes of an answers message before its first batch, for an engine named `name`.
pub fn answers_header_len(name: &str) -> usize {
    1 + 1 + name.len() + 4
}

impl Answers {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let batches: Vec<Vec<u8>> = self.batches.iter().map(BatchAnswer::encode).collect();
        encode_answers(&self.engine, &batches)
    }

    /// Reads an answers message.
    pub fn decode(bytes: &[u8]) -> Result<Answers, WireError> {
        let mut r = Reader::new(bytes)?;
        let name_len = usize::from(r.u8()?);
        let name = r.take(name_len)?;
        if name.is_empty()
            || name.len() > MAX_ENGINE_NAME_LEN
            || !name.iter().all(u8::is_ascii_graphic)
        {
            return Err(WireError::EngineName);
        }
        let engine = String::from_utf8_lossy(name).into_owned();
        let count = r.count(20)?;
        let mut batches = Vec::with_capacity(count);
        for _ in 0..count {
            batches.push(BatchAnswer::decode_from(&mut r)?);
        }
        r.end()?;
        Ok(Answers { engine, batches })
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_owner(out: &mut Vec<u8>, owner: Owner) {
    put_u64(out, owner.account);
    put_u64(out, owner.session);
}

fn put_scope(out: &mut Vec<u8>, scope: MassCancelScope) {
    match scope {
        MassCancelScope::Account(account) => {
            out.push(1);
            put_u64(out, account);
            put_u64(out, 0);
        }
        MassCancelScope::Session(owner) => {
            out.push(2);
            put_owner(out, owner);
        }
    }
}

fn put_view(out: &mut Vec<u8>, view: &OrderView) {
    put_u64(out, view.order_id);
    put_u64(out, view.client_order_id);
    put_owner(out, view.owner);
    put_u32(out, view.instrument);
    out.push(side_byte(view.side));
    put_i64(out, view.price);
    put_u64(out, view.quantity);
    put_u64(out, view.filled);
    put_u64(out, view.leaves);
    out.push(match view.status {
        OrderStatus::New => 1,
        OrderStatus::PartiallyFilled => 2,
        OrderStatus::Filled => 3,
        OrderStatus::Cancelled => 4,
    });
}

const fn side_byte(side: Side) -> u8 {
    match side {
        Side::Buy => 1,
        Side::Sell => 2,
    }
}

const fn cancel_reason_byte(reason: CancelReason) -> u8 {
    match reason {
        CancelReason::Requested => 1,
        CancelReason::ImmediateRemainder => 2,
        CancelReason::FillOrKill => 3,
        CancelReason::CancelOnDisconnect => 4,
        CancelReason::SessionEnded => 5,
        CancelReason::KillSwitch => 6,
    }
}

const fn reject_reason_byte(reason: RejectReason) -> u8 {
    match reason {
        RejectReason::UnknownInstrument => 1,
        RejectReason::PriceOffTick => 2,
        RejectReason::InvalidPrice => 3,
        RejectReason::InvalidQuantity => 4,
        RejectReason::TooManyOpenOrders => 5,
        RejectReason::UnknownOrder => 6,
        RejectReason::DuplicateClientOrderId => 7,
        RejectReason::InvalidTimeInForce => 8,
    }
}

fn encode_request(request: &Request, out: &mut Vec<u8>) {
    match *request {
        Request::New(order) => {
            out.push(1);
            put_owner(out, order.owner);
            put_u64(out, order.tag);
            put_u64(out, order.client_order_id);
            put_u32(out, order.instrument);
            out.push(side_byte(order.side));
            out.push(match order.order_type {
                OrderType::Limit => 1,
                OrderType::Market => 2,
            });
            out.push(match order.time_in_force {
                TimeInForce::Gtc => 1,
                TimeInForce::Ioc => 2,
                TimeInForce::Fok => 3,
            });
            put_i64(out, order.price);
            put_u64(out, order.quantity);
        }
        Request::Cancel {
            owner,
            tag,
            client_order_id,
        } => {
            out.push(2);
            put_owner(out, owner);
            put_u64(out, tag);
            put_u64(out, client_order_id);
        }
        Request::Replace {
            owner,
            tag,
            client_order_id,
            price,
            quantity,
        } => {
            out.push(3);
            put_owner(out, owner);
            put_u64(out, tag);
            put_u64(out, client_order_id);
            put_i64(out, price);
            put_u64(out, quantity);
        }
        Request::MassCancel { scope, reason } => {
            out.push(4);
            put_scope(out, scope);
            out.push(cancel_reason_byte(reason));
        }
        Request::QueryOrders { account, tag } => {
            out.push(5);
            put_u64(out, account);
            put_u64(out, tag);
        }
    }
}

fn encode_event(event: &Event, out: &mut Vec<u8>) {
    match event {
        Event::Accepted { owner, tag, order } => {
            out.push(1);
            put_owner(out, *owner);
            put_u64(out, *tag);
            put_view(out, order);
        }
        Event::Rejected {
            owner,
            tag,
            client_order_id,
            reason,
        } => {
            out.push(2);
            put_owner(out, *owner);
            put_u64(out, *tag);
            put_u64(out, *client_order_id);
            out.push(reject_reason_byte(*reason));
        }
        Event::Fill(fill) => {
            out.push(3);
            put_owner(out, fill.owner);
            put_u64(out, fill.order_id);
            put_u64(out, fill.client_order_id);
            put_u64(out, fill.trade_id);
            put_u32(out, fill.instrument);
            out.push(side_byte(fill.side));
            put_i64(out, fill.price);
            put_u64(out, fill.quantity);
            put_u64(out, fill.leaves_quantity);
        }
        Event::Cancelled {
            owner,
            requester,
            tag,
            order_id,
            client_order_id,
            cancelled_quantity,
            reason,
        } => {
            out.push(4);
            put_owner(out, *owner);
            put_owner(out, *requester);
            out.push(u8::from(tag.is_some()));
            put_u64(out, tag.unwrap_or(0));
            put_u64(out, *order_id);
            put_u64(out, *client_order_id);
            put_u64(out, *cancelled_quantity);
            out.push(cancel_reason_byte(*reason));
        }
        Event::Replaced {
            owner,
            requester,
            tag,
            order,
        } => {
            out.push(5);
            put_owner(out, *owner);
            put_owner(out, *requester);
            put_u64(out, *tag);
            put_view(out, order);
        }
        Event::MassCancelDone { scope } => {
            out.push(6);
            put_scope(out, *scope);
        }
        Event::OrderStates {
            account,
            tag,
            orders,
        } => {
            out.push(7);
            put_u64(out, *account);
            put_u64(out, *tag);
            put_u32(out, len_u32(orders.len()));
            for view in orders {
                put_view(out, view);
            }
        }
    }
}

/// Reads fields off a message, checking every length first.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader after the version byte, which must be [`VERSION`].
    fn new(bytes: &'a [u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let mut r = Reader { rest: bytes };
        match r.u8()? {
            VERSION => Ok(r),
            other => Err(WireError::Version(other)),
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        if len > self.rest.len() {
            return Err(WireError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// A count of items of at least `min_len` bytes each, refused if the message
    /// cannot hold that many.
    fn count(&mut self, min_len: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min_len) > self.rest.len() {
            return Err(WireError::Truncated);
        }
        Ok(count)
    }

    fn end(&self) -> Result<(), WireError> {
        match self.rest.len() {
            0 => Ok(()),
            left => Err(WireError::TrailingBytes(left)),
        }
    }

    fn owner(&mut self) -> Result<Owner, WireError> {
        Ok(Owner {
            account: self.u64()?,
            session: self.u64()?,
        })
    }

    fn side(&mut self) -> Result<Side, WireError> {
        match self.u8()? {
            1 => Ok(Side::Buy),
            2 => Ok(Side::Sell),
            value => Err(WireError::Unknown {
                what: "side",
                value,
            }),
        }
    }

    fn scope(&mut self) -> Result<MassCancelScope, WireError> {
        let kind = self.u8()?;
        let owner = self.owner()?;
        match kind {
            1 if owner.session != 0 => Err(WireError::NotZero("the session of an account's scope")),
            1 => Ok(MassCancelScope::Account(owner.account)),
            2 => Ok(MassCancelScope::Session(owner)),
            value => Err(WireError::Unknown {
                what: "mass cancel scope",
                value,
            }),
        }
    }

    fn cancel_reason(&mut self) -> Result<CancelReason, WireError> {
        Ok(match self.u8()? {
            1 => CancelReason::Requested,
            2 => CancelReason::ImmediateRemainder,
            3 => CancelReason::FillOrKill,
            4 => CancelReason::CancelOnDisconnect,
            5 => CancelReason::SessionEnded,
            6 => CancelReason::KillSwitch,
            value => {
                return Err(WireError::Unknown {
                    what: "cancel reason",
                    value,
                })
            }
        })
    }

    fn view(&mut self) -> Result<OrderView, WireError> {
        Ok(OrderView {
            order_id: self.u64()?,
            client_order_id: self.u64()?,
            owner: self.owner()?,
            instrument: self.u32()?,
            side: self.side()?,
            price: self.i64()?,
            quantity: self.u64()?,
            filled: self.u64()?,
            leaves: self.u64()?,
            status: match self.u8()? {
                1 => OrderStatus::New,
                2 => OrderStatus::PartiallyFilled,
                3 => OrderStatus::Filled,
                4 => OrderStatus::Cancelled,
                value => {
                    return Err(WireError::Unknown {
                        what: "order status",
                        value,
                    })
                }
            },
        })
    }
}

fn decode_request(r: &mut Reader<'_>) -> Result<Request, WireError> {
    Ok(match r.u8()? {
        1 => Request::New(NewOrder {
            owner: r.owner()?,
            tag: r.u64()?,
            client_order_id: r.u64()?,
            instrument: r.u32()?,
            side: r.side()?,
            order_type: match r.u8()? {
                1 => OrderType::Limit,
                2 => OrderType::Market,
                value => {
                    return Err(WireError::Unknown {
                        what: "order type",
                        value,
                    })
                }
            },
            time_in_force: match r.u8()? {
                1 => TimeInForce::Gtc,
                2 => TimeInForce::Ioc,
                3 => TimeInForce::Fok,
                value => {
                    return Err(WireError::Unknown {
                        what: "time in force",
                        value,
                    })
                }
            },
            price: r.i64()?,
            quantity: r.u64()?,
        }),
        2 => Request::Cancel {
            owner: r.owner()?,
            tag: r.u64()?,
            client_order_id: r.u64()?,
        },
        3 => Request::Replace {
            owner: r.owner()?,
            tag: r.u64()?,
            client_order_id: r.u64()?,
            price: r.i64()?,
            quantity: r.u64()?,
        },
        4 => Request::MassCancel {
            scope: r.scope()?,
            reason: r.cancel_reason()?,
        },
        5 => Request::QueryOrders {
            account: r.u64()?,
            tag: r.u64()?,
        },
        value => {
            return Err(WireError::Unknown {
                what: "request type",
                value,
            })
        }
    })
}

fn decode_event(r: &mut Reader<'_>) -> Result<Event, WireError> {
    Ok(match r.u8()? {
        1 => Event::Accepted {
            owner: r.owner()?,
            tag: r.u64()?,
            order: r.view()?,
        },
        2 => Event::Rejected {
            owner: r.owner()?,
            tag: r.u64()?,
            client_order_id: r.u64()?,
            reason: match r.u8()? {
                1 => RejectReason::UnknownInstrument,
                2 => RejectReason::PriceOffTick,
                3 => RejectReason::InvalidPrice,
                4 => RejectReason::InvalidQuantity,
                5 => RejectReason::TooManyOpenOrders,
                6 => RejectReason::UnknownOrder,
                7 => RejectReason::DuplicateClientOrderId,
                8 => RejectReason::InvalidTimeInForce,
                value => {
                    return Err(WireError::Unknown {
                        what: "reject reason",
                        value,
                    })
                }
            },
        },
        3 => Event::Fill(Fill {
            owner: r.owner()?,
            order_id: r.u64()?,
            client_order_id: r.u64()?,
            trade_id: r.u64()?,
            instrument: r.u32()?,
            side: r.side()?,
            price: r.i64()?,
            quantity: r.u64()?,
            leaves_quantity: r.u64()?,
        }),
        4 => {
            let owner = r.owner()?;
            let requester = r.owner()?;
            let has_tag = r.u8()?;
            let tag = r.u64()?;
            let tag = match (has_tag, tag) {
                (0, 0) => None,
                (0, _) => return Err(WireError::NotZero("the tag of a cancel without one")),
                (1, tag) => Some(tag),
                (value, _) => {
                    return Err(WireError::Unknown {
                        what: "tag flag",
                        value,
                    })
                }
            };
            Event::Cancelled {
                owner,
                requester,
                tag,
                order_id: r.u64()?,
                client_order_id: r.u64()?,
                cancelled_quantity: r.u64()?,
                reason: r.cancel_reason()?,
            }
        }
        5 => Event::Replaced {
            owner: r.owner()?,
            requester: r.owner()?,
            tag: r.u64()?,
            order: r.view()?,
        },
        6 => Event::MassCancelDone { scope: r.scope()? },
        7 => {
            let account = r.u64()?;
            let tag = r.u64()?;
            let count = r.count(ORDER_VIEW_LEN)?;
            let mut orders = Vec::with_capacity(count);
            for _ in 0..count {
                orders.push(r.view()?);
            }
            Event::OrderStates {
                account,
                tag,
                orders,
            }
        }
        value => {
            return Err(WireError::Unknown {
                what: "event type",
                value,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const OWNER: Owner = Owner {
        account: 7,
        session: 9,
    };

    fn view() -> OrderView {
        OrderView {
            order_id: 1,
            client_order_id: 2,
            owner: OWNER,
            instrument: 1,
            side: Side::Sell,
            price: 100,
            quantity: 30,
            filled: 10,
            leaves: 20,
            status: OrderStatus::PartiallyFilled,
        }
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::New(NewOrder {
                owner: OWNER,
                tag: 3,
                client_order_id: 4,
                instrument: 1,
                side: Side::Buy,
                order_type: OrderType::Market,
                time_in_force: TimeInForce::Ioc,
                price: 0,
                quantity: 5,
            }),
            Request::Cancel {
                owner: OWNER,
                tag: 4,
                client_order_id: 4,
            },
            Request::Replace {
                owner: OWNER,
                tag: 5,
                client_order_id: 4,
                price: -3,
                quantity: 9,
            },
            Request::MassCancel {
                scope: MassCancelScope::Account(7),
                reason: CancelReason::KillSwitch,
            },
            Request::MassCancel {
                scope: MassCancelScope::Session(OWNER),
                reason: CancelReason::CancelOnDisconnect,
            },
            Request::QueryOrders { account: 7, tag: 6 },
        ]
    }

    fn every_event() -> Vec<Event> {
        vec![
            Event::Accepted {
                owner: OWNER,
                tag: 3,
                order: view(),
            },
            Event::Rejected {
                owner: OWNER,
                tag: 3,
                client_order_id: 4,
                reason: RejectReason::DuplicateClientOrderId,
            },
            Event::Fill(Fill {
                owner: OWNER,
                order_id: 1,
                client_order_id: 2,
                trade_id: 3,
                instrument: 1,
                side: Side::Buy,
                price: 100,
                quantity: 10,
                leaves_quantity: 0,
            }),
            Event::Cancelled {
                owner: OWNER,
                requester: Owner {
                    account: 7,
                    session: 10,
                },
                tag: None,
                order_id: 1,
                client_order_id: 2,
                cancelled_quantity: 20,
                reason: CancelReason::SessionEnded,
            },
            Event::Replaced {
                owner: OWNER,
                requester: OWNER,
                tag: 8,
                order: view(),
            },
            Event::MassCancelDone {
                scope: MassCancelScope::Account(7),
            },
            Event::OrderStates {
                account: 7,
                tag: 6,
                orders: vec![view(), view()],
            },
        ]
    }

    #[test]
    fn every_request_and_event_round_trips() {
        let batch = RequestBatch {
            first_request: 41,
            requests: every_request(),
        };
        assert_eq!(RequestBatch::decode(&batch.encode()), Ok(batch.clone()));
        let answers = Answers {
            engine: "engine-a".into(),
            batches: vec![
                BatchAnswer {
                    batch: 12,
                    first_request: 41,
                    events: vec![every_event(), vec![], every_event()],
                },
                BatchAnswer {
                    batch: 13,
                    first_request: 44,
                    events: vec![vec![]],
                },
            ],
        };
        let bytes = answers.encode();
        assert_eq!(Answers::decode(&bytes), Ok(answers.clone()));
        assert_eq!(
            bytes.len(),
            answers_header_len("engine-a")
                + answers
                    .batches
                    .iter()
                    .map(|b| b.encode().len())
                    .sum::<usize>()
        );
        for request in every_request() {
            assert!(request_len(&request) <= MAX_REQUEST_LEN);
        }
    }

    #[test]
    fn bad_messages_are_refused() {
        let batch = RequestBatch {
            first_request: 1,
            requests: every_request(),
        }
        .encode();
        assert_eq!(RequestBatch::decode(&[]), Err(WireError::Truncated));
        assert_eq!(RequestBatch::decode(&[2]), Err(WireError::Version(2)));
        for cut in 0..batch.len() {
            assert!(RequestBatch::decode(&batch[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = batch.clone();
        trailing.push(0);
        assert_eq!(
            RequestBatch::decode(&trailing),
            Err(WireError::TrailingBytes(1))
        );
        // A count of 4 billion requests in a short message allocates nothing.
        let huge = [&[VERSION][..], &[0; 8], &[0xff; 4]].concat();
        assert_eq!(RequestBatch::decode(&huge), Err(WireError::Truncated));
        let mut unknown = batch.clone();
        unknown[REQUESTS_HEADER_LEN] = 9;
        assert!(matches!(
            RequestBatch::decode(&unknown),
            Err(WireError::Unknown { .. })
        ));
        assert_eq!(
            RequestBatch::decode(&vec![VERSION; MAX_MESSAGE_LEN + 1]),
            Err(WireError::TooLarge(MAX_MESSAGE_LEN + 1))
        );

        let answer = |engine: &str, first: u64| Answers {
            engine: engine.into(),
            batches: vec![BatchAnswer {
                batch: 1,
                first_request: first,
                events: vec![vec![], vec![]],
            }],
        };
        assert_eq!(
            Answers::decode(&answer("", 1).encode()),
            Err(WireError::EngineName)
        );
        assert_eq!(
            Answers::decode(&answer("a b", 1).encode()),
            Err(WireError::EngineName)
        );
        // Fields that must be 0: an untagged cancel's tag, an account scope's session.
        let untagged = Answers {
            engine: "a".into(),
            batches: vec![BatchAnswer {
                batch: 1,
                first_request: 1,
                events: vec![vec![every_event()[3].clone()]],
            }],
        };
        let mut tagged = untagged.encode();
        // Version, name, batch count, batch, first, count, request, event count,
        // then the event: type, owner, requester, has_tag, tag.
        let tag_at = 1 + 2 + 4 + 8 + 8 + 4 + 8 + 4 + 1 + 16 + 16 + 1;
        assert_eq!(tagged[tag_at - 1], 0, "has_tag");
        tagged[tag_at] = 1;
        assert!(matches!(
            Answers::decode(&tagged),
            Err(WireError::NotZero(_))
        ));
        let mut scoped = RequestBatch {
            first_request: 1,
            requests: vec![every_request()[3]],
        }
        .encode();
        // The header, the type, the scope's kind and account, then its session.
        scoped[REQUESTS_HEADER_LEN + 1 + 1 + 8] = 1;
        assert!(matches!(
            RequestBatch::decode(&scoped),
            Err(WireError::NotZero(_))
        ));

        let mut wrong_seq = answer("a", 1).encode();
        // The second request's sequence: version, name, batch count, batch, first,
        // request count, then the first request's sequence and event count.
        let at = 1 + 2 + 4 + 8 + 8 + 4 + 8 + 4;
        wrong_seq[at] = 5;
        assert_eq!(
            Answers::decode(&wrong_seq),
            Err(WireError::RequestSequence {
                expected: 2,
                found: 5
            })
        );
    }

    /// A requests message and an answers message holding every request and event,
    /// its request sequences wrapping past the end of the u64 range.
    fn everything_encoded() -> (Vec<u8>, Vec<u8>) {
        let first_request = u64::MAX - 1;
        let batch = RequestBatch {
            first_request,
            requests: every_request(),
        };
        let answers = Answers {
            engine: "engine-a".into(),
            batches: vec![BatchAnswer {
                batch: u64::MAX,
                first_request,
                events: vec![every_event(), vec![], every_event()],
            }],
        };
        (batch.encode(), answers.encode())
    }

    proptest! {
        /// Whatever a hostile peer's mutation of a valid message decodes to encodes
        /// to exactly those bytes again (and neither step panics): the gateways
        /// compare answers by their encoding, so two different answers never
        /// compare the same, and no field is read that is not written.
        #[test]
        fn what_decodes_encodes_to_the_same_bytes(
            mutations in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let (requests, answers) = everything_encoded();
            for mut bytes in [requests, answers] {
                for (at, value) in &mutations {
                    let at = at.index(bytes.len());
                    bytes[at] = *value;
                }
                if let Ok(batch) = RequestBatch::decode(&bytes) {
                    prop_assert_eq!(batch.encode(), bytes.clone());
                }
                if let Ok(decoded) = Answers::decode(&bytes) {
                    prop_assert_eq!(decoded.encode(), bytes.clone());
                    let batches: Vec<u8> = decoded.batches.iter().flat_map(BatchAnswer::encode).collect();
                    prop_assert_eq!(&batches[..], &bytes[answers_header_len(&decoded.engine)..]);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = RequestBatch::decode(&bytes);
            let _ = Answers::decode(&bytes);
            let mut versioned = bytes.clone();
            versioned.insert(0, VERSION);
            let _ = RequestBatch::decode(&versioned);
            let _ = Answers::decode(&versioned);
        }
    }
}
