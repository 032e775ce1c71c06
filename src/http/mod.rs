//! The HTTP/1.1 side of a connection: reading one request head under a deadline and size
//! bound, and writing plain responses.
//!
//! Every connection starts here. The connection thread reads the head, then either upgrades
//! it to a WebSocket (connection.rs) or answers it with a status and closes.

pub mod endpoints;
pub mod metrics;
pub mod moderation;
pub mod origin;

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Largest request head accepted. Browsers send 1–2 KiB; 16 KiB leaves room for large
/// cookies and rejects anything built to exhaust memory.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers parsed at most; more is a malformed (or hostile) request.
const MAX_HEADERS: usize = 48;
/// First read buffer size: most heads fit, and it grows up to `MAX_HEAD_BYTES` if not.
const INITIAL_HEAD_BUFFER: usize = 2048;

/// A parsed request head. Owns its strings: the head buffer is freed before the WebSocket
/// session starts, since an idle connection should hold no more memory than it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target without its query string.
    pub path: String,
    /// What followed the `?` in the request target, still percent-encoded; empty if none.
    pub query: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first header with this name (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space, as forms send
    /// it). `None` when absent, or when its decoding is not UTF-8.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| percent_decode(value))
    }

    /// Whether a comma-separated header (like `Connection`) contains `token`, case-insensitive.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether a comma-separated header contains exactly `token` (case matters, as it does
    /// for subprotocol names).
    pub fn header_list_contains(&self, name: &str, token: &str) -> bool {
        self.header_values(name)
            .flat_map(|value| value.split(','))
            .any(|item| item.trim() == token)
    }

    /// Every value of a header, in order and trimmed; a comma-separated list stays one value.
    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// The body length the request announces, `None` without a `Content-Length`.
    ///
    /// Strict on purpose (RFC 9112 §6.3): exactly one header whose value is nothing but ASCII
    /// digits and fits `usize`. `usize::from_str` alone would take `+5`; a list (`5, 7`) or a
    /// second header means a proxy in front of us may pick another length than we do and see
    /// our "body" as its next request, which is how request smuggling starts.
    pub fn content_length(&self) -> Result<Option<usize>, BadFraming> {
        let mut values = self.header_values("Content-Length");
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(BadFraming::ContentLength);
        }
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadFraming::ContentLength);
        }
        // Only digits are left, so the one way to fail is a number too large for usize.
        value
            .parse()
            .map(Some)
            .map_err(|_| BadFraming::ContentLength)
    }

    /// Refuses body framing that two parsers could read two ways: a `Content-Length` that is
    /// not exactly one plain number, or one sent together with `Transfer-Encoding` (RFC 9112
    /// §6.1 lets a server reject that pair, and it is the classic smuggling request).
    pub fn check_framing(&self) -> Result<(), BadFraming> {
        let length = self.content_length()?;
        if length.is_some() && self.header("Transfer-Encoding").is_some() {
            return Err(BadFraming::LengthAndTransferEncoding);
        }
        Ok(())
    }

    /// What the `Expect` header asks of us (RFC 9110 §10.1.1). Only `100-continue` is
    /// defined; several headers or list members are all checked.
    pub fn expectation(&self) -> Expectation {
        let mut expectation = Expectation::Nothing;
        for member in self
            .header_values("Expect")
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|member| !member.is_empty())
        {
            if !member.eq_ignore_ascii_case("100-continue") {
                return Expectation::Unsupported;
            }
            expectation = Expectation::Continue;
        }
        expectation
    }
}

/// Body framing roomcast refuses with `400`: see [`Request::check_framing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFraming {
    /// Two or more `Content-Length` headers, or a value that is not one plain number.
    ContentLength,
    /// `Content-Length` and `Transfer-Encoding` together.
    LengthAndTransferEncoding,
}

/// What a request's `Expect` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// No `Expect` header.
    Nothing,
    /// `100-continue`: the client waits for a `100 Continue` before it sends the body.
    Continue,
    /// Anything else, which no server can promise to meet: `417`.
    Unsupported,
}

/// The interim response that tells a client waiting on `Expect: 100-continue` to send its
/// body. curl waits a second for it before sending anyway, so skipping it costs every
/// publish over 1 KiB that second.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why no request could be read. Each maps to one response (or to none, when the peer left).
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed or reset before sending a whole head: nothing to answer.
    Disconnected,
    /// The deadline passed first: 408.
    Timeout,
    /// Over `MAX_HEAD_BYTES`: 431.
    TooLarge,
    /// Not HTTP/1.x: 400.
    Malformed,
    /// Any other socket error: nothing to answer.
    Io(io::Error),
}

