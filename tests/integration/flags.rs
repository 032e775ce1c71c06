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
        process.wait_for_line("backend API on");
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
    process.wait_for_line("backend API on");
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

/// A join-token secret of 32 bytes and more.
const SECRET: &str = "flags-test-join-token-secret-0123456789";
/// The secret before a rotation.
const PREVIOUS: &str = "flags-test-previous-join-secret-0123456";
/// 31 bytes: one short of the minimum.
const SHORT_SECRET: &str = "flags-test-short-secret-0123456";

#[test]
fn a_short_or_orphaned_token_secret_exits_2_without_showing_it() {
    let short = TempFile::new("short-secret", &format!("{SHORT_SECRET}\n"));
    for (args, vars, name, problem) in [
        (
            vec!["--token-secret", SHORT_SECRET],
            vec![],
            "--token-secret",
            "31 bytes: it must be between 32 and 4096",
        ),
        (
            vec![],
            vec![("ROOMCAST_TOKEN_SECRET", SHORT_SECRET)],
            "ROOMCAST_TOKEN_SECRET",
            "31 bytes",
        ),
        (
            vec!["--token-secret-file", short.path()],
            vec![],
            "--token-secret-file",
            "31 bytes",
        ),
        (
            vec![],
            vec![
                ("ROOMCAST_TOKEN_SECRET", SECRET),
                ("ROOMCAST_TOKEN_SECRET_PREVIOUS", SHORT_SECRET),
            ],
            "ROOMCAST_TOKEN_SECRET_PREVIOUS",
            "31 bytes",
        ),
        (
            vec![],
            vec![("ROOMCAST_TOKEN_SECRET_PREVIOUS", PREVIOUS)],
            "ROOMCAST_TOKEN_SECRET_PREVIOUS",
            "needs the current secret",
        ),
        (
            vec!["--max-connections-per-user", "-1"],
            vec![],
            "--max-connections-per-user",
            "not a whole number",
        ),
        (
            vec!["--room-ttl", "25h"],
            vec![],
            "--room-ttl",
            "must be between 1s and 24h",
        ),
    ] {
        let stderr = assert_refused(&args, &vars, name, problem);
        for secret in [SECRET, PREVIOUS, SHORT_SECRET] {
            assert!(!stderr.contains(secret), "{stderr}");
        }
    }
}

/// `--token-secret` works, but every local user can read it in `ps`; the variable and the
/// file are not warned about. No secret reaches the log.
#[test]
fn a_token_secret_on_the_command_line_is_warned_about() {
    let mut process = running(&["--token-secret", SECRET], &[]);
    let warning = process.wait_for_line("--token-secret is on the command line");
    assert!(
        warning.contains("ROOMCAST_TOKEN_SECRET or --token-secret-file"),
        "{warning}"
    );
    process.wait_for_line("limits: max clients");
    let log = process.stop();
    assert!(log.iter().all(|line| !line.contains(SECRET)), "{log:#?}");

    let file = TempFile::new("secret", &format!("{SECRET}\n"));
    let vars = [("ROOMCAST_TOKEN_SECRET_PREVIOUS", PREVIOUS)];
    let mut process = running(&["--token-secret-file", file.path()], &vars);
    process.wait_for_line("limits: max clients");
    let log = process.stop();
    assert!(
        log.iter().all(|line| !line.contains("command line")
            && !line.contains(SECRET)
            && !line.contains(PREVIOUS)),
        "{log:#?}"
    );
}

/// `roomcast token ARGS` with exactly `vars` as its `ROOMCAST_*` environment: its status,
/// stdout and stderr, bounded by `EXIT_WAIT`.
fn token_command(args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ROOMCAST_") {
            command.env_remove(name);
        }
    }
    let mut child = command
        .arg("token")
        .args(args)
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + EXIT_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("roomcast token {args:?} kept running");
        }
        thread::sleep(Duration::from_millis(10));
    };
    (
        status.code(),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
    )
}

