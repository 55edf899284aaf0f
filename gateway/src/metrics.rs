//! What the gateway counts for operators, in the Prometheus/OpenMetrics text format.
//!
//! Counters that move on the hot path are plain atomics (`prometheus-client`'s
//! [`Counter`]), updated where things happen. Values that are cheaper to read than to
//! track (sessions by state, ring occupancy, the engine's queue, the process's own
//! CPU and memory) are read at scrape time and passed to [`Metrics::render`] as a
//! [`Snapshot`]. Each gateway owns its metrics, so several gateways in one process
//! (as in tests) do not mix their numbers.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use proto::ReasonCode;

/// One in this many new orders has its time from arrival to answer measured: enough
/// for the latency histogram, too few to cost anything.
pub const LATENCY_SAMPLE_EVERY: u64 = 16;

/// A label naming why something happened (a reason code's name, or a short word).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: &'static str,
}

/// A label naming a gateway on the stream (its `sequencer.gateway_name`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabel {
    /// The gateway's name.
    pub gateway: String,
}

/// A label naming a kind of engine answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// A label naming the outcome of a handshake: `accepted`, or the refusal's reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `accepted` or a reason code's name.
    pub outcome: &'static str,
}

/// A label with a session's state: `attached` or `detached`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The gateway's counters and histograms, updated as things happen.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Logins by outcome.
    pub logins: Family<OutcomeLabel, Counter>,
    /// Resumes by outcome.
    pub resumes: Family<OutcomeLabel, Counter>,
    /// Connection attempts refused at the QUIC level, before any frame.
    pub refused_before_handshake: Family<ReasonLabel, Counter>,
    /// Connections the gateway closed, by reason (`SlowConsumer`, `TakenOver`, ...).
    pub connections_closed: Family<ReasonLabel, Counter>,
    /// `NewOrder`s received.
    pub orders: Counter,
    /// `Cancel`s received.
    pub cancels: Counter,
    /// `Replace`s received.
    pub replaces: Counter,
    /// Orders the engine accepted.
    pub order_acks: Counter,
    /// Fills (each side of a trade counts once).
    pub fills: Counter,
    /// Requests the engine refused, by reason.
    pub rejects: Family<ReasonLabel, Counter>,
    /// Orders that stopped working without filling, by reason (`CancelOnDisconnect`
    /// among them).
    pub cancelled: Family<ReasonLabel, Counter>,
    /// Arrival of a new order to its answer entering the session's stream, in seconds,
    /// for one order in [`LATENCY_SAMPLE_EVERY`].
    pub order_ack_latency: Histogram,
}