/// Reads and parses one request head, finishing by `deadline`.
///
/// Returns the request and any bytes that arrived after the head (a client may send its first
/// WebSocket frame without waiting for our 101). The deadline bounds the whole head, not each
/// read: a client sending one byte per second (slowloris) is cut off all the same.
pub fn read_request(
    stream: &TcpStream,
    deadline: Instant,
) -> Result<(Request, Vec<u8>), HeadError> {
    let mut buf = vec![0u8; INITIAL_HEAD_BUFFER];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
            buf.resize((buf.len() * 2).min(MAX_HEAD_BYTES), 0);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(HeadError::Timeout);
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(HeadError::Io)?;
        let n = match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => return Err(HeadError::Disconnected),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return Err(HeadError::Disconnected)
            }
            Err(e) => return Err(HeadError::Io(e)),
        };
        filled += n;
        if let Some(parsed) = parse_head(&buf[..filled])? {
            let (request, head_len) = parsed;
            return Ok((request, buf[head_len..filled].to_vec()));
        }
    }
}

/// Decodes `%XX` escapes and `+`; `None` for a bad escape or a result that is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                decoded.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                decoded.push(b' ');
                i += 1;
            }
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

/// Parses a complete head from `bytes`, or returns `None` when more bytes are needed.
pub fn parse_head(bytes: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    // On the heap, not the stack: 1.5 KiB here would make every connection thread's stack
    // peak touch one more page, which stays resident for the connection's whole life.
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(HeadError::Malformed);
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let mut owned = Vec::with_capacity(parsed.headers.len());
    for header in parsed.headers.iter() {
        // Header values are bytes in HTTP; the ones we read (Upgrade, Connection, Origin,
        // Sec-WebSocket-*) are ASCII, so a non-UTF-8 value is treated as malformed.
        let value = std::str::from_utf8(header.value).map_err(|_| HeadError::Malformed)?;
        owned.push((header.name.to_string(), value.to_string()));
    }
    let request = Request {
        method: method.to_string(),
        path,
        query,
        headers: owned,
    };
    // Checked on every request, not only where a body is read: bad framing is an
    // unrecoverable error for the whole message (RFC 9112 §6.3), whatever the path.
    request.check_framing().map_err(|_| HeadError::Malformed)?;
    Ok(Some((request, head_len)))
}

/// Reads a request body of exactly `Content-Length` bytes, starting with `leftover` (the bytes
/// that arrived after the head), finishing by `deadline`.
///
/// The length is checked against `max` before anything is read, so an announced gigabyte
/// costs nothing. A client that sent `Expect: 100-continue` gets its `100 Continue` only once
/// the length is accepted (the caller has checked the token before), so a refused request
/// gets its final status without the client ever sending the body. Chunked bodies are not
/// supported: every client that POSTs here (curl, a backend's HTTP library) sends a length
/// for a small body. Errors are the status to answer.
pub fn read_body(
    stream: &TcpStream,
    request: &Request,
    mut leftover: Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<Vec<u8>, u16> {
    request.check_framing().map_err(|_| 400u16)?;
    if request.header("Transfer-Encoding").is_some() {
        return Err(411);
    }
    let Some(length) = request.content_length().map_err(|_| 400u16)? else {
        return Err(411);
    };
    let expectation = request.expectation();
    if expectation == Expectation::Unsupported {
        return Err(417);
    }
    if length > max {
        return Err(413);
    }
    // Bytes after the body would be a pipelined second request, which we do not serve.
    leftover.truncate(length);
    let mut body = leftover;
    let mut filled = body.len();
    body.resize(length, 0);
    // A client that has already sent the body (some do, without waiting) needs no 100.
    if expectation == Expectation::Continue && filled < length {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(408);
        }
        stream
            .set_write_timeout(Some(remaining))
            .map_err(|_| 500u16)?;
        (&*stream)
            .write_all(CONTINUE)
            .map_err(|e| status_for_io_error(&e))?;
    }
    while filled < length {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(408);
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|_| 500u16)?;
        match (&*stream).read(&mut body[filled..]) {
            Ok(0) => return Err(400),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(status_for_io_error(&e)),
        }
    }
    Ok(body)
}

/// The status for a socket error while reading a body: `408` when the deadline ran out,
/// `400` (an incomplete request) for anything else.
fn status_for_io_error(error: &io::Error) -> u16 {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => 408,
        _ => 400,
    }
}

/// A plain HTTP response; always `Connection: close`, since each connection serves one request.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Cow<'static, str>,
}

