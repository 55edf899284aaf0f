//! One session's order flow in a run: the open-loop schedule, sending on it, receiving
//! and checking every event, the clean start before and the log-out after.

use super::*;

/// Client endpoints for `connections` connections, 50 per UDP socket, as separate
/// client processes would have.
pub fn shared_endpoints(
    config: &ClientConfig,
    connections: usize,
) -> Result<Vec<quinn::Endpoint>, ClientError> {
    (0..connections.div_ceil(50).max(1))
        .map(|_| gateway_client::client_endpoint(config))
        .collect()
}

/// The send times of one connection.
#[derive(Debug)]
pub enum Ticks {
    /// Open loop: times from the schedule thread, fixed in advance, so a stall shows
    /// up as latency (measured from the intended time) instead of hiding it.
    Scheduled(tokio::sync::mpsc::UnboundedReceiver<Instant>),
    /// As fast as the window allows, until the deadline; the intended time is now.
    Unpaced {
        /// When to stop.
        deadline: Instant,
    },
}

impl Ticks {
    /// The next intended send time; `None` when the run is over.
    pub async fn next(&mut self) -> Option<Instant> {
        match self {
            Ticks::Scheduled(times) => times.recv().await,
            Ticks::Unpaced { deadline } => {
                let now = Instant::now();
                (now < *deadline).then_some(now)
            }
        }
    }
}

/// Send times for `connections` connections sharing `rate` per second from `start`
/// to `deadline` (0: unpaced).
///
/// The open-loop schedule runs on its own OS thread: `std::thread::sleep` wakes within
/// tens of microseconds, where tokio's timer rounds to a millisecond, which would show
/// up as a millisecond of latency on every message. Connections take turns, so each
/// sends at `rate / connections`.
pub fn schedule(rate: u64, connections: usize, start: Instant, deadline: Instant) -> Vec<Ticks> {
    if rate == 0 {
        return (0..connections)
            .map(|_| Ticks::Unpaced { deadline })
            .collect();
    }
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..connections)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let spawned = std::thread::Builder::new()
        .name("loadtest-schedule".into())
        .spawn(move || {
            for tick in 0u32.. {
                let intended = start + interval * tick;
                if intended >= deadline {
                    return;
                }
                if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let connection = tick as usize % senders.len();
                // A connection that stopped listening has ended its run.
                let _ = senders[connection].send(intended);
            }
        });
    if spawned.is_err() {
        return (0..connections)
            .map(|_| Ticks::Unpaced { deadline })
            .collect();
    }
    receivers.into_iter().map(Ticks::Scheduled).collect()
}

/// Per-session bookkeeping shared by its sender and receiver.
#[derive(Default)]
pub(crate) struct SessionBook {
    /// Intended send time of each unanswered request, by client sequence.
    pub(crate) intended: FxHashMap<u64, Instant>,
    /// Working orders of this session, oldest first (cancel candidates).
    pub(crate) working: VecDeque<u64>,
    /// Orders known to be done, skipped when picking a cancel target.
    pub(crate) done: FxHashSet<u64>,
    /// A forced disconnect waiting for its resume.
    pub(crate) chaos: Option<(Instant, ChaosMode)>,
    /// When the gateway process was last killed, until this session resumed.
    pub(crate) gateway_killed: Option<Instant>,
}