/// Values read at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Sessions attached to a connection.
    pub sessions_attached: u64,
    /// Sessions waiting for a resume.
    pub sessions_detached: u64,
    /// Open QUIC connections.
    pub connections: u64,
    /// Connections that have not logged in or resumed yet.
    pub handshaking: u64,
    /// Unacknowledged messages retained, all sessions.
    pub ring_messages: u64,
    /// Bytes of those.
    pub ring_bytes: u64,
    /// Requests waiting for the engine: queued for its thread, or in batches not
    /// yet answered (engines on the log); 0 when it runs inline.
    pub engine_queue: u64,
    /// Successful resumes (the registry's count).
    pub resumes: u64,
    /// Messages queued for replay by resumes.
    pub messages_replayed: u64,
    /// Resumes that took the snapshot path.
    pub snapshot_resumes: u64,
    /// Detached sessions ended to make room for a login of their account.
    pub sessions_evicted: u64,
    /// Crash-safe mode: records of gateway runs that had ended, not applied.
    pub fenced_records: u64,
    /// The names of the gateways live on the log, this one included.
    pub live_gateways: Vec<String>,
    /// Log position of the last record the core applied.
    pub applied_position: u64,
    /// Crash-safe mode: records the stream did not acknowledge in time.
    pub append_failures: u64,
    /// Crash-safe mode: position of the latest core snapshot this gateway stored or
    /// restored.
    pub core_snapshot_position: u64,
    /// Crash-safe mode: core snapshots that could not be stored.
    pub core_snapshot_failures: u64,
    /// Whether the gateway is draining (refusing new logins).
    pub draining: bool,
    /// Engines on the log: their answers counted by this process.
    pub engine_answers: gateway_core::external::AnswerCounts,
    /// Engines on the log: batches of requests made and not yet answered.
    pub engine_unanswered_batches: u64,
    /// Engines on the log: batches this gateway stored in the requests stream
    /// (the first copy of each).
    pub engine_batches_published: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        Metrics {
            logins: Family::default(),
            resumes: Family::default(),
            refused_before_handshake: Family::default(),
            connections_closed: Family::default(),
            orders: Counter::default(),
            cancels: Counter::default(),
            replaces: Counter::default(),
            order_acks: Counter::default(),
            fills: Counter::default(),
            rejects: Family::default(),
            cancelled: Family::default(),
            // 10 µs to about 1.3 s, doubling.
            order_ack_latency: Histogram::new(
                std::iter::successors(Some(10e-6), |b| Some(b * 2.0)).take(18),
            ),
        }
    }

    /// Counts a login's outcome.
    pub fn login(&self, refused: Option<ReasonCode>) {
        self.logins.get_or_create(&outcome(refused)).inc();
    }

    /// Counts a resume's outcome.
    pub fn resume(&self, refused: Option<ReasonCode>) {
        self.resumes.get_or_create(&outcome(refused)).inc();
    }

    /// Counts a connection the gateway closed.
    pub fn connection_closed(&self, reason: ReasonCode) {
        self.connections_closed
            .get_or_create(&ReasonLabel {
                reason: reason.name(),
            })
            .inc();
    }

    /// Counts a connection attempt refused before the handshake.
    pub fn refused(&self, reason: &'static str) {
        self.refused_before_handshake
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Records a sampled order's time to its answer.
    pub fn order_answered_after(&self, elapsed: Duration) {
        self.order_ack_latency.observe(elapsed.as_secs_f64());
    }

    /// The metrics in the OpenMetrics text format, with `snapshot`'s values and the
    /// process's own (`process_*`).
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut registry = Registry::default();
        register_process(&mut registry);
        let gateway = registry.sub_registry_with_prefix("gateway");
        self.register(gateway);
        register_snapshot(gateway, snapshot);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    fn register(&self, registry: &mut Registry) {
        registry.register("logins", "Logins, by outcome", self.logins.clone());
        registry.register("resumes", "Resumes, by outcome", self.resumes.clone());
        registry.register(
            "refused_before_handshake",
            "Connection attempts refused at the QUIC level, by reason",
            self.refused_before_handshake.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the gateway closed, by reason",
            self.connections_closed.clone(),
        );
        registry.register("orders", "NewOrder requests received", self.orders.clone());
        registry.register("cancels", "Cancel requests received", self.cancels.clone());
        registry.register(
            "replaces",
            "Replace requests received",
            self.replaces.clone(),
        );
        registry.register(
            "order_acks",
            "Orders the engine accepted",
            self.order_acks.clone(),
        );
        registry.register(
            "fills",
            "Fills; each side of a trade counts once",
            self.fills.clone(),
        );
        registry.register(
            "rejects",
            "Requests refused by the engine, by reason",
            self.rejects.clone(),
        );
        registry.register(
            "cancelled",
            "Orders that stopped working without filling, by reason",
            self.cancelled.clone(),
        );
        registry.register_with_unit(
            "order_ack_latency",
            "A new order's arrival to its answer entering the session's stream (sampled)",
            Unit::Seconds,
            self.order_ack_latency.clone(),
        );
    }
}

