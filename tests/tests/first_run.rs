//! The first run of a new user, as README.md tells it: the gateway binary on its
//! embedded defaults in a fresh directory, and the `hello` example against it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A gateway process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback UDP port nobody uses right now.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn the_hello_example_trades_against_a_fresh_development_gateway() {
    let dir = std::env::temp_dir().join(format!("gateway-first-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let mut child = Command::new(e2e::gateway_binary())
        .current_dir(&dir)
        .args(["--listen", &addr, "--set", "admin.listen=\"\""])
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let stderr = child.stderr.take().expect("stderr");
    let gateway = Running(child);

    // Ready once it says it listens (it generated its files before that).
    let started = Instant::now();
    let mut lines = BufReader::new(stderr).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|line| {
        assert!(started.elapsed() < Duration::from_secs(30), "slow start");
        line.contains("gateway listening")
    });
    assert!(ready, "the gateway exited before listening");
    std::thread::spawn(move || lines.for_each(drop));

    let output = Command::new(e2e::hello_example())
        .current_dir(&dir)
        .env("GATEWAY_ADDR", &addr)
        .output()
        .expect("the example runs");
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("filled: 10 at 100"), "{stdout}");
    assert!(stdout.contains("seller filled too"), "{stdout}");
}
