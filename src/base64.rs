//! Standard base64 decoding, the one copy: PEM bodies (strict) and HTTP
//! Basic credentials (padding optional, as some clients leave it off).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Padding {
    /// Whole 4-character groups, `=` only at the end.
    Required,
    /// As `Required`, or with the trailing `=` left off.
    Optional,
}

/// Strict standard base64 (PEM bodies); `None` if malformed.
pub fn decode_strict(s: &str) -> Option<Vec<u8>> {
    decode(s, Padding::Required)
}

/// Standard base64 with the padding optional (HTTP Basic credentials).
pub fn decode_optional(s: &str) -> Option<Vec<u8>> {
    decode(s, Padding::Optional)
}

/// Decode `s`; `None` if malformed.
fn decode(s: &str, padding: Padding) -> Option<Vec<u8>> {
    if padding == Padding::Optional && !s.len().is_multiple_of(4) {
        let bare = s.trim_end_matches('=');
        if bare.len() % 4 == 1 || s.len() - bare.len() > 2 {
            return None;
        }
        let padded = format!("{bare}{}", "=".repeat((4 - bare.len() % 4) % 4));
        return decode(&padded, Padding::Required);
    }
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let chunks = bytes.len() / 4;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_required_or_optional_as_asked() {
        assert_eq!(
            decode("YWdlbnQ6dA==", Padding::Required).unwrap(),
            b"agent:t"
        );
        assert_eq!(decode("YWdlbnQ6dA", Padding::Optional).unwrap(), b"agent:t");
        assert_eq!(
            decode("YWdlbnQ6dA==", Padding::Optional).unwrap(),
            b"agent:t"
        );
        assert!(decode("YWdlbnQ6dA", Padding::Required).is_none());
        assert!(decode("YWdlbnQ6d", Padding::Optional).is_none());
        assert!(decode("YW=lbnQ6dA==", Padding::Optional).is_none());
        assert!(decode("YWdl bnQ6", Padding::Optional).is_none());
        assert_eq!(decode("", Padding::Optional).unwrap(), b"");
    }
}
