//! One client connection: its handshake (`Login` or `Resume`), then a task reading
//! frames onto the log and one writing the session's transmit path whenever it is
//! woken.
//!
//! Closing is bounded: once the gateway decides to close a connection, what is left
//! to send (a `Close`, or an ending session's last messages) must go within
//! [`CLOSE_DEADLINE`], whatever the peer does; then the QUIC connection is closed
//! with the reason as its error code.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use proto::{Frame, ReasonCode};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::quic::close_code;
use super::{HandshakeSlot, Shared, CLOSE_DEADLINE};
use crate::metrics::ReasonLabel;
use crate::registry::{lock, SessionHandle};
use crate::sequencer::Record;
use crate::session::{ConnectionId, Transmit};

/// Most frames the writer takes from a session per wake-up.
const WRITE_BATCH: usize = 64;

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A connection as the server tracks it.
pub(super) struct Conn {
    connection: quinn::Connection,
    pub(super) wake: Notify,
    /// Where closes are counted, by reason.
    closes: Family<ReasonLabel, Counter>,
    /// Set once, when the gateway decides to close: the writer sends what is left
    /// and `Close` within [`CLOSE_DEADLINE`], then closes.
    closing: watch::Sender<Option<ReasonCode>>,
}

impl Conn {
    fn new(connection: quinn::Connection, closes: Family<ReasonLabel, Counter>) -> Self {
        Conn {
            connection,
            wake: Notify::new(),
            closes,
            closing: watch::Sender::new(None),
        }
    }

    pub(super) fn close(&self, reason: ReasonCode) {
        let first = self.closing.send_if_modified(|closing| {
            let first = closing.is_none();
            closing.get_or_insert(reason);
            first
        });
        if first {
            self.closes
                .get_or_create(&ReasonLabel {
                    reason: reason.name(),
                })
                .inc();
        }
        self.wake.notify_one();
    }

    pub(super) fn closing(&self) -> Option<ReasonCode> {
        *self.closing.borrow()
    }
}

/// Reads frames from `recv` into `buf` until one is whole; `Ok(None)` at end of stream.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, ReasonCode> {
    loop {
        match proto::decode_buf(buf) {
            Ok(Some(frame)) => return Ok(Some(frame)),
            Ok(None) => {}
            Err(error) => {
                debug!(%error, "undecodable frame");
                return Err(error.reason());
            }
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) | Err(_) => return Ok(None),
        }
    }
}

pub(super) async fn serve_connection(
    shared: Arc<Shared>,
    conn_id: ConnectionId,
    connection: quinn::Connection,
    slot: HandshakeSlot,
) {
    let conn = Arc::new(Conn::new(
        connection.clone(),
        shared.metrics.connections_closed.clone(),
    ));
    shared.conns.insert(conn_id, Arc::clone(&conn));
    let source = connection.remote_address().ip();

    // `Login` or `Resume` must arrive within the handshake timeout; if the stream is
    // open by then, `Close` says why the connection ends.
    let deadline = tokio::time::Instant::now() + shared.handshake_timeout;
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return shared.forget(conn_id),
        Err(_) => {
            refuse(&connection, None, ReasonCode::HandshakeTimeout).await;
            return shared.forget(conn_id);
        }
    };
    // Room for a couple of frames; it grows only if a read brings more.
    let mut buf = BytesMut::with_capacity(2 * proto::MAX_FRAME_LEN);
    let first = match tokio::time::timeout_at(deadline, read_frame(&mut recv, &mut buf)).await {
        Ok(first) => first,
        Err(_) => {
            let close = Frame::from(proto::Close {
                reason: ReasonCode::HandshakeTimeout,
            });
            refuse(
                &connection,
                Some((&mut send, close)),
                ReasonCode::HandshakeTimeout,
            )
            .await;
            return shared.forget(conn_id);
        }
    };

    let session = match first {
        Ok(Some(Frame::Login(login))) => {
            let result = shared.login(conn_id, source, &login).await;
            match &result {
                Ok(session) => {
                    info!(session = lock(session).id(), %source, api_key = login.api_key_id, "login");
                }
                Err(answer) => {
                    info!(%source, api_key = login.api_key_id, reason = answer_reason(answer).name(), "login refused");
                }
            }
            shared
                .metrics
                .login(result.as_ref().err().map(answer_reason));
            result
        }
        Ok(Some(Frame::Resume(resume))) => {
            let result = shared.resume(conn_id, source, &resume).await;
            if let Err(answer) = &result {
                info!(%source, reason = answer_reason(answer).name(), last_acked = resume.last_acked_server_seq, "resume refused");
            }
            shared
                .metrics
                .resume(result.as_ref().err().map(answer_reason));
            result
        }
        Ok(Some(_)) => Err(Frame::Close(proto::Close {
            reason: ReasonCode::UnexpectedFrame,
        })),
        Ok(None) => return shared.forget(conn_id),
        Err(reason) => Err(Frame::Close(proto::Close { reason })),
    };
    drop(slot);
    let session = match session {
        Ok(session) => session,
        Err(answer) => {
            let reason = answer_reason(&answer);
            debug!(?reason, "handshake refused");
            refuse(&connection, Some((&mut send, answer)), reason).await;
            return shared.forget(conn_id);
        }
    };

    tokio::spawn(refuse_extra_streams(connection.clone()));
    let writer = tokio::spawn(write_loop(
        Arc::clone(&session),
        conn_id,
        Arc::clone(&conn),
        send,
    ));
    read_loop(&shared, &session, conn_id, &conn, recv, buf).await;
    let session_id = lock(&session).id();
    match conn.closing() {
        Some(reason) => {
            info!(session = session_id, %source, reason = reason.name(), "disconnected by the gateway")
        }
        None => info!(session = session_id, %source, "disconnected"),
    }
    let lost = Record::ConnectionLost {
        session: session_id,
        conn: conn_id,
    };
    // Without it the core would keep the session attached to nothing, neither
    // expiring it nor running its cancel-on-disconnect.
    let apply = |entry, position| shared.apply(entry, position);
    shared.log.append_until_stored(lost, apply).await;
    conn.wake.notify_one();
    let _ = writer.await;
    shared.forget(conn_id);
}