/// Content types roomcast answers with.
pub const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";
pub const HTML: &str = "text/html; charset=utf-8";
/// For the demo page's script and style sheet: with `nosniff`, browsers run a script only
/// under a JavaScript type and apply a style sheet only as `text/css`.
pub const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
pub const CSS: &str = "text/css; charset=utf-8";
/// Prometheus text exposition format 0.0.4.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Response {
    /// A response whose body is its reason phrase, a line a human reading curl output follows.
    pub fn status(status: u16) -> Response {
        Response {
            status,
            content_type: TEXT,
            headers: Vec::new(),
            body: format!("{}\n", reason(status)).into(),
        }
    }

    /// A `200` with the given content type and body.
    pub fn ok(content_type: &'static str, body: impl Into<Cow<'static, str>>) -> Response {
        Response::status(200).with_content(content_type, body)
    }

    pub fn with_body(mut self, body: impl Into<Cow<'static, str>>) -> Response {
        self.body = body.into();
        self
    }

    pub fn with_content(
        mut self,
        content_type: &'static str,
        body: impl Into<Cow<'static, str>>,
    ) -> Response {
        self.content_type = content_type;
        self.body = body.into();
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The response on the wire. Every response is `nosniff`: the content type we name is
    /// the only one a browser may read it as (a JSON body never runs as a script).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.content_type,
            self.body.len()
        ));
        out.push_str(&self.body);
        out.into_bytes()
    }

    /// Writes the response, blocking for at most `timeout`.
    pub fn write_to(&self, stream: &TcpStream, timeout: Duration) -> io::Result<()> {
        stream.set_write_timeout(Some(timeout))?;
        (&*stream).write_all(&self.to_bytes())
    }
}

/// Reason phrases for the statuses roomcast sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_percent_decoded() {
        let head =
            b"GET /ws/a?since=41&name=Ann%20B+C&x&token=a%2Eb&bad=%G1&half=%4 HTTP/1.1\r\n\r\n";
        let (request, _) = parse_head(head).unwrap().unwrap();
        assert_eq!(request.path, "/ws/a");
        assert_eq!(request.query_param("since").as_deref(), Some("41"));
        assert_eq!(request.query_param("name").as_deref(), Some("Ann B C"));
        assert_eq!(request.query_param("token").as_deref(), Some("a.b"));
        assert_eq!(request.query_param("x").as_deref(), Some(""));
        assert_eq!(request.query_param("bad"), None);
        assert_eq!(request.query_param("half"), None);
        assert_eq!(request.query_param("missing"), None);
        assert_eq!(percent_decode("%+5"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }

    #[test]
    fn parses_a_complete_head_and_reports_its_length() {
        let raw =
            b"GET /ws/room?x=1 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\nEXTRA";
        let (request, len) = parse_head(raw).unwrap().unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/ws/room");
        assert_eq!(&raw[len..], b"EXTRA");
        assert!(request.header_has_token("connection", "upgrade"));
        assert_eq!(request.header("HOST"), Some("a"));
    }

    #[test]
    fn partial_head_needs_more() {
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        ));
    }

    fn head_with(headers: &str) -> Result<Option<(Request, usize)>, HeadError> {
        parse_head(format!("POST /api/rooms/r/messages HTTP/1.1\r\n{headers}\r\n").as_bytes())
    }

    #[test]
    fn content_length_is_one_plain_number() {
        let length = |headers: &str| head_with(headers).unwrap().unwrap().0.content_length();
        assert_eq!(length(""), Ok(None));
        assert_eq!(length("Content-Length: 5\r\n"), Ok(Some(5)));
        assert_eq!(length("content-length:  007 \r\n"), Ok(Some(7)));
        for bad in [
            "Content-Length: +5\r\n",
            "Content-Length: -5\r\n",
            "Content-Length: 5, 7\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: 5 7\r\n",
            "Content-Length: 0x10\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert!(
                matches!(head_with(bad), Err(HeadError::Malformed)),
                "{bad:?} was accepted"
            );
        }
        // Transfer-Encoding alone is framing we understand but do not serve (411, later).
        assert!(head_with("Transfer-Encoding: chunked\r\n")
            .unwrap()
            .is_some());
    }

    #[test]
    fn expectations() {
        let expect = |headers: &str| head_with(headers).unwrap().unwrap().0.expectation();
        assert_eq!(expect(""), Expectation::Nothing);
        assert_eq!(expect("Expect: 100-continue\r\n"), Expectation::Continue);
        assert_eq!(expect("expect: 100-Continue\r\n"), Expectation::Continue);
        assert_eq!(expect("Expect: 200-ok\r\n"), Expectation::Unsupported);
        assert_eq!(
            expect("Expect: 100-continue, x\r\n"),
            Expectation::Unsupported
        );
        assert_eq!(
            expect("Expect: 100-continue\r\nExpect: x\r\n"),
            Expectation::Unsupported
        );
    }

    #[test]
    fn response_bytes() {
        let text = String::from_utf8(
            Response::status(503)
                .with_header("Retry-After", "5")
                .to_bytes(),
        )
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 5\r\n"));
        assert!(text.contains("X-Content-Type-Options: nosniff\r\n"));
        assert!(text.ends_with("\r\n\r\nService Unavailable\n"));
    }
}
