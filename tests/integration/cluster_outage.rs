//! roomcast.v1 across instances when one instance loses Redis and the others do not: the
//! instance cut off must never answer a resume for Redis's epoch from what it holds, must bring
//! its rooms up to date when it is back, and one large room must not cost it its link.
//!
//! Instance B reaches Redis through `Cutter`, a loopback TCP relay that can cut every
//! connection through it and refuse new ones, so only B's link breaks.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};

use roomcast::Config;

use crate::support::*;

const API_TOKEN: &str = "outage-token-0123456789";
const LINK_WAIT: Duration = Duration::from_secs(20);

/// A relay to one Redis that can cut its connections.
struct Cutter {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Cutter {
    fn start(redis_port: u16) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let (cut, stop, streams, threads) =
                (cut.clone(), stop.clone(), streams.clone(), threads.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(err) if err.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => continue,
                    };
                    if cut.load(Ordering::SeqCst) {
                        continue; // refused: dropped at once
                    }
                    client.set_nonblocking(false).unwrap();
                    let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                        continue;
                    };
                    let mut held = streams.lock().unwrap();
                    held.push(client.try_clone().unwrap());
                    held.push(server.try_clone().unwrap());
                    for (from, to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        threads
                            .lock()
                            .unwrap()
                            .push(thread::spawn(move || pipe(from, to)));
                    }
                }
            })
        };
        Cutter {
            port,
            cut,
            stop,
            streams,
            threads,
            acceptor: Some(acceptor),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Cuts every connection through it and refuses new ones, or lets them through again.
    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for stream in self.streams.lock().unwrap().drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_cut(true);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for thread in self.threads.lock().unwrap().drain(..) {
            let _ = thread.join();
        }
    }
}

/// Copies one direction until either side ends, then ends both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn config(url: String) -> Config {
    Config {
        redis: Some(url),
        redis_ttl: Duration::from_millis(1500),
        rate: 0,
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    }
}

fn linked(config: Config) -> TestServer {
    start_linked(config)
}

fn seq_of(frame: &Value) -> u64 {
    frame["seq"].as_u64().unwrap()
}

fn messages(client: &mut V1Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| client.next_message()).collect()
}

fn metric(server: &TestServer, sample: &str) -> u64 {
    metric_sample(server, API_TOKEN, sample)
}

/// While B cannot reach Redis it cannot know how far the room has gone: a resume there is
/// answered under an epoch of B's own, never as recovered from B's stale copy. Before, B said
/// `recovered: true` with its last seq and silently left out what A sent meanwhile.
#[test]
fn an_instance_cut_off_from_redis_never_recovers_a_resume_from_its_stale_copy() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cutter = Cutter::start(redis.port);
    let a = linked(config(redis.url()));
    let b = linked(config(cutter.url()));
    let mut writer = a.connect_v1("show", "name=w");
    let mut watcher = b.connect_v1("show", "name=x");
    let epoch = writer.welcome["epoch"].as_str().unwrap().to_string();
    for n in 0..3 {
        writer.publish(json!({ "n": n }));
    }
    let seen = messages(&mut watcher, 3);
    drop(watcher);
    cutter.set_cut(true);
    assert!(wait_until(LINK_WAIT, || health(&b).starts_with("degraded")));
    for n in 3..6 {
        writer.publish(json!({ "n": n }));
    }
    let _ = messages(&mut writer, 6);
    let since = seq_of(&seen[1]);
    let back = b.connect_v1("show", &format!("since={since}&epoch={epoch}"));
    assert_eq!(back.welcome["recovered"], false, "{}", back.welcome);
    assert_ne!(back.welcome["epoch"], epoch.as_str(), "{}", back.welcome);
}

