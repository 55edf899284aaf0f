//! Conversions between the wire types (`proto`) and the engine types
//! (`matching_stub`), in one place.

use matching_stub as engine;
use proto::ReasonCode;

/// Wire side to engine side.
pub const fn side_to_engine(side: proto::Side) -> engine::Side {
    match side {
        proto::Side::Buy => engine::Side::Buy,
        proto::Side::Sell => engine::Side::Sell,
    }
}

/// Engine side to wire side.
pub const fn side_to_wire(side: engine::Side) -> proto::Side {
    match side {
        engine::Side::Buy => proto::Side::Buy,
        engine::Side::Sell => proto::Side::Sell,
    }
}

const fn order_type_to_engine(order_type: proto::OrderType) -> engine::OrderType {
    match order_type {
        proto::OrderType::Limit => engine::OrderType::Limit,
        proto::OrderType::Market => engine::OrderType::Market,
    }
}

const fn time_in_force_to_engine(tif: proto::TimeInForce) -> engine::TimeInForce {
    match tif {
        proto::TimeInForce::Gtc => engine::TimeInForce::Gtc,
        proto::TimeInForce::Ioc => engine::TimeInForce::Ioc,
        proto::TimeInForce::Fok => engine::TimeInForce::Fok,
    }
}

/// Engine cancel reason to wire cancel reason.
pub const fn cancel_reason_to_wire(reason: engine::CancelReason) -> proto::CancelReason {
    match reason {
        engine::CancelReason::Requested => proto::CancelReason::Requested,
        engine::CancelReason::ImmediateRemainder => proto::CancelReason::ImmediateRemainder,
        engine::CancelReason::FillOrKill => proto::CancelReason::FillOrKill,
        engine::CancelReason::CancelOnDisconnect => proto::CancelReason::CancelOnDisconnect,
        engine::CancelReason::SessionEnded => proto::CancelReason::SessionEnded,
        engine::CancelReason::KillSwitch => proto::CancelReason::KillSwitch,
    }
}

/// Engine order status to wire order status.
pub const fn status_to_wire(status: engine::OrderStatus) -> proto::OrderStatus {
    match status {
        engine::OrderStatus::New => proto::OrderStatus::New,
        engine::OrderStatus::PartiallyFilled => proto::OrderStatus::PartiallyFilled,
        engine::OrderStatus::Filled => proto::OrderStatus::Filled,
        engine::OrderStatus::Cancelled => proto::OrderStatus::Cancelled,
    }
}

/// Engine reject reason to wire reason code.
pub const fn reject_reason_to_wire(reason: engine::RejectReason) -> ReasonCode {
    match reason {
        engine::RejectReason::UnknownInstrument => ReasonCode::UnknownInstrument,
        engine::RejectReason::PriceOffTick => ReasonCode::PriceOffTick,
        engine::RejectReason::InvalidPrice => ReasonCode::InvalidPrice,
        engine::RejectReason::InvalidQuantity => ReasonCode::InvalidQuantity,
        engine::RejectReason::UnknownOrder => ReasonCode::UnknownOrder,
        engine::RejectReason::DuplicateClientOrderId => ReasonCode::DuplicateClientOrderId,
        engine::RejectReason::InvalidTimeInForce => ReasonCode::InvalidTimeInForce,
        engine::RejectReason::TooManyOpenOrders => ReasonCode::TooManyOpenOrders,
    }
}

/// The engine request for a sequenced client message; the client sequence number
/// becomes the request tag so the answer can name it.
pub fn request_to_engine(frame: &proto::Frame, owner: engine::Owner) -> Option<engine::Request> {
    Some(match *frame {
        proto::Frame::NewOrder(order) => engine::Request::New(engine::NewOrder {
            owner,
            tag: order.client_seq,
            client_order_id: order.client_order_id,
            instrument: order.instrument_id,
            side: side_to_engine(order.side),
            order_type: order_type_to_engine(order.order_type),
            time_in_force: time_in_force_to_engine(order.time_in_force),
            price: order.price,
            quantity: order.quantity,
        }),
        proto::Frame::Cancel(cancel) => engine::Request::Cancel {
            owner,
            tag: cancel.client_seq,
            client_order_id: cancel.client_order_id,
        },
        proto::Frame::Replace(replace) => engine::Request::Replace {
            owner,
            tag: replace.client_seq,
            client_order_id: replace.client_order_id,
            price: replace.price,
            quantity: replace.quantity,
        },
        _ => return None,
    })
}

/// The wire order state of an engine order view.
pub const fn order_state(view: &engine::OrderView) -> proto::OrderState {
    proto::OrderState {
        client_order_id: view.client_order_id,
        order_id: view.order_id,
        instrument_id: view.instrument,
        side: side_to_wire(view.side),
        price: view.price,
        quantity: view.quantity,
        filled_quantity: view.filled,
        leaves_quantity: view.leaves,
        status: status_to_wire(view.status),
    }
}

/// The sequenced wire frame for an engine event, numbered `server_seq`. `None` for
/// events that are not part of a session's stream (query answers).
pub fn event_to_wire(event: &engine::Event, server_seq: u64) -> Option<proto::Frame> {
    Some(match event {
        engine::Event::Accepted { tag, order, .. } => proto::OrderAck {
            server_seq,
            client_seq: *tag,
            client_order_id: order.client_order_id,
            order_id: order.order_id,
            instrument_id: order.instrument,
            side: side_to_wire(order.side),
            price: order.price,
            quantity: order.quantity,
        }
        .into(),
        engine::Event::Rejected {
            tag,
            client_order_id,
            reason,
            ..
        } => proto::Reject {
            server_seq,
            client_seq: *tag,
            client_order_id: *client_order_id,
            reason: reject_reason_to_wire(*reason),
        }
        .into(),
        engine::Event::Fill(fill) => proto::Fill {
            server_seq,
            client_order_id: fill.client_order_id,
            order_id: fill.order_id,
            trade_id: fill.trade_id,
            instrument_id: fill.instrument,
            side: side_to_wire(fill.side),
            price: fill.price,
            quantity: fill.quantity,
            leaves_quantity: fill.leaves_quantity,
        }
        .into(),
        engine::Event::Cancelled {
            tag,
            order_id,
            client_order_id,
            cancelled_quantity,
            reason,
            ..
        } => proto::Cancelled {
            server_seq,
            client_seq: tag.unwrap_or(0),
            client_order_id: *client_order_id,
            order_id: *order_id,
            cancelled_quantity: *cancelled_quantity,
            reason: cancel_reason_to_wire(*reason),
        }
        .into(),
        engine::Event::Replaced { tag, order, .. } => proto::Replaced {
            server_seq,
            client_seq: *tag,
            client_order_id: order.client_order_id,
            order_id: order.order_id,
            price: order.price,
            quantity: order.quantity,
            leaves_quantity: order.leaves,
        }
        .into(),
        engine::Event::OrderStates { .. } | engine::Event::MassCancelDone { .. } => return None,
    })
}
