//! Join tokens (`PROTOCOL.md` §2): HS256 JWTs that the application's backend mints and a client
//! presents with its upgrade, checked once, before the `101`.
//!
//! The upgrade path calls `verify` with the token from `?token=` or `Authorization: Bearer`,
//! the secrets from `Config::token_secrets` (current first, then the previous one while
//! rotating) and the room of the URL. A `Claims` says who the client is and what it may do; a
//! `Rejection` says which status to answer (401 for anything wrong with the token itself, 403
//! for a good token that does not open this room) and gives a short label for the body, the
//! log and a metric. Neither ever holds the token.
//!
//! The checks follow RFC 7519 and the pitfalls RFC 8725 lists: the algorithm is pinned to
//! HS256 whatever the header says (`none` and algorithm confusion are refused), the signature
//! is compared in constant time before any claim is read, and every segment has exactly one
//! spelling (strict base64url, no padding). Attacker-controlled JSON is never parsed into a
//! tree: the header, and the payload once signed, are read as one flat object whose values
//! stay raw text (`serde_json`'s `RawValue` skips nested values without recursing), and only
//! the few claims we use are decoded, each into its own type. So a deeply nested header cannot
//! exhaust a connection thread's 64 KiB stack, and a type mismatch is an error, never a guess.
//!
//! Duplicate names in the header or the claims: the last one wins (as `serde_json` and most
//! JWT libraries read them). Only a holder of the secret can sign claims, so a duplicate there
//! is the backend's own doing; in the header, only `alg`, `typ` and `crit` matter, and the
//! signature check that follows still pins the algorithm.

mod base64url;

use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::value::RawValue;
use sha2::Sha256;

/// The longest token looked at. A token's claims are a few short strings and numbers (about
/// 250 bytes in all); anything near this size is an attack, refused before any decoding work.
/// It also fits easily in the 16 KiB request head that carries it.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// How far `exp` and `nbf` may be off, in seconds: the clocks of the backend that mints and of
/// roomcast are never exactly in step.
pub const LEEWAY_SECS: f64 = 30.0;
/// The longest `sub` (a user id): far beyond UUIDs and database ids, short enough to keep in
/// every connection and every message's `from`.
pub const MAX_SUB_BYTES: usize = 128;
/// The longest display name (`name`), in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 64;
/// The shortest secret accepted: HS256's key should be at least as long as its 32-byte output
/// (RFC 7518 §3.2), and a shorter one could be found by guessing offline from one token.
pub const MIN_SECRET_BYTES: usize = 32;
/// The `room` claim of a token that opens every room.
pub const ANY_ROOM: &str = "*";
/// The length of an HMAC-SHA256 signature.
const SIGNATURE_BYTES: usize = 32;
/// The header `mint` writes: the one RFC 7519 §3.1 shows, as PyJWT and jsonwebtoken write it.
const MINT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// What a valid token grants (the `perm` claim; `post` when it is absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// Receive only.
    Read,
    /// Receive and react.
    React,
    /// Everything: receive, react and publish.
    Post,
}

impl Perm {
    /// The claim's spelling: `"read"`, `"react"` or `"post"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::React => "react",
            Perm::Post => "post",
        }
    }

    /// The permission a `perm` claim spells; `None` for anything else (case matters).
    pub fn parse(text: &str) -> Option<Perm> {
        [Perm::Read, Perm::React, Perm::Post]
            .into_iter()
            .find(|perm| perm.as_str() == text)
    }

    /// Whether it may send messages (a v1 `publish`, or a plain client's data message).
    pub const fn can_post(self) -> bool {
        matches!(self, Perm::Post)
    }

    /// Whether it may send a v1 `react`.
    pub const fn can_react(self) -> bool {
        matches!(self, Perm::React | Perm::Post)
    }
}

/// What a valid token says about its holder.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// The user id: 1 to `MAX_SUB_BYTES` bytes. The per-user limits count by it.
    pub sub: String,
    /// The display name, at most `MAX_NAME_BYTES` bytes; `None` when absent or empty (the
    /// client is then shown by its `sub`, see `display_name`).
    pub name: Option<String>,
    /// The room it opens: a room name, or `ANY_ROOM`.
    pub room: String,
    pub perm: Perm,
    /// Expiry, in seconds since the Unix epoch (a fraction allowed). Any finite number: one far
    /// in the future (even `1e300`) is a token that never expires in practice, so convert it
    /// with care (`Duration::from_secs_f64` panics on it).
    pub exp: f64,
}

impl Claims {
    /// The name to show for this user: `name`, or the `sub` without one.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.sub)
    }
}

