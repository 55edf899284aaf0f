//! The price-time-priority order books and per-account order state.
//!
//! Working orders live in one slab of nodes. Each price level is an intrusive FIFO
//! list through that slab (head = oldest = first to trade), and each side of a book
//! is a `BTreeMap` from price to level, so the best price is the first (asks) or
//! last (bids) entry. Per account, a map from client order id to slab slot finds a
//! working order for cancel and replace and enforces unique live client order ids;
//! a bounded queue keeps the most recently finished orders for snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::api::{
    AccountId, CancelReason, Event, Fill, Instrument, InstrumentId, MassCancelScope,
    MatchingEngine, NewOrder, OrderStatus, OrderType, OrderView, Owner, Price, Quantity,
    RejectReason, Request, Side, TimeInForce, TradeId,
};

/// Slab index meaning "no node".
const NIL: u32 = u32::MAX;

/// Settings of an [`OrderBookEngine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The tradable instruments.
    pub instruments: Vec<Instrument>,
    /// How many finished orders each account keeps for snapshots (oldest dropped first).
    pub finished_orders_per_account: usize,
    /// Most working orders of one account, whichever sessions placed them (those of
    /// ended sessions included); beyond, a new order is rejected with
    /// [`RejectReason::TooManyOpenOrders`]. Bounds every account's login snapshot.
    pub max_working_orders_per_account: usize,
}

impl EngineConfig {
    /// A config with these instruments, the default retention of 1,024 finished
    /// orders per account and at most 50,000 working orders per account.
    pub fn with_instruments(instruments: Vec<Instrument>) -> Self {
        EngineConfig {
            instruments,
            finished_orders_per_account: 1_024,
            max_working_orders_per_account: 50_000,
        }
    }
}

/// Why an [`EngineConfig`] cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Tick size not positive or lot size zero.
    #[error("instrument {0}: tick size and lot size must be positive")]
    InvalidGrid(InstrumentId),
    /// Two instruments share an id.
    #[error("instrument {0} is listed twice")]
    DuplicateInstrument(InstrumentId),
    /// A restored engine's instruments are not those configured.
    #[error("the instruments configured are not those of the restored books")]
    InstrumentsChanged,
}

/// A working order in the slab, linked into its price level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Node {
    view: OrderView,
    prev: u32,
    next: u32,
}

/// One price level: a FIFO of nodes and their total working quantity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Level {
    head: u32,
    tail: u32,
}

impl Level {
    const EMPTY: Level = Level {
        head: NIL,
        tail: NIL,
    };
}

/// Both sides of one instrument's book.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Book {
    instrument: Instrument,
    bids: BTreeMap<Price, Level>,
    asks: BTreeMap<Price, Level>,
}

impl Book {
    fn side_mut(&mut self, side: Side) -> &mut BTreeMap<Price, Level> {
        match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        }
    }

    /// The best level an incoming order on `side` would trade against, if its price
    /// crosses `limit` (`None` limit: market order, any price).
    fn best_contra(&self, side: Side, limit: Option<Price>) -> Option<Price> {
        let best = match side {
            Side::Buy => self.asks.keys().next(),
            Side::Sell => self.bids.keys().next_back(),
        };
        best.copied().filter(|&level| crosses(side, level, limit))
    }
}

/// Serializes a hash map in key order, so that the same engine state always
/// serializes to the same bytes (snapshots of two gateways compare equal).
fn sorted<K: Ord + Serialize, V: Serialize, S: serde::Serializer>(
    map: &HashMap<K, V>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut entries: Vec<(&K, &V)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    serializer.collect_map(entries)
}

/// Whether an incoming order on `side` with `limit` (`None`: market) trades against
/// a resting level at `level`.
fn crosses(side: Side, level: Price, limit: Option<Price>) -> bool {
    match (side, limit) {
        (_, None) => true,
        (Side::Buy, Some(limit)) => level <= limit,
        (Side::Sell, Some(limit)) => level >= limit,
    }
}

/// An account's working orders (client order id → slab slot) and finished history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AccountOrders {
    #[serde(serialize_with = "sorted")]
    working: HashMap<u64, u32>,
    finished: VecDeque<OrderView>,
}

