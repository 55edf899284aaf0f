//! What a run reports: latency percentiles and curves, the timeline, chaos and
//! replay figures, ratios to the bare-QUIC baseline, and the rate sweep's knee.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::baseline::BaselineReport;
use crate::cluster;
use crate::verify::Checks;

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let at = |q| histogram.value_at_quantile(q) as f64;
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: histogram.max() as f64,
            count: histogram.len(),
        }
    }
}

/// Where a latency distribution stands at each of [`CURVE_QUANTILES`], for the
/// percentile curve of the HTML report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The quantile (0.5 is the median).
    pub quantile: f64,
    /// Latency at it, microseconds.
    pub us: f64,
}

/// Quantiles of the percentile curves: denser towards the tail.
pub const CURVE_QUANTILES: [f64; 12] = [
    0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];

/// The percentile curve of a histogram of microseconds.
pub fn curve(histogram: &Histogram<u64>) -> Vec<CurvePoint> {
    if histogram.is_empty() {
        return Vec::new();
    }
    CURVE_QUANTILES
        .iter()
        .map(|&quantile| CurvePoint {
            quantile,
            us: histogram.value_at_quantile(quantile) as f64,
        })
        .collect()
}

/// Latency of the requests intended within one slice of the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Start of the slice, seconds from the run's start.
    pub t_s: f64,
    /// Requests answered.
    pub count: u64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
}

/// A forced disconnect, or a fault of a process (a gateway kill, a cluster fault).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChaosEvent {
    /// When, seconds from the run's start.
    pub t_s: f64,
    /// `clean`, `abrupt` or `blackhole`; `gateway_kill`; `gateway`, `zombie` or
    /// `nats`.
    pub mode: &'static str,
}

/// Width of a timeline slice.
pub(crate) const TIMELINE_SLICE: Duration = Duration::from_millis(250);

/// Slices kept (an hour's worth); later requests count in the last.
pub(crate) const MAX_TIMELINE_SLICES: usize = 14_400;

/// A slice's histogram: two significant digits are plenty for a plot.
pub(crate) fn slice_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// A histogram of microseconds up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// Records a duration in microseconds (at least 1).
pub fn record(histogram: &mut Histogram<u64>, duration: Duration) {
    let micros = u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

/// Disconnects by mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DisconnectCounts {
    /// Clean closes.
    pub clean: u64,
    /// Abrupt drops.
    pub abrupt: u64,
    /// Blackholes.
    pub blackhole: u64,
}

/// The replay measurement: messages a detached session missed, replayed on resume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Messages replayed.
    pub messages: u64,
    /// With a crash-safe gateway: from killing it (after the maker missed the
    /// messages) to the restarted gateway being ready; the reconnect starts then.
    pub restart_ms: Option<f64>,
    /// Reconnect start to the handshake completing, with `Resume` sent (as 0-RTT
    /// data when a ticket allowed it).
    pub connect_ms: f64,
    /// Reconnect start to `ResumeAccepted`.
    pub resume_ms: f64,
    /// Reconnect start to the first replayed message.
    pub first_message_ms: f64,
    /// Reconnect start to the last replayed message.
    pub complete_ms: f64,
}

/// Full logins and resumes timed one after the other on a quiet gateway, so that the
/// two compare like for like.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CycleReport {
    /// Login-then-resume cycles run.
    pub cycles: u64,
    /// A new client's login: new endpoint, full TLS handshake, `Login` →
    /// `LoginAccepted`.
    pub login_us: Percentiles,
    /// The same client's resume after a clean close: TLS resumption with the `Resume`
    /// in 0-RTT data → `ResumeAccepted`.
    pub resume_us: Percentiles,
}

/// Established sessions' latency without and with a bad-login flood, in one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FloodReport {
    /// Login attempts the flood made.
    pub attempts: u64,
    /// Attempts refused before the TLS handshake (address rate limited).
    pub refused_before_handshake: u64,
    /// Attempts answered `RateLimited`.
    pub rate_limited: u64,
    /// Attempts answered `BadSignature`.
    pub bad_signature: u64,
    /// Order-to-answer latency in the first half (no flood).
    pub quiet_us: Percentiles,
    /// Order-to-answer latency in the second half (flood).
    pub flood_us: Percentiles,
    /// p99 with the flood ÷ p99 without.
    pub p99_ratio: f64,
}