/// The token `roomcast token` prints is one the server's own check accepts, with the claims
/// asked for, for that room only; `*` opens every room.
#[test]
fn roomcast_token_prints_a_token_the_server_accepts() {
    use roomcast::v1::token::{verify, Perm, Rejection};
    use std::time::SystemTime;

    let vars = [("ROOMCAST_TOKEN_SECRET", SECRET)];
    let args = [
        "--room", "stage", "--sub", "u42", "--name", "Ann", "--perm", "react", "--ttl", "10m",
    ];
    let (code, stdout, stderr) = token_command(&args, &vars);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let token = stdout.trim_end();
    let now = SystemTime::now();
    let claims = verify(token, &[SECRET.as_bytes()], "stage", now).unwrap();
    assert_eq!(
        (
            claims.sub.as_str(),
            claims.name.as_deref(),
            claims.room.as_str(),
            claims.perm
        ),
        ("u42", Some("Ann"), "stage", Perm::React)
    );
    let seconds_left = claims.exp
        - now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    assert!((595.0..=601.0).contains(&seconds_left), "{seconds_left}");
    assert_eq!(
        verify(token, &[SECRET.as_bytes()], "backstage", now),
        Err(Rejection::WrongRoom)
    );
    assert_eq!(
        verify(token, &[PREVIOUS.as_bytes()], "stage", now),
        Err(Rejection::BadSignature)
    );

    // Every room, the defaults (perm post, 1 h), and the secret from a file.
    let file = TempFile::new("token-secret", &format!("{SECRET}\n"));
    let vars = [("ROOMCAST_TOKEN_SECRET_FILE", file.path())];
    let (code, stdout, stderr) = token_command(&["--room", "*", "--sub", "u7"], &vars);
    assert_eq!(code, Some(0), "{stderr}");
    let token = stdout.trim_end();
    for room in ["stage", "lobby"] {
        let claims = verify(token, &[SECRET.as_bytes()], room, now).unwrap();
        assert_eq!((claims.perm, claims.display_name()), (Perm::Post, "u7"));
    }

    // The secret on the command line works, and is warned about.
    let (code, stdout, stderr) = token_command(
        &["--room", "stage", "--sub", "u1", "--token-secret", SECRET],
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("--token-secret is on the command line"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET), "{stderr}");
    assert!(verify(stdout.trim_end(), &[SECRET.as_bytes()], "stage", now).is_ok());
}

/// Without a secret, or with a claim the server would refuse, `roomcast token` prints no
/// token and exits 2 with one line naming what to fix.
#[test]
fn roomcast_token_refuses_what_the_server_would() {
    let vars = [("ROOMCAST_TOKEN_SECRET", SECRET)];
    let long_name = "n".repeat(65);
    for (args, vars, name, problem) in [
        (
            vec!["--room", "stage", "--sub", "u1"],
            vec![],
            "--token-secret",
            "ROOMCAST_TOKEN_SECRET",
        ),
        (
            vec!["--room", "stage", "--sub", "u1"],
            vec![("ROOMCAST_TOKEN_SECRET", SHORT_SECRET)],
            "ROOMCAST_TOKEN_SECRET",
            "31 bytes",
        ),
        (vec!["--sub", "u1"], vars.to_vec(), "--room", "is required"),
        (
            vec!["--room", "a/b", "--sub", "u1"],
            vars.to_vec(),
            "--room",
            "not a room name",
        ),
        (
            vec!["--room", "stage", "--sub", ""],
            vars.to_vec(),
            "--sub",
            "0 bytes",
        ),
        (
            vec!["--room", "stage", "--sub", "u1", "--name", &long_name],
            vars.to_vec(),
            "--name",
            "65 bytes",
        ),
        (
            vec!["--room", "stage", "--sub", "u1", "--perm", "admin"],
            vars.to_vec(),
            "--perm",
            "not one of read, react, post",
        ),
        (
            vec!["--room", "stage", "--sub", "u1", "--ttl", "31d"],
            vars.to_vec(),
            "--ttl",
            "not a duration",
        ),
    ] {
        let (code, stdout, stderr) = token_command(&args, &vars);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("roomcast: {name}: ")),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(problem), "{args:?}: {stderr}");
        assert!(
            !stderr.contains(SECRET) && !stderr.contains(SHORT_SECRET),
            "{stderr}"
        );
    }
}
