//! The real binary: flags, signals, exit codes, and its memory under a slow client.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::support::*;

const BINARY: &str = env!("CARGO_BIN_EXE_roomcast");

/// A running `roomcast` process, killed on drop if a test fails midway.
struct Process {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Process {
    fn start(args: &[&str]) -> Process {
        let mut child = Command::new(BINARY)
            .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = forward_lines(child.stderr.take().unwrap());
        let mut process = Process {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
        };
        let line = process.wait_for_line("listening on ws://");
        let addr = line
            .split("ws://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        process.addr = addr.parse().unwrap();
        process
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("roomcast never logged {needle:?}"),
            }
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we spawned and have not yet reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for the process to exit, returning its exit code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("roomcast did not exit within {limit:?}");
    }

    fn connect(&self, room: &str) -> Client {
        upgrade(
            TcpStream::connect(self.addr).unwrap(),
            &format!("ws://{}/ws/{room}", self.addr),
        )
        .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

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
