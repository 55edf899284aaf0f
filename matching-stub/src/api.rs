//! The contract between the gateway and a matching engine.
//!
//! A venue that plugs in its own engine implements [`MatchingEngine`]. The contract:
//!
//! - **Ordering.** Requests are handled one at a time, in the order submitted. All
//!   events a request causes are written before the next request is handled, in the
//!   order they happened (for a crossing order: `Accepted`, then each trade's two
//!   `Fill`s, aggressor first, then any `Cancelled` remainder).
//! - **Determinism.** The same request sequence from a fresh engine gives the same
//!   events, including order and trade ids.
//! - **Exactly once is the gateway's job.** The gateway submits each client request
//!   exactly once, so the engine need not deduplicate; it must still refuse a
//!   `client_order_id` already used by a *working* order of the same account
//!   ([`RejectReason::DuplicateClientOrderId`]), which makes a re-submitted
//!   `NewOrder` harmless.
//! - **Finality.** An order is done after a [`Fill`] with `leaves_quantity == 0` or a
//!   [`Event::Cancelled`]; no event about it follows.
//! - **Ownership.** Every event names the [`Owner`] (account and session) of the order
//!   it is about, so the gateway routes it to that session's outbound stream.
//! - **Every request is answered**: `New` by `Accepted` or `Rejected`; `Cancel` by
//!   `Cancelled` or `Rejected`; `Replace` by `Replaced` or `Rejected`; `MassCancel` by
//!   one `Cancelled` per working order in scope (possibly none), then one
//!   `MassCancelDone`; `QueryOrders` by one `OrderStates`. The gateway counts on
//!   it: it keeps room for each unanswered request's answers and stops taking a
//!   session's requests while that room is spoken for, so a request left unanswered
//!   holds its room for good.
//! - **Requester and owner.** Any session of an account may cancel or replace the
//!   account's orders. `Cancelled` and `Replaced` name both the order's owner and the
//!   session whose request they answer (`requester`): the gateway answers the
//!   requester and tells the owner of the change.

use serde::{Deserialize, Serialize};

/// Instrument identifier.
pub type InstrumentId = u32;
/// Account identifier; client order ids are unique per account.
pub type AccountId = u64;
/// Gateway session identifier.
pub type SessionId = u64;
/// Engine-assigned order identifier, unique for the engine's life.
pub type OrderId = u64;
/// Engine-assigned trade identifier, shared by both fills of a trade.
pub type TradeId = u64;
/// Price in integer price units.
pub type Price = i64;
/// Quantity in integer units.
pub type Quantity = u64;

/// Who an order belongs to: events are routed to this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    /// The trading account.
    pub account: AccountId,
    /// The gateway session that placed the order.
    pub session: SessionId,
}

/// Which side of the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// Bid.
    Buy,
    /// Offer.
    Sell,
}

impl Side {
    /// The other side.
    pub const fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }
}

/// How an order is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OrderType {
    /// At its limit price or better.
    Limit,
    /// At any price; never rests (time in force IOC or FOK).
    Market,
}

/// How long an order works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimeInForce {
    /// Rests until filled or cancelled.
    Gtc,
    /// The unfilled part is cancelled at once.
    Ioc,
    /// Fills completely at once or is cancelled without trading.
    Fok,
}

/// A tradable instrument and its price and quantity grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instrument {
    /// Identifier used in orders.
    pub id: InstrumentId,
    /// Prices must be positive multiples of this.
    pub tick_size: Price,
    /// Quantities must be positive multiples of this.
    pub lot_size: Quantity,
}

/// A new order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// Who places it.
    pub owner: Owner,
    /// Echoed in the answer (the gateway uses the client sequence number).
    pub tag: u64,
    /// The client's id, unique among the account's working orders.
    pub client_order_id: u64,
    /// What to trade.
    pub instrument: InstrumentId,
    /// Buy or sell.
    pub side: Side,
    /// Limit or market.
    pub order_type: OrderType,
    /// GTC, IOC or FOK.
    pub time_in_force: TimeInForce,
    /// Limit price; 0 for market orders.
    pub price: Price,
    /// Total quantity.
    pub quantity: Quantity,
}

