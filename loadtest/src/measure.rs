//! Measurements beside the load: quiet login and resume cycles, and the replay of
//! missed messages after a resume.

use std::time::{Duration, Instant};

use gateway_client::{Client, ClientError, Credentials, Event, OrderParams};
use proto::{Frame, OrderType, Side, TimeInForce};

use crate::report::{histogram, record, CycleReport, Percentiles, ReplayReport};
use crate::verify::Verifier;
use crate::{client_config, crash, RunError, Target, REPLAY_ORDER_IDS};

/// Login-then-resume cycles in the quiet measurement.
pub(crate) const RESUME_CYCLES: usize = 50;

/// Times `cycles` full logins, each followed by a clean close and a resume from the
/// same client endpoint, as the client library does it.
pub(crate) async fn measure_cycles(
    target: &Target,
    cycles: usize,
) -> Result<CycleReport, RunError> {
    let stalled = |what: &str| RunError::Setup(format!("resume cycles: {what}"));
    let (_, credentials) = target
        .keys
        .first()
        .ok_or_else(|| stalled("needs an account"))?;
    let config = client_config(target, credentials.clone(), target.addr);
    let (mut logins, mut resumes) = (histogram(), histogram());
    for _ in 0..cycles {
        let login = config.credentials.signed_login(
            &config.venue,
            proto::CancelOnDisconnect::Off,
            Duration::ZERO,
        )?;
        let started = Instant::now();
        let endpoint = gateway_client::client_endpoint(&config)?;
        let mut link =
            gateway_client::open_sending(endpoint.clone(), &config, &login.into()).await?;
        let mut buf = bytes::BytesMut::new();
        let Some(Frame::LoginAccepted(accepted)) = read_until(&mut link, &mut buf, |frame| {
            matches!(frame, Frame::LoginAccepted(_) | Frame::LoginRejected(_))
        })
        .await
        else {
            return Err(stalled("login not accepted"));
        };
        record(&mut logins, started.elapsed());
        // Let the TLS session tickets that follow the handshake arrive, as they would
        // on any connection that lived a little.
        tokio::time::sleep(Duration::from_millis(5)).await;
        link.connection.close(0u32.into(), b"");

        let resume = proto::Resume {
            token: accepted.token,
            last_acked_server_seq: 0,
            next_client_seq: 1,
        };
        let started = Instant::now();
        let mut link = gateway_client::open_sending(endpoint, &config, &resume.into()).await?;
        let mut buf = bytes::BytesMut::new();
        if !matches!(
            read_until(&mut link, &mut buf, |frame| matches!(
                frame,
                Frame::ResumeAccepted(_) | Frame::ResumeRejected(_)
            ))
            .await,
            Some(Frame::ResumeAccepted(_))
        ) {
            return Err(stalled("resume not accepted"));
        }
        record(&mut resumes, started.elapsed());
        send_frame(&mut link, proto::Logout {}.into()).await?;
        let _ = read_until(&mut link, &mut buf, |frame| {
            matches!(frame, Frame::Close(_))
        })
        .await;
        link.connection.close(0u32.into(), b"");
    }
    Ok(CycleReport {
        cycles: cycles as u64,
        login_us: Percentiles::of(&logins),
        resume_us: Percentiles::of(&resumes),
    })
}

