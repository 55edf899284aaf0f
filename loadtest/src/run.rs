//! A run: start or target a gateway, log the sessions in, drive the load (with chaos,
//! kills or a flood if asked), verify everything, and report; the rate sweep; sessions
//! held open for other tests.

use super::*;

/// Runs a load test.
pub async fn run(options: Options) -> Result<Report, RunError> {
    let most = replay_limit();
    if options.remote.is_none() && options.replay_messages > most {
        return Err(RunError::Setup(format!(
            "replay measurement: {} messages is more than one measurement can make: at \
             most {most} (the taker's orders must fit its burst allowance, \
             session.max_messages_per_second, and the maker's fills its retention bound, \
             or the resume takes the snapshot path of PROTOCOL.md section 4)",
            options.replay_messages
        )));
    }
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
    let started_processes = options.crash_safe.is_some() || options.cluster.is_some();
    if started_processes && options.remote.is_some() {
        return Err(RunError::Setup(
            "the load tester starts the crash-safe gateways itself: name no other".into(),
        ));
    }
    let mut cluster = match &options.cluster {
        Some(settings) => Some(cluster::Cluster::start(settings, options.sessions).await?),
        None => None,
    };
    let mut crash_safe = match (&options.crash_safe, &options.remote) {
        (Some(_), Some(_)) => unreachable!("refused above"),
        (Some(settings), None) => {
            Some(crash::GatewayProcess::start(settings, options.sessions).await?)
        }
        (None, _) => None,
    };
    let remote = match (&crash_safe, &cluster) {
        (Some(process), _) => Some(process.remote()?),
        (None, Some(cluster)) => Some(cluster.remote()?),
        (None, None) => options.remote.clone(),
    };
    let target = match remote.clone() {
        Some(remote) => Target {
            addr: remote.addr,
            cert: remote.cert,
            keys: remote.keys,
            gateway: None,
            initial_rtt: options.initial_rtt,
        },
        None => start_gateway(&options)?,
    };
    if target.keys.len() < options.sessions {
        return Err(RunError::Setup(format!(
            "{} sessions need as many accounts; the gateway has keys for {}",
            options.sessions,
            target.keys.len()
        )));
    }

    // Log in sequentially so the login time is not a measure of contention.
    let mut login = histogram();
    let mut sessions = Vec::with_capacity(options.sessions);
    for (index, (account, credentials)) in target.keys.iter().take(options.sessions).enumerate() {
        let relay = if options.chaos_interval.is_some() || options.path.is_active() {
            Some(
                Relay::start_impaired(target.addr, options.path)
                    .await
                    .map_err(|e| RunError::Setup(e.to_string()))?,
            )
        } else {
            None
        };
        let addr = relay.as_ref().map_or(target.addr, |r| r.addr);
        let mut config = client_config(&target, credentials.clone(), addr);
        // Logging out at the end cancels what the session still has working, so the
        // next run against the same gateway starts from a clean book.
        config.cancel_on_disconnect = proto::CancelOnDisconnect::CancelAll;
        config.cod_grace = LOAD_SESSION_COD_GRACE;
        let started = Instant::now();
        let (client, mut events) = Client::connect(config).await?;
        record(&mut login, started.elapsed());
        let start = clean_start(&client, &mut events).await?;
        sessions.push((index, *account, Arc::new(client), events, relay, start));
    }
    let run_order_ids = run_order_ids(started_unix_ms);

    let mut verifier = Verifier::new(options.sessions);
    let mut leftover_orders_cancelled = 0;
    for (index, _, _, _, _, start) in &sessions {
        verifier.start_after(*index, start.last_server_seq);
        leftover_orders_cancelled += start.cancelled;
    }
    let shared: Shared = Arc::new(parking_lot::Mutex::new(Tally {
        started: Instant::now(),
        timeline: Vec::new(),
        chaos_events: Vec::new(),
        gateway_fault: None,
        failover: BTreeMap::new(),
        cuts_by_fault: BTreeMap::new(),
        verifier,
        books: (0..options.sessions)
            .map(|_| SessionBook::default())
            .collect(),
        ack_latency: histogram(),
        phase_latency: None,
        last_answer: None,
        answer_gaps: Vec::new(),
        resume: histogram(),
        blackhole: histogram(),
        restart_resume: histogram(),
        reconnecting: None,
        counts: Counts::default(),
        logging_out: false,
    }));
    let progress = progress_bar(&options);
    let gateway_counters = || {
        options
            .gateway_pid
            .and_then(|pid| process::ProcessCounters::read(pid).ok())
    };
    let gateway_before = gateway_counters();
    let client_before =
        process::ProcessCounters::read(std::process::id().try_into().unwrap_or(0)).ok();
    let started = Instant::now();
    lock(&shared).started = started;
    let deadline = started + options.duration;
    let midpoint = started + options.duration / 2;
    lock(&shared).phase_latency = options.flood.then(|| (midpoint, histogram(), histogram()));
    let flood = options.flood.then(|| {
        let config = flood_config(&target);
        tokio::spawn(async move {
            tokio::time::sleep_until(midpoint.into()).await;
            flood_logins(config, deadline).await
        })
    });
    let mut ticks = schedule(options.rate, options.sessions, started, deadline).into_iter();
    let mut senders = tokio::task::JoinSet::new();
    let mut receivers = tokio::task::JoinSet::new();
    let mut clients = Vec::new();
    let mut relays = Vec::new();
    for (index, account, client, events, relay, _) in sessions {
        let Some(ticks) = ticks.next() else { break };
        let rng = StdRng::seed_from_u64(
            options
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(index as u64),
        );
        let answered = Arc::new(Notify::new());
        senders.spawn(send_orders(
            index,
            Arc::clone(&client),
            Arc::clone(&shared),
            ticks,
            SendLimits {
                deadline,
                window: options.window,
                first_order_id: run_order_ids,
                answered: Arc::clone(&answered),
            },
            rng,
        ));
        receivers.spawn(receive_events(index, events, Arc::clone(&shared), answered));
        clients.push((account, client));
        relays.push(relay);
    }
    // The relays live until the end of the run: clients recovering from the last
    // chaos events reconnect through them after the chaos loop has stopped.
    let relays = Arc::new(relays);
    let chaos = options.chaos_interval.map(|interval| {
        let clients: Vec<Arc<Client>> = clients.iter().map(|(_, c)| Arc::clone(c)).collect();
        let relays = Arc::clone(&relays);
        let shared = Arc::clone(&shared);
        let seed = options.seed;
        tokio::spawn(
            async move { chaos_loop(clients, relays, shared, interval, deadline, seed).await },
        )
    });
    let faults = match (cluster.take(), &options.cluster) {
        (Some(running), Some(settings)) => Some(tokio::spawn(running.inflict(
            settings.faults.clone(),
            settings.fault_interval,
            deadline,
            Arc::clone(&shared),
        ))),
        _ => None,
    };
    let kill_interval = options.crash_safe.as_ref().and_then(|c| c.kill_interval);
    let killer = match (crash_safe.take(), kill_interval) {
        (Some(process), Some(interval)) => Some(tokio::spawn(kill_loop(
            process,
            interval,
            deadline,
            Arc::clone(&shared),
        ))),
        (process, _) => {
            crash_safe = process;
            None
        }
    };
    let ticker = progress.clone().map(|bar| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let tally = lock(&shared);
                bar.set_position(started.elapsed().as_secs().min(bar.length().unwrap_or(0)));
                let reconnecting = match &tally.reconnecting {
                    Some((session, attempt, attempts, error)) => format!(
                        "; session {session} reconnecting, attempt {attempt} of {attempts} failed: {error}"
                    ),
                    None => String::new(),
                };
                bar.set_message(format!(
                    "sent {} acks {} fills {} resumes {} violations {}{reconnecting}",
                    tally.counts.orders_sent + tally.counts.cancels_sent,
                    tally.counts.acks,
                    tally.counts.fills,
                    tally.counts.resumes,
                    tally.verifier.violations()
                ));
            }
        })
    });

    while senders.join_next().await.is_some() {}
    let send_elapsed = started.elapsed();
    let flood_counts = match flood {
        Some(flood) => flood.await.ok(),
        None => None,
    };
    if let Some(chaos) = chaos {
        let _ = chaos.await;
    }
    let mut restart_ready = histogram();
    if let Some(killer) = killer {
        let (process, ready) = killer
            .await
            .map_err(|e| RunError::Setup(format!("the gateway killer failed: {e}")))??;
        for after in ready {
            record(&mut restart_ready, after);
        }
        crash_safe = Some(process);
    }
    if let Some(faults) = faults {
        cluster = Some(
            faults
                .await
                .map_err(|e| RunError::Setup(format!("the cluster's faults failed: {e}")))??,
        );
    }
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }
    status(
        &progress,
        "sending done; waiting for the last answers and resumes",
    );
    // Wait for every answer (and the clients' resumes after the last chaos events).
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let waiting = {
                let tally = lock(&shared);
                (0..options.sessions)
                    .map(|i| tally.verifier.unanswered(i))
                    .sum::<usize>()
                    + tally
                        .books
                        .iter()
                        .filter(|b| b.chaos.is_some() || b.gateway_killed.is_some())
                        .count()
            };
            if waiting == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let gateway_after = gateway_counters();
    let client_after =
        process::ProcessCounters::read(std::process::id().try_into().unwrap_or(0)).ok();
    let measured_for = started.elapsed();
    // Let fills triggered by the last orders reach their resting sides.
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock(&shared).verifier.finish();

    if options.flood {
        // The flood's address is this one: wait for its failure window to pass.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    status(&progress, "comparing final order states with the engine's");
    // The engine's view of every account, from a fresh login's snapshot.
    for (index, (account, _)) in clients.iter().enumerate() {
        let credentials = target
            .keys
            .iter()
            .find(|(a, _)| a == account)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| RunError::Setup("account vanished".into()))?;
        let (observer, mut events) =
            Client::connect(client_config(&target, credentials, target.addr)).await?;
        if let Ok(Some(Event::Snapshot { orders, .. })) =
            tokio::time::timeout(Duration::from_secs(5), events.recv()).await
        {
            lock(&shared).verifier.compare_final(index, &orders);
        }
        log_out(&observer, &mut events).await;
    }
    status(&progress, "logging the sessions out");
    // Log the load sessions out: cancel-on-disconnect cancels what they have working,
    // and no session is left waiting for a resume.
    lock(&shared).logging_out = true;
    for (_, client) in &clients {
        let _ = client.logout();
    }
    let logged_out = tokio::time::timeout(Duration::from_secs(10), async {
        while receivers.join_next().await.is_some() {}
    })
    .await;
    if logged_out.is_err() {
        lock(&shared)
            .verifier
            .violation("sessions still live 10 s after logging out".into());
    }
    drop(clients);
    drop(relays);
    receivers.abort_all();
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }

    let measuring = target.gateway.is_some() && options.replay_messages > 0;
    if crash_safe.is_some() && options.replay_messages > 0 && options.progress {
        eprintln!(
            "measuring the replay of {} missed messages after a gateway restart",
            options.replay_messages
        );
    }
    if measuring && options.progress {
        eprintln!(
            "measuring the replay of {} missed messages, then 50 quiet login/resume cycles",
            options.replay_messages
        );
    }

    let (replay, cycles) = match (
        &target.gateway,
        crash_safe.as_mut(),
        options.replay_messages,
    ) {
        (Some(_), _, messages) if messages > 0 => (
            Some(measure_replay(&target, messages, None).await?),
            Some(measure_cycles(&target, RESUME_CYCLES).await?),
        ),
        // The maker misses the fills, then the gateway is killed and started again
        // before the maker resumes.
        (None, Some(process), messages) if messages > 0 => (
            Some(measure_replay(&target, messages, Some(process)).await?),
            None,
        ),
        _ => (None, None),
    };
    let failed = lock(&shared).verifier.violations() > 0 || drained.is_err();
    if let Some(process) = crash_safe {
        process.stop(failed).await;
    }
    let cluster_report = match cluster {
        Some(cluster) => {
            let (failover, cuts, stalls) = {
                let tally = lock(&shared);
                let timeline: Vec<(f64, f64)> = tally
                    .timeline
                    .iter()
                    .enumerate()
                    .filter(|(_, slice)| !slice.is_empty())
                    .map(|(index, slice)| {
                        (
                            index as f64 * TIMELINE_SLICE.as_secs_f64(),
                            slice.value_at_quantile(0.99) as f64,
                        )
                    })
                    .collect();
                let slices = (&timeline[..], TIMELINE_SLICE.as_secs_f64());
                let events = &tally.chaos_events;
                let by_kind = cluster::stalls(slices, &tally.answer_gaps, events);
                let each = cluster::each_stall(slices, &tally.answer_gaps, events);
                let of = |fault: cluster::Fault| -> Vec<cluster::Stall> {
                    each.iter()
                        .zip(events)
                        .filter(|(_, event)| event.mode == fault.name())
                        .map(|(stall, _)| *stall)
                        .collect()
                };
                let stalls = (
                    by_kind,
                    of(cluster::Fault::Nats),
                    of(cluster::Fault::Engine),
                );
                (tally.failover.clone(), tally.cuts_by_fault.clone(), stalls)
            };
            let report = cluster.report(&failover, &cuts, stalls).await;
            if report.engine_answers_differed > 0 {
                lock(&shared).verifier.violation(format!(
                    "{} engine answers differed from the first answer to their batch",
                    report.engine_answers_differed
                ));
            }
            if report.engines_left_stopped > 0 {
                lock(&shared).verifier.violation(format!(
                    "{} engines were left stopped at the end",
                    report.engines_left_stopped
                ));
            }
            if report.gateways_left_stopped > 0 {
                lock(&shared).verifier.violation(format!(
                    "{} gateways were left stopped at the end",
                    report.gateways_left_stopped
                ));
            }
            cluster.stop(failed).await;
            Some(report)
        }
        None => None,
    };
    let (messages_replayed, snapshot_resumes) = target.gateway.as_ref().map_or((0, 0), |g| {
        let stats = g.registry().stats();
        (stats.messages_replayed, stats.snapshot_resumes)
    });
    if let Some(gateway) = target.gateway {
        gateway.shutdown().await;
    }

    let flood_report = flood_counts.and_then(|counts| {
        let tally = lock(&shared);
        let (_, quiet, flooded) = tally.phase_latency.as_ref()?;
        let (quiet_us, flood_us) = (Percentiles::of(quiet), Percentiles::of(flooded));
        Some(FloodReport {
            attempts: counts.attempts,
            refused_before_handshake: counts.refused,
            rate_limited: counts.rate_limited,
            bad_signature: counts.bad_signature,
            quiet_us,
            flood_us,
            p99_ratio: flood_us.p99 / quiet_us.p99.max(1.0),
        })
    });
    let mut report = {
        let tally = lock(&shared);
        let answers = tally.verifier.checks().answers;
        let gateway_cost = gateway_before
            .zip(gateway_after)
            .map(|(before, after)| after.per_unit_since(&before, answers));
        Report {
            version: env!("CARGO_PKG_VERSION"),
            started_unix_ms,
            target: match (&remote, &options.crash_safe) {
                (Some(remote), _) if cluster_report.is_some() => format!(
                    "cluster of crash-safe gateway processes behind a balancer at {}",
                    remote.addr
                ),
                (Some(remote), Some(_)) => format!("crash-safe gateway process at {}", remote.addr),
                (Some(remote), None) => remote.addr.to_string(),
                (None, _) => "in-process".to_string(),
            },
            sessions: options.sessions,
            window: options.window,
            seed: options.seed,
            chaos_interval_ms: options
                .chaos_interval
                .map_or(0, |i| u64::try_from(i.as_millis()).unwrap_or(u64::MAX)),
            leftover_orders_cancelled,
            rate: options.rate,
            duration_s: send_elapsed.as_secs_f64(),
            orders_sent: tally.counts.orders_sent,
            cancels_sent: tally.counts.cancels_sent,
            acks: tally.counts.acks,
            rejects: tally.counts.rejects,
            rejects_by_reason: tally.counts.rejects_by_reason.clone(),
            fills: tally.counts.fills,
            cancelled: tally.counts.cancelled,
            disconnects: tally.counts.disconnects.clean
                + tally.counts.disconnects.abrupt
                + tally.counts.disconnects.blackhole,
            disconnects_by_mode: tally.counts.disconnects.clone(),
            resumes: tally.counts.resumes,
            messages_replayed,
            snapshot_resumes,
            closed_by_gateway: tally.counts.closed_by_gateway.clone(),
            violations: tally.verifier.violations() + u64::from(drained.is_err()),
            violation_samples: tally.verifier.samples().to_vec(),
            checks: tally.verifier.checks().clone(),
            ack_latency_us: Percentiles::of(&tally.ack_latency),
            ack_latency_curve: curve(&tally.ack_latency),
            gateway_cpu_us_per_order: gateway_cost.map(|c| c.cpu_us),
            load_client_cpu_share: client_before.zip(client_after).map(|(before, after)| {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                #[allow(clippy::cast_precision_loss)]
                let used = after.cpu_us.saturating_sub(before.cpu_us) as f64;
                #[allow(clippy::cast_precision_loss)]
                let share = used / (measured_for.as_micros().max(1) as f64 * cores as f64);
                share
            }),
            gateway_context_switches_per_order: gateway_cost.map(|c| c.context_switches),
            timeline: tally
                .timeline
                .iter()
                .enumerate()
                .filter(|(_, slice)| !slice.is_empty())
                .map(|(index, slice)| TimelinePoint {
                    t_s: index as f64 * TIMELINE_SLICE.as_secs_f64(),
                    count: slice.len(),
                    p50_us: slice.value_at_quantile(0.5) as f64,
                    p99_us: slice.value_at_quantile(0.99) as f64,
                })
                .collect(),
            chaos_events: tally.chaos_events.clone(),
            gateway_restarts: restart_ready.len(),
            cluster: cluster_report,
            restart_ready_us: Percentiles::of(&restart_ready),
            restart_resume_us: Percentiles::of(&tally.restart_resume),
            throughput_orders_per_s: answers as f64
                / tally
                    .last_answer
                    .map_or(send_elapsed, |at| at.saturating_duration_since(started))
                    .as_secs_f64()
                    .max(1e-3),
            login_ms: login.value_at_quantile(0.5) as f64 / 1_000.0,
            login_us: Percentiles::of(&login),
            resume_ms: tally.resume.value_at_quantile(0.5) as f64 / 1_000.0,
            resume_us: Percentiles::of(&tally.resume),
            blackhole_recovery_ms: tally.blackhole.value_at_quantile(0.5) as f64 / 1_000.0,
            replay,
            cycles,
            flood: flood_report,
            baseline: None,
            ratios: None,
        }
    };
    if drained.is_err() {
        report
            .violation_samples
            .push("requests still unanswered 30 s after the run".into());
    }

    if options.baseline {
        if options.progress {
            eprintln!("running the bare-QUIC echo baseline with the same settings");
        }
        let baseline = baseline::run(BaselineOptions {
            connections: options.sessions,
            rate: options.rate,
            window: options.window,
            duration: options.duration,
            payload: proto::HEADER_LEN + proto::NewOrder::BODY_LEN,
            handshakes: 50,
            separate_process: options.gateway_pid.map(|_| options.server_core),
        })
        .await?;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        // The quiet cycles when run (login and resume measured alike), else the
        // chaos resumes against the sessions' logins.
        let (login_ms, resume_ms) = match &report.cycles {
            Some(cycles) => (cycles.login_us.p50 / 1e3, cycles.resume_us.p50 / 1e3),
            None => (report.login_ms, report.resume_ms),
        };
        let latency =
            |gateway: f64, echo: f64| report.chaos_events.is_empty().then(|| ratio(gateway, echo));
        report.ratios = Some(Ratios {
            ack_p50: latency(report.ack_latency_us.p50, baseline.echo_rtt_us.p50),
            ack_p90: latency(report.ack_latency_us.p90, baseline.echo_rtt_us.p90),
            ack_p99: latency(report.ack_latency_us.p99, baseline.echo_rtt_us.p99),
            throughput: ratio(
                report.throughput_orders_per_s,
                baseline.echo_throughput_per_s,
            ),
            resume_vs_handshake_plus_rtt: ratio(
                resume_ms,
                baseline.handshake_ms + baseline.echo_rtt_us.p50 / 1_000.0,
            ),
            login_vs_resume: ratio(login_ms, resume_ms),
            cpu_per_order_vs_echo_msg: report
                .gateway_cpu_us_per_order
                .zip(baseline.echo_server_cpu_us_per_msg)
                .map(|(gateway, echo)| ratio(gateway, echo)),
        });
        report.baseline = Some(baseline);
    }
    Ok(report)
}

