//! `session_gateway._native`: the Rust client library (`gateway-client`) for Python.
//!
//! The client runs on a tokio runtime of its own threads (pyo3-async-runtimes'), so
//! its connection, resume and acknowledgement work never waits for the Python event
//! loop, and the event loop never blocks on it. The Python package
//! (`session_gateway/`) wraps this module in the public asyncio API; nothing here is
//! meant to be called directly.
//!
//! Events cross over in two steps so that none can be lost to a cancelled await:
//! `NativeClient::wait_events` is the only awaitable, and it moves what arrived
//! into the client's inbox before it completes; `NativeClient::take_events` hands
//! the inbox to Python synchronously.

mod events;

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gateway_client::{Client, ClientConfig, ClientError, Credentials, Event, OrderParams};
use proto::{CancelOnDisconnect, OrderType, ReasonCode, Side, TimeInForce};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList};
use tokio::sync::mpsc;

/// Most events moved into the inbox by one [`NativeClient::wait_events`].
const EVENT_BATCH: usize = 1024;

/// An API key: its id and its Ed25519 key pair (the private half never leaves Rust).
#[pyclass(frozen, name = "Credentials", module = "session_gateway")]
#[derive(Clone)]
struct NativeCredentials {
    credentials: Credentials,
}

#[pymethods]
impl NativeCredentials {
    /// Credentials from the API key id and the 32-byte Ed25519 seed.
    #[staticmethod]
    fn from_seed(api_key_id: u64, seed: &[u8]) -> PyResult<Self> {
        let seed: &[u8; 32] = seed
            .try_into()
            .map_err(|_| PyValueError::new_err("an Ed25519 seed is 32 bytes"))?;
        let credentials = Credentials::from_seed(api_key_id, seed).map_err(client_error)?;
        Ok(NativeCredentials { credentials })
    }

    #[getter]
    fn api_key_id(&self) -> u64 {
        self.credentials.api_key_id()
    }

    fn __repr__(&self) -> String {
        format!("Credentials(api_key_id={})", self.credentials.api_key_id())
    }
}

/// The demo accounts of a development gateway's `client-keys.toml`, as
/// `[(account, credentials)]`.
#[pyfunction]
fn load_dev_keys(path: PathBuf) -> PyResult<Vec<(u64, NativeCredentials)>> {
    let keys = Credentials::load_dev_keys(&path).map_err(client_error)?;
    Ok(keys
        .into_iter()
        .map(|(account, credentials)| (account, NativeCredentials { credentials }))
        .collect())
}

/// Every protocol enum's members as `{enum: [(name, value)]}`, names as PROTOCOL.md
/// spells them: the Python enums are checked against it.
#[pyfunction]
fn protocol_enums(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    fn members<T: Copy>(
        all: &[T],
        name: fn(T) -> &'static str,
        wire: fn(T) -> u64,
    ) -> Vec<(&'static str, u64)> {
        all.iter()
            .map(|&value| (name(value), wire(value)))
            .collect()
    }
    let tables = PyDict::new(py);
    tables.set_item(
        "Side",
        members(Side::ALL, Side::name, |v| v.to_wire().into()),
    )?;
    tables.set_item(
        "OrderType",
        members(OrderType::ALL, OrderType::name, |v| v.to_wire().into()),
    )?;
    tables.set_item(
        "TimeInForce",
        members(TimeInForce::ALL, TimeInForce::name, |v| v.to_wire().into()),
    )?;
    tables.set_item(
        "OrderStatus",
        members(proto::OrderStatus::ALL, proto::OrderStatus::name, |v| {
            v.to_wire().into()
        }),
    )?;
    tables.set_item(
        "CancelReason",
        members(proto::CancelReason::ALL, proto::CancelReason::name, |v| {
            v.to_wire().into()
        }),
    )?;
    tables.set_item(
        "Reason",
        members(ReasonCode::ALL, ReasonCode::name, |v| v.to_wire().into()),
    )?;
    Ok(tables)
}

/// A session: the Rust client and the events it delivered that Python has not taken.
#[pyclass(frozen, module = "session_gateway")]
struct NativeClient {
    client: Client,
    inbox: Arc<Inbox>,
}

/// Events on their way to Python.
struct Inbox {
    /// The Rust client's event channel (bounded: when it is full the client stops
    /// reading the connection, and QUIC flow control holds the gateway back).
    receiver: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    /// Received and not yet taken by Python, oldest first.
    ready: Mutex<VecDeque<Event>>,
}

/// Seconds (a Python float) as a duration; negative or not finite is an error.
fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a finite number of seconds >= 0, not {value}"
        ))
    })
}

