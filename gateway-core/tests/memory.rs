//! What an idle detached session costs: measured on the heap, through the registry,
//! so the map entry, the shared lock and the session are all counted.

use std::time::Duration;

use gateway_core::registry::{Registry, RegistryLimits};
use gateway_core::session::{CodPolicy, SessionConfig};
use gateway_core::time::Timestamp;
use gateway_core::token::TokenKeyRing;
use proto::CancelOnDisconnect;

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

const SESSIONS: usize = 10_000;

#[test]
fn an_idle_detached_session_costs_well_under_a_kilobyte() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let registry = Registry::new(
        TokenKeyRing::new(1, &[3u8; 32]).expect("key"),
        SessionConfig::default(),
        RegistryLimits {
            max_sessions: 200_000,
            max_sessions_per_account: 200_000,
            ..RegistryLimits::default()
        },
    );
    let now = Timestamp::from_millis(1_700_000_000_000);
    let cod = CodPolicy {
        mode: CancelOnDisconnect::CancelAll,
        grace: Duration::from_secs(5),
    };
    // Map growth is included, amortized over the sessions, as it is in production.
    let before = dhat::HeapStats::get().curr_bytes;
    for conn in 0..SESSIONS as u64 {
        let new = registry
            .login(
                conn % 1_000,
                None,
                cod,
                conn,
                &[],
                Duration::from_secs(10),
                (now, &[7; 16]),
                &mut Vec::new(),
            )
            .expect("login");
        registry.connection_lost(&new.session, conn, now);
    }
    let after = dhat::HeapStats::get().curr_bytes;
    let per_session = (after - before) / SESSIONS;
    println!(
        "idle detached session: {per_session} heap bytes (Session struct {} bytes); 100,000 sessions ≈ {} MiB",
        std::mem::size_of::<gateway_core::session::Session>(),
        (per_session * 100_000) >> 20
    );
    assert_eq!(registry.len(), SESSIONS);
    assert!(
        per_session < 1_024,
        "{per_session} bytes per detached session"
    );
}