/// Shows what the run is doing on the progress bar's message line.
pub(crate) fn status(progress: &Option<indicatif::ProgressBar>, what: &'static str) {
    if let Some(bar) = progress {
        bar.set_message(what);
    }
}

pub(crate) fn progress_bar(options: &Options) -> Option<indicatif::ProgressBar> {
    options.progress.then(|| {
        let bar = indicatif::ProgressBar::new(options.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// Logs in `sessions` sessions (round robin over the accounts), holds them attached
/// for `hold`, then drops every connection so they are detached and waits `hold`
/// again: the gateway's memory can be read in each phase. Prints the phases.
///
/// With `detach_at_once`, each connection is closed right after its login, so only
/// detached sessions accumulate (freed connection memory stays in the gateway's
/// allocator, so detaching after holding all attached does not show in its RSS).
pub async fn hold_sessions(
    remote: RemoteGateway,
    sessions: usize,
    hold: Duration,
    detach_at_once: bool,
) -> Result<(), RunError> {
    let target = Target {
        addr: remote.addr,
        cert: remote.cert,
        keys: remote.keys,
        gateway: None,
        initial_rtt: None,
    };
    let first = target
        .keys
        .first()
        .ok_or_else(|| RunError::Setup("no accounts".into()))?;
    let mut config = client_config(&target, first.1.clone(), target.addr);
    config.idle_timeout = Duration::from_secs(60);
    config.keep_alive = Duration::from_secs(20);
    let endpoints = shared_endpoints(&config, sessions)?;
    let started = Instant::now();
    let mut links = Vec::with_capacity(sessions);
    let mut logins = tokio::task::JoinSet::new();
    for index in 0..sessions {
        let mut config = config.clone();
        config.credentials = target.keys[index % target.keys.len()].1.clone();
        let endpoint = endpoints[index % endpoints.len()].clone();
        logins.spawn(async move {
            let mut link = gateway_client::open_on(endpoint, &config).await?;
            let login = config.credentials.signed_login(
                &config.venue,
                proto::CancelOnDisconnect::Off,
                Duration::ZERO,
            )?;
            send_frame(&mut link, login.into()).await?;
            let mut buf = bytes::BytesMut::new();
            match read_until(&mut link, &mut buf, |f| matches!(f, Frame::SnapshotEnd(_))).await {
                Some(_) if detach_at_once => {
                    link.connection.close(0u32.into(), b"");
                    Ok(None)
                }
                Some(_) => Ok(Some(link)),
                None => Err(RunError::Setup("login not answered".into())),
            }
        });
        // At most 64 logins in flight.
        while logins.len() >= 64 {
            if let Some(done) = logins.join_next().await {
                links.extend(done.map_err(|e| RunError::Setup(e.to_string()))??);
            }
        }
    }
    while let Some(done) = logins.join_next().await {
        links.extend(done.map_err(|e| RunError::Setup(e.to_string()))??);
    }
    println!(
        "attached: {sessions} sessions logged in in {:.1} s ({} still attached); holding {hold:?}",
        started.elapsed().as_secs_f64(),
        links.len()
    );
    tokio::time::sleep(hold).await;
    for link in &links {
        link.connection.close(0u32.into(), b"");
    }
    drop(links);
    println!("detached: connections closed; holding {hold:?}");
    tokio::time::sleep(hold).await;
    println!("done");
    Ok(())
}

/// Runs the gateway and the bare echo at each of `rates` (with `options`' other
/// settings and the baseline on), lowest first.
pub async fn sweep(options: Options, rates: &[u64]) -> Result<SweepReport, RunError> {
    let mut rates = rates.to_vec();
    rates.sort_unstable();
    let mut points = Vec::with_capacity(rates.len());
    for rate in rates {
        let report = run(Options {
            rate,
            baseline: true,
            replay_messages: 0,
            ..options.clone()
        })
        .await?;
        let baseline = report
            .baseline
            .as_ref()
            .ok_or_else(|| RunError::Setup("the sweep needs the baseline".into()))?;
        points.push(SweepPoint {
            rate,
            gateway_us: report.ack_latency_us,
            echo_us: baseline.echo_rtt_us,
            gateway_throughput_per_s: report.throughput_orders_per_s,
            echo_throughput_per_s: baseline.echo_throughput_per_s,
            gateway_cpu_us_per_order: report.gateway_cpu_us_per_order,
            echo_cpu_us_per_msg: baseline.echo_server_cpu_us_per_msg,
            violations: report.violations,
        });
    }
    let series = |pick: fn(&SweepPoint) -> f64| -> Vec<(u64, f64)> {
        points.iter().map(|p| (p.rate, pick(p))).collect()
    };
    Ok(SweepReport {
        gateway_knee: knee(&series(|p| p.gateway_us.p99)),
        echo_knee: knee(&series(|p| p.echo_us.p99)),
        points,
    })
}