/// How an order left the matching step.
enum Outcome {
    /// It rests in the book at this slab slot.
    Rested(u32),
    /// It is done (filled or its remainder cancelled).
    Done,
}

/// The bundled matching engine: one price-time-priority book per instrument. It
/// serializes (serde) whole, for the gateway's core snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderBookEngine {
    books: Vec<Book>,
    #[serde(serialize_with = "sorted")]
    book_index: HashMap<InstrumentId, usize>,
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    #[serde(serialize_with = "sorted")]
    accounts: HashMap<AccountId, AccountOrders>,
    finished_per_account: usize,
    max_working_per_account: usize,
    last_order_id: u64,
    last_trade_id: TradeId,
}

impl OrderBookEngine {
    /// An engine with empty books for the configured instruments.
    ///
    /// Fails when an instrument has a non-positive tick or lot size, or two share an id.
    pub fn new(config: EngineConfig) -> Result<Self, ConfigError> {
        for (index, instrument) in config.instruments.iter().enumerate() {
            if instrument.tick_size <= 0 || instrument.lot_size == 0 {
                return Err(ConfigError::InvalidGrid(instrument.id));
            }
            if config.instruments[..index]
                .iter()
                .any(|other| other.id == instrument.id)
            {
                return Err(ConfigError::DuplicateInstrument(instrument.id));
            }
        }
        let books: Vec<Book> = config
            .instruments
            .iter()
            .map(|&instrument| Book {
                instrument,
                bids: BTreeMap::new(),
                asks: BTreeMap::new(),
            })
            .collect();
        let book_index = books
            .iter()
            .enumerate()
            .map(|(index, book)| (book.instrument.id, index))
            .collect();
        Ok(OrderBookEngine {
            books,
            book_index,
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            accounts: HashMap::new(),
            finished_per_account: config.finished_orders_per_account,
            max_working_per_account: config.max_working_orders_per_account,
            last_order_id: 0,
            last_trade_id: 0,
        })
    }

    /// Applies `config` to an engine restored from a snapshot: its limits take
    /// effect; its instruments must be the books' (books are not added or dropped
    /// under the orders resting in them).
    pub fn reconfigure(&mut self, config: &EngineConfig) -> Result<(), ConfigError> {
        let instruments: Vec<Instrument> = self.books.iter().map(|book| book.instrument).collect();
        if instruments != config.instruments {
            return Err(ConfigError::InstrumentsChanged);
        }
        self.finished_per_account = config.finished_orders_per_account;
        self.max_working_per_account = config.max_working_orders_per_account;
        Ok(())
    }

    /// Working and recently finished orders of an account, as `QueryOrders` reports
    /// them.
    pub fn orders_of(&self, account: AccountId) -> Vec<OrderView> {
        let Some(orders) = self.accounts.get(&account) else {
            return Vec::new();
        };
        let mut working: Vec<OrderView> = orders
            .working
            .values()
            .map(|&slot| self.nodes[slot as usize].view)
            .collect();
        working.sort_unstable_by_key(|view| view.order_id);
        working.extend(orders.finished.iter().copied());
        working
    }

    /// Best bid and best offer of an instrument, if it is listed.
    pub fn best_prices(&self, instrument: InstrumentId) -> Option<(Option<Price>, Option<Price>)> {
        let book = &self.books[*self.book_index.get(&instrument)?];
        Some((
            book.bids.keys().next_back().copied(),
            book.asks.keys().next().copied(),
        ))
    }

