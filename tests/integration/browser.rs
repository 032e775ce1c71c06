//! The demo page in a real browser: headless Chromium, driven over the DevTools protocol
//! (a WebSocket, so tungstenite is the whole driver), chats with a Rust WebSocket client in
//! the same room.
//!
//! scripts/test.sh installs Debian's `chromium` and sets `ROOMCAST_REQUIRE_ALL`, so CI never
//! skips this; a plain `cargo test` on a machine without Chromium says why it skips.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
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

/// Guards the whole demo path a newcomer takes: page served, WebSocket from a browser,
/// JSON convention, viewer count polling, and both directions of chat, all under the page's
/// Content-Security-Policy, which must let the page work and must stop inline scripts.
#[test]
fn the_demo_page_chats_with_a_rust_client_in_a_real_browser() {
    let Some(chromium) = find_chromium() else {
        assert!(
            std::env::var_os("ROOMCAST_REQUIRE_ALL").is_none(),
            "Chromium is required but not installed"
        );
        eprintln!("skipping the browser test: no chromium found (scripts/test.sh installs it)");
        return;
    };
    let started = Instant::now();
    let server = start(test_config());
    let mut rust_client = server.connect("browser-test");
    let page_url = format!("http://{}/?room=browser-test&nick=page-user", server.addr);
    // Start blank, so the violation recorder below is in place before the page's first byte.
    let browser = Browser::launch(&chromium, "about:blank");
    let mut page = Page::connect(&browser.page_socket("about:blank"));
    // Every Content-Security-Policy violation the page meets, recorded from its very start.
    // DevTools injects this script past the policy; the page's own scripts get no such pass.
    // Chromium runs scripts added for new documents only once the Page domain is enabled.
    page.call("Page.enable", json!({}));
    page.call(
        "Page.addScriptToEvaluateOnNewDocument",
        json!({"source": "window.cspViolations = []; \
            addEventListener('securitypolicyviolation', (e) => \
                window.cspViolations.push(`${e.effectiveDirective} ${e.blockedURI}`));"}),
    );
    page.call("Page.navigate", json!({"url": page_url}));

    // The page's script set this: under the policy, that means it came from /demo.js, since
    // no inline script may run.
    page.wait_for(
        "document.getElementById('state')?.dataset.state",
        json!("connected"),
    );
    page.wait_for("document.getElementById('viewers').textContent", json!("2"));

    // Page → Rust: typed into the composer and submitted like a user would.
    page.eval("document.getElementById('text').value = 'hello from the page'; document.getElementById('composer').requestSubmit(); true");
    let sent: Value = serde_json::from_str(&next_text(&mut rust_client)).unwrap();
    assert_eq!(
        sent,
        json!({"type": "chat", "nick": "page-user", "text": "hello from the page"})
    );

    // Rust → page: a chat line and a reaction, in the page's convention.
    let chat =
        json!({"type": "chat", "nick": "rust-client", "text": "hello from rust <b>not bold</b>"});
    rust_client.send(Message::text(chat.to_string())).unwrap();
    rust_client
        .send(Message::text(
            json!({"type": "reaction", "emoji": "👏"}).to_string(),
        ))
        .unwrap();
    page.wait_for(
        "document.getElementById('log').textContent.includes('hello from rust <b>not bold</b>')",
        json!(true),
    );
    // Escaped, not interpreted: the markup arrived as text.
    assert_eq!(
        page.eval("document.querySelectorAll('#log b').length"),
        json!(0)
    );
    page.wait_for(
        "document.getElementById('tally-👏').textContent",
        json!("1"),
    );

    // Script, style sheet, WebSocket and the viewer-count fetch all passed the policy...
    assert_eq!(page.eval("window.cspViolations"), json!([]));
    assert_eq!(
        page.eval("getComputedStyle(document.body).display"),
        json!("flex"),
        "the style sheet applied"
    );
    // ...and the policy is really enforced: an inline script, as injected markup would carry
    // it, does not run. Without the policy header this probe runs and the test fails.
    let inline_ran = page.eval(
        "(() => { const s = document.createElement('script'); \
         s.textContent = 'window.inlineRan = true'; document.head.append(s); \
         return window.inlineRan === true; })()",
    );
    assert_eq!(inline_ran, json!(false), "an inline script ran");
    page.wait_for(
        "window.cspViolations.some((v) => v.startsWith('script-src'))",
        json!(true),
    );

    let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/demo-page.png");
    std::fs::write(&path, png).unwrap();
    eprintln!(
        "browser test took {:?}; screenshot at {}",
        started.elapsed(),
        path.display()
    );
}