/// The reason a handshake answer (`LoginRejected`, `ResumeRejected`, `Close`) gives.
fn answer_reason(answer: &Frame) -> ReasonCode {
    match answer {
        Frame::LoginRejected(r) => r.reason,
        Frame::ResumeRejected(r) => r.reason,
        Frame::Close(r) => r.reason,
        _ => ReasonCode::InternalError,
    }
}

/// Refuses every stream a client opens beyond the session stream (section 1).
async fn refuse_extra_streams(connection: quinn::Connection) {
    let code = close_code(ReasonCode::UnexpectedFrame);
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let _ = send.reset(code);
        let _ = recv.stop(code);
    }
}

/// Sends `answer` (if any), then closes the connection with `reason`.
async fn refuse(
    connection: &quinn::Connection,
    answer: Option<(&mut quinn::SendStream, Frame)>,
    reason: ReasonCode,
) {
    if let Some((send, frame)) = answer {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, async {
            send.write_all(&frame.to_bytes()).await.ok()?;
            send.finish().ok()?;
            send.stopped().await.ok()
        })
        .await;
    }
    connection.close(close_code(reason), format!("{reason:?}").as_bytes());
}

/// Most of a connection's records on their way to the stream; beyond, reading waits.
const MAX_RECORDS_IN_FLIGHT: usize = 1_024;

/// Every frame goes onto the log (acks checked first against what this gateway
/// sent), in the order read. The memory log applies it at once; the stream's
/// follower applies it when it reads it back, and a record the stream did not
/// store closes the connection: the client resumes and sends again what the core
/// never saw.
async fn read_loop(
    shared: &Shared,
    session: &SessionHandle,
    conn_id: ConnectionId,
    conn: &Conn,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let session_id = lock(session).id();
    let run = shared.log.run();
    let mut in_flight = FuturesUnordered::new();
    loop {
        let frame = tokio::select! {
            biased;
            Some(stored) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(error) = stored {
                    warn!(session = session_id, %error, "a record was not stored; closing the connection");
                    return conn.close(ReasonCode::InternalError);
                }
                continue;
            }
            read = read_frame(&mut recv, &mut buf), if in_flight.len() < MAX_RECORDS_IN_FLIGHT => read,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(reason) => return conn.close(reason),
        };
        if let Frame::Ack(ack) = &frame {
            if lock(session).ack_beyond_sent(ack.server_seq, run) {
                return conn.close(ReasonCode::AckBeyondSent);
            }
        }
        shared.count_request(session_id, &frame);
        let record = Record::Frame {
            session: session_id,
            conn: conn_id,
            frame: frame.to_bytes().into(),
        };
        let apply = |entry, position| shared.apply(entry, position);
        match shared.log.send(record, apply).await {
            Ok(None) => {}
            Ok(Some(pending)) => in_flight.push(shared.log.confirm(pending)),
            Err(error) => {
                warn!(session = session_id, %error, "cannot append to the log; closing the connection");
                return conn.close(ReasonCode::InternalError);
            }
        }
        if conn.closing().is_some() {
            return;
        }
    }
    // The stream ended: what was read still goes in before the connection is lost.
    while in_flight.next().await.is_some() {}
}