    /// Number of working orders across all books.
    pub fn working_order_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    fn new_order(&mut self, order: NewOrder, events: &mut Vec<Event>) {
        let reject = |reason| Event::Rejected {
            owner: order.owner,
            tag: order.tag,
            client_order_id: order.client_order_id,
            reason,
        };
        let Some(&book) = self.book_index.get(&order.instrument) else {
            return events.push(reject(RejectReason::UnknownInstrument));
        };
        if let Err(reason) = self.validate_new(book, &order) {
            return events.push(reject(reason));
        }
        let account = self.accounts.entry(order.owner.account).or_default();
        if account.working.contains_key(&order.client_order_id) {
            return events.push(reject(RejectReason::DuplicateClientOrderId));
        }
        if account.working.len() >= self.max_working_per_account {
            return events.push(reject(RejectReason::TooManyOpenOrders));
        }

        self.last_order_id += 1;
        let view = OrderView {
            order_id: self.last_order_id,
            client_order_id: order.client_order_id,
            owner: order.owner,
            instrument: order.instrument,
            side: order.side,
            price: order.price,
            quantity: order.quantity,
            filled: 0,
            leaves: order.quantity,
            status: OrderStatus::New,
        };
        events.push(Event::Accepted {
            owner: order.owner,
            tag: order.tag,
            order: view,
        });

        let limit = (order.order_type == OrderType::Limit).then_some(order.price);
        if order.time_in_force == TimeInForce::Fok
            && self.crossing_quantity(book, order.side, limit, order.quantity) < order.quantity
        {
            return self.finish_cancelled(view, None, CancelReason::FillOrKill, events);
        }
        let rests = order.time_in_force == TimeInForce::Gtc;
        if let Outcome::Rested(slot) = self.execute(book, view, limit, rests, events) {
            self.account(view)
                .working
                .insert(view.client_order_id, slot);
        }
    }

    fn validate_new(&self, book: usize, order: &NewOrder) -> Result<(), RejectReason> {
        let instrument = self.books[book].instrument;
        match order.order_type {
            OrderType::Market => {
                if order.time_in_force == TimeInForce::Gtc {
                    return Err(RejectReason::InvalidTimeInForce);
                }
                if order.price != 0 {
                    return Err(RejectReason::InvalidPrice);
                }
            }
            OrderType::Limit => validate_price(instrument, order.price)?,
        }
        validate_quantity(instrument, order.quantity)
    }

    /// Quantity available against an incoming order, counted up to `wanted`.
    fn crossing_quantity(
        &self,
        book: usize,
        side: Side,
        limit: Option<Price>,
        wanted: Quantity,
    ) -> Quantity {
        let book = &self.books[book];
        let levels: Box<dyn Iterator<Item = (&Price, &Level)>> = match side {
            Side::Buy => Box::new(book.asks.iter()),
            Side::Sell => Box::new(book.bids.iter().rev()),
        };
        let mut available: Quantity = 0;
        for (&price, level) in levels {
            if !crosses(side, price, limit) {
                break;
            }
            let mut slot = level.head;
            while slot != NIL {
                let node = &self.nodes[slot as usize];
                available = available.saturating_add(node.view.leaves);
                if available >= wanted {
                    return available;
                }
                slot = node.next;
            }
        }
        available
    }

    /// Trades `incoming` against the book, then rests its remainder (`rests`) or
    /// cancels it. `incoming` is not in the slab.
    fn execute(
        &mut self,
        book: usize,
        mut incoming: OrderView,
        limit: Option<Price>,
        rests: bool,
        events: &mut Vec<Event>,
    ) -> Outcome {
        while incoming.leaves > 0 {
            let Some(price) = self.books[book].best_contra(incoming.side, limit) else {
                break;
            };
            self.trade_at_level(book, &mut incoming, price, events);
        }
        if incoming.leaves == 0 {
            incoming.status = OrderStatus::Filled;
            self.finish(incoming);
            Outcome::Done
        } else if rests {
            Outcome::Rested(self.rest(book, incoming))
        } else {
            self.finish_cancelled(incoming, None, CancelReason::ImmediateRemainder, events);
            Outcome::Done
        }
    }

