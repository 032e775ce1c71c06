//! The real binary's configuration: bounded flags, environment variables, the token file,
//! origins normalised end to end, and secrets kept out of its output.
//!
//! Every child starts with the `ROOMCAST_*` variables of the test's own environment removed,
//! so a developer's settings cannot change an outcome, and each is given exactly the
//! variables its test names.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;

use crate::support::*;

/// How long a refused configuration may take to exit. A flag that is wrongly accepted leaves a
/// server running instead: the test then fails after this, rather than hanging.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// A token long enough for the 16-byte minimum.
const TOKEN: &str = "flags-test-token-0123456789";

/// The binary with exactly `vars` as its `ROOMCAST_*` environment.
fn command(args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut command = binary_command(args);
    command.envs(vars.iter().copied());
    command
}

/// Runs the binary to its exit and returns its status and stderr.
fn exit_of(args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = command(args, vars).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + EXIT_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "roomcast {args:?} {vars:?} kept running; it logged:\n{}",
                reader.join().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().unwrap())
}

/// Asserts a refusal: status 2 and one line naming `name` and saying `problem`.
fn assert_refused(args: &[&str], vars: &[(&str, &str)], name: &str, problem: &str) -> String {
    let (code, stderr) = exit_of(args, vars);
    assert_eq!(code, Some(2), "{args:?} {vars:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("roomcast: {name}: ")),
        "{args:?} {vars:?}: {stderr}"
    );
    assert!(stderr.contains(problem), "{args:?} {vars:?}: {stderr}");
    stderr
}

/// A server process with exactly `vars` as its `ROOMCAST_*` environment, killed on drop.
fn running(args: &[&str], vars: &[(&str, &str)]) -> Process {
    Process::start_configured(args, |command| {
        command.envs(vars.iter().copied());
    })
}

/// Upgrades to `/ws/stage` sending `origin`; the HTTP status when refused.
fn connect_from(addr: SocketAddr, origin: &str) -> Result<Client, u16> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut request = format!("ws://{addr}/ws/stage")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Origin", HeaderValue::from_str(origin).unwrap());
    match tungstenite::client(request, stream) {
        Ok((client, _)) => Ok(client),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("handshake from {origin}: {err}"),
    }
}

/// A file with `contents` in the temp dir, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("roomcast-flags-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `10000000000000000000` seconds used to be accepted, and then every connection thread
/// panicked computing its handshake deadline.
#[test]
fn a_huge_handshake_timeout_exits_2_naming_the_flag_and_the_range() {
    assert_refused(
        &["--handshake-timeout", "10000000000000000000"],
        &[],
        "--handshake-timeout",
        "must be between 1ms and 1h",
    );
    assert_refused(
        &["--shutdown-grace=11m"],
        &[],
        "--shutdown-grace",
        "must be between 1ms and 10m",
    );
    assert_refused(
        &["--outbox-bytes", "5GiB"],
        &[],
        "--outbox-bytes",
        "must be between 0B and 4GiB",
    );
}

#[test]
fn a_variable_sets_a_limit_and_the_flag_overrides_it() {
    let vars = [("ROOMCAST_MAX_CLIENTS", "7"), ("ROOMCAST_RATE", "3")];
    let mut from_env = running(&[], &vars);
    let limits = from_env.wait_for_line("limits: max clients");
    assert!(limits.contains("max clients 7,"), "{limits}");
    assert!(limits.contains("rate 3/s"), "{limits}");
    drop(from_env);

    let mut overridden = running(&["--max-clients", "9"], &vars);
    let limits = overridden.wait_for_line("limits: max clients");
    assert!(limits.contains("max clients 9,"), "{limits}");
    assert!(limits.contains("rate 3/s"), "{limits}");
}

#[test]
fn a_bad_variable_exits_2_naming_the_variable() {
    assert_refused(
        &[],
        &[("ROOMCAST_RATE", "fast")],
        "ROOMCAST_RATE",
        "not a whole number",
    );
    assert_refused(
        &[],
        &[("ROOMCAST_IDLE_TIMEOUT", "25h")],
        "ROOMCAST_IDLE_TIMEOUT",
        "must be between 1ms and 24h",
    );
    // Under a good flag the variable is never read.
    let mut process = running(&["--rate", "5"], &[("ROOMCAST_RATE", "fast")]);
    let limits = process.wait_for_line("limits: max clients");
    assert!(limits.contains("rate 5/s"), "{limits}");
}

