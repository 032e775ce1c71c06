//! The demo page in a real browser: headless Chromium, driven over the DevTools protocol
//! (a WebSocket, so tungstenite is the whole driver), chats with Rust `roomcast.v1` clients in
//! the same room, through the browser client `/roomcast.js` that the page imports: history on
//! join and after a reload, pushed presence, reaction totals, a resume after the page's
//! connection is cut (through a proxy the test controls), verified names and refused tokens.
//!
//! scripts/test.sh installs Debian's `chromium` and sets `ROOMCAST_REQUIRE_ALL`, so CI never
//! skips this; a plain `cargo test` on a machine without Chromium says why it skips.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::Message;

use crate::support::*;

/// Chromium itself, its process group, and its profile directory; all gone on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    devtools: String,
}

impl Browser {
    fn launch(binary: &str, url: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "roomcast-chromium-{}-{}",
            std::process::id(),
            unique()
        ));
        let mut child = Command::new(binary)
            .args([
                "--headless",
                // Running as root (CI) requires it; the page is our own.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                // This machine has no network: without these, Chromium keeps trying to reach
                // Google's services.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so dropping the browser ends its helpers too.
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let devtools = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium printed its DevTools address");
        Browser {
            child,
            profile,
            devtools,
        }
    }

    /// The DevTools WebSocket of the page showing `url_part`.
    fn page_socket(&self, url_part: &str) -> String {
        let host = self
            .devtools
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let response = http(host.parse().unwrap(), "GET", "/json/list", &[], b"");
            let targets: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
            let page = targets.as_array().into_iter().flatten().find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.contains(url_part))
            });
            if let Some(page) = page {
                return page["webSocketDebuggerUrl"].as_str().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no page for {url_part} in {targets}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = self.child.id() as i32;
        // SAFETY: signals the process group we created for this Chromium.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever ignored SIGTERM.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A DevTools protocol session with one page.
struct Page {
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Page {
    fn connect(url: &str) -> Page {
        let host = url.trim_start_matches("ws://").split('/').next().unwrap();
        let stream = TcpStream::connect(host).unwrap();
        Page {
            socket: upgrade(stream, url).unwrap(),
            next_id: 1,
        }
    }

    /// Sends one command and returns its result, skipping the events in between.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(command.to_string()))
            .unwrap();
        loop {
            let Message::Text(text) = self.socket.read().expect("DevTools reply") else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression} threw: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Evaluates JavaScript that returns a Promise, and returns what it resolves to.
    fn eval_async(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression} threw: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it returns `expected`.
    fn wait_for(&mut self, expression: &str, expected: Value) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.eval(expression);
            if value == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expression} is {value}, expected {expected}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn find_chromium() -> Option<String> {
    let candidates = std::env::var("CHROMIUM")
        .into_iter()
        .chain(["chromium", "chromium-browser", "google-chrome"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Chromium, or `None` after saying why the test skips; under `ROOMCAST_REQUIRE_ALL` (CI) a
/// missing Chromium fails instead.
fn chromium_or_skip() -> Option<String> {
    let found = find_chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("ROOMCAST_REQUIRE_ALL").is_none(),
            "Chromium is required but not installed"
        );
        eprintln!("skipping a browser test: no chromium found (scripts/test.sh installs it)");
    }
    found
}

/// One browser test at a time: each Chromium takes most of a core while it starts, and two
/// at once on this 2-core machine would make every wait below a race with the other.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

/// A Chromium showing the demo page, with every Content-Security-Policy violation recorded
/// from the page's very start.
struct Demo {
    page: Page,
    // Dropped after the page's DevTools session: ends Chromium and removes its profile.
    _browser: Browser,
}

impl Demo {
    fn open(chromium: &str, url: &str) -> Demo {
        // Start blank, so the violation recorder below is in place before the page's first byte.
        let browser = Browser::launch(chromium, "about:blank");
        let mut page = Page::connect(&browser.page_socket("about:blank"));
        // DevTools injects this script past the policy; the page's own scripts get no such
        // pass. Chromium runs scripts added for new documents only once the Page domain is
        // enabled, and again on every reload.
        page.call("Page.enable", json!({}));
        page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": "window.cspViolations = []; \
                addEventListener('securitypolicyviolation', (e) => \
                    window.cspViolations.push(`${e.effectiveDirective} ${e.blockedURI}`));"}),
        );
        page.call("Page.navigate", json!({"url": url}));
        Demo {
            page,
            _browser: browser,
        }
    }

    /// Waits until the page's status badge reads `state` (`connected`, `reconnecting`, ...).
    fn wait_for_state(&mut self, state: &str) {
        self.page.wait_for(
            "document.getElementById('state')?.dataset.state",
            json!(state),
        );
    }

    /// The text of every message line in the log, in order (system lines left out).
    fn messages(&mut self) -> Vec<String> {
        let value = self.page.eval(
            "[...document.querySelectorAll('#log li[data-seq] .text')].map((e) => e.textContent)",
        );
        serde_json::from_value(value).expect("a list of strings")
    }

    /// Waits until the log's last message reads `text`.
    fn wait_for_last_message(&mut self, text: &str) {
        let expression = format!(
            "[...document.querySelectorAll('#log li[data-seq] .text')].at(-1)?.textContent === {}",
            json!(text)
        );
        self.page.wait_for(&expression, json!(true));
    }

    /// Types `text` into the composer and sends it, as a user would.
    fn say(&mut self, text: &str) {
        self.page.eval(&format!(
            "document.getElementById('text').value = {}; \
             document.getElementById('composer').requestSubmit(); true",
            json!(text)
        ));
    }

    /// Reloads the page and waits until the new document is connected.
    fn reload(&mut self) {
        self.page.eval("window.beforeReload = true");
        self.page.call("Page.reload", json!({}));
        self.page.wait_for(
            "window.beforeReload === undefined && \
             document.getElementById('state')?.dataset.state === 'connected'",
            json!(true),
        );
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self
            .page
            .call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

/// The texts of the `message` frames a v1 client reads next, its `data.text` each.
fn read_texts(client: &mut V1Client, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let message = client.next_message();
            message["data"]["text"]
                .as_str()
                .unwrap_or_else(|| panic!("a chat message: {message}"))
                .to_string()
        })
        .collect()
}

/// Guards the whole demo path a newcomer takes: page served, `/roomcast.js` imported as a
/// module, a v1 WebSocket from a browser, names as the server says them, pushed presence (no
/// polling), and both directions of chat, all under the page's Content-Security-Policy, which
/// must let the page work and must stop inline scripts.
#[test]
fn the_demo_page_chats_with_a_rust_client_in_a_real_browser() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let server = start(test_config());
    let mut rust_client = server.connect_v1("browser-test", "name=rust-client");
    let mut demo = Demo::open(
        &chromium,
        &format!("http://{}/?room=browser-test&name=page-user", server.addr),
    );

    // The page's script set this: under the policy, that means it came from /demo.js, since
    // no inline script may run.
    demo.wait_for_state("connected");
    demo.page
        .wait_for("document.getElementById('viewers').textContent", json!("2"));
    // The page's own identity, as the server gave it: an open room's name, marked unverified.
    assert_eq!(
        demo.page.eval("document.getElementById('you').textContent"),
        json!("you: page-userguest")
    );

    // Page → Rust: typed into the composer and submitted like a user would.
    demo.say("hello from the page");
    let sent = rust_client.next_message();
    assert_eq!(
        sent["data"],
        json!({"type": "chat", "text": "hello from the page"})
    );
    assert_eq!(sent["from"]["name"], "page-user");
    assert_eq!(sent["from"]["verified"], false);

    // Rust → page: markup arrives as text, with the sender's name.
    rust_client.publish(json!({"type": "chat", "text": "hello from rust <b>not bold</b>"}));
    demo.wait_for_last_message("hello from rust <b>not bold</b>");
    assert_eq!(
        demo.page.eval("document.querySelectorAll('#log b').length"),
        json!(0),
        "escaped, not interpreted"
    );
    assert_eq!(
        demo.page
            .eval("document.querySelector('#log li:last-child .nick').textContent"),
        json!("rust-clientguest")
    );
    // A plain client's text and a backend publish show too.
    let mut plain = server.connect("browser-test");
    plain.send(Message::text("plain text, verbatim")).unwrap();
    demo.wait_for_last_message("plain text, verbatim");

    // Presence is pushed: a third client shows without the page asking, and the page never
    // polls the room endpoint (the old page fetched /api/rooms/<room> every 2 s).
    let _third = server.connect_v1("browser-test", "name=third");
    demo.page
        .wait_for("document.getElementById('viewers').textContent", json!("4"));
    assert_eq!(
        demo.page.eval(
            "performance.getEntriesByType('resource').filter((e) => e.name.includes('/api/')).length"
        ),
        json!(0),
        "the page polled the rooms API"
    );

    // Script, module, style sheet and WebSocket all passed the policy...
    assert_eq!(demo.page.eval("window.cspViolations"), json!([]));
    assert_eq!(
        demo.page.eval("getComputedStyle(document.body).display"),
        json!("flex"),
        "the style sheet applied"
    );
    // ...and the policy is really enforced: an inline script, as injected markup would carry
    // it, does not run. Without the policy header this probe runs and the test fails.
    let inline_ran = demo.page.eval(
        "(() => { const s = document.createElement('script'); \
         s.textContent = 'window.inlineRan = true'; document.head.append(s); \
         return window.inlineRan === true; })()",
    );
    assert_eq!(inline_ran, json!(false), "an inline script ran");
    demo.page.wait_for(
        "window.cspViolations.some((v) => v.startsWith('script-src'))",
        json!(true),
    );

    // The module refuses what it could only send the server as a bad frame, with a reason.
    let refusals = demo.page.eval_async(
        "import('/roomcast.js').then(({ connect }) => { \
           const reason = (f) => { try { return `returned ${f()}`; } catch (e) { return `${e.name}: ${e.message}`; } }; \
           const room = connect({ room: 'browser-test', name: 'probe' }); \
           const found = [reason(() => connect({})), reason(() => connect({ url: 'ftp://x/ws/a' })), \
             reason(() => room.react('')), reason(() => room.react('x'.repeat(33))), \
             reason(() => room.publish(undefined)), reason(() => room.publish({ text: 'early' }))]; \
           room.close(); return found; })",
    );
    assert_eq!(
        refusals,
        json!([
            "TypeError: connect needs a url or a room",
            "TypeError: not a WebSocket URL: ftp:",
            "TypeError: a reaction key is 1 to 32 bytes of UTF-8",
            "TypeError: a reaction key is 1 to 32 bytes of UTF-8",
            "TypeError: publish needs a JSON value",
            "returned false",
        ]),
        "a publish before the welcome is not sent, nor queued"
    );

    let path = demo.screenshot("demo-page");
    eprintln!(
        "browser test took {:?}; screenshot at {}",
        started.elapsed(),
        path.display()
    );
}

/// History on join and after a reload (PROTOCOL §4 `welcome.history`), and reactions from
/// another client reaching the page as totals it animates by their difference. Without the
/// history the reloaded page would show an empty log; without the totals, a tally of 0.
#[test]
fn the_demo_page_shows_history_after_a_reload_and_reactions_from_another_client() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let server = start(test_config());
    let mut rust_client = server.connect_v1("history-test", "name=rust-client");
    for text in ["before the page 1", "before the page 2"] {
        rust_client.publish(json!({"type": "chat", "text": text}));
    }
    assert_eq!(read_texts(&mut rust_client, 2).len(), 2);

    let mut demo = Demo::open(
        &chromium,
        &format!("http://{}/?room=history-test&name=page-user", server.addr),
    );
    demo.wait_for_state("connected");
    demo.wait_for_last_message("before the page 2");
    assert_eq!(demo.messages(), ["before the page 1", "before the page 2"]);
    demo.say("from the page");
    assert_eq!(read_texts(&mut rust_client, 1), ["from the page"]);
    demo.wait_for_last_message("from the page");

    // Another client taps 👏 three times: the page's tally follows the room's totals, and
    // the difference floats up.
    for _ in 0..3 {
        rust_client.react("👏");
    }
    demo.page.wait_for(
        "document.getElementById('tally-👏').textContent",
        json!("3"),
    );
    assert_eq!(
        demo.page
            .eval("Number(document.getElementById('floats').dataset.floated) >= 3"),
        json!(true),
        "three taps float up three emojis"
    );
    // And the page's own tap reaches the other client's totals.
    demo.page
        .eval("document.querySelector('button[data-emoji=\"❤️\"]').click(); true");
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let totals = rust_client.next_of("reactions");
        if totals["totals"]["❤️"] == 1 {
            assert_eq!(totals["totals"]["👏"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "no ❤️ in {totals}");
    }

    // A reload: the log is redrawn from the room's history, each message once, and the
    // tallies are the room's totals (nothing floats: they are no news to a new page).
    demo.reload();
    demo.wait_for_last_message("from the page");
    assert_eq!(
        demo.messages(),
        ["before the page 1", "before the page 2", "from the page"]
    );
    demo.page.wait_for(
        "document.getElementById('tally-👏').textContent + document.getElementById('tally-❤️').textContent",
        json!("31"),
    );
    assert_eq!(
        demo.page
            .eval("document.getElementById('floats').dataset.floated ?? 'none'"),
        json!("none")
    );
    assert_eq!(demo.page.eval("window.cspViolations"), json!([]));
}

/// A TCP proxy in front of the server that the test can cut: every connection through it is
/// shut down at once, and new ones are held (accepted, not forwarded) until released. That
/// is a dropped network as a browser meets it, without the server's help: a moderator's
/// disconnect would be a `4003`, after which the client rightly does not come back.
struct CuttableProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    acceptor: Option<JoinHandle<()>>,
}

