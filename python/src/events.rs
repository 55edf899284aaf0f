//! The events Python sees: one frozen class each, with a field per protocol field,
//! enums as the package's `enum.IntEnum`s, `==` and a `repr` that names every field.

use gateway_client::Event;
use proto::{CancelReason, Frame, OrderStatus, ReasonCode, Side};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::IntoPyObjectExt;

/// A field's Python value and how a `repr` shows it.
trait Field {
    fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>>;
    fn repr(&self) -> String;
}

macro_rules! int_fields {
    ($($ty:ty),*) => {$(
        impl Field for $ty {
            fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                (*self).into_bound_py_any(py)
            }
            fn repr(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
int_fields!(u32, u64, i64);

impl Field for String {
    fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.as_str().into_bound_py_any(py)
    }
    fn repr(&self) -> String {
        format!("{self:?}")
    }
}

impl<T: Field> Field for Option<T> {
    fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Some(value) => value.object(py),
            None => Ok(py.None().into_bound(py)),
        }
    }
    fn repr(&self) -> String {
        self.as_ref().map_or_else(|| "None".into(), Field::repr)
    }
}

impl Field for Vec<proto::OrderState> {
    fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let orders = self
            .iter()
            .map(|order| Bound::new(py, OrderState(*order)))
            .collect::<PyResult<Vec<_>>>()?;
        orders.into_bound_py_any(py)
    }
    fn repr(&self) -> String {
        let orders: Vec<String> = self
            .iter()
            .map(|order| OrderState(*order).__repr__())
            .collect();
        format!("[{}]", orders.join(", "))
    }
}

/// `PartiallyFilled` as `PARTIALLY_FILLED`: a protocol name as a Python enum member.
pub(crate) fn member_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The package's enums module, imported once.
fn enums_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static ENUMS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    ENUMS
        .get_or_try_init(py, || Ok(py.import("session_gateway.enums")?.unbind()))
        .map(|module| module.bind(py))
}

macro_rules! enum_fields {
    ($($ty:ident),*) => {$(
        impl Field for $ty {
            fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                enums_module(py)?.getattr(stringify!($ty))?.call1((self.to_wire(),))
            }
            fn repr(&self) -> String {
                format!("{}.{}", stringify!($ty), member_name(self.name()))
            }
        }
    )*};
}
enum_fields!(Side, OrderStatus, CancelReason);

// The Python enum of reason codes is `Reason`.
impl Field for ReasonCode {
    fn object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        enums_module(py)?
            .getattr("Reason")?
            .call1((self.to_wire(),))
    }
    fn repr(&self) -> String {
        format!("Reason.{}", member_name(self.name()))
    }
}