/// Why a token was refused. `status()` is the HTTP status to answer; `reason()` a short
/// static label for the response body, the log and a metric's label. Neither, nor `Display`,
/// ever contains any part of the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No token, or an empty one, where one is required.
    Missing,
    /// Longer than `MAX_TOKEN_BYTES`.
    TooLong,
    /// Not three segments of strict base64url, or a header or claims that are not one JSON
    /// object.
    Malformed,
    /// The header's `alg` is missing or anything but exactly `HS256` (`none` included).
    BadAlgorithm,
    /// A header `typ` other than `JWT`, or a `crit` header (an extension we do not speak).
    BadHeader,
    /// The signature is not 32 bytes, or no secret produced it.
    BadSignature,
    /// A required claim (`sub`, `exp`, `room`) is absent.
    MissingClaim(&'static str),
    /// A claim has the wrong type or an invalid value (the claim's name).
    BadClaim(&'static str),
    /// `exp` is more than `LEEWAY_SECS` in the past.
    Expired,
    /// `nbf` is more than `LEEWAY_SECS` in the future.
    NotYetValid,
    /// A valid token for another room.
    WrongRoom,
    /// A valid token whose user is banned from the room. `verify` never returns it: the
    /// upgrade path's moderation check does, so every refusal maps to its status here.
    Banned,
}

impl Rejection {
    /// Every `reason()`, e.g. to export a metric's label values before any refusal.
    pub const REASONS: [&'static str; 12] = [
        "missing",
        "too_long",
        "malformed",
        "bad_alg",
        "bad_header",
        "bad_signature",
        "missing_claim",
        "bad_claim",
        "expired",
        "not_yet_valid",
        "wrong_room",
        "banned",
    ];

    /// `401` for anything wrong with the token itself, `403` for a good token that does not
    /// open this room.
    pub const fn status(self) -> u16 {
        match self {
            Rejection::WrongRoom | Rejection::Banned => 403,
            _ => 401,
        }
    }

    /// A short label, one of `REASONS`.
    pub const fn reason(self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::TooLong => "too_long",
            Rejection::Malformed => "malformed",
            Rejection::BadAlgorithm => "bad_alg",
            Rejection::BadHeader => "bad_header",
            Rejection::BadSignature => "bad_signature",
            Rejection::MissingClaim(_) => "missing_claim",
            Rejection::BadClaim(_) => "bad_claim",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongRoom => "wrong_room",
            Rejection::Banned => "banned",
        }
    }

    /// The claim at fault, for `MissingClaim` and `BadClaim`.
    pub const fn claim(self) -> Option<&'static str> {
        match self {
            Rejection::MissingClaim(claim) | Rejection::BadClaim(claim) => Some(claim),
            _ => None,
        }
    }
}

/// The reason, and the claim at fault when there is one: `bad_claim: name`.
impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.claim() {
            Some(claim) => write!(f, "{}: {claim}", self.reason()),
            None => f.write_str(self.reason()),
        }
    }
}

impl std::error::Error for Rejection {}

/// Checks `token` for a client joining `room` at `now`: signed with one of `secrets` (tried in
/// order: the current one, then the previous one while rotating), well-formed, in date (with
/// `LEEWAY_SECS` either way), and for `room` or any room. Everything wrong with the token
/// itself comes before the room: an expired token for another room is `Expired`, not
/// `WrongRoom`. With no secrets nothing verifies.
pub fn verify(
    token: &str,
    secrets: &[&[u8]],
    room: &str,
    now: SystemTime,
) -> Result<Claims, Rejection> {
    if token.is_empty() {
        return Err(Rejection::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::TooLong);
    }
    let mut segments = token.split('.');
    let (Some(header_text), Some(payload_text), Some(signature_text), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(Rejection::Malformed);
    };
    let header = base64url::decode(header_text).ok_or(Rejection::Malformed)?;
    let payload = base64url::decode(payload_text).ok_or(Rejection::Malformed)?;
    let signature = base64url::decode(signature_text).ok_or(Rejection::Malformed)?;

    // The header first, so a backend that signs with another algorithm learns that (rather
    // than "bad signature"); it is a flat read of at most a few KiB.
    check_header(&header)?;
    if signature.len() != SIGNATURE_BYTES {
        return Err(Rejection::BadSignature);
    }
    // The signing input is the two segments as sent, with their dot (RFC 7515 §5.2).
    let signing_input = &token.as_bytes()[..header_text.len() + 1 + payload_text.len()];
    if !secrets
        .iter()
        .any(|secret| is_signed_by(secret, signing_input, &signature))
    {
        return Err(Rejection::BadSignature);
    }

    // Only now, signed, are the claims read.
    let claims = read_object(&payload).ok_or(Rejection::Malformed)?;
    let sub = string_claim(&claims, "sub")?.ok_or(Rejection::MissingClaim("sub"))?;
    if !is_valid_sub(&sub) {
        return Err(Rejection::BadClaim("sub"));
    }
    let exp = number_claim(&claims, "exp")?.ok_or(Rejection::MissingClaim("exp"))?;
    let nbf = number_claim(&claims, "nbf")?;
    // `iat` is only read for its type: a token issued "in the future" by a fast clock is
    // still one the backend meant to issue, and `nbf` is the claim for "not before".
    number_claim(&claims, "iat")?;
    let token_room = string_claim(&claims, "room")?.ok_or(Rejection::MissingClaim("room"))?;
    if !is_valid_room_claim(&token_room) {
        return Err(Rejection::BadClaim("room"));
    }
    let name = string_claim(&claims, "name")?.filter(|name| !name.is_empty());
    if name.as_deref().is_some_and(|name| !is_valid_name(name)) {
        return Err(Rejection::BadClaim("name"));
    }
    let perm = match string_claim(&claims, "perm")? {
        None => Perm::Post,
        Some(text) => Perm::parse(&text).ok_or(Rejection::BadClaim("perm"))?,
    };

    // JSON numbers are finite, so neither sum can be NaN; a huge `exp` stays huge.
    let now = unix_seconds(now);
    if now > exp + LEEWAY_SECS {
        return Err(Rejection::Expired);
    }
    if nbf.is_some_and(|nbf| now + LEEWAY_SECS < nbf) {
        return Err(Rejection::NotYetValid);
    }
    if token_room != ANY_ROOM && token_room != room {
        return Err(Rejection::WrongRoom);
    }
    Ok(Claims {
        sub,
        name,
        room: token_room,
        perm,
        exp,
    })
}