impl SessionBook {
    /// The oldest order still working, as far as this session knows.
    fn next_cancel_target(&mut self) -> Option<u64> {
        while let Some(id) = self.working.pop_front() {
            if !self.done.remove(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// Counters and histograms of the run.
pub(crate) struct Tally {
    /// When sending started.
    pub(crate) started: Instant,
    /// Latency by slice of intended send time ([`TIMELINE_SLICE`]).
    pub(crate) timeline: Vec<Histogram<u64>>,
    /// Forced disconnects.
    pub(crate) chaos_events: Vec<ChaosEvent>,
    /// Cluster runs: when the latest fault of a gateway began, until the next
    /// fault; resumes meanwhile are its sessions' failovers.
    pub(crate) gateway_fault: Option<(Instant, cluster::Fault)>,
    /// Cluster runs: from a gateway fault to each resume after it, by fault.
    pub(crate) failover: BTreeMap<cluster::Fault, Histogram<u64>>,
    /// Client connections the gateway closed, by the latest chaos event or fault
    /// begun before the client resumed (`none` before the first).
    pub(crate) cuts_by_fault: BTreeMap<&'static str, u64>,
    /// Set when the run logs its sessions out: their end is expected.
    pub(crate) logging_out: bool,
    pub(crate) verifier: Verifier,
    pub(crate) books: Vec<SessionBook>,
    pub(crate) ack_latency: Histogram<u64>,
    /// With `--flood`: latency of requests intended before and after the flood began.
    pub(crate) phase_latency: Option<(Instant, Histogram<u64>, Histogram<u64>)>,
    /// When the latest answer arrived.
    pub(crate) last_answer: Option<Instant>,
    /// Times without any answer of [`ANSWER_GAP_KEPT`] or longer: when each began,
    /// seconds from the start, and how long it lasted, milliseconds.
    pub(crate) answer_gaps: Vec<(f64, f64)>,
    pub(crate) resume: Histogram<u64>,
    pub(crate) blackhole: Histogram<u64>,
    /// Gateway kill to each session's resume.
    pub(crate) restart_resume: Histogram<u64>,
    /// The latest failed reconnect attempt of a session still reconnecting, for the
    /// progress line: the session, the attempt, of how many, and why it failed.
    pub(crate) reconnecting: Option<(usize, u32, u32, String)>,
    pub(crate) counts: Counts,
}

#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) orders_sent: u64,
    pub(crate) cancels_sent: u64,
    pub(crate) acks: u64,
    pub(crate) rejects: u64,
    pub(crate) rejects_by_reason: BTreeMap<String, u64>,
    pub(crate) fills: u64,
    pub(crate) cancelled: u64,
    pub(crate) resumes: u64,
    pub(crate) disconnects: DisconnectCounts,
    pub(crate) closed_by_gateway: BTreeMap<String, u64>,
}

pub(crate) type Shared = Arc<parking_lot::Mutex<Tally>>;

/// The shortest time without an answer that the run keeps (for the cluster's
/// stalls by fault).
pub(crate) const ANSWER_GAP_KEPT: Duration = Duration::from_millis(20);

/// Most times without an answer kept.
pub(crate) const MAX_ANSWER_GAPS: usize = 100_000;

pub(crate) fn lock(shared: &Shared) -> parking_lot::MutexGuard<'_, Tally> {
    shared.lock()
}

/// One session's open-loop order flow: mostly new orders around one price so that
/// sessions cross each other, some cancels of its own working orders.
pub(crate) async fn send_orders(
    index: usize,
    client: Arc<Client>,
    shared: Shared,
    mut ticks: Ticks,
    limits: SendLimits,
    mut rng: StdRng,
) {
    let SendLimits {
        deadline,
        window,
        first_order_id,
        answered,
    } = limits;
    let mut next_order_id = first_order_id;
    while let Some(intended) = ticks.next().await {
        // Window-limited mode: wait for answers rather than queue without bound,
        // woken by each answer as the echo baseline's sender is.
        while lock(&shared).verifier.unanswered(index) >= window {
            tokio::select! {
                () = answered.notified() => {}
                () = tokio::time::sleep_until(deadline.into()) => return,
            }
        }
        let mut tally = lock(&shared);
        let cancel_target = (rng.gen_range(0..10) == 0)
            .then(|| tally.books[index].next_cancel_target())
            .flatten();
        let sent = match cancel_target {
            Some(client_order_id) => client.cancel(client_order_id).inspect(|&seq| {
                tally.verifier.sent(index, seq);
                tally.counts.cancels_sent += 1;
            }),
            None => {
                let client_order_id = next_order_id;
                next_order_id += 1;
                let quantity = rng.gen_range(1..=3);
                let order = OrderParams {
                    instrument_id: 1,
                    client_order_id,
                    side: if rng.gen() { Side::Buy } else { Side::Sell },
                    order_type: OrderType::Limit,
                    time_in_force: if rng.gen_range(0..4) == 0 {
                        TimeInForce::Ioc
                    } else {
                        TimeInForce::Gtc
                    },
                    price: 100 + rng.gen_range(0..=1),
                    quantity,
                };
                client.new_order(order).inspect(|&seq| {
                    tally
                        .verifier
                        .sent_order(index, seq, client_order_id, quantity);
                    tally.counts.orders_sent += 1;
                })
            }
        };
        match sent {
            Ok(seq) => {
                tally.books[index].intended.insert(seq, intended);
            }
            Err(ClientError::Backpressure) => {}
            Err(_) => return,
        }
    }
}

/// Events a session's receiver takes from its channel at a time.
pub(crate) const EVENT_BATCH: usize = 64;

/// One session's events: verified, counted, timed.
pub(crate) async fn receive_events(
    index: usize,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    shared: Shared,
    answered: Arc<Notify>,
) {
    // Whatever is queued is taken at once: one lock and one clock read per batch.
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    while events.recv_many(&mut batch, EVENT_BATCH).await > 0 {
        let now = Instant::now();
        let mut tally = lock(&shared);
        let tally = &mut *tally;
        for event in batch.drain(..) {
            match event {
                Event::Message(frame) => {
                    match frame {
                        Frame::OrderAck(ack) => {
                            tally.counts.acks += 1;
                            tally.books[index].working.push_back(ack.client_order_id);
                        }
                        Frame::Reject(reject) => {
                            tally.counts.rejects += 1;
                            *tally
                                .counts
                                .rejects_by_reason
                                .entry(reject.reason.name().to_string())
                                .or_default() += 1;
                        }
                        Frame::Fill(fill) => {
                            tally.counts.fills += 1;
                            if fill.leaves_quantity == 0 {
                                tally.books[index].done.insert(fill.client_order_id);
                            }
                        }
                        Frame::Cancelled(cancelled) => {
                            tally.counts.cancelled += 1;
                            tally.books[index].done.insert(cancelled.client_order_id);
                        }
                        _ => {}
                    }
                    if let Some(seq) = tally.verifier.message(index, &frame) {
                        if let Some(intended) = tally.books[index].intended.remove(&seq) {
                            let latency = now.saturating_duration_since(intended);
                            record(&mut tally.ack_latency, latency);
                            let slice = usize::try_from(
                                intended
                                    .saturating_duration_since(tally.started)
                                    .as_millis()
                                    / TIMELINE_SLICE.as_millis(),
                            )
                            .unwrap_or(usize::MAX)
                            .min(MAX_TIMELINE_SLICES);
                            if tally.timeline.len() <= slice {
                                tally.timeline.resize_with(slice + 1, slice_histogram);
                            }
                            record(&mut tally.timeline[slice], latency);
                            if let Some((midpoint, quiet, flooded)) = &mut tally.phase_latency {
                                record(if intended < *midpoint { quiet } else { flooded }, latency);
                            }
                        }
                        if let Some(last) = tally.last_answer {
                            let gap = now.saturating_duration_since(last);
                            if gap >= ANSWER_GAP_KEPT && tally.answer_gaps.len() < MAX_ANSWER_GAPS {
                                let at = last.saturating_duration_since(tally.started);
                                tally
                                    .answer_gaps
                                    .push((at.as_secs_f64(), gap.as_secs_f64() * 1e3));
                            }
                        }
                        tally.last_answer = Some(now);
                        answered.notify_one();
                    }
                }
                Event::Snapshot {
                    as_of_server_seq,
                    orders,
                } => tally.verifier.snapshot(index, as_of_server_seq, &orders),
                Event::Reconnecting {
                    attempt,
                    attempts,
                    error,
                } => tally.reconnecting = Some((index, attempt, attempts, error)),
                Event::Resumed { lost } => {
                    if tally.reconnecting.as_ref().is_some_and(|r| r.0 == index) {
                        tally.reconnecting = None;
                    }
                    tally.counts.resumes += 1;
                    if let Some(reason) = lost {
                        *tally
                            .counts
                            .closed_by_gateway
                            .entry(format!("{reason:?}"))
                            .or_default() += 1;
                        if reason != ReasonCode::ShuttingDown {
                            let during = tally.chaos_events.last().map_or("none", |e| e.mode);
                            *tally.cuts_by_fault.entry(during).or_default() += 1;
                        }
                    }
                    if let Some((at, mode)) = tally.books[index].chaos.take() {
                        let histogram = match mode {
                            ChaosMode::Blackhole => &mut tally.blackhole,
                            ChaosMode::Clean | ChaosMode::Abrupt => &mut tally.resume,
                        };
                        record(histogram, now.saturating_duration_since(at));
                    }
                    if let Some(at) = tally.books[index].gateway_killed.take() {
                        record(&mut tally.restart_resume, now.saturating_duration_since(at));
                    }
                    if let Some((at, fault)) = tally.gateway_fault {
                        let failover = tally.failover.entry(fault).or_insert_with(histogram);
                        record(failover, now.saturating_duration_since(at));
                    }
                }
                Event::Ended(ReasonCode::LoggedOut) if tally.logging_out => return,
                Event::Ended(reason) => {
                    tally
                        .verifier
                        .violation(format!("session {index} ended: {reason:?}"));
                    return;
                }
            }
        }
    }
}

/// Client order ids of the replay measurement, clear of the load sessions' own
/// (see [`run_order_ids`]).
pub(crate) const REPLAY_ORDER_IDS: u64 = 1 << 62;

/// How long a load session may stay disconnected before its orders are cancelled:
/// longer than any outage the chaos makes, so only the final logout cancels.
pub(crate) const LOAD_SESSION_COD_GRACE: Duration = Duration::from_secs(10);

/// The first client order id of the load sessions of a run started at
/// `started_unix_ms`: different for every run, so a run never reuses an id an
/// earlier run's order may still hold.
pub(crate) fn run_order_ids(started_unix_ms: u64) -> u64 {
    // 2^28 runs' worth of distinct prefixes, each leaving 2^32 ids.
    let prefix = started_unix_ms % ((1 << 28) - 1) + 1;
    prefix << 32
}

/// Where a session's sending stops and where its order ids start.
pub(crate) struct SendLimits {
    pub(crate) deadline: Instant,
    pub(crate) window: usize,
    pub(crate) first_order_id: u64,
    /// Told of each answer: room in the window.
    pub(crate) answered: Arc<Notify>,
}

/// Where a session's own checks start, after [`clean_start`].
pub(crate) struct CleanStart {
    /// The last server sequence the set-up consumed.
    pub(crate) last_server_seq: u64,
    /// Working orders left from before the run, cancelled.
    pub(crate) cancelled: u64,
}

/// Cancels the working orders the session's account still has from before the run
/// (an earlier run that did not finish, say), as its login snapshot lists them, and
/// waits for the answers.
pub(crate) async fn clean_start(
    client: &Client,
    events: &mut tokio::sync::mpsc::Receiver<Event>,
) -> Result<CleanStart, RunError> {
    let failed = |what: String| RunError::Setup(format!("clearing earlier orders: {what}"));
    let wait = Duration::from_secs(10);
    let orders = match tokio::time::timeout(wait, events.recv()).await {
        Ok(Some(Event::Snapshot { orders, .. })) => orders,
        other => {
            return Err(failed(format!(
                "expected the login snapshot, got {other:?}"
            )))
        }
    };
    let mut waiting = HashSet::new();
    for order in orders.iter().filter(|order| order.leaves_quantity > 0) {
        waiting.insert(client.cancel(order.client_order_id)?);
    }
    let cancelled = waiting.len() as u64;
    let mut last_server_seq = 0;
    while !waiting.is_empty() {
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(Event::Message(frame))) => {
                last_server_seq = frame.server_seq().unwrap_or(last_server_seq);
                if let Some(client_seq) = frame.answered_client_seq() {
                    waiting.remove(&client_seq);
                }
            }
            Ok(Some(Event::Ended(reason))) => {
                return Err(failed(format!("the session ended: {reason:?}")))
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                return Err(failed(format!("{} cancels unanswered", waiting.len())))
            }
        }
    }
    Ok(CleanStart {
        last_server_seq,
        cancelled,
    })
}

/// Logs a client out and waits (briefly) for the gateway's goodbye.
pub(crate) async fn log_out(client: &Client, events: &mut tokio::sync::mpsc::Receiver<Event>) {
    if client.logout().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Ended(_)) {
                return;
            }
        }
    })
    .await;
}
