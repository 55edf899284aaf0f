//! `loadtest --html PATH`: the run as one self-contained page. Two charts drawn with
//! `plotters` into inline SVG (the latency percentile curve, gateway against the bare
//! QUIC echo when measured; latency over the run with the forced disconnects and
//! faults as a density strip along its foot) and the counters, with no script and no
//! external file.

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::{ChaosEvent, CurvePoint, Report, TimelinePoint};

/// Time bins of the timeline's disconnect strip.
const STRIP_BINS: u32 = 150;

/// Chart size in pixels.
const WIDTH: u32 = 900;
const HEIGHT: u32 = 420;

/// The gateway's colour, the echo's, and the timeline's p99.
const GATEWAY: RGBColor = RGBColor(31, 119, 180);
const ECHO: RGBColor = RGBColor(255, 127, 14);
const TAIL: RGBColor = RGBColor(148, 103, 189);

/// An axis value in microseconds, in the unit that reads best.
fn micros(us: &f64) -> String {
    let us = *us;
    if us >= 1e6 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.0} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}

/// The report page.
pub fn page(report: &Report) -> String {
    let echo = report
        .baseline
        .as_ref()
        .map_or(&[][..], |b| &b.echo_rtt_curve[..]);
    let curve = percentile_chart(&report.ack_latency_curve, echo)
        .unwrap_or_else(|error| format!("<p>chart failed: {}</p>", escape(&error)));
    let timeline = timeline_chart(&report.timeline, &report.chaos_events)
        .unwrap_or_else(|error| format!("<p>chart failed: {}</p>", escape(&error)));
    let chaos_note = if report.chaos_events.is_empty() {
        String::new()
    } else {
        let by_kind = chaos_by_kind(&report.chaos_events)
            .iter()
            .map(|(kind, count)| format!("{count} {kind}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "<p class=note>The run broke connections on purpose ({by_kind}). A request \
             caught in one waits for its resume, so the latencies include the outages: a \
             blackholed connection is noticed only when the client's idle timeout \
             expires, which sets the tail. The bare QUIC echo had no disconnects: its \
             curve is there for scale, not as a comparison, and no latency ratio is \
             given.</p>"
        )
    };
    let rows = counters(report)
        .into_iter()
        .map(|(name, value)| {
            format!(
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(&name),
                escape(&value)
            )
        })
        .collect::<String>();
    let samples = report
        .violation_samples
        .iter()
        .map(|sample| format!("<li>{}</li>", escape(sample)))
        .collect::<String>();
    let verdict = if report.violations == 0 {
        "<p class=ok>No violations: every request answered once, every server sequence delivered once, both sides of every trade seen.</p>".to_string()
    } else {
        format!(
            "<p class=bad>{} violations</p><ul>{samples}</ul>",
            report.violations
        )
    };
    format!(
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>\
         <title>loadtest: {sessions} sessions against {target}</title>\
         <style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}\
         th{{text-align:left;padding-right:2em;font-weight:normal;color:#555}}\
         .ok{{color:#2a7}}.bad{{color:#c22;font-weight:bold}}.note{{color:#555}}</style></head><body>\
         <h1>loadtest: {sessions} sessions against {target}</h1>{verdict}{chaos_note}\
         <h2>Order → answer latency, percentiles</h2>{curve}\
         <h2>Latency over the run</h2>{timeline}\
         <h2>Counters</h2><table>{rows}</table></body></html>\n",
        sessions = report.sessions,
        target = escape(&report.target),
    )
}

/// The rows of the counters table.
fn counters(report: &Report) -> Vec<(String, String)> {
    let l = &report.ack_latency_us;
    let mut rows = vec![
        ("version".into(), report.version.to_string()),
        (
            "started (Unix ms)".into(),
            report.started_unix_ms.to_string(),
        ),
        (
            "offered rate".into(),
            if report.rate == 0 {
                format!("window of {} per session", report.window)
            } else {
                format!("{}/s", report.rate)
            },
        ),
        ("duration".into(), format!("{:.1} s", report.duration_s)),
        ("seed".into(), report.seed.to_string()),
        (
            "answered".into(),
            format!("{:.0}/s", report.throughput_orders_per_s),
        ),
        (
            "latency p50 / p99 / p99.9 / max (µs)".into(),
            format!("{:.0} / {:.0} / {:.0} / {:.0}", l.p50, l.p99, l.p999, l.max),
        ),
        ("orders sent".into(), report.orders_sent.to_string()),
        ("cancels sent".into(), report.cancels_sent.to_string()),
        ("acks".into(), report.acks.to_string()),
        ("fills".into(), report.fills.to_string()),
        ("cancelled".into(), report.cancelled.to_string()),
        ("rejects".into(), report.rejects.to_string()),
    ];
    rows.extend(
        report
            .rejects_by_reason
            .iter()
            .map(|(reason, count)| (format!("rejects: {reason}"), count.to_string())),
    );
    rows.extend([("forced disconnects".into(), report.disconnects.to_string())]);
    rows.extend(
        chaos_by_kind(&report.chaos_events)
            .into_iter()
            .map(|(kind, count)| (format!("disconnects and faults: {kind}"), count.to_string())),
    );
    if report.resumes > 0 {
        rows.push((
            "resume after a clean or abrupt drop p50 / p99 (ms)".into(),
            format!(
                "{:.2} / {:.2}",
                report.resume_us.p50 / 1e3,
                report.resume_us.p99 / 1e3
            ),
        ));
    }
    if report.disconnects_by_mode.blackhole > 0 {
        rows.push((
            "blackhole recovery p50 (ms; includes the idle timeout)".into(),
            format!("{:.0}", report.blackhole_recovery_ms),
        ));
    }
    if report.gateway_restarts > 0 {
        rows.push((
            "gateway kill → session resumed p50 / p99 (ms)".into(),
            format!(
                "{:.0} / {:.0}",
                report.restart_resume_us.p50 / 1e3,
                report.restart_resume_us.p99 / 1e3
            ),
        ));
    }
    if let Some(replay) = &report.replay {
        rows.push((
            format!(
                "replay of {} missed messages: first / last (ms)",
                replay.messages
            ),
            format!("{:.1} / {:.1}", replay.first_message_ms, replay.complete_ms),
        ));
    }
    rows.extend([
        ("resumes".into(), report.resumes.to_string()),
        (
            "messages replayed".into(),
            report.messages_replayed.to_string(),
        ),
        (
            "snapshot resumes".into(),
            report.snapshot_resumes.to_string(),
        ),
        (
            "checked: answers / server sequences / trades / final states".into(),
            format!(
                "{} / {} / {} / {}",
                report.checks.answers,
                report.checks.server_seqs,
                report.checks.trades,
                report.checks.final_states
            ),
        ),
        ("violations".into(), report.violations.to_string()),
    ]);
    if let Some(baseline) = &report.baseline {
        rows.push((
            "bare QUIC echo p50 / p99 (µs)".into(),
            format!(
                "{:.0} / {:.0}",
                baseline.echo_rtt_us.p50, baseline.echo_rtt_us.p99
            ),
        ));
    }
    rows
}

/// The disconnects and faults by kind, in a fixed order of first appearance.
fn chaos_by_kind(chaos: &[ChaosEvent]) -> Vec<(&'static str, usize)> {
    let mut kinds: Vec<(&'static str, usize)> = Vec::new();
    for event in chaos {
        match kinds.iter_mut().find(|(kind, _)| *kind == event.mode) {
            Some((_, count)) => *count += 1,
            None => kinds.push((event.mode, 1)),
        }
    }
    kinds
}

/// Where a quantile sits on the chart's x axis: the number of nines, so the tail
/// gets room (0.9 → 1, 0.99 → 2, ...).
fn nines(quantile: f64) -> f64 {
    -(1.0 - quantile).max(1e-5).log10()
}

/// The percentile curves as SVG.
fn percentile_chart(gateway: &[CurvePoint], echo: &[CurvePoint]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let top = gateway.iter().chain(echo).map(|p| p.us).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_right(36)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..5.0, (1.0..top * 1.5).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency")
            .x_labels(6)
            .x_label_formatter(&|x: &f64| {
                let percent = format!("{:.4}", 100.0 * (1.0 - 10f64.powf(-x)));
                format!("{}%", percent.trim_end_matches('0').trim_end_matches('.'))
            })
            .y_label_formatter(&micros)
            .draw()
            .map_err(|e| e.to_string())?;
        for (points, colour, label) in [
            (gateway, GATEWAY, "gateway order → answer"),
            (echo, ECHO, "bare QUIC echo"),
        ] {
            if points.is_empty() {
                continue;
            }
            let line = points.iter().map(|p| (nines(p.quantile), p.us.max(1.0)));
            draw_line(&mut chart, line, colour, label)?;
        }
        draw_legend(&mut chart)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Latency over the run (p50 and p99 per slice) with the forced disconnects as
/// vertical marks, as SVG.
fn timeline_chart(timeline: &[TimelinePoint], chaos: &[ChaosEvent]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let end = timeline
            .iter()
            .map(|p| p.t_s + 0.25)
            .chain(chaos.iter().map(|c| c.t_s))
            .fold(1.0, f64::max);
        let top = timeline.iter().map(|p| p.p99_us).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_right(36)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..end, (1.0..top * 1.5).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds into the run (by intended send time)")
            .y_desc("latency")
            .y_label_formatter(&micros)
            .draw()
            .map_err(|e| e.to_string())?;
        if !chaos.is_empty() {
            // A strip along the foot, darker where more disconnects and faults fell:
            // one mark per event would be a wall at a short interval.
            let bin = end / f64::from(STRIP_BINS);
            let mut counts = vec![0usize; STRIP_BINS as usize];
            for event in chaos {
                let at = (0..STRIP_BINS)
                    .find(|k| f64::from(k + 1) * bin > event.t_s)
                    .unwrap_or(STRIP_BINS - 1);
                counts[usize::try_from(at).unwrap_or(0)] += 1;
            }
            let most = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
            let strip_top = (top * 1.5).powf(0.06);
            chart
                .draw_series(
                    counts
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| **n > 0)
                        .map(|(nth, n)| {
                            let from = nth as f64 * bin;
                            let shade = RGBColor(200, 40, 40).mix(0.15 + 0.85 * (*n as f64 / most));
                            Rectangle::new([(from, 1.0), (from + bin, strip_top)], shade.filled())
                        }),
                )
                .map_err(|e| e.to_string())?
                .label(format!(
                    "forced disconnects and faults: {} (darker: more at once)",
                    chaos.len()
                ))
                .legend(|(x, y)| {
                    Rectangle::new(
                        [(x, y - 5), (x + 20, y + 5)],
                        RGBColor(200, 40, 40).filled(),
                    )
                });
        }
        for (pick, colour, label) in [
            (
                (|p: &TimelinePoint| p.p50_us) as fn(&TimelinePoint) -> f64,
                GATEWAY,
                "p50",
            ),
            (|p: &TimelinePoint| p.p99_us, TAIL, "p99"),
        ] {
            let line = timeline.iter().map(|p| (p.t_s, pick(p).max(1.0)));
            draw_line(&mut chart, line, colour, label)?;
        }
        draw_legend(&mut chart)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Both charts: linear x, logarithmic latency y.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

/// One labelled line.
fn draw_line(
    chart: &mut Chart<'_, '_>,
    points: impl Iterator<Item = (f64, f64)>,
    colour: RGBColor,
    label: &str,
) -> Result<(), String> {
    chart
        .draw_series(LineSeries::new(points, colour.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    Ok(())
}

/// The legend box, top right.
fn draw_legend<'a>(chart: &mut Chart<'a, 'a>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Text safe inside HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
