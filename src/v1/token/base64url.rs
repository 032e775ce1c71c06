//! Base64url without padding (RFC 4648 §5, as RFC 7515 §2 uses it): the three segments of a
//! join token.
//!
//! Written here rather than taken from a crate because a token's segments need exactly one
//! spelling: decoding refuses padding, the standard alphabet's `+` and `/`, whitespace, and
//! "non-canonical" final characters whose unused low bits are not zero. Each of those would
//! otherwise let one token be written several ways, which is harmless for the signature (it
//! covers the segments as written) but makes "the same token" a fuzzy notion for bans, logs
//! and caches, and lenient decoders are where JWT libraries have had their surprises.

/// The base64url alphabet, by sextet value.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// `bytes` as unpadded base64url.
pub fn encode(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = byte(0) << 16 | byte(1) << 8 | byte(2);
        // n bytes carry 8n bits: n + 1 sextets hold them, the last padded with zero bits.
        for i in 0..=chunk.len() {
            let sextet = (group >> (18 - 6 * i)) & 0x3f;
            text.push(char::from(ALPHABET[sextet as usize]));
        }
    }
    text
}

/// The bytes `text` spells in unpadded base64url, or `None` when it is not exactly that: any
/// byte outside the alphabet (`=`, `+`, `/`, whitespace, non-ASCII), a length that no byte
/// string encodes to (one more than a multiple of four), or a last character with unused bits
/// set (`QR` where only `QQ` spells `A`).
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(text.len() / 4 * 3 + 2);
    for chunk in text.as_bytes().chunks(4) {
        let mut group: u32 = 0;
        for &symbol in chunk {
            group = group << 6 | u32::from(sextet(symbol)?);
        }
        match chunk.len() {
            4 => bytes.extend_from_slice(&[(group >> 16) as u8, (group >> 8) as u8, group as u8]),
            // 18 bits: two bytes and 2 unused bits, which must be zero.
            3 if group & 0x3 == 0 => {
                bytes.extend_from_slice(&[(group >> 10) as u8, (group >> 2) as u8])
            }
            // 12 bits: one byte and 4 unused bits, which must be zero.
            2 if group & 0xf == 0 => bytes.push((group >> 4) as u8),
            // A lone final character (6 bits) holds no whole byte, or unused bits were set.
            _ => return None,
        }
    }
    Some(bytes)
}

/// The value of one base64url character.
fn sextet(symbol: u8) -> Option<u8> {
    match symbol {
        b'A'..=b'Z' => Some(symbol - b'A'),
        b'a'..=b'z' => Some(symbol - b'a' + 26),
        b'0'..=b'9' => Some(symbol - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    #[test]
    fn encodes_like_the_base64_crate_and_round_trips() {
        // Every length up to 3 × 20 + 2 covers each remainder many times.
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + len * 11) as u8).collect();
            let text = encode(&bytes);
            assert_eq!(text, URL_SAFE_NO_PAD.encode(&bytes), "{len} bytes");
            assert_eq!(decode(&text), Some(bytes), "{len} bytes");
        }
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(decode(""), Some(Vec::new()));
    }

    #[test]
    fn refuses_padding_the_standard_alphabet_and_stray_bytes() {
        for text in [
            "QQ==", "QQ=", "QUI=", "=", "QQ=A", "+w", "/w", "a+b/", "QQ Q", " QQ", "QQ\n",
            "Q\u{e9}", "QUJD.", "Q",     // one character holds no byte
            "QUJDR", // nor does a fifth
        ] {
            assert_eq!(decode(text), None, "{text:?}");
        }
    }

    #[test]
    fn refuses_non_canonical_trailing_bits() {
        assert_eq!(decode("QQ"), Some(b"A".to_vec()));
        assert_eq!(decode("QUI"), Some(b"AB".to_vec()));
        for text in ["QR", "QX", "Q_", "QUJ", "QUL", "QUP"] {
            assert_eq!(decode(text), None, "{text:?}");
        }
    }

    /// Every string of two and three characters from the alphabet and a few strays: ours must
    /// agree with the `base64` crate's strict engine (no padding, no trailing bits) on every
    /// one, whether it decodes and to what.
    #[test]
    fn agrees_with_the_base64_crate_on_every_short_input() {
        let symbols: Vec<u8> = ALPHABET.iter().copied().chain(*b"=+/ .\0").collect();
        let mut checked = 0;
        for &a in &symbols {
            for &b in &symbols {
                let two = [a, b];
                let text = std::str::from_utf8(&two).expect("all ASCII");
                assert_eq!(decode(text), URL_SAFE_NO_PAD.decode(text).ok(), "{text:?}");
                for &c in &symbols {
                    let three = [a, b, c];
                    let text = std::str::from_utf8(&three).expect("all ASCII");
                    assert_eq!(decode(text), URL_SAFE_NO_PAD.decode(text).ok(), "{text:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, symbols.len().pow(3));
    }
}