/// Which working orders a mass cancel covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MassCancelScope {
    /// Every working order of the account.
    Account(AccountId),
    /// Every working order placed by one session.
    Session(Owner),
}

/// A request to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Place an order.
    New(NewOrder),
    /// Cancel a working order.
    Cancel {
        /// The requesting session; must be of the order's account.
        owner: Owner,
        /// Echoed in the answer.
        tag: u64,
        /// The order to cancel.
        client_order_id: u64,
    },
    /// Change a working order's price and total quantity.
    Replace {
        /// The requesting session; must be of the order's account.
        owner: Owner,
        /// Echoed in the answer.
        tag: u64,
        /// The order to change.
        client_order_id: u64,
        /// New limit price.
        price: Price,
        /// New total quantity, filled quantity included.
        quantity: Quantity,
    },
    /// Cancel every working order in scope (cancel-on-disconnect, session end).
    MassCancel {
        /// Which orders.
        scope: MassCancelScope,
        /// Reported in each `Cancelled`.
        reason: CancelReason,
    },
    /// Ask for the state of an account's orders (working and recently finished).
    QueryOrders {
        /// The account.
        account: AccountId,
        /// Echoed in the answer.
        tag: u64,
    },
}

impl Request {
    /// The session that made the request, for requests of one session.
    pub const fn owner(&self) -> Option<Owner> {
        match self {
            Request::New(order) => Some(order.owner),
            Request::Cancel { owner, .. } | Request::Replace { owner, .. } => Some(*owner),
            Request::MassCancel { .. } | Request::QueryOrders { .. } => None,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error, Serialize, Deserialize)]
pub enum RejectReason {
    /// The instrument is not listed.
    #[error("unknown instrument")]
    UnknownInstrument,
    /// The price is not a multiple of the tick size.
    #[error("price is not a multiple of the tick size")]
    PriceOffTick,
    /// Limit price not positive, or a market order with a price.
    #[error("invalid price")]
    InvalidPrice,
    /// Zero, not a multiple of the lot size, or (replace) not above the filled quantity.
    #[error("invalid quantity")]
    InvalidQuantity,
    /// The account already has its maximum of working orders.
    #[error("too many working orders for the account")]
    TooManyOpenOrders,
    /// No working order of the account has that client order id.
    #[error("unknown order")]
    UnknownOrder,
    /// A working order of the account already has that client order id.
    #[error("duplicate client order id")]
    DuplicateClientOrderId,
    /// Market orders must be IOC or FOK.
    #[error("time in force not allowed for the order type")]
    InvalidTimeInForce,
}

/// Why an order stopped working unfilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CancelReason {
    /// The client asked.
    Requested,
    /// The unfilled part of an IOC or market order.
    ImmediateRemainder,
    /// A FOK order that could not fill completely.
    FillOrKill,
    /// Cancel-on-disconnect fired.
    CancelOnDisconnect,
    /// The session ended (logout, expiry, revocation).
    SessionEnded,
    /// An operator's kill switch cancelled every working order of the account.
    KillSwitch,
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Working, nothing filled.
    New,
    /// Working, partly filled.
    PartiallyFilled,
    /// Done, completely filled.
    Filled,
    /// Done, cancelled.
    Cancelled,
}

/// The state of one order, as reported in snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// Engine id.
    pub order_id: OrderId,
    /// Client id.
    pub client_order_id: u64,
    /// Owner.
    pub owner: Owner,
    /// Instrument.
    pub instrument: InstrumentId,
    /// Side.
    pub side: Side,
    /// Current limit price (0 for market orders).
    pub price: Price,
    /// Current total quantity.
    pub quantity: Quantity,
    /// Filled so far.
    pub filled: Quantity,
    /// Still working; 0 once done.
    pub leaves: Quantity,
    /// Status.
    pub status: OrderStatus,
}