async fn write_loop(
    session: SessionHandle,
    conn_id: ConnectionId,
    conn: Arc<Conn>,
    mut send: quinn::SendStream,
) {
    let mut frames: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    let mut closing = conn.closing.subscribe();
    // Set when the gateway decides to close: everything left must go by then.
    let mut deadline = None;
    loop {
        if deadline.is_none() && conn.closing().is_some() {
            deadline = Some(tokio::time::Instant::now() + CLOSE_DEADLINE);
        }
        frames.clear();
        let transmit = lock(&session).poll_transmit(conn_id, &mut frames, WRITE_BATCH);
        // Taken over, cut off, a protocol error, or (crash-safe mode) the gateway
        // stopping with the session still attached: once what it had is written,
        // say why, then close.
        let closing_now = conn.closing().filter(|_| frames.is_empty());
        let last = match (transmit, closing_now) {
            (Transmit::Finished(reason), _) => Some(reason),
            (_, Some(reason)) => {
                frames.push(Frame::from(proto::Close { reason }).to_bytes());
                Some(reason)
            }
            (Transmit::NotAttached, None) if frames.is_empty() => return,
            _ => None,
        };
        if frames.is_empty() {
            tokio::select! {
                () = conn.wake.notified() => {}
                _ = conn.connection.closed() => return,
                _ = closing.wait_for(Option::is_some), if deadline.is_none() => {}
                () = sleep_until(deadline) => return close_now(&conn, None),
            }
            // Let the tasks already ready (other connections' frames, whose fills
            // may be for this session too) run first: their answers then leave in
            // this write's packets instead of packets of their own. Under load
            // that cut the CPU per order by a sixth; when idle it costs one pass
            // of an empty run queue.
            tokio::task::yield_now().await;
            continue;
        }
        let written = write_within(&mut send, &mut frames, &mut closing, &mut deadline).await;
        match (written, last) {
            (Ok(()), None) => {}
            (Ok(()), Some(reason)) => {
                // Give the peer until the deadline to take the last frames.
                let _ = send.finish();
                let until =
                    deadline.unwrap_or_else(|| tokio::time::Instant::now() + CLOSE_DEADLINE);
                let _ = tokio::time::timeout_at(until, send.stopped()).await;
                return close_now(&conn, Some(reason));
            }
            (Err(()), _) => return close_now(&conn, None),
        }
    }
}

/// Writes `frames`, giving up at the close deadline once there is one (a close
/// requested during the write sets it).
async fn write_within(
    send: &mut quinn::SendStream,
    frames: &mut [Bytes],
    closing: &mut watch::Receiver<Option<ReasonCode>>,
    deadline: &mut Option<tokio::time::Instant>,
) -> Result<(), ()> {
    let write = send.write_all_chunks(frames);
    tokio::pin!(write);
    if deadline.is_none() {
        tokio::select! {
            written = &mut write => return written.map_err(drop),
            _ = closing.wait_for(Option::is_some) => {
                *deadline = Some(tokio::time::Instant::now() + CLOSE_DEADLINE);
            }
        }
    }
    let until = deadline.unwrap_or_else(tokio::time::Instant::now);
    match tokio::time::timeout_at(until, write).await {
        Ok(written) => written.map_err(drop),
        Err(_) => Err(()),
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Closes the QUIC connection with `reason`, else the reason the gateway closes it
/// for; with neither (the stream failed) it is already going.
fn close_now(conn: &Conn, reason: Option<ReasonCode>) {
    if let Some(reason) = reason.or_else(|| conn.closing()) {
        conn.connection
            .close(close_code(reason), format!("{reason:?}").as_bytes());
    }
}
