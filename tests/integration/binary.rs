//! The real binary: flags, signals, exit codes, and its memory under a slow client.

use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::Duration;

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::support::*;

#[test]
fn a_bad_flag_exits_2_with_one_line_naming_it() {
    for (args, flag) in [
        (&["--bogus"][..], "--bogus"),
        (&["--rate", "many"][..], "--rate"),
        (&["--max-message-bytes"][..], "--max-message-bytes"),
    ] {
        let output = Command::new(BINARY).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(flag), "{stderr}");
    }
}

/// Without the `redis` feature, `--redis` is refused with a message that says how to get it,
/// and the backplane tests (tests/integration/backplane.rs) are not built: say so.
#[cfg(not(feature = "redis"))]
#[test]
fn without_the_redis_feature_the_redis_flag_is_refused_clearly() {
    eprintln!("the Redis backplane tests need `--features redis` (scripts/test.sh runs them)");
    let output = Command::new(BINARY)
        .args(["--redis", "redis://127.0.0.1:6379/0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--redis") && stderr.contains("--features redis"),
        "{stderr}"
    );
}

#[test]
fn start_up_logs_capacity_limits_and_whether_publishing_is_on() {
    let mut off = Process::start(&[]);
    assert!(off.wait_for_line("capacity: ").contains("bound by"));
    off.wait_for_line("limits: max clients");
    off.wait_for_line("backend API off");
    let mut on = Process::start(&["--api-token", "t0ken-of-16-bytes"]);
    on.wait_for_line("backend API on");
}

#[test]
fn help_lists_every_flag_and_exits_0() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("--max-clients-per-ip") && help.contains("default"));
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0_within_the_grace_period() {
    // The client answers its close at once, so the exit comes long before the 30 s grace.
    let mut process = Process::start(&["--shutdown-grace", "30s"]);
    let mut client = process.connect("tv");
    client.send(Message::text("before")).unwrap();
    assert_eq!(next_text(&mut client), "before");
    process.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut client), CloseCode::Away);
    let _ = client.close(None);
    let (code, took) = process.wait_exit(Duration::from_secs(40));
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(15), "exit took {took:?}");
    assert!(process
        .wait_for_line("shut down:")
        .contains("1 clients served"));
}

#[test]
fn a_second_signal_exits_at_once() {
    // A client that never answers its close would hold shutdown for the whole 60 s grace.
    let mut process = Process::start(&["--shutdown-grace", "60s"]);
    let _mute = process.connect("tv").into_inner();
    process.signal(libc::SIGINT);
    process.wait_for_line("shutting down");
    process.signal(libc::SIGINT);
    let (code, took) = process.wait_exit(Duration::from_secs(40));
    assert_ne!(code, Some(0));
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// Frames are shared between outboxes, so stalled clients pin at most one outbox bound of
/// frames between them; without eviction, RSS would grow with everything published.
#[test]
fn stalled_clients_cannot_grow_the_servers_memory_past_the_outbox_bound() {
    const OUTBOX: u64 = 1024 * 1024;
    let process = Process::start(&[
        "--rate",
        "0",
        "--outbox-bytes",
        "1MiB",
        "--slow-timeout",
        "60s",
    ]);
    let pid = process.child.id();
    let _stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            crate::slow::stalled_client(process.addr, &format!("ws://{}/ws/mem", process.addr))
        })
        .collect();
    let mut publisher = process.connect("mem");
    let baseline = rss_bytes(pid);
    let mut peak = baseline;
    // 32 MiB published, 32 times the bound.
    for i in 0..2048u32 {
        publisher
            .send(Message::binary(vec![(i % 256) as u8; 16 * 1024]))
            .unwrap();
        next_data(&mut publisher);
        if i % 16 == 0 {
            peak = peak.max(rss_bytes(pid));
        }
    }
    peak = peak.max(rss_bytes(pid));
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "server RSS: baseline {} KiB, peak {} KiB, growth {} KiB",
        baseline / 1024,
        peak / 1024,
        growth / 1024
    );
    // The bound, plus a margin for allocator slack and the publisher's own buffers.
    assert!(
        growth < OUTBOX + 8 * 1024 * 1024,
        "RSS grew by {growth} bytes"
    );
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Sends an upgrade request and reports whether a 101 arrives within `wait`.
fn upgraded_within(stream: &mut TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 101")
}

/// Out of file descriptors, `accept` fails with EMFILE until one frees. Without the backoff
/// the acceptor would spin on it at 100% CPU; without recovery the server would be dead.
#[test]
fn out_of_file_descriptors_it_backs_off_quietly_and_recovers() {
    use std::io::Write;
    // --max-clients above what 48 descriptors allow, so accept itself must hit the limit.
    let mut process =
        Process::start_with_file_limit(&["--max-clients", "1000", "--rate", "0"], Some(48));
    let pid = process.child.id();
    let mut held = Vec::new();
    let pending = loop {
        let mut stream = TcpStream::connect(process.addr).unwrap();
        stream
            .write_all(upgrade_request("/ws/fds").as_bytes())
            .unwrap();
        if !upgraded_within(&mut stream, Duration::from_secs(2)) {
            break stream;
        }
        held.push(stream);
        assert!(held.len() < 48, "the descriptor limit never bit");
    };
    process.wait_for_line("Too many open files");

    let cpu_before = cpu_time(pid);
    thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(pid) - cpu_before;
    // A busy loop would burn about 2 s of CPU here; the backoff sleeps up to 1 s at a time.
    assert!(
        spent < Duration::from_millis(500),
        "{spent:?} of CPU in 2 s while out of fds"
    );

    // Free descriptors: the connection waiting in the backlog is served, and so is a new one.
    let _ = held.drain(..5);
    let mut pending = pending;
    assert!(
        upgraded_within(&mut pending, READ_TIMEOUT),
        "the pending connection was never served"
    );
    let mut fresh = process.connect("fds");
    fresh.send(Message::text("recovered")).unwrap();
    assert_eq!(next_text(&mut fresh), "recovered");
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the server must still be running"
    );
}