/// One side's part in a trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fill {
    /// Owner of this side's order.
    pub owner: Owner,
    /// This side's order.
    pub order_id: OrderId,
    /// Its client id.
    pub client_order_id: u64,
    /// Trade id, equal in both sides' fills.
    pub trade_id: TradeId,
    /// Instrument.
    pub instrument: InstrumentId,
    /// This side.
    pub side: Side,
    /// Trade price (the resting order's price).
    pub price: Price,
    /// Trade quantity.
    pub quantity: Quantity,
    /// What of this order still works after the trade.
    pub leaves_quantity: Quantity,
}

/// Something the engine reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A new order was accepted.
    Accepted {
        /// Owner.
        owner: Owner,
        /// The request's tag.
        tag: u64,
        /// The accepted order as it stands before any trade.
        order: OrderView,
    },
    /// A request was refused; nothing changed.
    Rejected {
        /// The requesting session.
        owner: Owner,
        /// The request's tag.
        tag: u64,
        /// The client order id in the request.
        client_order_id: u64,
        /// Why.
        reason: RejectReason,
    },
    /// One side of a trade.
    Fill(Fill),
    /// An order stopped working.
    Cancelled {
        /// Owner of the order.
        owner: Owner,
        /// The session whose `Cancel` this answers; the owner when unsolicited.
        requester: Owner,
        /// The `Cancel` request's tag, or `None` when unsolicited.
        tag: Option<u64>,
        /// The order.
        order_id: OrderId,
        /// Its client id.
        client_order_id: u64,
        /// Quantity that was working.
        cancelled_quantity: Quantity,
        /// Why.
        reason: CancelReason,
    },
    /// A replace was applied (fills it causes follow).
    Replaced {
        /// Owner of the order.
        owner: Owner,
        /// The session whose `Replace` this answers.
        requester: Owner,
        /// The request's tag.
        tag: u64,
        /// The order after the change.
        order: OrderView,
    },
    /// Every `Cancelled` of a `MassCancel` has been written.
    MassCancelDone {
        /// The request's scope.
        scope: MassCancelScope,
    },
    /// The answer to `QueryOrders`: working orders, then recently finished ones.
    OrderStates {
        /// The account.
        account: AccountId,
        /// The request's tag.
        tag: u64,
        /// The orders, working ones in order id order, then finished ones oldest first.
        orders: Vec<OrderView>,
    },
}

impl Event {
    /// The session the event belongs to, if it is about one order or request.
    pub const fn owner(&self) -> Option<Owner> {
        match self {
            Event::Accepted { owner, .. }
            | Event::Rejected { owner, .. }
            | Event::Cancelled { owner, .. }
            | Event::Replaced { owner, .. } => Some(*owner),
            Event::Fill(fill) => Some(fill.owner),
            Event::MassCancelDone {
                scope: MassCancelScope::Session(owner),
            } => Some(*owner),
            Event::MassCancelDone { .. } | Event::OrderStates { .. } => None,
        }
    }

    /// The session whose request this event answers, if it answers one.
    pub const fn requester(&self) -> Option<Owner> {
        match self {
            Event::Accepted { owner, .. } | Event::Rejected { owner, .. } => Some(*owner),
            Event::Cancelled {
                requester,
                tag: Some(_),
                ..
            }
            | Event::Replaced { requester, .. } => Some(*requester),
            Event::Cancelled { tag: None, .. }
            | Event::Fill(_)
            | Event::MassCancelDone { .. }
            | Event::OrderStates { .. } => None,
        }
    }
}

/// A matching engine the gateway can front.
///
/// Implementations handle one request at a time and append the events it causes to
/// `events`, following the contract in this module's documentation.
///
/// **Deterministic.** In the gateway's crash-safe mode the engine is part of the core
/// that a restarted gateway rebuilds by handling every request again, in the same
/// order: the same requests must give the same events, byte for byte. So an engine
/// reads no clock, no random generator and nothing outside its requests, and iterates
/// no hash map in an order that shows in its events (sort first, as the bundled one
/// does for mass cancels).
pub trait MatchingEngine: Send + 'static {
    /// Handles one request, appending its events to `events` (which may already
    /// hold events of earlier requests).
    fn handle(&mut self, request: Request, events: &mut Vec<Event>);
}