    /// Trades `incoming` against the level at `price` until one of them is exhausted.
    fn trade_at_level(
        &mut self,
        book: usize,
        incoming: &mut OrderView,
        price: Price,
        events: &mut Vec<Event>,
    ) {
        let contra_side = incoming.side.opposite();
        let instrument = incoming.instrument;
        let Some(level) = self.books[book].side_mut(contra_side).get_mut(&price) else {
            return;
        };
        let mut head = level.head;
        while incoming.leaves > 0 && head != NIL {
            let resting = &mut self.nodes[head as usize];
            let quantity = incoming.leaves.min(resting.view.leaves);
            self.last_trade_id += 1;
            apply_fill(&mut resting.view, quantity);
            apply_fill(incoming, quantity);
            let resting_view = resting.view;
            let next = resting.next;
            for view in [&*incoming, &resting_view] {
                events.push(Event::Fill(Fill {
                    owner: view.owner,
                    order_id: view.order_id,
                    client_order_id: view.client_order_id,
                    trade_id: self.last_trade_id,
                    instrument,
                    side: view.side,
                    price,
                    quantity,
                    leaves_quantity: view.leaves,
                }));
            }
            if resting_view.leaves == 0 {
                self.free_nodes.push(head);
                self.account(resting_view)
                    .working
                    .remove(&resting_view.client_order_id);
                self.finish(resting_view);
                head = next;
            }
        }
        let levels = self.books[book].side_mut(contra_side);
        if head == NIL {
            levels.remove(&price);
        } else if let Some(level) = levels.get_mut(&price) {
            level.head = head;
            self.nodes[head as usize].prev = NIL;
        }
    }

    /// Puts a working order at the back of its price level; returns its slot.
    fn rest(&mut self, book: usize, view: OrderView) -> u32 {
        let level = self.books[book]
            .side_mut(view.side)
            .entry(view.price)
            .or_insert(Level::EMPTY);
        let node = Node {
            view,
            prev: level.tail,
            next: NIL,
        };
        let slot = match self.free_nodes.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).unwrap_or(NIL)
            }
        };
        if level.tail == NIL {
            level.head = slot;
        } else {
            self.nodes[level.tail as usize].next = slot;
        }
        level.tail = slot;
        slot
    }

    /// Takes a working order out of its level and frees its slot; returns it.
    fn unlink(&mut self, book: usize, slot: u32) -> OrderView {
        let Node { view, prev, next } = self.nodes[slot as usize];
        let levels = self.books[book].side_mut(view.side);
        if let Some(level) = levels.get_mut(&view.price) {
            match prev {
                NIL => level.head = next,
                prev => self.nodes[prev as usize].next = next,
            }
            match next {
                NIL => level.tail = prev,
                next => self.nodes[next as usize].prev = prev,
            }
            if level.head == NIL {
                levels.remove(&view.price);
            }
        }
        self.free_nodes.push(slot);
        view
    }

    fn account(&mut self, view: OrderView) -> &mut AccountOrders {
        self.accounts.entry(view.owner.account).or_default()
    }

    /// Records a done order in its account's bounded history.
    fn finish(&mut self, view: OrderView) {
        let keep = self.finished_per_account;
        let finished = &mut self.account(view).finished;
        if keep == 0 {
            return;
        }
        if finished.len() == keep {
            finished.pop_front();
        }
        finished.push_back(view);
    }

    fn finish_cancelled(
        &mut self,
        mut view: OrderView,
        request: Option<(Owner, u64)>,
        reason: CancelReason,
        events: &mut Vec<Event>,
    ) {
        events.push(Event::Cancelled {
            owner: view.owner,
            requester: request.map_or(view.owner, |(requester, _)| requester),
            tag: request.map(|(_, tag)| tag),
            order_id: view.order_id,
            client_order_id: view.client_order_id,
            cancelled_quantity: view.leaves,
            reason,
        });
        view.leaves = 0;
        view.status = OrderStatus::Cancelled;
        self.finish(view);
    }

    /// The slab slot and book of a working order of `account`.
    fn working_slot(&self, account: AccountId, client_order_id: u64) -> Option<(u32, usize)> {
        let slot = *self.accounts.get(&account)?.working.get(&client_order_id)?;
        let instrument = self.nodes[slot as usize].view.instrument;
        Some((slot, *self.book_index.get(&instrument)?))
    }

    fn cancel(&mut self, request: Request, events: &mut Vec<Event>) {
        let Request::Cancel {
            owner,
            tag,
            client_order_id,
        } = request
        else {
            return;
        };
        let Some((slot, book)) = self.working_slot(owner.account, client_order_id) else {
            return events.push(Event::Rejected {
                owner,
                tag,
                client_order_id,
                reason: RejectReason::UnknownOrder,
            });
        };
        let view = self.unlink(book, slot);
        self.account(view).working.remove(&client_order_id);
        self.finish_cancelled(view, Some((owner, tag)), CancelReason::Requested, events);
    }

    fn replace(&mut self, request: Request, events: &mut Vec<Event>) {
        let Request::Replace {
            owner,
            tag,
            client_order_id,
            price,
            quantity,
        } = request
        else {
            return;
        };
        let reject = |reason| Event::Rejected {
            owner,
            tag,
            client_order_id,
            reason,
        };
        let Some((slot, book)) = self.working_slot(owner.account, client_order_id) else {
            return events.push(reject(RejectReason::UnknownOrder));
        };
        let instrument = self.books[book].instrument;
        let current = self.nodes[slot as usize].view;
        let valid = validate_price(instrument, price)
            .and_then(|()| validate_quantity(instrument, quantity))
            .and_then(|()| {
                (quantity > current.filled)
                    .then_some(())
                    .ok_or(RejectReason::InvalidQuantity)
            });
        if let Err(reason) = valid {
            return events.push(reject(reason));
        }

        let mut updated = current;
        updated.price = price;
        updated.quantity = quantity;
        updated.leaves = quantity - current.filled;
        let keeps_priority = price == current.price && quantity <= current.quantity;
        events.push(Event::Replaced {
            owner: current.owner,
            requester: owner,
            tag,
            order: updated,
        });
        if keeps_priority {
            self.nodes[slot as usize].view = updated;
            return;
        }
        self.unlink(book, slot);
        match self.execute(book, updated, Some(price), true, events) {
            Outcome::Rested(slot) => {
                self.account(updated).working.insert(client_order_id, slot);
            }
            Outcome::Done => {
                self.account(updated).working.remove(&client_order_id);
            }
        }
    }

    fn mass_cancel(
        &mut self,
        scope: MassCancelScope,
        reason: CancelReason,
        events: &mut Vec<Event>,
    ) {
        let account = match scope {
            MassCancelScope::Account(account) => account,
            MassCancelScope::Session(owner) => owner.account,
        };
        let Some(orders) = self.accounts.get(&account) else {
            return;
        };
        let mut in_scope: Vec<(u64, u32)> = orders
            .working
            .values()
            .map(|&slot| (self.nodes[slot as usize].view, slot))
            .filter(|(view, _)| match scope {
                MassCancelScope::Account(_) => true,
                MassCancelScope::Session(owner) => view.owner == owner,
            })
            .map(|(view, slot)| (view.order_id, slot))
            .collect();
        in_scope.sort_unstable();
        for (_, slot) in in_scope {
            let instrument = self.nodes[slot as usize].view.instrument;
            let Some(&book) = self.book_index.get(&instrument) else {
                continue;
            };
            let view = self.unlink(book, slot);
            self.account(view).working.remove(&view.client_order_id);
            self.finish_cancelled(view, None, reason, events);
        }
    }
}

