//! Who a client is: the user its join token proves, or, in open mode, an anonymous visitor.
//!
//! Decided once, before the upgrade (see `connection::decide`), and fixed for the session:
//! every message the client sends carries this identity, so nobody can post as someone else.

use std::sync::Arc;
use std::time::SystemTime;

use crate::http::Request;
use crate::v1::token::{self, Perm};

/// Longest `?name=` an anonymous client may choose, in characters (PROTOCOL §2).
pub const MAX_ANONYMOUS_NAME_CHARS: usize = 32;

/// A connected client's identity.
#[derive(Debug)]
pub struct Identity {
    /// The token's `sub`, or `anon-<connection id>` in open mode.
    pub id: Arc<str>,
    /// The token's `name` (else the `sub`), or the `?name=` an anonymous client asked for.
    pub name: Arc<str>,
    /// Whether a signed token proves `id`.
    pub verified: bool,
    pub perm: Perm,
    /// `{"id":…,"name":…,"verified":…}`, the `from` of every message this client sends,
    /// encoded once here rather than once per message.
    pub from_json: Arc<str>,
}

impl Identity {
    /// The identity a valid token proves.
    pub fn verified(claims: token::Claims) -> Identity {
        let name = claims.name.unwrap_or_else(|| claims.sub.clone());
        Identity::new(claims.sub, name, true, claims.perm)
    }

    /// An open-mode visitor: its own user, named as it asked (cut to
    /// `MAX_ANONYMOUS_NAME_CHARS`) or after its id, with every right.
    pub fn anonymous(connection: u64, asked_name: Option<&str>) -> Identity {
        let id = anonymous_id(connection);
        // Control and invisible formatting characters are dropped first: a name is for
        // showing, and a newline, a right-to-left override or a zero-width space in one is
        // only good for faking lines or other names in someone's log or chat view.
        let shown: String = asked_name
            .unwrap_or_default()
            .chars()
            .filter(|&c| !is_invisible(c))
            .collect();
        let name = match shown.trim() {
            "" => id.clone(),
            name => name.chars().take(MAX_ANONYMOUS_NAME_CHARS).collect(),
        };
        Identity::new(id, name, false, Perm::Post)
    }

    fn new(id: String, name: String, verified: bool, perm: Perm) -> Identity {
        // Put together by hand, without `format!` or a `serde_json::Value`: this runs on every
        // connection thread at its upgrade, and either made it that thread's deepest call (a
        // stack page touched once stays resident for the whole session; see
        // `connection::serve`).
        let mut from_json = String::with_capacity(id.len() + name.len() + 40);
        from_json.push_str(r#"{"id":"#);
        from_json.push_str(&crate::v1::codec::json_string(&id));
        from_json.push_str(r#","name":"#);
        from_json.push_str(&crate::v1::codec::json_string(&name));
        from_json.push_str(if verified {
            r#","verified":true}"#
        } else {
            r#","verified":false}"#
        });
        Identity {
            id: id.into(),
            name: name.into(),
            verified,
            perm,
            from_json: from_json.into(),
        }
    }

    /// The key of per-user accounting (rate limit, connection cap, bans): the `sub` of a
    /// verified client. An anonymous client is its own user, accounted per connection.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.verified.then_some(&self.id)
    }
}

/// Control characters, and the format characters that change how text around them shows
/// (bidirectional overrides and isolates, zero-width characters, line and paragraph
/// separators, the byte-order mark).
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// `anon-<connection>`, with the digits written by hand for the reason given in
/// `Identity::new`: integer formatting was measured to be the deepest call of an upgrade.
fn anonymous_id(connection: u64) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = connection;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut id = String::with_capacity(5 + digits.len() - at);
    id.push_str("anon-");
    id.extend(digits[at..].iter().map(|&d| char::from(d)));
    id
}

/// Why an upgrade is refused before any session starts: `401` or `403`, with a short reason
/// for the response body and the logs (never the token itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: &'static str,
}

/// Identifies the client behind an upgrade request for `room`.
///
/// Without secrets (open mode) everyone is an anonymous visitor. With them, the request must
/// carry a valid token: `?token=` (browsers cannot set headers on a WebSocket), which wins,
/// or `Authorization: Bearer`.
pub fn identify(
    request: &Request,
    room: &str,
    secrets: &[String],
    connection: u64,
    now: SystemTime,
) -> Result<Identity, Refused> {
    if secrets.is_empty() {
        let name = request.query_param("name");
        return Ok(Identity::anonymous(connection, name.as_deref()));
    }
    let from_query = request.query_param("token");
    let from_header = request
        .header("Authorization")
        .and_then(crate::http::endpoints::bearer_token)
        .map(str::to_string);
    let Some(token) = from_query.or(from_header) else {
        return Err(Refused {
            status: 401,
            reason: "missing",
        });
    };
    let secrets: Vec<&[u8]> = secrets.iter().map(|secret| secret.as_bytes()).collect();
    match token::verify(&token, &secrets, room, now) {
        Ok(claims) => Ok(Identity::verified(claims)),
        Err(rejection) => Err(Refused {
            status: rejection.status(),
            reason: rejection.reason(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anonymous_name_is_trimmed_cut_to_32_characters_or_the_id() {
        assert_eq!(&*Identity::anonymous(7, None).name, "anon-7");
        assert_eq!(&*Identity::anonymous(7, Some("  ")).name, "anon-7");
        assert_eq!(&*Identity::anonymous(7, Some(" Ann ")).name, "Ann");
        assert_eq!(&*Identity::anonymous(7, Some("A\nn\u{0}n")).name, "Ann");
        assert_eq!(&*Identity::anonymous(7, Some("\u{1}")).name, "anon-7");
        assert_eq!(&*Identity::anonymous(7, Some("\u{0} Ann")).name, "Ann");
        assert_eq!(
            &*Identity::anonymous(7, Some("Ann\u{202E}\u{200B}")).name,
            "Ann"
        );
        let long = "é".repeat(40);
        assert_eq!(
            Identity::anonymous(7, Some(&long)).name.chars().count(),
            MAX_ANONYMOUS_NAME_CHARS
        );
        let anonymous = Identity::anonymous(7, Some("Ann"));
        assert!(!anonymous.verified);
        assert_eq!(anonymous.user(), None);
        assert_eq!(
            &*anonymous.from_json,
            r#"{"id":"anon-7","name":"Ann","verified":false}"#
        );
    }

    #[test]
    fn anonymous_ids_are_decimal() {
        for n in [0, 7, 10, 12345, u64::MAX] {
            assert_eq!(anonymous_id(n), format!("anon-{n}"));
        }
    }

    #[test]
    fn a_name_is_escaped_in_the_encoded_sender() {
        let identity = Identity::anonymous(1, Some("a\"b</script>"));
        let from: serde_json::Value = serde_json::from_str(&identity.from_json).unwrap();
        assert_eq!(from["name"], "a\"b</script>");
    }
}
