//! The operators' HTTP listener (`admin.listen`, default `127.0.0.1:9433`).
//!
//! - `GET /metrics`: Prometheus text 0.0.4, or OpenMetrics when `Accept` asks for it
//!   (see [`crate::metrics`]).
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 while logins are accepted; 503 while draining, and in
//!   crash-safe mode until the core is rebuilt from its stream. With engines on the
//!   log, a body of `ready; engines disagree: ...` when a later answer to a batch
//!   differed from the first.
//! - `/admin/*`: operations, each needing `Authorization: Bearer <token>` with the
//!   token from `admin.token_file`, and each logged at info with the caller's address:
//!   - `GET /admin/sessions`: the live sessions, JSON;
//!   - `POST /admin/revoke?session=N` or `?account=A`: end sessions (`Revoked`);
//!   - `POST /admin/kill-switch?account=A`: cancel every working order of the account
//!     and end its sessions;
//!   - `POST /admin/rotate-key`: mint tokens with a new key (older keys still verify);
//!   - `POST /admin/retire-key?id=N`: stop accepting tokens of key N;
//!   - `POST /admin/reload-accounts`: read the accounts file again;
//!   - `POST /admin/reload-tls`: read the certificate and key again (new connections
//!     get them; open ones carry on);
//!   - `POST /admin/drain`: refuse new logins (`ShuttingDown`); sessions carry on.
//!
//! The `gateway admin ...` subcommand is a client for these.
//!
//! Anyone who can reach the port can connect, so the listener holds what a peer
//! can take: `admin.max_connections` at once, `admin.max_connections_per_address`
//! of them from one address, `admin.header_timeout_ms` to send a request's headers
//! (and to start the next one on a kept-alive connection). And it answers only
//! requests whose `Host` is an IP address, `localhost` or one of
//! `admin.allowed_hosts`, so a web page cannot read it by DNS rebinding.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::auth::address_key;
use crate::config::AdminSettings;
use crate::registry::SessionInfo;

/// A future an [`Operations`] method returns: boxed, since admin calls are rare.
pub(crate) type Pending<'a, T> = futures_util::future::BoxFuture<'a, T>;

/// What the listener asks of the gateway (the server implements it): its state for
/// `/metrics` and `/readyz`, and the operator's calls under `/admin`. Each call that
/// changes the core returns an error message when the core could not be reached (in
/// crash-safe mode, the stream).
pub(crate) trait Operations: Send + Sync + 'static {
    /// The metrics in OpenMetrics text.
    fn metrics_text(&self) -> String;
    /// Whether `/admin/drain` was called.
    fn is_draining(&self) -> bool;
    /// Whether the gateway takes logins (not while rebuilding its core).
    fn is_accepting(&self) -> bool;
    /// Refuses new logins from now on.
    fn start_draining(&self);
    /// Engines on the log: what to say when two engines answered a batch
    /// differently.
    fn engines_disagree(&self) -> Option<String>;
    /// Every session, for `/admin/sessions`.
    fn sessions_info(&self) -> Vec<SessionInfo>;
    /// The live sessions of an account.
    fn sessions_of(&self, account: u64) -> Vec<u64>;
    /// Ends these sessions; returns those that were live.
    fn revoke_sessions<'a>(&'a self, ids: &'a [u64]) -> Pending<'a, Result<Vec<u64>, String>>;
    /// Whether the account is configured or has sessions or orders.
    fn knows_account(&self, account: u64) -> Pending<'_, bool>;
    /// Cancels every working order of the account and ends its sessions.
    fn kill_switch(&self, account: u64) -> Pending<'_, Result<Vec<u64>, String>>;
    /// Installs a new token key for minting; returns its id.
    fn rotate_token_key(&self) -> Pending<'_, Result<u32, String>>;
    /// Retires a token key; false when unknown or the one minting.
    fn retire_token_key(&self, key_id: u32) -> Pending<'_, Result<bool, String>>;
    /// Reads the accounts file again; returns how many accounts it has.
    fn reload_accounts(&self) -> Result<usize, String>;
    /// Reads the certificate and key again.
    fn reload_tls(&self) -> Result<(), String>;
}

/// What the listener serves from.
struct AdminState {
    shared: Arc<dyn Operations>,
    /// The bearer token `/admin/*` requires; `None` refuses every admin call.
    token: Option<String>,
}

/// The query of `revoke` and `kill-switch`.
#[derive(Debug, Deserialize)]
struct Target {
    session: Option<u64>,
    account: Option<u64>,
}

/// The query of `retire-key`.
#[derive(Debug, Deserialize)]
struct KeyId {
    id: u32,
}