impl MatchingEngine for OrderBookEngine {
    fn handle(&mut self, request: Request, events: &mut Vec<Event>) {
        match request {
            Request::New(order) => self.new_order(order, events),
            Request::Cancel { .. } => self.cancel(request, events),
            Request::Replace { .. } => self.replace(request, events),
            Request::MassCancel { scope, reason } => {
                self.mass_cancel(scope, reason, events);
                events.push(Event::MassCancelDone { scope });
            }
            Request::QueryOrders { account, tag } => events.push(Event::OrderStates {
                account,
                tag,
                orders: self.orders_of(account),
            }),
        }
    }
}

fn validate_price(instrument: Instrument, price: Price) -> Result<(), RejectReason> {
    if price <= 0 {
        Err(RejectReason::InvalidPrice)
    } else if price % instrument.tick_size != 0 {
        Err(RejectReason::PriceOffTick)
    } else {
        Ok(())
    }
}

fn validate_quantity(instrument: Instrument, quantity: Quantity) -> Result<(), RejectReason> {
    if quantity == 0 || quantity % instrument.lot_size != 0 {
        Err(RejectReason::InvalidQuantity)
    } else {
        Ok(())
    }
}

fn apply_fill(view: &mut OrderView, quantity: Quantity) {
    view.filled += quantity;
    view.leaves -= quantity;
    view.status = if view.leaves == 0 {
        OrderStatus::Filled
    } else {
        OrderStatus::PartiallyFilled
    };
}
