//! The session's own view of its orders, kept in step with its outbound stream so an
//! order-state snapshot is exact "as of" a server sequence number.

use std::collections::{BTreeMap, VecDeque};

use proto::{OrderState, OrderStatus};

/// Working orders by client order id, plus a bounded history of finished ones.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct OrderTracker {
    /// By client order id, ordered so that a snapshot of the same state is the same bytes.
    working: BTreeMap<u64, OrderState>,
    finished: VecDeque<OrderState>,
    max_finished: usize,
}

impl OrderTracker {
    /// An empty tracker keeping at most `max_finished` finished orders.
    pub fn new(max_finished: usize) -> Self {
        OrderTracker {
            working: BTreeMap::new(),
            finished: VecDeque::new(),
            max_finished,
        }
    }

    /// Number of working orders.
    pub fn working_count(&self) -> usize {
        self.working.len()
    }

    /// Updates the view with one sequenced frame of the session's stream.
    pub fn apply(&mut self, frame: &proto::Frame) {
        match *frame {
            proto::Frame::OrderAck(ack) => {
                self.working.insert(
                    ack.client_order_id,
                    OrderState {
                        client_order_id: ack.client_order_id,
                        order_id: ack.order_id,
                        instrument_id: ack.instrument_id,
                        side: ack.side,
                        price: ack.price,
                        quantity: ack.quantity,
                        filled_quantity: 0,
                        leaves_quantity: ack.quantity,
                        status: OrderStatus::New,
                    },
                );
            }
            proto::Frame::Fill(fill) => self.update(fill.client_order_id, |order| {
                // Saturating: an engine on the log is another process, and its
                // quantities are not the gateway's to trust.
                order.filled_quantity = order.filled_quantity.saturating_add(fill.quantity);
                order.leaves_quantity = fill.leaves_quantity;
                order.status = if fill.leaves_quantity == 0 {
                    OrderStatus::Filled
                } else {
                    OrderStatus::PartiallyFilled
                };
            }),
            proto::Frame::Cancelled(cancelled) => self.update(cancelled.client_order_id, |order| {
                order.leaves_quantity = 0;
                order.status = OrderStatus::Cancelled;
            }),
            proto::Frame::Replaced(replaced) => self.update(replaced.client_order_id, |order| {
                order.price = replaced.price;
                order.quantity = replaced.quantity;
                order.leaves_quantity = replaced.leaves_quantity;
            }),
            _ => {}
        }
    }

    fn update(&mut self, client_order_id: u64, change: impl FnOnce(&mut OrderState)) {
        let Some(order) = self.working.get_mut(&client_order_id) else {
            return;
        };
        change(order);
        if order.leaves_quantity == 0 {
            let done = *order;
            self.working.remove(&client_order_id);
            if self.max_finished > 0 {
                if self.finished.len() == self.max_finished {
                    self.finished.pop_front();
                }
                self.finished.push_back(done);
            }
        }
    }

    /// Every tracked order: working ones by order id, then finished ones, oldest first.
    pub fn snapshot(&self) -> Vec<OrderState> {
        let mut orders: Vec<OrderState> = self.working.values().copied().collect();
        orders.sort_unstable_by_key(|o| o.order_id);
        orders.extend(self.finished.iter().copied());
        orders
    }

    /// Returns spare capacity to the allocator; used when a session goes idle.
    pub fn shrink_to_fit(&mut self) {
        self.finished.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use proto::{Frame, OrderStatus, Side};

    use super::*;

    fn fill(quantity: u64, leaves_quantity: u64) -> Frame {
        Frame::from(proto::Fill {
            server_seq: 2,
            client_order_id: 7,
            order_id: 70,
            trade_id: 1,
            instrument_id: 1,
            side: Side::Buy,
            price: 100,
            quantity,
            leaves_quantity,
        })
    }

    #[test]
    fn fills_beyond_the_range_saturate_rather_than_overflow() {
        let mut tracker = OrderTracker::new(4);
        tracker.apply(&Frame::from(proto::OrderAck {
            server_seq: 1,
            client_seq: 1,
            client_order_id: 7,
            order_id: 70,
            instrument_id: 1,
            side: Side::Buy,
            price: 100,
            quantity: u64::MAX,
        }));
        // An engine on the log is another process: its quantities may be anything.
        tracker.apply(&fill(u64::MAX, 1));
        tracker.apply(&fill(u64::MAX, 1));
        let orders = tracker.snapshot();
        assert_eq!(orders[0].filled_quantity, u64::MAX);
        assert_eq!(orders[0].status, OrderStatus::PartiallyFilled);
        tracker.apply(&fill(1, 0));
        assert_eq!(tracker.working_count(), 0);
        assert_eq!(tracker.snapshot()[0].status, OrderStatus::Filled);
    }
}