/// Declares an event class with its fields as read-only attributes, `==` and
/// `repr`: over a protocol frame, `Name(proto::Frame) { field, ... }` holds the
/// frame itself and shows the fields listed; otherwise `Name { field: Type, ... }`.
macro_rules! event_class {
    ($(#[$meta:meta])* $name:ident($frame:ty) { $( $field:ident, )* }) => {
        $(#[$meta])*
        #[pyclass(frozen, eq, module = "session_gateway")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub(crate) struct $name($frame);

        impl $name {
            fn fields(&self) -> &$frame {
                &self.0
            }
        }

        event_class!(@methods $name $( $field )*);
    };
    ($(#[$meta:meta])* $name:ident { $( $(#[$field_meta:meta])* $field:ident: $ty:ty, )* }) => {
        $(#[$meta])*
        #[pyclass(frozen, eq, module = "session_gateway")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub(crate) struct $name {
            $( $(#[$field_meta])* $field: $ty, )*
        }

        impl $name {
            fn fields(&self) -> &Self {
                self
            }
        }

        event_class!(@methods $name $( $field )*);
    };
    (@methods $name:ident $( $field:ident )*) => {
        #[pymethods]
        impl $name {
            $(
                #[getter]
                fn $field<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                    self.fields().$field.object(py)
                }
            )*

            fn __repr__(&self) -> String {
                let fields: Vec<String> =
                    vec![$( format!("{}={}", stringify!($field), self.fields().$field.repr()), )*];
                format!("{}({})", stringify!($name), fields.join(", "))
            }
        }
    };
}

event_class! {
    /// The engine accepted a new order (`OrderAck`).
    Accepted(proto::OrderAck) {
        server_seq,
        client_seq,
        client_order_id,
        order_id,
        instrument_id,
        side,
        price,
        quantity,
    }
}

event_class! {
    /// A new order, cancel or replace was refused (`Reject`).
    Rejected(proto::Reject) {
        server_seq,
        client_seq,
        client_order_id,
        reason,
    }
}

event_class! {
    /// (Part of) an order traded.
    Fill(proto::Fill) {
        server_seq,
        client_order_id,
        order_id,
        trade_id,
        instrument_id,
        side,
        price,
        quantity,
        leaves_quantity,
    }
}

event_class! {
    /// An order stopped working without filling completely.
    Cancelled(proto::Cancelled) {
        server_seq,
        client_seq,
        client_order_id,
        order_id,
        cancelled_quantity,
        reason,
    }
}

event_class! {
    /// A replace was applied.
    Replaced(proto::Replaced) {
        server_seq,
        client_seq,
        client_order_id,
        order_id,
        price,
        quantity,
        leaves_quantity,
    }
}

event_class! {
    /// One order's authoritative state, inside a snapshot.
    OrderState(proto::OrderState) {
        client_order_id,
        order_id,
        instrument_id,
        side,
        price,
        quantity,
        filled_quantity,
        leaves_quantity,
        status,
    }
}

event_class! {
    /// The authoritative state of the session's orders (after login, or after a
    /// resume that needed more than the gateway retained).
    Snapshot {
        as_of_server_seq: u64,
        orders: Vec<proto::OrderState>,
    }
}

event_class! {
    /// A reconnect attempt failed; the client tries again.
    Reconnecting {
        attempt: u32,
        attempts: u32,
        error: String,
    }
}

event_class! {
    /// The connection was lost and the session resumed on a new one.
    Resumed {
        lost: Option<ReasonCode>,
    }
}

event_class! {
    /// The session is over.
    Ended {
        reason: ReasonCode,
    }
}

/// The Python object for an event.
pub(crate) fn object(py: Python<'_>, event: Event) -> PyResult<Bound<'_, PyAny>> {
    match event {
        Event::Message(Frame::OrderAck(ack)) => Accepted(ack).into_bound_py_any(py),
        Event::Message(Frame::Reject(reject)) => Rejected(reject).into_bound_py_any(py),
        Event::Message(Frame::Fill(fill)) => Fill(fill).into_bound_py_any(py),
        Event::Message(Frame::Cancelled(cancelled)) => Cancelled(cancelled).into_bound_py_any(py),
        Event::Message(Frame::Replaced(replaced)) => Replaced(replaced).into_bound_py_any(py),
        Event::Message(other) => Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
            "the client delivered a {} as a sequenced message",
            other.name()
        ))),
        Event::Snapshot {
            as_of_server_seq,
            orders,
        } => Snapshot {
            as_of_server_seq,
            orders,
        }
        .into_bound_py_any(py),
        Event::Reconnecting {
            attempt,
            attempts,
            error,
        } => Reconnecting {
            attempt,
            attempts,
            error,
        }
        .into_bound_py_any(py),
        Event::Resumed { lost } => Resumed { lost }.into_bound_py_any(py),
        Event::Ended(reason) => Ended { reason }.into_bound_py_any(py),
    }
}

/// Adds the event classes to the module.
pub(crate) fn add_classes(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Accepted>()?;
    module.add_class::<Rejected>()?;
    module.add_class::<Fill>()?;
    module.add_class::<Cancelled>()?;
    module.add_class::<Replaced>()?;
    module.add_class::<OrderState>()?;
    module.add_class::<Snapshot>()?;
    module.add_class::<Reconnecting>()?;
    module.add_class::<Resumed>()?;
    module.add_class::<Ended>()?;
    Ok(())
}
