//! `loadtest --html`: the report page of a real (short) run with chaos and the
//! baseline.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_draws_both_charts_with_the_disconnects_and_needs_nothing_else() {
    let report = loadtest::run(loadtest::Options {
        sessions: 4,
        rate: 400,
        duration: Duration::from_millis(1_200),
        chaos_interval: Some(Duration::from_millis(150)),
        baseline: true,
        replay_messages: 0,
        ..loadtest::Options::default()
    })
    .await
    .expect("run completes");
    assert_eq!(report.violations, 0, "{:?}", report.violation_samples);
    assert!(!report.chaos_events.is_empty() && !report.timeline.is_empty());

    let page = loadtest::html::page(&report);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert_eq!(page.matches("<svg").count(), 2, "two charts");
    for text in [
        "gateway order → answer",
        "bare QUIC echo",
        &format!(
            "forced disconnects and faults: {} (darker: more at once)",
            report.chaos_events.len()
        ),
        "No violations",
        "orders sent",
    ] {
        assert!(page.contains(text), "{text} missing");
    }
    // Self-contained: nothing to fetch, nothing to run.
    for outside in ["<script", " src=", "<link", "@import"] {
        assert!(!page.contains(outside), "{outside} in the page");
    }
}