/// A JSON error body.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Serves the listener on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<dyn Operations>,
    token: Option<String>,
    settings: AdminSettings,
) {
    let allowed_hosts = settings
        .allowed_hosts
        .iter()
        .map(|host| host.to_ascii_lowercase())
        .collect();
    let state = Arc::new(AdminState { shared, token });
    let admin = Router::new()
        .route("/admin/sessions", get(sessions))
        .route("/admin/revoke", post(revoke))
        .route("/admin/kill-switch", post(kill_switch))
        .route("/admin/rotate-key", post(rotate_key))
        .route("/admin/retire-key", post(retire_key))
        .route("/admin/reload-accounts", post(reload_accounts))
        .route("/admin/reload-tls", post(reload_tls))
        .route("/admin/drain", post(drain))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .merge(admin)
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            Arc::new(allowed_hosts),
            require_own_host,
        ));
    let limits = Arc::new(ConnectionLimits::new(&settings));
    let header_timeout = Duration::from_millis(settings.header_timeout_ms);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, most likely: wait for some to be freed.
                warn!(%error, "admin listener: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = ConnectionLimits::admit(&limits, peer.ip()) else {
            debug!(%peer, "admin listener: connection limit reached, connection closed");
            continue;
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            tower_service::Service::call(&mut app, request.map(axum::body::Body::new))
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(%peer, %error, "admin listener: connection ended");
            }
            drop(slot);
        });
    }
}

/// The admin connections open, in all and per address.
struct ConnectionLimits {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    max: usize,
    max_per_address: usize,
}

/// One admitted connection; its place is free again when it is dropped.
struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    address: IpAddr,
}

impl ConnectionLimits {
    fn new(settings: &AdminSettings) -> Self {
        ConnectionLimits {
            open: Mutex::new((0, HashMap::new())),
            max: settings.max_connections,
            max_per_address: settings.max_connections_per_address,
        }
    }

    /// A slot for a connection from `peer`, unless a limit is reached.
    fn admit(limits: &Arc<Self>, peer: IpAddr) -> Option<ConnectionSlot> {
        let address = address_key(peer);
        let mut open = limits.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, by_address) = &mut *open;
        let from_address = by_address.entry(address).or_insert(0);
        if *total >= limits.max || *from_address >= limits.max_per_address {
            return None;
        }
        *total += 1;
        *from_address += 1;
        Some(ConnectionSlot {
            limits: Arc::clone(limits),
            address,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, by_address) = &mut *open;
        *total -= 1;
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// Refuses a request whose `Host` names neither an IP address, `localhost`, nor one
/// of `admin.allowed_hosts` (421): what a page that rebound its own name to this
/// address would send. A request without `Host` (HTTP/1.0) comes from no browser.
async fn require_own_host(
    State(allowed): State<Arc<Vec<String>>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|value| value.to_str().unwrap_or("?"));
    match host {
        Some(host) if !host_is_allowed(host, &allowed) => error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this listener's: use its address, or add the name to \
                 admin.allowed_hosts"
            ),
        ),
        _ => next.run(request).await,
    }
}

/// Whether a `Host` header (`name`, `name:port`, `[v6]:port`) names this listener.
fn host_is_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or("", |(name, _port)| name),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let name = name.to_ascii_lowercase();
    name.parse::<IpAddr>().is_ok() || name == "localhost" || allowed.contains(&name)
}

/// The metrics in the format the scraper asks for: OpenMetrics when its `Accept`
/// names it (Prometheus does, first), else the Prometheus text format 0.0.4, which
/// any older parser reads.
async fn metrics(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    let text = state.shared.metrics_text();
    if openmetrics {
        let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, kind)], text).into_response()
    } else {
        let kind = "text/plain; version=0.0.4; charset=utf-8";
        let text = crate::metrics::prometheus_text(&text);
        ([(header::CONTENT_TYPE, kind)], text).into_response()
    }
}