/// The first address `address` ("host:port") names.
fn resolve(address: &str) -> PyResult<SocketAddr> {
    address
        .to_socket_addrs()
        .map_err(|e| raise("ConfigError", format!("address {address:?}: {e}")))?
        .next()
        .ok_or_else(|| raise("ConfigError", format!("address {address:?} names no host")))
}

/// Logs in; the awaitable gives a [`NativeClient`]. The Python package documents
/// every argument (`session_gateway.Client.connect`).
#[pyfunction]
#[pyo3(signature = (
    address, certificates, credentials, *, venue, server_name, cancel_on_disconnect,
    cod_grace, idle_timeout, keep_alive, reconnect_attempts, reconnect_backoff,
    max_unprocessed, event_capacity,
))]
#[allow(clippy::too_many_arguments)]
fn connect<'py>(
    py: Python<'py>,
    address: &str,
    certificates: Vec<Vec<u8>>,
    credentials: &NativeCredentials,
    venue: String,
    server_name: String,
    cancel_on_disconnect: bool,
    cod_grace: f64,
    idle_timeout: f64,
    keep_alive: f64,
    reconnect_attempts: u32,
    reconnect_backoff: f64,
    max_unprocessed: usize,
    event_capacity: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let mut certificates = certificates
        .into_iter()
        .map(certificate)
        .collect::<PyResult<Vec<_>>>()?;
    let Some(first) = certificates.pop() else {
        return Err(raise("ConfigError", "no certificate to trust"));
    };
    if event_capacity == 0 {
        return Err(PyValueError::new_err("event_capacity must be at least 1"));
    }
    let mut config = ClientConfig::new(
        resolve(address)?,
        &server_name,
        &venue,
        first,
        credentials.credentials.clone(),
    );
    config.trusted_certs.extend(certificates);
    config.cancel_on_disconnect = if cancel_on_disconnect {
        CancelOnDisconnect::CancelAll
    } else {
        CancelOnDisconnect::Off
    };
    config.cod_grace = seconds("cod_grace", cod_grace)?;
    config.idle_timeout = seconds("idle_timeout", idle_timeout)?;
    config.keep_alive = seconds("keep_alive", keep_alive)?;
    config.reconnect_attempts = reconnect_attempts;
    config.reconnect_backoff = seconds("reconnect_backoff", reconnect_backoff)?;
    config.max_unprocessed = max_unprocessed;
    config.event_capacity = event_capacity;
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let (client, receiver) = Client::connect(config).await.map_err(client_error)?;
        Ok(NativeClient {
            client,
            inbox: Arc::new(Inbox {
                receiver: tokio::sync::Mutex::new(receiver),
                ready: Mutex::new(VecDeque::new()),
            }),
        })
    })
}

/// A certificate to trust, DER or PEM.
fn certificate(bytes: Vec<u8>) -> PyResult<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    if bytes.starts_with(b"-----BEGIN") {
        rustls_pki_types::CertificateDer::from_pem_slice(&bytes)
            .map_err(|e| raise("ConfigError", format!("PEM certificate: {e}")))
    } else {
        Ok(bytes.into())
    }
}

#[pymethods]
impl NativeClient {
    /// Sends an order; returns its client sequence number.
    #[allow(clippy::too_many_arguments)]
    fn new_order(
        &self,
        instrument_id: u32,
        client_order_id: u64,
        side: u8,
        price: i64,
        quantity: u64,
        order_type: u8,
        time_in_force: u8,
    ) -> PyResult<u64> {
        let order = OrderParams {
            instrument_id,
            client_order_id,
            side: wire_value(Side::from_wire(side), "side", side)?,
            order_type: wire_value(OrderType::from_wire(order_type), "order_type", order_type)?,
            time_in_force: wire_value(
                TimeInForce::from_wire(time_in_force),
                "time_in_force",
                time_in_force,
            )?,
            price,
            quantity,
        };
        self.client.new_order(order).map_err(client_error)
    }

    /// Cancels a working order; returns the request's client sequence number.
    fn cancel(&self, client_order_id: u64) -> PyResult<u64> {
        self.client.cancel(client_order_id).map_err(client_error)
    }

    /// Cancels every order that may still be working, one `Cancel` each; returns
    /// their client sequence numbers.
    fn mass_cancel(&self) -> PyResult<Vec<u64>> {
        self.client.mass_cancel().map_err(client_error)
    }

    /// The client order ids of the orders that may still be working, in order.
    fn open_orders(&self) -> Vec<u64> {
        self.client.open_orders()
    }

    /// Changes a working order's price and total quantity; returns the client sequence.
    fn replace(&self, client_order_id: u64, price: i64, quantity: u64) -> PyResult<u64> {
        self.client
            .replace(client_order_id, price, quantity)
            .map_err(client_error)
    }