/// Mints an HS256 token for `claims` (a JSON object) with the header `{"alg":"HS256","typ":
/// "JWT"}`: for `roomcast token`, the load tool and tests. It signs whatever it is given, so
/// tests can make tokens with wrong claims; `roomcast token` checks its claims first.
pub fn mint(secret: &[u8], claims: &serde_json::Value) -> String {
    let payload = serde_json::to_string(claims)
        .expect("a serde_json::Value always serialises: its keys are strings");
    let signing_input = format!(
        "{}.{}",
        base64url::encode(MINT_HEADER.as_bytes()),
        base64url::encode(payload.as_bytes())
    );
    let signature = hmac(secret)
        .chain_update(signing_input.as_bytes())
        .finalize()
        .into_bytes();
    format!("{signing_input}.{}", base64url::encode(&signature))
}

/// Whether `sub` is a valid user id: 1 to `MAX_SUB_BYTES` bytes.
pub fn is_valid_sub(sub: &str) -> bool {
    (1..=MAX_SUB_BYTES).contains(&sub.len())
}

/// Whether `name` is a valid display name: at most `MAX_NAME_BYTES` bytes (empty counts as
/// absent).
pub fn is_valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES
}

/// Whether `room` is a valid `room` claim: `ANY_ROOM`, or a room name a URL can carry.
pub fn is_valid_room_claim(room: &str) -> bool {
    room == ANY_ROOM || crate::relay::hub::is_valid_room_name(room)
}

/// A JSON object's members, their values left as raw JSON text. `None` for bytes that are
/// not UTF-8 or not exactly one JSON object.
fn read_object(bytes: &[u8]) -> Option<HashMap<String, &RawValue>> {
    serde_json::from_str(std::str::from_utf8(bytes).ok()?).ok()
}

/// Refuses a header that is not a JSON object, whose `alg` is not exactly `HS256`, whose
/// `typ` is not `JWT` (any case, RFC 7519 §5.1), or that has `crit` (RFC 7515 §4.1.11: a
/// recipient must refuse extensions it does not understand, and we understand none).
fn check_header(bytes: &[u8]) -> Result<(), Rejection> {
    let header = read_object(bytes).ok_or(Rejection::Malformed)?;
    if header
        .get("alg")
        .and_then(|raw| decode_string(raw))
        .as_deref()
        != Some("HS256")
    {
        return Err(Rejection::BadAlgorithm);
    }
    if let Some(raw) = header.get("typ") {
        match decode_string(raw) {
            Some(typ) if typ.eq_ignore_ascii_case("JWT") => {}
            _ => return Err(Rejection::BadHeader),
        }
    }
    if header.contains_key("crit") {
        return Err(Rejection::BadHeader);
    }
    Ok(())
}

/// Whether `signature` is the HMAC-SHA256 of `signing_input` under `secret`, compared in
/// constant time (`verify_slice`), so response timing tells a forger nothing about how many
/// leading bytes it got right.
fn is_signed_by(secret: &[u8], signing_input: &[u8], signature: &[u8]) -> bool {
    hmac(secret)
        .chain_update(signing_input)
        .verify_slice(signature)
        .is_ok()
}

fn hmac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length")
}

/// One raw JSON value as a string, or `None` for any other type. It never recurses: a nested
/// value is refused by its first byte.
fn decode_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str(raw.get()).ok()
}

/// One raw JSON value as a number, or `None` for any other type or a number beyond `f64`.
fn decode_number(raw: &RawValue) -> Option<f64> {
    serde_json::from_str(raw.get()).ok()
}

/// A string claim: `None` when absent, `BadClaim` when it is anything but a string (`null`
/// included).
fn string_claim(
    claims: &HashMap<String, &RawValue>,
    name: &'static str,
) -> Result<Option<String>, Rejection> {
    claims
        .get(name)
        .map(|raw| decode_string(raw).ok_or(Rejection::BadClaim(name)))
        .transpose()
}

/// A NumericDate claim (RFC 7519 §2: a JSON number, a fraction allowed): `None` when absent,
/// `BadClaim` for a string, boolean, null, or a number beyond `f64` (`1e400`).
fn number_claim(
    claims: &HashMap<String, &RawValue>,
    name: &'static str,
) -> Result<Option<f64>, Rejection> {
    claims
        .get(name)
        .map(|raw| decode_number(raw).ok_or(Rejection::BadClaim(name)))
        .transpose()
}