/// Gateway ÷ bare QUIC. The latency ratios are `None` for a run with forced
/// disconnects or faults: the echo has none, so they would compare unlike things.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratios {
    /// Order-to-ack p50 ÷ echo p50.
    pub ack_p50: Option<f64>,
    /// Order-to-ack p90 ÷ echo p90: the body of the tail, below the few-ms stalls of
    /// a shared machine that decide a short run's p99.
    pub ack_p90: Option<f64>,
    /// Order-to-ack p99 ÷ echo p99.
    pub ack_p99: Option<f64>,
    /// Order throughput ÷ echo throughput.
    pub throughput: f64,
    /// Resume p50 ÷ (handshake p50 + echo p50).
    pub resume_vs_handshake_plus_rtt: f64,
    /// Login p50 ÷ resume p50.
    pub login_vs_resume: f64,
    /// Gateway CPU per order ÷ echo server CPU per message, both in their own
    /// process.
    pub cpu_per_order_vs_echo_msg: Option<f64>,
}

/// What a run found and measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The loadtest's version.
    pub version: &'static str,
    /// When the run started, Unix milliseconds.
    pub started_unix_ms: u64,
    /// The gateway: `in-process` or its address.
    pub target: String,
    /// Sessions.
    pub sessions: usize,
    /// Unanswered requests per session at most.
    pub window: usize,
    /// Seed of the order flow and chaos choices.
    pub seed: u64,
    /// Forced disconnect interval, milliseconds (0: no chaos).
    pub chaos_interval_ms: u64,
    /// Working orders the accounts had from before the run, cancelled first.
    pub leftover_orders_cancelled: u64,
    /// Offered orders per second (0: window-limited).
    pub rate: u64,
    /// Sending time, seconds.
    pub duration_s: f64,
    /// New orders sent.
    pub orders_sent: u64,
    /// Cancels sent.
    pub cancels_sent: u64,
    /// `OrderAck`s received.
    pub acks: u64,
    /// `Reject`s received.
    pub rejects: u64,
    /// `Reject`s by reason.
    pub rejects_by_reason: BTreeMap<String, u64>,
    /// `Fill`s received (both sides counted).
    pub fills: u64,
    /// `Cancelled`s received.
    pub cancelled: u64,
    /// Forced disconnects.
    pub disconnects: u64,
    /// Forced disconnects by mode.
    pub disconnects_by_mode: DisconnectCounts,
    /// Resumes the clients completed.
    pub resumes: u64,
    /// Messages the gateway replayed on resumes (an in-process gateway's count; 0
    /// for another process: its `/metrics` has it).
    pub messages_replayed: u64,
    /// Resumes that found messages the client needed released (a snapshot replaced
    /// them: PROTOCOL.md section 4, "Retention"); in-process only, like
    /// `messages_replayed`.
    pub snapshot_resumes: u64,
    /// Connections the gateway closed with a reason, by reason (`SlowConsumer`, ...):
    /// closes the load client did not force. Each was followed by a resume.
    pub closed_by_gateway: BTreeMap<String, u64>,
    /// Promise violations found; any is a failure.
    pub violations: u64,
    /// The first violations, described.
    pub violation_samples: Vec<String>,
    /// What the verifier checked.
    pub checks: Checks,
    /// Order (and cancel) to answer, from the intended send time.
    pub ack_latency_us: Percentiles,
    /// The same as a percentile curve.
    pub ack_latency_curve: Vec<CurvePoint>,
    /// The same over the run, in slices of 250 ms by intended send time.
    pub timeline: Vec<TimelinePoint>,
    /// The forced disconnects, gateway kills (`gateway_kill`) and cluster faults
    /// (`gateway`, `zombie`, `nats`), in order.
    pub chaos_events: Vec<ChaosEvent>,
    /// Times the gateway process was killed (SIGKILL) and started again.
    pub gateway_restarts: u64,
    /// Cluster runs: the cluster, its faults and failovers.
    pub cluster: Option<cluster::ClusterReport>,
    /// From a kill to the restarted gateway being ready (its core rebuilt from its
    /// stream), microseconds.
    pub restart_ready_us: Percentiles,
    /// From a kill to each session's resume on the restarted gateway (includes the
    /// client noticing its connection is gone), microseconds.
    pub restart_resume_us: Percentiles,
    /// Answers per second over the run.
    pub throughput_orders_per_s: f64,
    /// The gateway process's CPU time per answered request (`--gateway-pid`).
    pub gateway_cpu_us_per_order: Option<f64>,
    /// Share of the cores this load client may use that it used while sending and
    /// waiting for the answers (1.0: saturated, so throughput and latency measure the
    /// client as much as the gateway). Includes an in-process gateway.
    pub load_client_cpu_share: Option<f64>,
    /// Its context switches per answered request, likewise.
    pub gateway_context_switches_per_order: Option<f64>,
    /// Median full login (connect, handshake, login, accepted).
    pub login_ms: f64,
    /// Login distribution, microseconds.
    pub login_us: Percentiles,
    /// Median resume after a clean or abrupt disconnect (disconnect to
    /// `ResumeAccepted`, which arrives in the same flight as the first replayed
    /// message).
    pub resume_ms: f64,
    /// Resume distribution, microseconds.
    pub resume_us: Percentiles,
    /// Median blackhole recovery (includes the client's idle-timeout detection).
    pub blackhole_recovery_ms: f64,
    /// The replay measurement, if run.
    pub replay: Option<ReplayReport>,
    /// The quiet login and resume cycles, if run (with the replay measurement).
    pub cycles: Option<CycleReport>,
    /// The flood comparison, if run.
    pub flood: Option<FloodReport>,
    /// The bare-QUIC baseline, if run.
    pub baseline: Option<BaselineReport>,
    /// Ratios to the baseline, if run.
    pub ratios: Option<Ratios>,
}

