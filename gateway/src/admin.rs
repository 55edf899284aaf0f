//! The operators' HTTP listener (`admin.listen`, default `127.0.0.1:9433`).
//!
//! - `GET /metrics`: Prometheus/OpenMetrics text (see [`crate::metrics`]).
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 while logins are accepted; 503 while draining, and in
//!   crash-safe mode until the core is rebuilt from its stream.
//! - `/admin/*`: operations, each needing `Authorization: Bearer <token>` with the
//!   token from `admin.token_file`, and each logged at info with the caller's address:
//!   - `GET /admin/sessions`: the live sessions, JSON;
//!   - `POST /admin/revoke?session=N` or `?account=A`: end sessions (`Revoked`);
//!   - `POST /admin/kill-switch?account=A`: cancel every working order of the account
//!     and end its sessions;
//!   - `POST /admin/rotate-key`: mint tokens with a new key (older keys still verify);
//!   - `POST /admin/retire-key?id=N`: stop accepting tokens of key N;
//!   - `POST /admin/reload-accounts`: read the accounts file again;
//!   - `POST /admin/drain`: refuse new logins (`ShuttingDown`); sessions carry on.
//!
//! The `gateway admin ...` subcommand is a client for these.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::server::Shared;

/// What the listener serves from.
struct AdminState {
    shared: Arc<Shared>,
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
    shared: Arc<Shared>,
    token: Option<String>,
) {
    let state = Arc::new(AdminState { shared, token });
    let admin = Router::new()
        .route("/admin/sessions", get(sessions))
        .route("/admin/revoke", post(revoke))
        .route("/admin/kill-switch", post(kill_switch))
        .route("/admin/rotate-key", post(rotate_key))
        .route("/admin/retire-key", post(retire_key))
        .route("/admin/reload-accounts", post(reload_accounts))
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
        .with_state(state);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(error) = axum::serve(listener, service).await {
        warn!(%error, "admin listener stopped");
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.shared.metrics_text(),
    )
        .into_response()
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
    Json(state.shared.registry.sessions_info()).into_response()
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
            let ids = state.shared.registry.sessions_of(account);
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