/// `now` in seconds since the Unix epoch; negative before it (a clock set to 1969 still
/// compares correctly).
fn unix_seconds(now: SystemTime) -> f64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::time::Duration;

    const SECRET: &[u8] = b"the-current-secret-of-32-bytes-or-more";
    const PREVIOUS: &[u8] = b"the-previous-secret-of-32-bytes-or-more";
    const OTHER: &[u8] = b"a-secret-roomcast-has-never-been-given";
    /// The tests' clock: 2025-11-27, in seconds since the epoch.
    const NOW: f64 = 1_764_230_000.0;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(NOW)
    }

    /// A valid set of claims for the room `stage`, an hour from expiry.
    fn claims() -> Value {
        json!({"sub": "u42", "room": "stage", "exp": NOW + 3600.0})
    }

    /// `claims()` with `claim` set to `value`, or removed when `value` is `None`.
    fn with(claim: &str, value: Option<Value>) -> Value {
        let mut claims = claims();
        let object = claims.as_object_mut().expect("claims() is an object");
        match value {
            Some(value) => object.insert(claim.to_string(), value),
            None => object.remove(claim),
        };
        claims
    }

    /// Verifies for `stage` with the current secret, at `NOW`.
    fn check(token: &str) -> Result<Claims, Rejection> {
        verify(token, &[SECRET], "stage", now())
    }

    fn check_claims(claims: &Value) -> Result<Claims, Rejection> {
        check(&mint(SECRET, claims))
    }

    /// A token whose header and payload are these bytes exactly, correctly signed with
    /// `SECRET`: what a forger with the secret could send, to test what lies past the
    /// signature.
    fn signed(header: &[u8], payload: &[u8]) -> String {
        let signing_input = format!(
            "{}.{}",
            base64url::encode(header),
            base64url::encode(payload)
        );
        let signature = hmac(SECRET)
            .chain_update(signing_input.as_bytes())
            .finalize()
            .into_bytes();
        format!("{signing_input}.{}", base64url::encode(&signature))
    }

    fn signed_with_header(header: &str) -> String {
        signed(header.as_bytes(), claims().to_string().as_bytes())
    }

    fn signed_payload(payload: &str) -> String {
        signed(MINT_HEADER.as_bytes(), payload.as_bytes())
    }

    /// The token's three segments.
    fn segments(token: &str) -> [&str; 3] {
        let parts: Vec<&str> = token.split('.').collect();
        parts.try_into().expect("a minted token has three segments")
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let claims = check(&mint(SECRET, &claims())).unwrap();
        assert_eq!(
            claims,
            Claims {
                sub: "u42".into(),
                name: None,
                room: "stage".into(),
                perm: Perm::Post,
                exp: NOW + 3600.0,
            }
        );
        assert_eq!(claims.display_name(), "u42");
        let token = mint(SECRET, &claims_json_with_everything());
        let [header, _, signature] = segments(&token);
        assert_eq!(base64url::decode(header).unwrap(), MINT_HEADER.as_bytes());
        assert_eq!(base64url::decode(signature).unwrap().len(), 32);
        let claims = check(&token).unwrap();
        assert_eq!(claims.name.as_deref(), Some("Ann"));
        assert_eq!(claims.display_name(), "Ann");
        assert_eq!(claims.perm, Perm::React);
    }

    fn claims_json_with_everything() -> Value {
        json!({
            "sub": "u42", "name": "Ann", "room": "stage", "perm": "react",
            "iat": NOW, "nbf": NOW, "exp": NOW + 60.0,
        })
    }

    /// RFC 8725 §2.1 and §3.1: the algorithm is ours to choose, never the token's. `none`
    /// in any spelling, another HMAC, an RSA algorithm (the confusion where a public key is
    /// used as an HMAC secret), or no `alg` at all are refused even when signed correctly
    /// with HS256.
    #[test]
    fn any_alg_but_hs256_is_refused() {
        for alg in [
            json!("none"),
            json!("None"),
            json!("NONE"),
            json!("nOnE"),
            json!("HS512"),
            json!("HS384"),
            json!("RS256"),
            json!("ES256"),
            json!("hs256"),
            json!("HS256 "),
            json!(""),
            Value::Null,
            json!(256),
            json!(["HS256"]),
        ] {
            let header = json!({"alg": alg, "typ": "JWT"}).to_string();
            let rejection = check(&signed_with_header(&header)).unwrap_err();
            assert_eq!(rejection, Rejection::BadAlgorithm, "{alg}");
            assert_eq!(rejection.status(), 401);
        }
        assert_eq!(
            check(&signed_with_header(r#"{"typ":"JWT"}"#)),
            Err(Rejection::BadAlgorithm)
        );
        // The classic forgery: `none` and an empty signature.
        for alg in ["none", "None", "NONE"] {
            let header = base64url::encode(format!(r#"{{"alg":"{alg}"}}"#).as_bytes());
            let payload = base64url::encode(claims().to_string().as_bytes());
            assert_eq!(
                check(&format!("{header}.{payload}.")),
                Err(Rejection::BadAlgorithm)
            );
        }
    }

    #[test]
    fn typ_may_be_jwt_in_any_case_and_crit_is_refused() {
        for header in [
            r#"{"alg":"HS256"}"#,
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"HS256","typ":"jwt"}"#,
            r#"{"alg":"HS256","kid":"2025-11","x5u":"ignored"}"#,
            r#" { "alg" : "HS256" } "#,
            // JSON escapes are read as JSON.
            r#"{"\u0061lg":"HS\u0032\u00356"}"#,
        ] {
            assert!(check(&signed_with_header(header)).is_ok(), "{header}");
        }
        for header in [
            r#"{"alg":"HS256","typ":"JOSE"}"#,
            r#"{"alg":"HS256","typ":"at+jwt"}"#,
            r#"{"alg":"HS256","typ":1}"#,
            r#"{"alg":"HS256","typ":null}"#,
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#,
        ] {
            assert_eq!(
                check(&signed_with_header(header)),
                Err(Rejection::BadHeader),
                "{header}"
            );
        }
    }

    #[test]
    fn a_signature_we_did_not_make_is_refused() {
        let token = mint(SECRET, &claims());
        let [header, payload, signature] = segments(&token);
        let bytes = base64url::decode(signature).unwrap();

        // The right length, one bit off; and signed with another secret.
        let mut flipped = bytes.clone();
        flipped[31] ^= 1;
        let flipped = format!("{header}.{payload}.{}", base64url::encode(&flipped));
        assert_eq!(check(&flipped), Err(Rejection::BadSignature));
        assert_eq!(check(&mint(OTHER, &claims())), Err(Rejection::BadSignature));

        // Truncated, empty, or one byte too long: not an HMAC-SHA256 at all.
        for bytes in [
            &bytes[..31],
            &bytes[..16],
            &bytes[..0],
            &[&bytes[..], &[0]].concat(),
        ] {
            let token = format!("{header}.{payload}.{}", base64url::encode(bytes));
            assert_eq!(
                check(&token),
                Err(Rejection::BadSignature),
                "{} bytes",
                bytes.len()
            );
        }

        // Another header or payload under this signature.
        let other = mint(SECRET, &with("room", Some(json!("*"))));
        let [other_header, other_payload, _] = segments(&other);
        assert_eq!(
            check(&format!("{header}.{other_payload}.{signature}")),
            Err(Rejection::BadSignature)
        );
        let _ = other_header;
        let typ_lower = base64url::encode(br#"{"alg":"HS256","typ":"jwt"}"#);
        assert_eq!(
            check(&format!("{typ_lower}.{payload}.{signature}")),
            Err(Rejection::BadSignature)
        );
    }

    /// One token, one spelling: the signature padded with `=`, or written in standard base64
    /// (`+` and `/` for `-` and `_`), is malformed even though it decodes to the right bytes
    /// in a lenient decoder.
    #[test]
    fn a_padded_or_standard_base64_signature_is_malformed() {
        let token = mint(SECRET, &claims());
        assert_eq!(check(&format!("{token}=")), Err(Rejection::Malformed));
        assert_eq!(check(&format!("{token}==")), Err(Rejection::Malformed));
        // A token whose signature has a `-` or `_`, for the standard-alphabet spelling.
        let token = (0..)
            .map(|n| mint(SECRET, &with("sub", Some(json!(format!("u{n}"))))))
            .find(|token| segments(token)[2].contains(['-', '_']))
            .expect("about 1 signature in 2 has a - or _");
        assert!(check(&token).is_ok());
        let standard = token.replace('-', "+").replace('_', "/");
        assert_eq!(check(&standard), Err(Rejection::Malformed));
        // And the header or payload padded.
        let [header, payload, signature] = segments(&token);
        for token in [
            format!("{header}=.{payload}.{signature}"),
            format!("{header}.{payload}=.{signature}"),
            format!("{header}.{payload}.{signature} "),
        ] {
            assert_eq!(check(&token), Err(Rejection::Malformed), "{token}");
        }
    }

    #[test]
    fn anything_but_three_segments_is_malformed() {
        let token = mint(SECRET, &claims());
        let [header, payload, signature] = segments(&token);
        for token in [
            "x".to_string(),
            ".".to_string(),
            "..".to_string(),
            "...".to_string(),
            header.to_string(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.{signature}."),
            format!("{header}.{payload}.{signature}.{signature}"),
            format!("{header}..{payload}.{signature}"),
            format!(".{header}.{payload}.{signature}"),
        ] {
            assert_eq!(check(&token), Err(Rejection::Malformed), "{token}");
        }
        assert_eq!(check(""), Err(Rejection::Missing));
        assert_eq!(check("").unwrap_err().status(), 401);
    }

    #[test]
    fn a_header_or_payload_that_is_not_one_json_object_is_malformed() {
        for header in [
            "not json",
            "[]",
            "\"HS256\"",
            r#"{"alg":"HS256"} {}"#,
            r#"{"alg":"HS256""#,
            "",
        ] {
            assert_eq!(
                check(&signed_with_header(header)),
                Err(Rejection::Malformed),
                "{header:?}"
            );
        }
        for payload in ["not json", "[1]", "null", "", r#"{"sub":"u42"} x"#] {
            assert_eq!(
                check(&signed_payload(payload)),
                Err(Rejection::Malformed),
                "{payload:?}"
            );
        }
        // Bytes that are not UTF-8, in either place.
        assert_eq!(
            check(&signed(b"{\"alg\":\"HS256\",\"x\":\"\xff\"}", b"{}")),
            Err(Rejection::Malformed)
        );
        let payload = [
            &claims().to_string().as_bytes()[..1],
            b"\"x\":\"\xff\",",
            &claims().to_string().as_bytes()[1..],
        ]
        .concat();
        assert_eq!(
            check(&signed(MINT_HEADER.as_bytes(), &payload)),
            Err(Rejection::Malformed)
        );
    }

    /// The claims are not read before the signature is checked: a payload that would be a
    /// bad claim, or not JSON at all, under a wrong signature is a bad signature.
    #[test]
    fn the_signature_is_checked_before_the_claims_are_read() {
        for payload in ["not json", r#"{"sub":""}"#, r#"{"exp":"soon"}"#] {
            let token = signed_payload(payload);
            let [header, payload, _] = segments(&token);
            let forged = format!("{header}.{payload}.{}", base64url::encode(&[7; 32]));
            assert_eq!(check(&forged), Err(Rejection::BadSignature), "{payload}");
        }
    }

    #[test]
    fn a_token_over_4096_bytes_is_refused_before_decoding() {
        // The largest token that fits verifies; one byte more of claims is too long.
        let padded = |len: usize| mint(SECRET, &with("pad", Some(json!("x".repeat(len)))));
        let fits = (0..MAX_TOKEN_BYTES)
            .map(padded)
            .take_while(|token| token.len() <= MAX_TOKEN_BYTES)
            .last()
            .unwrap();
        assert!(fits.len() >= MAX_TOKEN_BYTES - 2, "{}", fits.len());
        assert!(check(&fits).is_ok());
        let over = (0..MAX_TOKEN_BYTES)
            .map(padded)
            .find(|token| token.len() > MAX_TOKEN_BYTES)
            .unwrap();
        assert_eq!(check(&over), Err(Rejection::TooLong));
        // Garbage is refused by its length alone, whatever it holds.
        assert_eq!(check(&"=".repeat(4097)), Err(Rejection::TooLong));
        assert_eq!(check(&"a.".repeat(1 << 20)), Err(Rejection::TooLong));
    }

    #[test]
    fn exp_is_required_a_number_and_has_30_seconds_of_leeway() {
        for (exp, expected) in [
            (NOW + 3600.0, Ok(())),
            (NOW, Ok(())),
            (NOW - 29.0, Ok(())),
            (NOW - 29.5, Ok(())),
            (NOW - 30.0, Ok(())),
            (NOW - 30.5, Err(Rejection::Expired)),
            (NOW - 31.0, Err(Rejection::Expired)),
            (NOW - 86400.0, Err(Rejection::Expired)),
            (0.0, Err(Rejection::Expired)),
            (-1.0, Err(Rejection::Expired)),
            (-1e300, Err(Rejection::Expired)),
            // Decided: a huge `exp` is a token that never expires in practice, as PyJWT and
            // jsonwebtoken read it. It must not panic or wrap around.
            (1e300, Ok(())),
            (f64::MAX, Ok(())),
        ] {
            let result = check_claims(&with("exp", Some(json!(exp))));
            assert_eq!(
                result.as_ref().map(|_| ()).map_err(|r| *r),
                expected,
                "exp {exp}"
            );
            if let Ok(claims) = result {
                assert_eq!(claims.exp, exp);
            }
        }
        assert_eq!(
            check_claims(&with("exp", None)),
            Err(Rejection::MissingClaim("exp"))
        );
        for exp in [
            json!("1764233600"),
            json!(true),
            Value::Null,
            json!([1]),
            json!({"at": 1}),
        ] {
            assert_eq!(
                check_claims(&with("exp", Some(exp.clone()))),
                Err(Rejection::BadClaim("exp")),
                "{exp}"
            );
        }
        // Integers beyond u64 are numbers too; beyond f64 (only writable as raw JSON) they are
        // a bad claim, not an infinity.
        assert!(check(&signed_payload(
            r#"{"sub":"u42","room":"stage","exp":100000000000000000000000}"#
        ))
        .is_ok());
        for exp in ["1e400", "-1e400"] {
            let payload = format!(r#"{{"sub":"u42","room":"stage","exp":{exp}}}"#);
            assert_eq!(
                check(&signed_payload(&payload)),
                Err(Rejection::BadClaim("exp")),
                "{exp}"
            );
        }
    }

    #[test]
    fn nbf_and_iat_are_optional_numbers() {
        for (nbf, expected) in [
            (NOW - 3600.0, Ok(())),
            (NOW + 29.0, Ok(())),
            (NOW + 30.0, Ok(())),
            (NOW + 30.5, Err(Rejection::NotYetValid)),
            (NOW + 31.0, Err(Rejection::NotYetValid)),
            (1e300, Err(Rejection::NotYetValid)),
        ] {
            let result = check_claims(&with("nbf", Some(json!(nbf))));
            assert_eq!(result.map(|_| ()), expected, "nbf {nbf}");
        }
        assert_eq!(
            check_claims(&with("nbf", Some(json!("now")))),
            Err(Rejection::BadClaim("nbf"))
        );
        assert!(check_claims(&with("iat", Some(json!(NOW - 10.5)))).is_ok());
        // Issued "in the future" by a clock that runs fast: still valid (see `verify`).
        assert!(check_claims(&with("iat", Some(json!(NOW + 3600.0)))).is_ok());
        for iat in [json!("now"), Value::Null, json!(false)] {
            assert_eq!(
                check_claims(&with("iat", Some(iat.clone()))),
                Err(Rejection::BadClaim("iat")),
                "{iat}"
            );
        }
    }

    #[test]
    fn sub_is_required_and_1_to_128_bytes() {
        assert_eq!(
            check_claims(&with("sub", None)),
            Err(Rejection::MissingClaim("sub"))
        );
        for sub in [
            json!(""),
            json!("x".repeat(129)),
            json!(42),
            Value::Null,
            json!(["u42"]),
        ] {
            assert_eq!(
                check_claims(&with("sub", Some(sub.clone()))),
                Err(Rejection::BadClaim("sub")),
                "{sub}"
            );
        }
        for sub in ["x", &"x".repeat(128), &"é".repeat(64), "user@example.com"] {
            let claims = check_claims(&with("sub", Some(json!(sub)))).unwrap();
            assert_eq!(claims.sub, sub);
        }
    }

    /// A valid token for room A never admits to room B (403, not 401: the token is good),
    /// and `*` admits to any room.
    #[test]
    fn the_room_claim_opens_its_room_or_every_room() {
        let token = mint(SECRET, &claims());
        for room in ["other", "Stage", "stage2", "lobby"] {
            let rejection = verify(&token, &[SECRET], room, now()).unwrap_err();
            assert_eq!(rejection, Rejection::WrongRoom, "{room}");
            assert_eq!(
                (rejection.status(), rejection.reason()),
                (403, "wrong_room")
            );
        }
        let any = mint(SECRET, &with("room", Some(json!("*"))));
        for room in ["stage", "lobby", "a.b", "x"] {
            assert_eq!(verify(&any, &[SECRET], room, now()).unwrap().room, "*");
        }
        assert_eq!(
            check_claims(&with("room", None)),
            Err(Rejection::MissingClaim("room"))
        );
        for room in [
            json!(""),
            json!("a/b"),
            json!(".."),
            json!("**"),
            json!("stage*"),
            json!("x".repeat(65)),
            json!(1),
            Value::Null,
        ] {
            assert_eq!(
                check_claims(&with("room", Some(room.clone()))),
                Err(Rejection::BadClaim("room")),
                "{room}"
            );
        }
    }

    /// Everything wrong with the token itself is a 401 before the room is looked at.
    #[test]
    fn a_bad_token_for_another_room_is_a_401() {
        let expired = mint(SECRET, &with("exp", Some(json!(NOW - 3600.0))));
        assert_eq!(
            verify(&expired, &[SECRET], "other", now()),
            Err(Rejection::Expired)
        );
        let unsigned = mint(OTHER, &claims());
        assert_eq!(
            verify(&unsigned, &[SECRET], "other", now()),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn perm_is_one_of_three_and_defaults_to_post() {
        for (text, perm) in [
            ("read", Perm::Read),
            ("react", Perm::React),
            ("post", Perm::Post),
        ] {
            let claims = check_claims(&with("perm", Some(json!(text)))).unwrap();
            assert_eq!(claims.perm, perm);
            assert_eq!((Perm::parse(text), perm.as_str()), (Some(perm), text));
        }
        assert_eq!(check_claims(&claims()).unwrap().perm, Perm::Post);
        for perm in [
            json!("admin"),
            json!("POST"),
            json!("Read"),
            json!(""),
            json!(1),
            Value::Null,
            json!(["post"]),
        ] {
            assert_eq!(
                check_claims(&with("perm", Some(perm.clone()))),
                Err(Rejection::BadClaim("perm")),
                "{perm}"
            );
        }
        assert_eq!(
            [Perm::Read, Perm::React, Perm::Post].map(|p| (p.can_react(), p.can_post())),
            [(false, false), (true, false), (true, true)]
        );
    }

    #[test]
    fn name_is_optional_and_at_most_64_bytes() {
        // 16 four-byte emoji: 64 bytes, 16 characters.
        let party = "🎉".repeat(16);
        let claims = check_claims(&with("name", Some(json!(party)))).unwrap();
        assert_eq!(claims.name.as_deref(), Some(party.as_str()));
        for name in [
            json!("x".repeat(65)),
            json!(format!("{party}x")),
            json!(5),
            Value::Null,
        ] {
            assert_eq!(
                check_claims(&with("name", Some(name.clone()))),
                Err(Rejection::BadClaim("name")),
                "{name}"
            );
        }
        let empty = check_claims(&with("name", Some(json!("")))).unwrap();
        assert_eq!((empty.name.as_deref(), empty.display_name()), (None, "u42"));
    }

    /// While the secret rotates, tokens signed with the previous secret still verify, and a
    /// token signed with neither never does.
    #[test]
    fn the_previous_secret_verifies_while_rotating() {
        let both: &[&[u8]] = &[SECRET, PREVIOUS];
        for secret in [SECRET, PREVIOUS] {
            let token = mint(secret, &claims());
            assert!(verify(&token, both, "stage", now()).is_ok());
        }
        let other = mint(OTHER, &claims());
        assert_eq!(
            verify(&other, both, "stage", now()),
            Err(Rejection::BadSignature)
        );
        // After the rotation ends, the previous secret's tokens stop verifying.
        let old = mint(PREVIOUS, &claims());
        assert_eq!(check(&old), Err(Rejection::BadSignature));
        assert_eq!(
            verify(&mint(SECRET, &claims()), &[], "stage", now()),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn unknown_claims_are_ignored_and_duplicates_take_the_last() {
        let mut claims = claims();
        claims["aud"] = json!(["roomcast"]);
        claims["iss"] = json!("https://backend.example");
        claims["roles"] = json!({"moderator": [true, {"since": 1}]});
        assert!(check_claims(&claims).is_ok());

        let duplicated = format!(
            r#"{{"sub":"first","room":"other","sub":"last","room":"stage","exp":{}}}"#,
            NOW + 60.0
        );
        assert_eq!(check(&signed_payload(&duplicated)).unwrap().sub, "last");
        assert!(check(&signed_with_header(r#"{"alg":"none","alg":"HS256"}"#)).is_ok());
        assert_eq!(
            check(&signed_with_header(r#"{"alg":"HS256","alg":"none"}"#)),
            Err(Rejection::BadAlgorithm)
        );
    }

    /// Connection threads have 64 KiB of stack, a good part of it used by the time a token is
    /// checked. Parsing a deeply nested header (unsigned: anyone can send one) or claims into a
    /// JSON tree recurses once per level, which this test's 32 KiB stack would not survive in a
    /// debug build; the flat reading must.
    #[test]
    fn deeply_nested_json_does_not_recurse() {
        let nested = format!("{}1{}", "[".repeat(1200), "]".repeat(1200));
        let header = format!(r#"{{"alg":"HS256","x":{nested}}}"#);
        let deep_claim =
            with("x", None)
                .to_string()
                .replacen('{', &format!(r#"{{"x":{nested},"#), 1);
        let deep_sub = format!(r#"{{"sub":{nested},"room":"stage","exp":{}}}"#, NOW + 60.0);
        let tokens = [
            signed_with_header(&header),
            signed_payload(&deep_claim),
            signed_payload(&deep_sub),
        ];
        for token in &tokens {
            assert!(token.len() <= MAX_TOKEN_BYTES, "{}", token.len());
        }
        let results = std::thread::Builder::new()
            .stack_size(32 * 1024)
            .spawn(move || tokens.map(|token| check(&token).map(|claims| claims.sub)))
            .expect("a thread starts")
            .join()
            .expect("the flat parse fits in 32 KiB of stack");
        assert_eq!(
            results,
            [
                Ok("u42".to_string()),
                Ok("u42".to_string()),
                Err(Rejection::BadClaim("sub"))
            ]
        );
    }

    #[test]
    fn a_clock_before_the_epoch_still_compares() {
        let before = UNIX_EPOCH - Duration::from_secs(100);
        let token = mint(SECRET, &with("exp", Some(json!(-80))));
        assert!(verify(&token, &[SECRET], "stage", before).is_ok());
        let token = mint(SECRET, &with("exp", Some(json!(-200))));
        assert_eq!(
            verify(&token, &[SECRET], "stage", before),
            Err(Rejection::Expired)
        );
    }

    #[test]
    fn every_rejection_has_its_status_and_a_listed_reason() {
        let all = [
            Rejection::Missing,
            Rejection::TooLong,
            Rejection::Malformed,
            Rejection::BadAlgorithm,
            Rejection::BadHeader,
            Rejection::BadSignature,
            Rejection::MissingClaim("sub"),
            Rejection::BadClaim("name"),
            Rejection::Expired,
            Rejection::NotYetValid,
            Rejection::WrongRoom,
            Rejection::Banned,
        ];
        let reasons: Vec<&str> = all.iter().map(|r| r.reason()).collect();
        assert_eq!(reasons, Rejection::REASONS);
        for rejection in all {
            let forbidden = matches!(rejection, Rejection::WrongRoom | Rejection::Banned);
            assert_eq!(
                rejection.status(),
                if forbidden { 403 } else { 401 },
                "{rejection}"
            );
            assert!(rejection
                .reason()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(Rejection::BadClaim("name").to_string(), "bad_claim: name");
        assert_eq!(Rejection::Expired.to_string(), "expired");
        assert_eq!(Rejection::MissingClaim("exp").claim(), Some("exp"));
    }

    /// Interop: a token from the most used Rust JWT library (not used at run time) verifies,
    /// and its decoder accepts ours, claims and all.
    #[test]
    fn the_jsonwebtoken_crate_and_we_read_each_others_tokens() {
        use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
        let now = SystemTime::now();
        let exp = unix_seconds(now).floor() + 600.0;
        let claims =
            json!({"sub": "u7", "name": "Bo", "room": "stage", "perm": "read", "exp": exp as u64});

        let theirs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let verified = verify(&theirs, &[SECRET], "stage", now).unwrap();
        assert_eq!(
            (
                verified.sub.as_str(),
                verified.display_name(),
                verified.perm,
                verified.exp
            ),
            ("u7", "Bo", Perm::Read, exp)
        );
        for algorithm in [Algorithm::HS384, Algorithm::HS512] {
            let theirs = jsonwebtoken::encode(
                &Header::new(algorithm),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap();
            assert_eq!(
                verify(&theirs, &[SECRET], "stage", now),
                Err(Rejection::BadAlgorithm)
            );
        }

        let ours = mint(SECRET, &claims);
        let decoded = jsonwebtoken::decode::<Value>(
            &ours,
            &DecodingKey::from_secret(SECRET),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(decoded.claims, claims);
        assert_eq!(decoded.header.typ.as_deref(), Some("JWT"));
        assert!(jsonwebtoken::decode::<Value>(
            &ours,
            &DecodingKey::from_secret(OTHER),
            &Validation::new(Algorithm::HS256),
        )
        .is_err());
    }

    /// Interop with PyJWT, what Python backends mint with: scripts/test.sh installs it in a
    /// virtualenv (scripts/pyjwt.sh) and names its interpreter in `PYJWT_PYTHON`. Without it
    /// the test says so and skips, except under `ROOMCAST_REQUIRE_ALL`, where it fails.
    #[test]
    fn pyjwt_and_we_read_each_others_tokens() {
        let Some(python) = std::env::var_os("PYJWT_PYTHON") else {
            assert!(
                std::env::var_os("ROOMCAST_REQUIRE_ALL").is_none(),
                "PYJWT_PYTHON is not set (ROOMCAST_REQUIRE_ALL is): run scripts/pyjwt.sh"
            );
            eprintln!("skipped: PYJWT_PYTHON is not set (scripts/test.sh sets it)");
            return;
        };
        // Decodes our token, then mints one of its own for `stage` and prints both.
        const SCRIPT: &str = r#"
import json, sys, time, jwt
secret, ours = sys.argv[1], sys.argv[2]
print(json.dumps(jwt.decode(ours, secret, algorithms=["HS256"]), sort_keys=True))
now = int(time.time())
claims = {"sub": "py-1", "name": "Ann", "room": "stage", "perm": "react", "iat": now, "exp": now + 600}
print(jwt.encode(claims, secret, algorithm="HS256"))
"#;
        let secret = std::str::from_utf8(SECRET).expect("the test secret is ASCII");
        let exp = unix_seconds(SystemTime::now()).floor() + 600.0;
        let claims =
            json!({"exp": exp as u64, "name": "Bo", "perm": "post", "room": "*", "sub": "u7"});
        let ours = mint(SECRET, &claims);
        let output = std::process::Command::new(python)
            .args(["-c", SCRIPT, secret, &ours])
            .output()
            .expect("PYJWT_PYTHON runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut lines = stdout.lines();
        let decoded: Value =
            serde_json::from_str(lines.next().expect("the decoded claims")).unwrap();
        assert_eq!(decoded, claims);
        let theirs = lines.next().expect("PyJWT's token");
        let verified = verify(theirs, &[SECRET], "stage", SystemTime::now()).unwrap();
        assert_eq!(
            (
                verified.sub.as_str(),
                verified.display_name(),
                verified.perm
            ),
            ("py-1", "Ann", Perm::React)
        );
        assert_eq!(
            verify(theirs, &[SECRET], "backstage", SystemTime::now()),
            Err(Rejection::WrongRoom)
        );
    }
}
