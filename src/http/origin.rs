//! Web origins (`scheme://host[:port]`): the `--allowed-origin` allow-list, parsed at start-up,
//! and the `Origin` header of each upgrade request, parsed the same way so the two compare
//! as origins rather than as strings.
//!
//! Browsers serialise an origin as lowercase `scheme://host`, with the port only when it is not
//! the scheme's default. People write them by hand in flags, with capitals and explicit ports.
//! Normalising both sides (lowercase scheme and host, default port filled in) makes
//! `https://A.example:443` and `https://a.example` the same origin, as RFC 6454 says they are,
//! and refusing anything with a path at start-up catches `https://a.example/`, which as a
//! string would never match any browser's header.

use std::fmt;
use std::str::FromStr;

/// One origin, normalised: `scheme` and `host` lowercase, `port` always present.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    scheme: Scheme,
    /// A DNS name or IPv4 address, or an IPv6 address in brackets (`[::1]`).
    host: String,
    port: u16,
}

/// The schemes a browser page that can open a WebSocket has. `null` (sandboxed frames,
/// `file:` pages) is deliberately not among them: it is shared by every such page, so allowing
/// it would allow all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Why a string is not an origin: a reason `--allowed-origin` reports as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginError(&'static str);

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for OriginError {}

impl Origin {
    /// Parses `scheme://host[:port]`. Never panics, whatever the input: request headers are
    /// parsed with it too.
    pub fn parse(text: &str) -> Result<Origin, OriginError> {
        let (scheme, rest) = text.split_once("://").ok_or(OriginError(
            "has no scheme: write it as scheme://host[:port], like https://live.example.com",
        ))?;
        let scheme = if scheme.eq_ignore_ascii_case("https") {
            Scheme::Https
        } else if scheme.eq_ignore_ascii_case("http") {
            Scheme::Http
        } else {
            return Err(OriginError("the scheme must be http or https"));
        };
        if rest.contains('@') {
            return Err(OriginError("must not contain user info (user@)"));
        }
        if rest.contains('/') {
            return Err(OriginError(
                "must not have a path, not even a trailing \"/\": browsers send scheme://host[:port]",
            ));
        }
        if rest.contains(['?', '#']) {
            return Err(OriginError("must not have a query or a fragment"));
        }
        let (host, port) = split_host_port(rest)?;
        if host.is_empty() {
            return Err(OriginError("has no host"));
        }
        if !host.is_ascii() {
            return Err(OriginError(
                "the host is not ASCII: give an internationalised name in its punycode (xn--) form, as browsers send it",
            ));
        }
        let is_ipv6 = host.starts_with('[');
        let is_valid_host = if is_ipv6 {
            host.len() > 2
                && host[1..host.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        } else {
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        };
        if !is_valid_host {
            return Err(OriginError(
                "the host must be a DNS name, an IPv4 address or a bracketed IPv6 address",
            ));
        }
        let port = match port {
            None => scheme.default_port(),
            Some(port) => parse_port(port)?,
        };
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// Splits `host[:port]`, where `host` may be a bracketed IPv6 address with colons of its own.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), OriginError> {
    if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or(OriginError("an IPv6 host is missing its closing \"]\""))?;
        let (host, after) = authority.split_at(close + 1);
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(OriginError("unexpected text after the IPv6 host")),
            },
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn parse_port(port: &str) -> Result<u16, OriginError> {
    const BAD_PORT: OriginError = OriginError("the port must be a number from 1 to 65535");
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD_PORT);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(BAD_PORT),
        Ok(port) => Ok(port),
    }
}

impl FromStr for Origin {
    type Err = OriginError;

    fn from_str(text: &str) -> Result<Origin, OriginError> {
        Origin::parse(text)
    }
}

/// Shown as a browser would send it: the port only when it is not the scheme's default.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.host)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Whether the `Origin` header value `header` is one of `allowed`. A header that does not
/// parse as an origin (`null`, garbage) matches nothing.
pub fn is_allowed(allowed: &[Origin], header: &str) -> bool {
    match Origin::parse(header) {
        Ok(origin) => allowed.contains(&origin),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(text: &str) -> Origin {
        Origin::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn case_and_default_ports_are_normalised() {
        assert_eq!(origin("https://a.example"), origin("https://A.example:443"));
        assert_eq!(origin("HTTPS://A.EXAMPLE"), origin("https://a.example"));
        assert_eq!(origin("http://a.example:80"), origin("http://a.example"));
        assert_eq!(origin("http://[::1]:80"), origin("http://[::1]"));
    }

    #[test]
    fn other_ports_schemes_and_hosts_differ() {
        assert_ne!(
            origin("https://a.example:8443"),
            origin("https://a.example")
        );
        assert_ne!(origin("http://a.example"), origin("https://a.example"));
        // Port 443 is not the default for http.
        assert_ne!(origin("http://a.example:443"), origin("https://a.example"));
        assert_ne!(origin("https://b.example"), origin("https://a.example"));
    }

    #[test]
    fn displays_as_a_browser_sends_it() {
        assert_eq!(
            origin("HTTPS://A.example:443").to_string(),
            "https://a.example"
        );
        assert_eq!(
            origin("http://127.0.0.1:9001").to_string(),
            "http://127.0.0.1:9001"
        );
        assert_eq!(
            origin("https://[::1]:8443").to_string(),
            "https://[::1]:8443"
        );
    }

    #[test]
    fn malformed_origins_are_refused_with_a_reason() {
        for (text, reason) in [
            ("https://a.example/", "path"),
            ("https://a.example/path", "path"),
            ("a.example", "no scheme"),
            ("null", "no scheme"),
            ("ftp://a", "http or https"),
            ("https://", "no host"),
            ("https://:443", "no host"),
            ("https://a:99999", "port"),
            ("https://a:0", "port"),
            ("https://a:", "port"),
            ("https://a:+443", "port"),
            ("https://user@a.example", "user info"),
            ("https://a.example?x", "query"),
            ("https://a.example#top", "fragment"),
            ("https://a b", "host"),
            ("https://bücher.example", "punycode"),
            ("https://[::1", "\"]\""),
            ("https://[::1]x", "after the IPv6"),
            ("https://[]", "host"),
            ("https://[zz]", "host"),
        ] {
            let err = Origin::parse(text).unwrap_err();
            assert!(err.to_string().contains(reason), "{text:?} gave {err}");
        }
    }

    #[test]
    fn headers_compare_as_origins() {
        let allowed = [origin("https://Live.example.com")];
        assert!(is_allowed(&allowed, "https://live.example.com"));
        assert!(is_allowed(&allowed, "https://live.example.com:443"));
        assert!(!is_allowed(&allowed, "https://live.example.com:8443"));
        assert!(!is_allowed(&allowed, "http://live.example.com"));
        assert!(!is_allowed(&allowed, "null"));
        assert!(!is_allowed(&allowed, "https://live.example.com/"));
        assert!(!is_allowed(&allowed, ""));
    }
}