    /// Asks the gateway to end the session; `Ended(LOGGED_OUT)` follows.
    fn logout(&self) -> PyResult<()> {
        self.client.logout().map_err(client_error)
    }

    /// Drops the connection as a network failure would; the client resumes.
    fn drop_connection(&self) {
        self.client.drop_connection();
    }

    #[getter]
    fn session_id(&self) -> Option<u64> {
        self.client.session_id()
    }

    #[getter]
    fn last_server_seq(&self) -> u64 {
        self.client.last_server_seq()
    }

    #[getter]
    fn unprocessed(&self) -> usize {
        self.client.unprocessed()
    }

    /// At most `max` events that have arrived, oldest first, without waiting.
    fn take_events<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyList>> {
        let taken: Vec<Event> = {
            let mut ready = self
                .inbox
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if ready.is_empty() {
                // The receiver is busy only while a wait_events is under way; what it
                // receives then reaches the inbox when it completes.
                if let Ok(mut receiver) = self.inbox.receiver.try_lock() {
                    while ready.len() < max {
                        let Ok(event) = receiver.try_recv() else {
                            break;
                        };
                        ready.push_back(event);
                    }
                }
            }
            let count = ready.len().min(max);
            ready.drain(..count).collect()
        };
        let objects = taken
            .into_iter()
            .map(|event| events::object(py, event))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, objects)
    }

    /// An awaitable that completes once events are ready for [`Self::take_events`]
    /// (`True`) or the client will deliver no more (`False`). Cancelling it loses
    /// nothing.
    fn wait_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inbox = Arc::clone(&self.inbox);
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            if !inbox
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                return Ok(true);
            }
            let mut receiver = inbox.receiver.lock().await;
            let mut batch = Vec::with_capacity(EVENT_BATCH);
            // Cancel-safe: a cancelled recv_many took nothing; once it returns, the
            // batch reaches the inbox before anything else can run.
            let received = receiver.recv_many(&mut batch, EVENT_BATCH).await;
            inbox
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(batch);
            Ok(received > 0)
        })
    }
}

fn wire_value<T>(value: Option<T>, field: &str, raw: u8) -> PyResult<T> {
    value.ok_or_else(|| PyValueError::new_err(format!("{field} {raw} is not a protocol value")))
}

/// The package's exceptions module, imported once.
fn errors_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    ERRORS
        .get_or_try_init(py, || Ok(py.import("session_gateway.errors")?.unbind()))
        .map(|module| module.bind(py))
}

/// An exception of `session_gateway.errors` by class name, made with `args`.
fn raise_with<'py, A>(py: Python<'py>, class: &str, args: A) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    let made = errors_module(py)
        .and_then(|module| module.getattr(class))
        .and_then(|class| class.call1(args));
    match made {
        Ok(exception) => PyErr::from_value(exception),
        Err(error) => PyRuntimeError::new_err(format!("session_gateway.errors.{class}: {error}")),
    }
}

/// [`raise_with`] a message.
fn raise(class: &str, message: impl Into<String>) -> PyErr {
    let message = message.into();
    Python::attach(|py| raise_with(py, class, (message,)))
}

/// The Python exception for a client error.
fn client_error(error: ClientError) -> PyErr {
    let message = error.to_string();
    Python::attach(|py| match error {
        ClientError::Refused(reason) => raise_with(py, "RefusedError", (message, reason.to_wire())),
        ClientError::BadSignature { api_key_id, venue } => raise_with(
            py,
            "BadSignatureError",
            (
                message,
                ReasonCode::BadSignature.to_wire(),
                api_key_id,
                venue,
            ),
        ),
        ClientError::Connection(_) => raise_with(py, "GatewayConnectionError", (message,)),
        ClientError::Protocol(_) => raise_with(py, "ProtocolViolationError", (message,)),
        ClientError::Backpressure => raise_with(py, "BackpressureError", (message,)),
        ClientError::Ended => raise_with(py, "SessionEndedError", (message,)),
        ClientError::Config(_) => raise_with(py, "ConfigError", (message,)),
    })
}

/// The module.
#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<NativeCredentials>()?;
    module.add_class::<NativeClient>()?;
    events::add_classes(module)?;
    module.add_function(wrap_pyfunction!(connect, module)?)?;
    module.add_function(wrap_pyfunction!(load_dev_keys, module)?)?;
    module.add_function(wrap_pyfunction!(protocol_enums, module)?)?;
    module.add("DEV_VENUE", proto::DEFAULT_VENUE)?;
    Ok(())
}