/// Shared by the test, the acceptor and the connections' threads; lives as long as the proxy.
struct ProxyState {
    upstream: SocketAddr,
    /// While true, new connections wait before being forwarded.
    held: Mutex<bool>,
    released: Condvar,
    /// Both ends of every forwarded connection, to cut them.
    live: Mutex<Vec<TcpStream>>,
    /// Every connection's threads, joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl CuttableProxy {
    fn start(upstream: SocketAddr) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream,
            held: Mutex::new(false),
            released: Condvar::new(),
            live: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let shared = state.clone();
        let acceptor = thread::spawn(move || {
            for downstream in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(downstream) = downstream else { continue };
                let state = shared.clone();
                let thread = thread::spawn(move || state.forward(downstream));
                shared.threads.lock().unwrap().push(thread);
            }
        });
        CuttableProxy {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// Cuts every connection and holds new ones until `release`.
    fn cut_and_hold(&self) {
        *self.state.held.lock().unwrap() = true;
        for stream in self.state.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn release(&self) {
        *self.state.held.lock().unwrap() = false;
        self.state.released.notify_all();
    }
}

impl ProxyState {
    /// Waits out a hold, then pipes bytes both ways until either side closes.
    fn forward(&self, downstream: TcpStream) {
        let mut held = self.held.lock().unwrap();
        while *held && !self.stopping.load(Ordering::SeqCst) {
            held = self
                .released
                .wait_timeout(held, Duration::from_millis(100))
                .unwrap()
                .0;
        }
        drop(held);
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(upstream) = TcpStream::connect(self.upstream) else {
            return;
        };
        {
            let mut live = self.live.lock().unwrap();
            live.push(downstream.try_clone().unwrap());
            live.push(upstream.try_clone().unwrap());
        }
        let (mut down_read, mut up_write) = (
            downstream.try_clone().unwrap(),
            upstream.try_clone().unwrap(),
        );
        let pump = thread::spawn(move || {
            let _ = std::io::copy(&mut down_read, &mut up_write);
            let _ = up_write.shutdown(std::net::Shutdown::Write);
        });
        let (mut up_read, mut down_write) = (upstream, downstream);
        let _ = std::io::copy(&mut up_read, &mut down_write);
        let _ = down_write.shutdown(std::net::Shutdown::Write);
        let _ = pump.join();
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.release();
        // Wakes the acceptor's accept(), which then sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in self.state.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<_> = self.state.threads.lock().unwrap().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// A reconnect in the middle of a conversation: the page's connection is cut, three messages
/// are sent while it is away, and once it is back every message shows exactly once, in order
/// (the client resumed with `since`/`epoch` and the server sent exactly the missed ones).
/// The room keeps only 4 messages, fewer than the page ends up showing: a client that did not
/// resume (or a page that redrew from a plain join's history) would lose the first ones.
#[test]
fn the_demo_page_resumes_after_its_connection_is_cut_and_shows_every_message_once() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let server = start(roomcast::Config {
        history: 4,
        ..test_config()
    });
    let proxy = CuttableProxy::start(server.addr);
    let mut rust_client = server.connect_v1("resume-test", "name=rust-client");
    let mut demo = Demo::open(
        &chromium,
        &format!("http://{}/?room=resume-test&name=page-user", proxy.addr),
    );
    demo.wait_for_state("connected");
    let say = |client: &mut V1Client, text: &str| {
        client.publish(json!({"type": "chat", "text": text}));
        assert_eq!(read_texts(client, 1), [text]);
    };
    say(&mut rust_client, "one");
    demo.say("two");
    assert_eq!(read_texts(&mut rust_client, 1), ["two"]);
    demo.wait_for_last_message("two");

    proxy.cut_and_hold();
    demo.wait_for_state("reconnecting");
    // The server forgets the page's connection; these reach the room while the page is away.
    assert!(
        wait_until(READ_TIMEOUT, || server.hub.client_count() == 1),
        "the server still counts the cut connection"
    );
    for text in ["three", "four", "five"] {
        say(&mut rust_client, text);
    }
    proxy.release();
    demo.wait_for_state("connected");
    say(&mut rust_client, "six");
    demo.wait_for_last_message("six");
    assert_eq!(
        demo.messages(),
        ["one", "two", "three", "four", "five", "six"],
        "every message once, in the room's order"
    );
    assert_eq!(
        demo.page.eval(
            "document.getElementById('log').textContent.includes('caught up on 3 missed messages')"
        ),
        json!(true)
    );
    // The page can still post on its new connection.
    demo.say("seven");
    assert_eq!(read_texts(&mut rust_client, 1), ["seven"]);
    demo.wait_for_last_message("seven");
    assert_eq!(demo.messages().len(), 7);
    drop(demo);
    drop(proxy);
}

const SECRET: &str = "a-browser-test-secret-of-32-bytes-or-more";
const API_TOKEN: &str = "browser-test-api-token";

fn token(sub: &str, name: &str, room: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    roomcast::v1::token::mint(
        SECRET.as_bytes(),
        &json!({"sub": sub, "name": name, "room": room, "exp": exp}),
    )
}

/// With join tokens: a page without one is refused (`401`), which a browser only sees as a
/// failed connection; the page gives up after a few refusals and says so, while the server
/// goes on serving a client with a token. A pasted token shows its verified name, and a
/// moderator's `4003` ends the page's session for good: it does not come back.
#[test]
fn the_demo_page_with_join_tokens_marks_verified_names_and_reports_refusals() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let server = start(roomcast::Config {
        token_secrets: vec![SECRET.into()],
        api_token: Some(API_TOKEN.into()),
        ..test_config()
    });
    let bob = token("u-bob", "Bob", "secure");
    let mut rust_client = server.connect_v1("secure", &format!("token={bob}"));
    assert_eq!(rust_client.welcome["you"]["verified"], true);

    let mut demo = Demo::open(&chromium, &format!("http://{}/?room=secure", server.addr));
    demo.wait_for_state("offline");
    assert_eq!(
        demo.page
            .eval("document.getElementById('state-text').textContent"),
        json!("refused: check the token")
    );
    assert_eq!(
        demo.page.eval(
            "document.getElementById('log').textContent.includes('refused the connection 3 times')"
        ),
        json!(true)
    );
    // The server keeps serving others.
    rust_client.publish(json!({"type": "chat", "text": "still served"}));
    assert_eq!(read_texts(&mut rust_client, 1), ["still served"]);

    // A token pasted into the box, as a user would: the page joins as Ann, verified.
    let ann = token("u-ann", "Ann", "secure");
    demo.page.eval(&format!(
        "document.getElementById('token').value = {}; \
         document.getElementById('join').requestSubmit(); true",
        json!(ann)
    ));
    demo.wait_for_state("connected");
    assert_eq!(
        demo.page
            .eval("document.querySelector('#you .verified')?.textContent"),
        json!("✓")
    );
    assert_eq!(
        demo.page
            .eval("document.querySelector('#you .nick').firstChild.textContent"),
        json!("Ann")
    );
    assert!(
        !demo
            .page
            .eval("location.href")
            .as_str()
            .unwrap()
            .contains(&ann),
        "the token stays out of the page's URL"
    );
    rust_client.publish(json!({"type": "chat", "text": "hi Ann"}));
    assert_eq!(read_texts(&mut rust_client, 1), ["hi Ann"]);
    demo.wait_for_last_message("hi Ann");
    assert_eq!(
        demo.page
            .eval("document.querySelector('#log li:last-child .verified')?.title"),
        json!("verified: u-bob")
    );
    demo.say("hi Bob");
    let from_page = rust_client.next_message();
    assert_eq!(
        from_page["from"],
        json!({"id": "u-ann", "name": "Ann", "verified": true})
    );

    demo.screenshot("demo-page-tokens");

    // A moderator removes Ann: 4003 with the reason, and the page stays out.
    let auth = format!("Bearer {API_TOKEN}");
    let response = http(
        server.addr,
        "POST",
        "/api/rooms/secure/disconnect",
        &[("Authorization", &auth)],
        br#"{"user": "u-ann", "reason": "off topic"}"#,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    demo.wait_for_state("offline");
    assert_eq!(
        demo.page
            .eval("document.getElementById('state-text').textContent"),
        json!("disconnected: off topic")
    );
    // Longer than the first retry could wait (0.5 s at most): a reconnect would be back.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.hub.client_count(), 1, "the removed page came back");
    assert_eq!(
        demo.page
            .eval("document.getElementById('state')?.dataset.state"),
        json!("offline")
    );
}

/// `/roomcast.js` is a module any site may import: a JavaScript type (browsers refuse a
/// module under any other, and `nosniff` forbids guessing), and CORS open to every origin,
/// without which a cross-origin `import` fails.
#[test]
fn the_browser_client_is_served_as_a_module_any_origin_may_import() {
    let server = start(test_config());
    let response = http(server.addr, "GET", "/roomcast.js", &[], b"");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("Content-Type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(response.header("Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(response.header("X-Content-Type-Options"), Some("nosniff"));
    assert!(response.text().contains("export function connect("));
    // A POST is not a fetch of the script: 405, and the server goes on serving.
    let post = http(server.addr, "POST", "/roomcast.js", &[], b"");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("Allow"), Some("GET"));
    assert_eq!(
        http(server.addr, "GET", "/roomcast.js", &[], b"").status,
        200
    );
}
