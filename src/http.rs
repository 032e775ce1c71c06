//! The HTTP/1.1 side of a connection: reading one request head under a deadline and size
//! bound, and writing plain responses.
//!
//! Every connection starts here. The connection thread reads the head, then either upgrades
//! it to a WebSocket (connection.rs) or answers it with a status and closes.

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

    /// Whether a comma-separated header (like `Connection`) contains `token`, case-insensitive.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

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
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut owned = Vec::with_capacity(parsed.headers.len());
    for header in parsed.headers.iter() {
        // Header values are bytes in HTTP; the ones we read (Upgrade, Connection, Origin,
        // Sec-WebSocket-*) are ASCII, so a non-UTF-8 value is treated as malformed.
        let value = std::str::from_utf8(header.value).map_err(|_| HeadError::Malformed)?;
        owned.push((header.name.to_string(), value.to_string()));
    }
    Ok(Some((
        Request {
            method: method.to_string(),
            path,
            headers: owned,
        },
        head_len,
    )))
}

/// Reads a request body of exactly `Content-Length` bytes, starting with `leftover` (the bytes
/// that arrived after the head), finishing by `deadline`.
///
/// The length is checked against `max` before anything is read, so an announced gigabyte
/// costs nothing. Chunked bodies are not supported: every client that POSTs here (curl, a
/// backend's HTTP library) sends a length for a small body. Errors are the status to answer.
pub fn read_body(
    stream: &TcpStream,
    request: &Request,
    mut leftover: Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<Vec<u8>, u16> {
    if request.header("Transfer-Encoding").is_some() {
        return Err(411);
    }
    let length: usize = match request.header("Content-Length") {
        Some(value) => value.parse().map_err(|_| 400u16)?,
        None => return Err(411),
    };
    if length > max {
        return Err(413);
    }
    // Bytes after the body would be a pipelined second request, which we do not serve.
    leftover.truncate(length);
    let mut body = leftover;
    let mut filled = body.len();
    body.resize(length, 0);
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
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(408)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(400),
        }
    }
    Ok(body)
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

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
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
        assert!(text.ends_with("\r\n\r\nService Unavailable\n"));
    }
}