/// B's stream breaks and comes back while A goes on. B's member that stayed connected is
/// brought up to date with exactly what it missed (a new welcome, `recovered: true`), and a
/// resume through B afterwards is exact: B asks Redis for the room rather than trust its copy.
#[test]
fn after_its_stream_broke_an_instance_catches_its_members_up_and_resumes_exactly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cutter = Cutter::start(redis.port);
    let a = linked(config(redis.url()));
    let b = linked(config(cutter.url()));
    let mut writer = a.connect_v1("show", "name=w");
    let mut stayed = b.connect_v1("show", "name=stayed");
    let mut leaver = b.connect_v1("show", "name=leaver");
    let epoch = writer.welcome["epoch"].as_str().unwrap().to_string();
    for n in 0..3 {
        writer.publish(json!({ "n": n }));
    }
    let seen = messages(&mut leaver, 3);
    assert_eq!(messages(&mut stayed, 3), seen);
    drop(leaver);
    cutter.set_cut(true);
    assert!(wait_until(LINK_WAIT, || health(&b).starts_with("degraded")));
    for n in 3..6 {
        writer.publish(json!({ "n": n }));
    }
    let all = messages(&mut writer, 6);
    cutter.set_cut(false);
    assert!(wait_until(LINK_WAIT, || health(&b) == "ok\n"));

    // The member that stayed gets what it missed, in a welcome that resumes it.
    let caught_up = stayed.next_of("welcome");
    assert_eq!(caught_up["recovered"], true, "{caught_up}");
    assert_eq!(caught_up["epoch"], epoch.as_str());
    assert_eq!(caught_up["history"].as_array().unwrap(), &all[3..].to_vec());

    let since = seq_of(&seen[2]);
    let back = b.connect_v1("show", &format!("since={since}&epoch={epoch}"));
    assert_eq!(back.welcome["recovered"], true, "{}", back.welcome);
    assert_eq!(back.welcome["seq"], seq_of(&all[5]));
    assert_eq!(
        back.welcome["history"].as_array().unwrap(),
        &all[3..].to_vec()
    );
    // And both go on with the room.
    writer.publish(json!("after"));
    let next = writer.next_message();
    assert_eq!(stayed.next_message(), next);
}

/// B numbered a room alone while cut off (its own member posted); when it is back, the room
/// takes Redis's epoch again and B's member joins it again, with the room's history as Redis
/// holds it (A's messages from the outage included), not an empty one.
#[test]
fn members_of_a_room_an_instance_numbered_alone_rejoin_with_redis_history() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cutter = Cutter::start(redis.port);
    let a = linked(config(redis.url()));
    let b = linked(config(cutter.url()));
    let mut writer = a.connect_v1("show", "name=w");
    let mut local = b.connect_v1("show", "name=local");
    writer.publish(json!("before"));
    let before = writer.next_message();
    assert_eq!(local.next_message(), before);
    cutter.set_cut(true);
    assert!(wait_until(LINK_WAIT, || health(&b).starts_with("degraded")));
    local.publish(json!("alone"));
    let alone = local.next_message();
    assert!(seq_of(&alone) > 1 << 40, "{alone}");
    writer.publish(json!("while B was away"));
    let away = writer.next_message();
    cutter.set_cut(false);
    assert!(wait_until(LINK_WAIT, || health(&b) == "ok\n"));
    writer.publish(json!("back"));
    let back = writer.next_message();

    let again = local.next_of("welcome");
    assert_eq!(again["recovered"], false, "{again}");
    assert_eq!(again["epoch"], writer.welcome["epoch"], "{again}");
    let history = again["history"].as_array().unwrap();
    assert!(
        history.contains(&before) && history.contains(&away),
        "{again}"
    );
    assert!(seq_of(&again) >= seq_of(&away), "{again}");
    // Every message after the welcome's seq follows it, the next one first.
    if seq_of(&again) < seq_of(&back) {
        assert_eq!(local.next_message(), back);
    }
}

/// A join to a room whose history is larger than a subscriber's output buffer takes (Redis
/// closes a pub/sub client past 32 MiB) gets the room's newest history within a bound, and
/// costs the instance no outage. Before, the whole history went in one message and Redis
/// dropped the subscriber.
#[test]
fn a_join_to_a_room_with_a_huge_history_does_not_cost_the_link() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let big = |url: String| Config {
        history: 1000,
        history_budget: 1 << 30,
        ..config(url)
    };
    let a = linked(big(redis.url()));
    let body = format!("\"{}\"", "x".repeat(60_000));
    let bearer = format!("Bearer {API_TOKEN}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    for _ in 0..600 {
        let posted = http(
            a.addr,
            "POST",
            "/api/rooms/big/messages",
            &headers,
            body.as_bytes(),
        );
        assert_eq!(posted.status, 202, "{}", posted.text());
    }
    let b = linked(big(redis.url()));
    let joined = b.connect_v1("big", "");
    assert_eq!(joined.welcome["seq"], 600, "{}", joined.welcome["seq"]);
    let history = joined.welcome["history"].as_array().unwrap();
    assert!(!history.is_empty());
    assert_eq!(seq_of(history.last().unwrap()), 600);
    assert_eq!(metric(&b, "roomcast_redis_outages_total"), 0);
    assert_eq!(health(&b), "ok\n");
}

/// A backend's publish through `server`, as text.
fn post_text(server: &TestServer, room: &str, text: &str) -> u16 {
    let bearer = format!("Bearer {API_TOKEN}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "text/plain"),
    ];
    let path = format!("/api/rooms/{room}/messages");
    http(server.addr, "POST", &path, &headers, text.as_bytes()).status
}