/// Reads frames from a raw link until `stop` says so; `None` on silence or close.
pub(crate) async fn read_until(
    link: &mut gateway_client::Link,
    buf: &mut bytes::BytesMut,
    mut stop: impl FnMut(&Frame) -> bool,
) -> Option<Frame> {
    let read = async {
        loop {
            while let Ok(Some(frame)) = proto::decode_buf(buf) {
                if stop(&frame) {
                    return Some(frame);
                }
            }
            match link.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                _ => return None,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

pub(crate) async fn send_frame(
    link: &mut gateway_client::Link,
    frame: Frame,
) -> Result<(), RunError> {
    link.send
        .write_all(&frame.to_bytes())
        .await
        .map_err(|e| RunError::Setup(e.to_string()))
}

/// Detaches a session, makes `messages` fills happen to it, and times its resume and
/// replay frame by frame (connect to `ResumeAccepted`, to the first and to the last
/// replayed message).
///
/// Both sides are checked like the main run: every order answered once, every trade
/// seen once on each side, no sequence gap. A snapshot on either side (messages
/// released beyond the retention bound) fails the measurement with its cause.
/// With `restart`, the gateway is killed and started again after the maker missed
/// the fills, and before it resumes: the replay comes from the rebuilt core.
pub(crate) async fn measure_replay(
    target: &Target,
    messages: u64,
    restart: Option<&mut crash::GatewayProcess>,
) -> Result<ReplayReport, RunError> {
    const TAKER: usize = 0;
    const MAKER: usize = 1;
    let failed = |what: String| RunError::Setup(format!("replay measurement: {what}"));
    let credentials = |index: usize| {
        target
            .keys
            .get(index)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| failed("needs two accounts".into()))
    };
    let maker_config = client_config(target, credentials(0)?, target.addr);
    let mut verifier = Verifier::new(2);

    // The maker logs in and rests one large order, then its connection closes. It
    // keeps its endpoint (and TLS session tickets) for the resume, as the client
    // library does.
    let endpoint = gateway_client::client_endpoint(&maker_config)?;
    let login = maker_config.credentials.signed_login(
        &maker_config.venue,
        proto::CancelOnDisconnect::Off,
        Duration::ZERO,
    )?;
    let mut link =
        gateway_client::open_sending(endpoint.clone(), &maker_config, &login.into()).await?;
    let mut buf = bytes::BytesMut::new();
    let resting = proto::NewOrder {
        client_seq: 1,
        client_order_id: REPLAY_ORDER_IDS,
        instrument_id: 2,
        side: Side::Sell,
        order_type: OrderType::Limit,
        time_in_force: TimeInForce::Gtc,
        price: 1_000_000,
        quantity: 10 * messages,
    };
    verifier.sent_order(MAKER, 1, resting.client_order_id, resting.quantity);
    send_frame(&mut link, resting.into()).await?;
    let mut token = None;
    let acked = read_until(&mut link, &mut buf, |frame| {
        if let Frame::LoginAccepted(accepted) = frame {
            token = Some(accepted.token);
        }
        matches!(frame, Frame::OrderAck(_) | Frame::Reject(_))
    })
    .await
    .ok_or_else(|| failed("the maker's order got no answer".into()))?;
    verifier.message(MAKER, &acked);
    if let Frame::Reject(reject) = acked {
        return Err(failed(format!(
            "the maker's order was rejected: {:?}",
            reject.reason
        )));
    }
    let token = token.ok_or_else(|| failed("no LoginAccepted".into()))?;
    link.connection.close(0u32.into(), b"");
    drop(link);

    // The taker trades against it, one lot per order, while it is detached.
    taker_burst(target, credentials(1)?, messages, &mut verifier, TAKER)
        .await
        .map_err(failed)?;

    let mut restart_ms = None;
    if let Some(process) = restart {
        let killed = Instant::now();
        process.kill_and_restart()?;
        process.wait_ready().await?;
        restart_ms = Some(killed.elapsed().as_secs_f64() * 1e3);
    }

    // The maker resumes, its Resume in 0-RTT data: one flight brings the answer and
    // the replay.
    let resume = proto::Resume {
        token,
        last_acked_server_seq: 1,
        next_client_seq: 2,
    };
    let started = Instant::now();
    let mut link = gateway_client::open_sending(endpoint, &maker_config, &resume.into()).await?;
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut buf = bytes::BytesMut::new();
    let answer = read_until(&mut link, &mut buf, |_| true).await;
    let resume_ms = started.elapsed().as_secs_f64() * 1e3;
    match answer {
        Some(Frame::ResumeAccepted(accepted)) if accepted.snapshot_follows => {
            return Err(failed(format!(
                "the maker's resume took a snapshot: the gateway had released messages {} to {} \
                 of the {messages} fills it missed (retention bound, PROTOCOL.md section 4); \
                 measure fewer messages",
                resume.last_acked_server_seq + 1,
                accepted.oldest_available - 1,
            )))
        }
        Some(Frame::ResumeAccepted(_)) => {}
        other => return Err(failed(format!("the maker's resume answered {other:?}"))),
    }
    let mut replayed = 0;
    let mut first_message_ms = 0.0;
    read_until(&mut link, &mut buf, |frame| {
        if frame.server_seq().is_some() {
            verifier.message(MAKER, frame);
            replayed += 1;
            if replayed == 1 {
                first_message_ms = started.elapsed().as_secs_f64() * 1e3;
            }
        }
        replayed == messages
    })
    .await
    .ok_or_else(|| {
        failed(format!(
            "the maker's replay stopped after {replayed} of {messages} messages"
        ))
    })?;
    let complete_ms = started.elapsed().as_secs_f64() * 1e3;
    link.connection.close(0u32.into(), b"");
    verifier.finish();
    if verifier.violations() > 0 {
        return Err(failed(format!(
            "{} violations: {}",
            verifier.violations(),
            verifier.samples().join("; ")
        )));
    }
    Ok(ReplayReport {
        messages: replayed,
        restart_ms,
        connect_ms,
        resume_ms,
        first_message_ms,
        complete_ms,
    })
}

/// Most messages the replay measurement can make with the in-process gateway's
/// settings: the taker's orders within one second's rate allowance, and the maker's
/// fills (after its `OrderAck`) within its ring's bounds.
pub(crate) fn replay_limit() -> u64 {
    let settings = gateway::config::SessionSettings::default();
    let fill = proto::HEADER_LEN + proto::Fill::BODY_LEN;
    let ack = proto::HEADER_LEN + proto::OrderAck::BODY_LEN;
    let retained =
        (settings.replay_window - 1).min(settings.replay_window_bytes.saturating_sub(ack) / fill);
    u64::from(settings.max_messages_per_second).min(retained as u64)
}

/// The taker's side of the replay measurement: `orders` one-lot IOC buys sent as
/// fast as the client library takes them, each answered and filled exactly once.
/// Fails with the cause if a fill could not arrive as a fill (the connection was
/// closed and the resume took a snapshot) or the burst stalls.
pub(crate) async fn taker_burst(
    target: &Target,
    credentials: Credentials,
    orders: u64,
    verifier: &mut Verifier,
    session: usize,
) -> Result<(), String> {
    let (taker, mut events) = Client::connect(client_config(target, credentials, target.addr))
        .await
        .map_err(|e| format!("the taker's login failed: {e}"))?;
    let mut next = 1;
    let mut fills = 0;
    let mut lost_connections = Vec::new();
    while fills < orders || verifier.unanswered(session) > 0 {
        while next <= orders {
            let order = OrderParams {
                instrument_id: 2,
                client_order_id: REPLAY_ORDER_IDS + next,
                side: Side::Buy,
                order_type: OrderType::Limit,
                time_in_force: TimeInForce::Ioc,
                price: 1_000_000,
                quantity: 10,
            };
            match taker.new_order(order) {
                Ok(client_seq) => {
                    verifier.sent_order(session, client_seq, order.client_order_id, 10);
                    next += 1;
                }
                Err(ClientError::Backpressure) => break,
                Err(e) => return Err(format!("the taker could not send: {e}")),
            }
        }
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        match event {
            Ok(Some(Event::Message(frame))) => {
                verifier.message(session, &frame);
                match frame {
                    Frame::Fill(_) => fills += 1,
                    Frame::Reject(reject) => {
                        return Err(format!("a taker order was rejected: {:?}", reject.reason))
                    }
                    _ => {}
                }
            }
            Ok(Some(Event::Snapshot {
                as_of_server_seq, ..
            })) if as_of_server_seq > 0 => {
                return Err(format!(
                    "the taker's connection was lost ({}) and its resume took a snapshot \
                     as of server sequence {as_of_server_seq}: it covered {} fills the \
                     taker never got as fills (retention bound, PROTOCOL.md section 4)",
                    describe_losses(&lost_connections),
                    orders.saturating_sub(fills),
                ))
            }
            Ok(Some(Event::Resumed { lost })) => lost_connections.push(lost),
            Ok(Some(Event::Snapshot { .. } | Event::Reconnecting { .. })) => {}
            Ok(Some(Event::Ended(reason))) => {
                return Err(format!("the taker's session ended: {reason:?}"))
            }
            Ok(None) | Err(_) => {
                return Err(format!(
                    "the taker stalled with {fills} of {orders} fills and {} orders \
                     unanswered; connections lost: {}",
                    verifier.unanswered(session),
                    describe_losses(&lost_connections),
                ))
            }
        }
    }
    let _ = taker.logout();
    Ok(())
}

/// Why connections were lost, for a failure message.
pub(crate) fn describe_losses(lost: &[Option<proto::ReasonCode>]) -> String {
    if lost.is_empty() {
        return "none".into();
    }
    lost.iter()
        .map(|reason| reason.map_or("network".into(), |r| format!("{r:?}")))
        .collect::<Vec<String>>()
        .join(", ")
}