fn register_snapshot(registry: &mut Registry, snapshot: &Snapshot) {
    let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    let gauge = |value: u64| ConstGauge::new(signed(value));
    let sessions = Family::<StateLabel, Gauge>::default();
    for (state, count) in [
        ("attached", snapshot.sessions_attached),
        ("detached", snapshot.sessions_detached),
    ] {
        sessions
            .get_or_create(&StateLabel { state })
            .set(signed(count));
    }
    registry.register(
        "sessions",
        "Sessions, attached to a connection or waiting for their client to resume",
        sessions,
    );
    registry.register(
        "connections",
        "Open QUIC connections",
        gauge(snapshot.connections),
    );
    registry.register(
        "handshaking_connections",
        "Connections that have not logged in or resumed yet",
        gauge(snapshot.handshaking),
    );
    registry.register(
        "ring_messages",
        "Unacknowledged messages retained for replay, all sessions",
        gauge(snapshot.ring_messages),
    );
    registry.register_with_unit(
        "ring",
        "Bytes of unacknowledged messages retained for replay, and of login snapshots kept until confirmed, all sessions",
        Unit::Bytes,
        gauge(snapshot.ring_bytes),
    );
    registry.register(
        "engine_queue",
        "Requests waiting for the engine: queued for its thread, or (engines on the log) in batches not yet answered",
        gauge(snapshot.engine_queue),
    );
    registry.register(
        "draining",
        "1 while the gateway refuses new logins",
        gauge(u64::from(snapshot.draining)),
    );
    registry.register(
        "resumes_completed",
        "Successful resumes",
        ConstCounter::new(snapshot.resumes),
    );
    registry.register(
        "messages_replayed",
        "Messages queued for replay by resumes",
        ConstCounter::new(snapshot.messages_replayed),
    );
    registry.register(
        "snapshot_resumes",
        "Resumes that found needed messages released and took the snapshot path",
        ConstCounter::new(snapshot.snapshot_resumes),
    );
    registry.register(
        "sessions_evicted",
        "Detached sessions ended to make room for a login of their account",
        ConstCounter::new(snapshot.sessions_evicted),
    );
    registry.register(
        "sequencer_applied_position",
        "Log position of the last record the core applied (embedded mode: inputs applied since the start)",
        gauge(snapshot.applied_position),
    );
    registry.register(
        "sequencer_append_failures",
        "Crash-safe mode: records the stream did not acknowledge in time (each closed its connection or refused its request)",
        ConstCounter::new(snapshot.append_failures),
    );
    registry.register(
        "sequencer_snapshot_position",
        "Crash-safe mode: stream position of the latest core snapshot stored or restored (0: none)",
        gauge(snapshot.core_snapshot_position),
    );
    registry.register(
        "sequencer_snapshot_failures",
        "Crash-safe mode: core snapshots that could not be stored",
        ConstCounter::new(snapshot.core_snapshot_failures),
    );
    registry.register(
        "sequencer_live_gateways",
        "Gateways live on the log as the core sees them, this one included (1 in embedded mode)",
        gauge(snapshot.live_gateways.len() as u64),
    );
    let live: Family<GatewayLabel, Gauge> = Family::default();
    for name in &snapshot.live_gateways {
        live.get_or_create(&GatewayLabel {
            gateway: name.clone(),
        })
        .set(1);
    }
    registry.register(
        "sequencer_live_gateway",
        "1 for each gateway live on the log as the core sees it, by its sequencer.gateway_name (a gateway declared gone drops out)",
        live,
    );
    let answers: Family<KindLabel, Counter> = Family::default();
    let counts = &snapshot.engine_answers;
    for (kind, count) in [
        ("first", counts.first),
        ("same", counts.same),
        ("differed", counts.differed),
        ("uncompared", counts.uncompared),
        ("unexpected", counts.unexpected),
    ] {
        answers
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(count);
    }
    registry.register(
        "engine_answers",
        "Engines on the log: answers to batches of requests read from the log, by kind: first (applied), same (a later answer equal to the first), differed (a later answer unlike the first: the engines disagree), uncompared (too late to compare), unexpected (unusable, ignored)",
        answers,
    );
    registry.register(
        "engine_unanswered_batches",
        "Engines on the log: batches of requests made and not yet answered",
        gauge(snapshot.engine_unanswered_batches),
    );
    registry.register(
        "engine_batches_published",
        "Engines on the log: batches this gateway stored first in the requests stream",
        ConstCounter::new(snapshot.engine_batches_published),
    );
    registry.register(
        "fenced_records",
        "Crash-safe mode: records of gateway runs that had ended (replaced by a restart, or silent too long), not applied",
        ConstCounter::new(snapshot.fenced_records),
    );
}