/// One offered rate of a sweep: the gateway and the bare echo, same run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    /// Offered rate, per second.
    pub rate: u64,
    /// Gateway order→answer latency, microseconds.
    pub gateway_us: Percentiles,
    /// Echo round trip, microseconds.
    pub echo_us: Percentiles,
    /// Answers per second.
    pub gateway_throughput_per_s: f64,
    /// Echoes per second.
    pub echo_throughput_per_s: f64,
    /// Gateway CPU per order, when measured in its own process.
    pub gateway_cpu_us_per_order: Option<f64>,
    /// Echo server CPU per message, likewise.
    pub echo_cpu_us_per_msg: Option<f64>,
    /// Violations the run found.
    pub violations: u64,
}

/// A sweep over offered rates, and where each side's tail gives way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepReport {
    /// Each rate, in the order run.
    pub points: Vec<SweepPoint>,
    /// The gateway's knee (see [`knee`]); `None` if it has none within the rates.
    pub gateway_knee: Option<u64>,
    /// The same for the echo.
    pub echo_knee: Option<u64>,
}

/// The knee of a rate sweep: the lowest rate from which on every p99 stays above
/// twice the low-load p99, the lower p99 of the two lowest rates. On a shared machine
/// one short run's p99 can land on a stall (here a few ms about once a second on a
/// core), so neither one noisy low-rate p99 sets the bar nor one spike in the middle
/// counts as the knee.
pub fn knee(points: &[(u64, f64)]) -> Option<u64> {
    let mut points = points.to_vec();
    points.sort_by_key(|(rate, _)| *rate);
    let base = points
        .iter()
        .take(2)
        .map(|(_, p99)| *p99)
        .reduce(f64::min)?;
    let sustained_from = points
        .iter()
        .rposition(|(_, p99)| *p99 <= 2.0 * base)
        .map_or(0, |last_below| last_below + 1);
    points.get(sustained_from).map(|(rate, _)| *rate)
}

#[cfg(test)]
mod sweep_tests {
    use super::knee;

    #[test]
    fn the_knee_is_where_the_p99_stays_past_twice_the_low_load_p99() {
        let points = [
            (5_000, 200.0),
            (10_000, 250.0),
            (20_000, 450.0),
            (40_000, 9_000.0),
        ];
        assert_eq!(knee(&points), Some(20_000));
        assert_eq!(knee(&points[..2]), None);
        assert_eq!(knee(&[]), None);
    }

    #[test]
    fn one_noisy_low_rate_or_one_spike_in_the_middle_does_not_move_the_knee() {
        let points = [
            (40_000, 300.0),
            (5_000, 700.0), // a stall in the lowest rate's run
            (10_000, 250.0),
            (20_000, 900.0), // a stall in the middle
            (80_000, 1_200.0),
            (160_000, 3_000.0),
        ];
        assert_eq!(knee(&points), Some(80_000));
    }
}