/// The token from a file (as systemd's `LoadCredential=` provides it) opens the publish API,
/// and only that token is accepted.
#[test]
fn the_token_file_turns_publishing_on_with_its_token() {
    let file = TempFile::new("token", &format!("{TOKEN}\n"));
    for (args, vars) in [
        (vec!["--api-token-file", file.path()], vec![]),
        (vec![], vec![("ROOMCAST_API_TOKEN_FILE", file.path())]),
    ] {
        let mut process = running(&args, &vars);
        process.wait_for_line("publish API on");
        let publish = |token: &str| {
            let bearer = format!("Bearer {token}");
            http(
                process.addr,
                "POST",
                "/api/rooms/stage/messages",
                &[("Authorization", &bearer), ("Content-Type", "text/plain")],
                b"hello",
            )
            .status
        };
        assert_eq!(publish(TOKEN), 202, "{args:?} {vars:?}");
        assert_eq!(publish("flags-test-token-wrong-000"), 401);
        let log = process.stop();
        assert!(log.iter().all(|line| !line.contains(TOKEN)), "{log:#?}");
        // The file keeps the token out of ps, so there is nothing to warn about.
        assert!(
            log.iter().all(|line| !line.contains("command line")),
            "{log:#?}"
        );
    }
}

#[test]
fn bad_tokens_exit_2_without_showing_the_token() {
    let short = TempFile::new("short", "s3cret\n");
    for (args, vars, name, problem) in [
        (
            vec!["--api-token", "s3cret"],
            vec![],
            "--api-token",
            "6 bytes",
        ),
        (
            vec![],
            vec![("ROOMCAST_API_TOKEN", "s3cret")],
            "ROOMCAST_API_TOKEN",
            "6 bytes",
        ),
        (
            vec!["--api-token-file", short.path()],
            vec![],
            "--api-token-file",
            "6 bytes",
        ),
        (
            vec!["--api-token-file", "/nonexistent/roomcast-token"],
            vec![],
            "--api-token-file",
            "cannot read",
        ),
        (
            vec!["--api-token", TOKEN, "--api-token-file", short.path()],
            vec![],
            "--api-token-file",
            "conflicts with --api-token",
        ),
    ] {
        let stderr = assert_refused(&args, &vars, name, problem);
        assert!(
            !stderr.contains("s3cret") && !stderr.contains(TOKEN),
            "{stderr}"
        );
    }
}

/// `--api-token` on the command line works, but every local user can read it in `ps`.
#[test]
fn a_token_on_the_command_line_is_warned_about() {
    let mut process = running(&["--api-token", TOKEN], &[]);
    process.wait_for_line("publish API on");
    let warning = process.wait_for_line("--api-token is on the command line");
    assert!(warning.contains("ROOMCAST_API_TOKEN"), "{warning}");
    assert!(!warning.contains(TOKEN), "{warning}");
}

/// An allow-list written with capitals and the default port matches what browsers send, a
/// different port does not, and a refusal leaves the server serving others.
#[test]
fn allowed_origins_compare_normalised() {
    let process = running(&["--allowed-origin", "HTTPS://Live.Example:443"], &[]);
    let mut allowed = connect_from(process.addr, "https://live.example")
        .unwrap_or_else(|status| panic!("the browser's own origin got {status}"));
    assert_eq!(
        connect_from(process.addr, "https://live.example:8443").err(),
        Some(403)
    );
    assert_eq!(
        connect_from(process.addr, "http://live.example").err(),
        Some(403)
    );
    assert_eq!(connect_from(process.addr, "null").err(), Some(403));
    allowed.send(Message::text("still here")).unwrap();
    assert_eq!(next_text(&mut allowed), "still here");
    let mut again = connect_from(process.addr, "https://LIVE.example:443").unwrap();
    again.send(Message::text("and again")).unwrap();
    assert_eq!(next_text(&mut again), "and again");
}

#[test]
fn malformed_origins_exit_2_with_the_reason() {
    for (origin, reason) in [
        ("https://live.example/", "path"),
        ("live.example", "no scheme"),
        ("ftp://live.example", "http or https"),
        ("https://live.example:99999", "port"),
    ] {
        assert_refused(
            &["--allowed-origin", origin],
            &[],
            "--allowed-origin",
            reason,
        );
    }
    assert_refused(
        &[],
        &[(
            "ROOMCAST_ALLOWED_ORIGIN",
            "https://a.example,https://b.example/",
        )],
        "ROOMCAST_ALLOWED_ORIGIN",
        "path",
    );
}

/// Whatever the build, a Redis URL that is refused is not echoed with its password.
#[test]
fn a_refused_redis_url_does_not_show_its_password() {
    let stderr = assert_refused(
        &["--redis", "redis://:hunter2secret@127.0.0.1:notaport/0"],
        &[],
        "--redis",
        "",
    );
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
}

/// The start-up log names the backplane's URL, and the link's failures are logged as it
/// retries: none of it may show the password.
#[cfg(feature = "redis")]
#[test]
fn the_redis_password_never_reaches_the_log() {
    let mut process = running(&["--redis", "redis://:hunter2secret@127.0.0.1:1/0"], &[]);
    let line = process.wait_for_line("redis backplane: ");
    assert!(line.contains("redis://:***@127.0.0.1:1/0"), "{line}");
    process.wait_for_line("--redis is on the command line");
    // Port 1 refuses: wait for the link to have failed and logged it.
    process.wait_for_line("reconnecting with backoff");
    let log = process.stop();
    assert!(
        log.iter().all(|line| !line.contains("hunter2secret")),
        "{log:#?}"
    );
}