/// `process_*` metrics of this process, from `/proc` (nothing elsewhere).
fn register_process(registry: &mut Registry) {
    let Ok(process) = procfs::process::Process::myself() else {
        return;
    };
    let Ok(stat) = process.stat() else {
        return;
    };
    let ticks_per_second = procfs::ticks_per_second().max(1);
    let ticks = ticks_per_second as f64;
    registry.register_with_unit(
        "process_cpu",
        "User and system CPU time spent",
        Unit::Seconds,
        ConstCounter::new((stat.utime + stat.stime) as f64 / ticks),
    );
    let page = procfs::page_size();
    registry.register_with_unit(
        "process_resident_memory",
        "Resident memory size",
        Unit::Bytes,
        ConstGauge::new(i64::try_from(stat.rss.saturating_mul(page)).unwrap_or(i64::MAX)),
    );
    registry.register_with_unit(
        "process_virtual_memory",
        "Virtual memory size",
        Unit::Bytes,
        ConstGauge::new(i64::try_from(stat.vsize).unwrap_or(i64::MAX)),
    );
    registry.register(
        "process_threads",
        "Threads",
        ConstGauge::new(stat.num_threads),
    );
    if let Ok(fds) = process.fd_count() {
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            ConstGauge::new(i64::try_from(fds).unwrap_or(i64::MAX)),
        );
    }
    if let Ok(boot) = procfs::boot_time_secs() {
        registry.register_with_unit(
            "process_start_time",
            "Start time since the Unix epoch",
            Unit::Seconds,
            ConstGauge::new(i64::try_from(boot + stat.starttime / ticks_per_second).unwrap_or(0)),
        );
    }
}

/// A handshake outcome as a label.
fn outcome(refused: Option<ReasonCode>) -> OutcomeLabel {
    OutcomeLabel {
        outcome: refused.map_or("accepted", ReasonCode::name),
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4 reads it: a counter's
/// `# TYPE` and `# HELP` name its samples (`x_total`, not `x`), an info metric is a
/// gauge named `x_info`, `# UNIT` and `# EOF` are left out. Without this a Prometheus
/// text parser would read every counter as untyped.
pub fn prometheus_text(openmetrics: &str) -> String {
    let renamed: std::collections::HashMap<&str, (String, &str)> = openmetrics
        .lines()
        .filter_map(|line| {
            let (name, kind) = line.strip_prefix("# TYPE ")?.split_once(' ')?;
            match kind {
                "counter" => Some((name, (format!("{name}_total"), "counter"))),
                "info" => Some((name, (format!("{name}_info"), "gauge"))),
                "gauge" | "histogram" | "summary" => None,
                _ => Some((name, (name.to_owned(), "untyped"))),
            }
        })
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match comment {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((sample_name, kind)) if prefix == "# TYPE " => {
                        text.push_str(&format!("# TYPE {sample_name} {kind}"));
                    }
                    Some((sample_name, _)) => {
                        text.push_str(&format!("{prefix}{sample_name} {tail}"))
                    }
                    None => text.push_str(line),
                }
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_the_process_and_gateway_metrics() {
        let metrics = Metrics::new();
        metrics.login(None);
        metrics.login(Some(ReasonCode::BadSignature));
        metrics.orders.inc();
        let text = metrics.render(&Snapshot {
            sessions_attached: 3,
            live_gateways: vec!["gw-1".into(), "gw-2".into()],
            ..Snapshot::default()
        });
        for line in [
            "gateway_sequencer_live_gateways 2",
            "gateway_sequencer_live_gateway{gateway=\"gw-2\"} 1",
            "gateway_logins_total{outcome=\"accepted\"} 1",
            "gateway_logins_total{outcome=\"BadSignature\"} 1",
            "gateway_orders_total 1",
            "gateway_sessions{state=\"attached\"} 3",
            "# TYPE process_cpu_seconds counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_prometheus_text_types_every_sample_by_its_own_name() {
        let metrics = Metrics::new();
        metrics.login(None);
        metrics.orders.inc();
        let text = prometheus_text(&metrics.render(&Snapshot::default()));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let typed: std::collections::HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE ")?.split_once(' '))
            .collect();
        assert_eq!(typed.get("gateway_orders_total"), Some(&"counter"));
        assert_eq!(typed.get("process_cpu_seconds_total"), Some(&"counter"));
        for sample in text.lines().filter(|line| !line.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or("");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|family| typed.get(family) == Some(&"histogram"));
            assert!(
                typed.contains_key(name) || family.is_some(),
                "{name} is not typed in\n{text}"
            );
        }
    }
}