async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    if state.shared.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !state.shared.is_accepting() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "rebuilding the core from its stream\n",
        )
            .into_response()
    } else if let Some(why) = state.shared.engines_disagree() {
        // Every gateway applies the same first answers, so each stays consistent:
        // an alarm, not a reason to leave the balancer.
        (StatusCode::OK, format!("ready; {why}\n")).into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// Why an admin call was refused.
struct Refused(StatusCode, &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// Lets an `/admin` request through only with the bearer token.
async fn require_token(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Response {
    match authorize(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// Checks the bearer token.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Refused> {
    let Some(expected) = &state.token else {
        return Err(Refused(
            StatusCode::FORBIDDEN,
            "admin operations are off: no admin token configured",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared as digests, so the time taken says nothing about the token.
    let digest = |text: &str| ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    if digest(presented).as_ref() != digest(expected).as_ref() {
        return Err(Refused(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see admin.token_file)",
        ));
    }
    Ok(())
}

async fn sessions(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    info!(%peer, "admin: list sessions");
    Json(state.shared.sessions_info()).into_response()
}

/// Sessions an operation ended.
#[derive(Debug, Serialize)]
struct Ended {
    sessions: Vec<u64>,
}

async fn revoke(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(target): Query<Target>,
) -> Response {
    let sessions = match (target.session, target.account) {
        (Some(session), None) => match state.shared.revoke_sessions(&[session]).await {
            Ok(ended) if ended.contains(&session) => ended,
            Ok(_) => return error(StatusCode::NOT_FOUND, format!("no live session {session}")),
            Err(message) => return error(StatusCode::SERVICE_UNAVAILABLE, message),
        },
        (None, Some(account)) => {
            let ids = state.shared.sessions_of(account);
            match state.shared.revoke_sessions(&ids).await {
                Ok(ended) => ended,
                Err(message) => return error(StatusCode::SERVICE_UNAVAILABLE, message),
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of ?session=N or ?account=A",
            )
        }
    };
    info!(%peer, ?target, ?sessions, "admin: revoked");
    Json(Ended { sessions }).into_response()
}

async fn kill_switch(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(target): Query<Target>,
) -> Response {
    let (Some(account), None) = (target.account, target.session) else {
        return error(StatusCode::BAD_REQUEST, "give ?account=A");
    };
    if !state.shared.knows_account(account).await {
        return error(
            StatusCode::NOT_FOUND,
            format!("no account {account}: not in the accounts file, no sessions, no orders"),
        );
    }
    let sessions = match state.shared.kill_switch(account).await {
        Ok(sessions) => sessions,
        Err(message) => return error(StatusCode::SERVICE_UNAVAILABLE, message),
    };
    info!(%peer, account, ?sessions, "admin: kill switch (orders cancelled, sessions ended)");
    Json(Ended { sessions }).into_response()
}

/// The key a rotation installed.
#[derive(Debug, Serialize)]
struct Rotated {
    key_id: u32,
}

async fn rotate_key(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    match state.shared.rotate_token_key().await {
        Ok(key_id) => {
            info!(%peer, key_id, "admin: token key rotated");
            Json(Rotated { key_id }).into_response()
        }
        Err(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// Whether a key was retired.
#[derive(Debug, Serialize)]
struct Retired {
    key_id: u32,
}

async fn retire_key(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(key): Query<KeyId>,
) -> Response {
    let retired = match state.shared.retire_token_key(key.id).await {
        Ok(retired) => retired,
        Err(message) => return error(StatusCode::SERVICE_UNAVAILABLE, message),
    };
    if !retired {
        return error(
            StatusCode::CONFLICT,
            format!(
                "key {} is not retired: it is unknown, or the one minting tokens (rotate first)",
                key.id
            ),
        );
    }
    info!(%peer, key_id = key.id, "admin: token key retired");
    Json(Retired { key_id: key.id }).into_response()
}

/// What a reload loaded.
#[derive(Debug, Serialize)]
struct Reloaded {
    accounts: usize,
}

async fn reload_accounts(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    match state.shared.reload_accounts() {
        Ok(accounts) => {
            info!(%peer, accounts, "admin: accounts reloaded");
            Json(Reloaded { accounts }).into_response()
        }
        Err(message) => error(StatusCode::CONFLICT, message),
    }
}

/// A reload of the certificate done.
#[derive(Debug, Serialize)]
struct TlsReloaded {
    reloaded: bool,
}

async fn reload_tls(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    match state.shared.reload_tls() {
        Ok(()) => {
            info!(%peer, "admin: certificate reloaded");
            Json(TlsReloaded { reloaded: true }).into_response()
        }
        Err(message) => error(StatusCode::CONFLICT, message),
    }
}

/// The drain state.
#[derive(Debug, Serialize)]
struct Draining {
    draining: bool,
}

async fn drain(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    state.shared.start_draining();
    info!(%peer, "admin: draining (new logins refused)");
    Json(Draining { draining: true }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_names_the_listener_by_address_localhost_or_an_allowed_name() {
        let allowed = vec!["metrics.venue.example".to_string()];
        for host in [
            "127.0.0.1:9433",
            "10.1.2.3",
            "[::1]:9433",
            "localhost:9433",
            "LOCALHOST",
            "Metrics.Venue.Example:9433",
        ] {
            assert!(host_is_allowed(host, &allowed), "{host}");
        }
        for host in ["attacker.example:9433", "127.0.0.1.nip.example", "", "[::1"] {
            assert!(!host_is_allowed(host, &allowed), "{host}");
        }
    }

    #[test]
    fn connection_limits_hold_per_address_and_in_all_and_free_their_slots() {
        let settings = AdminSettings {
            max_connections: 3,
            max_connections_per_address: 2,
            ..AdminSettings::default()
        };
        let limits = Arc::new(ConnectionLimits::new(&settings));
        let one: IpAddr = "192.0.2.1".parse().expect("address");
        let two: IpAddr = "192.0.2.2".parse().expect("address");
        let first = ConnectionLimits::admit(&limits, one).expect("room");
        let _second = ConnectionLimits::admit(&limits, one).expect("room");
        assert!(
            ConnectionLimits::admit(&limits, one).is_none(),
            "per address"
        );
        let _third = ConnectionLimits::admit(&limits, two).expect("room");
        assert!(ConnectionLimits::admit(&limits, two).is_none(), "in all");
        drop(first);
        assert!(ConnectionLimits::admit(&limits, one).is_some(), "freed");
    }
}