/// B's stream comes back while A keeps publishing: the first message B sees after the break
/// leaves a gap, and B's member that stayed is caught up with exactly what it missed (a
/// welcome resuming it), and gets every message once. Before, it jumped the gap silently.
#[test]
fn a_member_caught_up_under_traffic_misses_nothing_and_sees_nothing_twice() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cutter = Cutter::start(redis.port);
    let a = linked(config(redis.url()));
    let b = linked(config(cutter.url()));
    let mut stayed = b.connect_v1("show", "name=stayed");
    for n in 0..3 {
        assert_eq!(post_text(&a, "show", &format!("m{n}")), 202);
    }
    let _ = messages(&mut stayed, 3);
    cutter.set_cut(true);
    assert!(wait_until(LINK_WAIT, || health(&b).starts_with("degraded")));
    for n in 3..6 {
        assert_eq!(post_text(&a, "show", &format!("m{n}")), 202);
    }
    // Traffic goes on while B comes back, and a little after.
    cutter.set_cut(false);
    let started = std::time::Instant::now();
    let mut n = 6;
    while health(&b) != "ok\n" || started.elapsed() < Duration::from_millis(1000) {
        assert_eq!(post_text(&a, "show", &format!("m{n}")), 202);
        n += 1;
        thread::sleep(Duration::from_millis(2));
        assert!(started.elapsed() < LINK_WAIT, "B never came back");
    }
    assert_eq!(post_text(&a, "show", "last"), 202);
    let mut seen: Vec<u64> = vec![1, 2, 3];
    loop {
        let frame = stayed.next_frame();
        match frame["type"].as_str() {
            Some("message") => {
                seen.push(seq_of(&frame));
                if frame["text"] == "last" {
                    break;
                }
            }
            Some("welcome") => {
                assert_eq!(frame["recovered"], true, "{frame}");
                seen.extend(frame["history"].as_array().unwrap().iter().map(seq_of));
            }
            _ => {}
        }
    }
    let expected: Vec<u64> = (1..=*seen.last().unwrap()).collect();
    assert_eq!(seen, expected, "every seq once, in order");
}

/// A redis-server on a port of its own with a data directory, so it can be restarted from
/// the dump it saved; killed when dropped.
struct PersistentRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PersistentRedis {
    fn start() -> Option<PersistentRedis> {
        // RedisServer::start says why it skips, and fails where redis-server is required.
        drop(RedisServer::start()?);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("roomcast-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = PersistentRedis {
            port,
            dir,
            child: None,
        };
        redis.spawn();
        Some(redis)
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.command("PING") == "+PONG"),
            "redis-server did not start"
        );
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One inline command; the first line of its reply.
    fn command(&self, command: &str) -> String {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = stream.write_all(format!("{command}\r\n").as_bytes());
        let mut reply = [0u8; 256];
        let n = stream.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..n]).trim_end().to_string()
    }

    /// Killed at once (SIGKILL), then started again from its last `SAVE`.
    fn crash_and_restore(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PersistentRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis restarts from a dump older than its last writes (an RDB, or an AOF written every
/// second, after a crash): the room's epoch is the same and its seq lower. Plain members get
/// every message after it, and a v1 client that saw the lost numbers is never told it
/// recovered: the room gets a new epoch. Before, messages numbered at or below the old seq
/// were dropped as second copies, for plain members too.
#[test]
fn redis_restored_from_an_older_dump_starts_a_new_epoch_and_drops_nothing() {
    let Some(mut redis) = PersistentRedis::start() else {
        return;
    };
    let a = linked(config(redis.url()));
    let mut plain = a.connect("show");
    let mut watcher = a.connect_v1("show", "name=watcher");
    let epoch = watcher.welcome["epoch"].as_str().unwrap().to_string();
    for n in 1..=3 {
        assert_eq!(post_text(&a, "show", &format!("m{n}")), 202);
        assert_eq!(next_text(&mut plain), format!("m{n}"));
    }
    assert_eq!(redis.command("SAVE"), "+OK");
    for n in 4..=8 {
        assert_eq!(post_text(&a, "show", &format!("m{n}")), 202);
        assert_eq!(next_text(&mut plain), format!("m{n}"));
    }
    let seen = messages(&mut watcher, 8);
    drop(watcher);
    redis.crash_and_restore();
    assert!(wait_until(LINK_WAIT, || health(&a) == "ok\n"));
    for n in 9..=14 {
        assert_eq!(post_text(&a, "show", &format!("m{n}")), 202);
    }
    for n in 9..=14 {
        assert_eq!(next_text(&mut plain), format!("m{n}"));
    }
    let since = seq_of(&seen[5]);
    let back = a.connect_v1("show", &format!("since={since}&epoch={epoch}"));
    assert_eq!(back.welcome["recovered"], false, "{}", back.welcome);
    assert_ne!(back.welcome["epoch"], epoch.as_str(), "{}", back.welcome);
}
